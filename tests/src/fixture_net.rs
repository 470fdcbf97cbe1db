//! The network packet tests run in: one namespace with lb0 (client side) and lb1 (backend
//! side), addresses and permanent neighbours, so that bpf_fib_lookup inside BPF_PROG_TEST_RUN
//! finds real routes. Shared by the packet fixtures and the fuzzer.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{Be16, Be32, In6, ServiceKey, ServiceKey6};

use crate::{netns::Netns, packet::Mac};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// The services on VIP: web (TCP) and dns (UDP), and their backends' port.
pub const WEB_PORT: u16 = 80;
pub const DNS_PORT: u16 = 53;
pub const BACKEND_PORT: u16 = 8000;
/// The first SNAT port the programs are loaded with.
pub const PORT_MIN: u16 = 20000;
/// Small and prime: tables are quick to build, and every backend's permutation covers it.
pub const MAGLEV_SIZE: u32 = 251;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LB0: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
pub const B2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
/// A backend with no neighbour entry.
pub const B3: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 13);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

/// The same network in IPv6 (fd00::/8): 198.18.C.D is fd00:C::D (client side fd00::/64,
/// backend side fd00:1::/64), so an IPv4 fixture's twin names the same parties.
pub const fn ipv6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let [_, _, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, c as u16, 0, 0, 0, 0, 0, d as u16)
}
pub const CLIENT6: Ipv6Addr = ipv6_of(CLIENT);
pub const LB0_6: Ipv6Addr = ipv6_of(LB0);
pub const SNAT6: Ipv6Addr = ipv6_of(SNAT);
pub const B1_6: Ipv6Addr = ipv6_of(B1);
pub const B2_6: Ipv6Addr = ipv6_of(B2);
pub const VIP6: Ipv6Addr = ipv6_of(VIP);

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
pub const LB0_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x00];
pub const LB1_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
pub const B1_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
pub const B2_MAC: Mac = [0x02, 0, 0, 0, 0, 0x12];
/// A MAC no neighbour has: a frame sent to it took a cached next hop, not the FIB.
pub const CACHED_MAC: Mac = [0x02, 0, 0, 0, 0, 0x77];

/// A MAC as `ip` writes it.
pub fn mac_text(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The namespace the fixtures' test thread runs in.
pub fn topology() -> Netns {
    network("fixtures")
}

/// A namespace `lbt-..-ROLE`: lb0 (client side) and lb1 (backend side), each a veth whose peer
/// stays in the same namespace, with permanent neighbours for the client, B1 and B2; and br0,
/// an empty bridge that fixtures name as a flow's next hop.
pub fn network(role: &str) -> Netns {
    let ns = Netns::new(role);
    let mac = mac_text;
    ns.sh(&format!(
        "ip link add lb0 address {lb0} type veth peer name peer0
         ip link add lb1 address {lb1} type veth peer name peer1
         ip link add br0 type bridge
         for d in lb0 peer0 lb1 peer1 br0; do ip link set $d up; done
         ip addr add {LB0}/24 dev lb0
         ip addr add {SNAT}/24 dev lb1
         ip neigh replace {CLIENT} lladdr {client} dev lb0 nud permanent
         ip neigh replace {B1} lladdr {b1} dev lb1 nud permanent
         ip neigh replace {B2} lladdr {b2} dev lb1 nud permanent
         ip addr add {LB0_6}/64 dev lb0 nodad
         ip addr add {SNAT6}/64 dev lb1 nodad
         ip neigh replace {CLIENT6} lladdr {client} dev lb0 nud permanent
         ip neigh replace {B1_6} lladdr {b1} dev lb1 nud permanent
         ip neigh replace {B2_6} lladdr {b2} dev lb1 nud permanent
         sysctl -qw net.ipv4.ip_forward=1
         sysctl -qw net.ipv6.conf.all.forwarding=1",
        lb0 = mac(LB0_MAC),
        lb1 = mac(LB1_MAC),
        client = mac(CLIENT_MAC),
        b1 = mac(B1_MAC),
        b2 = mac(B2_MAC),
    ));
    ns
}

/// The SERVICES key of the service on VIP:`port`/`proto`.
pub fn service_key(port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        vip: Be32::from_bytes(VIP.octets()),
        port: Be16::from_host(port),
        proto,
        _pad: 0,
    }
}

/// The SERVICES6 key of the service on VIP6:`port`/`proto`.
pub fn service_key6(port: u16, proto: u8) -> ServiceKey6 {
    ServiceKey6 {
        vip: In6::from_bytes(VIP6.octets()),
        port: Be16::from_host(port),
        proto,
        _pad: 0,
    }
}
