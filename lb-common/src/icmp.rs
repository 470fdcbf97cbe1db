//! ICMP the balancer originates or forwards: the "fragmentation needed" that tells a sender its
//! packet is too big for the next hop's MTU (RFC 792, RFC 1191), built whole here so that the
//! data path only copies the frame and tests can check every byte without a kernel; and the
//! per-CPU budgets of ICMP answers.

use crate::{
    FlowKey,
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
}
