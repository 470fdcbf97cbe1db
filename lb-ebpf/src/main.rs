//! The load balancer's data path: parse, look up, choose, rewrite, forward. Each stage is a
//! module and returns `Result<T, Verdict>`: `Ok` carries the packet on, `Err` ends it with a
//! counted verdict. Traffic that is not a service's passes to the kernel untouched. Each hook
//! has an entry module of its own (`xdp.rs`, `tc.rs`, `sock.rs`; `decap.rs` is `lb decap`'s,
//! on a DSR backend), over the shared stages and maps.
#![no_std]
#![no_main]
// The target's core has no atomic read-modify-write types; the intrinsic lowers to BPF_ATOMIC.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod csum;
mod debug_log;
mod decap;
mod encap;
mod expiry;
mod family;
mod fib;
mod flow;
mod flow_count;
mod forward;
mod fragments;
mod frame;
mod hop_cache;
mod icmp;
mod icmp_error;
mod maps;
mod mss;
mod nat;
mod parse;
mod reset;
mod select;
mod service;
mod snat;
mod sock;
mod stats;
mod suspect;
mod tc;
mod tcp_options;
mod timestamps;
mod too_big;
mod xdp;
mod xdp6;

use lb_common::{DropReason, PassReason};

/// What happens to a packet, and why.
#[derive(Clone, Copy)]
pub enum Verdict {
    Pass(PassReason),
    Drop(DropReason),
    /// Back out of the ingress device.
    Tx,
    /// `bpf_redirect_map` accepted the packet; carries the action it returned.
    Redirect(u32),
    /// Larger than its next hop's MTU (carried), with DF set: the entry point has
    /// `too_big.rs` answer it, which counts its own verdict.
    TooBig(u16),
    /// XDP: the action a stage in a BPF function of its own took, and counted there.
    Sent(u32),
}

impl Verdict {
    pub fn action(&self) -> u32 {
        use aya_ebpf::bindings::xdp_action;
        match self {
            Verdict::Pass(_) => xdp_action::XDP_PASS,
            Verdict::Drop(_) | Verdict::TooBig(_) => xdp_action::XDP_DROP,
            Verdict::Tx => xdp_action::XDP_TX,
            Verdict::Redirect(action) | Verdict::Sent(action) => *action,
        }
    }

    /// Counts the verdict and gives its XDP action.
    #[inline(always)]
    pub fn counted(self) -> u32 {
        stats::count_verdict(&self);
        self.action()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the data path has no reachable panic; the verifier rejects the program otherwise.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
