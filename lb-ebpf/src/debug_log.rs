//! Data-path debug logs through aya-log: new flows, drops and suspect marks, each with its
//! addresses. Off unless the daemon sets DEBUG_LOG (`lb debug-log on`); the flag is read only
//! where such an event happens, never on an established flow's path.

use aya_ebpf::bindings::xdp_md;
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::{DropReason, FlowValue};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    maps::{BACKENDS6, DEBUG_LOG},
    parse::{IPPROTO_FRAGMENT, IPV6_FRAGMENT_LEN, Packet, ptr_at},
};

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

/// IPv6's new-flow log, a global BPF function: the verifier checks it once, not on every path
/// of the balancing steps that reach it. The flow's addresses are read from the frame and from
/// BACKENDS6.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_new_flow6(ctx: *mut xdp_md, backend_id: u32, snat_port: u32) -> u32 {
    if !enabled() {
        return 0;
    }
    let ctx = XdpContext::new(ctx);
    let (Some(t), Some(backend)) = (tuple6(&ctx), BACKENDS6.get(backend_id)) else {
        return 0;
    };
    info!(
        &ctx,
        "new flow [{:i}]:{} -> [{:i}]:{} proto {} to backend {} [{:i}]:{} via snat port {}",
        t.src,
        t.sport,
        t.dst,
        t.dport,
        t.proto,
        backend_id,
        backend.addr.to_bytes(),
        backend.port.to_host(),
        snat_port
    );
    0
}

/// IPv6's drop log, a global BPF function as `lb_log_new_flow6`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_drop6(ctx: *mut xdp_md, reason: u32) -> u32 {
    if !enabled() {
        return 0;
    }
    let ctx = XdpContext::new(ctx);
    let (Some(t), Some(reason)) = (tuple6(&ctx), DropReason::from_number(reason)) else {
        return 0;
    };
    info!(
        &ctx,
        "drop {}: [{:i}]:{} -> [{:i}]:{} proto {}",
        reason.name(),
        t.src,
        t.sport,
        t.dst,
        t.dport,
        t.proto
    );
    0
}

/// An IPv6 frame's addresses, ports (host order) and protocol.
struct Tuple6 {
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
    proto: u8,
}

/// The frame's `Tuple6`, if it has one where `parse::packet6` found it.
#[inline(always)]
fn tuple6(ctx: &XdpContext) -> Option<Tuple6> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    // A first fragment's ports follow its fragment header, which names the protocol.
    let (p, proto) = if ip.next_hdr == IPPROTO_FRAGMENT {
        let at: *const [u8; IPV6_FRAGMENT_LEN + 4] = ptr_at(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        let f = unsafe { *at };
        ([f[8], f[9], f[10], f[11]], f[0])
    } else {
        let ports: *const [u8; 4] = ptr_at(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        (unsafe { *ports }, ip.next_hdr)
    };
    Some(Tuple6 {
        src: ip.src_addr,
        sport: u16::from_be_bytes([p[0], p[1]]),
        dst: ip.dst_addr,
        dport: u16::from_be_bytes([p[2], p[3]]),
        proto,
    })
}
