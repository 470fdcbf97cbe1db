//! Stage 4, rewrite: addresses and ports as the flow says, with the IPv4 and TCP/UDP checksums
//! updated incrementally (the L4 one for `l4_changes` made earlier too). Touches no map.

use lb_common::FlowValueOf;

use crate::{csum::Delta, family::Family, parse::Packet};

/// Rewrites the addresses of `ip` to `src` and `dst`, with IPv4's header checksum: for packets
/// with no ports of the flow to rewrite (an ICMP error's outer header, a later fragment).
/// Returns the change, which a pseudo-header takes too.
#[inline(always)]
pub fn readdress<A: Family>(ip: &mut A::Ip, src: A, dst: A) -> Delta {
    let mut change = Delta::default();
    A::replace(&mut change, A::src(ip), src);
    A::replace(&mut change, A::dst(ip), dst);
    A::write_addrs(ip, src, dst, change);
    change
}

/// Writes the flow's addresses and ports into the packet, with its IPv4 checksum. Returns the
/// changes the L4 checksum must take: the addresses' (part of its pseudo-header) and the
/// ports'. Each hook applies them its own way.
#[inline(always)]
pub fn write_headers<A: Family>(pkt: &Packet<A>, nat: &FlowValueOf<A>) -> (Delta, Delta) {
    let k = &pkt.key;
    let mut addrs = Delta::default();
    A::replace(&mut addrs, k.src_addr, nat.nat_src_addr);
    A::replace(&mut addrs, k.dst_addr, nat.nat_dst_addr);
    let mut ports = Delta::default();
    ports.replace16(k.src_port.0, nat.nat_src_port.0);
    ports.replace16(k.dst_port.0, nat.nat_dst_port.0);
    // SAFETY: parse::packet bounds-checked the IP header and the ports.
    unsafe {
        A::write_addrs(&mut *pkt.ip, nat.nat_src_addr, nat.nat_dst_addr, addrs);
        let s = nat.nat_src_port.to_bytes();
        let d = nat.nat_dst_port.to_bytes();
        *pkt.ports = [s[0], s[1], d[0], d[1]];
        (addrs, ports)
    }
}

/// XDP's rewrite: the headers, and the L4 checksum in place (XDP's packets carry full
/// checksums), for `l4_changes` made earlier too.
#[inline(always)]
pub fn rewrite<A: Family>(pkt: &Packet<A>, nat: &FlowValueOf<A>, l4_changes: Delta) {
    let (addrs, ports) = write_headers(pkt, nat);
    let l4 = addrs.and(ports).and(l4_changes);
    // SAFETY: parse::packet bounds-checked the L4 checksum field.
    unsafe {
        let check = u16::from_ne_bytes(*pkt.l4_check);
        // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent as 0xffff.
        if pkt.is_tcp() {
            *pkt.l4_check = l4.apply(check).to_ne_bytes();
        } else if check != 0 {
            let updated = l4.apply(check);
            *pkt.l4_check = if updated == 0 { 0xffff } else { updated }.to_ne_bytes();
        }
    }
}
