//! Per-CPU counters: one per verdict reason (STATS) and per backend (BACKEND_STATS).

use lb_common::{DropReason, STAT_REDIRECT, STAT_TX};

use crate::{
    Verdict,
    maps::{BACKEND_STATS, STATS},
};

#[inline(always)]
pub fn count_verdict(verdict: &Verdict) {
    let slot = match verdict {
        Verdict::Pass(reason) => reason.stat_slot(),
        Verdict::Drop(reason) => reason.stat_slot(),
        Verdict::Tx => STAT_TX,
        Verdict::Redirect(_) => STAT_REDIRECT,
        // Never counted here: too_big.rs answers the packet and counts that.
        Verdict::TooBig(_) => DropReason::FibFragNeeded.stat_slot(),
        // Counted where it was taken.
        Verdict::Sent(_) => return,
    };
    count_slot(slot);
}

#[inline(always)]
pub fn count_backend(id: u32, bytes: u64) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: as above.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_new_flow(id: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: as above.
        unsafe { (*stats).new_flows += 1 };
    }
}

/// One more in a STATS slot: a verdict's, or an event counted besides it (lb_common::EVENTS).
#[inline(always)]
pub fn count_slot(slot: u32) {
    add_to_slot(slot, 1);
}

#[inline(always)]
pub fn add_to_slot(slot: u32, amount: u64) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *counter += amount };
    }
}
