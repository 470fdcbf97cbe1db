//! Stage 2b and 3b, the connection table: find a packet's flow, or record a new one in both
//! directions with a fresh SNAT port. Reads BACKENDS; reads and writes FLOWS and SNAT_CURSOR.
//!
//! Entries are removed by the daemon when idle (FIN/RST shorten that), and by the data path
//! only in two cases, both directions at once: a flow that is re-balanced away from a failed
//! backend or reopened by a new SYN, and a closed connection whose SNAT port a new flow
//! reclaims.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    BACKEND_HEALTHY, Backend, Be16, DropReason, FLOW_CLOSING, FLOW_RECLAIM_NS, FLOW_REVERSE,
    FLOW_TOUCH_INTERVAL_NS, FlowKey, FlowValue, SNAT_PORT_TRIES, STAT_SUSPECT_REFUSED,
    STAT_SUSPECT_UNANSWERED, SYN_UNANSWERED_NS, Service,
};

use crate::{
    Verdict,
    maps::{BACKENDS, FLOWS, SNAT_CURSOR, cpu_count, snat_port_count, snat_port_min},
    parse::Packet,
    suspect,
};

const EEXIST: i32 = 17;

/// The rewrite a packet gets, and the table entry it came from (to cache the next hop in).
pub struct Flow {
    pub nat: FlowValue,
    pub entry: Option<*mut FlowValue>,
}

/// The packet's flow, if it has one that should carry it: a flow whose backend failed or never
/// answered its SYN, or a closed TCP flow whose tuple a new SYN reuses, is dropped here so the
/// packet gets a new one. A backend's RST to a SYN it never answered ends the flow and is kept
/// from the client (its retransmitted SYN gets a new flow).
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Result<Option<Flow>, Verdict> {
    let Some(entry) = FLOWS.get_ptr_mut(&pkt.key) else {
        return Ok(None);
    };
    let now = now_ns();
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let value = unsafe { &mut *entry };
    if value.flags & FLOW_REVERSE == 0 {
        let reopened = pkt.is_syn() && value.flags & FLOW_CLOSING != 0;
        if reopened || !backend_serves(value) || syn_unanswered(pkt, value, now) {
            // The reply entry frees the old SNAT port now rather than at expiry, and the
            // forward entry must not outlive it if no new flow replaces it (the packet may
            // still be dropped or passed before one is created).
            forget(&pkt.key, value);
            return Ok(None);
        }
    } else if value.last_seen_ns == 0 && pkt.is_rst() && !refusal_is_final(value, pkt.key.proto) {
        suspect::mark(value.backend_id, now, STAT_SUSPECT_REFUSED);
        forget(&pkt.key, value);
        return Err(Verdict::Drop(DropReason::BackendRefused));
    }
    // Saturating: an entry stamped by a finer clock may be a jiffy ahead of the coarse one.
    if now.saturating_sub(value.last_seen_ns) >= FLOW_TOUCH_INTERVAL_NS {
        value.last_seen_ns = now;
        // The next hop is looked up afresh once per interval, so route and neighbour changes
        // reach established flows.
        value.egress_ifindex = 0;
    }
    if pkt.is_fin_or_rst() {
        value.flags |= FLOW_CLOSING;
    }
    Ok(Some(Flow {
        nat: *value,
        entry: Some(entry),
    }))
}

/// Removes a connection: the entry under `key` and its other direction.
#[inline(always)]
fn forget(key: &FlowKey, value: &FlowValue) {
    let _ = FLOWS.remove(&value.peer_key(key.proto));
    let _ = FLOWS.remove(key);
}

/// Whether a refused connection was made to a backend already marked suspect (every other was
/// too): there is nowhere better to send the retransmission, so the client gets the RST now
/// rather than retrying until it gives up.
#[inline(always)]
fn refusal_is_final(reply: &FlowValue, proto: u8) -> bool {
    FLOWS
        .get_ptr(&reply.peer_key(proto))
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        .map(|forward| unsafe { (*forward).last_seen_ns })
        .is_some_and(|created| suspect::marked_before(reply.backend_id, created))
}

/// Whether `pkt` is a client's retransmitted SYN on a flow whose backend has answered nothing
/// (its reply entry never saw a packet); the backend is marked suspect then.
#[inline(always)]
fn syn_unanswered(pkt: &Packet, forward: &FlowValue, now: u64) -> bool {
    if !pkt.is_syn() || now.saturating_sub(forward.last_seen_ns) < SYN_UNANSWERED_NS {
        return false;
    }
    let answered = FLOWS
        .get_ptr(&forward.peer_key(pkt.key.proto))
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        .is_some_and(|reply| unsafe { (*reply).last_seen_ns } != 0);
    if !answered {
        suspect::mark(forward.backend_id, now, STAT_SUSPECT_UNANSWERED);
    }
    !answered
}

/// CLOCK_MONOTONIC at jiffy resolution: a flow's age is counted in seconds, and the coarse clock
/// is a memory read where the precise one reads and scales the TSC.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether the flow's backend is healthy and still the one the flow was made for: a backend
/// removed and its id given to another must not receive the old one's flows.
#[inline(always)]
fn backend_serves(forward: &FlowValue) -> bool {
    BACKENDS.get(forward.backend_id).is_some_and(|b| {
        b.flags & BACKEND_HEALTHY != 0
            && b.addr == forward.nat_dst_addr
            && b.port == forward.nat_dst_port
    })
}

/// Inserts the reply entry under `reverse_key` if its SNAT port is free for this backend, or
/// held by a connection that may be reclaimed. False if the port is taken.
#[inline(always)]
fn take_port(reverse_key: &FlowKey, reverse: &FlowValue, now: u64) -> Result<bool, Verdict> {
    match FLOWS.insert(reverse_key, reverse, BPF_NOEXIST as u64) {
        Ok(()) => Ok(true),
        // The port's holder may be a connection that closed a while ago: its port is worth
        // more to this one than its entries are to a late retransmission.
        Err(e) if e == -EEXIST => Ok(reclaim_closed(reverse_key, now)
            && FLOWS
                .insert(reverse_key, reverse, BPF_NOEXIST as u64)
                .is_ok()),
        Err(_) => Err(Verdict::Drop(DropReason::FlowTableFull)),
    }
}

/// Removes the connection whose reply entry is `reverse_key` if it is closing (a FIN or RST
/// seen, or its SYN never answered, as the daemon's expiry counts it) and has been silent for
/// FLOW_RECLAIM_NS: its SNAT port is freed at once rather than at the daemon's expiry. True if
/// the key is free now.
#[inline(always)]
fn reclaim_closed(reverse_key: &FlowKey, now: u64) -> bool {
    let Some(reply) = FLOWS.get_ptr(reverse_key) else {
        return true;
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let reply = unsafe { *reply };
    let forward_key = reply.peer_key(reverse_key.proto);
    // The forward entry belongs to this connection only if it points back at the reply entry
    // (the client's tuple may already carry a newer flow).
    let forward = FLOWS
        .get_ptr(&forward_key)
        // SAFETY: as above.
        .map(|f| unsafe { *f })
        .filter(|f| f.peer_key(reverse_key.proto) == *reverse_key);
    let mut closing = reply.flags & FLOW_CLOSING != 0 || reply.last_seen_ns == 0;
    let mut last_seen = reply.last_seen_ns;
    if let Some(f) = forward {
        closing |= f.flags & FLOW_CLOSING != 0;
        last_seen = last_seen.max(f.last_seen_ns);
    }
    if !closing || now.saturating_sub(last_seen) < FLOW_RECLAIM_NS {
        return false;
    }
    match forward {
        Some(_) => forget(reverse_key, &reply),
        None => {
            let _ = FLOWS.remove(reverse_key);
        }
    }
    true
}

/// Records a new flow to `backend`: the reply direction first, under a SNAT port nobody holds
/// for this backend (inserted with BPF_NOEXIST, so two CPUs can't take the same one), then the
/// forward direction.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc: &Service,
    backend_id: u32,
    backend: &Backend,
) -> Result<Flow, Verdict> {
    let now = now_ns();
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let cursor = SNAT_CURSOR.get_ptr_mut(0).ok_or(inconsistent)?;
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let (port_min, port_count, cpus) = (snat_port_min(), snat_port_count(), cpu_count());
    let mut reverse_key = FlowKey {
        src_addr: backend.addr,
        dst_addr: svc.snat_addr,
        src_port: backend.port,
        dst_port: Be16(0),
        proto: pkt.key.proto,
        _pad: [0; 3],
    };
    let reverse = FlowValue {
        nat_src_addr: pkt.key.dst_addr,
        nat_dst_addr: pkt.key.src_addr,
        nat_src_port: pkt.key.dst_port,
        nat_dst_port: pkt.key.src_port,
        backend_id,
        flags: FLOW_REVERSE,
        last_seen_ns: 0,
        ..FlowValue::default()
    };
    // The client's own port first, when the range holds it (as conntrack's masquerade does):
    // a client reusing its tuple then meets its own previous connection in the backend's
    // TIME_WAIT, under the same TCP timestamp offset, and the backend accepts the SYN. Another
    // client's connection there may carry an older timestamp, and about half are refused.
    let client_port = u32::from(pkt.key.src_port.to_host());
    let mut found = false;
    if client_port.wrapping_sub(port_min) < port_count {
        reverse_key.dst_port = pkt.key.src_port;
        found = take_port(&reverse_key, &reverse, now)?;
    }
    for _ in 0..SNAT_PORT_TRIES {
        if found {
            break;
        }
        // SAFETY: a per-CPU array slot, only this CPU writes it.
        let turn = unsafe {
            let turn = *cursor;
            *cursor = turn.wrapping_add(1);
            turn
        };
        // Each CPU walks its own interleaved sequence through the range, so ports are reused
        // as late as possible: a backend may still hold the previous user in TIME_WAIT.
        let index = turn
            .wrapping_mul(cpus)
            .wrapping_add(cpu)
            .checked_rem(port_count)
            .ok_or(inconsistent)?;
        reverse_key.dst_port = Be16::from_host((port_min + index) as u16);
        found = take_port(&reverse_key, &reverse, now)?;
    }
    if !found {
        return Err(Verdict::Drop(DropReason::SnatPortsExhausted));
    }
    let forward = FlowValue {
        nat_src_addr: svc.snat_addr,
        nat_dst_addr: backend.addr,
        nat_src_port: reverse_key.dst_port,
        nat_dst_port: backend.port,
        backend_id,
        flags: 0,
        last_seen_ns: now,
        ..FlowValue::default()
    };
    if FLOWS.insert(&pkt.key, &forward, BPF_ANY as u64).is_err() {
        let _ = FLOWS.remove(&reverse_key);
        return Err(Verdict::Drop(DropReason::FlowTableFull));
    }
    // The entry as stored, so that forwarding caches this packet's next hop in it: the
    // flow's next packets then skip the FIB.
    Ok(Flow {
        nat: forward,
        entry: FLOWS.get_ptr_mut(&pkt.key),
    })
}
