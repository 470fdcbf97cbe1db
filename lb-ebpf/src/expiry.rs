//! Expiry in the kernel: one BPF timer walks FLOWS every EXPIRY_INTERVAL_NS and removes the
//! connections past their state's timeout, by the rules the data path expires with when a
//! packet meets one. The timer lives in EXPIRY, a map the daemon pins: it keeps running while
//! no daemon does (a crash, an upgrade refused, a stop), so the table never fills with flows
//! that nobody meets again. The daemon arms it once at start by running `lb_expiry_arm`
//! (BPF_PROG_TEST_RUN); arming again hands the running timer this program's callback.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_timer, xdp_action},
    btf_maps::Array,
    helpers::{
        bpf_for_each_map_elem, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_timer_init,
        bpf_timer_set_callback, bpf_timer_start,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    Be32, EXPIRY_INTERVAL_MAX_NS, EXPIRY_INTERVAL_NS, FLOW_DNAT, FLOW_ORPHAN_SEEN,
    FLOW_PORT_RELEASED, FLOW_RECLAIM_NS, FLOW_REVERSE, FlowKeyOf, FlowValueOf, In6,
    STAT_EXPIRED_IN_KERNEL, STAT_EXPIRY_PASS_NS, STAT_EXPIRY_PASSES,
    conntrack::{ended, expired},
};

use crate::{family::Family, flow_count, maps::state_timeout, snat, stats};

/// The value of EXPIRY: the kernel finds the timer by its BTF type, so the map is a BTF map.
#[repr(C)]
pub struct ExpiryTimer {
    timer: bpf_timer,
}

/// [0] -> the expiry timer. Pinned by the daemon, so that it outlives it.
#[btf_map]
pub static EXPIRY: Array<ExpiryTimer, 1> = Array::new();

const CLOCK_MONOTONIC: u64 = 1;
/// The next pass waits this many times as long as the last one took (at least
/// EXPIRY_INTERVAL_NS, at most EXPIRY_INTERVAL_MAX_NS).
const EXPIRY_PACE: u64 = 4;

/// What one pass hands each entry.
#[repr(C)]
struct Pass {
    now_ns: u64,
}

/// Arms the timer (or takes over a running one): XDP_PASS if armed, XDP_ABORTED if not.
#[xdp]
pub fn lb_expiry_arm(_ctx: XdpContext) -> u32 {
    let Some(value) = EXPIRY.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run; the helpers
    // take the timer inside it and the map it lives in.
    unsafe {
        let timer = &raw mut (*value).timer;
        // -EBUSY: an earlier daemon's program armed it; the callback below replaces its own.
        let _ = bpf_timer_init(
            timer,
            (&raw const EXPIRY).cast_mut().cast(),
            CLOCK_MONOTONIC,
        );
        if bpf_timer_set_callback(timer, expire_all as *mut c_void) != 0
            || bpf_timer_start(timer, EXPIRY_INTERVAL_NS, 0) != 0
        {
            return xdp_action::XDP_ABORTED;
        }
    }
    xdp_action::XDP_PASS
}

/// The timer's callback: one pass over FLOWS, then the next in EXPIRY_INTERVAL_NS.
extern "C" fn expire_all(_map: *mut c_void, _key: *mut u32, value: *mut ExpiryTimer) -> i32 {
    let mut pass = Pass {
        // SAFETY: a helper without arguments or side effects.
        now_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    // The precise clock: a pass over a small table takes microseconds.
    // SAFETY: as above.
    let started = unsafe { bpf_ktime_get_ns() };
    walk::<Be32>(&mut pass);
    walk::<In6>(&mut pass);
    // SAFETY: as above.
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(started);
    // A pass over a huge table may take a good part of a second in softirq: the next one
    // waits at least 4 times as long, so that expiry takes a fifth of a CPU at most (the cap
    // keeps it timely should a pass ever take over a second).
    let next = (took * EXPIRY_PACE).clamp(EXPIRY_INTERVAL_NS, EXPIRY_INTERVAL_MAX_NS);
    // SAFETY: `value` is the timer's own map value.
    unsafe { bpf_timer_start(&raw mut (*value).timer, next, 0) };
    stats::count_slot(STAT_EXPIRY_PASSES);
    stats::add_to_slot(STAT_EXPIRY_PASS_NS, took);
    0
}

/// One family's flow table, entry by entry.
#[inline(always)]
fn walk<A: Family>(pass: &mut Pass) {
    // SAFETY: the flow table is a map, the callback has the signature bpf_for_each_map_elem
    // calls, and `pass` outlives the call.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::from_ref(A::flows()).cast_mut().cast(),
            expire_entry::<A> as *mut c_void,
            core::ptr::from_mut(pass).cast(),
            0,
        );
    }
}

/// One entry of the pass. A forward entry decides for its connection: silent in both
/// directions for its state's timeout, both entries go. A reply entry goes alone only when its
/// forward entry has been missing for a whole pass.
extern "C" fn expire_entry<A: Family>(
    _map: *mut c_void,
    key: *mut FlowKeyOf<A>,
    value: *mut FlowValueOf<A>,
    pass: *mut Pass,
) -> u64 {
    // SAFETY: the kernel hands the callback the element's key and value and our context.
    let (key, value, now) = unsafe { (&*key, &mut *value, (*pass).now_ns) };
    // Most entries are judged by themselves alone: the other direction's lookup (a cache miss
    // in a large table) only for an entry silent for its state's timeout. A reply entry whose
    // forward entry went (rare: both go together) is then found once it is that silent.
    if value.flags & (FLOW_REVERSE | FLOW_PORT_RELEASED | FLOW_DNAT) == FLOW_REVERSE
        && ended(value.state)
        && expired(FLOW_RECLAIM_NS, value.last_seen_ns, now)
    {
        release_ended(key, value, now);
    }
    let timeout = state_timeout(value.state);
    if !expired(timeout, value.last_seen_ns, now) {
        return 0;
    }
    let peer_key = value.peer_key(key.proto);
    let peer = A::flows()
        .get_ptr(&peer_key)
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        .filter(|peer| unsafe { (**peer).peer_key(key.proto) } == *key);
    if value.flags & FLOW_REVERSE != 0 {
        if peer.is_some() {
            value.flags &= !FLOW_ORPHAN_SEEN;
        } else if value.flags & FLOW_ORPHAN_SEEN == 0 {
            value.flags |= FLOW_ORPHAN_SEEN;
        } else if is_same(key, value) && A::flows().remove(key).is_ok() {
            snat::release_held(key, value);
            stats::count_slot(STAT_EXPIRED_IN_KERNEL);
        }
        return 0;
    }
    // SAFETY: as above.
    let peer_seen = peer.map_or(0, |peer| unsafe { (*peer).last_seen_ns });
    if !expired(timeout, value.last_seen_ns.max(peer_seen), now) {
        return 0;
    }
    if peer.is_some() && A::flows().remove(&peer_key).is_ok() {
        snat::release_held(&peer_key, value);
    }
    if is_same(key, value) && flow_count::remove_forward(key, value) {
        stats::count_slot(STAT_EXPIRED_IN_KERNEL);
    }
    0
}

/// Gives the SNAT port of the ended connection whose reply entry is `reply` back to the port
/// search, if the connection has been silent both ways for FLOW_RECLAIM_NS: a new connection
/// then finds it in the bitmaps, and takes it over (`flow.rs`'s `holder`), instead of waiting
/// for the entries' timeout or finding it by chance in a few probes.
fn release_ended<A: Family>(reply_key: &FlowKeyOf<A>, reply: &mut FlowValueOf<A>, now: u64) {
    let forward = A::flows()
        .get_ptr_mut(&reply.peer_key(reply_key.proto))
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        .filter(|f| unsafe { (**f).peer_key(reply_key.proto) } == *reply_key);
    // SAFETY: as above.
    let forward_seen = forward.map_or(0, |f| unsafe { (*f).last_seen_ns });
    if !expired(FLOW_RECLAIM_NS, reply.last_seen_ns.max(forward_seen), now) {
        return;
    }
    if let Some(forward) = forward {
        flow_count::fetch_or_flags(forward, FLOW_PORT_RELEASED);
    }
    flow_count::fetch_or_flags(reply, FLOW_PORT_RELEASED);
    snat::release(reply_key, snat::ports_of(reply));
}

/// Whether `key` still names `value`'s element: a CPU that met the expired flow meanwhile
/// removed it and may have made a new one under the same key, which must stay.
fn is_same<A: Family>(key: &FlowKeyOf<A>, value: &FlowValueOf<A>) -> bool {
    A::flows()
        .get_ptr(key)
        .is_some_and(|now| core::ptr::eq(now, value))
}
