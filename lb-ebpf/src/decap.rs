//! `lb decap`'s entry, on a DSR backend's interface (tc ingress): an IPIP or GUE packet whose
//! inner destination is a VIP it was given (DECAP_VIPS) loses its outer headers and goes on to
//! the stack as the client sent it, to the VIP on the backend's loopback. Everything else goes on
//! untouched. Shares nothing with the balancer but the object and the counters' layout.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_skb_adjust_room,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    Be32, STAT_DECAP_UNKNOWN_VIP, STAT_DECAPSULATED,
    tunnel::{GUE_OVERHEAD, GUE_PORT, IPIP_OVERHEAD, IPPROTO_IPIP},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    maps::DECAP_VIPS,
    parse::{ETH_P_IP, ptr_at},
    stats,
};

/// Ethernet, the outer IPv4 and UDP headers (no options) and the inner IPv4 header's fixed part.
const HEADERS: u32 = (EthHdr::LEN + 2 * Ipv4Hdr::LEN + 8) as u32;
/// More fragments, and the fragment offset, in IPv4's `frags` field (host order).
const IP_FRAGMENTED: u16 = 0x3fff;
const IPPROTO_UDP: u8 = 17;

#[classifier]
pub fn lb_decap(ctx: TcContext) -> i32 {
    if ctx.pull_data(ctx.len().min(HEADERS)).is_err() {
        return TC_ACT_UNSPEC;
    }
    let Some(overhead) = tunnel_overhead(&ctx) else {
        return TC_ACT_UNSPEC;
    };
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
    // The flag clears the tunnel's GSO types too (IPIP's and UDP tunnels'), GRO-merged
    // packets included.
    let flags = u64::from(BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
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
