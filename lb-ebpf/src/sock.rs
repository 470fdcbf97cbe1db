//! The cgroup socket hooks' entry: clients on the host itself never pass an XDP hook, so they
//! are balanced when their socket connects (TCP, and UDP `connect`) or sends a datagram
//! (unconnected UDP), as Cilium's socket LB does: the socket is sent straight to a backend the
//! service's Maglev table chooses, with the same weights, health and suspect marks as the data
//! path's. getpeername and recvmsg show the application the address it asked for. A VIP on a
//! host address is also reached at a loopback address and its port (HOST_PORTS), as a published
//! port answers on localhost. Acts only in the daemon's network namespace: cgroup hooks run in
//! all of them. Reads SERVICES, HOST_PORTS, MAGLEV, BACKENDS; writes SOCK_REVERSE and counters.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    Be16, Be32, HostPortKey, STAT_HOST_BALANCED, STAT_HOST_NO_BACKEND, ServiceKey, SockKey,
    SockVip, flow_hash,
};

use crate::{
    maps::{HOST_PORTS, SERVICES, SOCK_REVERSE, host_netns_cookie},
    parse::{IPPROTO_TCP, IPPROTO_UDP},
    select, stats,
};

/// What a socket hook returns to let the call go on.
const ALLOW: i32 = 1;
/// 127.0.0.0/8, as the first byte of an address in network order.
const LOOPBACK_NET: u8 = 127;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    balance(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_asked(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_asked(&ctx);
    ALLOW
}

/// Sends the socket to a backend if it is headed for a service.
#[inline(always)]
fn balance(ctx: &SockAddrContext) {
    // SAFETY: the helper takes the program's own context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != host_netns_cookie() {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed, valid for this run.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let proto = match proto {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return,
    };
    let (asked, port) = (Be32(ip), Be16(port as u16));
    let vip = if asked.to_bytes()[0] == LOOPBACK_NET {
        let key = HostPortKey {
            port,
            proto,
            _pad: 0,
        };
        // SAFETY: a value from a map lookup, valid for this program run.
        match unsafe { HOST_PORTS.get(&key) } {
            Some(vip) => *vip,
            None => return,
        }
    } else {
        asked
    };
    let key = ServiceKey {
        vip,
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: as above.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
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
    let reverse = SockKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let shown = SockVip {
        addr: asked,
        port,
        _pad: 0,
    };
    if SOCK_REVERSE.insert(&reverse, &shown, 0).is_err() {
        return;
    }
    // SAFETY: as above; the hook may rewrite the address the call goes to.
    unsafe {
        (*sa).user_ip4 = backend.addr.0;
        (*sa).user_port = u32::from(backend.port.0);
    }
    stats::count_new_flow(id);
    stats::count_slot(STAT_HOST_BALANCED);
}

/// Shows the application the address it asked for where the kernel reports the backend.
#[inline(always)]
fn show_asked(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context the kernel passed, valid for this run.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockKey {
        cookie,
        addr: Be32(ip),
        port: Be16(port as u16),
        _pad: 0,
    };
    // SAFETY: a value from a map lookup, valid for this program run.
    let Some(shown) = (unsafe { SOCK_REVERSE.get(&key) }) else {
        return;
    };
    // SAFETY: as above; these hooks may rewrite the address reported.
    unsafe {
        (*sa).user_ip4 = shown.addr.0;
        (*sa).user_port = u32::from(shown.port.0);
    }
}
