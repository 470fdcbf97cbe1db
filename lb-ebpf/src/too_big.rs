//! Stage 5b, too big: a packet of a flow that its next hop's MTU cannot take, with DF set, is
//! answered with an ICMP "fragmentation needed" carrying that MTU, back to its sender (the
//! client before the rewrite, the backend on the reply path), so that path MTU discovery works
//! through the balancer. The headers are built by lb_common::icmp and written in front of the
//! packet's first bytes, which stay where they are as the quote: nothing is copied through the
//! stack. Reads FLOWS and IFACES; writes ICMP_BUDGET.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_md,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Be16, Be32, DropReason, FLOW_DSR, FlowKey, STAT_FRAG_NEEDED_SENT,
    icmp::{
        FRAG_NEEDED_FRAME_LEN, FRAG_NEEDED_HEADERS_LEN, ICMP_BUDGET_ERRORS,
        ICMP_ERRORS_PER_SEC_PER_CPU, QUOTED_LEN, TooBig, frag_needed_headers, quote_sum,
        restore_quote,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{Verdict, forward, icmp, maps::FLOWS, parse::ptr_at, stats};

/// The bytes the quote moves back by: the new IPv4 and ICMP headers.
const PREPENDED: i32 = (FRAG_NEEDED_HEADERS_LEN - EthHdr::LEN) as i32;

/// `answer` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn answer_apart(ctx: *mut xdp_md, mtu: u16) -> u32 {
    answer(&XdpContext::new(ctx), mtu).counted()
}

/// The "fragmentation needed" for the packet, already rewritten for its flow (or, a DSR
/// flow's, as it came), whose next hop takes at most `mtu` bytes; or a counted drop if it gets none. The quote is restored to what
/// the sender sent, so that it finds its connection by it.
#[inline(always)]
fn answer(ctx: &XdpContext, mtu: u16) -> Verdict {
    let untold = Verdict::Drop(DropReason::FibFragNeeded);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return untold;
    };
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return untold;
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*ip).vihl } != 0x45 {
        // The quote is a fixed 28 bytes: IP options are too rare on the paths balanced to be
        // worth a variable-length quote the verifier must follow.
        return untold;
    }
    let Some(quote) = ptr_at::<[u8; QUOTED_LEN]>(ctx, EthHdr::LEN) else {
        return untold;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (proto, q) = unsafe { ((*ip).proto, &*quote) };
    // The rewritten packet's flow entry is the other direction's, whose rewrite names the
    // parties the packet came from and went to.
    let reverse = FlowKey {
        src_addr: Be32::from_bytes([q[16], q[17], q[18], q[19]]),
        dst_addr: Be32::from_bytes([q[12], q[13], q[14], q[15]]),
        src_port: Be16::from_bytes([q[22], q[23]]),
        dst_port: Be16::from_bytes([q[20], q[21]]),
        proto,
        _pad: [0; 3],
    };
    let original = match FLOWS.get_ptr(&reverse) {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        Some(entry) => unsafe {
            let nat = &*entry;
            FlowKey {
                src_addr: nat.nat_dst_addr,
                dst_addr: nat.nat_src_addr,
                src_port: nat.nat_dst_port,
                dst_port: nat.nat_src_port,
                proto,
                _pad: [0; 3],
            }
        },
        // A DSR flow's packet is not rewritten: its quote is what its sender sent.
        None => {
            let sent = FlowKey {
                src_addr: reverse.dst_addr,
                dst_addr: reverse.src_addr,
                src_port: reverse.dst_port,
                dst_port: reverse.src_port,
                proto,
                _pad: [0; 3],
            };
            // SAFETY: as above.
            let direct = FLOWS
                .get_ptr(&sent)
                .is_some_and(|flow| unsafe { (*flow).flags } & FLOW_DSR != 0);
            if !direct {
                return untold;
            }
            sent
        }
    };
    if let Err(spent) = icmp::spend(
        ICMP_BUDGET_ERRORS,
        ICMP_ERRORS_PER_SEC_PER_CPU,
        DropReason::IcmpErrorLimited,
    ) {
        return spent;
    }
    // SAFETY: bounds-checked by ptr_at. The quote is the IP header's memory: once restored,
    // the header names the sender again.
    let headers = unsafe {
        restore_quote(&mut *quote, &original);
        let (eth, ip) = (&*eth, &*ip);
        frag_needed_headers(&TooBig {
            src_mac: eth.src_addr,
            dst_mac: eth.dst_addr,
            src_addr: ip.src_addr,
            dst_addr: ip.dst_addr,
            quote_sum: quote_sum(&*quote),
            mtu,
        })
    };
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context pointer is the program's own; the packet pointers above are not used
    // after this. Headroom for the headers is there (XDP_PACKET_HEADROOM); the packet is
    // too big for an MTU of at least 68 bytes, so the tail only shrinks.
    unsafe {
        if bpf_xdp_adjust_head(ctx.as_ptr().cast(), -PREPENDED) != 0
            || bpf_xdp_adjust_tail(
                ctx.as_ptr().cast(),
                FRAG_NEEDED_FRAME_LEN as i32 - (len + PREPENDED),
            ) != 0
        {
            return untold;
        }
    }
    let Some(out) = ptr_at::<[u8; FRAG_NEEDED_HEADERS_LEN]>(ctx, 0) else {
        return untold;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *out = headers };
    stats::count_slot(STAT_FRAG_NEEDED_SENT);
    forward::back_out(ctx)
}

const _: () = assert!(FRAG_NEEDED_HEADERS_LEN == EthHdr::LEN + Ipv4Hdr::LEN + 8);
