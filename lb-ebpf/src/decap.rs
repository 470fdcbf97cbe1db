//! `lb decap`'s entry, on a DSR backend's interface (tc ingress): an IPIP or GUE packet whose
//! inner destination is a VIP it was given (DECAP_VIPS) loses its outer headers and goes on to
//! the stack as the client sent it, to the VIP on the backend's loopback; the same for IPv6 in
//! IPv6, or in IPv6 and UDP (DECAP_VIPS6). Everything else goes on untouched. Shares nothing
//! with the balancer but the object and the counters' layout.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_skb_adjust_room,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Be32, STAT_DECAP_UNKNOWN_VIP, STAT_DECAPSULATED,
    tunnel::{
        GUE_OVERHEAD, GUE_PORT, GUE6_OVERHEAD, IP6IP6_OVERHEAD, IPIP_OVERHEAD, IPPROTO_IPIP,
        IPPROTO_IPV6,
    },
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    family::read_in6,
    maps::{DECAP_VIPS, DECAP_VIPS6},
    parse::{ETH_P_IP, ETH_P_IPV6, ptr_at},
    stats,
};

/// Ethernet, the outer IPv6 and UDP headers and the inner IPv6 header (IPv4's are shorter).
const HEADERS: u32 = (EthHdr::LEN + 2 * Ipv6Hdr::LEN + 8) as u32;
/// More fragments, and the fragment offset, in IPv4's `frags` field (host order).
const IP_FRAGMENTED: u16 = 0x3fff;
const IPPROTO_UDP: u8 = 17;

#[classifier]
pub fn lb_decap(ctx: TcContext) -> i32 {
    if ctx.pull_data(ctx.len().min(HEADERS)).is_err() {
        return TC_ACT_UNSPEC;
    }
    let (overhead, flags) = if let Some(overhead) = tunnel_overhead(&ctx) {
        let Some(inner) = ptr_at::<Ipv4Hdr>(&ctx, EthHdr::LEN + usize::from(overhead)) else {
            return TC_ACT_UNSPEC;
        };
        // SAFETY: bounds-checked by ptr_at.
        let (version, vip) = unsafe { ((*inner).vihl >> 4, Be32::from_bytes((*inner).dst_addr)) };
        if version != 4 {
            return TC_ACT_UNSPEC;
        }
        // SAFETY: a value read from a map lookup, valid for this program run.
        if unsafe { DECAP_VIPS.get(&vip) }.is_none() {
            stats::count_slot(STAT_DECAP_UNKNOWN_VIP);
            return TC_ACT_UNSPEC;
        }
        (overhead, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
    } else if let Some(overhead) = tunnel6_overhead(&ctx) {
        let Some(inner) = ptr_at::<Ipv6Hdr>(&ctx, EthHdr::LEN + usize::from(overhead)) else {
            return TC_ACT_UNSPEC;
        };
        // SAFETY: bounds-checked by ptr_at.
        let (version, vip) =
            unsafe { ((*inner).vcf[0] >> 4, read_in6(&raw const (*inner).dst_addr)) };
        if version != 6 {
            return TC_ACT_UNSPEC;
        }
        // SAFETY: a value read from a map lookup, valid for this program run.
        if unsafe { DECAP_VIPS6.get(&vip) }.is_none() {
            stats::count_slot(STAT_DECAP_UNKNOWN_VIP);
            return TC_ACT_UNSPEC;
        }
        (overhead, BPF_F_ADJ_ROOM_DECAP_L3_IPV6)
    } else {
        return TC_ACT_UNSPEC;
    };
    // The flag (the inner header's family) clears the tunnel's GSO types too (IPIP's, IPv6's
    // and UDP tunnels'), GRO-merged packets included.
    let flags = u64::from(flags);
    // SAFETY: the skb is the program's own; the header pointers are not used after this.
    let stripped = unsafe {
        bpf_skb_adjust_room(
            ctx.as_ptr().cast::<__sk_buff>(),
            -i32::from(overhead),
            BPF_ADJ_ROOM_MAC,
            flags,
        )
    };
    if stripped != 0 {
        return TC_ACT_SHOT;
    }
    stats::count_slot(STAT_DECAPSULATED);
    TC_ACT_UNSPEC
}

/// What lb's tunnel adds to the packet, if it is one: IPIP, or GUE (UDP to GUE_PORT), in an
/// outer IPv4 header without options. A fragmented outer packet is the kernel's to reassemble
/// (and, with no ipip or fou module, drop): lb's outer header copies the inner DF, and a path
/// too narrow answers the client.
#[inline(always)]
fn tunnel_overhead(ctx: &TcContext) -> Option<u16> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let outer = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (ether_type, vihl, proto, frags) = unsafe {
        (
            (*eth).ether_type,
            (*outer).vihl,
            (*outer).proto,
            u16::from_be_bytes((*outer).frags),
        )
    };
    if ether_type != ETH_P_IP.to_be() || vihl != 0x45 || frags & IP_FRAGMENTED != 0 {
        return None;
    }
    match proto {
        IPPROTO_IPIP => Some(IPIP_OVERHEAD),
        IPPROTO_UDP => {
            let ports = ptr_at::<[u8; 4]>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
            // SAFETY: bounds-checked by ptr_at.
            let dst = unsafe { u16::from_be_bytes([(*ports)[2], (*ports)[3]]) };
            (dst == GUE_PORT).then_some(GUE_OVERHEAD)
        }
        _ => None,
    }
}

/// `tunnel_overhead` for an outer IPv6 header: IPv6 in IPv6, or GUE (UDP to GUE_PORT) right
/// after the fixed header. Extension headers on the outer packet (lb writes none) are the
/// kernel's.
#[inline(always)]
fn tunnel6_overhead(ctx: &TcContext) -> Option<u16> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let outer = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (ether_type, next_header) = unsafe { ((*eth).ether_type, (*outer).next_hdr) };
    if ether_type != ETH_P_IPV6.to_be() {
        return None;
    }
    match next_header {
        IPPROTO_IPV6 => Some(IP6IP6_OVERHEAD),
        IPPROTO_UDP => {
            let ports = ptr_at::<[u8; 4]>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
            // SAFETY: bounds-checked by ptr_at.
            let dst = unsafe { u16::from_be_bytes([(*ports)[2], (*ports)[3]]) };
            (dst == GUE_PORT).then_some(GUE6_OVERHEAD)
        }
        _ => None,
    }
}
