//! Stage 1b, ICMP: an echo request to a VIP is answered by the balancer, as a host holding the
//! address would, so that operators can ping a VIP (as Katran's and IPVS's hosts answer); an
//! error about a balanced flow goes to `icmp_error.rs`. Any other ICMP passes to the kernel.
//! Reads VIPS and IFACES; writes ICMP_BUDGET.

use aya_ebpf::{bindings::xdp_md, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    Be32, DropReason, PassReason, STAT_ICMP_ECHO_REPLIED,
    icmp::{
        ECHO_REPLIES_PER_SEC_PER_CPU, ICMP_BUDGET_ECHO, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    Verdict,
    csum::Delta,
    forward, icmp_error,
    maps::{ICMP_BUDGET, VIPS},
    parse::{IP_MF_AND_OFFSET, ptr_at},
    stats,
};

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
        ICMP_ECHO_REQUEST if head[1] == 0 => echo(ctx, eth, ip, icmp),
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
            icmp_error::translate(ctx, eth, ip, icmp_at)
        }
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
fn echo(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    icmp: *mut [u8; 4],
) -> Result<Verdict, Verdict> {
    // SAFETY: the caller bounds-checked the headers.
    let (dst, head) = unsafe { ((*ip).dst_addr, *icmp) };
    if VIPS.get_ptr(&Be32::from_bytes(dst)).is_none() {
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
        let ip = &mut *ip;
        // Swapped addresses leave the header's sum as it is; the TTL shares a checksum word
        // with the protocol byte.
        core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
        let mut delta = Delta::default();
        delta.replace16(
            u16::from_ne_bytes([ip.ttl, ip.proto]),
            u16::from_ne_bytes([ANSWER_TTL, ip.proto]),
        );
        ip.ttl = ANSWER_TTL;
        ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        let mut delta = Delta::default();
        delta.replace16(
            u16::from_ne_bytes([ICMP_ECHO_REQUEST, 0]),
            u16::from_ne_bytes([ICMP_ECHO_REPLY, 0]),
        );
        let check = delta
            .apply(u16::from_ne_bytes([head[2], head[3]]))
            .to_ne_bytes();
        *icmp = [ICMP_ECHO_REPLY, 0, check[0], check[1]];
    }
    stats::count_slot(STAT_ICMP_ECHO_REPLIED);
    Ok(forward::back_out(ctx))
}
