//! Stage 5a, each backend's next hop, remembered per CPU for a short while: a new flow to a
//! backend another flow just reached takes its hop from here rather than from the kernel's FIB,
//! whose lookup (route, then neighbour) cost a new flow about 120 ns more. Only the forward
//! direction's hops are kept: a reply's next hop is its client's. Data path only
//! (HOP_CACHE, HOP_CACHE6; not pinned: a new program starts with an empty cache).
//!
//! The FIB is asked by destination; an entry remembers the address it was asked for, so a
//! backend id given to another address misses. The hop is kept `HOP_CACHE_NS` at most, so a
//! route or neighbour change reaches new flows as quickly as established ones (whose hop is
//! looked up again each `FLOW_TOUCH_INTERVAL_NS`).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{FLOW_REVERSE, FlowValueOf};

use crate::{family::Family, forward::NextHop};

/// How long a backend's next hop is taken from the cache.
const HOP_CACHE_NS: u64 = 100_000_000;

/// A backend's next hop: the FIB's answer for its address `addr`, approved for packets up to
/// `ok_len` bytes, at `filled_ns`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HopCacheOf<A> {
    pub addr: A,
    pub ifindex: u32,
    pub flags: u16,
    pub ok_len: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub filled_ns: u64,
}

/// Gives the flow `entry` its backend's cached next hop, if one is cached for a packet of
/// `tot_len` bytes; copied from map value to map value, since the balancing path has no stack
/// to spare.
#[inline(always)]
pub fn fill<A: Family>(entry: *mut FlowValueOf<A>, tot_len: u16) -> bool {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let value = unsafe { &mut *entry };
    if value.flags & FLOW_REVERSE != 0 {
        return false;
    }
    let Some(hop) = A::hop_cache().get_ptr(value.backend_id) else {
        return false;
    };
    // SAFETY: a per-CPU slot, valid for this program run and written only by this CPU.
    let hop = unsafe { &*hop };
    let fresh = now_ns().wrapping_sub(hop.filled_ns) < HOP_CACHE_NS;
    if !fresh || hop.ifindex == 0 || hop.addr != value.nat_dst_addr || tot_len > hop.ok_len {
        return false;
    }
    value.fib_ok_len = hop.ok_len;
    value.src_mac = hop.src_mac;
    value.dst_mac = hop.dst_mac;
    value.egress_flags = hop.flags;
    value.egress_ifindex = hop.ifindex;
    true
}

/// Remembers `hop`, the FIB's answer for the flow `nat`'s packet of `tot_len` bytes.
#[inline(always)]
pub fn put<A: Family>(nat: &FlowValueOf<A>, hop: &NextHop, tot_len: u16) {
    if nat.flags & FLOW_REVERSE != 0 {
        return;
    }
    let Some(slot) = A::hop_cache().get_ptr_mut(nat.backend_id) else {
        return;
    };
    // SAFETY: as in `fill`.
    let slot = unsafe { &mut *slot };
    let now = now_ns();
    let same = slot.ifindex == hop.ifindex
        && slot.addr == nat.nat_dst_addr
        && now.wrapping_sub(slot.filled_ns) < HOP_CACHE_NS;
    // A larger packet's approval covers the smaller ones the slot approved; a new answer
    // restarts the slot's time.
    if same {
        slot.ok_len = slot.ok_len.max(tot_len);
    } else {
        slot.ok_len = tot_len;
        slot.filled_ns = now;
    }
    slot.addr = nat.nat_dst_addr;
    slot.ifindex = hop.ifindex;
    slot.flags = hop.flags as u16;
    slot.src_mac = hop.src_mac;
    slot.dst_mac = hop.dst_mac;
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}
