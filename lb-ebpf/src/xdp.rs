//! The XDP hook's entry: every frame a native-mode device receives.

use aya_ebpf::{bindings::xdp_md, macros::xdp, programs::XdpContext};
use lb_common::{
    BackendOf, Be32, DropReason, FLOW_DSR, FLOW_GUE, FLOW_IPIP, FlowValue, FlowValueOf, In6,
    PassReason, ServiceOf,
    conntrack::tcp_flags_valid,
    is_dsr_mode,
    tunnel::{GUE_OVERHEAD, GUE6_OVERHEAD, IP6IP6_OVERHEAD, IPIP_OVERHEAD},
};

use crate::{
    Verdict, debug_log, encap,
    family::Family,
    flow,
    flow::Flow,
    forward,
    forward::{NextHop, NoHop},
    fragments,
    fragments::Fragmented,
    icmp, mss, nat, parse,
    parse::{Packet, Path},
    reset, select, service, stats, timestamps, too_big, xdp6,
};

/// `balance_apart`'s answer for a packet too big for its next hop: this bit, with the MTU.
pub const TOO_BIG: u32 = 1 << 31;

/// What the balancing path does differently per address family at this hook.
pub trait Balanced: Fragmented {
    /// Sends a DSR flow's packet (`send_direct_apart`): the XDP action, counted, or TOO_BIG
    /// and the MTU.
    fn send_direct(ctx: *mut xdp_md, pkt: &Packet<Self>, entry: *mut FlowValueOf<Self>) -> u32;
    /// A packet with no flow: its new flow (`new_flow`).
    fn new_flow(ctx: &XdpContext, pkt: &Packet<Self>) -> Result<Flow<Self>, Verdict>;
    /// The answer to a TCP segment that can open no flow.
    fn answer_flowless(ctx: &XdpContext, pkt: &Packet<Self>) -> Verdict;
    /// What the IPIP and GUE forms' headers add to a packet of this family.
    const IPIP_OVERHEAD: u16;
    const GUE_OVERHEAD: u16;
    /// A DSR flow's packet inside its tunnel (`encap.rs`), to `hop`.
    fn tunnel(
        ctx: &XdpContext,
        pkt: &Packet<Self>,
        nat: &FlowValueOf<Self>,
        hop: &NextHop,
    ) -> Result<Verdict, Verdict>;
    fn log_new_flow(ctx: &XdpContext, pkt: &Packet<Self>, nat: &FlowValueOf<Self>);
    fn log_drop(ctx: &XdpContext, pkt: &Packet<Self>, reason: DropReason);
}

impl Balanced for Be32 {
    const IPIP_OVERHEAD: u16 = IPIP_OVERHEAD;
    const GUE_OVERHEAD: u16 = GUE_OVERHEAD;
    #[inline(always)]
    fn new_flow(ctx: &XdpContext, pkt: &Packet) -> Result<Flow<Be32>, Verdict> {
        new_flow(ctx, pkt)
    }
    #[inline(always)]
    fn send_direct(ctx: *mut xdp_md, pkt: &Packet, entry: *mut FlowValue) -> u32 {
        send_direct_apart(ctx, pkt, entry)
    }
    #[inline(always)]
    fn answer_flowless(ctx: &XdpContext, pkt: &Packet) -> Verdict {
        reset::answer(ctx, pkt)
    }

    #[inline(always)]
    fn tunnel(
        ctx: &XdpContext,
        pkt: &Packet,
        nat: &FlowValue,
        hop: &NextHop,
    ) -> Result<Verdict, Verdict> {
        encap::tunnel(ctx, pkt, nat, hop)
    }
    #[inline(always)]
    fn log_new_flow(ctx: &XdpContext, pkt: &Packet, nat: &FlowValue) {
        debug_log::new_flow(ctx, pkt, nat);
    }
    #[inline(always)]
    fn log_drop(ctx: &XdpContext, pkt: &Packet, reason: DropReason) {
        debug_log::drop(ctx, pkt, reason);
    }
}

/// IPv6 (`xdp6.rs`).
impl Balanced for In6 {
    const IPIP_OVERHEAD: u16 = IP6IP6_OVERHEAD;
    const GUE_OVERHEAD: u16 = GUE6_OVERHEAD;
    /// Sent apart (`xdp6::send_direct_apart`): the FIB lookup's frame would not fit the
    /// balancing path's stack.
    #[inline(always)]
    fn send_direct(_: *mut xdp_md, _: &Packet<In6>, _: *mut FlowValueOf<In6>) -> u32 {
        xdp6::DIRECT
    }
    /// Not here: `xdp6.rs` creates it in steps, each a BPF function of its own, and runs the
    /// balancing path again.
    #[inline(always)]
    fn new_flow(_: &XdpContext, _: &Packet<In6>) -> Result<Flow<In6>, Verdict> {
        Err(Verdict::Sent(xdp6::NO_FLOW))
    }
    #[inline(always)]
    /// Answered apart (`xdp6::reset_apart`): the RST's frame would not fit the step's stack.
    fn answer_flowless(_: &XdpContext, _: &Packet<In6>) -> Verdict {
        Verdict::Sent(xdp6::FLOWLESS)
    }

    #[inline(always)]
    fn tunnel(
        ctx: &XdpContext,
        pkt: &Packet<In6>,
        nat: &FlowValueOf<In6>,
        hop: &NextHop,
    ) -> Result<Verdict, Verdict> {
        encap::tunnel6(ctx, pkt, nat, hop)
    }
    #[inline(always)]
    fn log_new_flow(ctx: &XdpContext, _: &Packet<In6>, nat: &FlowValueOf<In6>) {
        let port = u32::from(nat.nat_src_port.to_host());
        debug_log::lb_log_new_flow6(ctx.ctx, nat.backend_id, port);
    }
    /// Not here: `xdp6.rs` logs a drop from the entry point, apart from the steps' frames.
    #[inline(always)]
    fn log_drop(_: &XdpContext, _: &Packet<In6>, _: DropReason) {}
}

/// The entry point sends each packet down one of five paths, each a BPF function with a stack
/// frame of its own: the verifier limits a chain of calls to 512 bytes of stack, and the
/// balancing path (with the SNAT allocator it calls) takes all of it. The entry point itself
/// keeps next to nothing on the stack (4 bytes, for IPv6's steps).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match parse::path(&ctx) {
        Path::Ipv6 => return xdp6::balance(ctx.ctx),
        Path::Icmp => return icmp::handle_apart(ctx.ctx),
        Path::Icmp6 => return icmp::handle6_apart(ctx.ctx),
        Path::LaterFragment => return fragments::follow_apart::<Be32>(ctx.ctx),
        Path::LaterFragment6 => return fragments::follow_apart::<In6>(ctx.ctx),
        Path::Balance => {}
    }
    let action = balance_apart(ctx.ctx);
    if action & TOO_BIG != 0 {
        return too_big::answer_apart::<Be32>(ctx.ctx, action as u16);
    }
    action
}

/// Parse, look up, choose, rewrite and forward: the XDP action, counted, or TOO_BIG and the
/// MTU for a packet too big for its next hop (uncounted, rewritten).
#[inline(never)]
fn balance_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    match process(&ctx) {
        Ok(Verdict::TooBig(mtu)) | Err(Verdict::TooBig(mtu)) => TOO_BIG | u32::from(mtu),
        Ok(verdict) | Err(verdict) => verdict.counted(),
    }
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let pkt = parse::packet(ctx)?;
    logged(ctx, &pkt)
}

#[inline(always)]
fn logged<A: Balanced>(ctx: &XdpContext, pkt: &Packet<A>) -> Result<Verdict, Verdict> {
    let result = balance(ctx, pkt);
    if let Err(Verdict::Drop(reason)) = result {
        A::log_drop(ctx, pkt, reason);
    }
    result
}

#[inline(always)]
pub fn balance<A: Balanced>(ctx: &XdpContext, pkt: &Packet<A>) -> Result<Verdict, Verdict> {
    let flow = match flow::lookup(pkt)? {
        Some(flow) => flow,
        None => {
            let flow = A::new_flow(ctx, pkt)?;
            A::log_new_flow(ctx, pkt, flow.nat());
            flow
        }
    };
    check_ttl(pkt)?;
    if flow.nat().flags & FLOW_DSR != 0 {
        let action = A::send_direct(ctx.ctx, pkt, flow.entry());
        if action & TOO_BIG != 0 {
            return Err(Verdict::TooBig(action as u16));
        }
        return Ok(Verdict::Sent(action));
    }
    let timestamps = if pkt.is_tcp() {
        mss::clamp(ctx, pkt, flow.nat());
        timestamps::translate(ctx, pkt, flow.nat())
    } else {
        Default::default()
    };
    nat::rewrite(pkt, flow.nat(), timestamps);
    stats::count_backend(flow.nat().backend_id, pkt.len);
    let hop = match forward::next_hop(ctx, pkt.ip, pkt.key.proto, flow.entry(), 0) {
        Ok(hop) => hop,
        Err(NoHop::TooBig { mtu }) => return Err(Verdict::TooBig(mtu)),
        Err(NoHop::Verdict(verdict)) => return Err(verdict),
    };
    // A datagram's first fragment has its later fragments follow it.
    if let Some(id) = A::first_fragment_id(pkt) {
        fragments::remember_apart(&pkt.key, id);
    }
    forward::send::<A>(ctx, pkt.eth, pkt.ip, &hop)
}

/// `send_direct` in a BPF function of its own: its FIB lookup and headers would not fit in the
/// balancing path's stack frame beside the SNAT port search's. The XDP action, counted, or
/// TOO_BIG and the MTU (uncounted: `too_big.rs` answers).
#[inline(never)]
fn send_direct_apart(ctx: *mut xdp_md, pkt: &Packet, entry: *mut FlowValue) -> u32 {
    let ctx = XdpContext::new(ctx);
    match send_direct(&ctx, pkt, entry) {
        Ok(Verdict::TooBig(mtu)) | Err(Verdict::TooBig(mtu)) => TOO_BIG | u32::from(mtu),
        Ok(verdict) | Err(verdict) => verdict.counted(),
    }
}

/// DSR: the packet, untouched, goes to the backend's MAC (L2 form: the VIP is on the backend's
/// loopback) or inside an IPIP or GUE tunnel to the backend (`encap.rs`), and the backend
/// answers the client itself. The FIB is asked the way to the backend, for the packet's size
/// with the tunnel's headers; a client told the path's MTU is told the inner packet's. A packet
/// the kernel would have to forward (an unresolved neighbour) cannot go up: its destination,
/// the VIP, may be the kernel's own. Later fragments are not followed: they pass.
#[inline(always)]
pub fn send_direct<A: Balanced>(
    ctx: &XdpContext,
    pkt: &Packet<A>,
    entry: *mut FlowValueOf<A>,
) -> Result<Verdict, Verdict> {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let nat = unsafe { &*entry };
    stats::count_backend(nat.backend_id, pkt.len);
    let grow = if nat.flags & FLOW_IPIP != 0 {
        A::IPIP_OVERHEAD
    } else if nat.flags & FLOW_GUE != 0 {
        A::GUE_OVERHEAD
    } else {
        0
    };
    let hop = match forward::next_hop(ctx, pkt.ip, pkt.key.proto, entry, grow) {
        Ok(hop) => hop,
        Err(NoHop::TooBig { mtu }) => return Err(Verdict::TooBig(mtu.saturating_sub(grow))),
        Err(NoHop::Verdict(Verdict::Pass(_))) => {
            return Err(Verdict::Drop(DropReason::DsrCannotForward));
        }
        Err(NoHop::Verdict(verdict)) => return Err(verdict),
    };
    if grow != 0 {
        return A::tunnel(ctx, pkt, nat, &hop);
    }
    forward::send_frame(ctx, pkt.eth, &hop)
}

/// A packet with no flow: find its service, choose a backend, record the flow both ways.
#[inline(always)]
fn new_flow<A: Balanced>(ctx: &XdpContext, pkt: &Packet<A>) -> Result<Flow<A>, Verdict> {
    let (svc, backend_id, backend) = admit(ctx, pkt)?;
    let flow = flow::create(ctx, pkt, svc, backend_id, &backend)?;
    stats::count_new_flow(backend_id);
    Ok(flow)
}

/// Whether a packet with no flow may open one: its service, and the backend chosen for it. A
/// TCP segment that cannot open one is answered (with an RST, for IPv4).
#[inline(always)]
pub fn admit<A: Balanced>(
    ctx: &XdpContext,
    pkt: &Packet<A>,
) -> Result<(&'static ServiceOf<A>, u32, BackendOf<A>), Verdict> {
    let svc = service::lookup(pkt)?;
    if pkt.is_tcp() && !tcp_flags_valid(pkt.tcp_flags) {
        return Err(Verdict::Drop(DropReason::TcpInvalidFlags));
    }
    // A DSR flow's backend answers the client directly: its flow may expire while the
    // connection lives, and the next segment goes on where consistent hashing sends it.
    let reopens = is_dsr_mode(svc.mode) && !pkt.is_rst();
    if pkt.is_tcp() && !pkt.is_syn() && !reopens {
        return Err(A::answer_flowless(ctx, pkt));
    }
    check_ttl(pkt)?;
    let (backend_id, backend) = select::backend(svc, pkt)?;
    Ok((svc, backend_id, backend))
}

/// A packet whose TTL would expire here goes to the kernel unchanged, which sends the ICMP error
/// to the client (after a rewrite it would go to our own SNAT address).
#[inline(always)]
fn check_ttl<A: Family>(pkt: &Packet<A>) -> Result<(), Verdict> {
    if pkt.ttl() <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    Ok(())
}
