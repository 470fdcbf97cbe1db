//! Packet fixtures: the real lb-ebpf object run through BPF_PROG_TEST_RUN. Each fixture states
//! its whole map pre-state, the input frame, the expected XDP action, the expected output frame
//! (compared whole) and the counter deltas. The program is loaded afresh for every fixture, so
//! no state leaks between them.
//!
//! FIB lookups inside a test run use the caller's namespace: the test thread enters a namespace
//! with two veth pairs, addresses and permanent neighbour entries, and is pinned to CPU 0 so
//! that the SNAT port sequence is predictable.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    DropReason, FLOW_CLOSING, FLOW_REVERSE, FlowKey, FlowValue, NO_BACKEND, PassReason, flow_hash,
};
use lb_tests::{
    fixture_net::{
        B1, B1_MAC, B2, B2_MAC, B3, BACKEND_PORT, CACHED_MAC, CLIENT, CLIENT_MAC, DNS_PORT,
        LB0_MAC, LB1_MAC, MAGLEV_SIZE, OTHER, PORT_MIN, SNAT, TCP, UDP, VIP, WEB_PORT, XDP_DROP,
        XDP_PASS, XDP_REDIRECT, XDP_TX, service_key, topology,
    },
    flows::{key, monotonic_ns, value},
    netns::{pin_current_thread_to_cpu0, require_root, sweep_stale},
    packet::{Mac, PacketBuilder, describe, diff, pkt, verify_checksums},
};
use lb_user::{
    dataplane::{Dataplane, LoadSettings, ifindex},
    maglev::{MaglevBackend, build_table},
};

/// Map state a fixture starts from.
#[derive(Clone)]
enum Setup {
    Backend {
        id: u32,
        addr: Ipv4Addr,
        healthy: bool,
    },
    /// A service and its Maglev table built from `(backend id, weight)`.
    Service {
        id: u32,
        port: u16,
        proto: u8,
        backends: Vec<(u32, u32)>,
    },
    /// Both directions of a TCP flow client:cport -> VIP:80 via SNAT:snat_port to backend.
    Flow {
        cport: u16,
        backend: u32,
        snat_port: u16,
        closing: bool,
        /// A next hop cached in the forward entry (egress lb1), and a fresh `last_seen_ns`.
        cached: Option<CachedHop>,
    },
    /// Marks lb1 as a NIC where XDP_TX is used for hairpin traffic.
    HairpinTx,
    /// The reply entry of a flow has seen a packet: the backend answered.
    Answered { backend: u32, snat_port: u16 },
    /// The data path marked `backend` suspect `ago_ns` before the run.
    Suspect { backend: u32, ago_ns: u64 },
}

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
}

struct Fixture {
    name: &'static str,
    setup: Vec<Setup>,
    settings: Option<LoadSettings>,
    ingress: &'static str,
    input: Vec<u8>,
    action: u32,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
    counters: Vec<(Counter, u64)>,
    /// Checks on FLOWS after the run (timestamps and cached next hops aside).
    flows_after: Vec<(FlowKey, Option<FlowValue>)>,
    /// The next hop cached in an entry after the run (`None`: nothing cached).
    next_hop_after: Vec<(FlowKey, Option<CachedHop>)>,
    /// Whether a backend is marked suspect after the run.
    suspect_after: Vec<(u32, bool)>,
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
    }
}

fn dns(backends: &[(u32, u32)]) -> Setup {
    Setup::Service {
        id: 1,
        port: DNS_PORT,
        proto: UDP,
        backends: backends.to_vec(),
    }
}

/// An open TCP flow CLIENT:cport -> VIP:80 on `backend` via SNAT port `snat_port`.
fn flow(cport: u16, backend: u32, snat_port: u16, cached: Option<CachedHop>) -> Setup {
    Setup::Flow {
        cport,
        backend,
        snat_port,
        closing: false,
        cached,
    }
}

/// As `flow`, after a FIN or RST.
fn closed_flow(cport: u16, backend: u32, snat_port: u16, cached: Option<CachedHop>) -> Setup {
    Setup::Flow {
        cport,
        backend,
        snat_port,
        closing: true,
        cached,
    }
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
    let b = addr_of(backend);
    [
        (
            key(CLIENT, cport, VIP, vport, proto),
            value(SNAT, snat_port, b, BACKEND_PORT, backend, 0),
        ),
        (
            key(b, BACKEND_PORT, SNAT, snat_port, proto),
            value(VIP, vport, CLIENT, cport, backend, FLOW_REVERSE),
        ),
    ]
}

/// The backend the data path's Maglev lookup picks for client port `cport`.
fn maglev_choice(backends: &[(u32, u32)], cport: u16, vport: u16, proto: u8) -> u32 {
    let table = table_for(backends);
    let k = key(CLIENT, cport, VIP, vport, proto);
    let h = flow_hash(
        k.src_addr.0,
        k.dst_addr.0,
        k.src_port.0,
        k.dst_port.0,
        k.proto,
    );
    table[(h % MAGLEV_SIZE) as usize]
}

fn table_for(backends: &[(u32, u32)]) -> Vec<u32> {
    let list: Vec<MaglevBackend> = backends
        .iter()
        .map(|&(id, weight)| MaglevBackend {
            id,
            addr: SocketAddrV4::new(addr_of(id), BACKEND_PORT),
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
        setup,
        settings: None,
        ingress: "lb0",
        input,
        action,
        output,
        counters,
        flows_after: vec![],
        next_hop_after: vec![],
        suspect_after: vec![],
    }
}

fn fixtures() -> Vec<Fixture> {
    let weighted = [(1, 4), (2, 6)];
    let mut list = vec![
        Fixture {
            flows_after: flow_pair(TCP, 40000, WEB_PORT, 1, PORT_MIN)
                .map(|(k, v)| (k, Some(v)))
                .to_vec(),
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
                "flow_unhealthy_backend_rebalanced_to_healthy",
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
                    flow(40005, 1, 31002, None),
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
                    &[web(&[(1, 1), (2, 1)]), flow(40040, 1, 31040, None)],
                ),
                from_backend(1, 31040).tcp_flags(0x14).build(),
                XDP_DROP,
                None,
                vec![
                    (Counter::Drop(DropReason::BackendRefused), 1),
                    (Counter::Event("suspect_refused"), 1),
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
                        flow(40044, 1, 31044, Some(hop(B1_MAC, 1500))),
                    ],
                ),
                from_backend(1, 31044).tcp_flags(0x14).build(),
                XDP_REDIRECT,
                Some(to_client(40044).tcp_flags(0x14).build()),
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
                    &[
                        web(&[(1, 1), (2, 1)]),
                        flow(40041, 1, 31041, None),
                        Setup::Answered {
                            backend: 1,
                            snat_port: 31041,
                        },
                    ],
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
                        &[web(&[(1, 1), (2, 1)]), flow(cport, 1, 31042, None)],
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
        // A SYN again too soon to be a retransmission (a duplicate): same backend, no mark.
        {
            let cport = port_choosing(1, &[(1, 1), (2, 1)], 40200);
            Fixture {
                suspect_after: vec![(1, false)],
                ..fixture(
                    "failover_duplicate_syn_too_soon_stays_on_its_backend",
                    with(
                        backends(),
                        &[
                            web(&[(1, 1), (2, 1)]),
                            flow(cport, 1, 31043, Some(hop(B1_MAC, 1500))),
                        ],
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
                client_syn(40045).tcp_flags(0x10).build(),
                XDP_DROP,
                None,
                vec![(Counter::Drop(DropReason::TcpNoFlow), 1)],
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
            flows_after: vec![(
                key(CLIENT, 40007, VIP, WEB_PORT, TCP),
                Some(value(SNAT, 31004, B1, BACKEND_PORT, 1, FLOW_CLOSING)),
            )],
            ..fixture(
                "flow_fin_forwarded_and_marks_closing",
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
            "select_tcp_ack_without_flow_dropped",
            with(backends(), &[web(&[(1, 1)])]),
            client_syn(40008).tcp_flags(0x10).build(),
            XDP_DROP,
            None,
            vec![
                (Counter::Drop(DropReason::TcpNoFlow), 1),
                (Counter::NewFlows(1), 0),
            ],
        ),
        fixture(
            "select_no_backend_with_weight_dropped",
            with(backends(), &[web(&[(1, 0), (2, 0)])]),
            client_syn(40009).build(),
            XDP_DROP,
            None,
            vec![(Counter::Drop(DropReason::NoBackend), 1)],
        ),
        Fixture {
            settings: Some(LoadSettings {
                snat_port_min: 31005,
                snat_port_max: 31005,
                ..settings()
            }),
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
            settings: Some(LoadSettings {
                snat_port_min: 31005,
                snat_port_max: 31005,
                ..settings()
            }),
            flows_after: vec![
                (key(CLIENT, 40030, VIP, WEB_PORT, TCP), None),
                (
                    key(B1, BACKEND_PORT, SNAT, 31005, TCP),
                    Some(value(VIP, WEB_PORT, CLIENT, 40031, 1, FLOW_REVERSE)),
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
            settings: Some(LoadSettings {
                snat_port_min: 31005,
                snat_port_max: 31005,
                ..settings()
            }),
            flows_after: vec![(
                key(CLIENT, 40032, VIP, WEB_PORT, TCP),
                Some(value(SNAT, 31005, B1, BACKEND_PORT, 1, FLOW_CLOSING)),
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
                Some(value(VIP, WEB_PORT, CLIENT, 25000, 1, FLOW_REVERSE)),
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
        fixture(
            "parse_ipv6_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ethertype(0x86dd)
                .payload(&[0x60; 60])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotIpv4), 1)],
        ),
        fixture(
            "parse_icmp_to_vip_passed_untouched",
            with(backends(), &[web(&[(1, 1)])]),
            pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(CLIENT, VIP)
                .ip_proto(1)
                .payload(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
                .build(),
            XDP_PASS,
            None,
            vec![(Counter::Pass(PassReason::NotTcpUdp), 1)],
        ),
        fixture(
            "parse_first_fragment_to_vip_passed_untouched",
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

fn settings() -> LoadSettings {
    LoadSettings {
        maglev_size: MAGLEV_SIZE,
        flow_capacity: 4096,
        snat_port_min: PORT_MIN,
        snat_port_max: 29999,
    }
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
            } => {
                let key = service_key(*port, *proto);
                let table = table_for(backends);
                assert!(
                    backends.iter().all(|b| b.1 == 0) == table.iter().all(|&s| s == NO_BACKEND)
                );
                dp.set_service(*id, key, SNAT, &table).expect("set service");
            }
            Setup::Flow {
                cport,
                backend,
                snat_port,
                closing,
                cached,
            } => {
                for (k, mut v) in flow_pair(TCP, *cport, WEB_PORT, *backend, *snat_port) {
                    if *closing {
                        v.flags |= FLOW_CLOSING;
                    }
                    if let Some(hop) = cached
                        && v.flags & FLOW_REVERSE == 0
                    {
                        v.last_seen_ns = monotonic_ns();
                        v.egress_ifindex = ifindex(hop.iface).expect("cached hop's device");
                        v.src_mac = hop.src;
                        v.dst_mac = hop.dst;
                        v.fib_ok_len = hop.ok_len;
                    }
                    dp.insert_flow(k, v).expect("insert flow");
                }
            }
            Setup::Answered { backend, snat_port } => {
                let k = key(addr_of(*backend), BACKEND_PORT, SNAT, *snat_port, TCP);
                let mut v = dp.flow(&k).expect("the reply entry to mark answered");
                v.last_seen_ns = monotonic_ns();
                dp.insert_flow(k, v).expect("mark answered");
            }
            Setup::Suspect { backend, ago_ns } => {
                dp.set_suspect(*backend, monotonic_ns() - ago_ns)
                    .expect("mark suspect");
            }
            Setup::HairpinTx => {
                dp.add_interface(ifindex("lb1").expect("lb1"), true)
                    .expect("hairpin iface");
            }
        }
    }
}

/// The next hop cached in `v`, named by device.
fn cached_hop(v: &FlowValue) -> Option<CachedHop> {
    if v.egress_ifindex == 0 {
        return None;
    }
    let iface = ["lb0", "lb1"]
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
    let before: Vec<u64> = f.counters.iter().map(|(c, _)| read(&dp, *c)).collect();
    let ingress = ifindex(f.ingress).map_err(|e| e.to_string())?;
    let run = dp
        .test_run(&f.input, ingress, 1)
        .map_err(|e| format!("test run: {e}"))?;
    let (action, out) = (run.action, run.frame);
    let mut errors = Vec::new();
    if action != f.action {
        errors.push(format!("action {action}, expected {}", f.action));
    }
    let expected = f.output.as_ref().unwrap_or(&f.input);
    if out != *expected {
        errors.push(format!("output differs:\n{}", diff(expected, &out)));
    }
    if f.output.is_some()
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
    for (k, want) in &f.flows_after {
        let got = dp.flow(k).map(|v| FlowValue {
            last_seen_ns: 0,
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
    for (k, want) in &f.next_hop_after {
        let got = dp.flow(k).as_ref().and_then(cached_hop);
        if got != *want {
            errors.push(format!(
                "next hop cached in FLOWS[{k:?}] is {got:?}, expected {want:?}"
            ));
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
