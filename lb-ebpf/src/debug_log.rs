//! Data-path debug logs through aya-log: new flows, drops and suspect marks, each with its
//! addresses. Off unless the daemon sets DEBUG_LOG (`lb debug-log on`); the flag is read only
//! where such an event happens, never on an established flow's path.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::{DropReason, FlowValue};

use crate::{maps::DEBUG_LOG, parse::Packet};

#[inline(always)]
fn enabled() -> bool {
    DEBUG_LOG.get(0).is_some_and(|on| *on != 0)
}

#[inline(always)]
pub fn new_flow(ctx: &XdpContext, pkt: &Packet, flow: &FlowValue) {
    if !enabled() {
        return;
    }
    let k = &pkt.key;
    info!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} proto {} to backend {} {:i}:{} via snat port {}",
        k.src_addr.to_host(),
        k.src_port.to_host(),
        k.dst_addr.to_host(),
        k.dst_port.to_host(),
        k.proto,
        flow.backend_id,
        flow.nat_dst_addr.to_host(),
        flow.nat_dst_port.to_host(),
        flow.nat_src_port.to_host()
    );
}

#[inline(always)]
pub fn drop(ctx: &XdpContext, pkt: &Packet, reason: DropReason) {
    if !enabled() {
        return;
    }
    let k = &pkt.key;
    info!(
        ctx,
        "drop {}: {:i}:{} -> {:i}:{} proto {} flags {:x}",
        reason.name(),
        k.src_addr.to_host(),
        k.src_port.to_host(),
        k.dst_addr.to_host(),
        k.dst_port.to_host(),
        k.proto,
        pkt.tcp_flags
    );
}
