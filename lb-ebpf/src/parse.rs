//! Stage 1, parse: Ethernet -> IPv4 (options allowed) -> TCP or UDP, into a `Packet`.
//! Anything else passes to the kernel with its reason. Reads no maps.

use lb_common::{
    Be16, Be32, FlowKey, PassReason,
    conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    icmp::IPPROTO_ICMP,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{Verdict, frame::Frame};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ETH_P_IP: u16 = 0x0800;
/// Offsets in the TCP header: sequence number, acknowledgement number, data offset and flags.
const TCP_SEQ_OFFSET: usize = 4;
const TCP_ACK_OFFSET: usize = 8;
const TCP_DOFF_OFFSET: usize = 12;
const TCP_FLAGS_OFFSET: usize = 13;
/// More-fragments flag and fragment offset in IPv4's `frags` field (host order).
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;
const IP_OFFSET: u16 = 0x1fff;

/// A parsed IPv4 TCP or UDP packet. The pointers were bounds-checked against the frame.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// The L4 checksum field (TCP or UDP).
    pub l4_check: *mut [u8; 2],
    /// Source and destination ports, adjacent in both TCP and UDP.
    pub ports: *mut [u8; 4],
    pub key: FlowKey,
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

impl Packet {
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
    /// The IP identification (as on the wire) if this is a datagram's first fragment, whose
    /// later fragments `fragments.rs` must follow.
    pub fn first_fragment_id(&self) -> Option<u16> {
        // SAFETY: `ip` was bounds-checked in `packet`.
        let (frags, id) = unsafe { (u16::from_be_bytes((*self.ip).frags), (*self.ip).id) };
        (frags & IP_MF_AND_OFFSET != 0).then_some(u16::from_ne_bytes(id))
    }

    pub fn ttl(&self) -> u8 {
        // SAFETY: `ip` was bounds-checked in `packet`.
        unsafe { (*self.ip).ttl }
    }
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
    /// IPv4 carrying ICMP (`icmp.rs`).
    Icmp,
    /// An IPv4 fragment other than the first (`fragments.rs`).
    LaterFragment,
    /// Anything else: balanced, or passed with its reason (`packet`).
    Balance,
}

#[inline(always)]
pub fn path(ctx: &impl Frame) -> Path {
    let Some(ip) = ipv4_header(ctx) else {
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
    let l4 = EthHdr::LEN + ihl;
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
                let payload = u32::from(tot_len).saturating_sub(ihl as u32 + header_len);
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
    Ok(Packet {
        eth,
        ip,
        l4_check,
        ports,
        key: FlowKey {
            src_addr: Be32::from_bytes(src),
            dst_addr: Be32::from_bytes(dst),
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
    })
}
