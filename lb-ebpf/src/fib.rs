//! The kernel's FIB as both hooks' forwarding stages ask it (`forward.rs` for XDP, `tc.rs`),
//! and the TTL decrement of a packet the balancer forwards itself.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
    BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
};
use lb_common::{DropReason, FlowValue, PassReason};
use network_types::ip::Ipv4Hdr;

use crate::{Verdict, csum::Delta};

const AF_INET: u8 = 2;

/// The lookup of a packet of `proto` (its TOS `tos`) that arrived on `ingress`, as `nat`
/// rewrites it.
#[inline(always)]
pub fn params(proto: u8, ingress: u32, tos: u8, nat: &FlowValue) -> FibParams {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.ifindex = ingress;
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = nat.nat_src_addr.0;
    fib.__bindgen_anon_4.ipv4_dst = nat.nat_dst_addr.0;
    fib
}

/// What becomes of a packet for the lookup's answer `rc` when it is one that neither hook
/// forwards by: none but success, an unresolved neighbour and a too-small MTU.
#[inline(always)]
pub fn refused(rc: u32) -> Verdict {
    match rc {
        BPF_FIB_LKUP_RET_NOT_FWDED => Verdict::Pass(PassReason::LocalDestination),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Verdict::Drop(DropReason::FibForwardingDisabled),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Verdict::Drop(DropReason::FibNoRoute)
        }
        _ => Verdict::Drop(DropReason::FibOther),
    }
}

/// One hop less, with the header checksum's change.
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) {
    // TTL shares a 16-bit checksum word with the protocol byte.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let mut delta = Delta::default();
    delta.replace16(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
    ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
}
