//! Stage 1b, ICMP and ICMPv6: an echo request to a VIP is answered by the balancer, as a host
//! holding the address would, so that operators can ping a VIP (as Katran's and IPVS's hosts
//! answer); an error about a balanced flow goes to `icmp_error.rs`. Any other ICMP passes to
//! the kernel: neighbour discovery, router advertisements and MLD among it. Reads VIPS (VIPS6)
//! and IFACES; writes ICMP_BUDGET.

use aya_ebpf::{bindings::xdp_md, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    Be32, DropReason, In6, PassReason, STAT_ICMP_ECHO_REPLIED,
    icmp::{
        ECHO_REPLIES_PER_SEC_PER_CPU, ICMP_BUDGET_ECHO, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH,
        ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_PARAMETER_PROBLEM,
        ICMPV6_TIME_EXCEEDED,
    },
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    Verdict,
    csum::Delta,
    family::Family,
    forward, icmp_error,
    maps::ICMP_BUDGET,
    parse::{IP_MF_AND_OFFSET, ptr_at},
    stats,
};

/// What an echo reply changes per family.
pub trait Pinged: Family {
    const ECHO_REQUEST: u8;
    const ECHO_REPLY: u8;
    /// Sets the hop limit (IPv4's TTL, with its header checksum).
    fn set_hop_limit(ip: &mut Self::Ip, hop_limit: u8);
}

impl Pinged for Be32 {
    const ECHO_REQUEST: u8 = ICMP_ECHO_REQUEST;
    const ECHO_REPLY: u8 = ICMP_ECHO_REPLY;
    /// The TTL shares a checksum word with the protocol byte.
    #[inline(always)]
    fn set_hop_limit(ip: &mut Ipv4Hdr, hop_limit: u8) {
        let mut delta = Delta::default();
        delta.replace16(
            u16::from_ne_bytes([ip.ttl, ip.proto]),
            u16::from_ne_bytes([hop_limit, ip.proto]),
        );
        ip.ttl = hop_limit;
        ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
    }
}

impl Pinged for In6 {
    const ECHO_REQUEST: u8 = ICMPV6_ECHO_REQUEST;
    const ECHO_REPLY: u8 = ICMPV6_ECHO_REPLY;
    #[inline(always)]
    fn set_hop_limit(ip: &mut Ipv6Hdr, hop_limit: u8) {
        ip.hop_limit = hop_limit;
    }
}

/// The TTL of an answer the balancer originates, as Linux's default.
const ANSWER_TTL: u8 = 64;

/// `handle` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn handle_apart(ctx: *mut xdp_md) -> u32 {
    match handle(&XdpContext::new(ctx)) {
        Ok(v) | Err(v) => v.counted(),
    }
}

/// An IPv4 ICMP frame (`parse::path` said so): the echo reply if it pings a VIP, within the
/// CPU's budget; an error about a flow translated; passed to the kernel otherwise.
#[inline(always)]
fn handle(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let not_ours = Verdict::Pass(PassReason::NotTcpUdp);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(not_ours)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, frags) = unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags)) };
    // The header length comes from the packet; the mask bounds it (60) for the verifier.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Verdict::Pass(PassReason::MalformedIpv4));
    }
    if frags & IP_MF_AND_OFFSET != 0 {
        return Err(Verdict::Pass(PassReason::Fragment));
    }
    let icmp_at = EthHdr::LEN + ihl;
    // Type, code and checksum.
    let icmp: *mut [u8; 4] = ptr_at(ctx, icmp_at).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { *icmp };
    match head[0] {
        ICMP_ECHO_REQUEST if head[1] == 0 => echo::<Be32>(ctx, eth, ip, icmp),
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
            icmp_error::translate::<Be32>(ctx, eth, ip, icmp_at)
        }
        _ => Err(not_ours),
    }
}

/// `handle6` in a BPF function of its own (see `lb_xdp`): the XDP action, counted.
#[inline(never)]
pub fn handle6_apart(ctx: *mut xdp_md) -> u32 {
    match handle6(&XdpContext::new(ctx)) {
        Ok(v) | Err(v) => v.counted(),
    }
}

/// An ICMPv6 frame (`parse::path` said so: ICMPv6 right after the fixed header), as `handle`.
#[inline(always)]
fn handle6(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let not_ours = Verdict::Pass(PassReason::NotTcpUdp);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(not_ours)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Verdict::Pass(PassReason::MalformedIpv6));
    }
    let icmp_at = EthHdr::LEN + Ipv6Hdr::LEN;
    let icmp: *mut [u8; 4] = ptr_at(ctx, icmp_at).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { *icmp };
    match head[0] {
        ICMPV6_ECHO_REQUEST if head[1] == 0 => echo::<In6>(ctx, eth, ip, icmp),
        ICMPV6_DEST_UNREACH
        | ICMPV6_PACKET_TOO_BIG
        | ICMPV6_TIME_EXCEEDED
        | ICMPV6_PARAMETER_PROBLEM => icmp_error::translate::<In6>(ctx, eth, ip, icmp_at),
        _ => Err(not_ours),
    }
}

/// One of this CPU's ICMP answers of `slot` (at most `per_sec` a second); `limited` once they
/// are spent.
#[inline(always)]
pub fn spend(slot: u32, per_sec: u32, limited: DropReason) -> Result<(), Verdict> {
    let budget = ICMP_BUDGET
        .get_ptr_mut(slot)
        .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
    // SAFETY: a per-CPU slot, only this CPU writes it; the helper has no arguments.
    if unsafe { (*budget).take_within(bpf_ktime_get_coarse_ns(), per_sec) } {
        Ok(())
    } else {
        Err(Verdict::Drop(limited))
    }
}

/// The echo reply to a ping of a VIP, in place, back out of the ingress device.
#[inline(always)]
fn echo<A: Pinged>(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut A::Ip,
    icmp: *mut [u8; 4],
) -> Result<Verdict, Verdict> {
    // SAFETY: the caller bounds-checked the headers.
    let (src, dst, head) = unsafe { (A::src(&*ip), A::dst(&*ip), *icmp) };
    if A::vips().get_ptr(&dst).is_none() {
        return Err(Verdict::Pass(PassReason::NotTcpUdp));
    }
    spend(
        ICMP_BUDGET_ECHO,
        ECHO_REPLIES_PER_SEC_PER_CPU,
        DropReason::IcmpEchoLimited,
    )?;
    // SAFETY: the caller bounds-checked the headers.
    unsafe {
        let eth = &mut *eth;
        core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
        // Swapped addresses leave the sums they are in (IPv4's header, ICMPv6's pseudo-header)
        // as they are.
        A::write_addrs(&mut *ip, dst, src, Delta::default());
        A::set_hop_limit(&mut *ip, ANSWER_TTL);
        let mut delta = Delta::default();
        delta.replace16(
            u16::from_ne_bytes([A::ECHO_REQUEST, 0]),
            u16::from_ne_bytes([A::ECHO_REPLY, 0]),
        );
        let check = delta
            .apply(u16::from_ne_bytes([head[2], head[3]]))
            .to_ne_bytes();
        *icmp = [A::ECHO_REPLY, 0, check[0], check[1]];
    }
    stats::count_slot(STAT_ICMP_ECHO_REPLIED);
    Ok(forward::back_out(ctx))
}
