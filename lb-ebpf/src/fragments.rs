//! Stage 1d, fragments: a UDP datagram larger than a link's MTU arrives in fragments, and only
//! the first carries the ports that choose its flow. The first fragment is balanced as any
//! datagram and recorded here by the datagram's reassembly key (addresses, protocol, IP
//! identification); the later ones follow it for FRAGMENT_FOLLOW_NS, with the same rewrite of
//! their addresses, to the same place (EDNS answers, large syslog lines). A later fragment
//! that arrives before its first, or of a datagram not balanced, passes to the kernel, which
//! holds it for reassembly as it would without the balancer: reordering before the first
//! fragment is rare on the paths balanced, and buffering in XDP is not possible. Reads FLOWS
//! and IFACES; writes FRAGMENTS and FLOWS' next-hop cache.

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_md},
    helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use lb_common::{
    Be16, Be32, FRAGMENT_FOLLOW_NS, FlowKey, FragmentKey, FragmentValue, PassReason,
    STAT_FIRST_FRAGMENTS, STAT_FRAGMENTS_FOLLOWED,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    Verdict,
    forward::{self, NoHop},
    maps::{FLOWS, FRAGMENTS},
    nat,
    parse::{IPPROTO_UDP, ptr_at},
    stats,
};

/// Records the first fragment of a datagram of the flow `key` (its IP identification `id`,
/// as on the wire), in a BPF function of its own: its stack is not the balancing path's.
#[inline(never)]
pub fn remember_apart(key: *const FlowKey, id: u16) {
    // SAFETY: the caller's parsed key, on its stack for the call.
    let flow = unsafe { *key };
    let fragment = FragmentKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        id: Be16(id),
        proto: flow.proto,
        _pad: 0,
    };
    let value = FragmentValue {
        flow,
        // SAFETY: the helper has no arguments.
        first_seen_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    if FRAGMENTS
        .insert(&fragment, &value, u64::from(BPF_ANY))
        .is_ok()
    {
        stats::count_slot(STAT_FIRST_FRAGMENTS);
    }
}

/// `follow` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn follow_apart(ctx: *mut xdp_md) -> u32 {
    match follow(&XdpContext::new(ctx)) {
        Ok(v) | Err(v) => v.counted(),
    }
}

/// A later fragment (`parse::path` said so): forwarded as its datagram's first
/// fragment was, if that was balanced a moment ago; passed to the kernel otherwise.
#[inline(always)]
fn follow(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let not_ours = Verdict::Pass(PassReason::Fragment);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(not_ours)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, proto, ttl, id, src, dst) = unsafe {
        let ip = &*ip;
        (
            ip.vihl,
            ip.proto,
            ip.ttl,
            u16::from_ne_bytes(ip.id),
            ip.src_addr,
            ip.dst_addr,
        )
    };
    if vihl >> 4 != 4 || ((vihl & 0x0f) as usize) * 4 < Ipv4Hdr::LEN || proto != IPPROTO_UDP {
        return Err(not_ours);
    }
    let fragment = FragmentKey {
        src_addr: Be32::from_bytes(src),
        dst_addr: Be32::from_bytes(dst),
        id: Be16(id),
        proto,
        _pad: 0,
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let first = unsafe { *FRAGMENTS.get_ptr(&fragment).ok_or(not_ours)? };
    // SAFETY: the helper has no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.saturating_sub(first.first_seen_ns) > FRAGMENT_FOLLOW_NS {
        return Err(not_ours);
    }
    let entry = FLOWS.get_ptr_mut(&first.flow).ok_or(not_ours)?;
    if ttl <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    // SAFETY: a value pointer from a map lookup is valid for this program run; `ip` was
    // bounds-checked by ptr_at.
    let backend_id = unsafe {
        let nat = &*entry;
        nat::readdress::<Be32>(&mut *ip, nat.nat_src_addr, nat.nat_dst_addr);
        nat.backend_id
    };
    let hop = match forward::next_hop(ctx, ip, proto, entry, 0) {
        Ok(hop) => hop,
        // A fragment has no DF: the FIB's "too big" is passed for the kernel to fragment.
        Err(NoHop::TooBig { .. }) => return Err(Verdict::Pass(PassReason::NeedsFragmenting)),
        Err(NoHop::Verdict(verdict)) => return Err(verdict),
    };
    stats::count_slot(STAT_FRAGMENTS_FOLLOWED);
    stats::count_backend(backend_id, (ctx.data_end() - ctx.data()) as u64);
    forward::send::<Be32>(ctx, eth, ip, &hop)
}
