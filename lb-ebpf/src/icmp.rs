//! Stage 1b, ICMP: an echo request to a VIP is answered by the balancer, as a host holding the
//! address would, so that operators can ping a VIP (as Katran's and IPVS's hosts answer). Any
//! other ICMP passes to the kernel as before. Reads VIPS and IFACES; writes ICMP_BUDGET.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{
    Be32, DropReason, PassReason, STAT_ICMP_ECHO_REPLIED, reset::ECHO_REPLIES_PER_SEC_PER_CPU,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    Verdict,
    csum::Delta,
    forward,
    maps::{ICMP_BUDGET, IFACES, VIPS},
    parse::ptr_at,
    stats,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// The TTL of an answer the balancer originates, as Linux's default.
const ANSWER_TTL: u8 = 64;

/// A frame that is IPv4 but neither TCP nor UDP (`parse::packet` said so): the echo reply if
/// it pings a VIP, within the CPU's budget; passed to the kernel otherwise.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let not_ours = Verdict::Pass(PassReason::NotTcpUdp);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(not_ours)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, proto, dst) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).dst_addr) };
    if proto != IPPROTO_ICMP {
        return Err(not_ours);
    }
    // parse::packet checked the header length; the mask bounds it for the verifier.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // Type, code and checksum.
    let icmp: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN + ihl).ok_or(not_ours)?;
    // SAFETY: bounds-checked by ptr_at.
    let head = unsafe { *icmp };
    if head[0] != ICMP_ECHO_REQUEST
        || head[1] != 0
        || VIPS.get_ptr(&Be32::from_bytes(dst)).is_none()
    {
        return Err(not_ours);
    }
    let budget = ICMP_BUDGET
        .get_ptr_mut(0)
        .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
    // SAFETY: a per-CPU slot, only this CPU writes it; the helper has no arguments.
    if !unsafe { (*budget).take_within(bpf_ktime_get_coarse_ns(), ECHO_REPLIES_PER_SEC_PER_CPU) } {
        return Err(Verdict::Drop(DropReason::IcmpEchoLimited));
    }
    // SAFETY: bounds-checked by ptr_at above.
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
    let ingress = ctx.ingress_ifindex() as u32;
    let flags = IFACES.get_ptr(&ingress).map_or(0, |iface| {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        unsafe { (*iface).flags }
    });
    forward::transmit(ingress, flags, ingress)
}
