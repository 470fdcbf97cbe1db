//! Stage 1d, fragments: a UDP datagram larger than a link's MTU arrives in fragments, and only
//! the first carries the ports that choose its flow. The first fragment is balanced as any
//! datagram and recorded here by the datagram's reassembly key (addresses, protocol, IP
//! identification); the later ones follow it for FRAGMENT_FOLLOW_NS, with the same rewrite of
//! their addresses, to the same place (EDNS answers, large syslog lines). A later fragment
//! that arrives before its first, or of a datagram not balanced, passes to the kernel, which
//! holds it for reassembly as it would without the balancer: reordering before the first
//! fragment is rare on the paths balanced, and buffering in XDP is not possible. IPv6's
//! fragments are followed the same way, by their fragment header's identification (RFC 8200:
//! only the source fragments, and the header sits right after the fixed one, `parse.rs`).
//! Both hooks follow fragments: XDP by `follow_apart` here, tc (a container's answer) by its
//! own, over the same `readdress`. Reads FLOWS(6) and IFACES; writes FRAGMENTS(6),
//! FRAGMENT_SCRATCH(6) and FLOWS' next-hop cache.

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_md},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use lb_common::{
    Be32, DropReason, FRAGMENT_FOLLOW_NS, FlowKeyOf, FlowValueOf, FragmentKeyOf, In6, PassReason,
    STAT_FIRST_FRAGMENTS, STAT_FRAGMENTS_FOLLOWED,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Verdict,
    family::{Family, read_in6},
    forward::{self, NoHop},
    frame::Frame,
    nat,
    parse::{
        IP_OFFSET, IPPROTO_FRAGMENT, IPPROTO_UDP, IPV6_FRAGMENT_LEN, IPV6_OFFSET_MASK, Packet,
        ptr_at,
    },
    stats,
};

/// Records the first fragment of a datagram of the flow `key` (its identification `id`, as
/// `Packet::first_fragment_id` gives it), in a BPF function of its own. The entry is built in
/// the family's scratch slot: the balancing path that calls this has no stack to lend it.
#[inline(never)]
pub fn remember_apart<A: Family>(key: *const FlowKeyOf<A>, id: u32) {
    let Some(entry) = A::fragment_scratch().get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the caller's parsed key, on its stack for the call; a per-CPU array slot, this
    // CPU's alone for this program run.
    let (flow, entry) = unsafe { (&*key, &mut *entry) };
    entry.key.src_addr = flow.src_addr;
    entry.key.dst_addr = flow.dst_addr;
    entry.key.id = id;
    entry.key.proto = flow.proto;
    entry.key._pad = [0; 3];
    entry.value.flow = *flow;
    // SAFETY: the helper has no arguments.
    entry.value.first_seen_ns = unsafe { bpf_ktime_get_coarse_ns() };
    if A::fragments()
        .insert(&entry.key, &entry.value, u64::from(BPF_ANY))
        .is_ok()
    {
        stats::count_slot(STAT_FIRST_FRAGMENTS);
    }
}

/// `follow` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn follow_apart<A: Fragmented>(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    let result = A::later_fragment(&ctx).and_then(|key| follow(&ctx, &key));
    match result {
        Ok(v) | Err(v) => v.counted(),
    }
}

/// A family's fragments, as the hooks meet them.
pub trait Fragmented: Family {
    /// The reassembly key of the frame's datagram, if the frame is a later fragment (its offset
    /// not 0) of a UDP datagram. (The headers are not handed back: a pointer in the result
    /// spills in a way the verifier refuses; callers find them again.)
    fn later_fragment(ctx: &impl Frame) -> Result<FragmentKeyOf<Self>, Verdict>;
    /// The identification of `pkt`'s datagram if `pkt` is its first fragment
    /// (`Packet::first_fragment_id`), whose later fragments must follow it.
    fn first_fragment_id(pkt: &Packet<Self>) -> Option<u32>;
    /// What a later fragment too big for its next hop gets.
    const TOO_BIG: Verdict;
}

impl Fragmented for Be32 {
    #[inline(always)]
    fn later_fragment(ctx: &impl Frame) -> Result<FragmentKeyOf<Self>, Verdict> {
        let not_ours = Verdict::Pass(PassReason::Fragment);
        let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
        // SAFETY: bounds-checked by ptr_at.
        let (vihl, frags, proto, id, src, dst) = unsafe {
            let ip = &*ip;
            let frags = u16::from_be_bytes(ip.frags);
            (ip.vihl, frags, ip.proto, ip.id, ip.src_addr, ip.dst_addr)
        };
        if vihl >> 4 != 4
            || ((vihl & 0x0f) as usize) * 4 < Ipv4Hdr::LEN
            || proto != IPPROTO_UDP
            || frags & IP_OFFSET == 0
        {
            return Err(not_ours);
        }
        let key = FragmentKeyOf {
            src_addr: Be32::from_bytes(src),
            dst_addr: Be32::from_bytes(dst),
            id: u32::from(u16::from_ne_bytes(id)),
            proto,
            _pad: [0; 3],
        };
        Ok(key)
    }
    #[inline(always)]
    fn first_fragment_id(pkt: &Packet) -> Option<u32> {
        pkt.first_fragment_id()
    }
    /// A fragment has no DF: the FIB's "too big" is passed for the kernel to fragment.
    const TOO_BIG: Verdict = Verdict::Pass(PassReason::NeedsFragmenting);
}

impl Fragmented for In6 {
    #[inline(always)]
    fn later_fragment(ctx: &impl Frame) -> Result<FragmentKeyOf<Self>, Verdict> {
        let not_ours = Verdict::Pass(PassReason::Fragment);
        let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
        let fragment: *mut [u8; IPV6_FRAGMENT_LEN] =
            ptr_at(ctx, EthHdr::LEN + Ipv6Hdr::LEN).ok_or(not_ours)?;
        // SAFETY: bounds-checked by ptr_at.
        let (version, next_hdr, f) = unsafe { ((*ip).vcf[0] >> 4, (*ip).next_hdr, *fragment) };
        let offset = u16::from_be_bytes([f[2], f[3]]) & IPV6_OFFSET_MASK;
        if version != 6 || next_hdr != IPPROTO_FRAGMENT || f[0] != IPPROTO_UDP || offset == 0 {
            return Err(not_ours);
        }
        // SAFETY: as above.
        let key = unsafe {
            FragmentKeyOf {
                src_addr: read_in6(&raw const (*ip).src_addr),
                dst_addr: read_in6(&raw const (*ip).dst_addr),
                id: u32::from_ne_bytes([f[4], f[5], f[6], f[7]]),
                proto: IPPROTO_UDP,
                _pad: [0; 3],
            }
        };
        Ok(key)
    }
    #[inline(always)]
    fn first_fragment_id(pkt: &Packet<In6>) -> Option<u32> {
        pkt.first_fragment_id()
    }
    /// Routers do not fragment IPv6: dropped, as a first fragment too big is (`too_big.rs`).
    const TOO_BIG: Verdict = Verdict::Drop(DropReason::FibFragNeeded);
}

/// A later fragment of the datagram `fragment`: forwarded as its datagram's first fragment
/// was, if that was balanced a moment ago; passed to the kernel otherwise.
#[inline(always)]
fn follow<A: Fragmented>(
    ctx: &XdpContext,
    fragment: &FragmentKeyOf<A>,
) -> Result<Verdict, Verdict> {
    let malformed = Verdict::Drop(DropReason::Inconsistent);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(malformed)?;
    let ip: *mut A::Ip = ptr_at(ctx, EthHdr::LEN).ok_or(malformed)?;
    let entry = readdress(ip, fragment)?;
    let hop = match forward::next_hop(ctx, ip, IPPROTO_UDP, entry, 0) {
        Ok(hop) => hop,
        Err(NoHop::TooBig { .. }) => return Err(A::TOO_BIG),
        Err(NoHop::Verdict(verdict)) => return Err(verdict),
    };
    followed(entry, (ctx.data_end() - ctx.data()) as u64);
    forward::send::<A>(ctx, eth, ip, &hop)
}

/// The flow entry of the later fragment of `fragment` whose IP header is `ip` (bounds-checked
/// by the caller), that header readdressed as the datagram's first fragment was, if that was
/// balanced a moment ago; passed to the kernel otherwise. Both hooks forward it then.
#[inline(always)]
pub fn readdress<A: Fragmented>(
    ip: *mut A::Ip,
    fragment: &FragmentKeyOf<A>,
) -> Result<*mut FlowValueOf<A>, Verdict> {
    let not_ours = Verdict::Pass(PassReason::Fragment);
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let first = unsafe { &*A::fragments().get_ptr(fragment).ok_or(not_ours)? };
    // SAFETY: the helper has no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.saturating_sub(first.first_seen_ns) > FRAGMENT_FOLLOW_NS {
        return Err(not_ours);
    }
    let entry = A::flows().get_ptr_mut(&first.flow).ok_or(not_ours)?;
    // SAFETY: `ip` was bounds-checked by the caller.
    if A::hop_limit(unsafe { &*ip }) <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    // SAFETY: a value pointer from a map lookup is valid for this program run; `ip` was
    // bounds-checked by the caller.
    unsafe {
        let nat = &*entry;
        nat::readdress::<A>(&mut *ip, nat.nat_src_addr, nat.nat_dst_addr);
    }
    Ok(entry)
}

/// Counts a later fragment of the flow `entry`, `len` bytes, as forwarded.
#[inline(always)]
pub fn followed<A: Family>(entry: *mut FlowValueOf<A>, len: u64) {
    stats::count_slot(STAT_FRAGMENTS_FOLLOWED);
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    stats::count_backend(unsafe { (*entry).backend_id }, len);
}
