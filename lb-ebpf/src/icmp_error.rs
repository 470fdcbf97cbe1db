//! Stage 1c, ICMP errors of balanced flows: destination unreachable (fragmentation needed
//! included), time exceeded and parameter problem quote the packet they answer. When that
//! packet is one the balancer sent for a flow, the error is translated back to what the
//! packet's own sender sent and forwarded to it: an error addressed to the VIP (about a reply
//! on its way to the client) goes to the flow's backend, one addressed to the SNAT address
//! (about a forwarded packet) goes to the client. Without this, a router's "fragmentation
//! needed" never reaches the backend, and path MTU discovery black-holes the connection.
//! Reads FLOWS and IFACES; writes ICMP_BUDGET and FLOWS' next-hop cache.
//!
//! The quote is rewritten whole as far as it goes: its addresses, ports, IP checksum and (when
//! quoted) its TCP or UDP checksum, and the error's own checksum over those bytes. The outer
//! header goes from the flow's rewritten source to its rewritten destination, as the
//! connection's packets do.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Be16, Be32, DropReason, FLOW_REVERSE, FlowKey, PassReason, STAT_ICMP_ERROR_TO_BACKEND,
    STAT_ICMP_ERROR_TO_CLIENT,
    icmp::{ICMP_BUDGET_ERRORS, ICMP_ERRORS_PER_SEC_PER_CPU, IPPROTO_ICMP},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    Verdict,
    csum::Delta,
    forward::{self, NoHop},
    icmp,
    maps::FLOWS,
    nat,
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

/// The error at `icmp_at` (after the outer header `ip`), translated and forwarded if it quotes
/// a packet of a flow; passed to the kernel otherwise.
#[inline(always)]
pub fn translate(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    icmp_at: usize,
) -> Result<Verdict, Verdict> {
    let no_flow = Verdict::Pass(PassReason::IcmpNoFlow);
    let icmp: *mut [u8; ICMP_HEADER_LEN] = ptr_at(ctx, icmp_at).ok_or(no_flow)?;
    let quote_at = icmp_at + ICMP_HEADER_LEN;
    let quote: *mut Ipv4Hdr = ptr_at(ctx, quote_at).ok_or(no_flow)?;
    // SAFETY: bounds-checked by ptr_at.
    let (qvihl, qproto, qfrags, qsrc, qdst, qcheck) = unsafe {
        let q = &*quote;
        (
            q.vihl,
            q.proto,
            u16::from_be_bytes(q.frags),
            q.src_addr,
            q.dst_addr,
            q.check,
        )
    };
    let qihl = ((qvihl & 0x0f) as usize) * 4;
    if qvihl >> 4 != 4
        || qihl < Ipv4Hdr::LEN
        || qfrags & IP_OFFSET != 0
        || (qproto != IPPROTO_TCP && qproto != IPPROTO_UDP)
    {
        return Err(no_flow);
    }
    let qports_at = quote_at + qihl;
    let qports: *mut [u8; 4] = ptr_at(ctx, qports_at).ok_or(no_flow)?;
    // SAFETY: bounds-checked by ptr_at; the caller bounds-checked the outer header.
    let (p, dst, ttl) = unsafe { (*qports, (*ip).dst_addr, (*ip).ttl) };
    // An error goes to the quoted packet's sender; one that does not is forged or misrouted.
    if dst != qsrc {
        return Err(no_flow);
    }
    // The quoted packet left the balancer; the flow entry is the other direction's, whose
    // rewrite names the parties the quoted packet came from and went to.
    let key = FlowKey {
        src_addr: Be32::from_bytes(qdst),
        dst_addr: Be32::from_bytes(qsrc),
        src_port: Be16::from_bytes([p[2], p[3]]),
        dst_port: Be16::from_bytes([p[0], p[1]]),
        proto: qproto,
        _pad: [0; 3],
    };
    let entry = FLOWS.get_ptr_mut(&key).ok_or(no_flow)?;
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
    addrs.replace32(Be32::from_bytes(qsrc).0, new_src.0);
    addrs.replace32(Be32::from_bytes(qdst).0, new_dst.0);
    let mut ports = Delta::default();
    ports.replace16(key.dst_port.0, nat.nat_dst_port.0);
    ports.replace16(key.src_port.0, nat.nat_src_port.0);
    let new_qcheck = addrs.apply(u16::from_ne_bytes(qcheck));
    let mut icmp_delta = addrs.and(ports);
    icmp_delta.replace16(u16::from_ne_bytes(qcheck), new_qcheck);
    let l4_check_at = qports_at
        + if qproto == IPPROTO_TCP {
            TCP_CHECK_AT
        } else {
            UDP_CHECK_AT
        };
    // The quote may stop before TCP's checksum (RFC 792 asks for 8 bytes only).
    if let Some(l4_check) = ptr_at::<[u8; 2]>(ctx, l4_check_at) {
        // SAFETY: bounds-checked by ptr_at.
        let old = u16::from_ne_bytes(unsafe { *l4_check });
        // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent as 0xffff.
        if qproto == IPPROTO_TCP || old != 0 {
            let mut new = addrs.and(ports).apply(old);
            if qproto == IPPROTO_UDP && new == 0 {
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
        let q = &mut *quote;
        q.src_addr = new_src.to_bytes();
        q.dst_addr = new_dst.to_bytes();
        q.check = new_qcheck.to_ne_bytes();
        let s = nat.nat_dst_port.to_bytes();
        let d = nat.nat_src_port.to_bytes();
        *qports = [s[0], s[1], d[0], d[1]];
        let head = &mut *icmp;
        let check = icmp_delta
            .apply(u16::from_ne_bytes([head[2], head[3]]))
            .to_ne_bytes();
        (head[2], head[3]) = (check[0], check[1]);
        nat::readdress(&mut *ip, out_src, out_dst);
    }
    let hop = match forward::next_hop(ctx, ip, IPPROTO_ICMP, entry, 0) {
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
    forward::send::<Be32>(ctx, eth, ip, &hop)
}
