//! Stage 5, forward: the kernel's FIB gives the egress device and MACs; the packet leaves by
//! XDP_TX (same real NIC) or a DEVMAP redirect. Reads IFACES and TX_PORTS.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{DropReason, FlowValue, IFACE_XDP_TX, PassReason};

use crate::{
    Verdict,
    csum::Delta,
    maps::{IFACES, TX_PORTS},
    parse::Packet,
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, nat: &FlowValue) -> Result<Verdict, Verdict> {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.key.proto;
    fib.ifindex = ingress;
    // SAFETY: parse::packet bounds-checked the IP header.
    unsafe {
        let ip = &*pkt.ip;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
        fib.__bindgen_anon_2.tos = ip.tos;
    }
    fib.__bindgen_anon_3.ipv4_src = nat.nat_src_addr.0;
    fib.__bindgen_anon_4.ipv4_dst = nat.nat_dst_addr.0;
    // SAFETY: `fib` is a valid, initialised parameter block of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel forwards the rewritten packet itself and resolves the neighbour; its TTL
        // is still untouched, so the kernel's decrement is the only one.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Ok(Verdict::Pass(PassReason::NeighbourUnresolved)),
        BPF_FIB_LKUP_RET_NOT_FWDED => return Ok(Verdict::Pass(PassReason::LocalDestination)),
        BPF_FIB_LKUP_RET_FWD_DISABLED => {
            return Err(Verdict::Drop(DropReason::FibForwardingDisabled));
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            return Err(Verdict::Drop(DropReason::FibNoRoute));
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Verdict::Drop(DropReason::FibFragNeeded)),
        _ => return Err(Verdict::Drop(DropReason::FibOther)),
    }
    let egress = fib.ifindex;
    let Some(iface) = IFACES.get_ptr(&egress) else {
        return Ok(Verdict::Pass(PassReason::EgressNotManaged));
    };
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let iface_flags = unsafe { (*iface).flags };
    // SAFETY: parse::packet bounds-checked the Ethernet and IP headers.
    unsafe {
        let ip = &mut *pkt.ip;
        // TTL shares a 16-bit checksum word with the protocol byte.
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let mut delta = Delta::default();
        delta.replace16(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
        ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        let eth = &mut *pkt.eth;
        eth.dst_addr = fib.__bindgen_anon_6.__bindgen_anon_2.dmac;
        eth.src_addr = fib.__bindgen_anon_6.__bindgen_anon_2.smac;
    }
    if egress == ingress && iface_flags & IFACE_XDP_TX != 0 {
        return Ok(Verdict::Tx);
    }
    TX_PORTS
        .redirect(egress, 0)
        .map(Verdict::Redirect)
        .map_err(|_| Verdict::Drop(DropReason::RedirectFailed))
}
