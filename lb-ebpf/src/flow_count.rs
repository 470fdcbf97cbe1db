//! Each backend's connections, counted as they change (FLOW_COUNTS), so that the daemon learns
//! how many are open, and how many SNAT ports they hold, without reading the flow table.
//! Opened: a forward entry inserted. Ended: the connection closed (both FINs, an RST) or its
//! forward entry was removed first, once per connection. Released: a forward entry removed.

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::helpers::bpf_map_delete_elem;
use lb_common::{FLOW_END_COUNTED, FlowKeyOf, FlowValueOf};

use crate::{family::Family, maps::FLOW_COUNTS};

#[inline(always)]
pub fn opened(backend_id: u32) {
    if let Some(counts) = FLOW_COUNTS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU array slot, only this CPU writes it.
        unsafe { (*counts).opened += 1 };
    }
}

/// Counts the end of `forward`'s connection unless someone already has (null: no entry).
#[inline(always)]
pub fn ended<A: Family>(forward: *mut FlowValueOf<A>) {
    if forward.is_null() {
        return;
    }
    if fetch_or_flags(forward, FLOW_END_COUNTED) & FLOW_END_COUNTED != 0 {
        return;
    }
    // SAFETY: a value pointer from a map lookup, valid for this program run.
    let backend_id = unsafe { (*forward).backend_id };
    if let Some(counts) = FLOW_COUNTS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU array slot, only this CPU writes it.
        unsafe { (*counts).ended += 1 };
    }
}

/// Sets `bits` in `value.flags` atomically (another CPU may set others at once), returning the
/// flags before. The target has 64-bit atomics only: `flags` is the low half, on this
/// little-endian target, of the aligned word it shares with `egress_ifindex` (lb-common asserts
/// the layout), and or-ing zeros into the high half leaves it as it is.
#[inline(always)]
pub fn fetch_or_flags<A: Family>(value: *mut FlowValueOf<A>, bits: u32) -> u32 {
    // SAFETY: a value pointer from a map lookup is valid for this program run; the word is
    // 8-aligned and inside the value.
    let before = unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
            (&raw mut (*value).flags).cast::<u64>(),
            u64::from(bits),
        )
    };
    before as u32
}

/// Removes the forward entry `forward` under `key`, counting its connection's end (if not yet
/// counted) and, if this removal is the one that took it (true), its release. Branch-free but
/// for one lookup: it runs inside the SNAT port search, where every branch multiplies the paths
/// the verifier walks.
#[inline(always)]
pub fn remove_forward<A: Family>(key: &FlowKeyOf<A>, forward: &mut FlowValueOf<A>) -> bool {
    // Before the removal: a preallocated entry may be reused by another CPU's insert at once.
    let before = fetch_or_flags(forward, FLOW_END_COUNTED);
    let backend_id = forward.backend_id;
    // SAFETY: FLOWS is a map and `key` a valid key for it.
    let removed = unsafe {
        bpf_map_delete_elem(
            core::ptr::from_ref(A::flows()).cast_mut().cast(),
            (key as *const FlowKeyOf<A>).cast(),
        )
    };
    if let Some(counts) = FLOW_COUNTS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU array slot, only this CPU writes it. `removed` is 0 or a negative
        // errno: 1 + (removed >> 63) is 1 or 0.
        unsafe {
            (*counts).ended += u64::from((before / FLOW_END_COUNTED) & 1 ^ 1);
            (*counts).released += (1 + (removed >> 63)) as u64;
        }
    }
    removed == 0
}
