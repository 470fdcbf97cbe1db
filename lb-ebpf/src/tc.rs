//! The tc hook's entry: backends in containers on a bridge of this host. Their veths hand the
//! host skbs with partial checksums (CHECKSUM_PARTIAL) and GSO, which native XDP cannot finish
//! (ENGINEERING.md). At tc ingress on the bridge's ports, a balanced flow's packets (a
//! backend's replies) are translated with the kernel's checksum helpers, which update a
//! partial checksum by its pseudo-header alone and a full one by everything, and redirected
//! to their egress device. A container's new connection to a service (a VIP) is balanced here
//! as XDP balances a client's. Everything else goes on untouched (`TC_ACT_UNSPEC`: the next tc
//! program, then the stack). Shares the flow table and every stage but the rewrite and the
//! forwarding, which are the skb's own here. IPv4 and IPv6 alike; IPv6's new flows are made
//! in steps (`balance6`). A fragmented datagram's later fragments follow its first, as at XDP
//! (`fragments.rs`).

use core::{mem::MaybeUninit, ptr::NonNull};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup as FibParams,
    },
    helpers::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_l4_csum_replace, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_store_bytes,
    },
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    BackendOf, Be32, DropReason, FLOW_DSR, FlowValueOf, In6, PassReason, STAT_RESET_NO_FLOW,
    ServiceOf,
    conntrack::tcp_flags_valid,
    is_dsr_mode,
    reset::{reset_frame, reset_frame6},
};
use network_types::eth::EthHdr;

use crate::{
    Verdict,
    csum::Delta,
    family::Family,
    flow, forward, fragments,
    fragments::Fragmented,
    maps::{FLOW_SCRATCH6, REPLY_KEY_SCRATCH6},
    mss, nat,
    parse::{self, ETH_P_IPV6, IPPROTO_UDP, Packet, ptr_at},
    reset, select, service, stats, timestamps,
};

/// The most of a frame the stages read directly: Ethernet, the longest IPv4 and TCP headers.
const HEADERS_MAX: u32 = 14 + 60 + 60;

/// `carry_apart`'s answer for a packet with no flow, uncounted: `new_flow_apart` may record
/// one.
const NO_FLOW: i32 = i32::MIN;
/// `new_flow_apart`'s (and `finish6_apart`'s) answer when it recorded the packet's flow.
const RECORDED: i32 = i32::MIN + 1;
/// The first two steps' answers for an IPv6 flow (`balance6`).
const OPENED: i32 = i32::MIN + 2;
const TUPLE_TAKEN: i32 = i32::MIN + 3;
/// `new_flow_apart`'s (and `open6_apart`'s) answer for a TCP segment that no flow takes and
/// that cannot open one, uncounted: `reset_apart` answers it.
const ANSWER_RESET: i32 = i32::MIN + 4;
/// `carry_apart`'s (and `carry6_apart`'s) answer for a fragment that is no datagram's first,
/// uncounted: `follow_apart` forwards it after its first, or passes it.
const FRAGMENT: i32 = i32::MIN + 5;

/// A packet of a flow is carried; one without is given one if it opens a connection to a
/// service (a container's client of a VIP), then carried. Each step is a BPF function with a
/// stack frame of its own, as XDP's balancing path is (`xdp.rs`).
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    if is_ipv6(&ctx) {
        return balance6(skb);
    }
    let action = carry_apart(skb);
    if action == FRAGMENT {
        return follow_apart::<Be32>(skb);
    }
    if action != NO_FLOW {
        return action;
    }
    let made = new_flow_apart(skb);
    if made == ANSWER_RESET {
        return reset_apart(skb);
    }
    if made != RECORDED {
        return made;
    }
    match carry_apart(skb) {
        // Another CPU ended the flow in between: the packet is the kernel's.
        NO_FLOW => counted(Verdict::Pass(PassReason::NotService)),
        action => action,
    }
}

/// Counts `verdict` and gives its tc action.
#[inline(always)]
fn counted(verdict: Verdict) -> i32 {
    stats::count_verdict(&verdict);
    match verdict {
        Verdict::Pass(_) => TC_ACT_UNSPEC,
        Verdict::Redirect(action) => action as i32,
        // `Sent` is XDP's alone.
        Verdict::Drop(_) | Verdict::Tx | Verdict::TooBig(_) | Verdict::Sent(_) => TC_ACT_SHOT,
    }
}

/// Look up, rewrite and forward: the tc action, counted, or NO_FLOW.
#[inline(never)]
fn carry_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    match process(&ctx) {
        Err(Verdict::Pass(PassReason::NotService)) => NO_FLOW,
        Err(Verdict::Pass(PassReason::Fragment)) => FRAGMENT,
        Ok(verdict) | Err(verdict) => counted(verdict),
    }
}

/// A fragment other than its datagram's first, its headers pulled (`carry_apart`): readdressed
/// and forwarded as that first fragment was, if it was met a moment ago (`fragments.rs`);
/// passed otherwise. The tc action, counted.
#[inline(never)]
fn follow_apart<A: Fragmented>(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    let result = A::later_fragment(&ctx).and_then(|fragment| {
        let ip: *mut A::Ip =
            ptr_at(&ctx, EthHdr::LEN).ok_or(Verdict::Drop(DropReason::Inconsistent))?;
        let entry = fragments::readdress(ip, &fragment)?;
        let verdict = match forward::<A>(&ctx, entry, IPPROTO_UDP) {
            // As at XDP: IPv4's fragment, without DF, is the kernel's to fragment.
            Err(Verdict::Drop(DropReason::FibFragNeeded)) => return Err(A::TOO_BIG),
            result => result?,
        };
        fragments::followed(entry, u64::from(ctx.len()));
        Ok(verdict)
    });
    match result {
        Ok(verdict) | Err(verdict) => counted(verdict),
    }
}

/// An IPv6 packet: carried if it has a flow; otherwise its flow made in steps, each a BPF
/// function of its own (IPv6's keys would take one frame past the verifier's 512 bytes, as
/// in `xdp6.rs`), and carried then.
#[inline(always)]
fn balance6(skb: *mut __sk_buff) -> i32 {
    let action = carry6_apart(skb);
    if action == FRAGMENT {
        return follow_apart::<In6>(skb);
    }
    if action != NO_FLOW {
        return action;
    }
    let step = open6_apart(skb);
    if step == ANSWER_RESET {
        return reset6_apart(skb);
    }
    if step != OPENED {
        return step;
    }
    let step = take_tuple6_apart();
    if step != TUPLE_TAKEN {
        return step;
    }
    let step = finish6_apart(skb);
    if step != RECORDED {
        return step;
    }
    match carry6_apart(skb) {
        // Another CPU ended the flow in between: the packet is the kernel's.
        NO_FLOW => counted(Verdict::Pass(PassReason::NotService)),
        action => action,
    }
}

/// An IPv6 packet's look up, rewrite and forward: the tc action, counted, or NO_FLOW.
#[inline(never)]
fn carry6_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    if ctx.pull_data(ctx.len().min(HEADERS_MAX)).is_err() {
        return counted(Verdict::Pass(PassReason::ShortEthernet));
    }
    let mut out = MaybeUninit::uninit();
    let result = parse::packet6(&ctx, &mut out).and_then(|()| {
        // SAFETY: `packet6` wrote the packet (it returned Ok).
        carry(&ctx, unsafe { out.assume_init_ref() })
    });
    match result {
        Err(Verdict::Pass(PassReason::NotService)) => NO_FLOW,
        Err(Verdict::Pass(PassReason::Fragment)) => FRAGMENT,
        Ok(verdict) | Err(verdict) => counted(verdict),
    }
}

/// First step of an IPv6 flow: its backend chosen, its reply entry prepared in the scratch
/// slots (`flow::prepare`, REPLY_KEY_SCRATCH6). OPENED, or the packet's tc action, counted.
#[inline(never)]
fn open6_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    let mut out = MaybeUninit::uninit();
    let result = parse::packet6(&ctx, &mut out).and_then(|()| {
        // SAFETY: `packet6` wrote the packet (it returned Ok).
        let pkt = unsafe { out.assume_init_ref() };
        let (svc, backend_id, backend) = admit(pkt)?;
        flow::prepare(&ctx, pkt, svc, backend_id)?;
        let key = REPLY_KEY_SCRATCH6
            .get_ptr_mut(0)
            .ok_or(Verdict::Drop(DropReason::Inconsistent))?;
        // SAFETY: a per-CPU array slot, this CPU's alone for this program run.
        unsafe { *key = flow::reply_key(pkt, &backend) };
        Ok(())
    });
    match result {
        Ok(()) => OPENED,
        Err(Verdict::Drop(DropReason::TcpNoFlow)) => ANSWER_RESET,
        Err(verdict) => counted(verdict),
    }
}

/// Second step: the reply entry inserted under a SNAT port (or the client's tuple in DNAT).
/// TUPLE_TAKEN, or the packet's tc action, counted.
#[inline(never)]
fn take_tuple6_apart() -> i32 {
    match crate::xdp6::take_tuple() {
        Ok(()) => TUPLE_TAKEN,
        Err(verdict) => counted(verdict),
    }
}

/// Last step: the forward entry. RECORDED, or the packet's tc action, counted.
#[inline(never)]
fn finish6_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    let mut out = MaybeUninit::uninit();
    let result = parse::packet6(&ctx, &mut out).and_then(|()| {
        // SAFETY: `packet6` wrote the packet (it returned Ok).
        let pkt = unsafe { out.assume_init_ref() };
        let key = REPLY_KEY_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
        let reverse = FLOW_SCRATCH6.get_ptr_mut(0).ok_or(inconsistent)?;
        // SAFETY: per-CPU array slots, this CPU's alone for this program run; the steps
        // before wrote them.
        let (key, reverse) = unsafe { (&*key, &mut *reverse) };
        let flow = flow::finish(pkt, key, reverse, now_ns())?;
        stats::count_new_flow(flow.nat().backend_id);
        Ok(())
    });
    match result {
        Ok(()) => RECORDED,
        Err(verdict) => counted(verdict),
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether the frame is IPv6: its Ethernet header is in the skb's linear part at tc ingress.
#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    let eth: Option<*mut EthHdr> = ptr_at(ctx, 0);
    // SAFETY: bounds-checked by ptr_at. Raw field, compared with a network-order constant.
    eth.is_some_and(|eth| unsafe { (*eth).ether_type } == ETH_P_IPV6.to_be())
}

/// Choose and record: RECORDED, or the tc action of a packet that gets no flow, counted.
#[inline(never)]
fn new_flow_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    match new_flow(&ctx) {
        Ok(()) => RECORDED,
        Err(Verdict::Drop(DropReason::TcpNoFlow)) => ANSWER_RESET,
        Err(verdict) => counted(verdict),
    }
}

/// A container's TCP segment that no flow takes and that cannot open one (its flow expired
/// while the connection was idle, say): answered with an RST back to the container, as XDP
/// answers a client's (`reset.rs`), so its connection fails at once rather than after minutes
/// of retransmissions. The tc action, counted.
#[inline(never)]
fn reset_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    match parse::packet(&ctx) {
        Ok(pkt) => match reset_frame(&reset::segment(&pkt)) {
            Some(frame) => send_reset(&ctx, &frame),
            None => counted(Verdict::Drop(DropReason::TcpNoFlow)),
        },
        Err(verdict) => counted(verdict),
    }
}

/// `reset_apart` for IPv6.
#[inline(never)]
fn reset6_apart(skb: *mut __sk_buff) -> i32 {
    let Some(ctx) = context(skb) else {
        return TC_ACT_UNSPEC;
    };
    let mut out = MaybeUninit::uninit();
    if let Err(verdict) = parse::packet6(&ctx, &mut out) {
        return counted(verdict);
    }
    // SAFETY: `packet6` wrote the packet (it returned Ok).
    let pkt = unsafe { out.assume_init_ref() };
    match reset_frame6(&reset::segment6(pkt)) {
        Some(frame) => send_reset(&ctx, &frame),
        None => counted(Verdict::Drop(DropReason::TcpNoFlow)),
    }
}

/// `frame` in place of the skb's contents, sent back out of the port it came in by; or a
/// counted drop if the CPU's budget is spent. The skb keeps its checksum state: a container's
/// partial one stays partial, which its own stack takes as checked, and the RST's checksum is
/// whole for any other reader.
#[inline(always)]
fn send_reset<const N: usize>(ctx: &TcContext, frame: &[u8; N]) -> i32 {
    let silent = || counted(Verdict::Drop(DropReason::TcpNoFlow));
    if !reset::budget_allows() {
        return silent();
    }
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's own skb; `frame` is valid for N bytes. A parsed TCP segment is at
    // least as long as its RST, so the tail only shrinks.
    let written = unsafe {
        bpf_skb_change_tail(skb, N as u32, 0) == 0
            && bpf_skb_store_bytes(
                skb.cast(),
                0,
                frame.as_ptr().cast(),
                N as u32,
                u64::from(BPF_F_RECOMPUTE_CSUM),
            ) == 0
    };
    if !written {
        return silent();
    }
    stats::count_slot(STAT_RESET_NO_FLOW);
    let port = crate::frame::Frame::ingress_ifindex(ctx);
    // SAFETY: a helper that takes plain integers.
    counted(Verdict::Redirect(unsafe { bpf_redirect(port, 0) } as u32))
}

/// The skb an `_apart` function was handed, as the stages take it.
#[inline(always)]
fn context(skb: *mut __sk_buff) -> Option<TcContext> {
    NonNull::new(skb).map(TcContext::new)
}

#[inline(always)]
fn process(ctx: &TcContext) -> Result<Verdict, Verdict> {
    // The headers may sit in the skb's fragments: the stages read them in place.
    if ctx.pull_data(ctx.len().min(HEADERS_MAX)).is_err() {
        return Err(Verdict::Pass(PassReason::ShortEthernet));
    }
    carry(ctx, &parse::packet(ctx)?)
}

/// A packet of either family (its headers pulled): its flow's rewrite and forwarding, or
/// NotService.
#[inline(always)]
fn carry<A: Fragmented>(ctx: &TcContext, pkt: &Packet<A>) -> Result<Verdict, Verdict> {
    let Some(flow) = flow::lookup(pkt)? else {
        return Err(Verdict::Pass(PassReason::NotService));
    };
    // DSR forwards by MAC from XDP alone (`xdp.rs`).
    if flow.nat().flags & FLOW_DSR != 0 {
        return Err(Verdict::Drop(DropReason::DsrCannotForward));
    }
    if pkt.ttl() <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    let nat = flow.nat();
    let options = if pkt.is_tcp() {
        timestamps::translate(ctx, pkt, nat).and(mss::clamp_skb(ctx, pkt, nat))
    } else {
        Delta::default()
    };
    // Read before the rewrite, whose helpers move the packet.
    let first_fragment = A::first_fragment_id(pkt);
    rewrite(ctx, pkt, nat, options)?;
    stats::count_backend(nat.backend_id, pkt.len);
    let verdict = forward::<A>(ctx, flow.entry(), pkt.key.proto)?;
    // A datagram's first fragment, forwarded, has its later fragments follow it.
    if let Some(id) = first_fragment {
        fragments::remember_apart(&pkt.key, id);
    }
    Ok(verdict)
}

/// A packet with no flow (its headers pulled by `process`): find its service, choose a
/// backend, record the flow both ways. A TCP segment that cannot open one is answered by
/// `reset_apart`.
#[inline(always)]
fn new_flow(ctx: &TcContext) -> Result<(), Verdict> {
    let pkt = parse::packet(ctx)?;
    let (svc, backend_id, backend) = admit(&pkt)?;
    flow::create(ctx, &pkt, svc, backend_id, &backend)?;
    stats::count_new_flow(backend_id);
    Ok(())
}

/// Whether `pkt` may open a flow here, and to which of its service's backends.
#[inline(always)]
fn admit<A: Family>(
    pkt: &Packet<A>,
) -> Result<(&'static ServiceOf<A>, u32, BackendOf<A>), Verdict> {
    let svc = service::lookup(pkt)?;
    if is_dsr_mode(svc.mode) {
        return Err(Verdict::Drop(DropReason::DsrCannotForward));
    }
    if pkt.is_tcp() && !tcp_flags_valid(pkt.tcp_flags) {
        return Err(Verdict::Drop(DropReason::TcpInvalidFlags));
    }
    if pkt.is_tcp() && !pkt.is_syn() {
        return Err(Verdict::Drop(DropReason::TcpNoFlow));
    }
    if pkt.ttl() <= 1 {
        return Err(Verdict::Pass(PassReason::TtlExpired));
    }
    let (backend_id, backend) = select::backend(svc, pkt)?;
    Ok((svc, backend_id, backend))
}

/// Addresses and ports as the flow says. The IPv4 checksum is always whole and is updated in
/// place (IPv6 has none); the L4 one goes through the helper, twice: for the addresses as
/// part of the pseudo-header (they count in a partial checksum too), and for the ports and
/// options (`options`, changed earlier) only where the checksum covers them already.
#[inline(always)]
fn rewrite<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    nat: &FlowValueOf<A>,
    options: Delta,
) -> Result<(), Verdict> {
    let (addrs, ports) = nat::write_headers(pkt, nat);
    let ports = ports.and(options);
    let check_at = pkt.l4_check as usize - ctx.data();
    // A UDP checksum of 0 means "none" and stays so; a computed 0 is sent as 0xffff.
    let udp = if pkt.key.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    let inconsistent = Verdict::Drop(DropReason::Inconsistent);
    // SAFETY: the helper checks the offset against the skb; size 0 makes `to` a difference.
    unsafe {
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | udp;
        if bpf_l4_csum_replace(skb, check_at as u32, 0, u64::from(addrs.sum()), pseudo) != 0 {
            return Err(inconsistent);
        }
        if bpf_l4_csum_replace(skb, check_at as u32, 0, u64::from(ports.sum()), udp) != 0 {
            return Err(inconsistent);
        }
    }
    Ok(())
}

/// The rewritten packet's egress device and MACs, and a redirect there: from the flow's cache
/// (`forward::cached`, as XDP's) or the FIB. An unresolved neighbour is resolved by the kernel
/// on the way (`bpf_redirect_neigh`). A GSO skb's segments are each checked against the MTU by
/// the FIB (`tot_len` 0), which an approval of one length cannot stand for: it asks the FIB
/// every time, and caches nothing. The checksum helpers above moved the packet: its headers
/// are found again.
#[inline(always)]
fn forward<A: Family>(
    ctx: &TcContext,
    entry: *mut FlowValueOf<A>,
    proto: u8,
) -> Result<Verdict, Verdict> {
    let malformed = Verdict::Drop(DropReason::Inconsistent);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(malformed)?;
    let ip: *mut A::Ip = ptr_at(ctx, EthHdr::LEN).ok_or(malformed)?;
    // SAFETY: bounds-checked by ptr_at; a value pointer from a map lookup is valid for this
    // program run; `skb` is the program's context.
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    let (tot_len, gso) = unsafe { (A::packet_len(&*ip), (*skb).gso_size != 0) };
    if !gso && forward::cached(entry, tot_len) {
        // SAFETY: as above.
        unsafe {
            let nat = &*entry;
            A::decrement_hop_limit(&mut *ip);
            (*eth).src_addr = nat.src_mac;
            (*eth).dst_addr = nat.dst_mac;
            return Ok(Verdict::Redirect(bpf_redirect(nat.egress_ifindex, 0) as u32));
        }
    }
    let ingress = crate::frame::Frame::ingress_ifindex(ctx);
    // SAFETY: bounds-checked by ptr_at; as above.
    let mut fib = A::fib_params(unsafe { &*ip }, proto, ingress, unsafe { &*entry });
    // SAFETY: `fib` is a valid, initialised parameter block of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let neighbour_known = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Verdict::Drop(DropReason::FibFragNeeded)),
        rc => return Err(crate::fib::refused(rc)),
    };
    // SAFETY: bounds-checked by ptr_at; the MACs are plain bytes of the union the helper
    // filled on success.
    unsafe {
        A::decrement_hop_limit(&mut *ip);
        if !neighbour_known {
            let action = bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0);
            return Ok(Verdict::Redirect(action as u32));
        }
        let src_mac = fib.__bindgen_anon_6.__bindgen_anon_2.smac;
        let dst_mac = fib.__bindgen_anon_6.__bindgen_anon_2.dmac;
        (*eth).src_addr = src_mac;
        (*eth).dst_addr = dst_mac;
        // Only towards a device lb manages, whose flags XDP needs if it meets the flow too.
        if let (false, Some(hop)) = (gso, forward::managed_hop(&fib)) {
            forward::learned(entry, &hop, tot_len);
        }
        Ok(Verdict::Redirect(bpf_redirect(fib.ifindex, 0) as u32))
    }
}
