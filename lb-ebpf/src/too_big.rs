//! Stage 5b, too big: a packet of a flow that its next hop's MTU cannot take (IPv4 with DF set,
//! any IPv6 packet) is answered with an ICMP "fragmentation needed" or an ICMPv6 "packet too
//! big" carrying that MTU, back to its sender (the client before the rewrite, the backend on
//! the reply path), so that path MTU discovery works through the balancer. The headers are
//! built by lb_common::icmp and written in front of the packet's first bytes, which stay where
//! they are as the quote: nothing is copied through the stack. Reads FLOWS (FLOWS6) and
//! IFACES; writes ICMP_BUDGET.

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_md,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Be16, Be32, DropReason, FLOW_DSR, FlowKeyOf, In6, STAT_FRAG_NEEDED_SENT,
    STAT_PACKET_TOO_BIG_SENT,
    icmp::{
        FRAG_NEEDED_FRAME_LEN, FRAG_NEEDED_HEADERS_LEN, ICMP_BUDGET_ERRORS,
        ICMP_ERRORS_PER_SEC_PER_CPU, PACKET_TOO_BIG_FRAME_LEN, PACKET_TOO_BIG_HEADERS_LEN,
        PacketTooBigHeaders, QUOTED_LEN, Quote6, TooBig, TooBig6, frag_needed_headers, quote_sum,
        restore_quote, restore_quote6, write_packet_too_big_headers,
    },
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Verdict,
    family::{Family, read_in6},
    forward, icmp,
    parse::{IPPROTO_FRAGMENT, ptr_at},
    stats,
};

/// What the answer is made of in each family: the quote (the IP header, fixed length, and 8
/// bytes) and the headers written in front of it.
pub trait Quoting: Family {
    type Quote;
    type TooBig;
    /// The bytes the quote moves back by: the new IP and ICMP headers.
    const PREPENDED: i32;
    /// The answer's whole frame.
    const FRAME_LEN: i32;
    /// The event slot counting answers sent.
    const SENT: u32;
    /// The quote in the frame, if it holds one this family can quote.
    fn quote(ctx: &XdpContext) -> Option<*mut Self::Quote>;
    /// The quoted packet's flow key as it was sent: the key of the entry of the other
    /// direction, whose rewrite names the parties the packet came from and went to.
    fn reverse_key(q: &Self::Quote) -> FlowKeyOf<Self>;
    fn restore(q: &mut Self::Quote, original: &FlowKeyOf<Self>);
    /// What the headers answering the quoted packet (`eth` its Ethernet header) are made of,
    /// for `mtu`.
    fn too_big(eth: &EthHdr, q: &Self::Quote, mtu: u16) -> Self::TooBig;
    /// Writes the headers in front of the quote, in the frame grown for them: whether it
    /// could.
    fn write_headers(ctx: &XdpContext, t: &Self::TooBig) -> bool;
}

impl Quoting for Be32 {
    type Quote = [u8; QUOTED_LEN];
    type TooBig = TooBig;
    const PREPENDED: i32 = (FRAG_NEEDED_HEADERS_LEN - EthHdr::LEN) as i32;
    const FRAME_LEN: i32 = FRAG_NEEDED_FRAME_LEN as i32;
    const SENT: u32 = STAT_FRAG_NEEDED_SENT;
    #[inline(always)]
    fn quote(ctx: &XdpContext) -> Option<*mut Self::Quote> {
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        // The quote is a fixed 28 bytes: IP options are too rare on the paths balanced to be
        // worth a variable-length quote the verifier must follow.
        // SAFETY: bounds-checked by ptr_at.
        if unsafe { (*ip).vihl } != 0x45 {
            return None;
        }
        ptr_at(ctx, EthHdr::LEN)
    }
    #[inline(always)]
    fn reverse_key(q: &Self::Quote) -> FlowKeyOf<Self> {
        FlowKeyOf {
            src_addr: Be32::from_bytes([q[16], q[17], q[18], q[19]]),
            dst_addr: Be32::from_bytes([q[12], q[13], q[14], q[15]]),
            src_port: Be16::from_bytes([q[22], q[23]]),
            dst_port: Be16::from_bytes([q[20], q[21]]),
            proto: q[9],
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn restore(q: &mut Self::Quote, original: &FlowKeyOf<Self>) {
        restore_quote(q, original);
    }
    #[inline(always)]
    fn too_big(eth: &EthHdr, q: &Self::Quote, mtu: u16) -> TooBig {
        TooBig {
            src_mac: eth.src_addr,
            dst_mac: eth.dst_addr,
            src_addr: [q[12], q[13], q[14], q[15]],
            dst_addr: [q[16], q[17], q[18], q[19]],
            quote_sum: quote_sum(q),
            mtu,
        }
    }
    #[inline(always)]
    fn write_headers(ctx: &XdpContext, t: &TooBig) -> bool {
        let Some(out) = ptr_at::<[u8; FRAG_NEEDED_HEADERS_LEN]>(ctx, 0) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *out = frag_needed_headers(t) };
        true
    }
}

impl Quoting for In6 {
    type Quote = Quote6;
    type TooBig = TooBig6;
    const PREPENDED: i32 = (PACKET_TOO_BIG_HEADERS_LEN - EthHdr::LEN) as i32;
    const FRAME_LEN: i32 = PACKET_TOO_BIG_FRAME_LEN as i32;
    const SENT: u32 = STAT_PACKET_TOO_BIG_SENT;
    /// The fixed header and the ports are the quote: the one extension header a balanced IPv6
    /// packet may carry is a first fragment's (`parse::packet6`), whose ports, by which its
    /// flow is found, lie beyond the quote. That one goes unanswered (a drop, counted): its
    /// sender is not told, a limit the README names.
    #[inline(always)]
    fn quote(ctx: &XdpContext) -> Option<*mut Self::Quote> {
        let quote: *mut Self::Quote = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: bounds-checked by ptr_at; the next-header byte is the quote's seventh.
        (unsafe { (*quote)[3].to_ne_bytes()[0] } != IPPROTO_FRAGMENT).then_some(quote)
    }
    #[inline(always)]
    fn reverse_key(q: &Quote6) -> FlowKeyOf<Self> {
        let addr = |at: usize| read_in6(q[at..at + 8].as_ptr().cast());
        FlowKeyOf {
            src_addr: addr(12),
            dst_addr: addr(4),
            src_port: Be16(q[21]),
            dst_port: Be16(q[20]),
            proto: q[3].to_ne_bytes()[0],
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn restore(q: &mut Quote6, original: &FlowKeyOf<Self>) {
        restore_quote6(q, original);
    }
    #[inline(always)]
    fn too_big(eth: &EthHdr, _: &Quote6, mtu: u16) -> TooBig6 {
        TooBig6 {
            src_mac: eth.src_addr,
            dst_mac: eth.dst_addr,
            mtu,
        }
    }
    #[inline(always)]
    fn write_headers(ctx: &XdpContext, t: &TooBig6) -> bool {
        let (Some(out), Some(quote)) = (
            ptr_at::<PacketTooBigHeaders>(ctx, 0),
            ptr_at::<Quote6>(ctx, PACKET_TOO_BIG_HEADERS_LEN),
        ) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at; the two do not overlap.
        unsafe { write_packet_too_big_headers(&mut *out, t, &*quote) };
        true
    }
}

/// `answer` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn answer_apart<A: Quoting>(ctx: *mut xdp_md, mtu: u16) -> u32 {
    answer::<A>(&XdpContext::new(ctx), mtu).counted()
}

/// The "too big" answer for the packet, already rewritten for its flow (or, a DSR flow's, as
/// it came), whose next hop takes at most `mtu` bytes; or a counted drop if it gets none. The
/// quote is restored to what the sender sent, so that it finds its connection by it.
#[inline(always)]
fn answer<A: Quoting>(ctx: &XdpContext, mtu: u16) -> Verdict {
    let untold = Verdict::Drop(DropReason::FibFragNeeded);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return untold;
    };
    let Some(quote) = A::quote(ctx) else {
        return untold;
    };
    // SAFETY: bounds-checked by ptr_at.
    let reverse = A::reverse_key(unsafe { &*quote });
    let original = match A::flows().get_ptr(&reverse) {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        Some(entry) => unsafe {
            let nat = &*entry;
            FlowKeyOf {
                src_addr: nat.nat_dst_addr,
                dst_addr: nat.nat_src_addr,
                src_port: nat.nat_dst_port,
                dst_port: nat.nat_src_port,
                proto: reverse.proto,
                _pad: [0; 3],
            }
        },
        // A DSR flow's packet is not rewritten: its quote is what its sender sent.
        None => {
            let sent = FlowKeyOf {
                src_addr: reverse.dst_addr,
                dst_addr: reverse.src_addr,
                src_port: reverse.dst_port,
                dst_port: reverse.src_port,
                proto: reverse.proto,
                _pad: [0; 3],
            };
            // SAFETY: as above.
            let direct = A::flows()
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
    let too_big = unsafe {
        A::restore(&mut *quote, &original);
        A::too_big(&*eth, &*quote, mtu)
    };
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the context pointer is the program's own; the packet pointers above are not used
    // after this. Headroom for the headers is there (XDP_PACKET_HEADROOM); the packet is
    // too big for an MTU of at least 68 bytes, so the tail only shrinks.
    unsafe {
        if bpf_xdp_adjust_head(ctx.as_ptr().cast(), -A::PREPENDED) != 0
            || bpf_xdp_adjust_tail(ctx.as_ptr().cast(), A::FRAME_LEN - (len + A::PREPENDED)) != 0
        {
            return untold;
        }
    }
    if !A::write_headers(ctx, &too_big) {
        return untold;
    }
    stats::count_slot(A::SENT);
    forward::back_out(ctx)
}

const _: () = assert!(FRAG_NEEDED_HEADERS_LEN == EthHdr::LEN + Ipv4Hdr::LEN + 8);
const _: () = assert!(PACKET_TOO_BIG_HEADERS_LEN == EthHdr::LEN + Ipv6Hdr::LEN + 8);
