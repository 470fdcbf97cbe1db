//! ICMP the balancer originates or forwards: the "fragmentation needed" (RFC 792, RFC 1191) and
//! ICMPv6's "packet too big" (RFC 4443, RFC 8201) that tell a sender its packet is too big for
//! the next hop's MTU, built whole here so that the data path only copies the frame and tests
//! can check every byte without a kernel; and the per-CPU budgets of ICMP answers.

use crate::{
    FlowKey, FlowKey6,
    reset::{fold, sum_words},
};

/// The packet a "fragmentation needed" quotes: its IPv4 header without options and the first
/// 8 bytes after it (the ports, and TCP's sequence number or UDP's length and checksum), all
/// that RFC 792 requires and all that a sender needs to find its socket.
pub const QUOTED_LEN: usize = 20 + 8;
/// Ethernet, IPv4 and ICMP headers of a "fragmentation needed", which its quote follows.
pub const FRAG_NEEDED_HEADERS_LEN: usize = 14 + 20 + 8;
pub const FRAG_NEEDED_FRAME_LEN: usize = FRAG_NEEDED_HEADERS_LEN + QUOTED_LEN;

pub const IPPROTO_ICMP: u8 = 1;
const IPPROTO_UDP: u8 = 17;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable, code 4: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// ICMPv6 (RFC 4443): the errors a balanced flow's packets may draw, and echo.
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// What a "packet too big" quotes: the IPv6 header and the first 8 bytes after it, as IPv4's
/// quote. RFC 4443 allows up to 1280 bytes; a sender finds its socket by these, as Linux's
/// `icmpv6_notify` reads no more.
pub const QUOTED_LEN6: usize = 40 + 8;
/// Ethernet, IPv6 and ICMPv6 headers of a "packet too big", which its quote follows.
pub const PACKET_TOO_BIG_HEADERS_LEN: usize = 14 + 40 + 8;
pub const PACKET_TOO_BIG_FRAME_LEN: usize = PACKET_TOO_BIG_HEADERS_LEN + QUOTED_LEN6;

/// ICMP_BUDGET's slots: echo replies to pings of a VIP ...
pub const ICMP_BUDGET_ECHO: u32 = 0;
/// ... and ICMP errors, forwarded for a flow or sent by the balancer.
pub const ICMP_BUDGET_ERRORS: u32 = 1;
pub const ICMP_BUDGET_SLOTS: u32 = 2;
/// Echo replies to pings of a VIP a CPU sends per second at most.
pub const ECHO_REPLIES_PER_SEC_PER_CPU: u32 = 1000;
/// ICMP errors a CPU forwards or sends per second at most: path MTU discovery needs one per
/// path and sender now and then; a flood of forged errors must not reach the backends whole.
pub const ICMP_ERRORS_PER_SEC_PER_CPU: u32 = 1000;

const TTL: u8 = 64;
/// Precedence "internetwork control", as Linux marks the ICMP errors it sends.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;

/// What a "fragmentation needed" is built from: the frame it answers, as its sender sent it
/// (its source is where the answer goes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TooBig {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// The one's-complement sum of the quoted bytes (`quote_sum`).
    pub quote_sum: u32,
    /// The next hop's MTU.
    pub mtu: u16,
}

/// IPv6's quote as the data path reads it: 16-bit words in network order, as the frame holds
/// them (its IPv6 header is only 2-aligned after Ethernet's, and byte by byte would take twice
/// the loads, more than the stack can spill).
pub type Quote6 = [u16; QUOTED_LEN6 / 2];
/// A "packet too big"'s headers, as words the same way.
pub type PacketTooBigHeaders = [u16; PACKET_TOO_BIG_HEADERS_LEN / 2];

/// What a "packet too big" is built from: the MACs of the frame it answers, its quote (the
/// packet as its sender sent it, whose source is where the answer goes), and the MTU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TooBig6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub mtu: u16,
}

/// The Ethernet, IPv4 and ICMP headers of the "fragmentation needed" that answers `t`, sent
/// back the way it came, from the address it was sent to; the quote (QUOTED_LEN bytes of the
/// packet as it arrived) follows them. The data path leaves the quote where it is and writes
/// these in front of it.
#[inline(always)]
pub fn frag_needed_headers(t: &TooBig) -> [u8; FRAG_NEEDED_HEADERS_LEN] {
    let mut f = [0u8; FRAG_NEEDED_HEADERS_LEN];
    f[0..6].copy_from_slice(&t.src_mac);
    f[6..12].copy_from_slice(&t.dst_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = TOS_INTERNETWORK_CONTROL;
    ip[2..4].copy_from_slice(&((FRAG_NEEDED_FRAME_LEN - 14) as u16).to_be_bytes());
    ip[8] = TTL;
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&t.dst_addr);
    ip[16..20].copy_from_slice(&t.src_addr);
    let ip_check = !fold(sum_words(ip, 0));
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let icmp = &mut f[34..];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[6..8].copy_from_slice(&t.mtu.to_be_bytes());
    let icmp_check = !fold(sum_words(icmp, t.quote_sum));
    icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
    f
}

/// The one's-complement sum of network-order words, added to `sum` (not folded).
#[inline(always)]
fn sum_be_words(words: &[u16], mut sum: u32) -> u32 {
    let mut i = 0;
    while i < words.len() {
        sum += u32::from(u16::from_be(words[i]));
        i += 1;
    }
    sum
}

/// A MAC's three words as the frame holds them.
#[inline(always)]
fn mac_words(mac: [u8; 6]) -> [u16; 3] {
    [
        u16::from_ne_bytes([mac[0], mac[1]]),
        u16::from_ne_bytes([mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    ]
}

/// The Ethernet, IPv6 and ICMPv6 headers of the "packet too big" that answers `t` and `quote`,
/// as `frag_needed_headers` lays out IPv4's: sent back from the address the packet was sent
/// to, the quote following them. The checksum covers IPv6's pseudo-header. Written into `f`
/// (the frame itself, in the data path: its stack cannot hold the headers beside the rest).
#[inline(always)]
pub fn write_packet_too_big_headers(f: &mut PacketTooBigHeaders, t: &TooBig6, quote: &Quote6) {
    const ICMP_LEN: u16 = (PACKET_TOO_BIG_FRAME_LEN - 14 - 40) as u16;
    let (to, from) = (mac_words(t.src_mac), mac_words(t.dst_mac));
    f[0..3].copy_from_slice(&to);
    f[3..6].copy_from_slice(&from);
    f[6] = 0x86ddu16.to_be();
    // Version 6, no traffic class or flow label; the length; ICMPv6 and the hop limit.
    f[7] = 0x6000u16.to_be();
    f[8] = 0;
    f[9] = ICMP_LEN.to_be();
    f[10] = u16::from_be_bytes([IPPROTO_ICMPV6, TTL]).to_be();
    // From the quoted packet's destination (words 12..20 of the quote) to its source (4..12).
    f[11..19].copy_from_slice(&quote[12..20]);
    f[19..27].copy_from_slice(&quote[4..12]);
    f[27] = u16::from_be_bytes([ICMPV6_PACKET_TOO_BIG, 0]).to_be();
    f[28] = 0;
    f[29] = 0;
    f[30] = t.mtu.to_be();
    let pseudo = sum_be_words(&f[11..27], u32::from(ICMP_LEN) + u32::from(IPPROTO_ICMPV6));
    let sum = sum_be_words(quote, sum_be_words(&f[27..31], pseudo));
    f[28] = (!fold(sum)).to_be();
}

/// `quote`, the first QUOTED_LEN bytes of a packet the balancer has rewritten, made what its
/// sender sent: the addresses and ports of `original`, the IPv4 checksum recomputed and a UDP
/// checksum updated to match (TCP's is not quoted; the rest of the quote is not rewritten).
#[inline(always)]
pub fn restore_quote(quote: &mut [u8; QUOTED_LEN], original: &FlowKey) {
    let (src, dst) = (original.src_addr.to_bytes(), original.dst_addr.to_bytes());
    let (sport, dport) = (original.src_port.to_bytes(), original.dst_port.to_bytes());
    let new = [
        [src[0], src[1]],
        [src[2], src[3]],
        [dst[0], dst[1]],
        [dst[2], dst[3]],
        sport,
        dport,
    ];
    // RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m') over every changed word.
    let mut udp_sum = u32::from(!u16::from_be_bytes([quote[26], quote[27]]));
    let mut i = 0;
    while i < new.len() {
        // Addresses at 12..20, then the ports at 20..24: six consecutive words.
        let at = 12 + 2 * i;
        let old = u16::from_be_bytes([quote[at], quote[at + 1]]);
        udp_sum += u32::from(!old) + u32::from(u16::from_be_bytes(new[i]));
        quote[at] = new[i][0];
        quote[at + 1] = new[i][1];
        i += 1;
    }
    quote[10] = 0;
    quote[11] = 0;
    let ip_check = !fold(sum_words(&quote[..20], 0));
    quote[10..12].copy_from_slice(&ip_check.to_be_bytes());
    // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent as 0xffff.
    if quote[9] == IPPROTO_UDP && (quote[26], quote[27]) != (0, 0) {
        let udp_check = match !fold(udp_sum) {
            0 => 0xffff,
            check => check,
        };
        quote[26..28].copy_from_slice(&udp_check.to_be_bytes());
    }
}

/// The one's-complement sum of `quote`'s big-endian 16-bit words, unfolded.
#[inline(always)]
pub fn quote_sum(quote: &[u8; QUOTED_LEN]) -> u32 {
    sum_words(quote, 0)
}

/// `restore_quote` for IPv6: the quote's addresses and ports those of `original`, a UDP
/// checksum updated to match (IPv6 has no header checksum; TCP's is not quoted).
#[inline(always)]
pub fn restore_quote6(quote: &mut Quote6, original: &FlowKey6) {
    // Addresses at words 4..20, then the ports: eighteen words, each changed word adding its
    // complement (0xffff minus it) and its new value (RFC 1624, eqn. 3).
    let old_sum = sum_be_words(&quote[4..22], 0);
    let (src, dst) = (original.src_addr.to_bytes(), original.dst_addr.to_bytes());
    let mut i = 0;
    while i < 8 {
        quote[4 + i] = u16::from_ne_bytes([src[2 * i], src[2 * i + 1]]);
        quote[12 + i] = u16::from_ne_bytes([dst[2 * i], dst[2 * i + 1]]);
        i += 1;
    }
    quote[20] = original.src_port.0;
    quote[21] = original.dst_port.0;
    let old_check = u16::from_be(quote[23]);
    let next_header = quote[3].to_ne_bytes()[0];
    if next_header == IPPROTO_UDP && old_check != 0 {
        let sum = u32::from(!old_check) + 18 * 0xffff - old_sum + sum_be_words(&quote[4..22], 0);
        let udp_check = match !fold(sum) {
            0 => 0xffff,
            check => check,
        };
        quote[23] = udp_check.to_be();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Be16, Be32};

    /// A frame from 02:..:02 to 02:..:01, 198.18.0.2:40000 -> 198.18.100.1:80, TCP, DF, with a
    /// correct IPv4 header checksum: its first 14 + QUOTED_LEN bytes.
    fn input() -> [u8; 14 + QUOTED_LEN] {
        let mut f = [0u8; 14 + QUOTED_LEN];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&1500u16.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 63;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[198, 18, 0, 2]);
        ip[16..20].copy_from_slice(&[198, 18, 100, 1]);
        let check = !fold(sum_words(ip, 0));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[38..42].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        f
    }

    /// The whole answer to `input`, as the data path lays it out: the headers, then the quote.
    fn frame(input: &[u8; 14 + QUOTED_LEN], mtu: u16) -> [u8; FRAG_NEEDED_FRAME_LEN] {
        let part = |from: usize, to: usize| &input[from..to];
        let mut quote = [0u8; QUOTED_LEN];
        quote.copy_from_slice(part(14, 14 + QUOTED_LEN));
        let mut t = TooBig {
            quote_sum: quote_sum(&quote),
            mtu,
            ..TooBig::default()
        };
        t.src_mac.copy_from_slice(part(6, 12));
        t.dst_mac.copy_from_slice(part(0, 6));
        t.src_addr.copy_from_slice(part(26, 30));
        t.dst_addr.copy_from_slice(part(30, 34));
        let mut f = [0u8; FRAG_NEEDED_FRAME_LEN];
        f[..FRAG_NEEDED_HEADERS_LEN].copy_from_slice(&frag_needed_headers(&t));
        f[FRAG_NEEDED_HEADERS_LEN..].copy_from_slice(&quote);
        f
    }

    fn checksum_ok(bytes: &[u8]) -> bool {
        fold(sum_words(bytes, 0)) == 0xffff
    }

    #[test]
    fn frag_needed_goes_back_from_the_destination_with_the_mtu_and_the_quote() {
        let f = frame(&input(), 1400);
        assert_eq!(f.len(), FRAG_NEEDED_FRAME_LEN);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 2], "to the sender's MAC");
        assert_eq!(
            &f[6..12],
            &[2, 0, 0, 0, 0, 1],
            "from the MAC it was sent to"
        );
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[14..34];
        assert_eq!((ip[0], ip[1]), (0x45, 0xc0));
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
        assert_eq!(&ip[4..8], &[0, 0, 0, 0], "id 0, no DF");
        assert_eq!((ip[8], ip[9]), (64, IPPROTO_ICMP));
        assert_eq!(
            &ip[12..16],
            &[198, 18, 100, 1],
            "from the address it was sent to"
        );
        assert_eq!(&ip[16..20], &[198, 18, 0, 2], "to its sender");
        assert!(checksum_ok(ip), "ipv4 header checksum");
        let icmp = &f[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(&icmp[4..6], &[0, 0], "unused");
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1400);
        assert_eq!(
            &icmp[8..],
            &input()[14..],
            "the quote is the packet as it arrived"
        );
        assert!(checksum_ok(icmp), "icmp checksum");
    }

    /// A UDP packet's first QUOTED_LEN bytes, with correct IPv4 and UDP checksums (over the
    /// 8-byte header and `payload`).
    fn udp_quote(key: &FlowKey, payload: &[u8]) -> [u8; QUOTED_LEN] {
        let mut q = [0u8; QUOTED_LEN];
        let udp_len = (8 + payload.len()) as u16;
        q[0] = 0x45;
        q[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        q[6] = 0x40;
        q[8] = 63;
        q[9] = IPPROTO_UDP;
        q[12..16].copy_from_slice(&key.src_addr.to_bytes());
        q[16..20].copy_from_slice(&key.dst_addr.to_bytes());
        let check = !fold(sum_words(&q[..20], 0));
        q[10..12].copy_from_slice(&check.to_be_bytes());
        q[20..22].copy_from_slice(&key.src_port.to_bytes());
        q[22..24].copy_from_slice(&key.dst_port.to_bytes());
        q[24..26].copy_from_slice(&udp_len.to_be_bytes());
        let pseudo = sum_words(&q[12..20], 0) + u32::from(IPPROTO_UDP) + u32::from(udp_len);
        let check = match !fold(sum_words(payload, sum_words(&q[20..28], pseudo))) {
            0 => 0xffff,
            c => c,
        };
        q[26..28].copy_from_slice(&check.to_be_bytes());
        q
    }

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey {
            src_addr: Be32::from_bytes(src),
            dst_addr: Be32::from_bytes(dst),
            src_port: Be16::from_host(sport),
            dst_port: Be16::from_host(dport),
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn a_rewritten_quote_is_restored_to_what_its_sender_sent() {
        let client = key([198, 18, 0, 2], 40000, [198, 18, 100, 1], 53);
        let rewritten = key([198, 18, 1, 1], 20001, [198, 18, 1, 11], 8000);
        for payload in [&b"query"[..], b"", b"\xff\xff\xff\xff", b"another query!"] {
            let mut quote = udp_quote(&rewritten, payload);
            restore_quote(&mut quote, &client);
            assert_eq!(quote, udp_quote(&client, payload), "payload {payload:?}");
        }
    }

    #[test]
    fn a_quote_without_udp_checksum_keeps_none() {
        let client = key([198, 18, 0, 2], 40000, [198, 18, 100, 1], 53);
        let mut quote = udp_quote(&key([198, 18, 1, 1], 20001, [198, 18, 1, 11], 8000), b"q");
        quote[26..28].copy_from_slice(&[0, 0]);
        restore_quote(&mut quote, &client);
        let mut expected = udp_quote(&client, b"q");
        expected[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(quote, expected);
    }

    #[test]
    fn every_mtu_and_quote_gets_a_correct_checksum() {
        for mtu in [68, 576, 1280, 1400, 1499, 9000, 0xffff] {
            for fill in [0x00, 0x7f, 0xff] {
                let mut input = input();
                input[38..42].fill(fill);
                let f = frame(&input, mtu);
                assert!(checksum_ok(&f[34..]), "mtu {mtu}, fill {fill:#x}");
            }
        }
    }

    extern crate std;
    use std::vec::Vec;

    const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const VIP6: [u8; 16] = [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// An IPv6 packet's first QUOTED_LEN6 bytes: from `key`'s source to its destination, with
    /// a UDP checksum over its 8-byte header and `payload`, or TCP's first 8 bytes.
    fn quote6(key: &FlowKey6, payload: &[u8]) -> [u8; QUOTED_LEN6] {
        let mut q = [0u8; QUOTED_LEN6];
        q[0] = 0x60;
        q[6] = key.proto;
        q[7] = 63;
        q[8..24].copy_from_slice(&key.src_addr.to_bytes());
        q[24..40].copy_from_slice(&key.dst_addr.to_bytes());
        q[40..42].copy_from_slice(&key.src_port.to_bytes());
        q[42..44].copy_from_slice(&key.dst_port.to_bytes());
        if key.proto == IPPROTO_UDP {
            let udp_len = (8 + payload.len()) as u16;
            q[4..6].copy_from_slice(&udp_len.to_be_bytes());
            q[44..46].copy_from_slice(&udp_len.to_be_bytes());
            let pseudo = sum_words(&q[8..40], 0) + u32::from(IPPROTO_UDP) + u32::from(udp_len);
            let check = match !fold(sum_words(payload, sum_words(&q[40..48], pseudo))) {
                0 => 0xffff,
                c => c,
            };
            q[46..48].copy_from_slice(&check.to_be_bytes());
        } else {
            q[4..6].copy_from_slice(&1440u16.to_be_bytes());
            q[44..48].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        }
        q
    }

    fn key6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, proto: u8) -> FlowKey6 {
        FlowKey6 {
            src_addr: crate::In6::from_bytes(src),
            dst_addr: crate::In6::from_bytes(dst),
            src_port: Be16::from_host(sport),
            dst_port: Be16::from_host(dport),
            proto,
            _pad: [0; 3],
        }
    }

    /// Bytes as the data path reads them: network-order words.
    fn words<const N: usize>(bytes: &[u8]) -> [u16; N] {
        core::array::from_fn(|i| u16::from_ne_bytes([bytes[2 * i], bytes[2 * i + 1]]))
    }

    fn bytes(words: &[u16]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// The answer to `quote` as the data path lays it out: headers, then the quote.
    fn frame6(quote: &[u8; QUOTED_LEN6], mtu: u16) -> Vec<u8> {
        let t = TooBig6 {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 1],
            mtu,
        };
        let mut headers = [0xeeee; PACKET_TOO_BIG_HEADERS_LEN / 2];
        write_packet_too_big_headers(&mut headers, &t, &words(quote));
        let mut f = bytes(&headers);
        f.extend(quote);
        f
    }

    #[test]
    fn packet_too_big_goes_back_from_the_destination_with_the_mtu_and_the_quote() {
        let quote = quote6(&key6(CLIENT6, 40000, VIP6, 80, 6), b"");
        let f = frame6(&quote, 1280);
        assert_eq!(f.len(), PACKET_TOO_BIG_FRAME_LEN);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 2], "to the sender's MAC");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip = &f[14..54];
        assert_eq!(&ip[0..4], &[0x60, 0, 0, 0]);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56, "8 + the quote");
        assert_eq!((ip[6], ip[7]), (IPPROTO_ICMPV6, 64));
        assert_eq!(&ip[8..24], &VIP6, "from the address it was sent to");
        assert_eq!(&ip[24..40], &CLIENT6, "to its sender");
        let icmp = &f[54..];
        assert_eq!((icmp[0], icmp[1]), (ICMPV6_PACKET_TOO_BIG, 0));
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1280
        );
        assert_eq!(&icmp[8..], &quote[..]);
        // The pseudo-header, laid out as RFC 8200 section 8.1 draws it.
        let mut pseudo = Vec::new();
        pseudo.extend(&ip[8..40]);
        pseudo.extend((icmp.len() as u32).to_be_bytes());
        pseudo.extend([0, 0, 0, IPPROTO_ICMPV6]);
        pseudo.extend(icmp);
        assert!(checksum_ok(&pseudo), "icmpv6 checksum");
    }

    #[test]
    fn every_mtu_and_ipv6_quote_gets_a_correct_checksum() {
        for mtu in [1280, 1400, 1499, 9000, 0xffff] {
            for fill in [0x00, 0x7f, 0xff] {
                let mut quote = quote6(&key6(CLIENT6, 40000, VIP6, 80, 6), b"");
                quote[44..48].fill(fill);
                let f = frame6(&quote, mtu);
                let mut pseudo = f[22..54].to_vec();
                pseudo.extend([0, 0, 0, 56, 0, 0, 0, IPPROTO_ICMPV6]);
                pseudo.extend(&f[54..]);
                assert!(checksum_ok(&pseudo), "mtu {mtu}, fill {fill:#x}");
            }
        }
    }

    #[test]
    fn a_rewritten_ipv6_quote_is_restored_to_what_its_sender_sent() {
        let snat = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let backend = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
        for proto in [IPPROTO_UDP, 6] {
            let client = key6(CLIENT6, 40000, VIP6, 53, proto);
            let rewritten = key6(snat, 20001, backend, 8000, proto);
            for payload in [&b"query"[..], b"", b"\xff\xff\xff\xff", b"another query!"] {
                let mut quote = words(&quote6(&rewritten, payload));
                restore_quote6(&mut quote, &client);
                assert_eq!(
                    bytes(&quote),
                    quote6(&client, payload),
                    "{proto}, {payload:?}"
                );
            }
        }
        let client = key6(CLIENT6, 40000, VIP6, 53, IPPROTO_UDP);
        let mut quote = quote6(&key6(snat, 20001, backend, 8000, IPPROTO_UDP), b"q");
        quote[46..48].copy_from_slice(&[0, 0]);
        let mut quote = words(&quote);
        restore_quote6(&mut quote, &client);
        assert_eq!(quote[23], 0, "no UDP checksum stays none");
    }
}
