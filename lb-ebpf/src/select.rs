//! Stage 3, choose: a new flow's backend from its service's live Maglev table. Reads MAGLEV and
//! BACKENDS. The table holds only backends that take new flows (healthy, weight > 0).

use lb_common::{Backend, DropReason, NO_BACKEND, Service, flow_hash};

use crate::{
    Verdict,
    maps::{BACKENDS, MAGLEV, maglev_size},
    parse::Packet,
};

#[inline(always)]
pub fn backend(svc: &Service, pkt: &Packet) -> Result<(u32, Backend), Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let k = &pkt.key;
    let hash = flow_hash(
        k.src_addr.0,
        k.dst_addr.0,
        k.src_port.0,
        k.dst_port.0,
        k.proto,
    );
    let slot = hash.checked_rem(maglev_size()).ok_or(inconsistent)?;
    let id = *MAGLEV
        .get(svc.maglev_base.wrapping_add(slot))
        .ok_or(inconsistent)?;
    if id == NO_BACKEND {
        return Err(Verdict::Drop(DropReason::NoBackend));
    }
    let backend = BACKENDS.get(id).ok_or(inconsistent)?;
    Ok((id, *backend))
}
