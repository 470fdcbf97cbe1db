//! Frames for packet fixtures: a builder of Ethernet/IPv4 or IPv6/TCP/UDP frames, and a
//! checker that recomputes their checksums. Reads and writes no maps.
//!
//! Every checksum here is computed from scratch (RFC 791/793/768): the one's-complement sum over
//! the whole IPv4 header, or over pseudo-header, L4 header and payload. The data path updates
//! checksums incrementally (RFC 1624); a second, different computation is what lets a fixture
//! catch an error there rather than repeat it.
//!
//! Builder, checker, `describe`/`diff` and their tests share one header layout, so they stay in
//! one module although it runs well past ~400 lines.

use std::net::{Ipv4Addr, Ipv6Addr};

/// An Ethernet address, in wire order.
pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6's hop-by-hop options header, as a next-header value.
pub const IPV6_HOP_BY_HOP: u8 = 0;
/// IPv6's fragment header, as a next-header value.
pub const IPV6_FRAGMENT: u8 = 44;

pub use lb_common::conntrack::{
    TCP_ACK, TCP_CWR, TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG,
};

const ETH_HLEN: usize = 14;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN_MIN: usize = 20;
const UDP_HLEN: usize = 8;
/// IHL and TCP data offset are 4-bit counts of 32-bit words: at most 40 bytes of options.
const OPTIONS_LEN_MAX: usize = 40;

const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Offsets of the checksum fields within their own headers.
const IPV4_CSUM_AT: usize = 10;
const TCP_CSUM_AT: usize = 16;
const UDP_CSUM_AT: usize = 6;

/// Starts a frame: zero MAC addresses and nothing above Ethernet until `ipv4`/`tcp`/... say so.
pub fn pkt() -> PacketBuilder {
    PacketBuilder::default()
}

/// A frame under construction; `build` renders it.
///
/// Setters may come in any order (`.syn()` before `.tcp(..)` works): every field has a default
/// and a layer appears once its constructor (`ipv4`, `tcp`, `udp`, `ip_proto`) has been called.
/// The Ethernet header is always there.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a builder makes no frame until build()"]
pub struct PacketBuilder {
    src_mac: Mac,
    dst_mac: Mac,
    ethertype: Option<u16>,
    ipv4: Option<(Ipv4Addr, Ipv4Addr)>,
    ipv6: Option<(Ipv6Addr, Ipv6Addr)>,
    /// IPv6: an empty hop-by-hop options header before the L4 one.
    hop_by_hop: bool,
    /// IPv6: a fragment header (more fragments, offset in 8-byte units, identification)
    /// before the L4 one, after the hop-by-hop header if both are asked for.
    fragment6: Option<(bool, u16, u32)>,
    /// IPv6: the flow label (its low 20 bits).
    flow_label: u32,
    tos: u8,
    ttl: u8,
    ip_id: u16,
    /// Flags and fragment offset exactly as on the wire.
    ip_frag: u16,
    ip_options: Vec<u8>,
    l4: L4,
    seq: u32,
    ack_seq: u32,
    window: u16,
    tcp_flags: u8,
    tcp_options: Vec<u8>,
    udp_checksum: bool,
    payload: Vec<u8>,
}

/// What follows the IPv4 header; the payload comes after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    None,
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP: type, code and the header's second word (an echo's id and sequence number).
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
    Raw(u8),
}

impl Default for PacketBuilder {
    fn default() -> Self {
        Self {
            src_mac: [0; 6],
            dst_mac: [0; 6],
            ethertype: None,
            ipv4: None,
            ipv6: None,
            hop_by_hop: false,
            fragment6: None,
            flow_label: 0,
            tos: 0,
            ttl: 64,
            ip_id: 0x1234,
            ip_frag: IP_DF,
            ip_options: Vec::new(),
            l4: L4::None,
            seq: 1000,
            ack_seq: 0,
            window: 64240,
            tcp_flags: 0,
            tcp_options: Vec::new(),
            udp_checksum: true,
            payload: Vec::new(),
        }
    }
}

impl PacketBuilder {
    pub fn eth(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Overrides the ethertype (0x0800 otherwise), whatever follows; an IPv4 header behind
    /// `ETH_P_8021Q` makes a frame the data path must not take for IPv4.
    pub fn ethertype(mut self, t: u16) -> Self {
        self.ethertype = Some(t);
        self
    }

    pub fn ipv4(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.ipv4 = Some((src, dst));
        self
    }

    /// An IPv6 header instead of IPv4's (`ttl` is its hop limit, `tos` its traffic class).
    pub fn ipv6(mut self, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        self.ipv6 = Some((src, dst));
        self
    }

    /// IPv6: an empty hop-by-hop options header between the IPv6 header and the L4 one.
    pub fn hop_by_hop(mut self) -> Self {
        self.hop_by_hop = true;
        self
    }

    /// IPv6: makes this a fragment (RFC 8200, 4.5): a fragment header with M, the offset and
    /// the identification. The L4 checksum is computed over this fragment's part alone.
    pub fn fragment6(mut self, more_fragments: bool, offset_8byte_units: u16, id: u32) -> Self {
        assert!(
            offset_8byte_units <= IP_OFFSET_MASK,
            "fragment offset {offset_8byte_units} does not fit 13 bits"
        );
        self.fragment6 = Some((more_fragments, offset_8byte_units, id));
        self
    }

    /// IPv6: the flow label (the low 20 bits of `label`).
    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label & 0xf_ffff;
        self
    }

    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    pub fn ttl(mut self, t: u8) -> Self {
        self.ttl = t;
        self
    }

    pub fn ip_id(mut self, id: u16) -> Self {
        self.ip_id = id;
        self
    }

    /// Sets or clears Don't Fragment, leaving MF and the offset alone.
    pub fn df(mut self, on: bool) -> Self {
        self.ip_frag = if on {
            self.ip_frag | IP_DF
        } else {
            self.ip_frag & !IP_DF
        };
        self
    }

    /// Raw IPv4 options, padded with EOL (zero) bytes to a multiple of 4.
    pub fn ip_options(mut self, opts: &[u8]) -> Self {
        self.ip_options = pad_options(opts);
        self
    }

    /// Makes this a fragment. Clears DF, since a datagram that was fragmented cannot have had
    /// it; `.df(true)` afterwards builds the contradiction on purpose.
    pub fn fragment(mut self, more_fragments: bool, offset_8byte_units: u16) -> Self {
        assert!(
            offset_8byte_units <= IP_OFFSET_MASK,
            "fragment offset {offset_8byte_units} does not fit 13 bits"
        );
        self.ip_frag = if more_fragments { IP_MF } else { 0 } | offset_8byte_units;
        self
    }

    /// Any IP protocol, with the payload as its raw bytes (no header, no checksum filled in).
    pub fn ip_proto(mut self, p: u8) -> Self {
        self.l4 = L4::Raw(p);
        self
    }

    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Tcp { sport, dport };
        self
    }

    pub fn syn(self) -> Self {
        self.with_tcp_flag(TCP_SYN)
    }

    pub fn ack(self) -> Self {
        self.with_tcp_flag(TCP_ACK)
    }

    pub fn fin(self) -> Self {
        self.with_tcp_flag(TCP_FIN)
    }

    pub fn rst(self) -> Self {
        self.with_tcp_flag(TCP_RST)
    }

    pub fn psh(self) -> Self {
        self.with_tcp_flag(TCP_PSH)
    }

    /// Replaces all eight TCP flag bits (`TCP_*`), for combinations the named setters lack.
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    fn with_tcp_flag(mut self, flag: u8) -> Self {
        self.tcp_flags |= flag;
        self
    }

    pub fn seq(mut self, s: u32) -> Self {
        self.seq = s;
        self
    }

    pub fn ack_seq(mut self, s: u32) -> Self {
        self.ack_seq = s;
        self
    }

    pub fn window(mut self, w: u16) -> Self {
        self.window = w;
        self
    }

    /// Raw TCP options, padded with EOL (zero) bytes to a multiple of 4.
    pub fn tcp_options(mut self, opts: &[u8]) -> Self {
        self.tcp_options = pad_options(opts);
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Udp { sport, dport };
        self
    }

    /// Leaves the UDP checksum field 0, "not computed", which IPv4 allows (RFC 768).
    pub fn udp_no_checksum(mut self) -> Self {
        self.udp_checksum = false;
        self
    }

    /// ICMP of `kind` and `code`, the header's second word `rest`, with its checksum.
    pub fn icmp(mut self, kind: u8, code: u8, rest: [u8; 4]) -> Self {
        self.l4 = L4::Icmp { kind, code, rest };
        self
    }

    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// The whole frame, lengths and checksums filled in. `icmp` over IPv6 is ICMPv6, its
    /// checksum over the pseudo-header.
    pub fn build(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HLEN + 60 + 60 + self.payload.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        let default_type = if self.ipv6.is_some() {
            ETH_P_IPV6
        } else {
            ETH_P_IP
        };
        frame.extend_from_slice(&self.ethertype.unwrap_or(default_type).to_be_bytes());
        if let Some((src, dst)) = self.ipv6 {
            let (proto, segment) =
                self.build_l4(&|proto, len| pseudo_header6(src, dst, proto, len));
            frame.extend(self.build_ipv6_header(src, dst, proto, segment.len()));
            frame.extend(segment);
            return frame;
        }
        let Some((src, dst)) = self.ipv4 else {
            assert!(self.l4 == L4::None, "tcp/udp/ip_proto need ipv4() as well");
            frame.extend_from_slice(&self.payload);
            return frame;
        };
        let (proto, segment) = self.build_l4(&|proto, len| pseudo_header(src, dst, proto, len));
        frame.extend(self.build_ipv4_header(src, dst, proto, segment.len()));
        frame.extend(segment);
        frame
    }

    /// The IPv6 header (and the hop-by-hop header, if asked for) before `body_len` bytes of
    /// `proto`.
    fn build_ipv6_header(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        proto: u8,
        body_len: usize,
    ) -> Vec<u8> {
        let mut extension = Vec::new();
        let after_hop_by_hop = if self.fragment6.is_some() {
            IPV6_FRAGMENT
        } else {
            proto
        };
        if self.hop_by_hop {
            // Next header, length 0 (8 bytes), a PadN option of 4 bytes.
            extension.extend([after_hop_by_hop, 0, 1, 4, 0, 0, 0, 0]);
        }
        if let Some((more, offset, id)) = self.fragment6 {
            extension.extend([proto, 0]);
            extension.extend(((offset << 3) | u16::from(more)).to_be_bytes());
            extension.extend(id.to_be_bytes());
        }
        let payload_len = u16::try_from(extension.len() + body_len)
            .expect("an IPv6 payload length must fit 16 bits");
        let mut header = Vec::with_capacity(IPV6_HLEN + extension.len());
        header.push(0x60 | (self.tos >> 4));
        header.push((self.tos << 4) | (self.flow_label >> 16) as u8);
        header.extend((self.flow_label as u16).to_be_bytes());
        header.extend(payload_len.to_be_bytes());
        header.push(if self.hop_by_hop {
            IPV6_HOP_BY_HOP
        } else {
            after_hop_by_hop
        });
        header.push(self.ttl);
        header.extend(src.octets());
        header.extend(dst.octets());
        header.extend(extension);
        header
    }

    fn build_ipv4_header(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        body_len: usize,
    ) -> Vec<u8> {
        let hlen = IPV4_HLEN_MIN + self.ip_options.len();
        let total_len = u16::try_from(hlen + body_len).expect("IPv4 total length must fit 16 bits");
        let mut header = Vec::with_capacity(hlen);
        header.push(0x40 | (hlen / 4) as u8);
        header.push(self.tos);
        header.extend(total_len.to_be_bytes());
        header.extend(self.ip_id.to_be_bytes());
        header.extend(self.ip_frag.to_be_bytes());
        header.push(self.ttl);
        header.push(proto);
        header.extend([0, 0]);
        header.extend(src.octets());
        header.extend(dst.octets());
        header.extend(&self.ip_options);
        let csum = checksum(&header);
        put_u16(&mut header, IPV4_CSUM_AT, csum);
        header
    }

    /// The IP protocol number and everything after the IP header; `pseudo` gives the
    /// checksums' pseudo header for a protocol and a segment length.
    fn build_l4(&self, pseudo: &dyn Fn(u8, usize) -> Vec<u8>) -> (u8, Vec<u8>) {
        match self.l4 {
            // Protocol 0 is reserved in IPv4: a frame nothing will mistake for TCP or UDP.
            L4::None => (0, self.payload.clone()),
            L4::Raw(proto) => (proto, self.payload.clone()),
            L4::Icmp { kind, code, rest } => {
                let mut message = vec![kind, code, 0, 0];
                message.extend(rest);
                message.extend(&self.payload);
                if self.ipv6.is_some() {
                    let csum = l4_checksum(&pseudo(IPPROTO_ICMPV6, message.len()), &message);
                    put_u16(&mut message, 2, csum);
                    return (IPPROTO_ICMPV6, message);
                }
                let csum = checksum(&message);
                put_u16(&mut message, 2, csum);
                (IPPROTO_ICMP, message)
            }
            L4::Tcp { sport, dport } => {
                let hlen = TCP_HLEN_MIN + self.tcp_options.len();
                let mut seg = Vec::with_capacity(hlen + self.payload.len());
                seg.extend(sport.to_be_bytes());
                seg.extend(dport.to_be_bytes());
                seg.extend(self.seq.to_be_bytes());
                seg.extend(self.ack_seq.to_be_bytes());
                seg.push(((hlen / 4) as u8) << 4);
                seg.push(self.tcp_flags);
                seg.extend(self.window.to_be_bytes());
                seg.extend([0, 0, 0, 0]); // checksum, urgent pointer
                seg.extend(&self.tcp_options);
                seg.extend(&self.payload);
                let csum = l4_checksum(&pseudo(IPPROTO_TCP, seg.len()), &seg);
                put_u16(&mut seg, TCP_CSUM_AT, csum);
                (IPPROTO_TCP, seg)
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(UDP_HLEN + self.payload.len())
                    .expect("UDP length must fit 16 bits");
                let mut seg = Vec::with_capacity(usize::from(len));
                seg.extend(sport.to_be_bytes());
                seg.extend(dport.to_be_bytes());
                seg.extend(len.to_be_bytes());
                seg.extend([0, 0]);
                seg.extend(&self.payload);
                if self.udp_checksum {
                    let csum =
                        udp_wire_checksum(l4_checksum(&pseudo(IPPROTO_UDP, seg.len()), &seg));
                    put_u16(&mut seg, UDP_CSUM_AT, csum);
                }
                (IPPROTO_UDP, seg)
            }
        }
    }
}

fn pad_options(opts: &[u8]) -> Vec<u8> {
    let mut padded = opts.to_vec();
    padded.resize(opts.len().next_multiple_of(4), 0);
    assert!(
        padded.len() <= OPTIONS_LEN_MAX,
        "{} bytes of options exceed the {OPTIONS_LEN_MAX} a header can carry",
        padded.len()
    );
    padded
}

fn put_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// The Internet checksum of `data`: one's complement of the one's-complement sum of its 16-bit
/// big-endian words, an odd last byte padded with a zero.
pub fn checksum(data: &[u8]) -> u16 {
    let (words, rest) = data.as_chunks::<2>();
    // Carries are folded once at the end; a u64 cannot overflow on any frame.
    let mut sum: u64 = words
        .iter()
        .map(|w| u64::from(u16::from_be_bytes(*w)))
        .sum();
    if let [last] = rest {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checksum of a TCP or UDP segment with its checksum field zeroed, over its pseudo-header and
/// the segment.
fn l4_checksum(pseudo: &[u8], segment: &[u8]) -> u16 {
    let mut data = pseudo.to_vec();
    data.extend(segment);
    checksum(&data)
}

/// IPv4's pseudo-header: source, destination, zero, protocol, segment length.
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let len = u16::try_from(len).expect("an IPv4 payload fits 16 bits");
    let mut data = Vec::with_capacity(12);
    data.extend(src.octets());
    data.extend(dst.octets());
    data.extend([0, proto]);
    data.extend(len.to_be_bytes());
    data
}

/// IPv6's pseudo-header (RFC 8200, 8.1): source, destination, 32-bit upper-layer length, three
/// zero bytes and the next header.
fn pseudo_header6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let len = u32::try_from(len).expect("an IPv6 payload fits 32 bits");
    let mut data = Vec::with_capacity(40);
    data.extend(src.octets());
    data.extend(dst.octets());
    data.extend(len.to_be_bytes());
    data.extend([0, 0, 0, proto]);
    data
}

/// RFC 768: a computed 0 goes on the wire as all ones, because 0 there means "no checksum".
fn udp_wire_checksum(computed: u16) -> u16 {
    if computed == 0 { 0xffff } else { computed }
}

/// Checks the IPv4 header checksum and the TCP or UDP checksum of `frame` against a full
/// recomputation; `Err` says which is wrong, or why the frame could not be checked.
///
/// Strict: a checksum must equal the recomputed value, so 0xffff where 0x0000 is due fails
/// although receivers take either. RFC 1624 eqn. 3 never produces it; eqn. 2 does, and that is
/// the bug this catches. A UDP checksum of 0 means none and passes. Fragments get only the
/// header check (their L4 checksum covers the reassembled datagram); other protocols have no
/// L4 checksum checked, and a frame that is not IPv4 is an `Err`.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let zeroed = |bytes: &[u8], at: usize| {
        let mut copy = bytes.to_vec();
        put_u16(&mut copy, at, 0);
        copy
    };
    let ip = if read_u16(frame, 12) == Some(ETH_P_IPV6) {
        parse_ipv6(frame)?
    } else {
        let ip = parse_ipv4(frame)?;
        compare(
            "ipv4 header",
            checksum(&zeroed(ip.header, IPV4_CSUM_AT)),
            read_u16(ip.header, IPV4_CSUM_AT),
        )?;
        if ip.is_fragment() {
            return Ok(());
        }
        ip
    };
    match ip.proto {
        IPPROTO_TCP => {
            let seg = ip.body;
            let data_offset = seg
                .get(12)
                .map(|b| usize::from(b >> 4) * 4)
                .ok_or_else(|| {
                    format!(
                        "{}-byte tcp segment is shorter than a tcp header ({TCP_HLEN_MIN})",
                        seg.len()
                    )
                })?;
            if data_offset < TCP_HLEN_MIN || data_offset > seg.len() {
                return Err(format!(
                    "tcp data offset {data_offset} bytes does not fit the {}-byte segment",
                    seg.len()
                ));
            }
            let expected = l4_checksum(&ip.pseudo(IPPROTO_TCP), &zeroed(seg, TCP_CSUM_AT));
            compare("tcp", expected, read_u16(seg, TCP_CSUM_AT))
        }
        IPPROTO_UDP => {
            let seg = ip.body;
            let len = read_u16(seg, 4).map(usize::from).ok_or_else(|| {
                format!(
                    "{}-byte udp datagram is shorter than a udp header ({UDP_HLEN})",
                    seg.len()
                )
            })?;
            if len < UDP_HLEN {
                return Err(format!(
                    "udp length {len} is below the header length {UDP_HLEN}"
                ));
            }
            if len != seg.len() {
                return Err(format!(
                    "udp length {len} disagrees with the ipv4 payload length {}",
                    seg.len()
                ));
            }
            let found = read_u16(seg, UDP_CSUM_AT);
            if found == Some(0) {
                return Ok(());
            }
            let expected = udp_wire_checksum(l4_checksum(
                &ip.pseudo(IPPROTO_UDP),
                &zeroed(seg, UDP_CSUM_AT),
            ));
            compare("udp", expected, found)
        }
        IPPROTO_ICMP if ip.body.len() >= 4 => {
            compare("icmp", checksum(&zeroed(ip.body, 2)), read_u16(ip.body, 2))
        }
        IPPROTO_ICMPV6 if ip.body.len() >= 4 => compare(
            "icmpv6",
            l4_checksum(&ip.pseudo(IPPROTO_ICMPV6), &zeroed(ip.body, 2)),
            read_u16(ip.body, 2),
        ),
        _ => Ok(()),
    }
}

fn compare(what: &str, expected: u16, found: Option<u16>) -> Result<(), String> {
    match found {
        Some(found) if found == expected => Ok(()),
        Some(found) => Err(format!(
            "{what} checksum is wrong: expected {expected:#06x}, found {found:#06x}"
        )),
        None => Err(format!("{what} checksum field is missing")),
    }
}

/// An IP packet inside a frame, its lengths already checked against the frame.
struct IpView<'a> {
    /// IHL * 4 bytes, options included (IPv6: the fixed header).
    header: &'a [u8],
    /// Up to the total length; Ethernet padding after it is left out.
    body: &'a [u8],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: u8,
    frag: u16,
}

impl IpView<'_> {
    fn is_fragment(&self) -> bool {
        self.frag & (IP_MF | IP_OFFSET_MASK) != 0
    }

    /// The pseudo header of the body, as `proto`.
    fn pseudo(&self, proto: u8) -> Vec<u8> {
        use std::net::IpAddr::{V4, V6};
        match (self.src, self.dst) {
            (V4(src), V4(dst)) => pseudo_header(src, dst, proto, self.body.len()),
            (V6(src), V6(dst)) => pseudo_header6(src, dst, proto, self.body.len()),
            _ => unreachable!("one header holds addresses of one family"),
        }
    }
}

/// An IPv6 packet whose TCP or UDP header follows the fixed header (no extension headers).
fn parse_ipv6(frame: &[u8]) -> Result<IpView<'_>, String> {
    let ip = frame.get(ETH_HLEN..).unwrap_or_default();
    let Some(fixed) = ip.get(..IPV6_HLEN) else {
        return Err(format!(
            "{} bytes after ethernet are shorter than an ipv6 header ({IPV6_HLEN})",
            ip.len()
        ));
    };
    if fixed[0] >> 4 != 6 {
        return Err(format!("ip version {} is not 6", fixed[0] >> 4));
    }
    let payload_len = usize::from(u16::from_be_bytes([fixed[4], fixed[5]]));
    let Some(body) = ip.get(IPV6_HLEN..IPV6_HLEN + payload_len) else {
        return Err(format!(
            "ipv6 payload length {payload_len} runs past the frame's {} ip bytes",
            ip.len()
        ));
    };
    let addr = |at: usize| {
        let mut octets = [0; 16];
        octets.copy_from_slice(&fixed[at..at + 16]);
        std::net::IpAddr::V6(Ipv6Addr::from(octets))
    };
    Ok(IpView {
        header: fixed,
        body,
        src: addr(8),
        dst: addr(24),
        proto: fixed[6],
        frag: 0,
    })
}

fn parse_ipv4(frame: &[u8]) -> Result<IpView<'_>, String> {
    let ethertype = read_u16(frame, 12).ok_or_else(|| {
        format!(
            "{}-byte frame is shorter than an ethernet header ({ETH_HLEN})",
            frame.len()
        )
    })?;
    if ethertype != ETH_P_IP {
        return Err(format!("ethertype {ethertype:#06x} is not IPv4"));
    }
    let ip = &frame[ETH_HLEN..];
    let Some(fixed) = ip.get(..IPV4_HLEN_MIN) else {
        return Err(format!(
            "{} bytes after ethernet are shorter than an ipv4 header ({IPV4_HLEN_MIN})",
            ip.len()
        ));
    };
    if fixed[0] >> 4 != 4 {
        return Err(format!("ip version {} is not 4", fixed[0] >> 4));
    }
    let hlen = usize::from(fixed[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if hlen < IPV4_HLEN_MIN {
        return Err(format!(
            "ipv4 header length {hlen} is below {IPV4_HLEN_MIN}"
        ));
    }
    if total_len < hlen {
        return Err(format!(
            "ipv4 total length {total_len} is below the header length {hlen}"
        ));
    }
    if total_len > ip.len() {
        return Err(format!(
            "ipv4 total length {total_len} runs past the frame's {} ip bytes",
            ip.len()
        ));
    }
    Ok(IpView {
        header: &ip[..hlen],
        body: &ip[hlen..total_len],
        src: Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]).into(),
        dst: Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]).into(),
        proto: fixed[9],
        frag: u16::from_be_bytes([fixed[6], fixed[7]]),
    })
}

/// One line for assertion messages, e.g.
/// `eth aa:..->bb:.. ipv4 198.18.0.2->198.18.100.1 ttl 64 tcp 40000->80 [S] len 54`.
/// Best effort: a truncated or odd frame is described as far as it goes.
pub fn describe(frame: &[u8]) -> String {
    let mut out = String::from("eth");
    describe_layers(frame, &mut out);
    out.push_str(&format!(" len {}", frame.len()));
    out
}

fn describe_layers(frame: &[u8], out: &mut String) {
    let (Some(dst), Some(src), Some(ethertype)) =
        (frame.get(0..6), frame.get(6..12), read_u16(frame, 12))
    else {
        out.push_str(" truncated");
        return;
    };
    out.push_str(&format!(" {}->{}", format_mac(src), format_mac(dst)));
    if ethertype == ETH_P_IPV6 {
        describe_ipv6(frame, out);
        return;
    }
    if ethertype != ETH_P_IP {
        out.push_str(&format!(" type {ethertype:#06x}"));
        return;
    }
    out.push_str(" ipv4");
    let ip = &frame[ETH_HLEN..];
    let Some(h) = ip.get(..IPV4_HLEN_MIN) else {
        out.push_str(" truncated");
        return;
    };
    if h[0] >> 4 != 4 {
        out.push_str(&format!(" version {}", h[0] >> 4));
    }
    out.push_str(&format!(
        " {}->{} ttl {}",
        Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        h[8]
    ));
    let hlen = usize::from(h[0] & 0x0f) * 4;
    if hlen != IPV4_HLEN_MIN {
        out.push_str(&format!(" ihl {}", hlen / 4));
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let frag_offset = frag & IP_OFFSET_MASK;
    if frag & IP_MF != 0 || frag_offset != 0 {
        let mf = if frag & IP_MF != 0 { " MF" } else { "" };
        out.push_str(&format!(" frag{mf} off {frag_offset}"));
    }
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total_len != ip.len() {
        out.push_str(&format!(" iplen {total_len}"));
    }
    let Some(body) = ip.get(hlen.max(IPV4_HLEN_MIN)..total_len.min(ip.len())) else {
        out.push_str(" truncated");
        return;
    };
    if frag_offset != 0 {
        out.push_str(&format!(" proto {}", h[9]));
        return;
    }
    match h[9] {
        IPPROTO_TCP => {
            let Some(t) = body.get(..TCP_HLEN_MIN) else {
                out.push_str(" tcp truncated");
                return;
            };
            let sport = u16::from_be_bytes([t[0], t[1]]);
            let dport = u16::from_be_bytes([t[2], t[3]]);
            out.push_str(&format!(
                " tcp {sport}->{dport} [{}]",
                format_tcp_flags(t[13])
            ));
            let data_offset = usize::from(t[12] >> 4) * 4;
            if data_offset != TCP_HLEN_MIN {
                out.push_str(&format!(" doff {}", data_offset / 4));
            }
            push_payload_len(out, body.len().saturating_sub(data_offset));
        }
        IPPROTO_UDP => {
            let Some(u) = body.get(..UDP_HLEN) else {
                out.push_str(" udp truncated");
                return;
            };
            let sport = u16::from_be_bytes([u[0], u[1]]);
            let dport = u16::from_be_bytes([u[2], u[3]]);
            out.push_str(&format!(" udp {sport}->{dport}"));
            if u[6..8] == [0, 0] {
                out.push_str(" no-csum");
            }
            push_payload_len(out, body.len() - UDP_HLEN);
        }
        IPPROTO_ICMP if body.len() >= 2 => {
            out.push_str(&format!(" icmp type {} code {}", body[0], body[1]));
        }
        proto => out.push_str(&format!(" proto {proto}")),
    }
}

/// `describe_layers` past an IPv6 header: addresses, hop limit, next header and ports.
fn describe_ipv6(frame: &[u8], out: &mut String) {
    out.push_str(" ipv6");
    let Ok(ip) = parse_ipv6(frame) else {
        out.push_str(" truncated");
        return;
    };
    out.push_str(&format!(" {}->{} hlim {}", ip.src, ip.dst, ip.header[7]));
    match (ip.proto, ip.body) {
        (IPPROTO_TCP, t) if t.len() >= TCP_HLEN_MIN => {
            let sport = u16::from_be_bytes([t[0], t[1]]);
            let dport = u16::from_be_bytes([t[2], t[3]]);
            out.push_str(&format!(
                " tcp {sport}->{dport} [{}]",
                format_tcp_flags(t[13])
            ));
            push_payload_len(out, t.len().saturating_sub(usize::from(t[12] >> 4) * 4));
        }
        (IPPROTO_UDP, u) if u.len() >= UDP_HLEN => {
            let sport = u16::from_be_bytes([u[0], u[1]]);
            let dport = u16::from_be_bytes([u[2], u[3]]);
            out.push_str(&format!(" udp {sport}->{dport}"));
            push_payload_len(out, u.len() - UDP_HLEN);
        }
        (proto, _) => out.push_str(&format!(" next header {proto}")),
    }
}

fn push_payload_len(out: &mut String, len: usize) {
    if len > 0 {
        out.push_str(&format!(" payload {len}"));
    }
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// tcpdump's notation, so the strings read as people expect: `[S]`, `[S.]`, `[F.]`, `[none]`.
fn format_tcp_flags(flags: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (TCP_FIN, 'F'),
        (TCP_SYN, 'S'),
        (TCP_RST, 'R'),
        (TCP_PSH, 'P'),
        (TCP_URG, 'U'),
        (TCP_ECE, 'E'),
        (TCP_CWR, 'W'),
        (TCP_ACK, '.'),
    ];
    let text: String = LETTERS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, c)| c)
        .collect();
    if text.is_empty() {
        "none".to_owned()
    } else {
        text
    }
}

/// For assertion messages: the lengths, the first differing offsets (named by field, as laid
/// out in `expected`) with both bytes, and `describe` of each frame.
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    const SHOWN: usize = 8;
    let mut out = format!(
        "lengths: expected {}, actual {}",
        expected.len(),
        actual.len()
    );
    if actual.len() != expected.len() {
        let (sign, by) = if actual.len() > expected.len() {
            ('+', actual.len() - expected.len())
        } else {
            ('-', expected.len() - actual.len())
        };
        out.push_str(&format!(" ({sign}{by})"));
    }
    let common = expected.len().min(actual.len());
    let differing: Vec<usize> = (0..common).filter(|&i| expected[i] != actual[i]).collect();
    if differing.is_empty() {
        out.push_str(&format!("; the common {common} bytes are identical"));
    } else {
        out.push_str(&format!(
            "; {} of the common {common} bytes differ",
            differing.len()
        ));
        for &at in differing.iter().take(SHOWN) {
            out.push_str(&format!(
                "\n  at {at} ({}): expected {:02x}, actual {:02x}",
                field_at(expected, at),
                expected[at],
                actual[at]
            ));
        }
        if differing.len() > SHOWN {
            out.push_str(&format!("\n  ... {} more", differing.len() - SHOWN));
        }
    }
    out.push_str(&format!(
        "\n  expected: {}\n  actual:   {}",
        describe(expected),
        describe(actual)
    ));
    out
}

/// The header field at byte `at` of `frame`, as far as the frame's own headers tell.
fn field_at(frame: &[u8], at: usize) -> &'static str {
    match at {
        0..6 => return "eth dst",
        6..12 => return "eth src",
        12..14 => return "ethertype",
        _ => {}
    }
    if read_u16(frame, 12) == Some(ETH_P_IPV6) {
        return field_at_ipv6(at - ETH_HLEN);
    }
    if read_u16(frame, 12) != Some(ETH_P_IP) {
        return "eth payload";
    }
    let ip = &frame[ETH_HLEN..];
    let at = at - ETH_HLEN;
    let hlen = ip.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
    let field = match at {
        0 => "ipv4 version/ihl",
        1 => "ipv4 tos",
        2 | 3 => "ipv4 total length",
        4 | 5 => "ipv4 id",
        6 | 7 => "ipv4 flags/fragment offset",
        8 => "ipv4 ttl",
        9 => "ipv4 protocol",
        10 | 11 => "ipv4 checksum",
        12..16 => "ipv4 src",
        16..20 => "ipv4 dst",
        _ if at < hlen => "ipv4 options",
        _ => "",
    };
    if !field.is_empty() {
        return field;
    }
    if hlen < IPV4_HLEN_MIN {
        return "ipv4 payload";
    }
    if read_u16(ip, 2).is_some_and(|total_len| at >= usize::from(total_len)) {
        return "eth padding";
    }
    if read_u16(ip, 6).is_some_and(|frag| frag & IP_OFFSET_MASK != 0) {
        return "fragment data";
    }
    let at = at - hlen;
    match ip.get(9).copied() {
        Some(IPPROTO_TCP) => {
            let data_offset = ip
                .get(hlen + 12)
                .map_or(TCP_HLEN_MIN, |b| usize::from(b >> 4) * 4);
            match at {
                0 | 1 => "tcp sport",
                2 | 3 => "tcp dport",
                4..8 => "tcp seq",
                8..12 => "tcp ack",
                12 => "tcp data offset",
                13 => "tcp flags",
                14 | 15 => "tcp window",
                16 | 17 => "tcp checksum",
                18 | 19 => "tcp urgent pointer",
                _ if at < data_offset => "tcp options",
                _ => "tcp payload",
            }
        }
        Some(IPPROTO_UDP) => match at {
            0 | 1 => "udp sport",
            2 | 3 => "udp dport",
            4 | 5 => "udp length",
            6 | 7 => "udp checksum",
            _ => "udp payload",
        },
        _ => "ipv4 payload",
    }
}

/// The field at byte `at` of an IPv6 packet without extension headers.
fn field_at_ipv6(at: usize) -> &'static str {
    match at {
        0..4 => "ipv6 version/class/flow label",
        4 | 5 => "ipv6 payload length",
        6 => "ipv6 next header",
        7 => "ipv6 hop limit",
        8..24 => "ipv6 src",
        24..40 => "ipv6 dst",
        40 | 41 => "l4 sport",
        42 | 43 => "l4 dport",
        _ => "ipv6 payload",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_MAC: Mac = [0xaa; 6];
    const LB_MAC: Mac = [0xbb; 6];
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

    /// Where the L4 header starts in a frame with a 20-byte IPv4 header.
    const L4_AT: usize = ETH_HLEN + IPV4_HLEN_MIN;

    fn tcp_syn() -> PacketBuilder {
        pkt()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(CLIENT, VIP)
            .tcp(40000, 80)
            .syn()
    }

    fn udp_query() -> PacketBuilder {
        // An odd-length payload, so the checksums' zero padding is exercised too.
        pkt()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(CLIENT, VIP)
            .udp(40000, 53)
            .payload(b"query")
    }

    fn tcp_with_everything() -> PacketBuilder {
        tcp_syn()
            .ack()
            .psh()
            .ip_options(&[0x94, 0x04, 0x00])
            .tcp_options(&[0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03])
            .seq(0xdead_beef)
            .ack_seq(0x0102_0304)
            .payload(b"GET / HTTP/1.1\r\n\r\n!")
    }

    fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
        let bytes = buf.get(at..at.checked_add(4)?)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u16_at(frame: &[u8], at: usize) -> u16 {
        read_u16(frame, at).expect("offset inside the frame")
    }

    /// A UDP query whose payload is chosen so that the UDP checksum comes out as `wanted`.
    fn udp_with_checksum(wanted: u16) -> Vec<u8> {
        (0..=u16::MAX)
            .map(|w| udp_query().payload(&w.to_be_bytes()).build())
            .find(|frame| u16_at(frame, L4_AT + UDP_CSUM_AT) == wanted)
            .expect("some 16-bit payload word gives any checksum value")
    }

    /// Every possible change of any one byte from the IPv4 header on is detected.
    ///
    /// A single-byte change moves one 16-bit word by less than 0xffff, never by a multiple of
    /// it, so the one's-complement sum always changes. The one escape is a UDP checksum field
    /// that becomes 0, which means "no checksum" and is fine.
    fn assert_every_byte_change_detected(frame: &[u8]) {
        assert_eq!(verify_checksums(frame), Ok(()), "{}", describe(frame));
        let udp_csum = (frame[ETH_HLEN + 9] == IPPROTO_UDP).then(|| {
            let hlen = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
            ETH_HLEN + hlen + UDP_CSUM_AT
        });
        for at in ETH_HLEN..frame.len() {
            for mask in 1..=u8::MAX {
                let mut changed = frame.to_vec();
                changed[at] ^= mask;
                let result = verify_checksums(&changed);
                let udp_csum_zeroed = udp_csum
                    .is_some_and(|c| (c..c + 2).contains(&at) && changed[c..c + 2] == [0, 0]);
                if udp_csum_zeroed {
                    assert_eq!(result, Ok(()), "udp checksum 0 means none, at {at}");
                } else {
                    assert!(
                        result.is_err(),
                        "xor {mask:#04x} at {at} ({}) went unnoticed: {}",
                        field_at(frame, at),
                        describe(&changed)
                    );
                }
            }
        }
    }

    /// The TCP checksum of an IPv6 SYN, computed apart (Python's struct module, by hand):
    /// fd00::2:40000 -> fd00:100::1:80, seq 1000, window 64240, no options.
    #[test]
    fn ipv6_tcp_checksum_covers_the_ipv6_pseudo_header() {
        let src: Ipv6Addr = "fd00::2".parse().expect("address");
        let dst: Ipv6Addr = "fd00:100::1".parse().expect("address");
        let frame = pkt().ipv6(src, dst).tcp(40000, 80).syn().build();
        assert_eq!(read_u16(&frame, 12), Some(ETH_P_IPV6));
        assert_eq!(frame.len(), ETH_HLEN + IPV6_HLEN + TCP_HLEN_MIN);
        assert_eq!(read_u16(&frame, ETH_HLEN + 4), Some(20), "payload length");
        assert_eq!(frame[ETH_HLEN + 6], IPPROTO_TCP);
        assert_eq!(
            read_u16(&frame, ETH_HLEN + IPV6_HLEN + TCP_CSUM_AT),
            Some(0x1975)
        );
        assert_eq!(verify_checksums(&frame), Ok(()));
        let mut wrong = frame.clone();
        wrong[ETH_HLEN + 8] ^= 1;
        assert!(
            verify_checksums(&wrong).is_err(),
            "the source address is covered"
        );
        assert!(describe(&frame).contains("ipv6 fd00::2->fd00:100::1 hlim 64 tcp 40000->80 [S]"));
    }

    /// An ICMPv6 echo request fd00::2 -> fd00:100::1, id 0x1234, sequence 1: its checksum
    /// computed apart (Python's struct module, by hand) covers the pseudo-header, as ICMP's
    /// over IPv4 does not.
    #[test]
    fn icmpv6_checksum_covers_the_ipv6_pseudo_header() {
        let src: Ipv6Addr = "fd00::2".parse().expect("address");
        let dst: Ipv6Addr = "fd00:100::1".parse().expect("address");
        let frame = pkt()
            .ipv6(src, dst)
            .icmp(128, 0, [0x12, 0x34, 0, 1])
            .build();
        assert_eq!(frame[ETH_HLEN + 6], IPPROTO_ICMPV6);
        assert_eq!(read_u16(&frame, ETH_HLEN + IPV6_HLEN + 2), Some(0x7283));
        assert_eq!(verify_checksums(&frame), Ok(()));
        for at in [ETH_HLEN + 8, ETH_HLEN + 39, ETH_HLEN + IPV6_HLEN + 7] {
            let mut wrong = frame.clone();
            wrong[at] ^= 1;
            assert!(verify_checksums(&wrong).is_err(), "byte {at} is covered");
        }
        let v4 = pkt()
            .ipv4(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 100, 1))
            .icmp(8, 0, [0x12, 0x34, 0, 1])
            .build();
        assert_eq!(verify_checksums(&v4), Ok(()));
        let mut wrong = v4.clone();
        wrong[ETH_HLEN + IPV4_HLEN_MIN + 5] ^= 1;
        assert!(
            verify_checksums(&wrong).is_err(),
            "icmp's checksum is checked"
        );
    }

    #[test]
    fn ipv6_hop_by_hop_header_sits_before_the_l4_header() {
        let src: Ipv6Addr = "fd00::2".parse().expect("address");
        let frame = pkt().ipv6(src, src).udp(1, 2).hop_by_hop().build();
        assert_eq!(frame[ETH_HLEN + 6], IPV6_HOP_BY_HOP);
        assert_eq!(
            frame[ETH_HLEN + IPV6_HLEN],
            IPPROTO_UDP,
            "the extension's next header"
        );
        assert_eq!(read_u16(&frame, ETH_HLEN + 4), Some(8 + 8));
    }

    #[test]
    fn ipv6_fragment_header_carries_offset_flag_and_identification() {
        let src: Ipv6Addr = "fd00::2".parse().expect("address");
        let frame = pkt()
            .ipv6(src, src)
            .udp(1, 2)
            .fragment6(true, 185, 0x0102_0304)
            .build();
        assert_eq!(frame[ETH_HLEN + 6], IPV6_FRAGMENT);
        let fragment = &frame[ETH_HLEN + IPV6_HLEN..ETH_HLEN + IPV6_HLEN + 8];
        assert_eq!(fragment, [IPPROTO_UDP, 0, 0x05, 0xc9, 1, 2, 3, 4]);
        assert_eq!(read_u16(&frame, ETH_HLEN + 4), Some(8 + 8));
        let behind_hop_by_hop = pkt()
            .ipv6(src, src)
            .udp(1, 2)
            .hop_by_hop()
            .fragment6(false, 1, 7)
            .build();
        assert_eq!(behind_hop_by_hop[ETH_HLEN + 6], IPV6_HOP_BY_HOP);
        assert_eq!(behind_hop_by_hop[ETH_HLEN + IPV6_HLEN], IPV6_FRAGMENT);
        assert_eq!(
            behind_hop_by_hop[ETH_HLEN + IPV6_HLEN + 8..ETH_HLEN + IPV6_HLEN + 12],
            [IPPROTO_UDP, 0, 0, 0x08]
        );
    }

    #[test]
    fn checksum_of_classic_ipv4_header_is_b861() {
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0xb861);
        header[10..12].copy_from_slice(&0xb861_u16.to_be_bytes());
        assert_eq!(
            checksum(&header),
            0,
            "a header holding its checksum sums to all ones"
        );
    }

    #[test]
    fn checksum_pads_odd_length_and_folds_carries() {
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0x12]), !0x1200);
        assert_eq!(checksum(&[0x12]), checksum(&[0x12, 0x00]));
        // 0xffff + 0x0001 = 0x10000, folded to 0x0001.
        assert_eq!(checksum(&[0xff, 0xff, 0x00, 0x01]), !0x0001);
    }

    #[test]
    fn tcp_syn_has_default_fields_and_verifies() {
        let frame = tcp_syn().build();
        assert_eq!(frame.len(), ETH_HLEN + 20 + 20);
        assert_eq!(frame[0..6], LB_MAC);
        assert_eq!(frame[6..12], CLIENT_MAC);
        assert_eq!(u16_at(&frame, 12), ETH_P_IP);
        assert_eq!(frame[14], 0x45);
        assert_eq!(frame[15], 0, "tos");
        assert_eq!(u16_at(&frame, 16), 40, "total length");
        assert_eq!(u16_at(&frame, 18), 0x1234, "id");
        assert_eq!(u16_at(&frame, 20), IP_DF, "DF, not a fragment");
        assert_eq!(frame[22], 64, "ttl");
        assert_eq!(frame[23], IPPROTO_TCP);
        assert_eq!(frame[26..30], CLIENT.octets());
        assert_eq!(frame[30..34], VIP.octets());
        assert_eq!(u16_at(&frame, L4_AT), 40000);
        assert_eq!(u16_at(&frame, L4_AT + 2), 80);
        assert_eq!(read_u32(&frame, L4_AT + 4), Some(1000), "seq");
        assert_eq!(read_u32(&frame, L4_AT + 8), Some(0), "ack");
        assert_eq!(frame[L4_AT + 12], 5 << 4, "data offset");
        assert_eq!(frame[L4_AT + 13], TCP_SYN);
        assert_eq!(u16_at(&frame, L4_AT + 14), 64240, "window");
        assert_eq!(u16_at(&frame, L4_AT + 18), 0, "urgent pointer");
        assert_eq!(verify_checksums(&frame), Ok(()));
    }

    #[test]
    fn udp_has_lengths_and_verifies() {
        let frame = udp_query().build();
        assert_eq!(frame.len(), ETH_HLEN + 20 + 8 + 5);
        assert_eq!(u16_at(&frame, 16), 20 + 8 + 5, "ipv4 total length");
        assert_eq!(frame[23], IPPROTO_UDP);
        assert_eq!(u16_at(&frame, L4_AT + 4), 8 + 5, "udp length");
        assert_ne!(u16_at(&frame, L4_AT + UDP_CSUM_AT), 0);
        assert_eq!(&frame[L4_AT + 8..], b"query");
        assert_eq!(verify_checksums(&frame), Ok(()));
    }

    #[test]
    fn tcp_flags_and_sequence_numbers_are_encoded() {
        let frame = tcp_syn()
            .ack()
            .fin()
            .rst()
            .psh()
            .seq(7)
            .ack_seq(u32::MAX)
            .build();
        assert_eq!(
            frame[L4_AT + 13],
            TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST | TCP_PSH
        );
        assert_eq!(read_u32(&frame, L4_AT + 4), Some(7));
        assert_eq!(read_u32(&frame, L4_AT + 8), Some(u32::MAX));
        // Setters work before the layer they belong to.
        assert_eq!(
            pkt().syn().ttl(3).ipv4(CLIENT, VIP).tcp(1, 2).build(),
            pkt().ipv4(CLIENT, VIP).tcp(1, 2).syn().ttl(3).build()
        );
    }

    #[test]
    fn options_are_padded_and_counted_in_ihl_and_data_offset() {
        let frame = tcp_with_everything().build();
        let payload = b"GET / HTTP/1.1\r\n\r\n!";
        assert_eq!(frame[14], 0x46, "IHL 6: 3 option bytes padded to 4");
        assert_eq!(frame[34..38], [0x94, 0x04, 0x00, 0x00]);
        let tcp_at = ETH_HLEN + 24;
        assert_eq!(
            frame[tcp_at + 12],
            7 << 4,
            "data offset 7: 7 option bytes padded to 8"
        );
        assert_eq!(
            frame[tcp_at + 20..tcp_at + 28],
            [0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x00]
        );
        assert_eq!(&frame[tcp_at + 28..], payload);
        assert_eq!(
            usize::from(u16_at(&frame, 16)),
            24 + 28 + payload.len(),
            "ipv4 total length"
        );
        assert_eq!(frame.len(), ETH_HLEN + 24 + 28 + payload.len());
        assert_eq!(verify_checksums(&frame), Ok(()));

        let aligned = tcp_syn()
            .ip_options(&[1, 1, 1, 1])
            .tcp_options(&[2, 4, 5, 0xb4])
            .build();
        assert_eq!(aligned[14], 0x46, "4 option bytes need no padding");
        assert_eq!(aligned[ETH_HLEN + 24 + 12], 6 << 4);
        assert_eq!(verify_checksums(&aligned), Ok(()));
    }

    #[test]
    fn fragment_flags_and_offset_are_encoded() {
        let first = udp_query().fragment(true, 0).build();
        assert_eq!(u16_at(&first, 20), 0x2000, "MF, offset 0, DF cleared");
        let middle = udp_query().fragment(true, 185).build();
        assert_eq!(u16_at(&middle, 20), 0x2000 | 185);
        let last = udp_query().fragment(false, 0x1fff).build();
        assert_eq!(u16_at(&last, 20), 0x1fff);
        let contradictory = udp_query().fragment(true, 1).df(true).build();
        assert_eq!(u16_at(&contradictory, 20), 0x6001);
        let no_df = udp_query().df(false).build();
        assert_eq!(u16_at(&no_df, 20), 0);
        for frame in [first, middle, last, contradictory, no_df] {
            assert_eq!(verify_checksums(&frame), Ok(()), "{}", describe(&frame));
        }
    }

    #[test]
    fn fragment_skips_the_l4_checksum_but_not_the_header_checksum() {
        let mut frame = tcp_syn().fragment(true, 0).build();
        frame[L4_AT + TCP_CSUM_AT] ^= 0xff;
        assert_eq!(
            verify_checksums(&frame),
            Ok(()),
            "a fragment's L4 checksum covers the whole datagram"
        );
        frame[ETH_HLEN + 8] ^= 0xff;
        assert!(verify_checksums(&frame).is_err());
    }

    #[test]
    fn udp_no_checksum_leaves_zero_and_verifies() {
        let frame = udp_query().udp_no_checksum().build();
        assert_eq!(u16_at(&frame, L4_AT + UDP_CSUM_AT), 0);
        assert_eq!(verify_checksums(&frame), Ok(()));
        assert!(describe(&frame).contains("no-csum"));
    }

    #[test]
    fn udp_checksum_computed_as_zero_is_sent_as_ffff() {
        let frame = udp_with_checksum(0xffff);
        assert_eq!(verify_checksums(&frame), Ok(()));
        // Only the all-ones form is right for a computed zero; 0 would mean "none".
        let payload = &frame[L4_AT + UDP_HLEN..];
        let sum_with_field_zero = {
            let mut seg = frame[L4_AT..].to_vec();
            put_u16(&mut seg, UDP_CSUM_AT, 0);
            l4_checksum(&pseudo_header(CLIENT, VIP, IPPROTO_UDP, seg.len()), &seg)
        };
        assert_eq!(sum_with_field_zero, 0, "payload {payload:02x?}");
    }

    #[test]
    fn tcp_checksum_computed_as_zero_stays_zero() {
        let zero = (0..=u16::MAX)
            .map(|w| tcp_syn().payload(&w.to_be_bytes()).build())
            .find(|frame| u16_at(frame, L4_AT + TCP_CSUM_AT) == 0)
            .expect("some payload word gives checksum 0");
        assert_eq!(verify_checksums(&zero), Ok(()));
        let mut ones = zero.clone();
        put_u16(&mut ones, L4_AT + TCP_CSUM_AT, 0xffff);
        let err = verify_checksums(&ones)
            .expect_err("0xffff for a computed 0 is the RFC 1624 eqn. 2 slip");
        assert!(err.contains("expected 0x0000, found 0xffff"), "{err}");
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        assert_every_byte_change_detected(&tcp_syn().build());
        assert_every_byte_change_detected(&udp_query().build());
        assert_every_byte_change_detected(&tcp_with_everything().build());
        assert_every_byte_change_detected(&udp_query().ip_options(&[1]).payload(b"").build());
    }

    #[test]
    fn udp_checksum_field_turned_zero_passes_as_no_checksum() {
        let frame = udp_with_checksum(0x00ff);
        assert_every_byte_change_detected(&frame);
        let mut zeroed = frame.clone();
        zeroed[L4_AT + UDP_CSUM_AT + 1] ^= 0xff;
        assert_eq!(u16_at(&zeroed, L4_AT + UDP_CSUM_AT), 0);
        assert_eq!(verify_checksums(&zeroed), Ok(()));
    }

    #[test]
    fn verify_names_the_wrong_checksum_with_both_values() {
        let good = tcp_syn().build();
        let mut bad_ip = good.clone();
        put_u16(&mut bad_ip, ETH_HLEN + IPV4_CSUM_AT, 0xabcd);
        let expected = format!("{:#06x}", u16_at(&good, ETH_HLEN + IPV4_CSUM_AT));
        let err = verify_checksums(&bad_ip).expect_err("header checksum overwritten");
        assert!(
            err.contains("ipv4 header") && err.contains(&expected) && err.contains("found 0xabcd"),
            "{err}"
        );

        let mut bad_tcp = good.clone();
        bad_tcp[L4_AT + 2] ^= 1;
        let err = verify_checksums(&bad_tcp).expect_err("port changed, checksum not");
        assert!(
            err.starts_with("tcp checksum is wrong: expected 0x"),
            "{err}"
        );

        let mut bad_udp = udp_query().build();
        bad_udp[L4_AT + UDP_HLEN] ^= 1;
        let err = verify_checksums(&bad_udp).expect_err("payload changed, checksum not");
        assert!(err.starts_with("udp checksum is wrong"), "{err}");
    }

    #[test]
    fn verify_rejects_frames_it_cannot_check() {
        let arp = pkt()
            .eth(CLIENT_MAC, [0xff; 6])
            .ethertype(ETH_P_ARP)
            .payload(&[0; 28])
            .build();
        assert_eq!(u16_at(&arp, 12), ETH_P_ARP);
        assert_eq!(arp.len(), ETH_HLEN + 28);
        let err = verify_checksums(&arp).expect_err("not IPv4");
        assert!(err.contains("0x0806"), "{err}");

        let vlan = tcp_syn().ethertype(ETH_P_8021Q).build();
        assert_eq!(
            vlan[ETH_HLEN..],
            tcp_syn().build()[ETH_HLEN..],
            "only the ethertype differs"
        );
        assert!(verify_checksums(&vlan).is_err());
    }

    #[test]
    fn raw_protocol_carries_payload_after_the_ip_header() {
        let echo = [8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        let frame = pkt()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(CLIENT, VIP)
            .ip_proto(IPPROTO_ICMP)
            .payload(&echo)
            .build();
        assert_eq!(frame[23], IPPROTO_ICMP);
        assert_eq!(frame[L4_AT..], echo);
        assert_eq!(u16_at(&frame, 16), 28);
        assert_eq!(verify_checksums(&frame), Ok(()));
        assert_eq!(
            checksum(&frame[L4_AT..]),
            0,
            "the fixture's ICMP checksum is its own"
        );
        assert!(
            describe(&frame).contains("icmp type 8 code 0"),
            "{}",
            describe(&frame)
        );
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_ignored() {
        let mut frame = tcp_syn().build();
        frame.resize(60, 0);
        assert_eq!(verify_checksums(&frame), Ok(()));
        assert_eq!(field_at(&frame, 55), "eth padding");
    }

    #[test]
    fn describe_reads_like_the_example() {
        assert_eq!(
            describe(&tcp_syn().build()),
            "eth aa:aa:aa:aa:aa:aa->bb:bb:bb:bb:bb:bb ipv4 198.18.0.2->198.18.100.1 ttl 64 tcp 40000->80 [S] len 54"
        );
        assert_eq!(
            describe(&tcp_syn().ack().ttl(63).payload(b"hi").build()),
            "eth aa:aa:aa:aa:aa:aa->bb:bb:bb:bb:bb:bb ipv4 198.18.0.2->198.18.100.1 ttl 63 tcp 40000->80 [S.] payload 2 len 56"
        );
        assert!(describe(&tcp_syn().tcp_flags(0).build()).contains("[none]"));
        assert!(describe(&udp_query().build()).contains(" udp 40000->53 payload 5 len 47"));
        assert!(
            describe(&udp_query().fragment(true, 185).build()).contains("frag MF off 185 proto 17")
        );
        assert!(
            describe(&tcp_with_everything().build())
                .contains("ihl 6 tcp 40000->80 [SP.] doff 7 payload 19")
        );
    }

    #[test]
    fn diff_names_offsets_fields_and_length_change() {
        let expected = tcp_syn().build();
        let actual = tcp_syn()
            .ipv4(CLIENT, Ipv4Addr::new(198, 18, 100, 2))
            .build();
        let text = diff(&expected, &actual);
        assert!(
            text.starts_with("lengths: expected 54, actual 54;"),
            "{text}"
        );
        assert!(
            text.contains("at 33 (ipv4 dst): expected 01, actual 02"),
            "{text}"
        );
        assert!(
            text.contains("(ipv4 checksum)") && text.contains("(tcp checksum)"),
            "{text}"
        );
        assert!(text.contains("198.18.100.2"), "{text}");

        let longer = tcp_syn().payload(b"abc").build();
        let text = diff(&expected, &longer);
        assert!(text.contains("actual 57 (+3)"), "{text}");
        let text = diff(&longer, &expected);
        assert!(text.contains("actual 54 (-3)"), "{text}");

        assert!(diff(&expected, &expected).contains("the common 54 bytes are identical"));
        let all_different: Vec<u8> = expected.iter().map(|b| !b).collect();
        assert!(diff(&expected, &all_different).contains("... 46 more"));
    }

    #[test]
    fn describe_diff_and_verify_survive_truncated_and_garbage_frames() {
        let frames = [
            tcp_syn().build(),
            tcp_with_everything().build(),
            udp_query().build(),
            udp_query().fragment(true, 3).build(),
            pkt()
                .ipv4(CLIENT, VIP)
                .ip_proto(IPPROTO_ICMP)
                .payload(&[8])
                .build(),
            pkt().ethertype(ETH_P_ARP).payload(&[1; 28]).build(),
        ];
        for frame in &frames {
            let is_ipv4 = u16_at(frame, 12) == ETH_P_IP;
            for len in 0..=frame.len() {
                let prefix = &frame[..len];
                let _ = describe(prefix);
                let _ = diff(frame, prefix);
                let _ = diff(prefix, frame);
                let result = verify_checksums(prefix);
                if len < frame.len() && is_ipv4 {
                    assert!(
                        result.is_err(),
                        "a {len}-byte prefix of {} verified",
                        describe(frame)
                    );
                }
            }
        }
        assert_eq!(describe(&[]), "eth truncated len 0");
        assert!(verify_checksums(&[]).is_err());

        // Deterministic garbage, half of it claiming to be IPv4 so the deeper parsing runs.
        let mut state: u32 = 0x1234_5678;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        for round in 0..2000 {
            let len = usize::from(next()) % 120;
            let mut frame: Vec<u8> = (0..len).map(|_| next()).collect();
            if round % 2 == 0 && len >= 16 {
                frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
                frame[14] = 0x40 | (frame[14] & 0x0f);
            }
            let _ = describe(&frame);
            let _ = verify_checksums(&frame);
            let _ = diff(&frame, &frames[0]);
        }
    }
}
