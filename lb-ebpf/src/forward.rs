//! Stage 5, forward: the kernel's FIB gives the egress device and MACs, cached in the flow's
//! entry so that established flows skip it, and per backend (`hop_cache.rs`) so that most new
//! flows skip it too; the packet leaves by XDP_TX (same real NIC) or a
//! DEVMAP redirect; into a bridge of containers, the kernel forwards it. Reads IFACES and
//! TX_PORTS; writes the next-hop cache of FLOWS entries.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{DropReason, FlowValueOf, IFACE_VIA_STACK, IFACE_XDP_TX, PassReason};
use network_types::eth::EthHdr;

use crate::{
    Verdict,
    family::Family,
    hop_cache,
    maps::{IFACES, TX_PORTS},
};

/// Where a packet goes: the egress device, its `Iface::flags`, and the MACs to write.
pub struct NextHop {
    pub ifindex: u32,
    pub flags: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Why a packet has no next hop.
pub enum NoHop {
    /// Larger than the egress MTU, with DF set: its sender must be told (`too_big.rs`).
    TooBig { mtu: u16 },
    /// Passed to the kernel or dropped, with its reason.
    Verdict(Verdict),
}

/// The next hop of a packet of the flow `entry` (whose rewrite gives the addresses the FIB
/// sees), from the flow's cache or the FIB; `ip` is the packet's header, `proto` its protocol,
/// `grow` what an encapsulation adds to its length (the MTU check counts it).
#[inline(always)]
pub fn next_hop<A: Family>(
    ctx: &XdpContext,
    ip: *mut A::Ip,
    proto: u8,
    entry: *mut FlowValueOf<A>,
    grow: u16,
) -> Result<NextHop, NoHop> {
    // SAFETY: the caller bounds-checked the IP header; a value pointer from a map lookup is
    // valid for this program run.
    let (tot_len, nat) = unsafe { (A::packet_len(&*ip), &*entry) };
    let tot_len = tot_len.saturating_add(grow);
    if !cached(entry, tot_len) {
        let hop = lookup(ctx, ip, proto, nat, tot_len)?;
        learned(entry, &hop, tot_len);
        return Ok(hop);
    }
    Ok(NextHop {
        ifindex: nat.egress_ifindex,
        flags: u32::from(nat.egress_flags),
        src_mac: nat.src_mac,
        dst_mac: nat.dst_mac,
    })
}

/// Whether the flow `entry` has a next hop cached for a packet of `tot_len` bytes: its own, or
/// failing that its backend's (`hop_cache.rs`), copied into it.
#[inline(always)]
pub fn cached<A: Family>(entry: *mut FlowValueOf<A>, tot_len: u16) -> bool {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let nat = unsafe { &*entry };
    (nat.egress_ifindex != 0 && tot_len <= nat.fib_ok_len) || hop_cache::fill(entry, tot_len)
}

/// Caches `hop`, the FIB's answer for the flow `entry`'s packet of `tot_len` bytes, in the
/// entry and for its backend.
#[inline(always)]
pub fn learned<A: Family>(entry: *mut FlowValueOf<A>, hop: &NextHop, tot_len: u16) {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    hop_cache::put(unsafe { &*entry }, hop, tot_len);
    remember(entry, hop, tot_len);
}

/// Sends the packet (`eth` and `ip` its headers, bounds-checked by the caller) to `hop`, with
/// its TTL decremented; a packet for a bridge goes up to the kernel as it is.
#[inline(always)]
pub fn send<A: Family>(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut A::Ip,
    hop: &NextHop,
) -> Result<Verdict, Verdict> {
    if hop.flags & IFACE_VIA_STACK != 0 {
        return Ok(Verdict::Pass(PassReason::EgressBridge));
    }
    // SAFETY: the caller bounds-checked the IP header.
    unsafe { A::decrement_hop_limit(&mut *ip) };
    send_frame(ctx, eth, hop)
}

/// Sends the frame (`eth` its header, bounds-checked by the caller) to `hop` with its MACs
/// rewritten and nothing else: DSR's forwarding, where the kernel must not see the packet (its
/// destination is the VIP), so a bridge of containers cannot be its way out.
#[inline(always)]
pub fn send_frame(ctx: &XdpContext, eth: *mut EthHdr, hop: &NextHop) -> Result<Verdict, Verdict> {
    if hop.flags & IFACE_VIA_STACK != 0 {
        return Err(Verdict::Drop(DropReason::DsrCannotForward));
    }
    // SAFETY: the caller bounds-checked the Ethernet header.
    unsafe {
        let eth = &mut *eth;
        eth.dst_addr = hop.dst_mac;
        eth.src_addr = hop.src_mac;
    }
    transmit(hop.ifindex, hop.flags, ctx.ingress_ifindex() as u32)
}

/// Sends an answer the balancer wrote over the packet back out of its ingress device.
#[inline(always)]
pub fn back_out(ctx: &XdpContext) -> Verdict {
    let ingress = ctx.ingress_ifindex() as u32;
    let flags = IFACES.get_ptr(&ingress).map_or(0, |iface| {
        // SAFETY: a value pointer from a map lookup is valid for this program run.
        unsafe { (*iface).flags }
    });
    match transmit(ingress, flags, ingress) {
        Ok(v) | Err(v) => v,
    }
}

/// Sends the packet out of `ifindex` (its `Iface::flags` given): by XDP_TX if that is the
/// ingress device and a real NIC, by DEVMAP redirect otherwise.
#[inline(always)]
pub fn transmit(ifindex: u32, flags: u32, ingress: u32) -> Result<Verdict, Verdict> {
    if ifindex == ingress && flags & IFACE_XDP_TX != 0 {
        return Ok(Verdict::Tx);
    }
    TX_PORTS
        .redirect(ifindex, 0)
        .map(Verdict::Redirect)
        .map_err(|_| Verdict::Drop(DropReason::RedirectFailed))
}

/// Caches `hop` in the flow's entry for packets up to `tot_len` bytes (more if the same hop
/// already approved larger ones). Two CPUs may race here; both write a hop the FIB just gave.
#[inline(always)]
fn remember<A>(entry: *mut FlowValueOf<A>, hop: &NextHop, tot_len: u16) {
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let value = unsafe { &mut *entry };
    value.fib_ok_len = if value.egress_ifindex == hop.ifindex {
        value.fib_ok_len.max(tot_len)
    } else {
        tot_len
    };
    value.src_mac = hop.src_mac;
    value.dst_mac = hop.dst_mac;
    value.egress_flags = hop.flags as u16;
    value.egress_ifindex = hop.ifindex;
}

/// The kernel's FIB: egress device and MACs for the rewritten packet, with the MTU checked.
#[inline(always)]
fn lookup<A: Family>(
    ctx: &XdpContext,
    ip: *mut A::Ip,
    proto: u8,
    nat: &FlowValueOf<A>,
    tot_len: u16,
) -> Result<NextHop, NoHop> {
    let verdict = |v| NoHop::Verdict(v);
    // SAFETY: the caller bounds-checked the IP header.
    let ip = unsafe { &*ip };
    let mut fib = A::fib_params(ip, proto, ctx.ingress_ifindex() as u32, nat);
    fib.__bindgen_anon_1.tot_len = tot_len;
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
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            return Err(verdict(Verdict::Pass(PassReason::NeighbourUnresolved)));
        }
        // With DF the sender must learn the path's MTU; without, the kernel fragments the
        // rewritten packet as it forwards it (XDP has no fragmenting of its own).
        BPF_FIB_LKUP_RET_FRAG_NEEDED if A::must_not_fragment(ip) => {
            // SAFETY: the helper filled the union's MTU on this return code.
            return Err(NoHop::TooBig {
                mtu: unsafe { fib.__bindgen_anon_1.mtu_result },
            });
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            return Err(verdict(Verdict::Pass(PassReason::NeedsFragmenting)));
        }
        rc => return Err(verdict(crate::fib::refused(rc))),
    }
    managed_hop(&fib).ok_or(verdict(Verdict::Pass(PassReason::EgressNotManaged)))
}

/// The next hop a successful FIB lookup gave, if its egress device is one lb manages (whose
/// flags say how to send there).
#[inline(always)]
pub fn managed_hop(fib: &FibParams) -> Option<NextHop> {
    let iface = IFACES.get_ptr(&fib.ifindex)?;
    // SAFETY: a value pointer from a map lookup is valid for this program run; the MACs are
    // plain bytes of the union the helper filled on success.
    unsafe {
        Some(NextHop {
            ifindex: fib.ifindex,
            flags: (*iface).flags,
            src_mac: fib.__bindgen_anon_6.__bindgen_anon_2.smac,
            dst_mac: fib.__bindgen_anon_6.__bindgen_anon_2.dmac,
        })
    }
}
