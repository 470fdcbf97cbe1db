//! The cgroup socket hooks' entry: clients on the host itself never pass an XDP hook, so they
//! are balanced when their socket connects (TCP, and UDP `connect`) or sends a datagram
//! (unconnected UDP), as Cilium's socket LB does: the socket is sent straight to a backend the
//! service's Maglev table chooses, with the same weights, health and suspect marks as the data
//! path's. getpeername and recvmsg show the application the address it asked for. A VIP on a
//! host address is also reached at a loopback address and its port (HOST_PORTS), as a published
//! port answers on localhost. Acts only in the daemon's network namespace: cgroup hooks run in
//! all of them. The IPv6 hooks (connect6 and friends) do the same for IPv6 services, whose VIP
//! on a host address is reached at ::1 too (HOST_PORTS6). Reads SERVICES(6), HOST_PORTS(6),
//! MAGLEV, BACKENDS(6); writes SOCK_REVERSE(6) and counters.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    maps::LruHashMap,
    programs::SockAddrContext,
};
use lb_common::{
    Be16, Be32, HostPortKey, In6, STAT_HOST_BALANCED, STAT_HOST_NO_BACKEND, ServiceKeyOf,
    SockKeyOf, SockVipOf, flow_hash,
};

use crate::{
    family::Family,
    maps::{HOST_PORTS, HOST_PORTS6, SOCK_REVERSE, SOCK_REVERSE6, host_netns_cookie},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    select, stats,
};

/// What a socket hook returns to let the call go on.
const ALLOW: i32 = 1;
/// 127.0.0.0/8, as the first byte of an address in network order.
const LOOPBACK_NET: u8 = 127;
/// ::1, as the maps hold it.
const LOOPBACK6: In6 = In6::from_bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    balance::<Be32>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance::<Be32>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_asked::<Be32>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_asked::<Be32>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    balance::<In6>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    balance::<In6>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    show_asked::<In6>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_asked::<In6>(&ctx);
    ALLOW
}

/// A family's part of the socket hooks: where the call's address is, and the socket map.
trait SockFamily: Family {
    /// The address the call names.
    ///
    /// # Safety
    /// `sa` is the context the kernel passed, valid for this run.
    unsafe fn asked(sa: *const bpf_sock_addr) -> Self;
    /// Makes the call go to `addr`.
    ///
    /// # Safety
    /// As `asked`; the hook may rewrite the address.
    unsafe fn set(sa: *mut bpf_sock_addr, addr: Self);
    fn reverse() -> &'static LruHashMap<SockKeyOf<Self>, SockVipOf<Self>>;
    /// The VIP a call to `asked` reaches: itself, or for a loopback address the host address
    /// whose service has `port` (HOST_PORTS, HOST_PORTS6).
    fn vip(asked: Self, port: Be16, proto: u8) -> Option<Self>;
}

impl SockFamily for Be32 {
    unsafe fn asked(sa: *const bpf_sock_addr) -> Self {
        // SAFETY: the caller's.
        Be32(unsafe { (*sa).user_ip4 })
    }

    unsafe fn set(sa: *mut bpf_sock_addr, addr: Self) {
        // SAFETY: the caller's.
        unsafe { (*sa).user_ip4 = addr.0 };
    }

    fn reverse() -> &'static LruHashMap<SockKeyOf<Self>, SockVipOf<Self>> {
        &SOCK_REVERSE
    }

    #[inline(always)]
    fn vip(asked: Self, port: Be16, proto: u8) -> Option<Self> {
        if asked.to_bytes()[0] != LOOPBACK_NET {
            return Some(asked);
        }
        let key = HostPortKey::of(port, proto);
        // SAFETY: a value from a map lookup, valid for this program run.
        unsafe { HOST_PORTS.get(&key) }.copied()
    }
}

impl SockFamily for In6 {
    // The verifier takes user_ip6 a 32-bit word at a time: volatile keeps the compiler from
    // merging two words into one 64-bit access.
    unsafe fn asked(sa: *const bpf_sock_addr) -> Self {
        // SAFETY: the caller's; each word is in the context.
        let word = |i: usize| unsafe { core::ptr::read_volatile(&raw const (*sa).user_ip6[i]) };
        In6([word(0), word(1), word(2), word(3)])
    }

    unsafe fn set(sa: *mut bpf_sock_addr, addr: Self) {
        for (i, w) in addr.0.into_iter().enumerate() {
            // SAFETY: the caller's; each word is in the context.
            unsafe { core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], w) };
        }
    }

    fn reverse() -> &'static LruHashMap<SockKeyOf<Self>, SockVipOf<Self>> {
        &SOCK_REVERSE6
    }

    #[inline(always)]
    fn vip(asked: Self, port: Be16, proto: u8) -> Option<Self> {
        if asked != LOOPBACK6 {
            return Some(asked);
        }
        let key = HostPortKey::of(port, proto);
        // SAFETY: a value from a map lookup, valid for this program run.
        unsafe { HOST_PORTS6.get(&key) }.copied()
    }
}

/// Sends the socket to a backend if it is headed for a service.
#[inline(always)]
fn balance<A: SockFamily>(ctx: &SockAddrContext) {
    // SAFETY: the helper takes the program's own context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != host_netns_cookie() {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed, valid for this run.
    let (asked, port, proto) = unsafe { (A::asked(sa), (*sa).user_port, (*sa).protocol) };
    let proto = match proto {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return,
    };
    let port = Be16(port as u16);
    let Some(vip) = A::vip(asked, port, proto) else {
        return;
    };
    let key = ServiceKeyOf {
        vip,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: a value from a map lookup, valid for this program run.
    let Some(svc) = (unsafe { A::services().get(&key) }) else {
        return;
    };
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // One backend per socket: a UDP socket's datagrams all go to the same one.
    let hash = flow_hash(cookie as u32, (cookie >> 32) as u32, port.0, 0, proto);
    let Ok((id, backend)) = select::for_hash(svc, hash) else {
        stats::count_slot(STAT_HOST_NO_BACKEND);
        return;
    };
    let reverse = SockKeyOf::new(cookie, backend.addr, backend.port);
    let shown = SockVipOf {
        addr: asked,
        port,
        _pad: 0,
    };
    if A::reverse().insert(&reverse, &shown, 0).is_err() {
        return;
    }
    // SAFETY: as above; the hook may rewrite the address the call goes to.
    unsafe {
        A::set(sa, backend.addr);
        (*sa).user_port = u32::from(backend.port.0);
    }
    stats::count_new_flow(id);
    stats::count_slot(STAT_HOST_BALANCED);
}

/// Shows the application the address it asked for where the kernel reports the backend.
#[inline(always)]
fn show_asked<A: SockFamily>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context the kernel passed, valid for this run.
    let (addr, port) = unsafe { (A::asked(sa), (*sa).user_port) };
    let key = SockKeyOf::new(cookie, addr, Be16(port as u16));
    // SAFETY: a value from a map lookup, valid for this program run.
    let Some(shown) = (unsafe { A::reverse().get(&key) }) else {
        return;
    };
    // SAFETY: as above; these hooks may rewrite the address reported.
    unsafe {
        A::set(sa, shown.addr);
        (*sa).user_port = u32::from(shown.port.0);
    }
}
