//! Stage 1, parse: Ethernet -> IPv4 (options allowed) or IPv6 -> TCP or UDP, into a `Packet`.
//! Anything else passes to the kernel with its reason. An IPv6 packet with extension headers
//! passes too (counted): the headers a balanced flow could carry (hop-by-hop options, routing)
//! are rare on the way to a VIP, and the kernel handles them all. The exception is a fragment
//! header right after the fixed header, as a fragmenting host writes it: a UDP datagram's
//! first fragment is balanced, its later fragments follow it (`fragments.rs`), as in IPv4.
//! Reads no maps.

use core::mem::MaybeUninit;

use lb_common::{
    Be16, Be32, FlowKeyOf, In6, PassReason,
    conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    icmp::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    Verdict,
    family::{Family, read_in6},
    frame::Frame,
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6's fragment header (RFC 8200, 4.5), as a next-header value, and its length.
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPV6_FRAGMENT_LEN: usize = 8;
/// IPv6 extension headers (RFC 8200 and the IANA list): hop-by-hop options, routing,
/// fragment, destination options, mobility, HIP, shim6 and the two experimental ones.
const IPV6_EXTENSION_HEADERS: [u8; 9] = [0, 43, 44, 60, 135, 139, 140, 253, 254];
/// Offsets in the TCP header: sequence number, acknowledgement number, data offset and flags.
const TCP_SEQ_OFFSET: usize = 4;
const TCP_ACK_OFFSET: usize = 8;
const TCP_DOFF_OFFSET: usize = 12;
const TCP_FLAGS_OFFSET: usize = 13;
/// More-fragments flag and fragment offset in IPv4's `frags` field (host order).
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;
pub const IP_OFFSET: u16 = 0x1fff;

/// A parsed TCP or UDP packet of an address family (IPv4 by default). The pointers were
/// bounds-checked against the frame.
pub struct Packet<A: Family = Be32> {
    pub eth: *mut EthHdr,
    pub ip: *mut A::Ip,
    /// The L4 checksum field (TCP or UDP).
    pub l4_check: *mut [u8; 2],
    /// Source and destination ports, adjacent in both TCP and UDP.
    pub ports: *mut [u8; 4],
    pub key: FlowKeyOf<A>,
    pub tcp_flags: u8,
    /// TCP, host order: the sequence number, and the one after the segment (its payload, SYN
    /// and FIN count).
    pub seq: u32,
    pub seq_end: u32,
    /// TCP, host order: the acknowledgement number.
    pub ack_seq: u32,
    /// Frame length in bytes, for the counters.
    pub len: u64,
    /// TCP: the header's length in bytes (20 to 60), and the payload's.
    pub tcp_header_len: u32,
    pub tcp_payload_len: u32,
    /// The device the frame arrived on.
    pub ingress_ifindex: u32,
    /// The frame's end, for reads past the fixed headers (`csum::tcp_header_only_ok`).
    pub data_end: usize,
}

impl<A: Family> Packet<A> {
    pub fn is_tcp(&self) -> bool {
        self.key.proto == IPPROTO_TCP
    }
    /// An opening SYN, not the SYN-ACK of a reply.
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    pub fn is_rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }
    /// A segment that may change its connection's state: anything but a plain ACK.
    pub fn moves_state(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
    }
    /// The hop limit (IPv4's TTL).
    pub fn ttl(&self) -> u8 {
        // SAFETY: `ip` was bounds-checked in `packet`.
        A::hop_limit(unsafe { &*self.ip })
    }
}

impl Packet {
    /// The IP identification (its bytes as on the wire, widened) if this is a datagram's first
    /// fragment, whose later fragments `fragments.rs` must follow.
    pub fn first_fragment_id(&self) -> Option<u32> {
        // SAFETY: `ip` was bounds-checked in `packet`.
        let (frags, id) = unsafe { (u16::from_be_bytes((*self.ip).frags), (*self.ip).id) };
        (frags & IP_MF_AND_OFFSET != 0).then_some(u32::from(u16::from_ne_bytes(id)))
    }
}

impl Packet<In6> {
    /// IPv6's `first_fragment_id`: the fragment header's identification, if `packet6` found
    /// one with more fragments to come (its offset is 0: later fragments take another path).
    pub fn first_fragment_id(&self) -> Option<u32> {
        // SAFETY: `ip` was bounds-checked in `packet6`.
        if unsafe { (*self.ip).next_hdr } != IPPROTO_FRAGMENT {
            return None;
        }
        // SAFETY: `packet6` bounds-checked the fragment header (it read the L4 header past
        // it); checked again here for the verifier, which does not carry that across.
        let fragment =
            unsafe { self.ip.cast::<u8>().add(Ipv6Hdr::LEN) }.cast::<[u8; IPV6_FRAGMENT_LEN]>();
        if fragment as usize + IPV6_FRAGMENT_LEN > self.data_end {
            return None;
        }
        // SAFETY: bounds-checked above.
        let f = unsafe { *fragment };
        (f[3] & IPV6_MORE_FRAGMENTS != 0).then_some(u32::from_ne_bytes([f[4], f[5], f[6], f[7]]))
    }
}

/// In the fragment header's offset word (its bytes 2 and 3): the M flag, and the offset.
const IPV6_MORE_FRAGMENTS: u8 = 1;
pub const IPV6_OFFSET_MASK: u16 = 0xfff8;

/// `ipv6_fragment`'s offset for a frame without a fragment header there: offsets are multiples
/// of 8. A sentinel, not an Option: LLVM read a None's payload, which the verifier refuses.
const NO_FRAGMENT_HEADER: u16 = 1;

/// The offset (in bytes) and next header of the IPv6 fragment header right after the fixed
/// header; NO_FRAGMENT_HEADER if the frame holds none there.
#[inline(always)]
fn ipv6_fragment(ctx: &impl Frame, ip: *mut Ipv6Hdr) -> (u16, u8) {
    // SAFETY: the caller bounds-checked the fixed header.
    if unsafe { (*ip).next_hdr } != IPPROTO_FRAGMENT {
        return (NO_FRAGMENT_HEADER, 0);
    }
    let Some(fragment) = ptr_at::<[u8; IPV6_FRAGMENT_LEN]>(ctx, EthHdr::LEN + Ipv6Hdr::LEN) else {
        return (NO_FRAGMENT_HEADER, 0);
    };
    // SAFETY: bounds-checked by ptr_at.
    let f = unsafe { *fragment };
    (u16::from_be_bytes([f[2], f[3]]) & IPV6_OFFSET_MASK, f[0])
}

/// A pointer to a `T` at `offset` in the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The frame's IPv4 header, if it is an IPv4 frame long enough to hold one.
#[inline(always)]
fn ipv4_header(ctx: &impl Frame) -> Option<*mut Ipv4Hdr> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return None;
    }
    ptr_at(ctx, EthHdr::LEN)
}

/// Which path of the entry point's a frame takes, from one read of its IPv4 header.
pub enum Path {
    /// IPv6 (`packet6`).
    Ipv6,
    /// IPv6 carrying ICMPv6 right after its fixed header (`icmp.rs`).
    Icmp6,
    /// IPv4 carrying ICMP (`icmp.rs`).
    Icmp,
    /// An IPv4 fragment other than the first (`fragments.rs`).
    LaterFragment,
    /// An IPv6 fragment other than the first (`fragments.rs`).
    LaterFragment6,
    /// Anything else: balanced, or passed with its reason (`packet`).
    Balance,
}

#[inline(always)]
pub fn path(ctx: &impl Frame) -> Path {
    let Some(ip) = ipv4_header(ctx) else {
        let eth: Option<*mut EthHdr> = ptr_at(ctx, 0);
        // SAFETY: bounds-checked by ptr_at.
        if eth.is_some_and(|eth| unsafe { (*eth).ether_type } == ETH_P_IPV6.to_be()) {
            let ip: Option<*mut Ipv6Hdr> = ptr_at(ctx, EthHdr::LEN);
            // SAFETY: bounds-checked by ptr_at.
            let Some(ip) = ip else {
                return Path::Ipv6;
            };
            // SAFETY: bounds-checked by ptr_at.
            if unsafe { (*ip).next_hdr } == IPPROTO_ICMPV6 {
                return Path::Icmp6;
            }
            let (offset, _) = ipv6_fragment(ctx, ip);
            if offset != 0 && offset != NO_FRAGMENT_HEADER {
                return Path::LaterFragment6;
            }
            return Path::Ipv6;
        }
        return Path::Balance;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (proto, frags) = unsafe { ((*ip).proto, u16::from_be_bytes((*ip).frags)) };
    if proto == IPPROTO_ICMP {
        Path::Icmp
    } else if frags & IP_OFFSET != 0 {
        Path::LaterFragment
    } else {
        Path::Balance
    }
}

#[inline(always)]
pub fn packet(ctx: &impl Frame) -> Result<Packet, Verdict> {
    let pass = |reason| Verdict::Pass(reason);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(pass(PassReason::ShortEthernet))?;
    // SAFETY: bounds-checked by ptr_at. Raw field, compared with a network-order constant.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Err(pass(PassReason::NotIpv4));
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(pass(PassReason::MalformedIpv4))?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, tot_len, frags, proto, src, dst) = unsafe {
        let ip = &*ip;
        (
            ip.vihl,
            u16::from_be_bytes(ip.tot_len),
            u16::from_be_bytes(ip.frags),
            ip.proto,
            ip.src_addr,
            ip.dst_addr,
        )
    };
    // The header length comes from the packet; the mask bounds it (60) for the verifier.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(pass(PassReason::MalformedIpv4));
    }
    // A UDP datagram's first fragment carries its ports and is balanced (`fragments.rs` has
    // the later ones follow it); the entry point sent later fragments elsewhere.
    if frags & IP_OFFSET != 0 || (frags & IP_MF_AND_OFFSET != 0 && proto != IPPROTO_UDP) {
        return Err(pass(PassReason::Fragment));
    }
    let ip_payload = u32::from(tot_len).saturating_sub(ihl as u32);
    let addrs = (proto, Be32::from_bytes(src), Be32::from_bytes(dst));
    let mut pkt = MaybeUninit::uninit();
    transport(ctx, eth, ip, EthHdr::LEN + ihl, ip_payload, addrs, &mut pkt)?;
    // SAFETY: `transport` wrote the packet (it returned Ok).
    Ok(unsafe { pkt.assume_init() })
}

/// An IPv6 frame (`path` said so) as a `Packet`, written to `out`: TCP or UDP right after the
/// fixed header, or UDP after a first fragment's fragment header. Written in place: returned, IPv6's packet would take its stack twice, more
/// than the balancing path can spare.
#[inline(always)]
pub fn packet6(ctx: &impl Frame, out: &mut MaybeUninit<Packet<In6>>) -> Result<(), Verdict> {
    let pass = |reason| Verdict::Pass(reason);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(pass(PassReason::ShortEthernet))?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(pass(PassReason::MalformedIpv6))?;
    // SAFETY: bounds-checked by ptr_at.
    let (vcf, payload_len, next_hdr) = unsafe {
        let ip = &*ip;
        (ip.vcf, u16::from_be_bytes(ip.payload_len), ip.next_hdr)
    };
    if vcf[0] >> 4 != 6 {
        return Err(pass(PassReason::MalformedIpv6));
    }
    let mut l4 = EthHdr::LEN + Ipv6Hdr::LEN;
    let (mut proto, mut ip_payload) = (next_hdr, u32::from(payload_len));
    // A UDP datagram's first fragment carries its ports and is balanced, as in IPv4; the
    // entry point sent later fragments elsewhere.
    if next_hdr == IPPROTO_FRAGMENT {
        match ipv6_fragment(ctx, ip) {
            (0, IPPROTO_UDP) => {
                (l4, proto) = (l4 + IPV6_FRAGMENT_LEN, IPPROTO_UDP);
                ip_payload = ip_payload.saturating_sub(IPV6_FRAGMENT_LEN as u32);
            }
            _ => return Err(pass(PassReason::Fragment)),
        }
    } else if next_hdr != IPPROTO_TCP && next_hdr != IPPROTO_UDP {
        let extension = IPV6_EXTENSION_HEADERS.contains(&next_hdr);
        return Err(pass(if extension {
            PassReason::Ipv6ExtensionHeaders
        } else {
            PassReason::NotTcpUdp
        }));
    }
    // SAFETY: bounds-checked by ptr_at.
    let addrs = unsafe {
        (
            proto,
            read_in6(&raw const (*ip).src_addr),
            read_in6(&raw const (*ip).dst_addr),
        )
    };
    transport(ctx, eth, ip, l4, ip_payload, addrs, out)
}

/// The TCP or UDP header at `l4` (after `ip_payload` bytes of IP payload, as the IP header
/// counts them), and the packet it makes with the protocol and addresses the IP header gave.
#[inline(always)]
fn transport<A: Family>(
    ctx: &impl Frame,
    eth: *mut EthHdr,
    ip: *mut A::Ip,
    l4: usize,
    ip_payload: u32,
    (proto, src, dst): (u8, A, A),
    out: &mut MaybeUninit<Packet<A>>,
) -> Result<(), Verdict> {
    let pass = |reason| Verdict::Pass(reason);
    let mut tcp_flags = 0;
    let (mut seq, mut seq_end, mut ack_seq) = (0, 0, 0);
    let (mut tcp_header_len, mut tcp_payload_len) = (0, 0);
    let l4_check: *mut [u8; 2] = match proto {
        IPPROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or(pass(PassReason::ShortL4))?;
            // SAFETY: bounds-checked by ptr_at; every field read lies inside the header. The
            // bytes are read through the checked pointer: a second ptr_at at l4 + 13 is folded
            // away by LLVM, and the verifier (6.18) then sees an unchecked pointer.
            unsafe {
                let at = |offset| (tcp as *const u8).add(offset);
                tcp_flags = *at(TCP_FLAGS_OFFSET);
                seq = u32::from_be_bytes(*(at(TCP_SEQ_OFFSET) as *const [u8; 4]));
                ack_seq = u32::from_be_bytes(*(at(TCP_ACK_OFFSET) as *const [u8; 4]));
                let header_len = u32::from(*at(TCP_DOFF_OFFSET) >> 4) * 4;
                let payload = ip_payload.saturating_sub(header_len);
                (tcp_header_len, tcp_payload_len) = (header_len, payload);
                let flags_len =
                    u32::from(tcp_flags & TCP_SYN != 0) + u32::from(tcp_flags & TCP_FIN != 0);
                seq_end = seq.wrapping_add(payload + flags_len);
                core::ptr::addr_of_mut!((*tcp).check)
            }
        }
        IPPROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4).ok_or(pass(PassReason::ShortL4))?;
            // SAFETY: as above.
            unsafe { core::ptr::addr_of_mut!((*udp).check) }
        }
        _ => return Err(pass(PassReason::NotTcpUdp)),
    };
    let ports: *mut [u8; 4] = ptr_at(ctx, l4).ok_or(pass(PassReason::ShortL4))?;
    // SAFETY: bounds-checked above (the first 4 bytes of a TCP or UDP header).
    let p = unsafe { *ports };
    out.write(Packet {
        eth,
        ip,
        l4_check,
        ports,
        key: FlowKeyOf {
            src_addr: src,
            dst_addr: dst,
            src_port: Be16::from_bytes([p[0], p[1]]),
            dst_port: Be16::from_bytes([p[2], p[3]]),
            proto,
            _pad: [0; 3],
        },
        tcp_flags,
        seq,
        seq_end,
        ack_seq,
        len: (ctx.data_end() - ctx.data()) as u64,
        tcp_header_len,
        tcp_payload_len,
        // SAFETY: a field of the context the kernel hands every XDP program.
        ingress_ifindex: ctx.ingress_ifindex(),
        data_end: ctx.data_end(),
    });
    Ok(())
}
