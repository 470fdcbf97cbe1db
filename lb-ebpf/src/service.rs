//! Stage 2a, look up: the packet's destination VIP:port/proto -> its service. Reads SERVICES.

use lb_common::{PassReason, ServiceKeyOf, ServiceOf};

use crate::{Verdict, family::Family, parse::Packet};

/// The service in place in its map: a copy would take a fifth of the balancing path's stack.
/// The daemon replaces an entry whole; a packet that meets one mid-update still meets a
/// service's values, each as written.
#[inline(always)]
pub fn lookup<A: Family>(pkt: &Packet<A>) -> Result<&'static ServiceOf<A>, Verdict> {
    let key = ServiceKeyOf {
        vip: pkt.key.dst_addr,
        port: pkt.key.dst_port,
        proto: pkt.key.proto,
        _pad: 0,
    };
    match A::services().get_ptr(&key) {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        Some(svc) => Ok(unsafe { &*svc }),
        None => Err(Verdict::Pass(PassReason::NotService)),
    }
}
