//! Stage 4c, rewrite: MSS clamping. A service with `mss` set lowers the MSS that its
//! connections' SYN and SYN-ACK announce to that value, for paths that drop the ICMP path MTU
//! discovery needs: each end then sends segments that fit the narrowest link. A segment that
//! announces less, or no MSS (536), is left alone. The L4 checksum follows: in place at XDP,
//! through the kernel's helper at tc (a partial checksum does not cover options yet).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
};
use lb_common::{FlowValueOf, STAT_MSS_CLAMPED, conntrack::TCP_SYN};

use crate::{
    csum::Delta,
    family::Family,
    frame::Frame,
    parse::Packet,
    stats,
    tcp_options::{self, TCP_HEADER_MIN, TCPOPT_MSS},
};

const MSS_LEN: u8 = 4;
/// Where the TCP header may start in a frame: after Ethernet and the longest IPv4 header.
const TCP_OFFSET_MAX: u32 = 14 + 60;
/// The TCP checksum's offset in the header.
const CHECK_AT: usize = 16;

/// Clamps the MSS a SYN or SYN-ACK of `nat`'s flow announces, if its service asks for it.
#[inline(always)]
pub fn clamp<A: Family>(ctx: &XdpContext, pkt: &Packet<A>, nat: &FlowValueOf<A>) {
    if !wanted(pkt, nat) {
        return;
    }
    let tcp_offset = pkt.ports as usize - ctx.data();
    lb_mss_clamp(
        ctx.ctx,
        tcp_offset as u32,
        pkt.tcp_header_len,
        u32::from(nat.mss),
    );
}

/// `clamp` at tc: the segment's MSS lowered, and the change for the caller to give the L4
/// checksum through the kernel's helper (which knows whether the checksum covers it yet).
#[inline(always)]
pub fn clamp_skb<A: Family>(ctx: &TcContext, pkt: &Packet<A>, nat: &FlowValueOf<A>) -> Delta {
    if !wanted(pkt, nat) {
        return Delta::default();
    }
    let tcp_offset = pkt.ports as usize - ctx.data();
    Delta::from_sum(lb_tc_mss_clamp(
        ctx.as_ptr().cast(),
        tcp_offset as u32,
        pkt.tcp_header_len,
        u32::from(nat.mss),
    ))
}

#[inline(always)]
fn wanted<A: Family>(pkt: &Packet<A>, nat: &FlowValueOf<A>) -> bool {
    nat.mss != 0 && pkt.tcp_flags & TCP_SYN != 0 && pkt.is_tcp()
}

/// `clamp`'s work, a BPF function of its own: the verifier checks it once, apart from the many
/// paths that reach it, and it stays off the balancing path's full stack. The header's length
/// comes from the parse stage as an argument: one the compiler derived here from the data
/// offset would be checked on one register and used from another, and the verifier would see
/// an unchecked length. Returns 1 if it clamped.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_mss_clamp(
    ctx: *mut xdp_md,
    tcp_offset: u32,
    header_len: u32,
    mss: u32,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    let Some((delta, check)) = lower(&ctx, tcp_offset, header_len, mss) else {
        return 0;
    };
    // SAFETY: `lower` bounds-checked the fixed header the field lies in.
    unsafe { *check = delta.apply(u16::from_ne_bytes(*check)).to_ne_bytes() };
    1
}

/// `clamp_skb`'s work, apart for the same reasons: the checksum change (0 if none).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_tc_mss_clamp(
    skb: *mut __sk_buff,
    tcp_offset: u32,
    header_len: u32,
    mss: u32,
) -> u32 {
    let Some(skb) = core::ptr::NonNull::new(skb) else {
        return 0;
    };
    let ctx = TcContext::new(skb);
    lower(&ctx, tcp_offset, header_len, mss).map_or(0, |(delta, _)| delta.sum())
}

/// Writes `mss` over a larger MSS the segment's header (at `tcp_offset`, `header_len` long)
/// announces. The checksum's change (counted as the option's offset makes it), and the
/// checksum field, bounds-checked.
#[inline(always)]
fn lower(
    ctx: &impl Frame,
    tcp_offset: u32,
    header_len: u32,
    mss: u32,
) -> Option<(Delta, *mut [u8; 2])> {
    if tcp_offset > TCP_OFFSET_MAX {
        return None;
    }
    let (tcp, end) = (ctx.data() + tcp_offset as usize, ctx.data_end());
    if tcp + TCP_HEADER_MIN > end {
        return None;
    }
    let header_len = header_len as usize;
    // Every stack the balancer meets puts MSS first; any other layout is walked.
    let first = tcp + TCP_HEADER_MIN;
    let at = if first + 4 <= end
        // SAFETY: bounds-checked against the frame's end just now.
        && unsafe { *(first as *const [u8; 2]) } == [TCPOPT_MSS, MSS_LEN]
        && header_len >= TCP_HEADER_MIN + 4
    {
        TCP_HEADER_MIN
    } else {
        let found = tcp_options::find(ctx, tcp_offset as usize, header_len, TCPOPT_MSS, MSS_LEN);
        match found {
            Some(at) if at <= TCP_HEADER_MIN + 36 => at,
            _ => return None,
        }
    };
    let value = tcp + at + 2;
    if value + 2 > end {
        return None;
    }
    let value = value as *mut [u8; 2];
    // SAFETY: bounds-checked against the frame's end just above.
    let old = unsafe { *value };
    if u32::from(u16::from_be_bytes(old)) <= mss {
        return None;
    }
    let new = (mss as u16).to_be_bytes();
    let mut delta = Delta::default();
    delta.replace16(u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    // The checksum sums 16-bit words from the header's start: a field at an odd offset
    // straddles them, and its change counts byte-swapped.
    let delta = if at & 1 != 0 { delta.swapped() } else { delta };
    // SAFETY: bounds-checked against the frame's end above.
    unsafe { *value = new };
    stats::count_slot(STAT_MSS_CLAMPED);
    Some((delta, (tcp + CHECK_AT) as *mut [u8; 2]))
}
