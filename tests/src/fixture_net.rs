//! The network packet tests run in: one namespace with lb0 (client side) and lb1 (backend
//! side), addresses and permanent neighbours, so that bpf_fib_lookup inside BPF_PROG_TEST_RUN
//! finds real routes. Shared by the packet fixtures and the fuzzer.

use std::net::Ipv4Addr;

use crate::{netns::Netns, packet::Mac};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LB0: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
pub const B2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
/// A backend with no neighbour entry.
pub const B3: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 13);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
pub const LB0_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x00];
pub const LB1_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
pub const B1_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
pub const B2_MAC: Mac = [0x02, 0, 0, 0, 0, 0x12];
/// A MAC no neighbour has: a frame sent to it took a cached next hop, not the FIB.
pub const CACHED_MAC: Mac = [0x02, 0, 0, 0, 0, 0x77];

/// The namespace the test thread runs in: lb0 (client side) and lb1 (backend side), each a veth
/// whose peer stays in the same namespace, with permanent neighbours for the client, B1 and B2.
pub fn topology() -> Netns {
    let ns = Netns::new("fixtures");
    let mac = |m: Mac| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    ns.sh(&format!(
        "ip link add lb0 address {lb0} type veth peer name peer0
         ip link add lb1 address {lb1} type veth peer name peer1
         for d in lb0 peer0 lb1 peer1; do ip link set $d up; done
         ip addr add {LB0}/24 dev lb0
         ip addr add {SNAT}/24 dev lb1
         ip neigh replace {CLIENT} lladdr {client} dev lb0 nud permanent
         ip neigh replace {B1} lladdr {b1} dev lb1 nud permanent
         ip neigh replace {B2} lladdr {b2} dev lb1 nud permanent
         sysctl -qw net.ipv4.ip_forward=1",
        lb0 = mac(LB0_MAC),
        lb1 = mac(LB1_MAC),
        client = mac(CLIENT_MAC),
        b1 = mac(B1_MAC),
        b2 = mac(B2_MAC),
    ));
    ns
}
