//! The address families the balancing path serves, as its stages need them: each family's maps
//! and the fields of its IP header. The stages from flow lookup to forwarding are generic over
//! `Family`: `Be32` is IPv4, `In6` IPv6. Both share one backend id space, so MAGLEV, the
//! counters, SUSPECT, FLOW_COUNTS and the SNAT port bitmaps serve both.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Address, BackendOf, Be32, FlowKeyOf, FlowValueOf, FragmentKeyOf, FragmentValueOf, In6,
    ServiceKeyOf, ServiceOf,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    csum::Delta,
    hop_cache::HopCacheOf,
    maps::{
        BACKENDS, BACKENDS6, FLOW_SCRATCH, FLOW_SCRATCH6, FLOWS, FLOWS6, FRAGMENT_SCRATCH,
        FRAGMENT_SCRATCH6, FRAGMENTS, FRAGMENTS6, FragmentEntryOf, HOP_CACHE, HOP_CACHE6, SERVICES,
        SERVICES6, VIPS, VIPS6,
    },
};

const AF_INET6: u8 = 10;
/// Don't-fragment in IPv4's `frags` field (host order).
const IP_DF: u16 = 0x4000;

pub trait Family: Address {
    /// The family's IP header.
    type Ip;

    fn flows() -> &'static HashMap<FlowKeyOf<Self>, FlowValueOf<Self>>;
    /// A flow value being built, off the stack.
    fn flow_scratch() -> &'static PerCpuArray<FlowValueOf<Self>>;
    /// Each backend's next hop (`hop_cache.rs`).
    fn hop_cache() -> &'static PerCpuArray<HopCacheOf<Self>>;
    /// Fragmented datagrams whose later fragments follow their first (`fragments.rs`).
    fn fragments() -> &'static LruHashMap<FragmentKeyOf<Self>, FragmentValueOf<Self>>;
    fn fragment_scratch() -> &'static PerCpuArray<FragmentEntryOf<Self>>;
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceOf<Self>>;
    fn backends() -> &'static Array<BackendOf<Self>>;
    /// The addresses of the services' VIPs, for traffic with no port (`icmp.rs`).
    fn vips() -> &'static HashMap<Self, u32>;
    /// The header's source and destination addresses.
    fn src(ip: &Self::Ip) -> Self;
    fn dst(ip: &Self::Ip) -> Self;
    /// Adds the change of an address from `old` to `new` to a checksum's `delta`.
    fn replace(delta: &mut Delta, old: Self, new: Self);
    /// The address's part of a checksum: the sum of its 16-bit words as the packet holds them.
    fn sum(self) -> u32;
    /// The header's hop limit (IPv4's TTL).
    fn hop_limit(ip: &Self::Ip) -> u8;
    /// One hop less, with IPv4's header checksum.
    fn decrement_hop_limit(ip: &mut Self::Ip);
    /// Writes the addresses; `change` is theirs, for IPv4's header checksum.
    fn write_addrs(ip: &mut Self::Ip, src: Self, dst: Self, change: Delta);
    /// The packet's length, header included (IPv4's total length).
    fn packet_len(ip: &Self::Ip) -> u16;
    /// Whether a packet too big for its next hop must be refused (its sender told) rather
    /// than fragmented: IPv4 with DF, and every IPv6 packet (routers do not fragment it).
    fn must_not_fragment(ip: &Self::Ip) -> bool;
    /// The FIB lookup of a packet of `proto` arriving on `ingress`, as `nat` rewrites it.
    fn fib_params(ip: &Self::Ip, proto: u8, ingress: u32, nat: &FlowValueOf<Self>) -> FibParams;
}

#[inline(always)]
fn word_sum(w: u32) -> u32 {
    (w & 0xffff) + (w >> 16)
}

/// An IPv6 address read from a header, 16 bits at a time: after the 14-byte Ethernet header,
/// its words are only 2-aligned, and byte by byte would take four times the instructions (and
/// their registers' spills).
#[inline(always)]
pub fn read_in6(at: *const [u8; 16]) -> In6 {
    // SAFETY: the caller bounds-checked the address; it is 2-aligned in the frame.
    let h = unsafe { *at.cast::<[u16; 8]>() };
    let w = |i: usize| u32::from(h[i]) | u32::from(h[i + 1]) << 16;
    In6([w(0), w(2), w(4), w(6)])
}

#[inline(always)]
fn write_in6(at: *mut [u8; 16], addr: In6) {
    let mut h = [0u16; 8];
    for i in 0..4 {
        h[i * 2] = addr.0[i] as u16;
        h[i * 2 + 1] = (addr.0[i] >> 16) as u16;
    }
    // SAFETY: as in `read_in6`.
    unsafe { *at.cast::<[u16; 8]>() = h };
}

impl Family for Be32 {
    type Ip = Ipv4Hdr;

    #[inline(always)]
    fn flows() -> &'static HashMap<FlowKeyOf<Self>, FlowValueOf<Self>> {
        &FLOWS
    }
    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<FlowValueOf<Self>> {
        &FLOW_SCRATCH
    }
    #[inline(always)]
    fn hop_cache() -> &'static PerCpuArray<HopCacheOf<Self>> {
        &HOP_CACHE
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragmentKeyOf<Self>, FragmentValueOf<Self>> {
        &FRAGMENTS
    }
    #[inline(always)]
    fn fragment_scratch() -> &'static PerCpuArray<FragmentEntryOf<Self>> {
        &FRAGMENT_SCRATCH
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceOf<Self>> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<Self>> {
        &BACKENDS
    }
    #[inline(always)]
    fn vips() -> &'static HashMap<Self, u32> {
        &VIPS
    }
    #[inline(always)]
    fn src(ip: &Ipv4Hdr) -> Self {
        Be32::from_bytes(ip.src_addr)
    }
    #[inline(always)]
    fn dst(ip: &Ipv4Hdr) -> Self {
        Be32::from_bytes(ip.dst_addr)
    }
    #[inline(always)]
    fn replace(delta: &mut Delta, old: Self, new: Self) {
        delta.replace32(old.0, new.0);
    }
    #[inline(always)]
    fn sum(self) -> u32 {
        word_sum(self.0)
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv4Hdr) -> u8 {
        ip.ttl
    }
    #[inline(always)]
    fn decrement_hop_limit(ip: &mut Ipv4Hdr) {
        crate::fib::decrement_ttl(ip);
    }
    #[inline(always)]
    fn write_addrs(ip: &mut Ipv4Hdr, src: Self, dst: Self, change: Delta) {
        ip.src_addr = src.to_bytes();
        ip.dst_addr = dst.to_bytes();
        ip.check = change.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
    }
    #[inline(always)]
    fn packet_len(ip: &Ipv4Hdr) -> u16 {
        u16::from_be_bytes(ip.tot_len)
    }
    #[inline(always)]
    fn must_not_fragment(ip: &Ipv4Hdr) -> bool {
        u16::from_be_bytes(ip.frags) & IP_DF != 0
    }
    #[inline(always)]
    fn fib_params(ip: &Ipv4Hdr, proto: u8, ingress: u32, nat: &FlowValueOf<Self>) -> FibParams {
        crate::fib::params(proto, ingress, ip.tos, nat)
    }
}

impl Family for In6 {
    type Ip = Ipv6Hdr;

    #[inline(always)]
    fn flows() -> &'static HashMap<FlowKeyOf<Self>, FlowValueOf<Self>> {
        &FLOWS6
    }
    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<FlowValueOf<Self>> {
        &FLOW_SCRATCH6
    }
    #[inline(always)]
    fn hop_cache() -> &'static PerCpuArray<HopCacheOf<Self>> {
        &HOP_CACHE6
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragmentKeyOf<Self>, FragmentValueOf<Self>> {
        &FRAGMENTS6
    }
    #[inline(always)]
    fn fragment_scratch() -> &'static PerCpuArray<FragmentEntryOf<Self>> {
        &FRAGMENT_SCRATCH6
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Self>, ServiceOf<Self>> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<Self>> {
        &BACKENDS6
    }
    #[inline(always)]
    fn vips() -> &'static HashMap<Self, u32> {
        &VIPS6
    }
    #[inline(always)]
    fn src(ip: &Ipv6Hdr) -> Self {
        read_in6(&raw const ip.src_addr)
    }
    #[inline(always)]
    fn dst(ip: &Ipv6Hdr) -> Self {
        read_in6(&raw const ip.dst_addr)
    }
    /// The eight words' changes at once: each adds its complement (0xffff minus it) and its
    /// new value.
    #[inline(always)]
    fn replace(delta: &mut Delta, old: Self, new: Self) {
        *delta = delta.and(Delta::from_sum(8 * 0xffff - old.sum() + new.sum()));
    }
    #[inline(always)]
    fn sum(self) -> u32 {
        let [a, b, c, d] = self.0;
        word_sum(a) + word_sum(b) + word_sum(c) + word_sum(d)
    }
    #[inline(always)]
    fn hop_limit(ip: &Ipv6Hdr) -> u8 {
        ip.hop_limit
    }
    #[inline(always)]
    fn decrement_hop_limit(ip: &mut Ipv6Hdr) {
        ip.hop_limit -= 1;
    }
    #[inline(always)]
    fn write_addrs(ip: &mut Ipv6Hdr, src: Self, dst: Self, _: Delta) {
        write_in6(&raw mut ip.src_addr, src);
        write_in6(&raw mut ip.dst_addr, dst);
    }
    #[inline(always)]
    fn packet_len(ip: &Ipv6Hdr) -> u16 {
        u16::from_be_bytes(ip.payload_len).saturating_add(Ipv6Hdr::LEN as u16)
    }
    #[inline(always)]
    fn must_not_fragment(_: &Ipv6Hdr) -> bool {
        true
    }
    #[inline(always)]
    fn fib_params(ip: &Ipv6Hdr, proto: u8, ingress: u32, nat: &FlowValueOf<Self>) -> FibParams {
        // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
        let mut fib: FibParams = unsafe { core::mem::zeroed() };
        fib.family = AF_INET6;
        fib.l4_protocol = proto;
        fib.ifindex = ingress;
        // The flow label and traffic class, as the header has them (network order).
        fib.__bindgen_anon_2.flowinfo = u32::from_ne_bytes(ip.vcf) & 0x0fff_ffff_u32.to_be();
        fib.__bindgen_anon_3.ipv6_src = nat.nat_src_addr.0;
        fib.__bindgen_anon_4.ipv6_dst = nat.nat_dst_addr.0;
        fib
    }
}
