//! DSR's encapsulated forms: the client's packet, whole, inside an IPv4 header to the backend
//! (IPIP), or inside IPv4 and UDP (GUE, variant 1: the UDP payload is the inner packet, as
//! Katran sends it), whose `lb decap` strips it (this kernel has no ipip or fou module). An
//! IPv6 packet goes inside IPv6 the same ways (IPv6-in-IPv6, RFC 2473, and GUE over IPv6). GUE's
//! UDP source port carries the flow's hash, so that the backend NIC's RSS spreads the tunnel
//! by flow. Pure: the headers the data path writes in front of the packet, unit-tested here.

use crate::reset::{fold, sum_words};

/// IPPROTO_IPIP: IPv4 in IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// What the outer header adds to the packet.
pub const IPIP_OVERHEAD: u16 = 20;
/// The Ethernet and outer IPv4 headers the data path writes.
pub const IPIP_HEADERS_LEN: usize = 14 + IPIP_OVERHEAD as usize;
/// GUE's UDP destination port (Katran's default).
pub const GUE_PORT: u16 = 6080;
/// What the outer IPv4 and UDP headers add to the packet.
pub const GUE_OVERHEAD: u16 = 28;
/// The Ethernet, outer IPv4 and UDP headers the data path writes.
pub const GUE_HEADERS_LEN: usize = 14 + GUE_OVERHEAD as usize;
/// IPPROTO_UDP.
const IPPROTO_UDP: u8 = 17;
/// GUE's UDP source ports: the ephemeral range's top quarter, the flow's hash below it.
const GUE_SOURCE_BASE: u16 = 0xc000;

/// The UDP source port of a GUE flow whose hash is `hash`.
#[inline(always)]
pub const fn gue_source_port(hash: u32) -> u16 {
    GUE_SOURCE_BASE | (hash as u16 & !GUE_SOURCE_BASE)
}

/// TTL of the outer header: it lives from the balancer to the backend's decap.
const OUTER_TTL: u8 = 64;
/// IPv4's don't-fragment bit, in the flags-and-offset field.
const IP_DF: u16 = 0x4000;

/// One encapsulation: the next hop's MACs, the outer addresses (as the packet holds them) and
/// what the outer header takes from the inner one.
pub struct Ipip {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// The inner packet's IPv4 total length.
    pub inner_len: u16,
    /// The inner packet's TOS, kept outside so the path treats both alike (RFC 2003).
    pub tos: u8,
    /// The inner packet had DF: the outer one has it too (RFC 2003), so a path MTU problem
    /// comes back as an error rather than as fragments the decap cannot join.
    pub df: bool,
}

/// Writes the Ethernet and outer IPv4 headers of `t`, with the outer checksum, over `f`
/// (whatever it held): in place in the packet, as the data path's stack has no room for a copy.
#[inline(always)]
pub fn write_ipip_headers(f: &mut [u8; IPIP_HEADERS_LEN], t: &Ipip) {
    write_outer(&mut f[..34], t, IPPROTO_IPIP, IPIP_OVERHEAD);
}

/// Writes the Ethernet, outer IPv4 and UDP headers of `t` (UDP from `source_port` to
/// GUE_PORT, checksum 0, as IPv4 allows) over `f`.
#[inline(always)]
pub fn write_gue_headers(f: &mut [u8; GUE_HEADERS_LEN], t: &Ipip, source_port: u16) {
    write_outer(&mut f[..34], t, IPPROTO_UDP, GUE_OVERHEAD);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&source_port.to_be_bytes());
    udp[2..4].copy_from_slice(&GUE_PORT.to_be_bytes());
    let len = t.inner_len.wrapping_add(GUE_OVERHEAD - 20);
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
}

/// The Ethernet and outer IPv4 headers (`f`, 34 bytes) of a tunnel of `proto` whose headers
/// add `overhead` bytes.
#[inline(always)]
fn write_outer(f: &mut [u8], t: &Ipip, proto: u8, overhead: u16) {
    f[0..6].copy_from_slice(&t.dst_mac);
    f[6..12].copy_from_slice(&t.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = t.tos;
    ip[2..4].copy_from_slice(&t.inner_len.wrapping_add(overhead).to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    let frags = if t.df { IP_DF } else { 0 };
    ip[6..8].copy_from_slice(&frags.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&t.src_addr);
    ip[16..20].copy_from_slice(&t.dst_addr);
    ip[10..12].copy_from_slice(&[0, 0]);
    let check = !fold(sum_words(ip, 0));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
}

/// IPPROTO_IPV6: IPv6 in IPv6 (RFC 2473), the IPIP form of an IPv6 service.
pub const IPPROTO_IPV6: u8 = 41;
/// What the outer IPv6 header adds to the packet.
pub const IP6IP6_OVERHEAD: u16 = 40;
/// The Ethernet and outer IPv6 headers the data path writes.
pub const IP6IP6_HEADERS_LEN: usize = 14 + IP6IP6_OVERHEAD as usize;
/// What the outer IPv6 and UDP headers add to the packet (GUE over IPv6).
pub const GUE6_OVERHEAD: u16 = 48;
/// The Ethernet, outer IPv6 and UDP headers the data path writes.
pub const GUE6_HEADERS_LEN: usize = 14 + GUE6_OVERHEAD as usize;

/// One encapsulation of an IPv6 packet in IPv6: the next hop's MACs, the outer addresses (as
/// the packet holds them) and what the outer header takes from the inner one.
pub struct Tunnel6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// The inner packet's length, its IPv6 header included.
    pub inner_len: u16,
    /// The inner packet's traffic class, kept outside (RFC 2473).
    pub traffic_class: u8,
    /// The outer flow label (20 bits): the flow's hash, so that the backend's NIC and
    /// receive steering, which read it (RFC 6438), spread the tunnel by flow.
    pub flow_label: u32,
}

/// Writes the Ethernet and outer IPv6 headers of `t` over `f`, in place in the packet.
#[inline(always)]
pub fn write_ip6ip6_headers(f: &mut [u8; IP6IP6_HEADERS_LEN], t: &Tunnel6) {
    write_outer6(&mut f[..54], t, IPPROTO_IPV6, t.inner_len);
}

/// Writes the Ethernet, outer IPv6 and UDP headers of `t` (UDP from `source_port` to
/// GUE_PORT) over `f`. The UDP checksum is 0, which IPv6 allows a tunnel's UDP (RFC 6935,
/// 6936): `lb decap` strips the headers before UDP would check it.
#[inline(always)]
pub fn write_gue6_headers(f: &mut [u8; GUE6_HEADERS_LEN], t: &Tunnel6, source_port: u16) {
    let udp_len = t.inner_len.wrapping_add(8);
    write_outer6(&mut f[..54], t, IPPROTO_UDP, udp_len);
    let udp = &mut f[54..62];
    udp[0..2].copy_from_slice(&source_port.to_be_bytes());
    udp[2..4].copy_from_slice(&GUE_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
}

/// The Ethernet and outer IPv6 headers (`f`, 54 bytes) of a tunnel whose outer payload is
/// `next_header`, `payload_len` bytes long.
#[inline(always)]
fn write_outer6(f: &mut [u8], t: &Tunnel6, next_header: u8, payload_len: u16) {
    f[0..6].copy_from_slice(&t.dst_mac);
    f[6..12].copy_from_slice(&t.src_mac);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let ip = &mut f[14..54];
    let vcf = (6u32 << 28) | (u32::from(t.traffic_class) << 20) | (t.flow_label & 0xf_ffff);
    ip[0..4].copy_from_slice(&vcf.to_be_bytes());
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next_header;
    ip[7] = OUTER_TTL;
    ip[8..24].copy_from_slice(&t.src_addr);
    ip[24..40].copy_from_slice(&t.dst_addr);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(df: bool) -> [u8; IPIP_HEADERS_LEN] {
        // Whatever the packet held there before.
        let mut f = [0xa5; IPIP_HEADERS_LEN];
        write_ipip_headers(
            &mut f,
            &Ipip {
                src_mac: [2, 0, 0, 0, 1, 1],
                dst_mac: [2, 0, 0, 0, 0, 0x11],
                src_addr: [198, 18, 1, 1],
                dst_addr: [198, 18, 9, 11],
                inner_len: 60,
                tos: 0x10,
                df,
            },
        );
        f
    }

    #[test]
    fn the_outer_header_carries_the_inner_packet_to_the_backend() {
        let f = example(true);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 0x11], "to the next hop");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 1, 1]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x10, "TOS copied");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 80, "inner 60 + 20");
        assert_eq!(u16::from_be_bytes([ip[6], ip[7]]), IP_DF);
        assert_eq!((ip[8], ip[9]), (64, IPPROTO_IPIP));
        assert_eq!(&ip[12..16], &[198, 18, 1, 1]);
        assert_eq!(&ip[16..20], &[198, 18, 9, 11]);
        assert_eq!(
            example(false)[20..22],
            [0, 0],
            "no DF without the inner one's"
        );
    }

    #[test]
    fn the_outer_checksum_verifies() {
        for df in [true, false] {
            let f = example(df);
            // A header with its checksum sums to 0xffff.
            assert_eq!(fold(sum_words(&f[14..34], 0)), 0xffff, "df {df}");
        }
    }

    #[test]
    fn gue_puts_a_udp_header_to_its_port_between() {
        let t = Ipip {
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 0, 0x11],
            src_addr: [198, 18, 1, 1],
            dst_addr: [198, 18, 9, 11],
            inner_len: 60,
            tos: 0,
            df: true,
        };
        let mut f = [0xa5; GUE_HEADERS_LEN];
        write_gue_headers(&mut f, &t, gue_source_port(0x1234_5678));
        let ip = &f[14..34];
        assert_eq!((ip[9], u16::from_be_bytes([ip[2], ip[3]])), (17, 88));
        assert_eq!(fold(sum_words(ip, 0)), 0xffff);
        let udp = &f[34..42];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 0xc000 | 0x1678);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(
            u16::from_be_bytes([udp[4], udp[5]]),
            68,
            "UDP header and inner packet"
        );
        assert_eq!(&udp[6..8], &[0, 0], "no UDP checksum");
    }

    fn tunnel6() -> Tunnel6 {
        let mut src_addr = [0; 16];
        src_addr[..2].copy_from_slice(&[0xfd, 0]);
        src_addr[15] = 1;
        let mut dst_addr = src_addr;
        dst_addr[15] = 0x11;
        Tunnel6 {
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 0, 0x11],
            src_addr,
            dst_addr,
            inner_len: 80,
            traffic_class: 0xb8,
            flow_label: 0xfff_abcde,
        }
    }

    #[test]
    fn ipv6_in_ipv6_carries_the_inner_packet_to_the_backend() {
        let t = tunnel6();
        let mut f = [0xa5; IP6IP6_HEADERS_LEN];
        write_ip6ip6_headers(&mut f, &t);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 0x11], "to the next hop");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 1, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip = &f[14..];
        assert_eq!(
            u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]),
            0x6b8a_bcde,
            "version 6, the traffic class copied, the hash's 20 bits as the flow label"
        );
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 80, "the inner packet");
        assert_eq!((ip[6], ip[7]), (IPPROTO_IPV6, 64));
        assert_eq!(&ip[8..24], &t.src_addr);
        assert_eq!(&ip[24..40], &t.dst_addr);
    }

    #[test]
    fn gue_over_ipv6_puts_a_udp_header_to_its_port_between() {
        let t = tunnel6();
        let mut f = [0xa5; GUE6_HEADERS_LEN];
        write_gue6_headers(&mut f, &t, gue_source_port(0x1234_5678));
        let ip = &f[14..54];
        assert_eq!((ip[6], u16::from_be_bytes([ip[4], ip[5]])), (17, 88));
        let udp = &f[54..62];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 0xc000 | 0x1678);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 88);
        assert_eq!(&udp[6..8], &[0, 0], "no UDP checksum");
    }

    #[test]
    fn gue_source_ports_stay_in_the_top_quarter() {
        for hash in [0, 1, 0x3fff, 0xffff, u32::MAX, 0xdead_beef] {
            assert!(gue_source_port(hash) >= 0xc000);
        }
        assert_ne!(gue_source_port(1), gue_source_port(2), "the hash shows");
    }
}
