//! Stage 4, rewrite: addresses and ports as the flow says, with the IPv4 and TCP/UDP checksums
//! updated incrementally (the L4 one for `l4_changes` made earlier too). Touches no map.

use lb_common::FlowValue;

use crate::{csum::Delta, parse::Packet};

#[inline(always)]
pub fn rewrite(pkt: &Packet, nat: &FlowValue, l4_changes: Delta) {
    let k = &pkt.key;
    let mut addrs = Delta::default();
    addrs.replace32(k.src_addr.0, nat.nat_src_addr.0);
    addrs.replace32(k.dst_addr.0, nat.nat_dst_addr.0);
    let mut l4 = addrs.and(l4_changes);
    l4.replace16(k.src_port.0, nat.nat_src_port.0);
    l4.replace16(k.dst_port.0, nat.nat_dst_port.0);
    // SAFETY: parse::packet bounds-checked the IP header, the ports and the L4 checksum field.
    unsafe {
        let ip = &mut *pkt.ip;
        ip.src_addr = nat.nat_src_addr.to_bytes();
        ip.dst_addr = nat.nat_dst_addr.to_bytes();
        ip.check = addrs.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        let s = nat.nat_src_port.to_bytes();
        let d = nat.nat_dst_port.to_bytes();
        *pkt.ports = [s[0], s[1], d[0], d[1]];
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
