//! Packet fixtures: the real lb-ebpf object run through BPF_PROG_TEST_RUN. Each fixture states
//! its whole map pre-state, the input frame, the expected XDP action, the expected output frame
//! (compared whole) and the counter deltas. The program is loaded afresh for every fixture, so
//! no state leaks between them.
//!
//! FIB lookups inside a test run use the caller's namespace: the test thread enters a namespace
//! with two veth pairs, addresses and permanent neighbour entries, and is pinned to CPU 0 so
//! that the SNAT port sequence is predictable.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use lb_common::{
    Be32, DropReason, FLOW_DNAT, FLOW_DSR, FLOW_END_COUNTED, FLOW_FIN_SENT, FLOW_GUE, FLOW_IPIP,
    FLOW_REVERSE, FLOW_SYN_WELL_FORMED, FLOW_TS, FlowKey, FlowKey6, FlowValue, FlowValue6,
    FlowValueOf, In6, NO_BACKEND, PassReason, SERVICE_MODE_DNAT, SERVICE_MODE_DSR_GUE,
    SERVICE_MODE_DSR_IPIP, SERVICE_MODE_DSR_L2, SERVICE_MODE_NAT,
    conntrack::{
        TCP_ACK, TCP_CLOSED, TCP_ESTABLISHED, TCP_FIN, TCP_FIN_WAIT, TCP_LAST_ACK, TCP_PSH,
        TCP_RST, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TIME_WAIT, UDP_REPLIED, UDP_UNREPLIED, ended,
    },
    icmp::{ECHO_REPLIES_PER_SEC_PER_CPU, ICMP_ERRORS_PER_SEC_PER_CPU},
    reset::RESETS_PER_SEC_PER_CPU,
    snat_ports::pool_start,
    tunnel::{GUE_PORT, gue_source_port},
};
use lb_tests::{
    fixture_net::{
        B1, B1_6, B1_MAC, B2, B2_MAC, B3, BACKEND_PORT, CACHED_MAC, CLIENT, CLIENT_MAC, CLIENT6,
        DNS_PORT, LB0_MAC, LB1_MAC, MAGLEV_SIZE, OTHER, PORT_MIN, SNAT, SNAT6, TCP, UDP, VIP, VIP6,
        WEB_PORT, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, ipv6_of, service_key, service_key6,
        topology,
    },
    flows::{key, key6, monotonic_ns, value},
    netns::{pin_current_thread_to_cpu0, require_root, sweep_stale},
    packet::{
        ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_FRAGMENT, Mac, PacketBuilder, describe, diff, pkt,
        verify_checksums,
    },
};
use lb_user::{
    dataplane::{Dataplane, FlowTimeouts, LoadSettings, ifindex, ts_clock_ms},
    maglev::{MaglevBackend, build_table},
};

/// Entries of FLOWS as a run must leave them (`None`: absent).
type FlowChecks = Vec<(FlowKey, Option<FlowValue>)>;
/// The same for FLOWS6.
type Flow6Checks = Vec<(FlowKey6, Option<FlowValue6>)>;

/// Map state a fixture starts from.
#[derive(Clone)]
enum Setup {
    Backend {
        id: u32,
        addr: Ipv4Addr,
        healthy: bool,
    },
    /// A service and its Maglev table built from `(backend id, weight)`, with its SNAT pool.
    Service {
        id: u32,
        port: u16,
        proto: u8,
        backends: Vec<(u32, u32)>,
        snat: Vec<Ipv4Addr>,
        /// The MSS its handshakes are clamped to.
        mss: Option<u16>,
        /// `SERVICE_MODE_*`.
        mode: u8,
    },
    /// Both directions of a flow client:cport -> VIP via SNAT:snat_port to backend.
    Flow(FlowSetup),
    /// BACKENDS6: an IPv6 backend, in the ids BACKENDS shares.
    Backend6 {
        id: u32,
        addr: Ipv6Addr,
        healthy: bool,
    },
    /// `Service` on VIP6, in SERVICES6.
    Service6 {
        id: u32,
        port: u16,
        proto: u8,
        backends: Vec<(u32, u32)>,
        snat: Vec<Ipv6Addr>,
        mss: Option<u16>,
        mode: u8,
    },
    /// `Flow` in IPv6: CLIENT6:cport -> VIP6 via the IPv6 twin of its SNAT pool address.
    Flow6(FlowSetup),
    /// Both directions of an established DNAT flow client:cport -> VIP:vport to `backend`.
    DnatFlow {
        cport: u16,
        vport: u16,
        backend: u32,
    },
    /// `DnatFlow` in IPv6: its twin (`ipv6_of`), in FLOWS6.
    DnatFlow6 {
        cport: u16,
        vport: u16,
        backend: u32,
    },
    /// The forward entry (the only one) of a DSR flow client:cport -> VIP:BACKEND_PORT on
    /// `backend`, in `state`, seen just now.
    DsrFlow {
        cport: u16,
        backend: u32,
        state: u32,
    },
    /// `DsrFlow` in IPv6: its twin, in FLOWS6.
    DsrFlow6 {
        cport: u16,
        backend: u32,
        state: u32,
    },
    /// Marks lb1 as a NIC where XDP_TX is used for hairpin traffic.
    HairpinTx,
    /// The data path marked `backend` suspect `ago_ns` before the run.
    Suspect { backend: u32, ago_ns: u64 },
    /// The highest TCP timestamp sent to a backend so far (TS_HIGH).
    TsHighest(u32),
    /// The device is a bridge of containers: the kernel forwards into it.
    Bridge(&'static str),
    /// `port` is a port of the bridge `bridge` (BRIDGE_PORTS).
    BridgePort {
        port: &'static str,
        bridge: &'static str,
    },
}

/// A flow's two entries as a fixture starts from them. Both directions' sequence tracking
/// stands at 1000 (the packet builder's default sequence number), the forward one at 1001 in
/// SYN_SENT (after the client's SYN).
#[derive(Clone)]
struct FlowSetup {
    proto: u8,
    cport: u16,
    backend: u32,
    snat_port: u16,
    state: u32,
    /// How long ago both directions were last seen (a half-open flow's reply entry never);
    /// `None`: never.
    seen_ago_ns: Option<u64>,
    /// Directions that sent a FIN: (forward, reply).
    fin_sent: (bool, bool),
    /// A next hop cached in the forward entry (egress lb1).
    cached: Option<CachedHop>,
    /// TCP: the SYN that opened the flow was well formed (no data, a correct checksum).
    syn_well_formed: bool,
    /// TCP: the connection's timestamps are translated, the forward TSval by this much.
    ts_add: Option<u32>,
    /// The address of the service's SNAT pool the flow took: `SNAT_POOL[snat_index]`.
    snat_index: u32,
    /// Its service's `mss` when it began.
    mss: u16,
}

/// How many IPv4 fixtures have an IPv6 twin at least (`ipv6_twin`; 123 today): a change that
/// loses twins shows here.
const TWINS_AT_LEAST: usize = 123;

/// A SNAT pool of two addresses, the first the one every other fixture uses.
const SNAT_POOL: [Ipv4Addr; 2] = [SNAT, Ipv4Addr::new(198, 18, 1, 2)];

/// A next hop in a FLOWS entry: egress device, MACs and the largest packet it was approved for.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CachedHop {
    iface: &'static str,
    src: Mac,
    dst: Mac,
    ok_len: u16,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Counter {
    Pass(PassReason),
    Drop(DropReason),
    Tx,
    Redirect,
    NewFlows(u32),
    Packets(u32),
    /// An event slot, by its name in lb_common::EVENTS.
    Event(&'static str),
    /// A backend's FLOW_COUNTS: connections opened, ended, released.
    Opened(u32),
    Ended(u32),
    Released(u32),
}

/// Which program a fixture runs: XDP's, or the tc one for container backends.
#[derive(Clone, Copy, PartialEq)]
enum Hook {
    Xdp,
    Tc,
}

/// tc's actions as a test run returns them.
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

struct Fixture {
    name: &'static str,
    hook: Hook,
    setup: Vec<Setup>,
    settings: Option<LoadSettings>,
    /// Frames run through the program first (at the fixture's hook), each with its ingress
    /// device (a fragment train's first fragments); their outcome is not checked and the
    /// counters count from after them.
    before: Vec<(&'static str, Vec<u8>)>,
    ingress: &'static str,
    input: Vec<u8>,
    action: u32,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
    counters: Vec<(Counter, u64)>,
    /// Checks on FLOWS after the run (timestamps and cached next hops aside).
    flows_after: Vec<(FlowKey, Option<FlowValue>)>,
    /// The same on FLOWS6.
    flows6_after: Flow6Checks,
    /// The next hop cached in an entry after the run (`None`: nothing cached).
    next_hop_after: Vec<(FlowKey, Option<CachedHop>)>,
    /// The same in FLOWS6.
    next_hop6_after: Vec<(FlowKey6, Option<CachedHop>)>,
    /// Whether a backend is marked suspect after the run.
    suspect_after: Vec<(u32, bool)>,
    /// The highest TCP timestamp sent (TS_HIGH) after the run.
    ts_highest_after: Option<u32>,
    /// Another outcome as good as `output` and `flows_after`, for a choice the data path makes
    /// at random (which of two equal candidates its random probes meet first).
    or_else: Option<(Vec<u8>, FlowChecks)>,
}

fn backends() -> Vec<Setup> {
    vec![
        Setup::Backend {
            id: 1,
            addr: B1,
            healthy: true,
        },
        Setup::Backend {
            id: 2,
            addr: B2,
            healthy: true,
        },
        Setup::Backend {
            id: 3,
            addr: B3,
            healthy: true,
        },
    ]
}

fn web(backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id: 0,
        port: WEB_PORT,
        proto: TCP,
        backends: backends.to_vec(),
        snat: vec![SNAT],
        mss: None,
        mode: SERVICE_MODE_NAT,
    }
}

/// `web` with the SNAT pool SNAT_POOL.
fn web_pool(backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id: 0,
        port: WEB_PORT,
        proto: TCP,
        backends: backends.to_vec(),
        snat: SNAT_POOL.to_vec(),
        mss: None,
        mode: SERVICE_MODE_NAT,
    }
}

fn dns(backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id: 1,
        port: DNS_PORT,
        proto: UDP,
        backends: backends.to_vec(),
        snat: vec![SNAT],
        mss: None,
        mode: SERVICE_MODE_NAT,
    }
}

/// An established TCP flow CLIENT:cport -> VIP:80 on `backend` via SNAT port `snat_port`,
/// seen just now.
fn flow(cport: u16, backend: u32, snat_port: u16, cached: Option<CachedHop>) -> Setup {
    Setup::Flow(FlowSetup {
        proto: TCP,
        cport,
        backend,
        snat_port,
        state: TCP_ESTABLISHED,
        seen_ago_ns: Some(0),
        fin_sent: (false, false),
        cached,
        syn_well_formed: true,
        ts_add: None,
        snat_index: 0,
        mss: 0,
    })
}

/// As `flow`, in `state`, last seen `ago_ns` before the run (`None`: never).
fn flow_in(state: u32, cport: u16, backend: u32, snat_port: u16, ago_ns: Option<u64>) -> FlowSetup {
    FlowSetup {
        state,
        seen_ago_ns: ago_ns,
        fin_sent: match state {
            TCP_FIN_WAIT => (true, false),
            TCP_LAST_ACK | TCP_TIME_WAIT => (true, true),
            _ => (false, false),
        },
        ..match flow(cport, backend, snat_port, None) {
            Setup::Flow(f) => f,
            _ => unreachable!("flow() makes a flow"),
        }
    }
}

/// A TCP flow in TIME_WAIT: seen just now with a cached hop, never without.
fn closed_flow(cport: u16, backend: u32, snat_port: u16, cached: Option<CachedHop>) -> Setup {
    Setup::Flow(FlowSetup {
        cached,
        ..flow_in(TCP_TIME_WAIT, cport, backend, snat_port, cached.map(|_| 0))
    })
}

/// A client's SYN sent to `backend` `ago_ns` before the run, not answered.
fn half_open(cport: u16, backend: u32, snat_port: u16, ago_ns: u64) -> Setup {
    Setup::Flow(flow_in(
        TCP_SYN_SENT,
        cport,
        backend,
        snat_port,
        Some(ago_ns),
    ))
}

/// As `half_open`, with the next hop to the backend cached: where its replies come from.
fn half_open_via_lb1(cport: u16, backend: u32, snat_port: u16, ago_ns: u64) -> Setup {
    let mac = if backend == 1 { B1_MAC } else { B2_MAC };
    Setup::Flow(FlowSetup {
        cached: Some(hop(mac, 1500)),
        ..flow_in(TCP_SYN_SENT, cport, backend, snat_port, Some(ago_ns))
    })
}

/// A half-open flow to backend 1 whose next hop is the bridge br0, its SYN sent just now.
fn half_open_via_bridge(cport: u16, snat_port: u16) -> Setup {
    Setup::Flow(FlowSetup {
        cached: Some(CachedHop {
            iface: "br0",
            ..hop(B1_MAC, 1500)
        }),
        ..flow_in(TCP_SYN_SENT, cport, 1, snat_port, Some(0))
    })
}

/// `frame`, a TCP segment over a 20-byte IPv4 header, with its checksum one more than right.
/// A checksum updated for a rewrite stays one off, so the expected output is made the same way.
fn tcp_checksum_off_by_one(mut frame: Vec<u8>) -> Vec<u8> {
    const AT: usize = 14 + 20 + 16;
    let sum = u16::from_be_bytes([frame[AT], frame[AT + 1]]);
    assert!(sum < 0xfffe, "a checksum that one more would wrap");
    frame[AT..AT + 2].copy_from_slice(&(sum + 1).to_be_bytes());
    frame
}

/// A UDP flow CLIENT:cport -> VIP:53 on `backend` via `snat_port`, last seen `ago_ns` before.
fn udp_flow(state: u32, cport: u16, backend: u32, snat_port: u16, ago_ns: u64) -> Setup {
    Setup::Flow(FlowSetup {
        proto: UDP,
        ..flow_in(state, cport, backend, snat_port, Some(ago_ns))
    })
}

/// A next hop out of lb1 towards `dst`, approved for packets up to `ok_len` bytes.
fn hop(dst: Mac, ok_len: u16) -> CachedHop {
    CachedHop {
        iface: "lb1",
        src: LB1_MAC,
        dst,
        ok_len,
    }
}

fn with(mut base: Vec<Setup>, more: &[Setup]) -> Vec<Setup> {
    base.extend_from_slice(more);
    base
}

fn addr_of(id: u32) -> Ipv4Addr {
    match id {
        1 => B1,
        2 => B2,
        _ => B3,
    }
}

/// The two FLOWS entries of a flow, as the data path writes them (timestamps aside).
fn flow_pair(
    proto: u8,
    cport: u16,
    vport: u16,
    backend: u32,
    snat_port: u16,
) -> [(FlowKey, FlowValue); 2] {
    flow_pair_via(proto, cport, vport, backend, (SNAT, 0), snat_port)
}

/// `flow_pair` via the `index`th address `snat` of its service's SNAT pool.
fn flow_pair_via(
    proto: u8,
    cport: u16,
    vport: u16,
    backend: u32,
    (snat, index): (Ipv4Addr, u32),
    snat_port: u16,
) -> [(FlowKey, FlowValue); 2] {
    let b = addr_of(backend);
    // A TCP flow opens with a well-formed SYN in all but the fixtures that say otherwise.
    let forward_flags = if proto == TCP {
        FLOW_SYN_WELL_FORMED
    } else {
        0
    };
    [
        (
            key(CLIENT, cport, VIP, vport, proto),
            FlowValue {
                snat_index: index as u16,
                ..value(snat, snat_port, b, BACKEND_PORT, backend, forward_flags)
            },
        ),
        (
            key(b, BACKEND_PORT, snat, snat_port, proto),
            FlowValue {
                snat_index: index as u16,
                ..value(VIP, vport, CLIENT, cport, backend, FLOW_REVERSE)
            },
        ),
    ]
}

/// `flow_pair` with both entries in `state`, as the checks after a run expect them.
fn flow_pair_in(
    state: u32,
    proto: u8,
    cport: u16,
    vport: u16,
    backend: u32,
    snat_port: u16,
) -> Vec<(FlowKey, Option<FlowValue>)> {
    flow_pair(proto, cport, vport, backend, snat_port)
        .map(|(k, v)| (k, in_state(state, v)))
        .to_vec()
}

/// An entry `value` in `state`.
fn in_state<A>(state: u32, v: FlowValueOf<A>) -> Option<FlowValueOf<A>> {
    Some(with_end_counted(FlowValueOf { state, ..v }))
}

/// `v` with FLOW_END_COUNTED if it is a forward entry of an ended connection: the data path
/// sets it where it counts the end (`flow_count.rs`), and `apply` on ended flows it sets up.
fn with_end_counted<A>(mut v: FlowValueOf<A>) -> FlowValueOf<A> {
    if v.flags & FLOW_REVERSE == 0 && ended(v.state) {
        v.flags |= FLOW_END_COUNTED;
    }
    v
}

/// The backend the data path's Maglev lookup picks for client port `cport`.
fn maglev_choice(backends: &[(u32, u32)], cport: u16, vport: u16, proto: u8) -> u32 {
    let table = table_for(backends);
    table[(key(CLIENT, cport, VIP, vport, proto).hash() % MAGLEV_SIZE) as usize]
}

fn table_for(backends: &[(u32, u32)]) -> Vec<u32> {
    let list: Vec<MaglevBackend> = backends
        .iter()
        .map(|&(id, weight)| MaglevBackend {
            id,
            addr: SocketAddrV4::new(addr_of(id), BACKEND_PORT).into(),
            weight,
        })
        .collect();
    build_table(&list, MAGLEV_SIZE)
}

/// The first client port from `from` whose Maglev slot names `backend`.
fn port_choosing(backend: u32, backends: &[(u32, u32)], from: u16) -> u16 {
    (from..)
        .find(|&p| maglev_choice(backends, p, WEB_PORT, TCP) == backend)
        .expect("some port chooses every backend")
}

/// A packet of backend `backend` to SNAT:snat_port (a reply), flags to be set.
fn from_backend(backend: u32, snat_port: u16) -> PacketBuilder {
    let mac = if backend == 1 { B1_MAC } else { B2_MAC };
    pkt()
        .eth(mac, LB1_MAC)
        .ipv4(addr_of(backend), SNAT)
        .tcp(BACKEND_PORT, snat_port)
}

/// A reply as the client receives it, from VIP:80 to its port `cport`.
fn to_client(cport: u16) -> PacketBuilder {
    pkt()
        .eth(LB0_MAC, CLIENT_MAC)
        .ipv4(VIP, CLIENT)
        .ttl(63)
        .tcp(WEB_PORT, cport)
}

/// The RST the balancer answers a flowless segment from `cport` with: from the VIP, at the
/// segment's acknowledgement number, an atomic datagram (ID 0, DF) with TTL 64.
fn rst_to_client(cport: u16, seq: u32) -> PacketBuilder {
    pkt()
        .eth(LB0_MAC, CLIENT_MAC)
        .ipv4(VIP, CLIENT)
        .ip_id(0)
        .tcp(WEB_PORT, cport)
        .tcp_flags(TCP_RST)
        .seq(seq)
        .window(0)
}

fn client_syn(cport: u16) -> PacketBuilder {
    pkt()
        .eth(CLIENT_MAC, LB0_MAC)
        .ipv4(CLIENT, VIP)
        .tcp(cport, WEB_PORT)
        .syn()
}

fn to_backend(backend: u32, snat_port: u16) -> PacketBuilder {
    let mac = if backend == 1 { B1_MAC } else { B2_MAC };
    pkt()
        .eth(LB1_MAC, mac)
        .ipv4(SNAT, addr_of(backend))
        .ttl(63)
        .tcp(snat_port, BACKEND_PORT)
}

fn fixture(
    name: &'static str,
    setup: Vec<Setup>,
    input: Vec<u8>,
    action: u32,
    output: Option<Vec<u8>>,
    counters: Vec<(Counter, u64)>,
) -> Fixture {
    Fixture {
        name,
        hook: Hook::Xdp,
        setup,
        settings: None,
        before: vec![],
        ingress: "lb0",
        input,
        action,
        output,
        counters,
        flows_after: vec![],
        flows6_after: vec![],
        next_hop_after: vec![],
        next_hop6_after: vec![],
        suspect_after: vec![],
        ts_highest_after: None,
        or_else: None,
    }
}

fn fixtures() -> Vec<Fixture> {
    let weighted = [(1, 4), (2, 6)];
    let mut list = vec![
        Fixture {
            flows_after: flow_pair_in(TCP_SYN_SENT, TCP, 40000, WEB_PORT, 1, PORT_MIN),
            // The new flow's next hop is cached at once; the reply direction caches its own.
            next_hop_after: vec![
                (
                    key(CLIENT, 40000, VIP, WEB_PORT, TCP),
                    Some(hop(B1_MAC, 40)),
                ),
                (key(B1, BACKEND_PORT, SNAT, PORT_MIN, TCP), None),
            ],
            ..fixture(
                "select_tcp_syn_to_vip_snats_to_backend",
                with(backends(), &[web(&[(1, 1)])]),
                client_syn(40000).build(),
                XDP_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Packets(1), 1),
                ],
            )
        },
        // A new flow takes its backend's next hop from the hop cache (`hop_cache.rs`) that an
        // earlier packet to the backend filled: approved for that packet's 1,040 bytes, where
        // a FIB lookup of its own would have approved the SYN's 40.
        Fixture {
            before: vec![(
                "lb0",
                client_syn(40020)
                    .payload(&bulk(1000))
                    .build_with(|b| b.tcp_flags(0x18)),
            )],
            next_hop_after: vec![(
                key(CLIENT, 40000, VIP, WEB_PORT, TCP),
                Some(hop(B1_MAC, 1040)),
            )],
            ..fixture(
                "select_new_flow_takes_its_backends_cached_hop",
                with(backends(), &[web(&[(1, 1)]), flow(40020, 1, 31000, None)]),
                client_syn(40000).build(),
                XDP_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        {
            let chosen = maglev_choice(&weighted, 40001, WEB_PORT, TCP);
            fixture(
                "select_weighted_syn_goes_to_maglev_choice",
                with(backends(), &[web(&weighted)]),
                client_syn(40001).payload(b"").build(),
                XDP_REDIRECT,
                Some(to_backend(chosen, PORT_MIN).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(chosen), 1)],
            )
        },
        fixture(
            "flow_established_ack_follows_existing_flow",
            with(backends(), &[web(&[(1, 1)]), flow(40002, 2, 31000, None)]),
            client_syn(40002)
                .ack()
                .payload(b"GET / HTTP/1.0\r\n\r\n")
                .build_with(|b| b.tcp_flags(0x18)),
            XDP_REDIRECT,
            Some(
                to_backend(2, 31000)
                    .tcp_flags(0x18)
                    .payload(b"GET / HTTP/1.0\r\n\r\n")
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::NewFlows(2), 0),
                (Counter::Packets(2), 1),
            ],
        ),
        Fixture {
            ingress: "lb1",
            ..fixture(
                "nat_reply_from_backend_rewritten_to_vip_and_client",
                with(backends(), &[web(&[(1, 1)]), flow(40003, 1, 31001, None)]),
                pkt()
                    .eth(B1_MAC, LB1_MAC)
                    .ipv4(B1, SNAT)
                    .tcp(BACKEND_PORT, 31001)
                    .syn()
                    .ack()
                    .payload(b"hello")
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .tcp(WEB_PORT, 40003)
                        .syn()
                        .ack()
                        .payload(b"hello")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::Packets(1), 1)],
            )
        },
        fixture(
            "nat_udp_request_snats_to_backend",
            with(backends(), &[dns(&[(2, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .udp(5353, DNS_PORT)
                .payload(b"query")
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B2_MAC)
                    .ipv4(SNAT, B2)
                    .ttl(63)
                    .udp(PORT_MIN, BACKEND_PORT)
                    .payload(b"query")
                    .build(),
            ),
            vec![(Counter::Redirect, 1), (Counter::NewFlows(2), 1)],
        ),
        fixture(
            "nat_udp_without_checksum_keeps_it_zero",
            with(backends(), &[dns(&[(2, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .udp(5354, DNS_PORT)
                .udp_no_checksum()
                .payload(b"q")
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B2_MAC)
                    .ipv4(SNAT, B2)
                    .ttl(63)
                    .udp(PORT_MIN, BACKEND_PORT)
                    .udp_no_checksum()
                    .payload(b"q")
                    .build(),
            ),
            vec![(Counter::Redirect, 1)],
        ),
        fixture(
            "parse_ip_options_balanced_with_options_kept",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40004).ip_options(&[0x94, 0x04, 0, 0]).build(),
            XDP_REDIRECT,
            Some(
                to_backend(1, PORT_MIN)
                    .syn()
                    .ip_options(&[0x94, 0x04, 0, 0])
                    .build(),
            ),
            vec![(Counter::Redirect, 1)],
        ),
        Fixture {
            flows_after: vec![(key(B1, BACKEND_PORT, SNAT, 31002, TCP), None)],
            ..fixture(
                "flow_half_open_on_unhealthy_backend_syn_rebalanced_to_healthy",
                vec![
                    Setup::Backend {
                        id: 1,
                        addr: B1,
                        healthy: false,
                    },
                    Setup::Backend {
                        id: 2,
                        addr: B2,
                        healthy: true,
                    },
                    web(&[(2, 1)]),
                    half_open(40005, 1, 31002, 0),
                ],
                client_syn(40005).build(),
                XDP_REDIRECT,
                Some(to_backend(2, PORT_MIN).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(2), 1)],
            )
        },
        Fixture {
            flows_after: vec![(key(B1, BACKEND_PORT, SNAT, 31003, TCP), None)],
            ..fixture(
                "flow_syn_reusing_closed_tuple_gets_new_flow",
                with(
                    backends(),
                    &[web(&[(1, 1)]), closed_flow(40006, 1, 31003, None)],
                ),
                client_syn(40006).build(),
                XDP_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![(Counter::NewFlows(1), 1)],
            )
        },
        // Passive failover: the backend refuses a SYN it never answered. The RST is kept from
        // the client, the flow goes, the backend is suspect.
        Fixture {
            flows_after: flow_pair(TCP, 40040, WEB_PORT, 1, 31040)
                .map(|(k, _)| (k, None))
                .to_vec(),
            suspect_after: vec![(1, true), (2, false)],
            ingress: "lb1",
            ..fixture(
                "failover_backend_rst_to_unanswered_syn_dropped_and_marks_suspect",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        half_open_via_lb1(40040, 1, 31040, 0),
                    ],
                ),
                from_backend(1, 31040).tcp_flags(0x14).ack_seq(1001).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 1),
                    (Counter::Event("suspect_refused"), 1),
                ],
            )
        },
        // The same RST arriving where the backend's packets do not (another device, or another
        // MAC on the backends' segment) is no evidence: a client could forge it. It ends the
        // connection as any RST to a SYN does, and goes on to the client.
        Fixture {
            flows_after: flow_pair_in(TCP_CLOSED, TCP, 40045, WEB_PORT, 1, 31045),
            suspect_after: vec![(1, false)],
            ingress: "lb0",
            ..fixture(
                "failover_refusal_on_another_device_marks_nothing",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        half_open_via_lb1(40045, 1, 31045, 0),
                    ],
                ),
                from_backend(1, 31045).tcp_flags(0x14).ack_seq(1001).build(),
                XDP_REDIRECT,
                Some(to_client(40045).tcp_flags(0x14).ack_seq(1001).build()),
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 0),
                    (Counter::Event("suspect_refused"), 0),
                ],
            )
        },
        Fixture {
            flows_after: flow_pair_in(TCP_CLOSED, TCP, 40046, WEB_PORT, 1, 31046),
            suspect_after: vec![(1, false)],
            ingress: "lb1",
            ..fixture(
                "failover_refusal_from_another_mac_marks_nothing",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        half_open_via_lb1(40046, 1, 31046, 0),
                    ],
                ),
                from_backend(1, 31046)
                    .eth(B2_MAC, LB1_MAC)
                    .tcp_flags(0x14)
                    .ack_seq(1001)
                    .build(),
                XDP_REDIRECT,
                Some(to_client(40046).tcp_flags(0x14).ack_seq(1001).build()),
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 0),
                    (Counter::Event("suspect_refused"), 0),
                ],
            )
        },
        // A flow made to a backend already suspect (no other was left): its refusal reaches
        // the client, which would otherwise retry the same backend until it gives up.
        Fixture {
            suspect_after: vec![(1, true)],
            ingress: "lb1",
            ..fixture(
                "failover_refusal_after_the_mark_reaches_the_client",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        Setup::Suspect {
                            backend: 1,
                            ago_ns: 500_000_000,
                        },
                        half_open(40044, 1, 31044, 0),
                    ],
                ),
                from_backend(1, 31044).tcp_flags(0x14).ack_seq(1001).build(),
                XDP_REDIRECT,
                Some(to_client(40044).tcp_flags(0x14).ack_seq(1001).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Drop(DropReason::BackendRefused), 0),
                    (Counter::Event("suspect_refused"), 0),
                ],
            )
        },
        // An answered connection's RST is the backend's to send: forwarded as any reply.
        Fixture {
            suspect_after: vec![(1, false)],
            ingress: "lb1",
            ..fixture(
                "failover_backend_rst_on_answered_flow_forwarded",
                with(
                    backends(),
                    &[web(&[(1, 1), (2, 1)]), flow(40041, 1, 31041, None)],
                ),
                from_backend(1, 31041).tcp_flags(0x14).build(),
                XDP_REDIRECT,
                Some(to_client(40041).tcp_flags(0x14).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("suspect_refused"), 0),
                ],
            )
        },
        // The client's SYN again, its backend silent since: suspect, and the SYN moves on.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40100);
            Fixture {
                suspect_after: vec![(1, true), (2, false)],
                flows_after: vec![(key(B1, BACKEND_PORT, SNAT, 31042, TCP), None)],
                ..fixture(
                    "failover_retransmitted_syn_unanswered_moves_to_another_backend",
                    with(
                        backends(),
                        &[
                            web(&[(1, 1), (2, 1)]),
                            half_open(cport, 1, 31042, 600_000_000),
                        ],
                    ),
                    client_syn(cport).build(),
                    XDP_REDIRECT,
                    Some(to_backend(2, PORT_MIN).syn().build()),
                    vec![
                        (Counter::NewFlows(2), 1),
                        (Counter::Event("suspect_unanswered"), 1),
                        (Counter::Event("steered_off_suspect"), 1),
                    ],
                )
            }
        },
        // A retransmission with a wrong checksum is no evidence: the backend rightly ignores
        // it, and a client could send it on purpose. It goes to the flow's backend as it is.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40400);
            Fixture {
                suspect_after: vec![(1, false)],
                ..fixture(
                    "failover_unanswered_syn_with_a_bad_checksum_marks_nothing",
                    with(
                        backends(),
                        &[
                            web(&[(1, 1), (2, 1)]),
                            half_open(cport, 1, 31047, 600_000_000),
                        ],
                    ),
                    tcp_checksum_off_by_one(client_syn(cport).build()),
                    XDP_REDIRECT,
                    Some(tcp_checksum_off_by_one(to_backend(1, 31047).syn().build())),
                    vec![
                        (Counter::NewFlows(1), 0),
                        (Counter::Event("suspect_unanswered"), 0),
                        (Counter::Event("steered_off_suspect"), 0),
                    ],
                )
            }
        },
        // Nor is a good retransmission of a SYN whose first copy was bad (or carried data).
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40500);
            let opened_badly = Setup::Flow(FlowSetup {
                syn_well_formed: false,
                ..flow_in(TCP_SYN_SENT, cport, 1, 31048, Some(600_000_000))
            });
            Fixture {
                suspect_after: vec![(1, false)],
                ..fixture(
                    "failover_flow_opened_by_a_bad_syn_marks_nothing",
                    with(backends(), &[web(&[(1, 1), (2, 1)]), opened_badly]),
                    client_syn(cport).build(),
                    XDP_REDIRECT,
                    Some(to_backend(1, 31048).syn().build()),
                    vec![
                        (Counter::NewFlows(1), 0),
                        (Counter::Event("suspect_unanswered"), 0),
                    ],
                )
            }
        },
        // A flow opened by a SYN with a bad checksum is not marked well formed.
        Fixture {
            flows_after: vec![(
                key(CLIENT, 40049, VIP, WEB_PORT, TCP),
                in_state(TCP_SYN_SENT, value(SNAT, PORT_MIN, B1, BACKEND_PORT, 1, 0)),
            )],
            ..fixture(
                "select_syn_with_a_bad_checksum_opens_a_flow_not_well_formed",
                with(backends(), &[web(&[(1, 1)])]),
                tcp_checksum_off_by_one(client_syn(40049).build()),
                XDP_REDIRECT,
                Some(tcp_checksum_off_by_one(
                    to_backend(1, PORT_MIN).syn().build(),
                )),
                vec![(Counter::NewFlows(1), 1)],
            )
        },
        // A SYN again too soon to be a retransmission (a duplicate): same backend, no mark.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40200);
            Fixture {
                suspect_after: vec![(1, false)],
                ..fixture(
                    "failover_duplicate_syn_too_soon_stays_on_its_backend",
                    with(
                        backends(),
                        &[web(&[(1, 1), (2, 1)]), half_open(cport, 1, 31043, 0)],
                    ),
                    client_syn(cport).build(),
                    XDP_REDIRECT,
                    Some(to_backend(1, 31043).syn().build()),
                    vec![
                        (Counter::NewFlows(1), 0),
                        (Counter::Event("suspect_unanswered"), 0),
                    ],
                )
            }
        },
        // A new connection whose Maglev slot names a suspect backend goes to the next slot's.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40300);
            fixture(
                "failover_new_syn_steered_off_suspect_backend",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        Setup::Suspect {
                            backend: 1,
                            ago_ns: 0,
                        },
                    ],
                ),
                client_syn(cport).build(),
                XDP_REDIRECT,
                Some(to_backend(2, PORT_MIN).syn().build()),
                vec![
                    (Counter::NewFlows(2), 1),
                    (Counter::Event("steered_off_suspect"), 1),
                ],
            )
        },
        // A mark older than SUSPECT_HOLD_NS no longer steers.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40400);
            fixture(
                "failover_expired_suspect_mark_ignored",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        Setup::Suspect {
                            backend: 1,
                            ago_ns: lb_common::SUSPECT_HOLD_NS + 1_000_000_000,
                        },
                    ],
                ),
                client_syn(cport).build(),
                XDP_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("steered_off_suspect"), 0),
                ],
            )
        },
        // When every backend is suspect, the table's choice stands.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40500);
            fixture(
                "failover_all_suspect_keeps_the_tables_choice",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        Setup::Suspect {
                            backend: 1,
                            ago_ns: 0,
                        },
                        Setup::Suspect {
                            backend: 2,
                            ago_ns: 0,
                        },
                    ],
                ),
                client_syn(cport).build(),
                XDP_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("steered_off_suspect"), 0),
                ],
            )
        },
        // Backend id 1 now names another address (B1 was removed, its id reused): the flow
        // made for B1 must not go to the new holder.
        Fixture {
            flows_after: flow_pair(TCP, 40045, WEB_PORT, 1, 31045)
                .map(|(k, _)| (k, None))
                .to_vec(),
            ..fixture(
                "flow_whose_backend_id_was_reused_is_not_forwarded",
                vec![
                    Setup::Backend {
                        id: 1,
                        addr: B2,
                        healthy: true,
                    },
                    web(&[(1, 1)]),
                    flow(40045, 1, 31045, None),
                ],
                client_syn(40045).tcp_flags(TCP_ACK).build(),
                XDP_REDIRECT,
                Some(rst_to_client(40045, 0).build()),
                vec![(Counter::Event("reset_no_flow"), 1)],
            )
        },
        // Found by the fuzzer: the reopening SYN expires here, so no new flow replaces the old
        // one, and its forward entry must not stay behind without its reply entry.
        Fixture {
            flows_after: flow_pair(TCP, 40016, WEB_PORT, 1, 31016)
                .map(|(k, _)| (k, None))
                .to_vec(),
            ..fixture(
                "flow_syn_reopening_closed_tuple_with_ttl_1_removes_both_directions",
                with(
                    backends(),
                    &[web(&[(1, 1)]), closed_flow(40016, 1, 31016, None)],
                ),
                client_syn(40016).ttl(1).build(),
                XDP_PASS,
                None,
                vec![
                    (Counter::Pass(PassReason::TtlExpired), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
        Fixture {
            flows_after: vec![
                (
                    key(CLIENT, 40007, VIP, WEB_PORT, TCP),
                    in_state(
                        TCP_FIN_WAIT,
                        value(
                            SNAT,
                            31004,
                            B1,
                            BACKEND_PORT,
                            1,
                            FLOW_SYN_WELL_FORMED | FLOW_FIN_SENT,
                        ),
                    ),
                ),
                (
                    key(B1, BACKEND_PORT, SNAT, 31004, TCP),
                    in_state(
                        TCP_FIN_WAIT,
                        value(VIP, WEB_PORT, CLIENT, 40007, 1, FLOW_REVERSE),
                    ),
                ),
            ],
            ..fixture(
                "conntrack_fin_forwarded_and_moves_to_fin_wait",
                with(backends(), &[web(&[(1, 1)]), flow(40007, 1, 31004, None)]),
                client_syn(40007).tcp_flags(0x11).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 31004).tcp_flags(0x11).build()),
                vec![(Counter::Redirect, 1)],
            )
        },
        Fixture {
            next_hop_after: vec![
                (
                    key(CLIENT, 40021, VIP, WEB_PORT, TCP),
                    Some(hop(B2_MAC, 40)),
                ),
                (key(B2, BACKEND_PORT, SNAT, 31010, TCP), None),
            ],
            ..fixture(
                "forward_established_flow_caches_next_hop",
                with(backends(), &[web(&[(1, 1)]), flow(40021, 2, 31010, None)]),
                client_syn(40021).tcp_flags(0x10).build(),
                XDP_REDIRECT,
                Some(to_backend(2, 31010).tcp_flags(0x10).build()),
                vec![(Counter::Redirect, 1)],
            )
        },
        fixture(
            "forward_cached_next_hop_used_without_fib_lookup",
            with(
                backends(),
                &[
                    web(&[(1, 1)]),
                    flow(40022, 2, 31011, Some(hop(CACHED_MAC, 1500))),
                ],
            ),
            client_syn(40022).tcp_flags(0x10).build(),
            XDP_REDIRECT,
            Some(
                to_backend(2, 31011)
                    .eth(LB1_MAC, CACHED_MAC)
                    .tcp_flags(0x10)
                    .build(),
            ),
            vec![(Counter::Redirect, 1), (Counter::Packets(2), 1)],
        ),
        Fixture {
            next_hop_after: vec![(
                key(CLIENT, 40023, VIP, WEB_PORT, TCP),
                Some(hop(B2_MAC, 140)),
            )],
            ..fixture(
                "forward_packet_larger_than_cached_looked_up_in_fib",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        flow(40023, 2, 31012, Some(hop(CACHED_MAC, 40))),
                    ],
                ),
                client_syn(40023).tcp_flags(0x18).payload(&[7; 100]).build(),
                XDP_REDIRECT,
                Some(
                    to_backend(2, 31012)
                        .tcp_flags(0x18)
                        .payload(&[7; 100])
                        .build(),
                ),
                vec![(Counter::Redirect, 1)],
            )
        },
        fixture(
            "reset_ack_without_flow_answered_with_rst",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40008)
                .tcp_flags(TCP_PSH | TCP_ACK)
                .ack_seq(7000)
                .payload(b"GET / HTTP/1.0\r\n\r\n")
                .build(),
            XDP_REDIRECT,
            Some(rst_to_client(40008, 7000).build()),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("reset_no_flow"), 1),
                (Counter::Drop(DropReason::TcpNoFlow), 0),
                (Counter::NewFlows(1), 0),
            ],
        ),
        fixture(
            "reset_fin_with_ip_options_answered_with_a_bare_rst",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40108)
                .ip_options(&[1, 1, 1, 1])
                .tcp_flags(TCP_FIN | TCP_ACK)
                .seq(3000)
                .ack_seq(9)
                .payload(b"bye")
                .build(),
            XDP_REDIRECT,
            Some(rst_to_client(40108, 9).build()),
            vec![(Counter::Event("reset_no_flow"), 1)],
        ),
        fixture(
            "reset_rst_without_flow_dropped_silently",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40208).tcp_flags(TCP_RST | TCP_ACK).build(),
            XDP_DROP,
            None,
            vec![
                (Counter::Drop(DropReason::TcpNoFlow), 1),
                (Counter::Event("reset_no_flow"), 0),
            ],
        ),
        fixture(
            "reset_ack_to_a_port_no_service_has_passed",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40308).tcp(40308, 81).tcp_flags(TCP_ACK).build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::NotService), 1),
                (Counter::Event("reset_no_flow"), 0),
            ],
        ),
        Fixture {
            ingress: "lb1",
            ..fixture(
                "reset_on_a_nic_goes_back_by_xdp_tx",
                with(backends(), &[web(&[(1, 1)]), Setup::HairpinTx]),
                pkt()
                    .eth(B2_MAC, LB1_MAC)
                    .ipv4(B2, VIP)
                    .tcp(40408, WEB_PORT)
                    .tcp_flags(TCP_ACK)
                    .ack_seq(55)
                    .build(),
                XDP_TX,
                Some(
                    pkt()
                        .eth(LB1_MAC, B2_MAC)
                        .ipv4(VIP, B2)
                        .ip_id(0)
                        .tcp(WEB_PORT, 40408)
                        .tcp_flags(TCP_RST)
                        .seq(55)
                        .window(0)
                        .build(),
                ),
                vec![(Counter::Tx, 1), (Counter::Event("reset_no_flow"), 1)],
            )
        },
        fixture(
            "select_no_backend_with_weight_dropped",
            with(backends(), &[web(&[(1, 0), (2, 0)])]),
            client_syn(40009).build(),
            XDP_DROP,
            None,
            vec![(Counter::Drop(DropReason::NoBackend), 1)],
        ),
        Fixture {
            settings: one_port(),
            ..fixture(
                "select_snat_ports_exhausted_dropped",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        // Seen just now: an active flow, whose port is never reclaimed.
                        flow(40010, 1, 31005, Some(hop(B1_MAC, 1500))),
                    ],
                ),
                client_syn(40011).build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::SnatPortsExhausted), 1)],
            )
        },
        Fixture {
            settings: one_port(),
            flows_after: vec![
                (key(CLIENT, 40030, VIP, WEB_PORT, TCP), None),
                (
                    key(B1, BACKEND_PORT, SNAT, 31005, TCP),
                    in_state(
                        TCP_SYN_SENT,
                        value(VIP, WEB_PORT, CLIENT, 40031, 1, FLOW_REVERSE),
                    ),
                ),
            ],
            ..fixture(
                "select_snat_port_of_long_closed_flow_reclaimed",
                with(
                    backends(),
                    &[web(&[(1, 1)]), closed_flow(40030, 1, 31005, None)],
                ),
                client_syn(40031).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 31005).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        Fixture {
            settings: one_port(),
            flows_after: vec![(
                key(CLIENT, 40032, VIP, WEB_PORT, TCP),
                in_state(
                    TCP_TIME_WAIT,
                    value(
                        SNAT,
                        31005,
                        B1,
                        BACKEND_PORT,
                        1,
                        FLOW_SYN_WELL_FORMED | FLOW_FIN_SENT,
                    ),
                ),
            )],
            ..fixture(
                "select_snat_port_of_just_closed_flow_kept",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        // Marks the flow seen just now.
                        closed_flow(40032, 1, 31005, Some(hop(B1_MAC, 1500))),
                    ],
                ),
                client_syn(40033).build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::SnatPortsExhausted), 1)],
            )
        },
        Fixture {
            flows_after: vec![(
                key(B1, BACKEND_PORT, SNAT, 25000, TCP),
                in_state(
                    TCP_SYN_SENT,
                    value(VIP, WEB_PORT, CLIENT, 25000, 1, FLOW_REVERSE),
                ),
            )],
            ..fixture(
                "select_snat_keeps_client_port_in_range",
                with(backends(), &[web(&[(1, 1)])]),
                client_syn(25000).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 25000).syn().build()),
                vec![(Counter::NewFlows(1), 1)],
            )
        },
        fixture(
            "select_snat_client_port_taken_falls_back_to_range",
            with(
                backends(),
                &[
                    web(&[(1, 1)]),
                    flow(40040, 1, 25001, Some(hop(B1_MAC, 1500))),
                ],
            ),
            client_syn(25001).build(),
            XDP_REDIRECT,
            Some(to_backend(1, PORT_MIN).syn().build()),
            vec![(Counter::NewFlows(1), 1)],
        ),
        fixture(
            "forward_ttl_1_passed_unchanged",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40012).ttl(1).build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::TtlExpired), 1)],
        ),
        fixture(
            "forward_unresolved_neighbour_passed_rewritten",
            with(backends(), &[web(&[(3, 1)])]),
            client_syn(40013).build(),
            XDP_PASS,
            Some(
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(SNAT, B3)
                    .tcp(PORT_MIN, BACKEND_PORT)
                    .syn()
                    .build(),
            ),
            vec![(Counter::Pass(PassReason::NeighbourUnresolved), 1)],
        ),
        // Into a bridge of containers the kernel forwards (XDP cannot send into one), but the
        // hop is cached: the container's refusal is recognised by it on the bridge's port.
        Fixture {
            next_hop_after: vec![(
                key(CLIENT, 40014, VIP, WEB_PORT, TCP),
                Some(hop(B1_MAC, 40)),
            )],
            ..fixture(
                "forward_into_a_bridge_passed_rewritten_with_its_hop_cached",
                with(backends(), &[web(&[(1, 1)]), Setup::Bridge("lb1")]),
                client_syn(40014).build(),
                XDP_PASS,
                Some(
                    pkt()
                        .eth(CLIENT_MAC, LB0_MAC)
                        .ipv4(SNAT, B1)
                        .tcp(PORT_MIN, BACKEND_PORT)
                        .syn()
                        .build(),
                ),
                vec![
                    (Counter::Pass(PassReason::EgressBridge), 1),
                    (Counter::Redirect, 0),
                    (Counter::NewFlows(1), 1),
                ],
            )
        },
        {
            let datagram = |payload: &[u8]| {
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(CLIENT, VIP)
                    .udp(40015, DNS_PORT)
                    .payload(payload)
            };
            Fixture {
                before: vec![("lb0", datagram(b"first").build())],
                ..fixture(
                    "forward_into_a_bridge_by_the_cached_hop_passed_too",
                    with(backends(), &[dns(&[(1, 1)]), Setup::Bridge("lb1")]),
                    datagram(b"second").build(),
                    XDP_PASS,
                    Some(
                        pkt()
                            .eth(CLIENT_MAC, LB0_MAC)
                            .ipv4(SNAT, B1)
                            .udp(PORT_MIN, BACKEND_PORT)
                            .payload(b"second")
                            .build(),
                    ),
                    vec![
                        (Counter::Pass(PassReason::EgressBridge), 1),
                        (Counter::Redirect, 0),
                        (Counter::NewFlows(1), 0),
                    ],
                )
            }
        },
        Fixture {
            ingress: "lb1",
            ..fixture(
                "forward_hairpin_on_nic_uses_xdp_tx",
                with(backends(), &[web(&[(1, 1)]), Setup::HairpinTx]),
                pkt()
                    .eth(B2_MAC, LB1_MAC)
                    .ipv4(B2, VIP)
                    .tcp(40014, WEB_PORT)
                    .syn()
                    .build(),
                XDP_TX,
                Some(
                    pkt()
                        .eth(LB1_MAC, B1_MAC)
                        .ipv4(SNAT, B1)
                        .ttl(63)
                        .tcp(PORT_MIN, BACKEND_PORT)
                        .syn()
                        .build(),
                ),
                vec![(Counter::Tx, 1)],
            )
        },
        fixture(
            "parse_not_a_service_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, OTHER)
                .tcp(40015, WEB_PORT)
                .syn()
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotService), 1)],
        ),
        fixture(
            "parse_vip_other_port_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .tcp(40016, 443)
                .syn()
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotService), 1)],
        ),
        fixture(
            "parse_arp_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, [0xff; 6])
                .ethertype(0x0806)
                .payload(&[0, 1, 8, 0, 6, 4, 0, 1])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotIpv4), 1)],
        ),
        // IPv6 carrying protocol 0x60: neither TCP nor UDP (`ipv6_fixtures` has the rest).
        fixture(
            "parse_ipv6_of_another_protocol_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ethertype(0x86dd)
                .payload(&[0x60; 60])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotTcpUdp), 1)],
        ),
        // A ping of a VIP: answered from the VIP, back out of the ingress device, with a TTL of
        // 64; id, sequence number and data as they came.
        fixture(
            "icmp_echo_request_to_vip_answered",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .ttl(61)
                .ip_id(0x4242)
                .icmp(8, 0, [0x12, 0x34, 0, 7])
                .payload(b"abcdefghijklmnopqrstuvwxyz012345")
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB0_MAC, CLIENT_MAC)
                    .ipv4(VIP, CLIENT)
                    .ttl(64)
                    .ip_id(0x4242)
                    .icmp(0, 0, [0x12, 0x34, 0, 7])
                    .payload(b"abcdefghijklmnopqrstuvwxyz012345")
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_echo_replied"), 1),
            ],
        ),
        fixture(
            "icmp_echo_request_to_another_address_passed",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, OTHER)
                .icmp(8, 0, [0x12, 0x34, 0, 8])
                .build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::NotTcpUdp), 1),
                (Counter::Event("icmp_echo_replied"), 0),
            ],
        ),
        fixture(
            "icmp_echo_reply_to_vip_passed",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .icmp(0, 0, [0x12, 0x34, 0, 9])
                .build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::NotTcpUdp), 1),
                (Counter::Event("icmp_echo_replied"), 0),
            ],
        ),
        fixture(
            "parse_tcp_first_fragment_to_vip_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40017).fragment(true, 0).build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::Fragment), 1)],
        ),
        fixture(
            "parse_later_fragment_to_vip_passed_untouched",
            with(backends(), &[dns(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .udp(5355, DNS_PORT)
                .payload(b"tail")
                .fragment(false, 185)
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::Fragment), 1)],
        ),
        fixture(
            "parse_header_length_below_20_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            patched(client_syn(40018).build(), 14, 0x44),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::MalformedIpv4), 1)],
        ),
        fixture(
            "parse_ip_version_6_in_ipv4_frame_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            patched(client_syn(40019).build(), 14, 0x65),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::MalformedIpv4), 1)],
        ),
    ];
    // Truncated headers at every length: a TCP SYN and a UDP datagram to the VIP, cut short.
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header (EINVAL), and no
    // driver delivers such a frame, so cuts start at 14 bytes.
    for (frame, l4_len) in [
        (client_syn(40020).build(), 20),
        (
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .udp(5356, DNS_PORT)
                .build(),
            8,
        ),
    ] {
        for len in 14..14 + 20 + l4_len {
            let reason = match len {
                14..34 => PassReason::MalformedIpv4,
                _ => PassReason::ShortL4,
            };
            list.push(fixture(
                "parse_truncated_frame_passed_untouched",
                with(backends(), &[web(&[(1, 1)]), dns(&[(1, 1)])]),
                frame[..len].to_vec(),
                XDP_PASS,
                None,
                vec![(Counter::Pass(reason), 1), (Counter::NewFlows(1), 0)],
            ));
        }
    }
    list.extend(conntrack_fixtures());
    list.extend(timestamp_fixtures());
    list.extend(snat_port_fixtures());
    list.extend(snat_pool_fixtures());
    list.extend(icmp_fixtures());
    list.extend(fragment_fixtures());
    list.extend(mss_fixtures());
    list.extend(tc_fixtures());
    list.extend(dnat_fixtures());
    list.extend(dsr_fixtures());
    count_connections(&mut list);
    list
}

/// TCP options as Linux puts them in a SYN or SYN-ACK: MSS, SACK permitted, timestamp, NOP,
/// window scale.
fn linux_syn_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(tsecr.to_be_bytes());
    o.extend([1, 3, 3, 7]);
    o
}

/// The timestamp option alone.
fn ts_option(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(tsecr.to_be_bytes());
    o
}

/// `parts` one after the other.
fn options(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A SACK option with one block.
const SACK_BLOCK: [u8; 10] = [5, 10, 0, 0, 0x10, 0, 0, 0, 0x20, 0];

/// A router on the client's side of the balancer, which sends ICMP errors about replies.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// A router on the backends' side.
const BACKEND_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
/// "Fragmentation needed" with a next-hop MTU of 1400, and of 1500 (the fixtures' links).
const FRAG_NEEDED_1400: [u8; 4] = [0, 0, 0x05, 0x78];
const FRAG_NEEDED_1500: [u8; 4] = [0, 0, 0x05, 0xdc];

/// The IP packet in `frame` (its Ethernet header cut), its first `len` bytes: what an ICMP
/// error quotes.
fn quote(frame: &[u8], len: usize) -> Vec<u8> {
    frame[14..14 + len].to_vec()
}

/// A segment of `len` payload bytes, each its offset's low byte.
fn bulk(len: usize) -> Vec<u8> {
    (0..len).map(|i| i as u8).collect()
}

/// ICMP errors about balanced flows, translated both ways with the quote compared whole;
/// errors about no flow passed; "fragmentation needed" built for packets too big.
fn icmp_fixtures() -> Vec<Fixture> {
    // A reply on its way to the client, as it left the balancer, and as the backend sent it.
    let reply_out = |cport| to_client(cport).ack().seq(5000).build();
    let reply_in = |snat_port| from_backend(1, snat_port).ttl(63).ack().seq(5000).build();
    // A forwarded segment on its way to the backend, and as the client sent it.
    let forward_out = |snat_port| to_backend(1, snat_port).ack().build();
    let forward_in = |cport| {
        pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT, VIP)
            .ttl(63)
            .tcp(cport, WEB_PORT)
            .ack()
            .build()
    };
    let dns_out = |snat_port| {
        pkt()
            .ipv4(SNAT, B1)
            .ttl(63)
            .udp(snat_port, BACKEND_PORT)
            .payload(b"query")
            .build()
    };
    let dns_in = |cport| {
        pkt()
            .ipv4(CLIENT, VIP)
            .ttl(63)
            .udp(cport, DNS_PORT)
            .payload(b"query")
            .build()
    };
    vec![
        // A router between the balancer and the client cannot forward a 1500-byte reply: its
        // "fragmentation needed" to the VIP goes to the backend, from the SNAT address,
        // quoting the reply as the backend sent it.
        fixture(
            "icmp_frag_needed_to_vip_goes_to_the_backend_translated",
            with(backends(), &[web(&[(1, 1)]), flow(40101, 1, 20101, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40101), 40))
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv4(SNAT, B1)
                    .ttl(63)
                    .icmp(3, 4, FRAG_NEEDED_1400)
                    .payload(&quote(&reply_in(20101), 40))
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
                (Counter::Event("icmp_error_to_client"), 0),
            ],
        ),
        // The same with the reply's data quoted too (as Linux quotes up to 576 bytes).
        fixture(
            "icmp_frag_needed_quoting_data_goes_to_the_backend_translated",
            with(backends(), &[web(&[(1, 1)]), flow(40102, 1, 20102, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&to_client(40102).ack().payload(&bulk(100)).build()[14..])
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv4(SNAT, B1)
                    .ttl(63)
                    .icmp(3, 4, FRAG_NEEDED_1400)
                    .payload(
                        &from_backend(1, 20102)
                            .ttl(63)
                            .ack()
                            .payload(&bulk(100))
                            .build()[14..],
                    )
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
            ],
        ),
        // A parameter problem about a reply with IP options: the quote's variable header
        // length is followed.
        fixture(
            "icmp_parameter_problem_quoting_ip_options_goes_to_the_backend",
            with(backends(), &[web(&[(1, 1)]), flow(40103, 1, 20103, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(12, 0, [20, 0, 0, 0])
                .payload(&quote(
                    &to_client(40103).ip_options(&[1, 1, 1, 0]).ack().build(),
                    44,
                ))
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv4(SNAT, B1)
                    .ttl(63)
                    .icmp(12, 0, [20, 0, 0, 0])
                    .payload(&quote(
                        &from_backend(1, 20103)
                            .ttl(63)
                            .ip_options(&[1, 1, 1, 0])
                            .ack()
                            .build(),
                        44,
                    ))
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
            ],
        ),
        // A router behind the balancer found a forwarded segment's TTL spent: its time
        // exceeded, quoting 8 bytes of TCP only (no checksum to fix), goes to the client.
        Fixture {
            ingress: "lb1",
            ..fixture(
                "icmp_time_exceeded_to_snat_goes_to_the_client_translated",
                with(backends(), &[web(&[(1, 1)]), flow(40104, 1, 20104, None)]),
                pkt()
                    .eth(B2_MAC, LB1_MAC)
                    .ipv4(BACKEND_ROUTER, SNAT)
                    .icmp(11, 0, [0; 4])
                    .payload(&quote(&forward_out(20104), 28))
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .icmp(11, 0, [0; 4])
                        .payload(&quote(&forward_in(40104), 28))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("icmp_error_to_client"), 1),
                    (Counter::Event("icmp_error_to_backend"), 0),
                ],
            )
        },
        // A backend with nothing listening on a UDP port: its port unreachable reaches the
        // client as the VIP's, quoting the client's own datagram (checksum included).
        Fixture {
            ingress: "lb1",
            ..fixture(
                "icmp_port_unreachable_from_a_backend_goes_to_the_client",
                with(
                    backends(),
                    &[dns(&[(1, 1)]), udp_flow(UDP_UNREPLIED, 40105, 1, 20105, 0)],
                ),
                pkt()
                    .eth(B1_MAC, LB1_MAC)
                    .ipv4(B1, SNAT)
                    .icmp(3, 3, [0; 4])
                    .payload(&dns_out(20105)[14..])
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .icmp(3, 3, [0; 4])
                        .payload(&dns_in(40105)[14..])
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("icmp_error_to_client"), 1),
                ],
            )
        },
        // Each type both ways: a time exceeded about a reply goes to the backend ...
        fixture(
            "icmp_time_exceeded_to_vip_goes_to_the_backend_translated",
            with(backends(), &[web(&[(1, 1)]), flow(40116, 1, 20116, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(11, 0, [0; 4])
                .payload(&quote(&reply_out(40116), 40))
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv4(SNAT, B1)
                    .ttl(63)
                    .icmp(11, 0, [0; 4])
                    .payload(&quote(&reply_in(20116), 40))
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
            ],
        ),
        // ... and a parameter problem about a forwarded segment goes to the client.
        Fixture {
            ingress: "lb1",
            ..fixture(
                "icmp_parameter_problem_to_snat_goes_to_the_client_translated",
                with(backends(), &[web(&[(1, 1)]), flow(40117, 1, 20117, None)]),
                pkt()
                    .eth(B2_MAC, LB1_MAC)
                    .ipv4(BACKEND_ROUTER, SNAT)
                    .icmp(12, 0, [33, 0, 0, 0])
                    .payload(&quote(&forward_out(20117), 40))
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .icmp(12, 0, [33, 0, 0, 0])
                        .payload(&quote(&forward_in(40117), 40))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("icmp_error_to_client"), 1),
                ],
            )
        },
        // Errors that are no flow's go to the kernel: a quote of a packet the balancer never
        // sent, an error not addressed to the quoted packet's sender, a quote cut before the
        // ports, and a quoted fragment that is not the first.
        fixture(
            "icmp_error_quoting_no_flow_passed",
            with(backends(), &[web(&[(1, 1)]), flow(40106, 1, 20106, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&to_client(40107).ack().build(), 40))
                .build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::IcmpNoFlow), 1),
                (Counter::Event("icmp_error_to_backend"), 0),
            ],
        ),
        fixture(
            "icmp_error_not_to_the_quoted_sender_passed",
            with(backends(), &[web(&[(1, 1)]), flow(40108, 1, 20108, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, OTHER)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40108), 40))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
        fixture(
            "icmp_error_quote_cut_before_the_ports_passed",
            with(backends(), &[web(&[(1, 1)]), flow(40109, 1, 20109, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40109), 22))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
        fixture(
            "icmp_error_quoting_a_later_fragment_passed",
            with(backends(), &[web(&[(1, 1)]), flow(40110, 1, 20110, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(
                    &to_client(40110).ack().fragment(false, 100).build(),
                    40,
                ))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
        // An error whose TTL would expire here is the kernel's to answer.
        fixture(
            "icmp_error_with_ttl_1_passed",
            with(backends(), &[web(&[(1, 1)]), flow(40111, 1, 20111, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .ttl(1)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40111), 40))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::TtlExpired), 1)],
        ),
        // A client's 1600-byte segment with DF does not fit the backends' 1500-byte link: the
        // client gets "fragmentation needed" with that MTU, from the VIP, quoting its segment
        // as it sent it, back out of the device it came in by.
        {
            let big = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .tcp(40112, WEB_PORT)
                .ack()
                .payload(&bulk(1560))
                .build();
            fixture(
                "too_big_for_the_backend_link_answered_with_frag_needed",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        flow(40112, 1, 20112, Some(hop(B1_MAC, 1500))),
                    ],
                ),
                big.clone(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .tos(0xc0)
                        .ip_id(0)
                        .df(false)
                        .icmp(3, 4, FRAG_NEEDED_1500)
                        .payload(&quote(&big, 28))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("frag_needed_sent"), 1),
                ],
            )
        },
        // The same without DF: rewritten, and passed for the kernel to fragment.
        fixture(
            "too_big_without_df_passed_rewritten_for_the_kernel_to_fragment",
            with(backends(), &[web(&[(1, 1)]), flow(40113, 1, 20113, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .df(false)
                .tcp(40113, WEB_PORT)
                .ack()
                .payload(&bulk(1560))
                .build(),
            XDP_PASS,
            Some(
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(SNAT, B1)
                    .df(false)
                    .tcp(20113, BACKEND_PORT)
                    .ack()
                    .payload(&bulk(1560))
                    .build(),
            ),
            vec![(Counter::Pass(PassReason::NeedsFragmenting), 1)],
        ),
        // A backend's 1600-byte UDP answer with DF does not fit the client's link: the backend
        // gets "fragmentation needed" from the SNAT address, quoting its datagram.
        {
            let big = pkt()
                .eth(B1_MAC, LB1_MAC)
                .ipv4(B1, SNAT)
                .udp(BACKEND_PORT, 20114)
                .payload(&bulk(1572))
                .build();
            Fixture {
                ingress: "lb1",
                ..fixture(
                    "too_big_reply_answered_with_frag_needed_to_the_backend",
                    with(
                        backends(),
                        &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 40114, 1, 20114, 0)],
                    ),
                    big.clone(),
                    XDP_REDIRECT,
                    Some(
                        pkt()
                            .eth(LB1_MAC, B1_MAC)
                            .ipv4(SNAT, B1)
                            .tos(0xc0)
                            .ip_id(0)
                            .df(false)
                            .icmp(3, 4, FRAG_NEEDED_1500)
                            .payload(&quote(&big, 28))
                            .build(),
                    ),
                    vec![
                        (Counter::Redirect, 1),
                        (Counter::Event("frag_needed_sent"), 1),
                    ],
                )
            }
        },
        // A segment too big with IP options gets no answer (the quote is a fixed 28 bytes);
        // it was rewritten before its next hop was known.
        fixture(
            "too_big_with_ip_options_dropped",
            with(backends(), &[web(&[(1, 1)]), flow(40115, 1, 20115, None)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .ip_options(&[1, 1, 1, 0])
                .tcp(40115, WEB_PORT)
                .ack()
                .payload(&bulk(1560))
                .build(),
            XDP_DROP,
            Some(
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(SNAT, B1)
                    .ip_options(&[1, 1, 1, 0])
                    .tcp(20115, BACKEND_PORT)
                    .ack()
                    .payload(&bulk(1560))
                    .build(),
            ),
            vec![
                (Counter::Drop(DropReason::FibFragNeeded), 1),
                (Counter::Event("frag_needed_sent"), 0),
            ],
        ),
    ]
}

/// A UDP datagram of 2000 bytes from CLIENT:cport to VIP:53 with IP identification `id`, in
/// two fragments: the first (the UDP header and 1000 bytes, MF set) and the second (the
/// remaining 1000 bytes at offset 1008), as the client sends them.
fn client_fragments(cport: u16, id: u16) -> (PacketBuilder, PacketBuilder) {
    let ip = pkt().eth(CLIENT_MAC, LB0_MAC).ipv4(CLIENT, VIP).ip_id(id);
    (
        ip.clone()
            .udp(cport, DNS_PORT)
            .payload(&bulk(1000))
            .fragment(true, 0),
        ip.ip_proto(UDP).payload(&bulk(1000)).fragment(false, 126),
    )
}

/// A UDP datagram's fragments: the first balanced and recorded, the later ones following it
/// with its rewrite, both ways; later fragments of no recorded datagram passed.
fn fragment_fixtures() -> Vec<Fixture> {
    let (first, later) = client_fragments(40201, 0x4201);
    let forwarded = |b: PacketBuilder| b.eth(LB1_MAC, B1_MAC).ipv4(SNAT, B1).ttl(63);
    let (reply_first, reply_later) = {
        let ip = pkt().eth(B1_MAC, LB1_MAC).ipv4(B1, SNAT).ip_id(0x4205);
        (
            ip.clone()
                .udp(BACKEND_PORT, 20205)
                .payload(&bulk(1000))
                .fragment(true, 0),
            ip.ip_proto(UDP).payload(&bulk(600)).fragment(false, 126),
        )
    };
    vec![
        // The first fragment carries the ports: balanced as a datagram, and recorded.
        Fixture {
            flows_after: flow_pair_in(UDP_UNREPLIED, UDP, 40201, DNS_PORT, 1, PORT_MIN),
            ..fixture(
                "udp_first_fragment_balanced_and_recorded",
                with(backends(), &[dns(&[(1, 1)])]),
                first.build(),
                XDP_REDIRECT,
                Some(forwarded(first.clone()).udp(PORT_MIN, BACKEND_PORT).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("first_fragments"), 1),
                ],
            )
        },
        // The second fragment, with no ports, goes the same way with the same addresses.
        Fixture {
            before: vec![("lb0", first.build())],
            ..fixture(
                "udp_later_fragment_follows_its_first",
                with(backends(), &[dns(&[(1, 1)])]),
                later.build(),
                XDP_REDIRECT,
                Some(forwarded(later.clone()).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("fragments_followed"), 1),
                    (Counter::Packets(1), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
        // A backend's fragmented answer: its fragments reach the client from the VIP.
        Fixture {
            before: vec![("lb1", reply_first.build())],
            ingress: "lb1",
            ..fixture(
                "udp_reply_later_fragment_follows_its_first_to_the_client",
                with(
                    backends(),
                    &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 40205, 1, 20205, 0)],
                ),
                reply_later.build(),
                XDP_REDIRECT,
                Some(
                    reply_later
                        .clone()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("fragments_followed"), 1),
                ],
            )
        },
        // Before its first fragment, or of another datagram: the kernel's.
        fixture(
            "udp_later_fragment_before_its_first_passed",
            with(backends(), &[dns(&[(1, 1)])]),
            later.build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::Fragment), 1),
                (Counter::Event("fragments_followed"), 0),
            ],
        ),
        Fixture {
            before: vec![("lb0", first.build())],
            ..fixture(
                "udp_later_fragment_of_another_datagram_passed",
                with(backends(), &[dns(&[(1, 1)])]),
                later.clone().ip_id(0x9999).build(),
                XDP_PASS,
                None,
                vec![(Counter::Pass(PassReason::Fragment), 1)],
            )
        },
    ]
}

/// The tc program (lb-ebpf's `tc.rs`) on a container backend's port: a balanced flow's
/// replies translated as XDP translates them (the same output, whole), with the checksum
/// helpers; anything else left to the stack untouched.
fn tc_fixtures() -> Vec<Fixture> {
    let tc = |f: Fixture| Fixture {
        hook: Hook::Tc,
        ingress: "lb1",
        ..f
    };
    let data = b"HTTP/1.0 200 OK\r\n\r\n";
    let (udp_in, udp_out) = udp_reply(1, 31402, 41402);
    let udp_none = |b: PacketBuilder| b.udp_no_checksum();
    let clock = ts_clock_ms();
    let (client_ts, backend_side) = (7_000_000u32, clock.wrapping_add(5_000));
    let (reply_first, reply_later) = {
        let ip = pkt().eth(B1_MAC, LB1_MAC).ipv4(B1, SNAT).ip_id(0x4410);
        (
            ip.clone()
                .udp(BACKEND_PORT, 31410)
                .payload(&bulk(1000))
                .fragment(true, 0),
            ip.ip_proto(UDP).payload(&bulk(600)).fragment(false, 126),
        )
    };
    let to_client_fragment =
        |b: PacketBuilder| b.eth(LB0_MAC, CLIENT_MAC).ipv4(VIP, CLIENT).ttl(63);
    vec![
        // The FIB's answer is cached in the reply entry, as XDP caches it, for the flow's
        // next replies (a GSO skb's would not be: its segments are the FIB's to check).
        tc(Fixture {
            next_hop_after: vec![(
                key(B1, BACKEND_PORT, SNAT, 31400, TCP),
                Some(CachedHop {
                    iface: "lb0",
                    src: LB0_MAC,
                    dst: CLIENT_MAC,
                    ok_len: 59,
                }),
            )],
            ..fixture(
                "tc_tcp_reply_translated_and_redirected",
                with(backends(), &[web(&[(1, 1)]), flow(41400, 1, 31400, None)]),
                from_backend(1, 31400).ack().payload(data).build(),
                TC_ACT_REDIRECT,
                Some(to_client(41400).ack().payload(data).build()),
                vec![(Counter::Redirect, 1), (Counter::Packets(1), 1)],
            )
        }),
        // A container's own connection to a VIP goes on by its flow's cached hop: no FIB.
        tc(fixture(
            "tc_forward_cached_next_hop_used_without_fib_lookup",
            with(
                backends(),
                &[
                    web(&[(1, 1)]),
                    flow(41420, 2, 31420, Some(hop(CACHED_MAC, 1500))),
                ],
            ),
            client_syn(41420).tcp_flags(0x10).build(),
            TC_ACT_REDIRECT,
            Some(
                to_backend(2, 31420)
                    .eth(LB1_MAC, CACHED_MAC)
                    .tcp_flags(0x10)
                    .build(),
            ),
            vec![(Counter::Redirect, 1), (Counter::Packets(2), 1)],
        )),
        tc(fixture(
            "tc_tcp_reply_timestamp_translated_back",
            with(
                backends(),
                &[
                    web(&[(1, 1)]),
                    Setup::Flow(FlowSetup {
                        ts_add: Some(backend_side.wrapping_sub(client_ts)),
                        ..flow_in(TCP_ESTABLISHED, 41401, 1, 31401, Some(0))
                    }),
                ],
            ),
            from_backend(1, 31401)
                .ack()
                .tcp_options(&options(&[&[1, 1], &ts_option(123_456, backend_side)]))
                .payload(data)
                .build(),
            TC_ACT_REDIRECT,
            Some(
                to_client(41401)
                    .ack()
                    .tcp_options(&options(&[&[1, 1], &ts_option(123_456, client_ts)]))
                    .payload(data)
                    .build(),
            ),
            vec![(Counter::Redirect, 1)],
        )),
        tc(fixture(
            "tc_udp_reply_translated",
            with(
                backends(),
                &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41402, 1, 31402, 0)],
            ),
            udp_in,
            TC_ACT_REDIRECT,
            Some(udp_out),
            vec![(Counter::Redirect, 1)],
        )),
        tc(fixture(
            "tc_udp_reply_without_checksum_keeps_none",
            with(
                backends(),
                &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41403, 1, 31403, 0)],
            ),
            udp_none(
                pkt()
                    .eth(B1_MAC, LB1_MAC)
                    .ipv4(B1, SNAT)
                    .udp(BACKEND_PORT, 31403)
                    .payload(b"answer"),
            )
            .build(),
            TC_ACT_REDIRECT,
            Some(
                udp_none(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .ttl(63)
                        .udp(DNS_PORT, 41403)
                        .payload(b"answer"),
                )
                .build(),
            ),
            vec![(Counter::Redirect, 1)],
        )),
        // A container's fragmented answer: its first fragment translated and recorded, the
        // later ones following it to the client; one before its first left to the stack.
        tc(fixture(
            "tc_udp_reply_first_fragment_translated_and_recorded",
            with(
                backends(),
                &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41410, 1, 31410, 0)],
            ),
            reply_first.build(),
            TC_ACT_REDIRECT,
            Some(
                to_client_fragment(reply_first.clone())
                    .udp(DNS_PORT, 41410)
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("first_fragments"), 1),
            ],
        )),
        tc(Fixture {
            before: vec![("lb1", reply_first.build())],
            ..fixture(
                "tc_udp_reply_later_fragment_follows_its_first_to_the_client",
                with(
                    backends(),
                    &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41410, 1, 31410, 0)],
                ),
                reply_later.build(),
                TC_ACT_REDIRECT,
                Some(to_client_fragment(reply_later.clone()).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("fragments_followed"), 1),
                    (Counter::Packets(1), 1),
                ],
            )
        }),
        // One its next hop cannot take is dropped (tc sends no "fragmentation needed"), and
        // not recorded: its later fragments would make no datagram.
        {
            let big = |b: PacketBuilder| b.payload(&bulk(1500)).fragment(true, 0);
            tc(fixture(
                "tc_udp_reply_first_fragment_too_big_dropped_and_not_recorded",
                with(
                    backends(),
                    &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41411, 1, 31411, 0)],
                ),
                big(pkt()
                    .eth(B1_MAC, LB1_MAC)
                    .ipv4(B1, SNAT)
                    .ip_id(0x4411)
                    .udp(BACKEND_PORT, 31411))
                .build(),
                TC_ACT_SHOT,
                Some(
                    big(pkt()
                        .eth(B1_MAC, LB1_MAC)
                        .ipv4(VIP, CLIENT)
                        .ip_id(0x4411)
                        .udp(DNS_PORT, 41411))
                    .build(),
                ),
                vec![
                    (Counter::Drop(DropReason::FibFragNeeded), 1),
                    (Counter::Event("first_fragments"), 0),
                ],
            ))
        },
        tc(fixture(
            "tc_udp_later_fragment_before_its_first_left_to_the_stack",
            with(
                backends(),
                &[dns(&[(1, 1)]), udp_flow(UDP_REPLIED, 41410, 1, 31410, 0)],
            ),
            reply_later.build(),
            TC_ACT_UNSPEC,
            None,
            vec![
                (Counter::Pass(PassReason::Fragment), 1),
                (Counter::Event("fragments_followed"), 0),
            ],
        )),
        tc(fixture(
            "tc_traffic_of_no_flow_left_to_the_stack",
            with(backends(), &[web(&[(1, 1)])]),
            from_backend(1, 31404).ack().payload(data).build(),
            TC_ACT_UNSPEC,
            None,
            vec![
                (Counter::Pass(PassReason::NotService), 1),
                (Counter::Redirect, 0),
            ],
        )),
        tc(fixture(
            "tc_arp_left_to_the_stack",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(B1_MAC, [0xff; 6])
                .ethertype(0x0806)
                .payload(&[0, 1, 8, 0, 6, 4, 0, 1])
                .build(),
            TC_ACT_UNSPEC,
            None,
            vec![(Counter::Pass(PassReason::NotIpv4), 1)],
        )),
        // A container refuses a SYN it never answered: its RST meets the tc program on the
        // bridge's port, while the flow's next hop is the bridge. Kept from the client, the
        // backend suspect, as on XDP's devices.
        Fixture {
            flows_after: flow_pair(TCP, 41410, WEB_PORT, 1, 31410)
                .map(|(k, _)| (k, None))
                .to_vec(),
            suspect_after: vec![(1, true), (2, false)],
            ..tc(fixture(
                "tc_container_refusal_on_a_bridge_port_dropped_and_marks_suspect",
                with(
                    backends(),
                    &[
                        web(&[(1, 1), (2, 1)]),
                        half_open_via_bridge(41410, 31410),
                        Setup::BridgePort {
                            port: "lb1",
                            bridge: "br0",
                        },
                    ],
                ),
                from_backend(1, 31410).tcp_flags(0x14).ack_seq(1001).build(),
                TC_ACT_SHOT,
                None,
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 1),
                    (Counter::Event("suspect_refused"), 1),
                ],
            ))
        },
        // The same RST on a device that is no port of the flow's bridge is no evidence.
        Fixture {
            flows_after: flow_pair_in(TCP_CLOSED, TCP, 41411, WEB_PORT, 1, 31411),
            suspect_after: vec![(1, false)],
            ..tc(fixture(
                "tc_refusal_on_no_port_of_the_flows_bridge_marks_nothing",
                with(
                    backends(),
                    &[web(&[(1, 1), (2, 1)]), half_open_via_bridge(41411, 31411)],
                ),
                from_backend(1, 31411).tcp_flags(0x14).ack_seq(1001).build(),
                TC_ACT_REDIRECT,
                Some(to_client(41411).tcp_flags(0x14).ack_seq(1001).build()),
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 0),
                    (Counter::Event("suspect_refused"), 0),
                ],
            ))
        },
        // A container's new connection to a VIP: balanced at tc as a client's is at XDP.
        Fixture {
            flows_after: flow_pair_in(TCP_SYN_SENT, TCP, 41420, WEB_PORT, 1, PORT_MIN),
            ingress: "lb0",
            ..tc(fixture(
                "tc_container_syn_to_a_vip_opens_a_flow",
                with(backends(), &[web(&[(1, 1)])]),
                client_syn(41420).build(),
                TC_ACT_REDIRECT,
                Some(to_backend(1, PORT_MIN).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            ))
        },
        Fixture {
            ingress: "lb0",
            ..tc(fixture(
                "tc_container_segment_without_a_flow_answered_with_rst",
                with(backends(), &[web(&[(1, 1)])]),
                client_syn(41421)
                    .tcp_flags(TCP_PSH | TCP_ACK)
                    .ack_seq(7000)
                    .payload(b"GET / HTTP/1.0\r\n\r\n")
                    .build(),
                TC_ACT_REDIRECT,
                Some(rst_to_client(41421, 7000).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("reset_no_flow"), 1),
                    (Counter::Drop(DropReason::TcpNoFlow), 0),
                    (Counter::NewFlows(1), 0),
                ],
            ))
        },
        Fixture {
            ingress: "lb0",
            ..tc(fixture(
                "tc_container_rst_without_a_flow_dropped_silently",
                with(backends(), &[web(&[(1, 1)])]),
                client_syn(41423).tcp_flags(TCP_RST).build(),
                TC_ACT_SHOT,
                None,
                vec![
                    (Counter::Drop(DropReason::TcpNoFlow), 1),
                    (Counter::Event("reset_no_flow"), 0),
                ],
            ))
        },
        Fixture {
            ingress: "lb0",
            ..tc(fixture(
                "tc_container_syn_with_no_backend_dropped",
                with(backends(), &[web(&[(1, 0)])]),
                client_syn(41422).build(),
                TC_ACT_SHOT,
                None,
                vec![(Counter::Drop(DropReason::NoBackend), 1)],
            ))
        },
    ]
}

/// MSS clamping (lb-ebpf's `mss.rs`): a service with `mss` lowers the MSS its handshakes
/// announce, both ways, wherever the option sits; a smaller MSS and other segments pass as
/// they are.
fn mss_fixtures() -> Vec<Fixture> {
    const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];
    const MSS_1360: [u8; 4] = [2, 4, 0x05, 0x50];
    const MSS_1200: [u8; 4] = [2, 4, 0x04, 0xb0];
    const REST: [u8; 6] = [4, 2, 1, 3, 3, 7];
    let clamping = |more: &[Setup]| {
        let service = Setup::Service {
            id: 0,
            port: WEB_PORT,
            proto: TCP,
            backends: vec![(1, 1)],
            snat: vec![SNAT],
            mss: Some(1360),
            mode: SERVICE_MODE_NAT,
        };
        with(with(backends(), &[service]), more)
    };
    let clamping_flow = |state: u32, cport: u16, snat_port: u16| {
        Setup::Flow(FlowSetup {
            mss: 1360,
            ..flow_in(state, cport, 1, snat_port, Some(0))
        })
    };
    let clamped = Counter::Event("mss_clamped");
    // A SYN through a clamping service, with `options`, and what the backend must get.
    let syn = |cport: u16, options: &[u8], out: &[u8]| {
        (
            client_syn(cport).tcp_options(options).build(),
            to_backend(1, PORT_MIN).syn().tcp_options(out).build(),
        )
    };
    let clock = ts_clock_ms();
    let highest = clock.wrapping_add(10_000_000);
    let client_ts = 7_000_000u32;
    let mut linux_clamped = linux_syn_options(highest, 0);
    linux_clamped[..4].copy_from_slice(&MSS_1360);

    let (input, output) = syn(
        41300,
        &options(&[&MSS_1460, &REST]),
        &options(&[&MSS_1360, &REST]),
    );
    let mut list = vec![Fixture {
        flows_after: flow_pair_in(TCP_SYN_SENT, TCP, 41300, WEB_PORT, 1, PORT_MIN)
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| FlowValue { mss: 1360, ..v })))
            .collect(),
        ..fixture(
            "mss_syn_clamped_to_the_service",
            clamping(&[]),
            input,
            XDP_REDIRECT,
            Some(output),
            vec![(Counter::Redirect, 1), (clamped, 1)],
        )
    }];
    let (input, output) = syn(41302, &linux_syn_options(client_ts, 0), &linux_clamped);
    list.push(fixture(
        "mss_syn_with_timestamps_gets_both_rewrites",
        clamping(&[Setup::TsHighest(highest)]),
        input,
        XDP_REDIRECT,
        Some(output),
        vec![(Counter::Redirect, 1), (clamped, 1)],
    ));
    // The value at an odd offset from the header's start: its change counts byte-swapped.
    let (input, output) = syn(
        41303,
        &options(&[&[1], &MSS_1460, &[1, 1, 1]]),
        &options(&[&[1], &MSS_1360, &[1, 1, 1]]),
    );
    list.push(fixture(
        "mss_after_other_options_found_and_clamped",
        clamping(&[]),
        input,
        XDP_REDIRECT,
        Some(output),
        vec![(Counter::Redirect, 1), (clamped, 1)],
    ));
    let (input, output) = syn(
        41304,
        &options(&[&MSS_1200, &REST]),
        &options(&[&MSS_1200, &REST]),
    );
    list.push(fixture(
        "mss_smaller_than_the_service_kept",
        clamping(&[]),
        input,
        XDP_REDIRECT,
        Some(output),
        vec![(Counter::Redirect, 1), (clamped, 0)],
    ));
    let (input, output) = syn(41305, &REST, &REST);
    list.push(fixture(
        "mss_syn_without_the_option_kept",
        clamping(&[]),
        input,
        XDP_REDIRECT,
        Some(output),
        vec![(Counter::Redirect, 1), (clamped, 0)],
    ));
    list.push(Fixture {
        ingress: "lb1",
        ..fixture(
            "mss_syn_ack_clamped_on_the_way_back",
            clamping(&[clamping_flow(TCP_SYN_SENT, 41306, 31306)]),
            from_backend(1, 31306)
                .syn()
                .ack()
                .tcp_options(&options(&[&MSS_1460, &REST]))
                .build(),
            XDP_REDIRECT,
            Some(
                to_client(41306)
                    .syn()
                    .ack()
                    .tcp_options(&options(&[&MSS_1360, &REST]))
                    .build(),
            ),
            vec![(Counter::Redirect, 1), (clamped, 1)],
        )
    });
    // The same at tc, a container's SYN-ACK: the helper carries the change to the checksum
    // (the odd offset too).
    for (cport, before, after) in [
        (
            41308,
            options(&[&MSS_1460, &REST]),
            options(&[&MSS_1360, &REST]),
        ),
        (
            41309,
            options(&[&[1], &MSS_1460, &[1, 1, 1]]),
            options(&[&[1], &MSS_1360, &[1, 1, 1]]),
        ),
    ] {
        let snat_port = cport - 10000;
        list.push(Fixture {
            hook: Hook::Tc,
            ingress: "lb1",
            ..fixture(
                if cport == 41308 {
                    "tc_mss_syn_ack_clamped_through_the_checksum_helper"
                } else {
                    "tc_mss_syn_ack_at_an_odd_offset_clamped"
                },
                clamping(&[clamping_flow(TCP_SYN_SENT, cport, snat_port)]),
                from_backend(1, snat_port)
                    .syn()
                    .ack()
                    .tcp_options(&before)
                    .build(),
                TC_ACT_REDIRECT,
                Some(to_client(cport).syn().ack().tcp_options(&after).build()),
                vec![(Counter::Redirect, 1), (clamped, 1)],
            )
        });
    }
    // Only handshakes announce an MSS: anything else is not read for one.
    let data = b"GET / HTTP/1.0\r\n\r\n";
    list.push(fixture(
        "mss_other_segments_untouched",
        clamping(&[clamping_flow(TCP_ESTABLISHED, 41307, 31307)]),
        client_syn(41307)
            .tcp_flags(TCP_ACK)
            .tcp_options(&options(&[&MSS_1460, &[1, 1, 1, 1]]))
            .payload(data)
            .build(),
        XDP_REDIRECT,
        Some(
            to_backend(1, 31307)
                .ack()
                .tcp_options(&options(&[&MSS_1460, &[1, 1, 1, 1]]))
                .payload(data)
                .build(),
        ),
        vec![(Counter::Redirect, 1), (clamped, 0)],
    ));
    list
}

/// Timestamp translation (lb-ebpf's `timestamps.rs`). Values are placed relative to the
/// balancer's timestamp clock read now, far from the limit at which the data path holds a
/// runaway TSval, so that every output is exact: a SYN's TSval comes from a TS_HIGH set ahead
/// of the clock, and a flow's from its `ts_add`.
fn timestamp_fixtures() -> Vec<Fixture> {
    let clock = ts_clock_ms();
    let highest = clock.wrapping_add(10_000_000);
    // An established flow's client and backend-side TSvals, and the backend's own clock.
    let (client_ts, backend_side, backend_ts) =
        (7_000_000u32, clock.wrapping_add(5_000), 123_456u32);
    let add = backend_side.wrapping_sub(client_ts);
    let ts_flow = |cport: u16, snat_port: u16| {
        Setup::Flow(FlowSetup {
            ts_add: Some(add),
            ..match flow(cport, 1, snat_port, None) {
                Setup::Flow(f) => f,
                _ => unreachable!("flow() makes a flow"),
            }
        })
    };
    // A translating flow on backend 1, with the highest TSval sent ahead of its TSvals.
    let ts_setup = |cport: u16, snat_port: u16| {
        with(
            backends(),
            &[
                web(&[(1, 1)]),
                ts_flow(cport, snat_port),
                Setup::TsHighest(highest),
            ],
        )
    };
    let ts_pair = |state: u32, cport: u16, snat_port: u16, add: u32| {
        flow_pair(TCP, cport, WEB_PORT, 1, snat_port)
            .map(|(k, v)| {
                let reply = v.flags & FLOW_REVERSE != 0;
                let v = FlowValue {
                    flags: v.flags | FLOW_TS,
                    ts_add: if reply { add.wrapping_neg() } else { add },
                    ..v
                };
                (k, in_state(state, v))
            })
            .to_vec()
    };
    let established = |cport: u16, snat_port: u16, client_opts: &[u8], backend_opts: &[u8]| {
        (
            client_syn(cport)
                .tcp_flags(TCP_ACK)
                .tcp_options(client_opts)
                .payload(b"GET / HTTP/1.0\r\n\r\n")
                .build(),
            to_backend(1, snat_port)
                .ack()
                .tcp_options(backend_opts)
                .payload(b"GET / HTTP/1.0\r\n\r\n")
                .build(),
        )
    };
    let mut list = vec![
        Fixture {
            flows_after: ts_pair(
                TCP_SYN_SENT,
                41000,
                PORT_MIN,
                highest.wrapping_sub(client_ts),
            ),
            ts_highest_after: Some(highest),
            ..fixture(
                "ts_linux_syn_gets_the_highest_timestamp_sent",
                with(backends(), &[web(&[(1, 1)]), Setup::TsHighest(highest)]),
                client_syn(41000)
                    .tcp_options(&linux_syn_options(client_ts, 0))
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_backend(1, PORT_MIN)
                        .syn()
                        .tcp_options(&linux_syn_options(highest, 0))
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        Fixture {
            // A SYN whose option sits after others than Linux's: found by the walk.
            flows_after: ts_pair(
                TCP_SYN_SENT,
                41001,
                PORT_MIN,
                highest.wrapping_sub(client_ts),
            ),
            ..fixture(
                "ts_syn_with_other_option_order",
                with(backends(), &[web(&[(1, 1)]), Setup::TsHighest(highest)]),
                client_syn(41001)
                    .tcp_options(&options(&[
                        &[2, 4, 5, 0xb4, 1, 3, 3, 6, 1, 1],
                        &ts_option(client_ts, 0),
                        &[4, 2],
                    ]))
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_backend(1, PORT_MIN)
                        .syn()
                        .tcp_options(&options(&[
                            &[2, 4, 5, 0xb4, 1, 3, 3, 6, 1, 1],
                            &ts_option(highest, 0),
                            &[4, 2],
                        ]))
                        .build(),
                ),
                vec![(Counter::Redirect, 1)],
            )
        },
        Fixture {
            flows_after: flow_pair_in(TCP_SYN_SENT, TCP, 41002, WEB_PORT, 1, PORT_MIN),
            ..fixture(
                "ts_syn_without_timestamps_is_not_translated",
                with(backends(), &[web(&[(1, 1)]), Setup::TsHighest(highest)]),
                client_syn(41002)
                    .tcp_options(&[2, 4, 5, 0xb4, 4, 2, 1, 3, 3, 7])
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_backend(1, PORT_MIN)
                        .syn()
                        .tcp_options(&[2, 4, 5, 0xb4, 4, 2, 1, 3, 3, 7])
                        .build(),
                ),
                vec![(Counter::Redirect, 1)],
            )
        },
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ts_linux_syn_ack_tsecr_translated_back",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        Setup::Flow(FlowSetup {
                            ts_add: Some(add),
                            ..flow_in(TCP_SYN_SENT, 41003, 1, 31100, Some(0))
                        }),
                    ],
                ),
                from_backend(1, 31100)
                    .syn()
                    .ack()
                    .tcp_options(&linux_syn_options(backend_ts, backend_side))
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_client(41003)
                        .syn()
                        .ack()
                        .tcp_options(&linux_syn_options(backend_ts, client_ts))
                        .build(),
                ),
                vec![(Counter::Redirect, 1)],
            )
        },
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ts_reply_tsecr_translated_back_tsval_kept",
                with(backends(), &[web(&[(1, 1)]), ts_flow(41004, 31101)]),
                from_backend(1, 31101)
                    .ack()
                    .tcp_options(&options(&[
                        &[1, 1],
                        &ts_option(backend_ts, backend_side.wrapping_add(40)),
                    ]))
                    .payload(b"HTTP/1.0 200 OK\r\n\r\n")
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_client(41004)
                        .ack()
                        .tcp_options(&options(&[&[1, 1], &ts_option(backend_ts, client_ts + 40)]))
                        .payload(b"HTTP/1.0 200 OK\r\n\r\n")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::Event("ts_clamped"), 0)],
            )
        },
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ts_reply_without_timestamps_is_rewritten_as_before",
                with(backends(), &[web(&[(1, 1)]), ts_flow(41005, 31102)]),
                from_backend(1, 31102).ack().payload(b"x").build(),
                XDP_REDIRECT,
                Some(to_client(41005).ack().payload(b"x").build()),
                vec![(Counter::Redirect, 1)],
            )
        },
        {
            let (input, output) = established(
                41006,
                31103,
                &options(&[&[1, 1], &ts_option(client_ts + 9, backend_ts)]),
                &options(&[&[1, 1], &ts_option(backend_side + 9, backend_ts)]),
            );
            Fixture {
                ts_highest_after: Some(backend_side + 9),
                ..fixture(
                    "ts_established_tsval_translated_and_highest_raised",
                    with(
                        backends(),
                        &[
                            web(&[(1, 1)]),
                            ts_flow(41006, 31103),
                            Setup::TsHighest(backend_side),
                        ],
                    ),
                    input,
                    XDP_REDIRECT,
                    Some(output),
                    vec![(Counter::Redirect, 1), (Counter::Event("ts_clamped"), 0)],
                )
            }
        },
        {
            // Linux puts the timestamp first and SACK blocks after it.
            let (input, output) = established(
                41007,
                31104,
                &options(&[
                    &[1, 1],
                    &ts_option(client_ts + 3, backend_ts),
                    &[1, 1],
                    &SACK_BLOCK,
                ]),
                &options(&[
                    &[1, 1],
                    &ts_option(backend_side + 3, backend_ts),
                    &[1, 1],
                    &SACK_BLOCK,
                ]),
            );
            Fixture {
                // Below the highest sent: left as it is.
                ts_highest_after: Some(highest),
                ..fixture(
                    "ts_established_with_sack_after_timestamp",
                    ts_setup(41007, 31104),
                    input,
                    XDP_REDIRECT,
                    Some(output),
                    vec![(Counter::Redirect, 1)],
                )
            }
        },
        {
            let (input, output) = established(
                41008,
                31105,
                &options(&[
                    &[1, 1],
                    &SACK_BLOCK,
                    &[1, 1],
                    &ts_option(client_ts + 4, backend_ts),
                ]),
                &options(&[
                    &[1, 1],
                    &SACK_BLOCK,
                    &[1, 1],
                    &ts_option(backend_side + 4, backend_ts),
                ]),
            );
            fixture(
                "ts_established_with_sack_before_timestamp",
                ts_setup(41008, 31105),
                input,
                XDP_REDIRECT,
                Some(output),
                vec![(Counter::Redirect, 1)],
            )
        },
        {
            let (input, output) = established(41009, 31106, &[], &[]);
            fixture(
                "ts_established_without_timestamps_is_rewritten_as_before",
                ts_setup(41009, 31106),
                input,
                XDP_REDIRECT,
                Some(output),
                vec![(Counter::Redirect, 1)],
            )
        },
        {
            // A flow that does not translate leaves timestamps alone.
            let opts = options(&[&[1, 1], &ts_option(client_ts, backend_ts)]);
            let (input, output) = established(41010, 31107, &opts, &opts);
            fixture(
                "ts_untranslated_flow_keeps_timestamps",
                with(
                    backends(),
                    &[
                        web(&[(1, 1)]),
                        flow(41010, 1, 31107, None),
                        Setup::TsHighest(highest),
                    ],
                ),
                input,
                XDP_REDIRECT,
                Some(output),
                vec![(Counter::Redirect, 1)],
            )
        },
    ];
    // The option at every position the header allows, odd offsets (where the checksum sees its
    // bytes swapped) included: after 0 to 30 NOPs.
    for nops in [1usize, 3, 7, 30] {
        let pad = vec![1u8; nops];
        let (input, output) = established(
            41020 + nops as u16,
            31120 + nops as u16,
            &options(&[&pad, &ts_option(client_ts + 1, backend_ts)]),
            &options(&[&pad, &ts_option(backend_side + 1, backend_ts)]),
        );
        list.push(fixture(
            [
                "ts_after_1_nop",
                "ts_after_3_nops",
                "ts_after_7_nops",
                "ts_after_30_nops",
            ][[1, 3, 7, 30]
                .iter()
                .position(|&n| n == nops)
                .expect("listed")],
            ts_setup(41020 + nops as u16, 31120 + nops as u16),
            input,
            XDP_REDIRECT,
            Some(output),
            vec![(Counter::Redirect, 1)],
        ));
    }
    list
}

/// A range of 200 SNAT ports, over four bitmap words (the first and last partly).
fn two_hundred_ports() -> Option<LoadSettings> {
    Some(LoadSettings {
        snat_port_min: 20_000,
        snat_port_max: 20_199,
        ..settings()
    })
}

/// The port allocator (lb-ebpf's `snat.rs`): with all of a backend's ports but one held by live
/// connections, a new connection gets that one; with none free, it is dropped and counted.
fn snat_port_fixtures() -> Vec<Fixture> {
    let held = |free: Option<u16>| -> Vec<Setup> {
        let mut setup = with(backends(), &[web(&[(1, 1)])]);
        for (i, port) in (20_000..20_200u16).enumerate() {
            if Some(port) != free {
                setup.push(flow(50_000 + i as u16, 1, port, None));
            }
        }
        setup
    };
    vec![
        Fixture {
            settings: two_hundred_ports(),
            flows_after: flow_pair_in(TCP_SYN_SENT, TCP, 41100, WEB_PORT, 1, 20_137),
            ..fixture(
                "snat_last_free_port_of_a_99_percent_full_range_is_found",
                held(Some(20_137)),
                client_syn(41100).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 20_137).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        Fixture {
            settings: two_hundred_ports(),
            flows_after: vec![(key(CLIENT, 41101, VIP, WEB_PORT, TCP), None)],
            ..fixture(
                "snat_full_range_drops_the_new_flow_as_exhausted",
                held(None),
                client_syn(41101).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::SnatPortsExhausted), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
    ]
}

/// SNAT pools: a backend whose connections hold every port of the range on the pool's first
/// address still takes new ones on the second; with every port of both held, a new one is
/// dropped as exhausted.
fn snat_pool_fixtures() -> Vec<Fixture> {
    let held = |free: Option<u16>| -> Vec<Setup> {
        let mut setup = with(backends(), &[web_pool(&[(1, 1)])]);
        for index in 0..2u32 {
            for (i, port) in (20_000..20_200u16).enumerate() {
                if index == 1 && Some(port) == free {
                    continue;
                }
                setup.push(Setup::Flow(FlowSetup {
                    snat_index: index,
                    ..flow_in(
                        TCP_ESTABLISHED,
                        50_000 + index as u16 * 1000 + i as u16,
                        1,
                        port,
                        Some(0),
                    )
                }));
            }
        }
        setup
    };
    let via_second = |port: u16| {
        pkt()
            .eth(LB1_MAC, B1_MAC)
            .ipv4(SNAT_POOL[1], B1)
            .ttl(63)
            .tcp(port, BACKEND_PORT)
    };
    let pair = flow_pair_via(TCP, 41150, WEB_PORT, 1, (SNAT_POOL[1], 1), 20_042);
    vec![
        Fixture {
            settings: two_hundred_ports(),
            flows_after: pair
                .iter()
                .map(|&(k, v)| (k, in_state(TCP_SYN_SENT, v)))
                .collect(),
            ..fixture(
                "snat_pool_second_address_takes_new_flows_when_the_first_is_full",
                held(Some(20_042)),
                client_syn(41150).build(),
                XDP_REDIRECT,
                Some(via_second(20_042).syn().build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        Fixture {
            settings: two_hundred_ports(),
            flows_after: vec![(key(CLIENT, 41151, VIP, WEB_PORT, TCP), None)],
            ..fixture(
                "snat_pool_every_address_full_drops_the_new_flow_as_exhausted",
                held(None),
                client_syn(41151).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::SnatPortsExhausted), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
    ]
}

/// A DNAT service on VIP:`port` with backends `(id, weight)`: no SNAT pool.
fn dnat_service(id: u32, port: u16, backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id,
        port,
        proto: TCP,
        backends: backends.to_vec(),
        snat: Vec::new(),
        mss: None,
        mode: SERVICE_MODE_DNAT,
    }
}

/// The entries of an established DNAT flow client:cport -> VIP:vport on `backend`: the forward
/// one keeps the client's tuple, the reply one is keyed by it.
fn dnat_pair(cport: u16, vport: u16, backend: u32) -> [(FlowKey, FlowValue); 2] {
    let b = addr_of(backend);
    [
        (
            key(CLIENT, cport, VIP, vport, TCP),
            value(
                CLIENT,
                cport,
                b,
                BACKEND_PORT,
                backend,
                FLOW_DNAT | FLOW_SYN_WELL_FORMED,
            ),
        ),
        (
            key(b, BACKEND_PORT, CLIENT, cport, TCP),
            value(VIP, vport, CLIENT, cport, backend, FLOW_DNAT | FLOW_REVERSE),
        ),
    ]
}

/// `mode = "dnat"`: the destination alone is rewritten, and the backend's replies (which come
/// back through the balancer, its gateway) get the VIP back as their source.
fn dnat_fixtures() -> Vec<Fixture> {
    let setup = |more: &[Setup]| {
        with(
            with(backends(), &[dnat_service(0, WEB_PORT, &[(1, 1)])]),
            more,
        )
    };
    let syn_options = linux_syn_options(7_000_000, 0);
    let to_backend_keeping_client = |cport: u16| {
        pkt()
            .eth(LB1_MAC, B1_MAC)
            .ipv4(CLIENT, B1)
            .ttl(63)
            .tcp(cport, BACKEND_PORT)
    };
    let reply = |cport: u16| {
        pkt()
            .eth(B1_MAC, LB1_MAC)
            .ipv4(B1, CLIENT)
            .tcp(BACKEND_PORT, cport)
    };
    let pair_in = |state: u32, cport: u16| {
        dnat_pair(cport, WEB_PORT, 1)
            .map(|(k, v)| (k, in_state(state, v)))
            .to_vec()
    };
    vec![
        Fixture {
            flows_after: pair_in(TCP_SYN_SENT, 42000),
            // No timestamp translation: the backend sees the client's own tuple and clock.
            ts_highest_after: Some(5),
            ..fixture(
                "dnat_syn_rewrites_the_destination_alone",
                setup(&[Setup::TsHighest(5)]),
                client_syn(42000).tcp_options(&syn_options).build(),
                XDP_REDIRECT,
                Some(
                    to_backend_keeping_client(42000)
                        .syn()
                        .tcp_options(&syn_options)
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Packets(1), 1),
                ],
            )
        },
        Fixture {
            flows_after: pair_in(TCP_ESTABLISHED, 42001),
            ..fixture(
                "dnat_reply_leaves_from_the_vip",
                setup(&[Setup::DnatFlow {
                    cport: 42001,
                    vport: WEB_PORT,
                    backend: 1,
                }]),
                reply(42001).ack().payload(b"HTTP/1.0 200 OK\r\n").build(),
                XDP_REDIRECT,
                Some(
                    to_client(42001)
                        .ack()
                        .payload(b"HTTP/1.0 200 OK\r\n")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::Packets(1), 1)],
            )
        },
        Fixture {
            flows_after: pair_in(TCP_ESTABLISHED, 42002),
            ..fixture(
                "dnat_established_segment_keeps_the_client_address",
                setup(&[Setup::DnatFlow {
                    cport: 42002,
                    vport: WEB_PORT,
                    backend: 1,
                }]),
                client_syn(42002)
                    .tcp_flags(TCP_ACK)
                    .payload(b"GET /")
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_backend_keeping_client(42002)
                        .ack()
                        .payload(b"GET /")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 0)],
            )
        },
        Fixture {
            // The connection to VIP:81 keeps its entries; the new one gets none.
            flows_after: [
                dnat_pair(42003, 81, 1)
                    .map(|(k, v)| (k, in_state(TCP_ESTABLISHED, v)))
                    .to_vec(),
                vec![(key(CLIENT, 42003, VIP, WEB_PORT, TCP), None)],
            ]
            .concat(),
            ..fixture(
                "dnat_syn_whose_tuple_a_live_connection_holds_is_dropped",
                setup(&[
                    dnat_service(1, 81, &[(1, 1)]),
                    Setup::DnatFlow {
                        cport: 42003,
                        vport: 81,
                        backend: 1,
                    },
                ]),
                client_syn(42003).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::DnatTupleTaken), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
    ]
}

/// The half-open connection from `cport` gone, and its port `snat_port` taken by the new
/// connection from `new_cport`.
fn evicted_for(cport: u16, snat_port: u16, new_cport: u16) -> Vec<(FlowKey, Option<FlowValue>)> {
    vec![
        (key(CLIENT, cport, VIP, WEB_PORT, TCP), None),
        (
            key(B1, BACKEND_PORT, SNAT, snat_port, TCP),
            in_state(
                TCP_SYN_SENT,
                value(VIP, WEB_PORT, CLIENT, new_cport, 1, FLOW_REVERSE),
            ),
        ),
    ]
}

/// A DSR service on VIP:BACKEND_PORT (its backends listen on the VIP's port) over `backends`.
fn dsr_service(id: u32, proto: u8, backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id,
        port: BACKEND_PORT,
        proto,
        backends: backends.to_vec(),
        snat: Vec::new(),
        mss: None,
        mode: SERVICE_MODE_DSR_L2,
    }
}

/// A DSR flow's forward entry, established: it names the backend (the FIB's destination) and
/// the client's own tuple; there is no reply entry.
fn dsr_entry(proto: u8, cport: u16, backend: u32) -> (FlowKey, FlowValue) {
    let well_formed = if proto == TCP {
        FLOW_SYN_WELL_FORMED
    } else {
        0
    };
    (
        key(CLIENT, cport, VIP, BACKEND_PORT, proto),
        value(
            CLIENT,
            cport,
            addr_of(backend),
            BACKEND_PORT,
            backend,
            FLOW_DSR | well_formed,
        ),
    )
}

/// A DSR service in an encapsulated form (`mode`) on VIP:BACKEND_PORT, with the two-address
/// pool SNAT_POOL as its tunnels' sources.
fn tunnel_service(mode: u8, backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id: 0,
        port: BACKEND_PORT,
        proto: TCP,
        backends: backends.to_vec(),
        snat: SNAT_POOL.to_vec(),
        mss: None,
        mode,
    }
}

/// `inner` (a frame as the client sent it) inside IPv4 and UDP from `source` to B1's GUE port,
/// as lb sends it: ID 0, TTL 64, the inner TOS and DF, the flow's hash in the source port, no
/// UDP checksum.
fn gue_to_b1(source: Ipv4Addr, cport: u16, inner: &[u8]) -> Vec<u8> {
    let hash = key(CLIENT, cport, VIP, BACKEND_PORT, TCP).hash();
    let (tos, df) = (inner[15], inner[20] & 0x40 != 0);
    pkt()
        .eth(LB1_MAC, B1_MAC)
        .ipv4(source, B1)
        .tos(tos)
        .ip_id(0)
        .df(df)
        .udp(gue_source_port(hash), GUE_PORT)
        .udp_no_checksum()
        .payload(&inner[14..])
        .build()
}

/// The outer source the IPIP form takes for CLIENT:`cport`: the pool address its tuple picks.
fn ipip_source(cport: u16) -> Ipv4Addr {
    let k = key(CLIENT, cport, VIP, BACKEND_PORT, TCP);
    SNAT_POOL[pool_start(k.src_addr.0, k.src_port.0, SNAT_POOL.len() as u32) as usize]
}

/// `inner` (a frame as the client sent it) inside an IPIP header from `source` to B1, as lb
/// sends it: ID 0, TTL 64, the inner TOS and DF.
fn ipip_to_b1(source: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let (tos, df) = (inner[15], inner[20] & 0x40 != 0);
    pkt()
        .eth(LB1_MAC, B1_MAC)
        .ipv4(source, B1)
        .tos(tos)
        .ip_id(0)
        .df(df)
        .ip_proto(4)
        .payload(&inner[14..])
        .build()
}

/// `mode = "dsr"`: the frame goes to the backend's MAC with nothing else changed (TTL, addresses,
/// ports, checksums as they came), the flow is a forward entry alone, moved by the client's
/// segments, and a DSR packet that a MAC rewrite cannot deliver is dropped, counted.
fn dsr_fixtures() -> Vec<Fixture> {
    let setup = |more: &[Setup]| with(with(backends(), &[dsr_service(0, TCP, &[(1, 1)])]), more);
    let from_client = |cport: u16| {
        pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT, VIP)
            .tcp(cport, BACKEND_PORT)
    };
    let to_b1 = |cport: u16| {
        pkt()
            .eth(LB1_MAC, B1_MAC)
            .ipv4(CLIENT, VIP)
            .tcp(cport, BACKEND_PORT)
    };
    let entry_in = |state: u32, cport: u16, flags: u32| {
        let (k, v) = dsr_entry(TCP, cport, 1);
        let v = FlowValue {
            flags: v.flags | flags,
            ..v
        };
        (k, in_state(state, v))
    };
    let no_reply_entry = |cport: u16| (key(B1, BACKEND_PORT, CLIENT, cport, TCP), None);
    // A segment (flags, sequence number) of an established DSR flow from `cport`: forwarded
    // with its MACs changed alone, the flow left in (state, flags added).
    let established_step =
        |name: &'static str, cport: u16, (flags, seq): (u8, u32), (state, added): (u32, u32)| {
            Fixture {
                flows_after: vec![entry_in(state, cport, added)],
                ..fixture(
                    name,
                    setup(&[Setup::DsrFlow {
                        cport,
                        backend: 1,
                        state: TCP_ESTABLISHED,
                    }]),
                    from_client(cport).tcp_flags(flags).seq(seq).build(),
                    XDP_REDIRECT,
                    Some(to_b1(cport).tcp_flags(flags).seq(seq).build()),
                    vec![(Counter::Redirect, 1)],
                )
            }
        };
    let options = linux_syn_options(7_000_000, 0);
    vec![
        Fixture {
            flows_after: vec![entry_in(TCP_SYN_SENT, 43000, 0), no_reply_entry(43000)],
            ts_highest_after: Some(5),
            ..fixture(
                "dsr_syn_goes_to_the_backend_mac_and_nothing_else_changes",
                setup(&[Setup::TsHighest(5)]),
                from_client(43000).syn().tcp_options(&options).build(),
                XDP_REDIRECT,
                Some(to_b1(43000).syn().tcp_options(&options).build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Packets(1), 1),
                ],
            )
        },
        Fixture {
            flows_after: vec![entry_in(TCP_ESTABLISHED, 43001, 0)],
            ..fixture(
                "dsr_the_clients_handshake_ack_establishes_the_flow",
                setup(&[Setup::DsrFlow {
                    cport: 43001,
                    backend: 1,
                    state: TCP_SYN_SENT,
                }]),
                from_client(43001).ack().seq(1001).build(),
                XDP_REDIRECT,
                Some(to_b1(43001).ack().seq(1001).build()),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 0)],
            )
        },
        Fixture {
            // Its flow expired while the backend streamed: no RST, the segment goes where
            // the table sends it, and the flow comes back established.
            flows_after: vec![(
                key(CLIENT, 43002, VIP, BACKEND_PORT, TCP),
                in_state(
                    TCP_ESTABLISHED,
                    value(CLIENT, 43002, B1, BACKEND_PORT, 1, FLOW_DSR),
                ),
            )],
            ..fixture(
                "dsr_segment_without_a_flow_is_balanced_not_reset",
                setup(&[]),
                from_client(43002).ack().payload(b"more").build(),
                XDP_REDIRECT,
                Some(to_b1(43002).ack().payload(b"more").build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("reset_no_flow"), 0),
                ],
            )
        },
        Fixture {
            flows_after: vec![(key(CLIENT, 43003, VIP, BACKEND_PORT, TCP), None)],
            ..fixture(
                "dsr_rst_without_a_flow_is_dropped",
                setup(&[]),
                from_client(43003).tcp_flags(TCP_RST | TCP_ACK).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::TcpNoFlow), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
        established_step(
            "dsr_client_fin_half_closes",
            43004,
            (TCP_FIN | TCP_ACK, 1000),
            (TCP_FIN_WAIT, FLOW_FIN_SENT),
        ),
        established_step(
            "dsr_rst_in_window_ends_the_connection",
            43005,
            (TCP_RST | TCP_ACK, 1000),
            (TCP_CLOSED, FLOW_END_COUNTED),
        ),
        established_step(
            "dsr_blind_rst_is_forwarded_and_ends_nothing",
            43006,
            (TCP_RST | TCP_ACK, 1000 + (1 << 24)),
            (TCP_ESTABLISHED, 0),
        ),
        Fixture {
            // B3 has no neighbour entry: the kernel cannot have the packet, addressed to the VIP.
            flows_after: vec![],
            ..fixture(
                "dsr_backend_without_a_neighbour_is_dropped_not_passed",
                with(backends(), &[dsr_service(0, TCP, &[(3, 1)])]),
                from_client(43007).syn().build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::DsrCannotForward), 1)],
            )
        },
        Fixture {
            // From the pool address the client's tuple chooses (RSS spread at the backend),
            // to the backend: the client's packet whole inside, its TOS and DF outside.
            flows_after: vec![(
                key(CLIENT, 43010, VIP, BACKEND_PORT, TCP),
                in_state(
                    TCP_SYN_SENT,
                    value(
                        ipip_source(43010),
                        43010,
                        B1,
                        BACKEND_PORT,
                        1,
                        FLOW_DSR | FLOW_IPIP | FLOW_SYN_WELL_FORMED,
                    ),
                ),
            )],
            ..fixture(
                "dsr_ipip_syn_goes_inside_an_ipip_header_to_the_backend",
                with(
                    backends(),
                    &[tunnel_service(SERVICE_MODE_DSR_IPIP, &[(1, 1)])],
                ),
                from_client(43010)
                    .tos(0x10)
                    .syn()
                    .tcp_options(&options)
                    .build(),
                XDP_REDIRECT,
                Some(ipip_to_b1(
                    ipip_source(43010),
                    &from_client(43010)
                        .tos(0x10)
                        .syn()
                        .tcp_options(&options)
                        .build(),
                )),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Packets(1), 1),
                ],
            )
        },
        Fixture {
            // GUE: the same inside IPv4 and UDP, the flow's hash in the UDP source port (RSS
            // spread by flow at the backend).
            flows_after: vec![(
                key(CLIENT, 43012, VIP, BACKEND_PORT, TCP),
                in_state(
                    TCP_SYN_SENT,
                    value(
                        ipip_source(43012),
                        gue_source_port(key(CLIENT, 43012, VIP, BACKEND_PORT, TCP).hash()),
                        B1,
                        BACKEND_PORT,
                        1,
                        FLOW_DSR | FLOW_GUE | FLOW_SYN_WELL_FORMED,
                    ),
                ),
            )],
            ..fixture(
                "dsr_gue_syn_goes_inside_ipv4_and_udp_to_the_backend",
                with(
                    backends(),
                    &[tunnel_service(SERVICE_MODE_DSR_GUE, &[(1, 1)])],
                ),
                from_client(43012).syn().tcp_options(&options).build(),
                XDP_REDIRECT,
                Some(gue_to_b1(
                    ipip_source(43012),
                    43012,
                    &from_client(43012).syn().tcp_options(&options).build(),
                )),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        {
            // 1,490 bytes fit the 1,500-byte link, not with the tunnel's 20: the client is told
            // 1,480, the inner packet's room.
            let big = from_client(43011).ack().payload(&bulk(1450)).build();
            fixture(
                "dsr_ipip_packet_too_big_with_its_header_is_told_the_inner_mtu",
                with(
                    backends(),
                    &[tunnel_service(SERVICE_MODE_DSR_IPIP, &[(1, 1)])],
                ),
                big.clone(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv4(VIP, CLIENT)
                        .tos(0xc0)
                        .ip_id(0)
                        .df(false)
                        .icmp(3, 4, [0, 0, 0x05, 0xc8])
                        .payload(&quote(&big, 28))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("frag_needed_sent"), 1),
                ],
            )
        },
        Fixture {
            flows_after: vec![(
                key(CLIENT, 43008, VIP, BACKEND_PORT, UDP),
                in_state(UDP_REPLIED, dsr_entry(UDP, 43008, 1).1),
            )],
            ..fixture(
                "dsr_udp_datagram_goes_to_the_backend_mac",
                with(backends(), &[dsr_service(1, UDP, &[(1, 1)])]),
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(CLIENT, VIP)
                    .udp(43008, BACKEND_PORT)
                    .payload(b"query")
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB1_MAC, B1_MAC)
                        .ipv4(CLIENT, VIP)
                        .udp(43008, BACKEND_PORT)
                        .payload(b"query")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
    ]
}

/// What fixtures do to their backends' connection counts (FLOW_COUNTS, `flow_count.rs`):
/// connections opened, ended (once each) and released (entries removed). The daemon's active
/// flows and SNAT ports in use come from these alone.
fn count_connections(list: &mut [Fixture]) {
    use Counter::{Ended, Opened, Released};
    let deltas: &[(&str, &[(Counter, u64)])] = &[
        (
            "select_tcp_syn_to_vip_snats_to_backend",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "dsr_syn_goes_to_the_backend_mac_and_nothing_else_changes",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "dsr_rst_in_window_ends_the_connection",
            &[(Opened(1), 0), (Ended(1), 1), (Released(1), 0)],
        ),
        (
            "dnat_syn_rewrites_the_destination_alone",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "dnat_syn_whose_tuple_a_live_connection_holds_is_dropped",
            &[(Opened(1), 0), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "snat_pool_second_address_takes_new_flows_when_the_first_is_full",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "snat_pool_every_address_full_drops_the_new_flow_as_exhausted",
            &[(Opened(1), 0), (Ended(1), 0), (Released(1), 0)],
        ),
        (
            "failover_backend_rst_to_unanswered_syn_dropped_and_marks_suspect",
            &[(Opened(1), 0), (Ended(1), 1), (Released(1), 1)],
        ),
        (
            "failover_refusal_on_another_device_marks_nothing",
            &[(Ended(1), 1), (Released(1), 0)],
        ),
        (
            "failover_retransmitted_syn_unanswered_moves_to_another_backend",
            &[(Ended(1), 1), (Released(1), 1), (Opened(2), 1)],
        ),
        (
            "conntrack_second_fin_moves_to_last_ack",
            &[(Ended(1), 1), (Released(1), 0)],
        ),
        (
            "conntrack_last_ack_acknowledged_moves_to_time_wait",
            &[(Ended(1), 0), (Released(1), 0)],
        ),
        (
            "conntrack_rst_in_window_closes",
            &[(Ended(1), 1), (Released(1), 0)],
        ),
        (
            "conntrack_blind_rst_forwarded_and_leaves_established",
            &[(Ended(1), 0)],
        ),
        (
            "select_snat_port_of_long_closed_flow_reclaimed",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 1)],
        ),
        (
            "select_snat_port_of_just_closed_flow_kept",
            &[(Opened(1), 0), (Released(1), 0)],
        ),
        (
            "select_half_open_port_given_to_a_new_flow_under_pressure",
            &[(Opened(1), 1), (Ended(1), 1), (Released(1), 1)],
        ),
        (
            "flow_syn_reusing_closed_tuple_gets_new_flow",
            &[(Opened(1), 1), (Ended(1), 0), (Released(1), 1)],
        ),
        (
            "select_half_open_flow_makes_room_in_a_full_table",
            &[(Opened(1), 1), (Ended(1), 1), (Released(1), 1)],
        ),
        (
            "select_full_table_with_young_half_open_flows_drops",
            &[(Opened(1), 0), (Ended(1), 0), (Released(1), 0)],
        ),
    ];
    for (name, counters) in deltas {
        let fixture = list
            .iter_mut()
            .find(|f| f.name == *name)
            .unwrap_or_else(|| panic!("no fixture {name}"));
        fixture.counters.extend_from_slice(counters);
    }
}

/// A UDP reply of backend `backend` to SNAT:snat_port, and the same as its client receives it.
fn udp_reply(backend: u32, snat_port: u16, cport: u16) -> (Vec<u8>, Vec<u8>) {
    let mac = if backend == 1 { B1_MAC } else { B2_MAC };
    (
        pkt()
            .eth(mac, LB1_MAC)
            .ipv4(addr_of(backend), SNAT)
            .udp(BACKEND_PORT, snat_port)
            .payload(b"answer")
            .build(),
        pkt()
            .eth(LB0_MAC, CLIENT_MAC)
            .ipv4(VIP, CLIENT)
            .ttl(63)
            .udp(DNS_PORT, cport)
            .payload(b"answer")
            .build(),
    )
}

/// The connection model (lb_common::conntrack): each state transition, the evidence it needs,
/// each timeout class, and who gives a SNAT port up under pressure.
fn conntrack_fixtures() -> Vec<Fixture> {
    const ACK: u8 = 0x10;
    const PSH_ACK: u8 = 0x18;
    const FIN_ACK: u8 = 0x11;
    const RST: u8 = 0x04;
    const RST_ACK: u8 = 0x14;
    let web1 = || with(backends(), &[web(&[(1, 1)])]);
    let setup_flow = |f: FlowSetup| with(web1(), &[Setup::Flow(f)]);
    // A segment of the client on its flow, and as backend 1 receives it.
    let from_client = |cport: u16, snat: u16, f: &dyn Fn(PacketBuilder) -> PacketBuilder| {
        (
            f(client_syn(cport)).build(),
            Some(f(to_backend(1, snat)).build()),
        )
    };
    // A segment of backend 1 on a flow, and as its client receives it.
    let from_b1 = |cport: u16, snat: u16, f: &dyn Fn(PacketBuilder) -> PacketBuilder| {
        (
            f(from_backend(1, snat)).build(),
            Some(f(to_client(cport)).build()),
        )
    };
    let moved =
        |name, setup, (input, output), ingress, after: Vec<(FlowKey, Option<FlowValue>)>| Fixture {
            ingress,
            flows_after: after,
            ..fixture(
                name,
                setup,
                input,
                XDP_REDIRECT,
                output,
                vec![(Counter::Redirect, 1)],
            )
        };
    let both_in = |state, cport, snat| flow_pair_in(state, TCP, cport, WEB_PORT, 1, snat);
    let with_fin = |mut pair: Vec<(FlowKey, Option<FlowValue>)>, forward: bool, reply: bool| {
        for (i, fin) in [forward, reply].into_iter().enumerate() {
            if let (true, Some(v)) = (fin, pair[i].1.as_mut()) {
                v.flags |= FLOW_FIN_SENT;
            }
        }
        pair
    };
    let mut list = vec![
        moved(
            "conntrack_syn_ack_acknowledging_the_syn_moves_to_syn_recv",
            with(web1(), &[half_open(41000, 1, 31100, 0)]),
            from_b1(41000, 31100, &|b| b.syn().ack().ack_seq(1001)),
            "lb1",
            both_in(TCP_SYN_RECV, 41000, 31100),
        ),
        moved(
            "conntrack_blind_syn_ack_leaves_syn_sent",
            with(web1(), &[half_open(41001, 1, 31101, 0)]),
            from_b1(41001, 31101, &|b| b.syn().ack().ack_seq(5555)),
            "lb1",
            both_in(TCP_SYN_SENT, 41001, 31101),
        ),
        moved(
            "conntrack_handshake_ack_moves_to_established",
            setup_flow(flow_in(TCP_SYN_RECV, 41002, 1, 31102, Some(0))),
            from_client(41002, 31102, &|b| b.tcp_flags(ACK).ack_seq(1000)),
            "lb0",
            both_in(TCP_ESTABLISHED, 41002, 31102),
        ),
        moved(
            "conntrack_blind_handshake_ack_leaves_syn_recv",
            setup_flow(flow_in(TCP_SYN_RECV, 41003, 1, 31103, Some(0))),
            from_client(41003, 31103, &|b| b.tcp_flags(ACK).ack_seq(99_999)),
            "lb0",
            both_in(TCP_SYN_RECV, 41003, 31103),
        ),
        moved(
            "conntrack_half_closed_flow_carries_the_other_direction",
            setup_flow(flow_in(TCP_FIN_WAIT, 41004, 1, 31104, Some(0))),
            from_b1(41004, 31104, &|b| {
                b.tcp_flags(PSH_ACK).payload(b"more data")
            }),
            "lb1",
            with_fin(both_in(TCP_FIN_WAIT, 41004, 31104), true, false),
        ),
        moved(
            "conntrack_second_fin_moves_to_last_ack",
            setup_flow(flow_in(TCP_FIN_WAIT, 41005, 1, 31105, Some(0))),
            from_b1(41005, 31105, &|b| b.tcp_flags(FIN_ACK)),
            "lb1",
            with_fin(both_in(TCP_LAST_ACK, 41005, 31105), true, true),
        ),
        moved(
            "conntrack_fin_retransmitted_stays_in_fin_wait",
            setup_flow(flow_in(TCP_FIN_WAIT, 41006, 1, 31106, Some(0))),
            from_client(41006, 31106, &|b| b.tcp_flags(FIN_ACK)),
            "lb0",
            with_fin(both_in(TCP_FIN_WAIT, 41006, 31106), true, false),
        ),
        moved(
            "conntrack_last_ack_acknowledged_moves_to_time_wait",
            setup_flow(flow_in(TCP_LAST_ACK, 41007, 1, 31107, Some(0))),
            from_client(41007, 31107, &|b| b.tcp_flags(ACK)),
            "lb0",
            with_fin(both_in(TCP_TIME_WAIT, 41007, 31107), true, true),
        ),
        moved(
            "conntrack_rst_in_window_closes",
            setup_flow(flow_in(TCP_ESTABLISHED, 41008, 1, 31108, Some(0))),
            from_client(41008, 31108, &|b| b.tcp_flags(RST).seq(1000)),
            "lb0",
            both_in(TCP_CLOSED, 41008, 31108),
        ),
        moved(
            "conntrack_blind_rst_forwarded_and_leaves_established",
            setup_flow(flow_in(TCP_ESTABLISHED, 41009, 1, 31109, Some(0))),
            from_client(41009, 31109, &|b| b.tcp_flags(RST).seq(0x8000_0000)),
            "lb0",
            both_in(TCP_ESTABLISHED, 41009, 31109),
        ),
        moved(
            "conntrack_blind_fin_forwarded_and_leaves_established",
            setup_flow(flow_in(TCP_ESTABLISHED, 41010, 1, 31110, Some(0))),
            from_b1(41010, 31110, &|b| b.tcp_flags(FIN_ACK).seq(0x8000_0000)),
            "lb1",
            both_in(TCP_ESTABLISHED, 41010, 31110),
        ),
        moved(
            "conntrack_syn_on_established_tuple_stays_on_its_backend",
            with(backends(), &[web(&[(2, 1)]), flow(41011, 1, 31111, None)]),
            from_client(41011, 31111, &|b| b.syn().seq(7000)),
            "lb0",
            both_in(TCP_ESTABLISHED, 41011, 31111),
        ),
        moved(
            "conntrack_udp_reply_moves_both_entries_to_replied",
            with(
                backends(),
                &[dns(&[(1, 1)]), udp_flow(UDP_UNREPLIED, 41012, 1, 31112, 0)],
            ),
            {
                let (input, output) = udp_reply(1, 31112, 41012);
                (input, Some(output))
            },
            "lb1",
            flow_pair_in(UDP_REPLIED, UDP, 41012, DNS_PORT, 1, 31112),
        ),
        Fixture {
            flows_after: vec![(key(CLIENT, 41013, VIP, WEB_PORT, TCP), None)],
            ..fixture(
                "conntrack_syn_fin_to_vip_dropped_and_not_tracked",
                web1(),
                client_syn(41013).tcp_flags(0x03).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::TcpInvalidFlags), 1),
                    (Counter::NewFlows(1), 0),
                ],
            )
        },
        Fixture {
            flows_after: both_in(TCP_ESTABLISHED, 41014, 31114),
            ..fixture(
                "conntrack_segment_without_flags_on_flow_dropped",
                setup_flow(flow_in(TCP_ESTABLISHED, 41014, 1, 31114, Some(0))),
                client_syn(41014).tcp_flags(0).build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::TcpInvalidFlags), 1)],
            )
        },
        Fixture {
            flows_after: both_in(TCP_ESTABLISHED, 41015, 31115),
            ..fixture(
                "flow_established_on_unhealthy_backend_kept",
                vec![
                    Setup::Backend {
                        id: 1,
                        addr: B1,
                        healthy: false,
                    },
                    Setup::Backend {
                        id: 2,
                        addr: B2,
                        healthy: true,
                    },
                    web(&[(2, 1)]),
                    flow(41015, 1, 31115, None),
                ],
                client_syn(41015)
                    .tcp_flags(PSH_ACK)
                    .payload(b"GET /")
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_backend(1, 31115)
                        .tcp_flags(PSH_ACK)
                        .payload(b"GET /")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(2), 0)],
            )
        },
        Fixture {
            suspect_after: vec![(1, false)],
            ..moved(
                "failover_blind_rst_to_syn_forwarded_without_mark",
                with(
                    backends(),
                    &[web(&[(1, 1), (2, 1)]), half_open(41016, 1, 31116, 0)],
                ),
                from_b1(41016, 31116, &|b| b.tcp_flags(RST_ACK).ack_seq(7777)),
                "lb1",
                both_in(TCP_SYN_SENT, 41016, 31116),
            )
        },
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 41100);
            Fixture {
                suspect_after: vec![(1, false)],
                ..moved(
                    "failover_syn_with_another_sequence_number_marks_nothing",
                    with(
                        backends(),
                        &[
                            web(&[(1, 1), (2, 1)]),
                            half_open(cport, 1, 31117, 600_000_000),
                        ],
                    ),
                    from_client(cport, 31117, &|b| b.syn().seq(5000)),
                    "lb0",
                    both_in(TCP_SYN_SENT, cport, 31117),
                )
            }
        },
        Fixture {
            settings: one_port(),
            flows_after: vec![
                (key(CLIENT, 41020, VIP, WEB_PORT, TCP), None),
                (
                    key(B1, BACKEND_PORT, SNAT, 31005, TCP),
                    in_state(
                        TCP_SYN_SENT,
                        value(VIP, WEB_PORT, CLIENT, 41021, 1, FLOW_REVERSE),
                    ),
                ),
            ],
            ..fixture(
                "select_half_open_port_given_to_a_new_flow_under_pressure",
                with(web1(), &[half_open(41020, 1, 31005, 1_500_000_000)]),
                client_syn(41021).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 31005).syn().build()),
                vec![
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("half_open_evicted"), 1),
                ],
            )
        },
        // The table is full (two connections, four entries), though a port is free: an old
        // half-open connection gives its entries up, and its port; which of the two, the
        // random probes decide.
        Fixture {
            settings: full_table(),
            flows_after: evicted_for(41030, 31005, 41032),
            or_else: Some((
                to_backend(1, 31006).syn().build(),
                evicted_for(41031, 31006, 41032),
            )),
            ..fixture(
                "select_half_open_flow_makes_room_in_a_full_table",
                with(
                    web1(),
                    &[
                        half_open(41030, 1, 31005, 1_500_000_000),
                        half_open(41031, 1, 31006, 1_500_000_000),
                    ],
                ),
                client_syn(41032).build(),
                XDP_REDIRECT,
                Some(to_backend(1, 31005).syn().build()),
                vec![
                    (Counter::NewFlows(1), 1),
                    (Counter::Event("half_open_evicted"), 1),
                    (Counter::Drop(DropReason::FlowTableFull), 0),
                ],
            )
        },
        // The same with young half-open connections: they may yet complete, and the new flow
        // is dropped as the table's.
        Fixture {
            settings: full_table(),
            ..fixture(
                "select_full_table_with_young_half_open_flows_drops",
                with(
                    web1(),
                    &[half_open(41033, 1, 31005, 0), half_open(41034, 1, 31006, 0)],
                ),
                client_syn(41035).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::FlowTableFull), 1),
                    (Counter::Event("half_open_evicted"), 0),
                ],
            )
        },
        Fixture {
            settings: one_port(),
            ..fixture(
                "select_port_of_young_half_open_flow_kept",
                with(web1(), &[half_open(41022, 1, 31005, 200_000_000)]),
                client_syn(41023).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::SnatPortsExhausted), 1),
                    (Counter::Event("half_open_evicted"), 0),
                ],
            )
        },
        Fixture {
            settings: one_port(),
            ..fixture(
                "select_port_of_half_closed_flow_kept",
                setup_flow(flow_in(TCP_FIN_WAIT, 41024, 1, 31005, Some(3_000_000_000))),
                client_syn(41025).build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::SnatPortsExhausted), 1)],
            )
        },
        Fixture {
            settings: one_port(),
            ..fixture(
                "select_port_of_unanswered_udp_flow_kept",
                with(
                    backends(),
                    &[
                        dns(&[(1, 1)]),
                        udp_flow(UDP_UNREPLIED, 41026, 1, 31005, 3_000_000_000),
                    ],
                ),
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv4(CLIENT, VIP)
                    .udp(41027, DNS_PORT)
                    .payload(b"query")
                    .build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::SnatPortsExhausted), 1)],
            )
        },
    ];
    // Each timeout class: a reply half a second before the state's timeout is forwarded; one
    // half a second after it finds its flow gone (removed, both directions, by the data path).
    let classes = [
        (TCP_SYN_SENT, TCP, 2),
        (TCP_ESTABLISHED, TCP, 3),
        (TCP_FIN_WAIT, TCP, 4),
        (TCP_TIME_WAIT, TCP, 5),
        (UDP_UNREPLIED, UDP, 6),
        (UDP_REPLIED, UDP, 7),
    ];
    for (i, (state, proto, timeout_s)) in classes.into_iter().enumerate() {
        for expired in [false, true] {
            let cport = 41200 + 2 * i as u16 + u16::from(expired);
            let snat = 31200 + 2 * i as u16 + u16::from(expired);
            let ago = if expired {
                timeout_s * 1_000_000_000 + 500_000_000
            } else {
                timeout_s * 1_000_000_000 - 500_000_000
            };
            let flow = FlowSetup {
                proto,
                ..flow_in(state, cport, 1, snat, Some(ago))
            };
            let (input, output) = if proto == TCP {
                from_b1(cport, snat, &|b| b.tcp_flags(ACK))
            } else {
                let (input, output) = udp_reply(1, snat, cport);
                (input, Some(output))
            };
            let setup = with(
                backends(),
                &[web(&[(1, 1)]), dns(&[(1, 1)]), Setup::Flow(flow)],
            );
            let vport = if proto == TCP { WEB_PORT } else { DNS_PORT };
            list.push(Fixture {
                settings: Some(LoadSettings {
                    timeouts: short_timeouts(),
                    ..settings()
                }),
                ingress: "lb1",
                flows_after: if expired {
                    flow_pair(proto, cport, vport, 1, snat)
                        .map(|(k, _)| (k, None))
                        .to_vec()
                } else {
                    vec![]
                },
                ..if expired {
                    fixture(
                        "conntrack_flow_past_its_state_timeout_removed_by_the_data_path",
                        setup,
                        input,
                        XDP_PASS,
                        None,
                        vec![
                            (Counter::Pass(PassReason::NotService), 1),
                            (Counter::Event("expired_in_data_path"), 1),
                            // An ended connection's end was counted when it ended.
                            (Counter::Ended(1), u64::from(!ended(state))),
                            (Counter::Released(1), 1),
                        ],
                    )
                } else {
                    fixture(
                        "conntrack_flow_within_its_state_timeout_forwarded",
                        setup,
                        input,
                        XDP_REDIRECT,
                        output,
                        vec![
                            (Counter::Redirect, 1),
                            (Counter::Event("expired_in_data_path"), 0),
                        ],
                    )
                }
            });
        }
    }
    list
}

fn patched(mut frame: Vec<u8>, offset: usize, byte: u8) -> Vec<u8> {
    frame[offset] = byte;
    frame
}

trait BuildWith {
    fn build_with(self, f: impl FnOnce(PacketBuilder) -> PacketBuilder) -> Vec<u8>;
}

impl BuildWith for PacketBuilder {
    fn build_with(self, f: impl FnOnce(PacketBuilder) -> PacketBuilder) -> Vec<u8> {
        f(self).build()
    }
}

fn mac_of(id: u32) -> Mac {
    if id == 1 { B1_MAC } else { B2_MAC }
}

fn backends6() -> Vec<Setup> {
    backends().iter().filter_map(twin_setup).collect()
}

fn web6(backends: &[(u32, u32)]) -> Setup {
    twin_setup(&web(backends)).expect("web has a twin")
}

fn dns6(backends: &[(u32, u32)]) -> Setup {
    twin_setup(&dns(backends)).expect("dns has a twin")
}

/// An established TCP flow CLIENT6:cport -> VIP6:80 on `backend` via SNAT6:`snat_port`.
fn flow6(cport: u16, backend: u32, snat_port: u16) -> Setup {
    Setup::Flow6(flow_in(TCP_ESTABLISHED, cport, backend, snat_port, Some(0)))
}

/// `flow_pair` in IPv6: its twin (`ipv6_of`).
fn flow_pair6(
    proto: u8,
    cport: u16,
    vport: u16,
    backend: u32,
    snat_port: u16,
) -> [(FlowKey6, FlowValue6); 2] {
    flow_pair(proto, cport, vport, backend, snat_port).map(|(k, v)| (twin_key(&k), twin_value(&v)))
}

/// A new flow's `flow_pair6` (via PORT_MIN) in `state`.
fn new_pair6(state: u32, proto: u8, cport: u16, backend: u32) -> Flow6Checks {
    let vport = if proto == TCP { WEB_PORT } else { DNS_PORT };
    flow_pair6(proto, cport, vport, backend, PORT_MIN)
        .map(|(k, v)| (k, in_state(state, v)))
        .to_vec()
}

fn client_syn6(cport: u16) -> PacketBuilder {
    pkt()
        .eth(CLIENT_MAC, LB0_MAC)
        .ipv6(CLIENT6, VIP6)
        .tcp(cport, WEB_PORT)
        .syn()
}

fn to_backend6(backend: u32, snat_port: u16) -> PacketBuilder {
    pkt()
        .eth(LB1_MAC, mac_of(backend))
        .ipv6(SNAT6, ipv6_of(addr_of(backend)))
        .ttl(63)
        .tcp(snat_port, BACKEND_PORT)
}

fn from_backend6(backend: u32, snat_port: u16) -> PacketBuilder {
    pkt()
        .eth(mac_of(backend), LB1_MAC)
        .ipv6(ipv6_of(addr_of(backend)), SNAT6)
        .tcp(BACKEND_PORT, snat_port)
}

fn to_client6(cport: u16) -> PacketBuilder {
    pkt()
        .eth(LB0_MAC, CLIENT_MAC)
        .ipv6(VIP6, CLIENT6)
        .ttl(63)
        .tcp(WEB_PORT, cport)
}

/// The backend the data path's Maglev lookup picks for an IPv6 client port `cport`.
fn maglev_choice6(backends: &[(u32, u32)], cport: u16) -> u32 {
    let table = table_for(backends);
    table[(key6(CLIENT6, cport, VIP6, WEB_PORT, TCP).hash() % MAGLEV_SIZE) as usize]
}

/// IPv6's path through the XDP program: full NAT (NAT66) with connection tracking, timestamp
/// translation and the SNAT port search, and what passes to the kernel or is dropped, counted.
fn ipv6_fixtures() -> Vec<Fixture> {
    let weighted = [(1, 4), (2, 6)];
    let chosen = maglev_choice6(&weighted, 40001);
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let response = b"HTTP/1.0 200 OK\r\n\r\n";
    let big = [0x61; 1441];
    let mut list = vec![
        Fixture {
            flows6_after: new_pair6(TCP_SYN_SENT, TCP, 40000, 1),
            ..fixture(
                "ipv6_syn_to_vip_snats_to_backend",
                with(backends6(), &[web6(&[(1, 1)])]),
                client_syn6(40000).build(),
                XDP_REDIRECT,
                Some(to_backend6(1, PORT_MIN).syn().build()),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::NewFlows(1), 1),
                    (Counter::Packets(1), 1),
                    (Counter::Opened(1), 1),
                ],
            )
        },
        fixture(
            "ipv6_weighted_syn_goes_to_maglev_choice",
            with(backends6(), &[web6(&weighted)]),
            client_syn6(40001).build(),
            XDP_REDIRECT,
            Some(to_backend6(chosen, PORT_MIN).syn().build()),
            vec![(Counter::Redirect, 1), (Counter::NewFlows(chosen), 1)],
        ),
        fixture(
            "ipv6_established_segment_follows_its_flow",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40002, 2, 31000)]),
            client_syn6(40002)
                .tcp_flags(TCP_ACK | TCP_PSH)
                .payload(request)
                .build(),
            XDP_REDIRECT,
            Some(
                to_backend6(2, 31000)
                    .tcp_flags(TCP_ACK | TCP_PSH)
                    .payload(request)
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::NewFlows(2), 0),
                (Counter::Packets(2), 1),
            ],
        ),
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ipv6_reply_rewritten_to_vip_and_client",
                with(backends6(), &[web6(&[(1, 1)]), flow6(40003, 1, 31001)]),
                from_backend6(1, 31001)
                    .tcp_flags(TCP_ACK | TCP_PSH)
                    .payload(response)
                    .build(),
                XDP_REDIRECT,
                Some(
                    to_client6(40003)
                        .tcp_flags(TCP_ACK | TCP_PSH)
                        .payload(response)
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::Packets(1), 1)],
            )
        },
        Fixture {
            flows6_after: new_pair6(UDP_UNREPLIED, UDP, 50000, 1),
            ..fixture(
                "ipv6_udp_datagram_opens_a_flow",
                with(backends6(), &[dns6(&[(1, 1)])]),
                pkt()
                    .eth(CLIENT_MAC, LB0_MAC)
                    .ipv6(CLIENT6, VIP6)
                    .udp(50000, DNS_PORT)
                    .payload(b"query")
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB1_MAC, B1_MAC)
                        .ipv6(SNAT6, B1_6)
                        .ttl(63)
                        .udp(PORT_MIN, BACKEND_PORT)
                        .payload(b"query")
                        .build(),
                ),
                vec![(Counter::Redirect, 1), (Counter::NewFlows(1), 1)],
            )
        },
        Fixture {
            flows6_after: flow_pair6(TCP, 40005, WEB_PORT, 1, 31005)
                .map(|(k, v)| (k, in_state(TCP_CLOSED, v)))
                .to_vec(),
            ..fixture(
                "ipv6_client_rst_closes_the_connection",
                with(backends6(), &[web6(&[(1, 1)]), flow6(40005, 1, 31005)]),
                client_syn6(40005).tcp_flags(TCP_RST).build(),
                XDP_REDIRECT,
                Some(to_backend6(1, 31005).tcp_flags(TCP_RST).build()),
                vec![(Counter::Redirect, 1), (Counter::Ended(1), 1)],
            )
        },
        fixture(
            "ipv6_segment_without_flow_answered_with_rst",
            with(backends6(), &[web6(&[(1, 1)])]),
            client_syn6(40006)
                .tcp_flags(TCP_ACK)
                .ack_seq(7000)
                .payload(b"GET /")
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB0_MAC, CLIENT_MAC)
                    .ipv6(VIP6, CLIENT6)
                    .tcp(WEB_PORT, 40006)
                    .tcp_flags(TCP_RST)
                    .seq(7000)
                    .window(0)
                    .build(),
            ),
            vec![
                (Counter::Event("reset_no_flow"), 1),
                (Counter::Drop(DropReason::TcpNoFlow), 0),
            ],
        ),
        fixture(
            "ipv6_service_without_backends_drops",
            with(backends6(), &[web6(&[(1, 0)])]),
            client_syn6(40007).build(),
            XDP_DROP,
            None,
            vec![(Counter::Drop(DropReason::NoBackend), 1)],
        ),
        // A client's 1,501-byte packet does not fit the backends' 1500-byte link (routers do
        // not fragment IPv6): the client gets "packet too big" with that MTU, from the VIP,
        // quoting its segment as it sent it, back out of the device it came in by.
        {
            let too_big = client_syn6(40008).tcp_flags(TCP_ACK).payload(&big).build();
            fixture(
                "ipv6_too_big_for_the_backend_link_answered_with_packet_too_big",
                with(backends6(), &[web6(&[(1, 1)]), flow6(40008, 1, 31008)]),
                too_big.clone(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv6(VIP6, CLIENT6)
                        .icmp(2, 0, [0, 0, 0x05, 0xdc])
                        .payload(&quote(&too_big, 48))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("packet_too_big_sent"), 1),
                    (Counter::Event("frag_needed_sent"), 0),
                    (Counter::Drop(DropReason::FibFragNeeded), 0),
                ],
            )
        },
        // A backend's UDP answer too big for the client's link: the backend gets "packet too
        // big" from the SNAT address, quoting its datagram with its UDP checksum as it sent it.
        {
            let too_big = from_backend6(1, 31012)
                .udp(BACKEND_PORT, 31012)
                .payload(&bulk(1453))
                .build();
            Fixture {
                ingress: "lb1",
                ..fixture(
                    "ipv6_too_big_reply_answered_with_packet_too_big_to_the_backend",
                    with(
                        backends6(),
                        &[
                            dns6(&[(1, 1)]),
                            Setup::Flow6(FlowSetup {
                                proto: UDP,
                                ..flow_in(UDP_REPLIED, 40012, 1, 31012, Some(0))
                            }),
                        ],
                    ),
                    too_big.clone(),
                    XDP_REDIRECT,
                    Some(
                        pkt()
                            .eth(LB1_MAC, B1_MAC)
                            .ipv6(SNAT6, B1_6)
                            .icmp(2, 0, [0, 0, 0x05, 0xdc])
                            .payload(&quote(&too_big, 48))
                            .build(),
                    ),
                    vec![
                        (Counter::Redirect, 1),
                        (Counter::Event("packet_too_big_sent"), 1),
                    ],
                )
            }
        },
        fixture(
            "ipv6_not_a_service_passes",
            with(backends6(), &[web6(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(CLIENT6, VIP6)
                .tcp(40009, 81)
                .syn()
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotService), 1)],
        ),
        fixture(
            "ipv6_neighbour_solicitation_passes_to_the_kernel",
            backends6(),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(CLIENT6, VIP6)
                .ttl(255)
                .ip_proto(IPPROTO_ICMPV6)
                .payload(&[135, 0, 0, 0, 0, 0, 0, 0])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotTcpUdp), 1)],
        ),
        fixture(
            "ipv6_extension_headers_pass_to_the_kernel",
            with(backends6(), &[web6(&[(1, 1)])]),
            client_syn6(40010).hop_by_hop().build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::Ipv6ExtensionHeaders), 1)],
        ),
        fixture(
            "ipv6_truncated_header_passes",
            backends6(),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ethertype(ETH_P_IPV6)
                .payload(&[0x60; 20])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::MalformedIpv6), 1)],
        ),
        fixture(
            "ipv6_hop_limit_1_passes_for_the_kernel_to_answer",
            with(backends6(), &[web6(&[(1, 1)])]),
            client_syn6(40011).ttl(1).build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::TtlExpired), 1)],
        ),
    ];
    list.extend(icmp6_fixtures());
    list.extend(ipv6_tunnel_fixtures());
    list.extend(ipv6_fragment_fixtures());
    list
}

/// IPv6's own fragments: the twins of IPv4's (`ipv6_twin`) show a datagram's first fragment
/// balanced and recorded by its identification and the later ones following it, at both
/// hooks; here, what only IPv6 has.
fn ipv6_fragment_fixtures() -> Vec<Fixture> {
    let client = pkt().eth(CLIENT_MAC, LB0_MAC).ipv6(CLIENT6, VIP6);
    let first = client
        .clone()
        .udp(40301, DNS_PORT)
        .payload(&bulk(1000))
        .fragment6(true, 0, 0x0004_2301);
    let forwarded = |b: PacketBuilder| b.eth(LB1_MAC, B1_MAC).ipv6(SNAT6, B1_6).ttl(63);
    vec![
        // A complete datagram with a fragment header (RFC 6946's atomic fragment): balanced,
        // with nothing to follow.
        Fixture {
            flows6_after: new_pair6(UDP_UNREPLIED, UDP, 40307, 1),
            ..fixture(
                "ipv6_udp_atomic_fragment_balanced_and_not_recorded",
                with(backends6(), &[dns6(&[(1, 1)])]),
                client
                    .clone()
                    .udp(40307, DNS_PORT)
                    .payload(b"query")
                    .fragment6(false, 0, 9)
                    .build(),
                XDP_REDIRECT,
                Some(
                    forwarded(client.clone())
                        .udp(PORT_MIN, BACKEND_PORT)
                        .payload(b"query")
                        .fragment6(false, 0, 9)
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("first_fragments"), 0),
                ],
            )
        },
        fixture(
            "ipv6_fragment_behind_another_extension_header_passes",
            with(backends6(), &[dns6(&[(1, 1)])]),
            first.clone().hop_by_hop().build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::Ipv6ExtensionHeaders), 1)],
        ),
        fixture(
            "ipv6_truncated_fragment_header_passes",
            with(backends6(), &[dns6(&[(1, 1)])]),
            client
                .clone()
                .ip_proto(IPV6_FRAGMENT)
                .payload(&[UDP, 0, 0])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::Fragment), 1)],
        ),
        // Too big for the backends' 1500-byte link: a fragment's quote would not hold its
        // ports, by which the flow is found, so it gets no "packet too big".
        fixture(
            "ipv6_first_fragment_too_big_for_the_link_dropped",
            with(backends6(), &[dns6(&[(1, 1)])]),
            client
                .clone()
                .udp(40308, DNS_PORT)
                .payload(&bulk(1448))
                .fragment6(true, 0, 11)
                .build(),
            XDP_DROP,
            // Rewritten by then; dropped as it is.
            Some(
                client
                    .clone()
                    .ipv6(SNAT6, B1_6)
                    .udp(PORT_MIN, BACKEND_PORT)
                    .payload(&bulk(1448))
                    .fragment6(true, 0, 11)
                    .build(),
            ),
            vec![
                (Counter::Drop(DropReason::FibFragNeeded), 1),
                (Counter::Event("packet_too_big_sent"), 0),
            ],
        ),
    ]
}

/// ICMPv6 at the XDP hook: echo to a VIP answered; errors about balanced flows translated both
/// ways, the quote compared whole (its TCP or UDP checksum too, and the error's own over the
/// pseudo-header); errors about no flow, and neighbour discovery, passed.
fn icmp6_fixtures() -> Vec<Fixture> {
    let router6 = ipv6_of(ROUTER);
    let backend_router6 = ipv6_of(BACKEND_ROUTER);
    // A reply on its way to the client, as it left the balancer, and as the backend sent it.
    let reply_out = |cport| to_client6(cport).ack().seq(5000).build();
    let reply_in = |snat_port| from_backend6(1, snat_port).ttl(63).ack().seq(5000).build();
    // A forwarded segment on its way to the backend, and as the client sent it.
    let forward_out = |snat_port| to_backend6(1, snat_port).ack().build();
    let forward_in = |cport| client_syn6(cport).ttl(63).tcp_flags(TCP_ACK).build();
    let dns_out = |snat_port| {
        pkt()
            .ipv6(SNAT6, B1_6)
            .ttl(63)
            .udp(snat_port, BACKEND_PORT)
            .payload(b"query")
            .build()
    };
    let dns_in = |cport| {
        pkt()
            .ipv6(CLIENT6, VIP6)
            .ttl(63)
            .udp(cport, DNS_PORT)
            .payload(b"query")
            .build()
    };
    let udp_flow6 = |cport, snat_port| {
        Setup::Flow6(FlowSetup {
            proto: UDP,
            ..flow_in(UDP_UNREPLIED, cport, 1, snat_port, Some(0))
        })
    };
    let ping = |dst: Ipv6Addr, seq: u8| {
        pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv6(CLIENT6, dst)
            .ttl(61)
            .icmp(128, 0, [0x12, 0x34, 0, seq])
            .payload(b"abcdefghijklmnopqrstuvwxyz012345")
    };
    vec![
        // A ping of a VIP: answered from the VIP, back out of the ingress device, with a hop
        // limit of 64; id, sequence number and data as they came.
        fixture(
            "ipv6_echo_request_to_vip_answered",
            with(backends6(), &[web6(&[(1, 1)])]),
            ping(VIP6, 1).build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB0_MAC, CLIENT_MAC)
                    .ipv6(VIP6, CLIENT6)
                    .icmp(129, 0, [0x12, 0x34, 0, 1])
                    .payload(b"abcdefghijklmnopqrstuvwxyz012345")
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_echo_replied"), 1),
            ],
        ),
        fixture(
            "ipv6_echo_request_to_another_address_passed",
            with(backends6(), &[web6(&[(1, 1)])]),
            ping(ipv6_of(OTHER), 2).build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::NotTcpUdp), 1),
                (Counter::Event("icmp_echo_replied"), 0),
            ],
        ),
        // The IPv4 VIP's address is not the IPv6 VIP's: no service holds this one.
        fixture(
            "ipv6_echo_request_to_a_vip_without_ipv6_service_passed",
            with(backends(), &[web(&[(1, 1)])]),
            ping(VIP6, 3).build(),
            XDP_PASS,
            None,
            vec![(Counter::Event("icmp_echo_replied"), 0)],
        ),
        // A router between the balancer and the client cannot forward a 1500-byte reply: its
        // "packet too big" to the VIP goes to the backend, from the SNAT address, quoting the
        // reply as the backend sent it (the TCP checksum quoted too).
        fixture(
            "ipv6_packet_too_big_to_vip_goes_to_the_backend_translated",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40201, 1, 31201)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, VIP6)
                .icmp(2, 0, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40201), 60))
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv6(SNAT6, B1_6)
                    .ttl(63)
                    .icmp(2, 0, FRAG_NEEDED_1400)
                    .payload(&quote(&reply_in(31201), 60))
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
                (Counter::Event("icmp_error_to_client"), 0),
            ],
        ),
        // A router behind the balancer found a forwarded segment's hop limit spent: its time
        // exceeded, quoting 8 bytes of TCP only (no checksum to fix), goes to the client.
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ipv6_time_exceeded_to_snat_goes_to_the_client_translated",
                with(backends6(), &[web6(&[(1, 1)]), flow6(40202, 1, 31202)]),
                pkt()
                    .eth(B2_MAC, LB1_MAC)
                    .ipv6(backend_router6, SNAT6)
                    .icmp(3, 0, [0; 4])
                    .payload(&quote(&forward_out(31202), 48))
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv6(VIP6, CLIENT6)
                        .ttl(63)
                        .icmp(3, 0, [0; 4])
                        .payload(&quote(&forward_in(40202), 48))
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("icmp_error_to_client"), 1),
                    (Counter::Event("icmp_error_to_backend"), 0),
                ],
            )
        },
        // A backend with nothing listening on a UDP port: its port unreachable (code 4)
        // reaches the client as the VIP's, quoting the client's own datagram (checksum
        // included).
        Fixture {
            ingress: "lb1",
            ..fixture(
                "ipv6_port_unreachable_from_a_backend_goes_to_the_client",
                with(backends6(), &[dns6(&[(1, 1)]), udp_flow6(40203, 31203)]),
                pkt()
                    .eth(B1_MAC, LB1_MAC)
                    .ipv6(B1_6, SNAT6)
                    .icmp(1, 4, [0; 4])
                    .payload(&dns_out(31203)[14..])
                    .build(),
                XDP_REDIRECT,
                Some(
                    pkt()
                        .eth(LB0_MAC, CLIENT_MAC)
                        .ipv6(VIP6, CLIENT6)
                        .ttl(63)
                        .icmp(1, 4, [0; 4])
                        .payload(&dns_in(40203)[14..])
                        .build(),
                ),
                vec![
                    (Counter::Redirect, 1),
                    (Counter::Event("icmp_error_to_client"), 1),
                ],
            )
        },
        // ... and a parameter problem about a reply goes to the backend.
        fixture(
            "ipv6_parameter_problem_to_vip_goes_to_the_backend_translated",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40204, 1, 31204)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, VIP6)
                .icmp(4, 0, [0, 0, 0, 7])
                .payload(&quote(&reply_out(40204), 60))
                .build(),
            XDP_REDIRECT,
            Some(
                pkt()
                    .eth(LB1_MAC, B1_MAC)
                    .ipv6(SNAT6, B1_6)
                    .ttl(63)
                    .icmp(4, 0, [0, 0, 0, 7])
                    .payload(&quote(&reply_in(31204), 60))
                    .build(),
            ),
            vec![
                (Counter::Redirect, 1),
                (Counter::Event("icmp_error_to_backend"), 1),
            ],
        ),
        // Errors that are no flow's go to the kernel: a quote of a packet the balancer never
        // sent, an error not addressed to the quoted packet's sender, a quote cut before the
        // ports, and a quoted packet with extension headers.
        fixture(
            "ipv6_icmp_error_quoting_no_flow_passed",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40205, 1, 31205)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, VIP6)
                .icmp(2, 0, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40206), 60))
                .build(),
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::IcmpNoFlow), 1),
                (Counter::Event("icmp_error_to_backend"), 0),
            ],
        ),
        fixture(
            "ipv6_icmp_error_not_to_the_quoted_sender_passed",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40207, 1, 31207)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, ipv6_of(OTHER))
                .icmp(2, 0, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40207), 60))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
        fixture(
            "ipv6_icmp_error_quote_cut_before_the_ports_passed",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40208, 1, 31208)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, VIP6)
                .icmp(2, 0, FRAG_NEEDED_1400)
                .payload(&quote(&reply_out(40208), 42))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
        // An IPv6 Ethernet type with another version in the header is no ICMPv6 to answer.
        fixture(
            "ipv6_echo_request_with_another_ip_version_passes_as_malformed",
            with(backends6(), &[web6(&[(1, 1)])]),
            {
                let mut frame = ping(VIP6, 4).build();
                frame[14] = 0x40 | (frame[14] & 0x0f);
                frame
            },
            XDP_PASS,
            None,
            vec![
                (Counter::Pass(PassReason::MalformedIpv6), 1),
                (Counter::Event("icmp_echo_replied"), 0),
            ],
        ),
        fixture(
            "ipv6_icmp_error_quoting_extension_headers_passed",
            with(backends6(), &[web6(&[(1, 1)]), flow6(40209, 1, 31209)]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(router6, VIP6)
                .icmp(2, 0, FRAG_NEEDED_1400)
                .payload(&quote(&to_client6(40209).ack().hop_by_hop().build(), 68))
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::IcmpNoFlow), 1)],
        ),
    ]
}

/// DSR's encapsulated forms over IPv6: the client's packet, whole, inside IPv6 (IPv6-in-IPv6),
/// or IPv6 and UDP to the GUE port (no UDP checksum), from the pool address the client's tuple
/// picks to the backend; the inner traffic class outside, hop limit 64, and the flow's hash in
/// the outer flow label (and GUE's source port) for the backend's RSS. The setups are the IPv4
/// fixtures' twins; the outer frames, unlike theirs, are IPv6's own.
fn ipv6_tunnel_fixtures() -> Vec<Fixture> {
    let options = linux_syn_options(7_000_000, 0);
    let forms = [
        (
            "ipv6_dsr_ipip_syn_goes_inside_ipv6_to_the_backend",
            SERVICE_MODE_DSR_IPIP,
            FLOW_IPIP,
            43020,
        ),
        (
            "ipv6_dsr_gue_syn_goes_inside_ipv6_and_udp_to_the_backend",
            SERVICE_MODE_DSR_GUE,
            FLOW_GUE,
            43021,
        ),
    ];
    forms
        .into_iter()
        .map(|(name, mode, form, cport)| {
            let setup = with(backends(), &[tunnel_service(mode, &[(1, 1)])])
                .iter()
                .map(|step| twin_setup(step).expect("a twin"))
                .collect();
            let syn = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .tos(0x10)
                .tcp(cport, BACKEND_PORT)
                .syn()
                .tcp_options(&options)
                .build();
            let input = twin_frame(&syn).expect("a twin");
            let k6 = twin_key(&key(CLIENT, cport, VIP, BACKEND_PORT, TCP));
            let hash = k6.hash();
            let pool = SNAT_POOL.len() as u32;
            let source = SNAT_POOL
                [pool_start(lb_common::Address::fold(k6.src_addr), k6.src_port.0, pool) as usize];
            let outer = pkt()
                .eth(LB1_MAC, B1_MAC)
                .ipv6(ipv6_of(source), ipv6_of(B1))
                .tos(0x10)
                .flow_label(hash);
            let (outer, sport) = if form == FLOW_GUE {
                let sport = gue_source_port(hash);
                (outer.udp(sport, GUE_PORT).udp_no_checksum(), sport)
            } else {
                (outer.ip_proto(41), cport)
            };
            let flags = FLOW_DSR | form | FLOW_SYN_WELL_FORMED;
            let entry = value(source, sport, B1, BACKEND_PORT, 1, flags);
            Fixture {
                flows6_after: vec![(k6, in_state(TCP_SYN_SENT, twin_value(&entry)))],
                ..fixture(
                    name,
                    setup,
                    input.clone(),
                    XDP_REDIRECT,
                    Some(outer.payload(&input[14..]).build()),
                    vec![
                        (Counter::Redirect, 1),
                        (Counter::NewFlows(1), 1),
                        (Counter::Packets(1), 1),
                    ],
                )
            }
        })
        .collect()
}

/// The IPv6 twin of an IPv4 fixture's setup step: the same backend, service or flow, its
/// addresses mapped by `ipv6_of`; `None` for the tc hook's bridges.
fn twin_setup(step: &Setup) -> Option<Setup> {
    Some(match step {
        Setup::Backend { id, addr, healthy } => Setup::Backend6 {
            id: *id,
            addr: ipv6_of(*addr),
            healthy: *healthy,
        },
        Setup::Service {
            id,
            port,
            proto,
            backends,
            snat,
            mss,
            mode,
        } => Setup::Service6 {
            id: *id,
            port: *port,
            proto: *proto,
            backends: backends.clone(),
            snat: snat.iter().map(|a| ipv6_of(*a)).collect(),
            mss: *mss,
            mode: *mode,
        },
        Setup::Flow(f) => Setup::Flow6(FlowSetup {
            cached: f.cached.map(twin_hop),
            ..f.clone()
        }),
        Setup::DnatFlow {
            cport,
            vport,
            backend,
        } => Setup::DnatFlow6 {
            cport: *cport,
            vport: *vport,
            backend: *backend,
        },
        Setup::DsrFlow {
            cport,
            backend,
            state,
        } => Setup::DsrFlow6 {
            cport: *cport,
            backend: *backend,
            state: *state,
        },
        Setup::Suspect { .. } | Setup::TsHighest(_) | Setup::HairpinTx => step.clone(),
        Setup::DnatFlow6 { .. }
        | Setup::DsrFlow6 { .. }
        | Setup::Bridge(_)
        | Setup::BridgePort { .. }
        | Setup::Backend6 { .. }
        | Setup::Service6 { .. }
        | Setup::Flow6(_) => return None,
    })
}

/// A cached next hop approved for an IPv4 packet, as for its twin: 20 bytes longer.
fn twin_hop(hop: CachedHop) -> CachedHop {
    CachedHop {
        ok_len: hop.ok_len + 20,
        ..hop
    }
}

/// The IPv6 twin of an IPv4 frame: the same Ethernet header and TCP or UDP segment, behind an
/// IPv6 header with the mapped addresses (the TOS as traffic class, the TTL as hop limit). The
/// L4 checksum moves to IPv6's pseudo header as an update (RFC 1624), so a checksum a fixture
/// made wrong stays wrong by as much. A fragment's twin has IPv6's fragment header after the
/// fixed one. `None` for what has no twin: not IPv4, IP options, neither TCP nor UDP, a UDP
/// datagram without checksum (IPv6 requires one), and packets near the MTU (their twin is 20
/// bytes longer, 28 for a fragment).
fn twin_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let ip = frame.get(14..)?;
    if frame[12..14] != [0x08, 0x00] || ip.len() < 20 || ip[0] != 0x45 {
        return None;
    }
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    let (proto, tot_len) = (ip[9], usize::from(u16::from_be_bytes([ip[2], ip[3]])));
    let check_at = match proto {
        TCP => 16,
        UDP => 6,
        _ => return None,
    };
    if !(20 + check_at + 2..=1400).contains(&tot_len) || tot_len > ip.len() {
        return None;
    }
    // A fragment's twin carries IPv6's fragment header: the same offset, M flag and
    // identification (widened); only a first fragment holds the L4 header.
    let (more, offset) = (frags & 0x2000 != 0, frags & 0x1fff);
    let fragment = (more || offset != 0).then(|| {
        let mut header = vec![proto, 0];
        header.extend(((offset << 3) | u16::from(more)).to_be_bytes());
        header.extend([0, 0, ip[4], ip[5]]);
        header
    });
    let (src, dst) = (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    );
    let mut l4 = ip[20..tot_len].to_vec();
    let (src6, dst6) = (ipv6_of(src), ipv6_of(dst));
    let mut twin = frame[..12].to_vec();
    twin.extend([0x86, 0xdd, 0x60 | (ip[1] >> 4), ip[1] << 4, 0, 0]);
    if let Some(header) = fragment.clone().filter(|_| offset != 0) {
        twin.extend(((header.len() + l4.len()) as u16).to_be_bytes());
        twin.extend([IPV6_FRAGMENT, ip[8]]);
        twin.extend(src6.octets());
        twin.extend(dst6.octets());
        twin.extend(header);
        twin.extend(l4);
        twin.extend(&ip[tot_len..]);
        return Some(twin);
    }
    let old = u16::from_be_bytes([l4[check_at], l4[check_at + 1]]);
    if proto == UDP && old == 0 {
        return None;
    }
    let words = |bytes: &[u8]| -> u32 {
        bytes
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum()
    };
    let fold = |mut sum: u32| {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    };
    // Both pseudo headers hold the protocol and the length; only the addresses differ.
    let removed = fold(words(&src.octets()) + words(&dst.octets()));
    let added = fold(words(&src6.octets()) + words(&dst6.octets()));
    let mut check = !fold(u32::from(!old) + u32::from(!removed) + u32::from(added));
    if proto == UDP && check == 0 {
        check = 0xffff;
    }
    l4[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    let header = fragment.unwrap_or_default();
    twin.extend(((header.len() + l4.len()) as u16).to_be_bytes());
    twin.extend([
        if header.is_empty() {
            proto
        } else {
            IPV6_FRAGMENT
        },
        ip[8],
    ]);
    twin.extend(src6.octets());
    twin.extend(dst6.octets());
    twin.extend(header);
    twin.extend(l4);
    twin.extend(&ip[tot_len..]);
    Some(twin)
}

fn twin_key(k: &FlowKey) -> FlowKey6 {
    let addr = |a: Be32| ipv6_of(Ipv4Addr::from(a.to_bytes()));
    key6(
        addr(k.src_addr),
        k.src_port.to_host(),
        addr(k.dst_addr),
        k.dst_port.to_host(),
        k.proto,
    )
}

fn twin_value(v: &FlowValue) -> FlowValue6 {
    let addr = |a: Be32| In6::from_bytes(ipv6_of(Ipv4Addr::from(a.to_bytes())).octets());
    FlowValue6 {
        nat_src_addr: addr(v.nat_src_addr),
        nat_dst_addr: addr(v.nat_dst_addr),
        nat_src_port: v.nat_src_port,
        nat_dst_port: v.nat_dst_port,
        backend_id: v.backend_id,
        flags: v.flags,
        egress_ifindex: v.egress_ifindex,
        last_seen_ns: v.last_seen_ns,
        src_mac: v.src_mac,
        dst_mac: v.dst_mac,
        fib_ok_len: v.fib_ok_len,
        egress_flags: v.egress_flags,
        seq_next: v.seq_next,
        state: v.state,
        ts_add: v.ts_add,
        snat_index: v.snat_index,
        mss: v.mss,
    }
}

/// The IPv6 twin of an IPv4 fixture of the XDP hook: its setup, frames and checks with every
/// address mapped by `ipv6_of`, expecting the same verdict, output, counters and flow state.
/// `None` where a part has no twin (see `twin_setup` and `twin_frame`), for a choice the data
/// path makes at random, and where the counters name what IPv4 alone does.
fn ipv6_twin(f: &Fixture) -> Option<Fixture> {
    let v4_only = |c: &(Counter, u64)| {
        matches!(
            c,
            (
                Counter::Pass(PassReason::NotIpv4 | PassReason::MalformedIpv4),
                _
            )
        )
    };
    // With several backends to choose from, the choice follows the family's flow hash.
    let chooses = |step: &Setup| match step {
        Setup::Service { backends, .. } => backends.iter().filter(|(_, w)| *w > 0).count() > 1,
        _ => false,
    };
    // A tunnel's outer headers are the family's own (`ipv6_tunnel_fixtures`).
    let tunnels = |step: &Setup| {
        matches!(step, Setup::Service { mode, .. }
            if [SERVICE_MODE_DSR_IPIP, SERVICE_MODE_DSR_GUE].contains(mode))
    };
    if f.or_else.is_some()
        || f.counters.iter().any(v4_only)
        || f.setup.iter().any(chooses)
        || f.setup.iter().any(tunnels)
    {
        return None;
    }
    let setup = f.setup.iter().map(twin_setup).collect::<Option<Vec<_>>>()?;
    let before = f
        .before
        .iter()
        .map(|(dev, frame)| Some((*dev, twin_frame(frame)?)))
        .collect::<Option<Vec<_>>>()?;
    let output = match &f.output {
        Some(frame) => Some(twin_frame(frame)?),
        None => None,
    };
    Some(Fixture {
        name: f.name,
        hook: f.hook,
        setup,
        settings: f.settings,
        before,
        ingress: f.ingress,
        input: twin_frame(&f.input)?,
        action: f.action,
        output,
        counters: f.counters.clone(),
        flows_after: vec![],
        flows6_after: f
            .flows_after
            .iter()
            .map(|(k, v)| (twin_key(k), v.as_ref().map(twin_value)))
            .collect(),
        next_hop_after: vec![],
        next_hop6_after: f
            .next_hop_after
            .iter()
            .map(|(k, hop)| (twin_key(k), hop.map(twin_hop)))
            .collect(),
        suspect_after: f.suspect_after.clone(),
        ts_highest_after: f.ts_highest_after,
        or_else: None,
    })
}

fn settings() -> LoadSettings {
    LoadSettings {
        maglev_size: MAGLEV_SIZE,
        flow_capacity: 4096,
        snat_port_min: PORT_MIN,
        snat_port_max: 29999,
        timeouts: FlowTimeouts::default(),
    }
}

/// A timeout for each class, one second apart, so that a fixture can show which one applied.
fn short_timeouts() -> FlowTimeouts {
    let s = Duration::from_secs;
    FlowTimeouts {
        tcp_syn: s(2),
        tcp_established: s(3),
        tcp_half_closed: s(4),
        tcp_closing: s(5),
        udp_unreplied: s(6),
        udp_replied: s(7),
    }
}

/// The SNAT range as one port, 31005: a new flow can only take that one.
/// A table of four entries (two connections) and three SNAT ports (31005-31007).
fn full_table() -> Option<LoadSettings> {
    Some(LoadSettings {
        flow_capacity: 4,
        snat_port_min: 31005,
        snat_port_max: 31007,
        ..settings()
    })
}

fn one_port() -> Option<LoadSettings> {
    Some(LoadSettings {
        snat_port_min: 31005,
        snat_port_max: 31005,
        ..settings()
    })
}

fn apply(dp: &mut Dataplane, setup: &[Setup]) {
    for step in setup {
        match step {
            Setup::Backend { id, addr, healthy } => {
                dp.set_backend(*id, SocketAddrV4::new(*addr, BACKEND_PORT), *healthy)
                    .expect("set backend");
            }
            Setup::Service {
                id,
                port,
                proto,
                backends,
                snat,
                mss,
                mode,
            } => {
                let key = service_key(*port, *proto);
                let table = table_for(backends);
                assert!(
                    backends.iter().all(|b| b.1 == 0) == table.iter().all(|&s| s == NO_BACKEND)
                );
                let snat: Vec<IpAddr> = snat.iter().map(|&a| a.into()).collect();
                dp.set_service(*id, key, *mode, &snat, *mss, &table)
                    .expect("set service");
            }
            Setup::Flow(f) => {
                let vport = if f.proto == TCP { WEB_PORT } else { DNS_PORT };
                let seen = f.seen_ago_ns.map_or(0, |ago| monotonic_ns() - ago);
                let via = (SNAT_POOL[f.snat_index as usize], f.snat_index);
                for (k, v) in flow_pair_via(f.proto, f.cport, vport, f.backend, via, f.snat_port) {
                    let v = set_up_entry(f, v, seen);
                    let reply = v.flags & FLOW_REVERSE != 0;
                    dp.insert_flow(k, v).expect("insert flow");
                    if reply {
                        // As the data path marks the port it takes.
                        dp.mark_snat_port(f.backend, f.snat_index, f.snat_port)
                            .expect("mark SNAT port");
                    }
                }
            }
            Setup::Backend6 { id, addr, healthy } => {
                dp.set_backend(*id, SocketAddrV6::new(*addr, BACKEND_PORT, 0, 0), *healthy)
                    .expect("set backend");
            }
            Setup::Service6 {
                id,
                port,
                proto,
                backends,
                snat,
                mss,
                mode,
            } => {
                let key = service_key6(*port, *proto);
                let snat: Vec<IpAddr> = snat.iter().map(|&a| a.into()).collect();
                dp.set_service(*id, key, *mode, &snat, *mss, &table_for(backends))
                    .expect("set service");
            }
            Setup::Flow6(f) => {
                let vport = if f.proto == TCP { WEB_PORT } else { DNS_PORT };
                let seen = f.seen_ago_ns.map_or(0, |ago| monotonic_ns() - ago);
                let via = (SNAT_POOL[f.snat_index as usize], f.snat_index);
                for (k, v) in flow_pair_via(f.proto, f.cport, vport, f.backend, via, f.snat_port) {
                    let (k, v) = (twin_key(&k), set_up_entry(f, twin_value(&v), seen));
                    dp.insert_flow6(k, v).expect("insert flow");
                    if v.flags & FLOW_REVERSE != 0 {
                        dp.mark_snat_port(f.backend, f.snat_index, f.snat_port)
                            .expect("mark SNAT port");
                    }
                }
            }
            Setup::DnatFlow {
                cport,
                vport,
                backend,
            } => {
                for (k, mut v) in dnat_pair(*cport, *vport, *backend) {
                    v.seq_next = 1000;
                    v.last_seen_ns = monotonic_ns();
                    dp.insert_flow(k, v).expect("insert flow");
                }
            }
            Setup::DnatFlow6 {
                cport,
                vport,
                backend,
            } => {
                for (k, mut v) in dnat_pair(*cport, *vport, *backend) {
                    v.seq_next = 1000;
                    v.last_seen_ns = monotonic_ns();
                    dp.insert_flow6(twin_key(&k), twin_value(&v))
                        .expect("insert flow");
                }
            }
            Setup::DsrFlow {
                cport,
                backend,
                state,
            } => {
                let (k, mut v) = dsr_entry(TCP, *cport, *backend);
                v.state = *state;
                v.seq_next = if *state == TCP_SYN_SENT { 1001 } else { 1000 };
                v.last_seen_ns = monotonic_ns();
                dp.insert_flow(k, v).expect("insert flow");
            }
            Setup::DsrFlow6 {
                cport,
                backend,
                state,
            } => {
                let (k, mut v) = dsr_entry(TCP, *cport, *backend);
                v.state = *state;
                v.seq_next = if *state == TCP_SYN_SENT { 1001 } else { 1000 };
                v.last_seen_ns = monotonic_ns();
                dp.insert_flow6(twin_key(&k), twin_value(&v))
                    .expect("insert flow");
            }
            Setup::Suspect { backend, ago_ns } => {
                dp.set_suspect(*backend, monotonic_ns() - ago_ns)
                    .expect("mark suspect");
            }
            Setup::TsHighest(value) => {
                dp.set_ts_highest(*value).expect("set TS_HIGH");
            }
            Setup::Bridge(dev) => {
                dp.add_bridge(ifindex(dev).expect(dev))
                    .expect("bridge iface");
            }
            Setup::BridgePort { port, bridge } => {
                let port = ifindex(port).expect("port");
                let bridge = ifindex(bridge).expect("bridge");
                dp.set_bridge_ports(&[(port, bridge)]).expect("bridge port");
            }
            Setup::HairpinTx => {
                dp.add_interface(ifindex("lb1").expect("lb1"), true)
                    .expect("hairpin iface");
            }
        }
    }
}

/// An entry `v` of the flow `f` sets up, as its state makes it: sequence tracking, when it was
/// seen (`seen`; a half-open flow's reply entry never), FINs and timestamp translation.
fn set_up_entry<A>(f: &FlowSetup, mut v: FlowValueOf<A>, seen: u64) -> FlowValueOf<A> {
    let reply = v.flags & FLOW_REVERSE != 0;
    v.state = f.state;
    v.seq_next = 1000;
    v.last_seen_ns = seen;
    if f.state == TCP_SYN_SENT || f.state == UDP_UNREPLIED {
        v.seq_next = if reply { 0 } else { 1001 };
        if reply {
            v.last_seen_ns = 0;
        }
    }
    let fin_sent = if reply { f.fin_sent.1 } else { f.fin_sent.0 };
    if fin_sent {
        v.flags |= FLOW_FIN_SENT;
    }
    if !f.syn_well_formed {
        v.flags &= !FLOW_SYN_WELL_FORMED;
    }
    if let Some(add) = f.ts_add {
        v.flags |= FLOW_TS;
        v.ts_add = if reply { add.wrapping_neg() } else { add };
    }
    v.mss = f.mss;
    if let Some(hop) = f.cached
        && v.flags & FLOW_REVERSE == 0
    {
        v.egress_ifindex = ifindex(hop.iface).expect("cached hop's device");
        v.src_mac = hop.src;
        v.dst_mac = hop.dst;
        v.fib_ok_len = hop.ok_len;
    }
    with_end_counted(v)
}

/// The next hop cached in `v`, named by device.
fn cached_hop<A>(v: &FlowValueOf<A>) -> Option<CachedHop> {
    if v.egress_ifindex == 0 {
        return None;
    }
    let iface = ["lb0", "lb1", "br0"]
        .into_iter()
        .find(|d| ifindex(d).ok() == Some(v.egress_ifindex))
        .unwrap_or("unknown device");
    Some(CachedHop {
        iface,
        src: v.src_mac,
        dst: v.dst_mac,
        ok_len: v.fib_ok_len,
    })
}

fn read(dp: &Dataplane, counter: Counter) -> u64 {
    let reasons = dp.reason_counters().expect("read counters");
    match counter {
        Counter::Pass(r) => reasons
            .pass
            .iter()
            .find(|(p, _)| *p == r)
            .map_or(0, |x| x.1),
        Counter::Drop(r) => reasons
            .drop
            .iter()
            .find(|(d, _)| *d == r)
            .map_or(0, |x| x.1),
        Counter::Tx => reasons.tx,
        Counter::Redirect => reasons.redirect,
        Counter::NewFlows(id) => dp.backend_stats(id).expect("backend stats").new_flows,
        Counter::Packets(id) => dp.backend_stats(id).expect("backend stats").packets,
        Counter::Opened(id) => dp.flow_counts(id).expect("flow counts").opened,
        Counter::Ended(id) => dp.flow_counts(id).expect("flow counts").ended,
        Counter::Released(id) => dp.flow_counts(id).expect("flow counts").released,
        Counter::Event(name) => {
            reasons
                .events
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("no event {name}"))
                .1
        }
    }
}

fn run(f: &Fixture) -> Result<(), String> {
    let mut dp =
        Dataplane::load(f.settings.unwrap_or_else(settings)).map_err(|e| format!("load: {e}"))?;
    for dev in ["lb0", "lb1"] {
        dp.add_interface(ifindex(dev).map_err(|e| e.to_string())?, false)
            .map_err(|e| e.to_string())?;
    }
    apply(&mut dp, &f.setup);
    for (device, frame) in &f.before {
        let ingress = ifindex(device).map_err(|e| e.to_string())?;
        match f.hook {
            Hook::Xdp => dp.test_run(frame, ingress, 1),
            Hook::Tc => dp.tc_test_run(frame, ingress, 1),
        }
        .map_err(|e| format!("test run of a frame before: {e}"))?;
    }
    let before: Vec<u64> = f.counters.iter().map(|(c, _)| read(&dp, *c)).collect();
    let ingress = ifindex(f.ingress).map_err(|e| e.to_string())?;
    let run = match f.hook {
        Hook::Xdp => dp.test_run(&f.input, ingress, 1),
        Hook::Tc => dp.tc_test_run(&f.input, ingress, 1),
    }
    .map_err(|e| format!("test run: {e}"))?;
    let (action, out) = (run.action, run.frame);
    let mut errors = Vec::new();
    if action != f.action {
        errors.push(format!("action {action}, expected {}", f.action));
    }
    let expected = f.output.as_ref().unwrap_or(&f.input);
    let outcome = |expected: &[u8], flows_after: &[(FlowKey, Option<FlowValue>)]| {
        let mut errors = Vec::new();
        if out != *expected {
            errors.push(format!("output differs:\n{}", diff(expected, &out)));
        }
        for (k, want) in flows_after {
            let got = dp.flow(k).map(|v| FlowValue {
                last_seen_ns: 0,
                seq_next: 0,
                egress_ifindex: 0,
                src_mac: [0; 6],
                dst_mac: [0; 6],
                fib_ok_len: 0,
                egress_flags: 0,
                ..v
            });
            if got != *want {
                errors.push(format!("FLOWS[{k:?}] is {got:?}, expected {want:?}"));
            }
        }
        errors
    };
    let mut outcome_errors = outcome(expected, &f.flows_after);
    for (k, want) in &f.flows6_after {
        let got = dp.flow6(k).map(|v| FlowValue6 {
            last_seen_ns: 0,
            seq_next: 0,
            egress_ifindex: 0,
            src_mac: [0; 6],
            dst_mac: [0; 6],
            fib_ok_len: 0,
            egress_flags: 0,
            ..v
        });
        if got != *want {
            outcome_errors.push(format!("FLOWS6[{k:?}] is {got:?}, expected {want:?}"));
        }
    }
    if let Some((output, flows_after)) = &f.or_else
        && !outcome_errors.is_empty()
        && outcome(output, flows_after).is_empty()
    {
        outcome_errors.clear();
    }
    errors.extend(outcome_errors);
    // A rewrite keeps a wrong checksum wrong: only a correct input promises a correct output.
    if f.output.is_some()
        && verify_checksums(&f.input).is_ok()
        && let Err(e) = verify_checksums(&out)
    {
        errors.push(format!("checksums of the output: {e}"));
    }
    for ((counter, delta), before) in f.counters.iter().zip(before) {
        let after = read(&dp, *counter);
        if after - before != *delta {
            errors.push(format!(
                "counter {counter:?} moved by {}, expected {delta}",
                after - before
            ));
        }
    }
    for (k, want) in &f.next_hop6_after {
        let got = dp.flow6(k).as_ref().and_then(cached_hop);
        if got != *want {
            errors.push(format!(
                "next hop cached in FLOWS6[{k:?}] is {got:?}, expected {want:?}"
            ));
        }
    }
    for (k, want) in &f.next_hop_after {
        let got = dp.flow(k).as_ref().and_then(cached_hop);
        if got != *want {
            errors.push(format!(
                "next hop cached in FLOWS[{k:?}] is {got:?}, expected {want:?}"
            ));
        }
    }
    if let Some(want) = f.ts_highest_after {
        let got = dp.ts_highest().expect("read TS_HIGH");
        if got != want {
            errors.push(format!("TS_HIGH is {got}, expected {want}"));
        }
    }
    for &(id, want) in &f.suspect_after {
        let got = dp.suspect_since(id).expect("read SUSPECT").is_some();
        if got != want {
            errors.push(format!("backend {id} suspect is {got}, expected {want}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "input {}\n  {}",
            describe(&f.input),
            errors.join("\n  ")
        ))
    }
}

#[test]
fn packet_fixtures() {
    require_root();
    sweep_stale();
    let ns = topology();
    let outcome = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let fixtures = fixtures();
            let failures: Vec<String> = fixtures
                .iter()
                .filter_map(|f| run(f).err().map(|e| format!("{}: {e}", f.name)))
                .collect();
            (fixtures.len(), failures)
        })
        .join()
        .expect("fixture thread panicked");
    let (total, failures) = outcome;
    assert!(
        failures.is_empty(),
        "{} of {total} fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{total} packet fixtures passed");
}

/// Every IPv4 fixture that has an IPv6 twin (`ipv6_twin`), run as IPv6: the same verdict,
/// output frame, counters and flow state, from one table.
#[test]
fn ipv6_twins_of_the_ipv4_fixtures() {
    require_root();
    sweep_stale();
    let ns = topology();
    let (total, failures) = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let twins: Vec<Fixture> = fixtures().iter().filter_map(ipv6_twin).collect();
            let failures: Vec<String> = twins
                .iter()
                .filter_map(|f| run(f).err().map(|e| format!("{} (IPv6 twin): {e}", f.name)))
                .collect();
            (twins.len(), failures)
        })
        .join()
        .expect("fixture thread panicked");
    assert!(
        total >= TWINS_AT_LEAST,
        "only {total} IPv4 fixtures have an IPv6 twin, expected {TWINS_AT_LEAST} or more"
    );
    assert!(
        failures.is_empty(),
        "{} of {total} IPv6 twins failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{total} IPv6 twins of IPv4 fixtures passed");
}

#[test]
fn ipv6_packet_fixtures() {
    require_root();
    sweep_stale();
    let ns = topology();
    let (total, failures) = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let fixtures = ipv6_fixtures();
            let failures: Vec<String> = fixtures
                .iter()
                .filter_map(|f| run(f).err().map(|e| format!("{}: {e}", f.name)))
                .collect();
            (fixtures.len(), failures)
        })
        .join()
        .expect("fixture thread panicked");
    assert!(
        failures.is_empty(),
        "{} of {total} IPv6 fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{total} IPv6 packet fixtures passed");
}

/// The echo replies and the ICMP errors a CPU sends in a second stop at their budgets, each
/// its own: a flood of either is cut to 1,000 a second, and one does not spend the other's.
#[test]
fn icmp_answers_stop_at_the_cpu_budget() {
    require_root();
    sweep_stale();
    let ns = topology();
    let counts = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let mut dp = Dataplane::load(settings()).expect("load");
            for dev in ["lb0", "lb1"] {
                dp.add_interface(ifindex(dev).expect(dev), false)
                    .expect("add interface");
            }
            apply(
                &mut dp,
                &with(backends(), &[web(&[(1, 1)]), flow(40501, 1, 20501, None)]),
            );
            let ping = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .icmp(8, 0, [0, 1, 0, 1])
                .build();
            let error = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(ROUTER, VIP)
                .icmp(3, 4, FRAG_NEEDED_1400)
                .payload(&quote(&to_client(40501).ack().build(), 40))
                .build();
            let lb0 = ifindex("lb0").expect("lb0");
            // Well inside one second: a test run takes microseconds.
            for frame in [&ping, &error] {
                for _ in 0..ICMP_ERRORS_PER_SEC_PER_CPU + 200 {
                    dp.test_run(frame, lb0, 1).expect("test run");
                }
            }
            [
                read(&dp, Counter::Event("icmp_echo_replied")),
                read(&dp, Counter::Drop(DropReason::IcmpEchoLimited)),
                read(&dp, Counter::Event("icmp_error_to_backend")),
                read(&dp, Counter::Drop(DropReason::IcmpErrorLimited)),
            ]
        })
        .join()
        .expect("budget thread panicked");
    assert_eq!(
        counts,
        [
            u64::from(ECHO_REPLIES_PER_SEC_PER_CPU),
            200,
            u64::from(ICMP_ERRORS_PER_SEC_PER_CPU),
            200
        ]
    );
}

/// The RSTs a CPU sends in a second stop at its budget; the segments past it are dropped and
/// counted, so a flood of flowless segments cannot turn the balancer into a reflector.
#[test]
fn resets_stop_at_the_cpu_budget() {
    require_root();
    sweep_stale();
    let ns = topology();
    let (resets, silent) = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let mut dp = Dataplane::load(settings()).expect("load");
            for dev in ["lb0", "lb1"] {
                dp.add_interface(ifindex(dev).expect(dev), false)
                    .expect("add interface");
            }
            apply(&mut dp, &with(backends(), &[web(&[(1, 1)])]));
            let ack = client_syn(40500).tcp_flags(TCP_ACK).build();
            let lb0 = ifindex("lb0").expect("lb0");
            // Well inside one second: a test run takes microseconds.
            for _ in 0..RESETS_PER_SEC_PER_CPU + 200 {
                dp.test_run(&ack, lb0, 1).expect("test run");
            }
            (
                read(&dp, Counter::Event("reset_no_flow")),
                read(&dp, Counter::Drop(DropReason::TcpNoFlow)),
            )
        })
        .join()
        .expect("budget thread panicked");
    assert_eq!(resets, u64::from(RESETS_PER_SEC_PER_CPU));
    assert_eq!(silent, 200);
}

/// Without any packet or daemon, the kernel's expiry timer removes each timeout class's
/// connections once past it (both entries), keeps those inside it, judges a connection by its
/// more recent direction, and removes a reply entry without its forward entry after a pass of
/// grace.
#[test]
fn the_kernel_expires_every_timeout_class_without_traffic() {
    require_root();
    sweep_stale();
    let ns = topology();
    ns.spawn_inside(|| {
        let settings = LoadSettings {
            timeouts: short_timeouts(),
            ..settings()
        };
        let mut dp = Dataplane::load(settings).expect("load");
        apply(&mut dp, &backends());
        let secs = |s: u64| s * 1_000_000_000;
        // (state, protocol, timeout): one connection just past it, one a second and more inside
        // it when the first pass runs (a second after arming).
        let classes = [
            (TCP_SYN_SENT, TCP, 2),
            (TCP_ESTABLISHED, TCP, 3),
            (TCP_FIN_WAIT, TCP, 4),
            (TCP_TIME_WAIT, TCP, 5),
            (UDP_UNREPLIED, UDP, 6),
            (UDP_REPLIED, UDP, 7),
        ];
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for (i, &(state, proto, timeout)) in classes.iter().enumerate() {
            let i = i as u16;
            for (past, port) in [(true, 41000 + i), (false, 42000 + i)] {
                let ago = if past {
                    secs(timeout)
                } else {
                    secs(timeout - 2)
                };
                let mut f = flow_in(state, port, 1, port - 10000, Some(ago));
                f.proto = proto;
                apply(&mut dp, &[Setup::Flow(f)]);
                let vport = if proto == TCP { WEB_PORT } else { DNS_PORT };
                let keys = flow_pair(proto, port, vport, 1, port - 10000).map(|(k, _)| k);
                if past { &mut doomed } else { &mut kept }.extend(keys.map(|k| (state, k)));
            }
        }
        // Silent for 10 s from the client, but the backend spoke a moment ago: it stays.
        apply(
            &mut dp,
            &[Setup::Flow(flow_in(
                TCP_ESTABLISHED,
                43000,
                1,
                33000,
                Some(secs(10)),
            ))],
        );
        let [(fwd, _), (reply_key, _)] = flow_pair(TCP, 43000, WEB_PORT, 1, 33000);
        let mut reply = dp.flow(&reply_key).expect("reply entry");
        reply.last_seen_ns = monotonic_ns();
        dp.insert_flow(reply_key, reply).expect("refresh the reply");
        kept.extend([(TCP_ESTABLISHED, fwd), (TCP_ESTABLISHED, reply_key)]);
        // A reply entry whose forward entry is gone, silent for its state's timeout (the pass
        // looks for a missing forward entry only then).
        let [(orphan_fwd, _), (orphan, _)] = flow_pair(TCP, 44000, WEB_PORT, 1, 34000);
        apply(
            &mut dp,
            &[Setup::Flow(flow_in(
                TCP_ESTABLISHED,
                44000,
                1,
                34000,
                Some(secs(3)),
            ))],
        );
        dp.remove_flow(&orphan_fwd)
            .expect("remove the forward entry");

        dp.arm_expiry().expect("arm the expiry timer");
        std::thread::sleep(Duration::from_millis(1500));
        for (state, k) in &doomed {
            assert_eq!(dp.flow(k), None, "state {state} past its timeout: {k:?}");
        }
        for (state, k) in &kept {
            assert!(
                dp.flow(k).is_some(),
                "state {state} inside its timeout: {k:?}"
            );
        }
        assert!(
            dp.flow(&orphan).is_some(),
            "an orphan gets one pass of grace"
        );
        // Counted now: by the second pass, the kept connections are past their timeouts too.
        assert_eq!(read(&dp, Counter::Event("expired_in_kernel")), 6);
        // Six forward entries went; the time-wait one's end was counted when it ended.
        assert_eq!(read(&dp, Counter::Released(1)), 6);
        assert_eq!(read(&dp, Counter::Ended(1)), 5);
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(dp.flow(&orphan), None, "an orphan goes at the second pass");
        assert!(read(&dp, Counter::Event("expired_in_kernel")) > 6);
        // Arming again (a new daemon) takes the running timer over.
        dp.arm_expiry().expect("arm again");
    })
    .join()
    .expect("expiry thread panicked");
}

/// 20,000 new connections to one backend, all from one CPU, with the default SNAT range
/// (22,768 ports): every one gets a port of its own, none is dropped as exhausted. (The
/// allocator before the port bitmaps walked each CPU's share of the range, 8 tries at a time,
/// and dropped about 3,000 of them.)
#[test]
fn twenty_thousand_new_flows_to_one_backend_on_one_cpu_all_get_a_port() {
    require_root();
    sweep_stale();
    let ns = topology();
    let (new_flows, exhausted, ports) = ns
        .spawn_inside(|| {
            pin_current_thread_to_cpu0();
            let mut dp = Dataplane::load(LoadSettings {
                flow_capacity: 65_536,
                snat_port_min: 10_000,
                snat_port_max: 32_767,
                ..settings()
            })
            .expect("load");
            for dev in ["lb0", "lb1"] {
                dp.add_interface(ifindex(dev).expect(dev), false)
                    .expect("add interface");
            }
            apply(&mut dp, &with(backends(), &[web(&[(1, 1)])]));
            let lb0 = ifindex("lb0").expect("lb0");
            // Client ports above the range: none is kept as the client's own.
            for cport in 33_000..53_000u16 {
                dp.test_run(&client_syn(cport).build(), lb0, 1)
                    .expect("test run");
            }
            let ports: std::collections::HashSet<u16> = dp
                .flow_entries()
                .expect("read FLOWS")
                .iter()
                .filter(|(_, v)| v.flags & FLOW_REVERSE != 0)
                .map(|(k, _)| k.dst_port.to_host())
                .collect();
            (
                read(&dp, Counter::NewFlows(1)),
                read(&dp, Counter::Drop(DropReason::SnatPortsExhausted)),
                ports.len(),
            )
        })
        .join()
        .expect("allocator thread panicked");
    assert_eq!(exhausted, 0, "new flows dropped as exhausted");
    assert_eq!((new_flows, ports), (20_000, 20_000));
}
