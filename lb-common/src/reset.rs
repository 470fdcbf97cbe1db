//! The RST that answers a TCP segment to a VIP with no connection behind it (RFC 9293, 3.10.7.1:
//! a segment to a closed port gets a reset, unless it is one). Without it, a client whose flow
//! expired or whose backend went away retransmits into silence until its own timeout; with it,
//! the client learns at once and reconnects. Built whole here, so the data path only copies the
//! frame, and tests can check every byte without a kernel.

use crate::{
    Address, FlowKeyOf, FlowValueOf,
    conntrack::{TCP_ACK, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_LAST_ACK, TCP_RST, TCP_SYN_RECV},
};

/// IPv4 without options + TCP without options.
pub const RESET_PACKET_LEN: usize = 20 + 20;
/// Ethernet + an RST packet.
pub const RESET_FRAME_LEN: usize = 14 + RESET_PACKET_LEN;
/// IPv6 without extension headers + TCP without options.
pub const RESET6_PACKET_LEN: usize = 40 + 20;
/// Ethernet + an IPv6 RST packet.
pub const RESET6_FRAME_LEN: usize = 14 + RESET6_PACKET_LEN;
/// RSTs each CPU sends per second at most: enough for every client of an expired table to
/// learn within seconds, too few for a spoofed flood to turn the balancer into a reflector.
pub const RESETS_PER_SEC_PER_CPU: u32 = 1000;
const TTL: u8 = 64;
const IPPROTO_TCP: u8 = 6;

/// What the reset is built from: the segment it answers, as it arrived (addresses and ports
/// in network byte order as raw bytes, sequence numbers in host order); `A` is the address,
/// 4 bytes or 16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentOf<A> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub flags: u8,
    pub seq: u32,
    /// The sequence number after the segment (its payload, SYN and FIN count).
    pub seq_end: u32,
    pub ack_seq: u32,
}
pub type Segment = SegmentOf<[u8; 4]>;
pub type Segment6 = SegmentOf<[u8; 16]>;

/// One RST, as IPv4 (IPv6) + TCP: addresses and ports as raw network-order bytes, sequence
/// numbers in host order; `A` is the address, 4 bytes or 16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub seq: u32,
    pub ack_seq: u32,
    /// TCP_RST, with TCP_ACK when `ack_seq` counts.
    pub flags: u8,
}
pub type Reset = ResetOf<[u8; 4]>;
pub type Reset6 = ResetOf<[u8; 16]>;

/// The frame that resets `seg`'s sender, sent back the way `seg` came, or `None` when `seg`
/// must get no answer (it is an RST itself).
///
/// With ACK, the reset takes its sequence number from the acknowledgement: that is exactly
/// what the receiver expects next, so RFC 5961's check accepts it at once rather than with a
/// challenge ACK. Without ACK, it acknowledges the segment instead.
///
/// Inlined at each of the data path's callers (XDP's and tc's): a BPF function of its own
/// would add its frame to the callers' stack chains, which have no room for it.
#[inline(always)]
pub fn reset_frame(seg: &Segment) -> Option<[u8; RESET_FRAME_LEN]> {
    let (seq, ack_seq, flags) = answer_numbers(seg.flags, seg.seq_end, seg.ack_seq)?;
    let mut f = [0u8; RESET_FRAME_LEN];
    f[0..6].copy_from_slice(&seg.src_mac);
    f[6..12].copy_from_slice(&seg.dst_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14..].copy_from_slice(&reset_packet(&Reset {
        src_addr: seg.dst_addr,
        dst_addr: seg.src_addr,
        src_port: seg.dst_port,
        dst_port: seg.src_port,
        seq,
        ack_seq,
        flags,
    }));
    Some(f)
}

/// `reset_frame` for IPv6: the same RST, in IPv6 (hop limit 64, no flow label). Inlined, as
/// `reset_frame`.
#[inline(always)]
pub fn reset_frame6(seg: &Segment6) -> Option<[u8; RESET6_FRAME_LEN]> {
    let (seq, ack_seq, flags) = answer_numbers(seg.flags, seg.seq_end, seg.ack_seq)?;
    let mut f = [0u8; RESET6_FRAME_LEN];
    f[0..6].copy_from_slice(&seg.src_mac);
    f[6..12].copy_from_slice(&seg.dst_mac);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f[14..].copy_from_slice(&reset_packet6(&Reset6 {
        src_addr: seg.dst_addr,
        dst_addr: seg.src_addr,
        src_port: seg.dst_port,
        dst_port: seg.src_port,
        seq,
        ack_seq,
        flags,
    }));
    Some(f)
}

/// The sequence number, acknowledgement and flags of the RST that answers a segment with
/// `flags`, or `None` for an RST (never answered). With ACK, the reset takes its sequence
/// number from the acknowledgement: exactly what the receiver expects next, so RFC 5961's
/// check accepts it at once rather than with a challenge ACK. Without, it acknowledges the
/// segment instead.
#[inline(always)]
fn answer_numbers(flags: u8, seq_end: u32, ack_seq: u32) -> Option<(u32, u32, u8)> {
    if flags & TCP_RST != 0 {
        return None;
    }
    Some(if flags & TCP_ACK != 0 {
        (ack_seq, 0, TCP_RST)
    } else {
        (0, seq_end, TCP_RST | TCP_ACK)
    })
}

/// An RST's 20-byte TCP header into `tcp`, its checksum over `pseudo` (the pseudo-header's
/// sum).
#[inline(always)]
fn write_rst_header(
    tcp: &mut [u8],
    ports: [[u8; 2]; 2],
    seq: u32,
    ack_seq: u32,
    flags: u8,
    pseudo: u32,
) {
    tcp[0..2].copy_from_slice(&ports[0]);
    tcp[2..4].copy_from_slice(&ports[1]);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack_seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    let check = !fold(sum_words(tcp, pseudo));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
}

/// `r` as an IPv4 packet with both checksums.
#[inline(always)]
pub fn reset_packet(r: &Reset) -> [u8; RESET_PACKET_LEN] {
    let mut p = [0u8; RESET_PACKET_LEN];
    let ip = &mut p[0..20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    // ID 0 with DF: an atomic datagram (RFC 6864).
    ip[6] = 0x40;
    ip[8] = TTL;
    ip[9] = IPPROTO_TCP;
    ip[12..16].copy_from_slice(&r.src_addr);
    ip[16..20].copy_from_slice(&r.dst_addr);
    let ip_check = !fold(sum_words(ip, 0));
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let pseudo =
        sum_words(&r.src_addr, 0) + sum_words(&r.dst_addr, 0) + u32::from(IPPROTO_TCP) + 20;
    write_rst_header(
        &mut p[20..40],
        [r.src_port, r.dst_port],
        r.seq,
        r.ack_seq,
        r.flags,
        pseudo,
    );
    p
}

/// `r` as an IPv6 packet with its TCP checksum (over the pseudo-header).
#[inline(always)]
pub fn reset_packet6(r: &Reset6) -> [u8; RESET6_PACKET_LEN] {
    let mut p = [0u8; RESET6_PACKET_LEN];
    let ip = &mut p[0..40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&20u16.to_be_bytes());
    ip[6] = IPPROTO_TCP;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&r.src_addr);
    ip[24..40].copy_from_slice(&r.dst_addr);
    let pseudo =
        sum_words(&r.src_addr, 0) + sum_words(&r.dst_addr, 0) + u32::from(IPPROTO_TCP) + 20;
    write_rst_header(
        &mut p[40..60],
        [r.src_port, r.dst_port],
        r.seq,
        r.ack_seq,
        r.flags,
        pseudo,
    );
    p
}

/// The two RSTs that cut a balanced TCP connection on purpose (a backend removed with `--now`,
/// its grace ended, or marked down under `on_backend_down = "reset"`): one to the client, from
/// the VIP, and one to the backend, from the SNAT address. Each carries the sequence number its
/// receiver expects next (what the other direction has sent, as tracked), so RFC 5961's check
/// takes it at once. `None` when the connection has no one left to tell: half-open (the
/// client's SYN goes elsewhere when retransmitted) or already ended.
pub fn connection_resets<A: Address>(
    forward_key: &FlowKeyOf<A>,
    forward: &FlowValueOf<A>,
    reverse: &FlowValueOf<A>,
) -> Option<[ResetOf<A::Bytes>; 2]> {
    if !matches!(
        forward.state,
        TCP_SYN_RECV | TCP_ESTABLISHED | TCP_FIN_WAIT | TCP_LAST_ACK
    ) || forward_key.proto != IPPROTO_TCP
    {
        return None;
    }
    let to_client = ResetOf {
        src_addr: forward_key.dst_addr.bytes(),
        dst_addr: forward_key.src_addr.bytes(),
        src_port: forward_key.dst_port.to_bytes(),
        dst_port: forward_key.src_port.to_bytes(),
        seq: reverse.seq_next,
        ack_seq: forward.seq_next,
        flags: TCP_RST | TCP_ACK,
    };
    let to_backend = ResetOf {
        src_addr: forward.nat_src_addr.bytes(),
        dst_addr: forward.nat_dst_addr.bytes(),
        src_port: forward.nat_src_port.to_bytes(),
        dst_port: forward.nat_dst_port.to_bytes(),
        seq: forward.seq_next,
        ack_seq: reverse.seq_next,
        flags: TCP_RST | TCP_ACK,
    };
    Some([to_client, to_backend])
}

/// One CPU's allowance of resets: at most `RESETS_PER_SEC_PER_CPU` per one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetBudget {
    pub window_start_ns: u64,
    pub sent: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ResetBudget>() == 16);

impl ResetBudget {
    /// Whether one more reset may go out at `now`; counts it if so.
    #[inline(always)]
    pub fn take(&mut self, now: u64) -> bool {
        self.take_within(now, RESETS_PER_SEC_PER_CPU)
    }

    /// Whether one more answer may go out at `now` within `per_sec` a second (the same budget
    /// for other answers than resets, in maps of their own); counts it if so.
    #[inline(always)]
    pub fn take_within(&mut self, now: u64, per_sec: u32) -> bool {
        if now.wrapping_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now;
            self.sent = 0;
        }
        if self.sent >= per_sec {
            return false;
        }
        self.sent += 1;
        true
    }
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words, added to `sum` (not folded).
/// `bytes` has an even length here.
#[inline(always)]
pub fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// `sum` folded to 16 bits (two folds suffice for sums of a few hundred words).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Be16, Be32, FlowKey, FlowKey6, FlowValue, FlowValue6, In6,
        conntrack::{
            TCP_CLOSED, TCP_FIN, TCP_PSH, TCP_SYN_SENT, TCP_TIME_WAIT, UDP_REPLIED, UDP_UNREPLIED,
        },
    };

    fn segment(flags: u8) -> Segment {
        Segment {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_addr: [198, 18, 1, 2],
            dst_addr: [198, 18, 0, 100],
            src_port: 40000u16.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            flags,
            seq: 1000,
            seq_end: 1010,
            ack_seq: 5000,
        }
    }

    /// The checksum of `bytes` including its checksum field: 0 when the field is right.
    fn verify(bytes: &[u8], pseudo: u32) -> u16 {
        !fold(sum_words(bytes, pseudo))
    }

    #[test]
    fn an_ack_is_answered_with_an_rst_at_its_acknowledgement() {
        let f = reset_frame(&segment(TCP_ACK | TCP_PSH)).expect("an ACK is answered");
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1], "back to the sender's MAC");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&f[26..30], &[198, 18, 0, 100], "from the VIP");
        assert_eq!(&f[30..34], &[198, 18, 1, 2], "to the client");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 80);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 40000);
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), 5000);
        assert_eq!(u32::from_be_bytes([f[42], f[43], f[44], f[45]]), 0);
        assert_eq!(f[47], TCP_RST);
        assert_eq!(
            (f[22], f[20], f[21]),
            (64, 0x40, 0),
            "TTL 64, DF, fragment offset 0"
        );
    }

    #[test]
    fn an_ipv6_segment_is_answered_with_the_same_rst_in_ipv6() {
        let v4 = segment(TCP_ACK | TCP_PSH);
        let client = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let vip = [0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let seg = Segment6 {
            src_mac: v4.src_mac,
            dst_mac: v4.dst_mac,
            src_addr: client,
            dst_addr: vip,
            src_port: v4.src_port,
            dst_port: v4.dst_port,
            flags: v4.flags,
            seq: v4.seq,
            seq_end: v4.seq_end,
            ack_seq: v4.ack_seq,
        };
        let f = reset_frame6(&seg).expect("an ACK is answered");
        let f4 = reset_frame(&v4).expect("an ACK is answered");
        assert_eq!(&f[0..12], &f4[0..12], "back to the sender's MAC");
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(
            &f[14..22],
            &[0x60, 0, 0, 0, 0, 20, 6, 64],
            "version, length 20, TCP, hop limit 64"
        );
        assert_eq!(&f[22..38], &vip, "from the VIP");
        assert_eq!(&f[38..54], &client, "to the client");
        assert_eq!(
            &f[54..70],
            &f4[34..50],
            "ports, numbers and flags as IPv4's"
        );
        let pseudo = sum_words(&client, 0) + sum_words(&vip, 0) + 6 + 20;
        assert_eq!(verify(&f[54..74], pseudo), 0, "TCP checksum");
        let mut rst = seg;
        rst.flags = TCP_RST;
        assert_eq!(reset_frame6(&rst), None, "an RST is not answered");
    }

    #[test]
    fn a_segment_without_ack_is_acknowledged_by_the_rst() {
        let f = reset_frame(&segment(TCP_FIN)).expect("a FIN is answered");
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), 0);
        assert_eq!(u32::from_be_bytes([f[42], f[43], f[44], f[45]]), 1010);
        assert_eq!(f[47], TCP_RST | TCP_ACK);
    }

    #[test]
    fn an_rst_gets_no_answer() {
        assert_eq!(reset_frame(&segment(TCP_RST)), None);
        assert_eq!(reset_frame(&segment(TCP_RST | TCP_ACK)), None);
    }

    #[test]
    fn both_checksums_verify() {
        for flags in [TCP_ACK, TCP_FIN | TCP_ACK, TCP_FIN] {
            let f = reset_frame(&segment(flags)).expect("not an RST: answered");
            assert_eq!(verify(&f[14..34], 0), 0, "IPv4 header checksum");
            let pseudo = sum_words(&f[26..34], 0) + 6 + 20;
            assert_eq!(verify(&f[34..54], pseudo), 0, "TCP checksum");
        }
    }

    fn connection(state: u32) -> (FlowKey, FlowValue, FlowValue) {
        let key = FlowKey {
            src_addr: Be32::from_bytes([198, 18, 1, 2]),
            dst_addr: Be32::from_bytes([198, 18, 0, 100]),
            src_port: Be16::from_host(40000),
            dst_port: Be16::from_host(80),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let forward = FlowValue {
            nat_src_addr: Be32::from_bytes([198, 18, 2, 1]),
            nat_dst_addr: Be32::from_bytes([198, 18, 2, 11]),
            nat_src_port: Be16::from_host(10007),
            nat_dst_port: Be16::from_host(8000),
            seq_next: 1_000_100,
            state,
            ..FlowValue::default()
        };
        let reverse = FlowValue {
            seq_next: 7_000_500,
            state,
            ..FlowValue::default()
        };
        (key, forward, reverse)
    }

    #[test]
    fn a_cut_connection_resets_both_ends_where_they_expect_it() {
        let (key, forward, reverse) = connection(TCP_ESTABLISHED);
        let [client, backend] =
            connection_resets(&key, &forward, &reverse).expect("established: reset");
        let c = reset_packet(&client);
        assert_eq!(
            &c[12..20],
            &[198, 18, 0, 100, 198, 18, 1, 2],
            "VIP -> client"
        );
        assert_eq!(&c[20..24], &[0, 80, 0x9c, 0x40]);
        assert_eq!(
            client.seq, 7_000_500,
            "what the backend sent: the client's next"
        );
        assert_eq!(client.ack_seq, 1_000_100);
        let b = reset_packet(&backend);
        assert_eq!(
            &b[12..20],
            &[198, 18, 2, 1, 198, 18, 2, 11],
            "SNAT -> backend"
        );
        assert_eq!(&b[20..24], &[0x27, 0x17, 0x1f, 0x40], "10007 -> 8000");
        assert_eq!(backend.seq, 1_000_100);
        for p in [c, b] {
            assert_eq!(p[33], TCP_RST | TCP_ACK);
            assert_eq!(verify(&p[0..20], 0), 0);
            assert_eq!(verify(&p[20..40], sum_words(&p[12..20], 0) + 6 + 20), 0);
        }
    }

    /// The same cut over IPv6: both RSTs whole IPv6 packets (the raw socket sends its own
    /// header), their checksums over the pseudo-header.
    #[test]
    fn a_cut_ipv6_connection_resets_both_ends_where_they_expect_it() {
        let (key, forward, reverse) = connection(TCP_ESTABLISHED);
        let v6 = |a: Be32| {
            let [_, _, c, d] = a.to_bytes();
            In6::from_bytes([0xfd, 0, 0, c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, d])
        };
        let key = FlowKey6 {
            src_addr: v6(key.src_addr),
            dst_addr: v6(key.dst_addr),
            src_port: key.src_port,
            dst_port: key.dst_port,
            proto: key.proto,
            _pad: [0; 3],
        };
        let forward = FlowValue6 {
            nat_src_addr: v6(forward.nat_src_addr),
            nat_dst_addr: v6(forward.nat_dst_addr),
            nat_src_port: forward.nat_src_port,
            nat_dst_port: forward.nat_dst_port,
            seq_next: forward.seq_next,
            state: forward.state,
            ..FlowValue6::default()
        };
        let reverse = FlowValue6 {
            seq_next: reverse.seq_next,
            state: reverse.state,
            ..FlowValue6::default()
        };
        let [client, backend] =
            connection_resets(&key, &forward, &reverse).expect("established: reset");
        let c = reset_packet6(&client);
        assert_eq!(&c[0..8], &[0x60, 0, 0, 0, 0, 20, IPPROTO_TCP, 64]);
        assert_eq!(
            &c[8..24],
            &v6(Be32::from_bytes([0, 0, 0, 100])).to_bytes(),
            "from the VIP"
        );
        assert_eq!(&c[24..40], &key.src_addr.to_bytes(), "to the client");
        assert_eq!(&c[40..44], &[0, 80, 0x9c, 0x40]);
        assert_eq!((client.seq, client.ack_seq), (7_000_500, 1_000_100));
        let b = reset_packet6(&backend);
        assert_eq!(
            &b[8..24],
            &forward.nat_src_addr.to_bytes(),
            "from the SNAT address"
        );
        assert_eq!(
            &b[24..40],
            &forward.nat_dst_addr.to_bytes(),
            "to the backend"
        );
        assert_eq!(&b[40..44], &[0x27, 0x17, 0x1f, 0x40], "10007 -> 8000");
        for p in [c, b] {
            assert_eq!(p[53], TCP_RST | TCP_ACK);
            let pseudo = sum_words(&p[8..40], 0) + 6 + 20;
            assert_eq!(verify(&p[40..60], pseudo), 0, "TCP checksum");
        }
    }

    #[test]
    fn only_connections_with_two_ends_are_reset() {
        for state in [TCP_SYN_RECV, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_LAST_ACK] {
            let (key, forward, reverse) = connection(state);
            assert!(
                connection_resets(&key, &forward, &reverse).is_some(),
                "{state}"
            );
        }
        for state in [
            TCP_SYN_SENT,
            TCP_TIME_WAIT,
            TCP_CLOSED,
            UDP_UNREPLIED,
            UDP_REPLIED,
        ] {
            let (key, forward, reverse) = connection(state);
            assert_eq!(connection_resets(&key, &forward, &reverse), None, "{state}");
        }
        let (mut key, forward, reverse) = connection(TCP_ESTABLISHED);
        key.proto = 17;
        assert_eq!(connection_resets(&key, &forward, &reverse), None, "UDP");
    }

    #[test]
    fn the_budget_allows_a_thousand_a_second_per_cpu() {
        let mut budget = ResetBudget::default();
        let start = 5_000_000_000;
        let sent = (0..1500)
            .filter(|i| budget.take(start + i * 100_000))
            .count();
        assert_eq!(sent, RESETS_PER_SEC_PER_CPU as usize);
        assert!(!budget.take(start + 999_999_999));
        assert!(budget.take(start + 1_000_000_000), "a new window starts");
    }
}
