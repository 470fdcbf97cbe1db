//! Stage 3, choose: a new flow's backend from its service's live Maglev table. Reads MAGLEV and
//! BACKENDS. The table holds only backends that take new flows (healthy, weight > 0); a backend
//! the data path saw fail a connection is passed over for the next slots' (see suspect.rs).

use lb_common::{
    BackendOf, DropReason, NO_BACKEND, STAT_STEERED_OFF_SUSPECT, SUSPECT_PROBES, ServiceOf,
};

use crate::{
    Verdict,
    family::Family,
    maps::{MAGLEV, maglev_size},
    parse::Packet,
    stats, suspect,
};

#[inline(always)]
pub fn backend<A: Family>(
    svc: &ServiceOf<A>,
    pkt: &Packet<A>,
) -> Result<(u32, BackendOf<A>), Verdict> {
    for_hash(svc, pkt.key.hash())
}

/// The backend of the table slot `hash` picks.
#[inline(always)]
pub fn for_hash<A: Family>(svc: &ServiceOf<A>, hash: u32) -> Result<(u32, BackendOf<A>), Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let size = maglev_size();
    let slot = hash.checked_rem(size).ok_or(inconsistent)?;
    let mut id = *MAGLEV
        .get(svc.maglev_base.wrapping_add(slot))
        .ok_or(inconsistent)?;
    if id == NO_BACKEND {
        return Err(Verdict::Drop(DropReason::NoBackend));
    }
    if suspect::is_suspect(id) {
        id = steer(svc, slot, size).unwrap_or(id);
    }
    let backend = A::backends().get(id).ok_or(inconsistent)?;
    Ok((id, *backend))
}

/// The first backend after `slot` in the table that is not suspect; `None` if the next
/// SUSPECT_PROBES slots hold none (then the suspect one is still the best there is).
#[inline(always)]
fn steer<A>(svc: &ServiceOf<A>, slot: u32, size: u32) -> Option<u32> {
    for step in 1..=SUSPECT_PROBES {
        let next = slot.wrapping_add(step).checked_rem(size)?;
        let id = *MAGLEV.get(svc.maglev_base.wrapping_add(next))?;
        if id != NO_BACKEND && !suspect::is_suspect(id) {
            stats::count_slot(STAT_STEERED_OFF_SUSPECT);
            return Some(id);
        }
    }
    None
}
