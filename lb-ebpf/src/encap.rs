//! Stage 5 of DSR's encapsulated forms: the packet, untouched, goes inside an IPv4 header
//! (IPIP), or IPv4 and UDP (GUE), from the flow's pool address to its backend
//! (`lb_common::tunnel`), out to the next hop the FIB gave for the backend; an IPv6 packet
//! inside IPv6 the same ways. The backend's `lb decap` strips it. Touches no map.

use aya_ebpf::{EbpfContext as _, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    DropReason, FLOW_GUE, FlowValue, FlowValueOf, IFACE_VIA_STACK, In6,
    tunnel::{
        GUE_HEADERS_LEN, GUE_OVERHEAD, GUE6_HEADERS_LEN, GUE6_OVERHEAD, IP6IP6_HEADERS_LEN,
        IP6IP6_OVERHEAD, IPIP_HEADERS_LEN, IPIP_OVERHEAD, Ipip, Tunnel6, write_gue_headers,
        write_gue6_headers, write_ip6ip6_headers, write_ipip_headers,
    },
};

use crate::{
    Verdict,
    forward::{self, NextHop},
    parse::{Packet, ptr_at},
};

/// Don't-fragment in IPv4's `frags` field (host order).
const IP_DF: u16 = 0x4000;

/// Encapsulates `pkt` of the flow `nat` as its FLOW_IPIP or FLOW_GUE says and sends it to
/// `hop`. Like any DSR packet, one the kernel would have to forward (into a bridge) cannot go
/// up.
#[inline(always)]
pub fn tunnel(
    ctx: &XdpContext,
    pkt: &Packet,
    nat: &FlowValue,
    hop: &NextHop,
) -> Result<Verdict, Verdict> {
    let cannot = Verdict::Drop(DropReason::DsrCannotForward);
    if hop.flags & IFACE_VIA_STACK != 0 {
        return Err(cannot);
    }
    // SAFETY: parse::packet bounds-checked the IP header.
    let (tos, inner_len, frags) = unsafe {
        let ip = &*pkt.ip;
        (
            ip.tos,
            u16::from_be_bytes(ip.tot_len),
            u16::from_be_bytes(ip.frags),
        )
    };
    let tunnel = Ipip {
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        src_addr: nat.nat_src_addr.to_bytes(),
        dst_addr: nat.nat_dst_addr.to_bytes(),
        inner_len,
        tos,
        df: frags & IP_DF != 0,
    };
    let gue = nat.flags & FLOW_GUE != 0;
    let overhead = if gue { GUE_OVERHEAD } else { IPIP_OVERHEAD };
    // SAFETY: the context pointer is the program's own; the packet pointers in `pkt` are not
    // used after this. XDP_PACKET_HEADROOM leaves room for the outer headers.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -i32::from(overhead)) } != 0 {
        return Err(cannot);
    }
    // The old Ethernet header now lies under the outer ones: all are written whole.
    if gue {
        let out = ptr_at::<[u8; GUE_HEADERS_LEN]>(ctx, 0).ok_or(cannot)?;
        // SAFETY: bounds-checked by ptr_at.
        write_gue_headers(unsafe { &mut *out }, &tunnel, nat.nat_src_port.to_host());
    } else {
        let out = ptr_at::<[u8; IPIP_HEADERS_LEN]>(ctx, 0).ok_or(cannot)?;
        // SAFETY: bounds-checked by ptr_at.
        write_ipip_headers(unsafe { &mut *out }, &tunnel);
    }
    forward::transmit(hop.ifindex, hop.flags, ctx.ingress_ifindex() as u32)
}

/// `tunnel` for an IPv6 packet: inside IPv6 (IPv6-in-IPv6, or IPv6 and UDP for GUE), its flow
/// label the flow's hash.
#[inline(always)]
pub fn tunnel6(
    ctx: &XdpContext,
    pkt: &Packet<In6>,
    nat: &FlowValueOf<In6>,
    hop: &NextHop,
) -> Result<Verdict, Verdict> {
    let cannot = Verdict::Drop(DropReason::DsrCannotForward);
    if hop.flags & IFACE_VIA_STACK != 0 {
        return Err(cannot);
    }
    // SAFETY: parse::packet6 bounds-checked the IP header.
    let (vcf, payload_len) = unsafe {
        let ip = &*pkt.ip;
        (ip.vcf, u16::from_be_bytes(ip.payload_len))
    };
    let tunnel = Tunnel6 {
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        src_addr: nat.nat_src_addr.to_bytes(),
        dst_addr: nat.nat_dst_addr.to_bytes(),
        inner_len: payload_len.saturating_add(40),
        traffic_class: (vcf[0] << 4) | (vcf[1] >> 4),
        flow_label: pkt.key.hash(),
    };
    let gue = nat.flags & FLOW_GUE != 0;
    let overhead = if gue { GUE6_OVERHEAD } else { IP6IP6_OVERHEAD };
    // SAFETY: as in `tunnel`.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -i32::from(overhead)) } != 0 {
        return Err(cannot);
    }
    if gue {
        let out = ptr_at::<[u8; GUE6_HEADERS_LEN]>(ctx, 0).ok_or(cannot)?;
        // SAFETY: bounds-checked by ptr_at.
        write_gue6_headers(unsafe { &mut *out }, &tunnel, nat.nat_src_port.to_host());
    } else {
        let out = ptr_at::<[u8; IP6IP6_HEADERS_LEN]>(ctx, 0).ok_or(cannot)?;
        // SAFETY: bounds-checked by ptr_at.
        write_ip6ip6_headers(unsafe { &mut *out }, &tunnel);
    }
    forward::transmit(hop.ifindex, hop.flags, ctx.ingress_ifindex() as u32)
}
