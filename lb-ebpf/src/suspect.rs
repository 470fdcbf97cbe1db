//! Passive failure detection: a backend that refuses a new connection (RST to its SYN) or
//! leaves it unanswered until the client retransmits is marked suspect, and new flows are
//! steered off it for SUSPECT_HOLD_NS, or until the daemon's next passing health check clears
//! the mark. The client then sees a retransmission delay where it would have seen a failure.
//! Reads and writes SUSPECT.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::SUSPECT_HOLD_NS;

use crate::{maps::SUSPECT, stats};

#[inline(always)]
pub fn mark(backend_id: u32, now: u64, event: u32) {
    if let Some(slot) = SUSPECT.get_ptr_mut(backend_id) {
        // SAFETY: an array slot; a racing mark from another CPU writes a time just as good.
        unsafe { *slot = now.max(1) };
    }
    stats::count_slot(event);
}

/// When `backend_id` was marked, if the mark is still live.
#[inline(always)]
fn live_mark(backend_id: u32) -> Option<u64> {
    let since = *SUSPECT.get(backend_id)?;
    if since == 0 {
        return None;
    }
    // Read the clock only for a marked backend: the common path costs one array lookup.
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    (now.saturating_sub(since) < SUSPECT_HOLD_NS).then_some(since)
}

#[inline(always)]
pub fn is_suspect(backend_id: u32) -> bool {
    live_mark(backend_id).is_some()
}

/// Whether `backend_id` carries a live mark made at or before `time`: a flow created after it
/// went to the backend knowing it suspect (no other was left), and its refusal is the answer.
#[inline(always)]
pub fn marked_before(backend_id: u32, time: u64) -> bool {
    live_mark(backend_id).is_some_and(|since| since <= time)
}
