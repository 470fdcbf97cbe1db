//! Stage 1c, ICMP errors of balanced flows: destination unreachable (fragmentation needed
//! included), time exceeded and parameter problem quote the packet they answer. When that
//! packet is one the balancer sent for a flow, the error is translated back to what the
//! packet's own sender sent and forwarded to it: an error addressed to the VIP (about a reply
//! on its way to the client) goes to the flow's backend, one addressed to the SNAT address
//! (about a forwarded packet) goes to the client. Without this, a router's "fragmentation
//! needed" never reaches the backend, and path MTU discovery black-holes the connection.
//! ICMPv6's destination unreachable, packet too big, time exceeded and parameter problem are
//! translated the same way. Reads FLOWS (FLOWS6) and IFACES; writes ICMP_BUDGET and the flows'
//! next-hop cache.
//!
//! The quote is rewritten whole as far as it goes: its addresses, ports, IPv4 checksum and
//! (when quoted) its TCP or UDP checksum, and the error's own checksum over those bytes (and,
//! in ICMPv6, over the outer header's pseudo-header). The outer header goes from the flow's
//! rewritten source to its rewritten destination, as the connection's packets do.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Be16, Be32, DropReason, FLOW_REVERSE, FlowKeyOf, In6, PassReason, STAT_ICMP_ERROR_TO_BACKEND,
    STAT_ICMP_ERROR_TO_CLIENT,
    icmp::{ICMP_BUDGET_ERRORS, ICMP_ERRORS_PER_SEC_PER_CPU, IPPROTO_ICMP, IPPROTO_ICMPV6},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Verdict,
    csum::Delta,
    family::Family,
    forward::{self, NoHop},
    icmp, nat,
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at},
    stats,
};

/// The ICMP header: type, code, checksum and 4 bytes that depend on the type.
const ICMP_HEADER_LEN: usize = 8;
/// Where TCP's and UDP's checksums sit in their headers.
const TCP_CHECK_AT: usize = 16;
const UDP_CHECK_AT: usize = 6;
/// Fragment offset in IPv4's `frags` field (host order): only a first fragment quotes ports.
const IP_OFFSET: u16 = 0x1fff;

/// The quoted packet's header, as far as the translation needs it.
pub struct Quoted<A: Family> {
    pub ip: *mut A::Ip,
    pub src: A,
    pub dst: A,
    pub proto: u8,
    /// Where its ports are in the frame.
    pub ports_at: usize,
}

/// What the translation does differently per family.
pub trait ErrorFamily: Family {
    /// The error's own protocol, for the FIB.
    const ICMP_PROTO: u8;
    /// The header quoted at `at`, if it is a TCP or UDP packet whose ports are quoted.
    fn quoted(ctx: &XdpContext, at: usize) -> Option<Quoted<Self>>;
    /// Rewrites the quoted header's addresses (`addrs` their change): the change its bytes
    /// make to the error's checksum.
    fn readdress_quote(ip: &mut Self::Ip, src: Self, dst: Self, addrs: Delta) -> Delta;
    /// The error checksum's share of the outer header's `change`: ICMPv6's pseudo-header.
    fn pseudo_header_change(change: Delta) -> Delta;
}

impl ErrorFamily for Be32 {
    const ICMP_PROTO: u8 = IPPROTO_ICMP;
    #[inline(always)]
    fn quoted(ctx: &XdpContext, at: usize) -> Option<Quoted<Self>> {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, at)?;
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { &*ip };
        let (vihl, frags) = (q.vihl, u16::from_be_bytes(q.frags));
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let tcp_or_udp = q.proto == IPPROTO_TCP || q.proto == IPPROTO_UDP;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || frags & IP_OFFSET != 0 || !tcp_or_udp {
            return None;
        }
        Some(Quoted {
            ip,
            src: Be32::src(q),
            dst: Be32::dst(q),
            proto: q.proto,
            ports_at: at + ihl,
        })
    }
    /// The quoted header's checksum changes with its addresses, and both are in the error's.
    #[inline(always)]
    fn readdress_quote(ip: &mut Ipv4Hdr, src: Self, dst: Self, addrs: Delta) -> Delta {
        let old_check = u16::from_ne_bytes(ip.check);
        Be32::write_addrs(ip, src, dst, addrs);
        let mut change = addrs;
        change.replace16(old_check, u16::from_ne_bytes(ip.check));
        change
    }
    #[inline(always)]
    fn pseudo_header_change(_: Delta) -> Delta {
        Delta::default()
    }
}

impl ErrorFamily for In6 {
    const ICMP_PROTO: u8 = IPPROTO_ICMPV6;
    /// A quote with extension headers is not translated: of balanced packets, only a first
    /// fragment has one (its fragment header), and an error about it passes untranslated.
    #[inline(always)]
    fn quoted(ctx: &XdpContext, at: usize) -> Option<Quoted<Self>> {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, at)?;
        // SAFETY: bounds-checked by ptr_at.
        let q = unsafe { &*ip };
        let proto = q.next_hdr;
        if q.vcf[0] >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
            return None;
        }
        Some(Quoted {
            ip,
            src: In6::src(q),
            dst: In6::dst(q),
            proto,
            ports_at: at + Ipv6Hdr::LEN,
        })
    }
    #[inline(always)]
    fn readdress_quote(ip: &mut Ipv6Hdr, src: Self, dst: Self, addrs: Delta) -> Delta {
        In6::write_addrs(ip, src, dst, addrs);
        addrs
    }
    #[inline(always)]
    fn pseudo_header_change(change: Delta) -> Delta {
        change
    }
}

/// The error at `icmp_at` (after the outer header `ip`), translated and forwarded if it quotes
/// a packet of a flow; passed to the kernel otherwise.
#[inline(always)]
pub fn translate<A: ErrorFamily>(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut A::Ip,
    icmp_at: usize,
) -> Result<Verdict, Verdict> {
    let no_flow = Verdict::Pass(PassReason::IcmpNoFlow);
    let icmp: *mut [u8; ICMP_HEADER_LEN] = ptr_at(ctx, icmp_at).ok_or(no_flow)?;
    let q = A::quoted(ctx, icmp_at + ICMP_HEADER_LEN).ok_or(no_flow)?;
    let qports: *mut [u8; 4] = ptr_at(ctx, q.ports_at).ok_or(no_flow)?;
    // SAFETY: bounds-checked by ptr_at; the caller bounds-checked the outer header.
    let (p, dst, ttl) = unsafe { (*qports, A::dst(&*ip), A::hop_limit(&*ip)) };
    // An error goes to the quoted packet's sender; one that does not is forged or misrouted.
    if dst != q.src {
        return Err(no_flow);
    }
    // The quoted packet left the balancer; the flow entry is the other direction's, whose
    // rewrite names the parties the quoted packet came from and went to.
    let key = FlowKeyOf {
        src_addr: q.dst,
        dst_addr: q.src,
        src_port: Be16::from_bytes([p[2], p[3]]),
        dst_port: Be16::from_bytes([p[0], p[1]]),
        proto: q.proto,
        _pad: [0; 3],
    };
    let entry = A::flows().get_ptr_mut(&key).ok_or(no_flow)?;
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let nat = unsafe { &*entry };
    if ttl <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    icmp::spend(
        ICMP_BUDGET_ERRORS,
        ICMP_ERRORS_PER_SEC_PER_CPU,
        DropReason::IcmpErrorLimited,
    )?;
    // The quoted packet as its sender sent it: from the flow's destination to its source.
    let (new_src, new_dst) = (nat.nat_dst_addr, nat.nat_src_addr);
    let mut addrs = Delta::default();
    A::replace(&mut addrs, key.dst_addr, new_src);
    A::replace(&mut addrs, key.src_addr, new_dst);
    let mut ports = Delta::default();
    ports.replace16(key.dst_port.0, nat.nat_dst_port.0);
    ports.replace16(key.src_port.0, nat.nat_src_port.0);
    let mut icmp_delta = ports;
    let l4_check_at = q.ports_at
        + if q.proto == IPPROTO_TCP {
            TCP_CHECK_AT
        } else {
            UDP_CHECK_AT
        };
    // The quote may stop before TCP's checksum (RFC 792 asks for 8 bytes only).
    if let Some(l4_check) = ptr_at::<[u8; 2]>(ctx, l4_check_at) {
        // SAFETY: bounds-checked by ptr_at.
        let old = u16::from_ne_bytes(unsafe { *l4_check });
        // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent as 0xffff.
        if q.proto == IPPROTO_TCP || old != 0 {
            let mut new = addrs.and(ports).apply(old);
            if q.proto == IPPROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_delta.replace16(old, new);
            // SAFETY: as above.
            unsafe { *l4_check = new.to_ne_bytes() };
        }
    }
    let (out_src, out_dst) = (nat.nat_src_addr, nat.nat_dst_addr);
    let to_client = nat.flags & FLOW_REVERSE != 0;
    // SAFETY: bounds-checked by ptr_at above; the caller bounds-checked the outer header.
    unsafe {
        icmp_delta = icmp_delta.and(A::readdress_quote(&mut *q.ip, new_src, new_dst, addrs));
        let s = nat.nat_dst_port.to_bytes();
        let d = nat.nat_src_port.to_bytes();
        *qports = [s[0], s[1], d[0], d[1]];
        let outer = nat::readdress(&mut *ip, out_src, out_dst);
        icmp_delta = icmp_delta.and(A::pseudo_header_change(outer));
        let head = &mut *icmp;
        let check = icmp_delta
            .apply(u16::from_ne_bytes([head[2], head[3]]))
            .to_ne_bytes();
        (head[2], head[3]) = (check[0], check[1]);
    }
    let hop = match forward::next_hop(ctx, ip, A::ICMP_PROTO, entry, 0) {
        Ok(hop) => hop,
        // An error is not answered with another.
        Err(NoHop::TooBig { .. }) => return Err(Verdict::Drop(DropReason::FibFragNeeded)),
        Err(NoHop::Verdict(verdict)) => return Err(verdict),
    };
    stats::count_slot(if to_client {
        STAT_ICMP_ERROR_TO_CLIENT
    } else {
        STAT_ICMP_ERROR_TO_BACKEND
    });
    forward::send::<A>(ctx, eth, ip, &hop)
}
