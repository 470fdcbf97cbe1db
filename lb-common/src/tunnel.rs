//! DSR's IPIP form: the client's packet, whole, inside an IPv4 header to the backend, whose
//! `lb decap` strips it (this kernel has no ipip module). Pure: the headers the data path writes
//! in front of the packet, unit-tested here.

use crate::reset::{fold, sum_words};

/// IPPROTO_IPIP: IPv4 in IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// What the outer header adds to the packet.
pub const IPIP_OVERHEAD: u16 = 20;
/// The Ethernet and outer IPv4 headers the data path writes.
pub const IPIP_HEADERS_LEN: usize = 14 + IPIP_OVERHEAD as usize;
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
    f[0..6].copy_from_slice(&t.dst_mac);
    f[6..12].copy_from_slice(&t.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = t.tos;
    ip[2..4].copy_from_slice(&t.inner_len.wrapping_add(IPIP_OVERHEAD).to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    let frags = if t.df { IP_DF } else { 0 };
    ip[6..8].copy_from_slice(&frags.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_IPIP;
    ip[12..16].copy_from_slice(&t.src_addr);
    ip[16..20].copy_from_slice(&t.dst_addr);
    ip[10..12].copy_from_slice(&[0, 0]);
    let check = !fold(sum_words(ip, 0));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
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
}
