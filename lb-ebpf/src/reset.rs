//! Stage 3c, reset: a TCP segment to a service with no flow behind it and no SYN to open one
//! is answered with an RST back out of its ingress device, within each CPU's budget, so the
//! client reconnects at once rather than retransmitting into silence, in either family. The
//! frame is built by lb_common::reset; here it is only copied over the packet (the tc hook
//! copies it over its skb: `tc.rs`). Reads IFACES; writes RESET_BUDGET.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    DropReason, In6, STAT_RESET_NO_FLOW,
    reset::{RESET_FRAME_LEN, Segment, Segment6, reset_frame, reset_frame6},
};

use crate::{
    Verdict, forward,
    maps::RESET_BUDGET,
    parse::{Packet, ptr_at},
    stats,
};

/// The RST that answers `pkt`, sent; or a counted drop if `pkt` gets none (an RST itself, or
/// the CPU's budget is spent).
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    let silent = Verdict::Drop(DropReason::TcpNoFlow);
    let Some(frame) = reset_frame(&segment(pkt)) else {
        return silent;
    };
    // IPv4's tail is `send_back`'s, inlined by hand: as a generic function it costs the
    // balancing path's frame the 8 bytes its chain with `send_direct_apart` cannot spare.
    if let Err(verdict) = take_budget() {
        return verdict;
    }
    // A parsed TCP segment is at least RESET_FRAME_LEN long, so this only shrinks the frame.
    let excess = (ctx.data_end() - ctx.data()) as i32 - RESET_FRAME_LEN as i32;
    // SAFETY: the context pointer is the program's own; the packet pointers in `pkt` are not
    // used after this.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), -excess) } != 0 {
        return silent;
    }
    let Some(out) = ptr_at::<[u8; RESET_FRAME_LEN]>(ctx, 0) else {
        return silent;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *out = frame };
    stats::count_slot(STAT_RESET_NO_FLOW);
    forward::back_out(ctx)
}

/// `answer` for IPv6 (`xdp6::reset_apart`).
#[inline(always)]
pub fn answer6(ctx: &XdpContext, pkt: &Packet<In6>) -> Verdict {
    match reset_frame6(&segment6(pkt)) {
        Some(frame) => send_back(ctx, &frame),
        None => Verdict::Drop(DropReason::TcpNoFlow),
    }
}

/// What the RST answering the IPv4 segment `pkt` is made from.
#[inline(always)]
pub fn segment(pkt: &Packet) -> Segment {
    // SAFETY: parse::packet bounds-checked the Ethernet, IP and first L4 bytes.
    unsafe {
        let ports = *pkt.ports;
        Segment {
            src_mac: (*pkt.eth).src_addr,
            dst_mac: (*pkt.eth).dst_addr,
            src_addr: (*pkt.ip).src_addr,
            dst_addr: (*pkt.ip).dst_addr,
            src_port: [ports[0], ports[1]],
            dst_port: [ports[2], ports[3]],
            flags: pkt.tcp_flags,
            seq: pkt.seq,
            seq_end: pkt.seq_end,
            ack_seq: pkt.ack_seq,
        }
    }
}

/// What the RST answering the IPv6 segment `pkt` is made from.
#[inline(always)]
pub fn segment6(pkt: &Packet<In6>) -> Segment6 {
    // SAFETY: parse::packet6 bounds-checked the Ethernet header.
    let (src_mac, dst_mac) = unsafe { ((*pkt.eth).src_addr, (*pkt.eth).dst_addr) };
    Segment6 {
        src_mac,
        dst_mac,
        src_addr: pkt.key.src_addr.to_bytes(),
        dst_addr: pkt.key.dst_addr.to_bytes(),
        src_port: pkt.key.src_port.to_bytes(),
        dst_port: pkt.key.dst_port.to_bytes(),
        flags: pkt.tcp_flags,
        seq: pkt.seq,
        seq_end: pkt.seq_end,
        ack_seq: pkt.ack_seq,
    }
}

/// Takes one RST from this CPU's budget: false if it is spent (or missing).
#[inline(always)]
pub fn budget_allows() -> bool {
    take_budget().is_ok()
}

/// Takes one RST from this CPU's budget, or the drop for a segment left unanswered: spent
/// (TcpNoFlow), or the budget's slot missing (Inconsistent).
#[inline(always)]
fn take_budget() -> Result<(), Verdict> {
    let Some(budget) = RESET_BUDGET.get_ptr_mut(0) else {
        return Err(Verdict::Drop(DropReason::Inconsistent));
    };
    // SAFETY: a per-CPU slot, only this CPU writes it; the helper has no arguments.
    if !unsafe { (*budget).take(bpf_ktime_get_coarse_ns()) } {
        return Err(Verdict::Drop(DropReason::TcpNoFlow));
    }
    Ok(())
}

/// `frame` in place of the packet, sent back out of its ingress device; or a counted drop if
/// the CPU's budget is spent.
#[inline(always)]
fn send_back<const N: usize>(ctx: &XdpContext, frame: &[u8; N]) -> Verdict {
    let silent = Verdict::Drop(DropReason::TcpNoFlow);
    if let Err(verdict) = take_budget() {
        return verdict;
    }
    // A parsed TCP segment is at least as long as its RST, so this only shrinks the frame.
    let excess = (ctx.data_end() - ctx.data()) as i32 - N as i32;
    // SAFETY: the context pointer is the program's own; the packet's pointers are not used
    // after this.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), -excess) } != 0 {
        return silent;
    }
    let Some(out) = ptr_at::<[u8; N]>(ctx, 0) else {
        return silent;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *out = *frame };
    stats::count_slot(STAT_RESET_NO_FLOW);
    forward::back_out(ctx)
}
