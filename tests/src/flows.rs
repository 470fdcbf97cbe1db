//! FLOWS entries as tests and the benchmark write and expect them, and the data path's clock.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{Be16, Be32, FlowKey, FlowKey6, FlowValue, In6, conntrack::TCP_ESTABLISHED};
/// The data path's clock, as the daemon reads it.
pub use lb_user::dataplane::monotonic_ns;

pub fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: Be32::from_bytes(src.octets()),
        dst_addr: Be32::from_bytes(dst.octets()),
        src_port: Be16::from_host(sport),
        dst_port: Be16::from_host(dport),
        proto,
        _pad: [0; 3],
    }
}

/// An entry of an established TCP connection rewriting to src:sport -> dst:dport, never seen,
/// nothing cached.
pub fn value(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    backend: u32,
    flags: u32,
) -> FlowValue {
    FlowValue {
        nat_src_addr: Be32::from_bytes(src.octets()),
        nat_dst_addr: Be32::from_bytes(dst.octets()),
        nat_src_port: Be16::from_host(sport),
        nat_dst_port: Be16::from_host(dport),
        backend_id: backend,
        flags,
        state: TCP_ESTABLISHED,
        ..FlowValue::default()
    }
}

pub fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> FlowKey6 {
    FlowKey6 {
        src_addr: In6::from_bytes(src.octets()),
        dst_addr: In6::from_bytes(dst.octets()),
        src_port: Be16::from_host(sport),
        dst_port: Be16::from_host(dport),
        proto,
        _pad: [0; 3],
    }
}
