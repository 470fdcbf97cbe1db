//! The XDP hook's IPv6 path: the balancing path of `xdp.rs` over IPv6's maps, with a new flow
//! made in steps, each a BPF function of its own called from the entry point. IPv6's keys are
//! 40 bytes, and its balancing path with a flow's creation and the SNAT port search inlined
//! would need twice the 512 bytes of stack the verifier allows a chain of calls. A new flow's
//! packet is parsed again by each step that needs it; the steps hand the flow's reply entry on
//! in FLOW_SCRATCH6 and REPLY_KEY_SCRATCH6.
//!
//! Served: full NAT, DNAT and DSR (a DSR flow's one entry made in the first step, its packets
//! sent by `send_direct_apart`: to the backend's MAC, or inside IPv6 for the IPIP and GUE
//! forms), TCP and UDP. A packet too big for its next hop is answered with an ICMPv6 "packet too big" (`too_big.rs`), and a TCP segment with no flow
//! with an RST (`reset_apart`), as IPv4's.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use lb_common::{DropReason, In6, ServiceKeyOf, is_dsr_mode};

use crate::{
    Verdict, debug_log, flow,
    maps::{FLOW_SCRATCH6, FLOWS6, REPLY_KEY_SCRATCH6, SERVICES6},
    parse::{self, Packet},
    reset, stats, too_big, xdp,
    xdp::{Balanced, TOO_BIG, admit},
};

/// `balance_apart`'s answer for a packet with no flow, and the steps' answers for a step done:
/// no XDP actions, uncounted.
pub const NO_FLOW: u32 = 0x100;
const OPENED: u32 = 0x101;
const TUPLE_TAKEN: u32 = 0x102;
const FLOW_CREATED: u32 = 0x103;
/// `open_apart`'s answer for a TCP segment that can open no flow: `reset_apart` answers it.
pub const FLOWLESS: u32 = 0x104;
/// `balance_apart`'s answer for a DSR flow's packet: `send_direct_apart` sends it.
pub const DIRECT: u32 = 0x105;
/// `open_apart`'s answer for a DSR flow made whole (it has no reply entry to take a tuple for).
const DIRECT_OPENED: u32 = 0x106;
/// A step's answer for a packet it dropped (counted): this bit, with the reason's number. The
/// entry point logs the drop (`lb_log_drop6`), with the stack the steps' frames leave free.
const DROPPED: u32 = 0x200;

/// An IPv6 frame: balanced if it has a flow; otherwise its flow made in steps (`open_apart`,
/// `take_tuple_apart`, `finish_apart`), and balanced then. Keeps next to nothing on the stack
/// (the entry point's frame is 4 bytes): each step's frame has the verifier's 512 to itself.
#[inline(always)]
pub fn balance(ctx: *mut xdp_md) -> u32 {
    let action = balance_apart(ctx);
    if action != NO_FLOW {
        return sent(ctx, action);
    }
    let action = match open_apart(ctx) {
        OPENED => OPENED,
        DIRECT_OPENED => return rebalanced(ctx),
        FLOWLESS => reset_apart(ctx),
        action => action,
    };
    if action != OPENED {
        return logged(ctx, action);
    }
    let action = take_tuple_apart();
    if action != TUPLE_TAKEN {
        return logged(ctx, action);
    }
    let action = finish_apart(ctx);
    if action != FLOW_CREATED {
        return logged(ctx, action);
    }
    rebalanced(ctx)
}

/// The balancing path again, for the flow just made.
#[inline(always)]
fn rebalanced(ctx: *mut xdp_md) -> u32 {
    match balance_apart(ctx) {
        // Gone again at once (another CPU's packet ended it): nothing to forward it by.
        NO_FLOW => logged(ctx, answer(Verdict::Drop(DropReason::Inconsistent))),
        action => sent(ctx, action),
    }
}

/// `balance_apart`'s answer as an XDP action, a DSR flow's packet sent first.
#[inline(always)]
fn sent(ctx: *mut xdp_md, action: u32) -> u32 {
    if action == DIRECT {
        return logged(ctx, send_direct_apart(ctx));
    }
    logged(ctx, action)
}

/// A step's answer as an XDP action: its drop logged, a packet too big answered.
#[inline(always)]
fn logged(ctx: *mut xdp_md, answer: u32) -> u32 {
    if answer & TOO_BIG != 0 {
        return too_big::answer_apart::<In6>(ctx, answer as u16);
    }
    if answer & DROPPED == 0 {
        return answer;
    }
    debug_log::lb_log_drop6(ctx, answer & 0xff);
    xdp_action::XDP_DROP
}

/// A step's answer for `verdict`, counted: its XDP action, or DROPPED and the reason.
#[inline(always)]
fn answer(verdict: Verdict) -> u32 {
    let action = verdict.counted();
    match verdict {
        Verdict::Drop(reason) => DROPPED | reason as u32,
        _ => action,
    }
}

/// Parses the packet in place into `out`: returned, IPv6's packet would take its stack twice.
#[inline(always)]
fn parsed<'a>(
    ctx: &XdpContext,
    out: &'a mut MaybeUninit<Packet<In6>>,
) -> Result<&'a Packet<In6>, Verdict> {
    parse::packet6(ctx, out)?;
    // SAFETY: `packet6` wrote the packet (it returned Ok).
    Ok(unsafe { out.assume_init_ref() })
}

/// The balancing path for a packet with a flow: its XDP action, counted; NO_FLOW; or TOO_BIG
/// and the MTU for a packet too big for its next hop (uncounted, rewritten).
#[inline(never)]
fn balance_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let mut out = MaybeUninit::uninit();
    let result = parsed(&ctx, &mut out).and_then(|pkt| xdp::balance(&ctx, pkt));
    match result {
        Ok(Verdict::TooBig(mtu)) | Err(Verdict::TooBig(mtu)) => TOO_BIG | u32::from(mtu),
        Ok(verdict) | Err(verdict) => answer(verdict),
    }
}

/// First step: the packet may open a flow (`xdp::admit`); its backend is chosen and its reply
/// entry prepared. OPENED, or the packet's XDP action, counted.
#[inline(never)]
fn open_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let mut out = MaybeUninit::uninit();
    match parsed(&ctx, &mut out).and_then(|pkt| open(&ctx, pkt)) {
        Ok(code) => code,
        Err(verdict) => answer(verdict),
    }
}

/// OPENED, or DIRECT_OPENED for a DSR flow, made here whole.
#[inline(always)]
fn open(ctx: &XdpContext, pkt: &Packet<In6>) -> Result<u32, Verdict> {
    let (svc, backend_id, backend) = admit(ctx, pkt)?;
    if is_dsr_mode(svc.mode) {
        let flow = flow::create_dsr(pkt, svc, backend_id, &backend, now_ns())?;
        stats::count_new_flow(backend_id);
        In6::log_new_flow(ctx, pkt, flow.nat());
        return Ok(DIRECT_OPENED);
    }
    flow::prepare(ctx, pkt, svc, backend_id)?;
    let key = REPLY_KEY_SCRATCH6
        .get_ptr_mut(0)
        .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
    // SAFETY: a per-CPU array slot, this CPU's alone for this program run.
    unsafe { *key = flow::reply_key(pkt, &backend) };
    Ok(OPENED)
}

/// A DSR flow's packet, to the backend's MAC (`xdp::send_direct`): its XDP action, counted,
/// or TOO_BIG and the MTU.
#[inline(never)]
fn send_direct_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let mut out = MaybeUninit::uninit();
    let result = parsed(&ctx, &mut out).and_then(|pkt| {
        let entry = FLOWS6
            .get_ptr_mut(&pkt.key)
            .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
        xdp::send_direct(&ctx, pkt, entry)
    });
    match result {
        Ok(Verdict::TooBig(mtu)) | Err(Verdict::TooBig(mtu)) => TOO_BIG | u32::from(mtu),
        Ok(verdict) | Err(verdict) => answer(verdict),
    }
}

/// A TCP segment that can open no flow, answered with an RST (`reset::answer6`), in a frame of
/// its own.
#[inline(never)]
fn reset_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let mut out = MaybeUninit::uninit();
    match parsed(&ctx, &mut out) {
        Ok(pkt) => answer(reset::answer6(&ctx, pkt)),
        Err(verdict) => answer(verdict),
    }
}

/// Second step: the reply entry inserted under a tuple its mode takes (a SNAT port, or the
/// client's own). TUPLE_TAKEN, or the packet's XDP action, counted.
#[inline(never)]
fn take_tuple_apart() -> u32 {
    match take_tuple() {
        Ok(()) => TUPLE_TAKEN,
        Err(verdict) => answer(verdict),
    }
}

/// `create`'s second step over the scratch slots `open` filled: shared with the tc hook.
#[inline(always)]
pub fn take_tuple() -> Result<(), Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let key = REPLY_KEY_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
    let reverse = FLOW_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
    // SAFETY: per-CPU array slots, this CPU's alone for this program run; `open` wrote them.
    let (key, reverse) = unsafe { (&mut *key, &mut *reverse) };
    // The reply entry answers the client's packet to the VIP: the service is found again by it.
    let svc_key = ServiceKeyOf {
        vip: reverse.nat_src_addr,
        port: reverse.nat_src_port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let svc = unsafe { &*SERVICES6.get_ptr(&svc_key).ok_or(inconsistent)? };
    flow::take_tuple(svc, key, reverse, now_ns())
}

/// Last step: the forward entry. FLOW_CREATED, or the packet's XDP action, counted.
#[inline(never)]
fn finish_apart(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let mut out = MaybeUninit::uninit();
    match parsed(&ctx, &mut out).and_then(|pkt| finish(&ctx, pkt)) {
        Ok(()) => FLOW_CREATED,
        Err(verdict) => answer(verdict),
    }
}

#[inline(always)]
fn finish(ctx: &XdpContext, pkt: &Packet<In6>) -> Result<(), Verdict> {
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let key = REPLY_KEY_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
    let reverse = FLOW_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
    // SAFETY: as in `take_tuple`.
    let (key, reverse) = unsafe { (&*key, &mut *reverse) };
    let flow = flow::finish(pkt, key, reverse, now_ns())?;
    stats::count_new_flow(flow.nat().backend_id);
    In6::log_new_flow(ctx, pkt, flow.nat());
    Ok(())
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}
