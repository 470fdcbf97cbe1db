//! Stage 2b and 3b, the connection table: find a packet's flow and move its connection
//! through the `conntrack` states, or record a new one in both directions with a fresh SNAT
//! port (`snat.rs`). Reads BACKENDS and BRIDGE_PORTS; reads and writes FLOWS.
//!
//! The data path expires flows itself, lazily: a flow found past its state's timeout is removed
//! (both directions) and the packet treated as flowless, and a SNAT port whose holder expired
//! or ended is taken over. The expiry timer (`expiry.rs`) applies the same rules to flows
//! nobody meets again. A half-open connection's timeout counts from its SYN, and under
//! pressure it is the first to give its port up.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    BACKEND_HEALTHY, BackendOf, Be16, DropReason, FLOW_DNAT, FLOW_DSR, FLOW_FIN_SENT, FLOW_GUE,
    FLOW_IPIP, FLOW_RECLAIM_NS, FLOW_REVERSE, FLOW_SYN_WELL_FORMED, FLOW_TOUCH_INTERVAL_NS,
    FLOW_TS, FlowKeyOf, FlowValueOf, HALF_OPEN_EVICT_NS, SERVICE_MODE_DNAT, SERVICE_MODE_DSR_GUE,
    SERVICE_MODE_DSR_IPIP, SNAT_POOL_MAX, SNAT_PORT_TRIES, STAT_EXPIRED_IN_DATA_PATH,
    STAT_HALF_OPEN_EVICTED, STAT_SUSPECT_REFUSED, STAT_SUSPECT_UNANSWERED, SYN_UNANSWERED_NS,
    ServiceOf,
    conntrack::{
        Evidence, Step, TCP_CLOSED, TCP_ESTABLISHED, TCP_FIN, TCP_FIN_WAIT, TCP_SYN_RECV,
        TCP_SYN_SENT, UDP_REPLIED, UDP_UNREPLIED, acks_syn, ended, expired, half_open, seq_after,
        seq_in_window, tcp_flags_valid, tcp_step,
    },
    is_dsr_mode,
    snat_ports::pool_start,
    tunnel::gue_source_port,
};

use crate::{
    Verdict, csum,
    family::Family,
    flow_count,
    frame::Frame,
    maps::{BRIDGE_PORTS, snat_port_count, snat_port_min, state_timeout},
    parse::Packet,
    snat, stats, suspect, timestamps,
};

const EEXIST: i32 = 17;

/// The packet's FLOWS entry: the rewrite it gets, and where its next hop is cached. Read in
/// place rather than copied: the program's stack is 512 bytes.
pub struct Flow<A: Family> {
    entry: *mut FlowValueOf<A>,
}

impl<A: Family> Flow<A> {
    pub fn nat(&self) -> &FlowValueOf<A> {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        unsafe { &*self.entry }
    }

    pub fn entry(&self) -> *mut FlowValueOf<A> {
        self.entry
    }
}

/// The packet's flow, if it has one that should carry it, with its connection moved on by the
/// packet. A flow past its timeout, a half-open one whose backend failed or never answered
/// the SYN the client sends again, and an ended one whose tuple a new SYN reuses are removed
/// here, so the packet gets a new one. A backend's refusal of a SYN ends the flow and is kept
/// from the client (its retransmitted SYN gets a new flow).
#[inline(always)]
pub fn lookup<A: Family>(pkt: &Packet<A>) -> Result<Option<Flow<A>>, Verdict> {
    let Some(entry) = A::flows().get_ptr_mut(&pkt.key) else {
        return Ok(None);
    };
    if pkt.is_tcp() && !tcp_flags_valid(pkt.tcp_flags) {
        return Err(Verdict::Drop(DropReason::TcpInvalidFlags));
    }
    let now = now_ns();
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let value = unsafe { &mut *entry };
    // Only an entry silent for its whole timeout costs the other direction's lookup.
    if expired(state_timeout(value.state), value.last_seen_ns, now)
        && connection_expired(&pkt.key, value, now)
    {
        stats::count_slot(STAT_EXPIRED_IN_DATA_PATH);
        forget(&pkt.key, value);
        return Ok(None);
    }
    let reply = value.flags & FLOW_REVERSE != 0;
    if !reply && !backend_keeps(pkt, value, now) {
        // The reply entry frees the old SNAT port now rather than at expiry, and the
        // forward entry must not outlive it if no new flow replaces it (the packet may
        // still be dropped or passed before one is created).
        forget(&pkt.key, value);
        return Ok(None);
    }
    if value.flags & FLOW_DSR != 0 {
        if pkt.is_tcp() && !track_dsr(pkt, value) {
            forget(&pkt.key, value);
            return Ok(None);
        }
    } else if pkt.is_tcp() {
        if !track_tcp(pkt, value, reply, now)? {
            forget(&pkt.key, value);
            return Ok(None);
        }
    } else if reply && value.state == UDP_UNREPLIED {
        set_state(&pkt.key, value, UDP_REPLIED);
    }
    // A half-open connection's timeout counts from its SYN: its handshake's packets (a
    // flood's SYN-ACK retransmissions) do not extend it.
    if !half_open(value.state) {
        if now.saturating_sub(value.last_seen_ns) >= FLOW_TOUCH_INTERVAL_NS {
            value.last_seen_ns = now;
            // The next hop is looked up afresh once per interval, so route and neighbour
            // changes reach established flows.
            value.egress_ifindex = 0;
        } else if ended(value.state) {
            // An ended connection's few packets (its last ACK, retransmitted FINs) each
            // count: its SNAT port goes to a new connection FLOW_RECLAIM_NS after the last.
            value.last_seen_ns = now;
        }
    }
    Ok(Some(Flow { entry }))
}

/// The other direction's entry of the connection `key` belongs to, if it points back.
#[inline(always)]
fn peer_of<A: Family>(key: &FlowKeyOf<A>, value: &FlowValueOf<A>) -> Option<*mut FlowValueOf<A>> {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    A::flows()
        .get_ptr_mut(&value.peer_key(key.proto))
        .filter(|peer| unsafe { (**peer).peer_key(key.proto) } == *key)
}

/// Whether the connection has been silent in both directions for its state's timeout.
#[inline(always)]
fn connection_expired<A: Family>(key: &FlowKeyOf<A>, value: &FlowValueOf<A>, now: u64) -> bool {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let peer_seen = peer_of(key, value).map_or(0, |peer| unsafe { (*peer).last_seen_ns });
    expired(
        state_timeout(value.state),
        value.last_seen_ns.max(peer_seen),
        now,
    )
}

/// Moves both entries of the connection to `state`.
#[inline(always)]
fn set_state<A: Family>(key: &FlowKeyOf<A>, value: &mut FlowValueOf<A>, state: u32) {
    value.state = state;
    if let Some(peer) = peer_of(key, value) {
        // SAFETY: as above. Another CPU may move the peer at once; both write a state the
        // connection's packets led to.
        unsafe { (*peer).state = state };
    }
}

/// Tracks the segment in its direction's sequence space and takes the connection's step.
/// False if the flow must make way for a new one (a SYN reopening an ended connection).
#[inline(always)]
fn track_tcp<A: Family>(
    pkt: &Packet<A>,
    value: &mut FlowValueOf<A>,
    reply: bool,
    now: u64,
) -> Result<bool, Verdict> {
    let sent = value.seq_next;
    // An RST carries no data, and a segment beyond the window may be a blind guess: neither
    // moves what the direction is known to have sent.
    if !pkt.is_rst() && seq_after(pkt.seq_end, sent) && seq_in_window(pkt.seq_end, sent) {
        value.seq_next = pkt.seq_end;
    }
    if value.state == TCP_ESTABLISHED && !pkt.moves_state() {
        return Ok(true);
    }
    let peer = peer_of(&pkt.key, value);
    let step = tcp_step(
        value.state,
        pkt.tcp_flags,
        reply,
        value.flags & FLOW_FIN_SENT != 0,
        |evidence| match evidence {
            Evidence::InWindow => seq_in_window(pkt.seq, sent),
            // SAFETY: as above.
            Evidence::AcksSyn => {
                peer.is_some_and(|p| acks_syn(pkt.ack_seq, unsafe { (*p).seq_next }))
            }
        },
    );
    let state = match step {
        Step::Stay => return Ok(true),
        Step::Reopen => return Ok(false),
        Step::Refused => {
            // SAFETY: as above; `Refused` needed the peer.
            let created = peer.map_or(0, |p| unsafe { (*p).last_seen_ns });
            // SAFETY: as above.
            let from_backend = peer.is_some_and(|p| unsafe { came_from_backend(pkt, &*p) });
            if from_backend && !suspect::marked_before(value.backend_id, created) {
                suspect::mark(value.backend_id, now, STAT_SUSPECT_REFUSED);
                forget(&pkt.key, value);
                return Err(Verdict::Drop(DropReason::BackendRefused));
            }
            // The flow went to the backend knowing it suspect (no other was left): there is
            // nowhere better to send the retransmission, so the client gets the RST now
            // rather than retrying until it gives up.
            TCP_CLOSED
        }
        Step::Move(state) => state,
    };
    if state == TCP_SYN_RECV {
        // The backend's sequence space starts with its SYN-ACK.
        value.seq_next = pkt.seq_end;
    }
    if half_open(value.state) {
        // The first answer, or the end of the handshake: timeouts count from here.
        value.last_seen_ns = now;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        // Atomic: the other direction's CPU may be setting FLOW_END_COUNTED in the same word.
        flow_count::fetch_or_flags(value, FLOW_FIN_SENT);
    }
    if ended(state) && !ended(value.state) {
        // A null pointer rather than an Option: the verifier then sees the null check itself.
        let forward = if reply {
            peer.unwrap_or(core::ptr::null_mut())
        } else {
            &raw mut *value
        };
        flow_count::ended(forward);
    }
    value.state = state;
    if let Some(peer) = peer {
        // SAFETY: as above.
        unsafe { (*peer).state = state };
    }
    Ok(true)
}

/// A DSR connection's step, from the client's segments alone (the backend's go straight to
/// the client): the segment after the SYN establishes it, an in-window FIN half-closes it, an
/// in-window RST ends it. False for a SYN reopening a connection past its handshake.
#[inline(always)]
fn track_dsr<A: Family>(pkt: &Packet<A>, value: &mut FlowValueOf<A>) -> bool {
    let sent = value.seq_next;
    if !pkt.is_rst() && seq_after(pkt.seq_end, sent) && seq_in_window(pkt.seq_end, sent) {
        value.seq_next = pkt.seq_end;
    }
    if pkt.is_syn() {
        return value.state == TCP_SYN_SENT;
    }
    let in_window = seq_in_window(pkt.seq, sent);
    let state = match value.state {
        TCP_CLOSED => return true,
        _ if pkt.is_rst() && in_window => TCP_CLOSED,
        TCP_FIN_WAIT => return true,
        _ if pkt.tcp_flags & TCP_FIN != 0 && in_window => {
            flow_count::fetch_or_flags(value, FLOW_FIN_SENT);
            TCP_FIN_WAIT
        }
        TCP_SYN_SENT if !pkt.is_rst() => TCP_ESTABLISHED,
        _ => return true,
    };
    if ended(state) {
        flow_count::ended(&raw mut *value);
    }
    value.state = state;
    true
}

/// Removes a connection: the entry under `key` and its other direction (the reply entry
/// first: a packet meeting the forward entry alone is forgotten too).
#[inline(always)]
fn forget<A: Family>(key: &FlowKeyOf<A>, value: &mut FlowValueOf<A>) {
    if value.flags & FLOW_REVERSE != 0 {
        evict(key, value, peer_of(key, value));
    } else {
        let reply_key = value.peer_key(key.proto);
        forget_forward(key, value, &reply_key);
    }
}

#[inline(always)]
fn forget_forward<A: Family>(
    forward_key: &FlowKeyOf<A>,
    forward: &mut FlowValueOf<A>,
    reply_key: &FlowKeyOf<A>,
) {
    remove_reply(reply_key, forward);
    let _ = flow_count::remove_forward(forward_key, forward);
}

/// Removes the reply entry `reply_key` of `flow` (either entry), and with it the hold on its
/// SNAT port (a DNAT flow holds none).
#[inline(always)]
fn remove_reply<A: Family>(reply_key: &FlowKeyOf<A>, flow: &FlowValueOf<A>) {
    // A DSR flow has no reply entry: the key may be another flow's.
    if flow.flags & FLOW_DSR == 0 && A::flows().remove(reply_key).is_ok() {
        snat::release_held(reply_key, flow);
    }
}

/// Whether `pkt`, a reply, arrived the way the backend's packets do: on the device the flow's
/// packets to the backend leave by (or a port of that bridge), from the MAC they are sent to.
/// A client on another segment cannot forge that; one on the backend's segment has to spoof
/// the MAC as well.
#[inline(always)]
fn came_from_backend<A: Family>(pkt: &Packet<A>, forward: &FlowValueOf<A>) -> bool {
    // SAFETY: `eth` was bounds-checked in `parse::packet`.
    let src_mac = unsafe { (*pkt.eth).src_addr };
    let egress = forward.egress_ifindex;
    let ingress = pkt.ingress_ifindex;
    // SAFETY: a value read from a map lookup, valid for this program run.
    let via_bridge = || unsafe { BRIDGE_PORTS.get(&ingress) }.is_some_and(|b| *b == egress);
    egress != 0 && src_mac == forward.dst_mac && (ingress == egress || via_bridge())
}

/// Whether a forward entry still carries its connection to its backend. Not if the backend's
/// id now names another backend (it was removed and the id reused). A backend marked down
/// keeps its TCP connections (they end on their own, or with its own RST), but a SYN that
/// finds its half-open flow on a failed or silent backend moves on; a UDP flow, with no
/// handshake to protect, moves with its next datagram.
#[inline(always)]
fn backend_keeps<A: Family>(pkt: &Packet<A>, forward: &FlowValueOf<A>, now: u64) -> bool {
    let Some(backend) = A::backends().get(forward.backend_id) else {
        return false;
    };
    if backend.addr != forward.nat_dst_addr || backend.port != forward.nat_dst_port {
        return false;
    }
    let healthy = backend.flags & BACKEND_HEALTHY != 0;
    if !pkt.is_tcp() {
        return healthy;
    }
    if !pkt.is_syn() || forward.state != TCP_SYN_SENT {
        return true;
    }
    healthy && !syn_unanswered(pkt, forward, now)
}

/// Whether `pkt`, a SYN on a flow whose backend has answered nothing, is the client's genuine
/// retransmission (its sequence number is the first SYN's) long enough after it: the backend
/// is marked suspect then. Both SYNs must be well formed: a backend rightly ignores a SYN with
/// a bad checksum, and a client must not be able to get a backend marked with one.
#[inline(always)]
fn syn_unanswered<A: Family>(pkt: &Packet<A>, forward: &FlowValueOf<A>, now: u64) -> bool {
    let unanswered = pkt.seq_end == forward.seq_next
        && now.saturating_sub(forward.last_seen_ns) >= SYN_UNANSWERED_NS
        && forward.flags & FLOW_SYN_WELL_FORMED != 0
        && csum::tcp_header_only_ok(pkt);
    if unanswered {
        suspect::mark(forward.backend_id, now, STAT_SUSPECT_UNANSWERED);
    }
    unanswered
}

/// CLOCK_MONOTONIC at jiffy resolution: a flow's age is counted in seconds, and the coarse clock
/// is a memory read where the precise one reads and scales the TSC.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Who holds a SNAT port a new flow tried.
enum Holder {
    /// Nobody, or a connection that expired or ended a while ago: the port is free now.
    Gone,
    /// A half-open connection old enough to give the port up if no other is free.
    HalfOpen,
    /// A connection that keeps it.
    Live,
    /// Nobody, but the table has no room for another entry.
    TableFull,
}

/// Inserts the reply entry under `reverse_key` if its SNAT port is free for this backend, or
/// held by a connection that is gone. Otherwise says who holds it.
#[inline(always)]
fn take_port<A: Family>(reverse_key: &FlowKeyOf<A>, reverse: &FlowValueOf<A>, now: u64) -> Holder {
    match A::flows().insert(reverse_key, reverse, BPF_NOEXIST as u64) {
        Ok(()) => Holder::Gone,
        Err(e) if e == -EEXIST => match holder(reverse_key, now) {
            Holder::Gone => {
                let taken = A::flows()
                    .insert(reverse_key, reverse, BPF_NOEXIST as u64)
                    .is_ok();
                if taken { Holder::Gone } else { Holder::Live }
            }
            other => other,
        },
        // The port is free, but the table is full: a half-open flow holding another port may
        // still make room.
        Err(_) => Holder::TableFull,
    }
}

/// Judges the connection whose reply entry is `reverse_key`, and removes it if it is gone:
/// past its state's timeout, or ended and silent for FLOW_RECLAIM_NS (its port is worth more
/// to a new connection than its entries are to a late retransmission).
#[inline(always)]
fn holder<A: Family>(reverse_key: &FlowKeyOf<A>, now: u64) -> Holder {
    let Some(reply) = A::flows().get_ptr(reverse_key) else {
        return Holder::Gone;
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let reply = unsafe { &*reply };
    let forward = peer_of(reverse_key, reply);
    // SAFETY: as above.
    let forward_seen = forward.map_or(0, |f| unsafe { (*f).last_seen_ns });
    let silent = now.saturating_sub(reply.last_seen_ns.max(forward_seen));
    let state = reply.state;
    if silent >= state_timeout(state) || (ended(state) && silent >= FLOW_RECLAIM_NS) {
        evict(reverse_key, reply, forward);
        return Holder::Gone;
    }
    if half_open(state) && silent >= HALF_OPEN_EVICT_NS {
        return Holder::HalfOpen;
    }
    Holder::Live
}

/// Removes the connection whose reply entry is `reverse_key`; its forward entry too if it
/// still points back (`forward`): the client's tuple may already carry a newer flow.
#[inline(always)]
fn evict<A: Family>(
    reverse_key: &FlowKeyOf<A>,
    reply: &FlowValueOf<A>,
    forward: Option<*mut FlowValueOf<A>>,
) {
    match forward {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        Some(forward) => forget_forward(
            &reply.peer_key(reverse_key.proto),
            unsafe { &mut *forward },
            reverse_key,
        ),
        None => remove_reply(reverse_key, reply),
    }
}

/// Why no port could be had: the port judged by is held (the backend's ports ran out), or
/// free with no room in the table for it (the table ran out). Outside the port search, so the
/// search carries no flag for it (each one doubles the paths the verifier walks).
#[inline(always)]
fn exhausted<A: Family>(last_tried: &FlowKeyOf<A>, reverse: &FlowValueOf<A>) -> Verdict {
    match A::flows().insert(last_tried, reverse, BPF_NOEXIST as u64) {
        Err(e) if e == -EEXIST => Verdict::Drop(DropReason::SnatPortsExhausted),
        Err(_) => Verdict::Drop(DropReason::FlowTableFull),
        Ok(()) => {
            // Freed a moment ago; this packet is dropped all the same (its retransmission
            // finds the port), and the entry must not stay without its forward entry.
            remove_reply(last_tried, reverse);
            Verdict::Drop(DropReason::SnatPortsExhausted)
        }
    }
}

/// After a port claimed in the bitmaps turned out taken in FLOWS: the claim stays if a reply
/// entry of this backend holds the port (the bitmaps had missed it, as after an upgrade from a
/// build without them), and is given back otherwise (another backend id with the same address
/// holds it, or the table had no room).
#[inline(always)]
fn keep_claim_if_held<A: Family>(reverse_key: &FlowKeyOf<A>, reverse: &FlowValueOf<A>) {
    let held = A::flows()
        .get_ptr(reverse_key)
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        .is_some_and(|holder| unsafe { (*holder).backend_id } == reverse.backend_id);
    if !held {
        snat::release(reverse_key, snat::ports_of(reverse));
    }
}

/// Takes the port of the half-open connection whose reply entry is `reverse_key`, for
/// `reverse`: the ports tried were all held, and a connection that can complete needs it more.
#[inline(always)]
fn evict_half_open<A: Family>(reverse_key: &FlowKeyOf<A>, reverse: &FlowValueOf<A>) -> bool {
    let Some(reply) = A::flows().get_ptr(reverse_key) else {
        return false;
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let reply = unsafe { &*reply };
    if !half_open(reply.state) {
        return false;
    }
    evict(reverse_key, reply, peer_of(reverse_key, reply));
    let taken = A::flows()
        .insert(reverse_key, reverse, BPF_NOEXIST as u64)
        .is_ok();
    if taken {
        stats::count_slot(STAT_HALF_OPEN_EVICTED);
    }
    taken
}

/// Records a new flow to `backend`: the reply direction first, under a tuple nobody holds for
/// this backend (inserted with BPF_NOEXIST, so two CPUs can't take the same one), then the
/// forward direction. In NAT mode the tuple has a fresh SNAT port; in DNAT mode it is the
/// client's own address and port; in DSR mode there is no reply direction.
#[inline(always)]
pub fn create<A: Family>(
    ctx: &impl Frame,
    pkt: &Packet<A>,
    svc: &ServiceOf<A>,
    backend_id: u32,
    backend: &BackendOf<A>,
) -> Result<Flow<A>, Verdict> {
    let now = now_ns();
    if is_dsr_mode(svc.mode) {
        return create_dsr(pkt, svc, backend_id, backend, now);
    }
    let mut reverse_key = reply_key(pkt, backend);
    let reverse = prepare(ctx, pkt, svc, backend_id)?;
    take_tuple(svc, &mut reverse_key, reverse, now)?;
    finish(pkt, &reverse_key, reverse, now)
}

/// The reply entry's key before its tuple is taken: from the backend to the client.
#[inline(always)]
pub fn reply_key<A: Family>(pkt: &Packet<A>, backend: &BackendOf<A>) -> FlowKeyOf<A> {
    FlowKeyOf {
        src_addr: backend.addr,
        dst_addr: pkt.key.src_addr,
        src_port: backend.port,
        dst_port: pkt.key.src_port,
        proto: pkt.key.proto,
        _pad: [0; 3],
    }
}

/// `create`'s first step: the reply entry's value, in the family's scratch slot (off the
/// stack: after the tuple is taken, the rest of the program fills it as the forward entry).
#[inline(always)]
pub fn prepare<A: Family>(
    ctx: &impl Frame,
    pkt: &Packet<A>,
    svc: &ServiceOf<A>,
    backend_id: u32,
) -> Result<&'static mut FlowValueOf<A>, Verdict> {
    let dnat = svc.mode == SERVICE_MODE_DNAT;
    let state = if pkt.is_tcp() {
        TCP_SYN_SENT
    } else {
        UDP_UNREPLIED
    };
    // The backend sees the client's own timestamps in DNAT mode: its tuple is the client's.
    let ts_add = if pkt.is_tcp() && !dnat {
        timestamps::syn_add(ctx, pkt)
    } else {
        None
    };
    let mode_flags = if ts_add.is_some() { FLOW_TS } else { 0 } | if dnat { FLOW_DNAT } else { 0 };
    let scratch = A::flow_scratch()
        .get_ptr_mut(0)
        .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
    // SAFETY: a per-CPU array slot, this CPU's alone for this program run (the hooks that
    // create flows run in softirq, which does not nest on a CPU).
    let reverse = unsafe { &mut *scratch };
    *reverse = FlowValueOf {
        nat_src_addr: pkt.key.dst_addr,
        nat_dst_addr: pkt.key.src_addr,
        nat_src_port: pkt.key.dst_port,
        nat_dst_port: pkt.key.src_port,
        backend_id,
        flags: FLOW_REVERSE | mode_flags,
        last_seen_ns: 0,
        state,
        ts_add: ts_add.unwrap_or(0).wrapping_neg(),
        mss: svc.mss,
        ..FlowValueOf::default()
    };
    Ok(reverse)
}

/// `create`'s second step: inserts the reply entry `reverse` under the tuple its mode takes
/// (`reverse_key` leaves with it). The client is the one `reverse` answers.
#[inline(always)]
pub fn take_tuple<A: Family>(
    svc: &ServiceOf<A>,
    reverse_key: &mut FlowKeyOf<A>,
    reverse: &mut FlowValueOf<A>,
    now: u64,
) -> Result<(), Verdict> {
    if reverse.flags & FLOW_DNAT != 0 {
        take_client_tuple(reverse_key, reverse, now)
    } else {
        take_snat_port(svc, reverse_key, reverse, now)
    }
}

/// `create`'s last step: the forward entry for `pkt`, after the reply entry `reverse` was
/// inserted under `reverse_key`.
#[inline(always)]
pub fn finish<A: Family>(
    pkt: &Packet<A>,
    reverse_key: &FlowKeyOf<A>,
    reverse: &mut FlowValueOf<A>,
    now: u64,
) -> Result<Flow<A>, Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let mode_flags = reverse.flags & (FLOW_TS | FLOW_DNAT);
    let backend_id = reverse.backend_id;
    let forward = reverse;
    forward.nat_src_addr = reverse_key.dst_addr;
    forward.nat_dst_addr = reverse_key.src_addr;
    forward.nat_src_port = reverse_key.dst_port;
    forward.nat_dst_port = reverse_key.src_port;
    forward.flags = mode_flags
        | if pkt.is_tcp() && csum::tcp_header_only_ok(pkt) {
            FLOW_SYN_WELL_FORMED
        } else {
            0
        };
    forward.last_seen_ns = now;
    forward.seq_next = pkt.seq_end;
    forward.ts_add = forward.ts_add.wrapping_neg();
    // BPF_NOEXIST: each connection is counted opened once. Another CPU that made the same
    // flow a moment earlier (a duplicate SYN) wins, and this packet follows its flow.
    match A::flows().insert(&pkt.key, forward, BPF_NOEXIST as u64) {
        Ok(()) => flow_count::opened(backend_id),
        Err(e) => {
            remove_reply(reverse_key, forward);
            if e != -EEXIST {
                return Err(Verdict::Drop(DropReason::FlowTableFull));
            }
        }
    }
    // The entry as stored, so that forwarding caches this packet's next hop in it: the
    // flow's next packets then skip the FIB.
    let entry = A::flows().get_ptr_mut(&pkt.key).ok_or(inconsistent)?;
    Ok(Flow { entry })
}

/// DSR: the forward entry alone, naming the backend as the FIB's destination (and in the IPIP
/// form, the tunnel's source as the FIB's source). A TCP segment
/// other than a SYN opens it established: a connection whose flow expired while idle (its
/// backend's answers never pass here) goes on where consistent hashing sends it.
#[inline(always)]
pub fn create_dsr<A: Family>(
    pkt: &Packet<A>,
    svc: &ServiceOf<A>,
    backend_id: u32,
    backend: &BackendOf<A>,
    now: u64,
) -> Result<Flow<A>, Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let state = match (pkt.is_tcp(), pkt.is_syn()) {
        (true, true) => TCP_SYN_SENT,
        (true, false) => TCP_ESTABLISHED,
        (false, _) => UDP_REPLIED,
    };
    let well_formed = if pkt.is_syn() && csum::tcp_header_only_ok(pkt) {
        FLOW_SYN_WELL_FORMED
    } else {
        0
    };
    // The IPIP form's outer source: an address of the service's pool, chosen by the client's
    // tuple, so that the backend's NIC spreads the tunnel's packets over its queues (it
    // hashes their outer addresses) as far as the pool allows.
    // GUE's UDP source port carries the flow's hash, for the same spread by flow.
    let (tunnel, src_addr, src_port) = match svc.mode {
        SERVICE_MODE_DSR_IPIP | SERVICE_MODE_DSR_GUE => {
            let count = u32::from(svc.snat_count).clamp(1, SNAT_POOL_MAX);
            let index = pool_start(pkt.key.src_addr.fold(), pkt.key.src_port.0, count);
            let addr = svc.snat_addrs[(index & (SNAT_POOL_MAX - 1)) as usize];
            if svc.mode == SERVICE_MODE_DSR_GUE {
                let port = gue_source_port(pkt.key.hash());
                (FLOW_GUE, addr, Be16::from_host(port))
            } else {
                (FLOW_IPIP, addr, pkt.key.src_port)
            }
        }
        _ => (0, pkt.key.src_addr, pkt.key.src_port),
    };
    let scratch = A::flow_scratch().get_ptr_mut(0).ok_or(inconsistent)?;
    // SAFETY: as in `create`.
    let forward = unsafe { &mut *scratch };
    *forward = FlowValueOf {
        nat_src_addr: src_addr,
        nat_dst_addr: backend.addr,
        nat_src_port: src_port,
        nat_dst_port: backend.port,
        backend_id,
        flags: FLOW_DSR | tunnel | well_formed,
        last_seen_ns: now,
        seq_next: pkt.seq_end,
        state,
        mss: svc.mss,
        ..FlowValueOf::default()
    };
    match A::flows().insert(&pkt.key, forward, BPF_NOEXIST as u64) {
        Ok(()) => flow_count::opened(backend_id),
        Err(e) if e == -EEXIST => {}
        Err(_) => return Err(Verdict::Drop(DropReason::FlowTableFull)),
    }
    let entry = A::flows().get_ptr_mut(&pkt.key).ok_or(inconsistent)?;
    Ok(Flow { entry })
}

/// DNAT: inserts the reply entry under the client's own tuple towards the backend. Only a
/// connection gone from that tuple gives it up: the same client tuple to another VIP, whose
/// flow went to the same backend, keeps it while it lives.
#[inline(always)]
fn take_client_tuple<A: Family>(
    reverse_key: &FlowKeyOf<A>,
    reverse: &FlowValueOf<A>,
    now: u64,
) -> Result<(), Verdict> {
    match take_port(reverse_key, reverse, now) {
        Holder::Gone => Ok(()),
        Holder::TableFull => Err(Verdict::Drop(DropReason::FlowTableFull)),
        Holder::HalfOpen | Holder::Live => Err(Verdict::Drop(DropReason::DnatTupleTaken)),
    }
}

/// Tries `port` for the reply entry `reverse` under `key`: true if it took it. A port a
/// half-open connection holds is remembered in `half_open_port` (the first such).
#[inline(always)]
fn try_port<A: Family>(
    port: Be16,
    key: &mut FlowKeyOf<A>,
    reverse: &FlowValueOf<A>,
    now: u64,
    half_open_port: &mut Option<Be16>,
) -> bool {
    key.dst_port = port;
    match take_port_apart(key, reverse, now) {
        Holder::Gone => true,
        Holder::HalfOpen => {
            half_open_port.get_or_insert(port);
            false
        }
        Holder::Live | Holder::TableFull => false,
    }
}

/// `take_port` in a BPF function of its own: the port search inlined whole into the balancing
/// path would take the stack its callees need (the verifier's limit is 512 bytes per chain).
#[inline(never)]
fn take_port_apart<A: Family>(key: &FlowKeyOf<A>, reverse: &FlowValueOf<A>, now: u64) -> Holder {
    take_port(key, reverse, now)
}

/// NAT: inserts the reply entry under a SNAT address of the service's pool and a port nobody
/// holds towards the backend, and marks the port in its bitmap; `reverse_key` comes with the
/// client's tuple and leaves with the one taken.
#[inline(always)]
fn take_snat_port<A: Family>(
    svc: &ServiceOf<A>,
    reverse_key: &mut FlowKeyOf<A>,
    reverse: &mut FlowValueOf<A>,
    now: u64,
) -> Result<(), Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let backend_id = reverse.backend_id;
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let (port_min, port_count) = (snat_port_min(), snat_port_count());
    // The pool's addresses are tried from one the client's address and port choose: a client
    // reusing its tuple comes back to the same address (below: and port).
    let snat_count = u32::from(svc.snat_count).clamp(1, SNAT_POOL_MAX);
    let (client_addr, client_src_port) = (reverse.nat_dst_addr, reverse.nat_dst_port);
    let snat_start = pool_start(client_addr.fold(), client_src_port.0, snat_count);
    let snat_addr = |index: u32| svc.snat_addrs[(index & (SNAT_POOL_MAX - 1)) as usize];
    reverse_key.dst_addr = snat_addr(snat_start);
    reverse.snat_index = snat_start as u16;
    // The client's own port first, when the range holds it (as conntrack's masquerade does):
    // a client reusing its tuple then meets its own previous connection in the backend's
    // TIME_WAIT, under the same TCP timestamp offset, and the backend accepts the SYN. Another
    // client's connection there may carry an older timestamp, and about half are refused.
    let client_port = u32::from(client_src_port.to_host());
    let mut found = false;
    // A port held by a half-open connection, to take if none of the tries is free.
    let mut half_open_port = None;
    if client_port.wrapping_sub(port_min) < port_count
        && snat::claim_port(snat::ports_of(reverse), client_src_port.to_host())
    {
        found = try_port(
            client_src_port,
            reverse_key,
            reverse,
            now,
            &mut half_open_port,
        );
        if !found {
            keep_claim_if_held(reverse_key, reverse);
        }
    }
    let mut bitmap_port = None;
    if !found && let Some((index, port)) = snat::claim(backend_id, snat_count, snat_start, cpu) {
        reverse.snat_index = index as u16;
        reverse_key.dst_addr = snat_addr(index);
        found = try_port(
            Be16::from_host(port),
            reverse_key,
            reverse,
            now,
            &mut half_open_port,
        );
        if !found {
            keep_claim_if_held(reverse_key, reverse);
            bitmap_port = Some(reverse_key.dst_port);
        }
    }
    // The bitmaps had no free port, or the one they gave was taken: ports may still be held by
    // connections gone since (ended, or past their timeout, and not removed yet), and another
    // service with this backend's address and SNAT address marks its ports in bitmaps of its
    // own. A few tries in FLOWS at random ports find a free one: the ports the bitmaps handed
    // out last lie side by side and are the likeliest taken, so no try follows another's port.
    for _ in 0..SNAT_PORT_TRIES {
        if found {
            break;
        }
        // SAFETY: a helper without arguments.
        let index = unsafe { bpf_get_prandom_u32() }
            .checked_rem(port_count)
            .ok_or(inconsistent)?;
        found = try_port(
            Be16::from_host((port_min + index) as u16),
            reverse_key,
            reverse,
            now,
            &mut half_open_port,
        );
    }
    if !found {
        // A half-open connection gives its port up, and its two entries with it: under a
        // flood, that makes room whether the ports or the table ran out.
        let Some(port) = half_open_port else {
            // Judged at the port the bitmaps gave, if they gave one: free there, it was taken
            // by another service's connection or had no room in the table; else at the last
            // random port.
            if let Some(port) = bitmap_port {
                reverse_key.dst_port = port;
            }
            return Err(exhausted(reverse_key, reverse));
        };
        reverse_key.dst_port = port;
        if !evict_half_open(reverse_key, reverse) {
            return Err(exhausted(reverse_key, reverse));
        }
    }
    snat::mark(snat::ports_of(reverse), reverse_key.dst_port.to_host());
    Ok(())
}
