//! Part 1 of the benchmark: the XDP program alone, through BPF_PROG_TEST_RUN, with the
//! connection table at several fill levels. Also times the daemon's read of the connection counts.
//!
//! A test run does not restore the frame between repeats, so a rewriting path is repeated with a
//! "ping-pong" pair of flow entries: the second rewrites the first's output back into its input,
//! and both take the same path, so every repeat costs what one packet of that path costs with
//! its flow hot in the caches (the TTL, decremented each time, bounds the repeats to 250).
//! A packet of a random flow of a large table misses the caches; that is timed one call at a
//! time, less the per-call overhead of the same path (one-call time minus repeated time of the
//! hot flow). The first packet of a new flow can only be timed one call at a time; the
//! established path's overhead is subtracted. Every figure is the median of 3 rounds, each
//! round the median of many calls.
//!
//! One file, past the usual size: the paths, their calibration and the table fill belong
//! together, and splitting them would scatter one measurement.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{Be16, Be32, DEFAULT_MAGLEV_SIZE, FLOW_REVERSE, FlowKey, FlowValue, ServiceKey};
use lb_user::{
    dataplane::{Dataplane, FlowTimeouts, LoadSettings, ifindex},
    maglev::{MaglevBackend, build_table},
};
use serde::Serialize;

use super::{
    forwarding::{self, ForwardingResults, Loop},
    summary::{Summary, median_u64},
};
use crate::{
    fixture_net::{
        B1_6, B1_MAC as BACKEND_MAC, CLIENT, CLIENT_MAC, CLIENT6, LB0_MAC, LB1_MAC, OTHER, SNAT,
        SNAT6, VIP, VIP6, ipv6_of, mac_text, network, service_key6,
    },
    flows::{key, key6, monotonic_ns, value},
    netns::{Netns, pin_current_thread_to_cpu0},
    packet::{IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, pkt},
    topology::BACKEND_PORT,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// The SNAT address of the hot reply pair: not local (a local destination would end the pong
/// half at the kernel), with a neighbour entry.
const SNAT_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The hot connection: CLIENT:HOT_PORT -> VIP, SNAT port HOT_PORT, backend 1.
const HOT_PORT: u16 = 40000;
/// Repeats of a ping-pong call: the frame starts with TTL 255 and each forward takes one.
const PING_PONG_REPEATS: u32 = 250;
/// Clients of the prefilled connections, routed via CLIENT.
const PREFILL_CLIENTS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// Clients of the new flows the benchmark opens.
const NEW_CLIENTS: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
const WEB_PORT: u16 = 80;
/// Backends 1 and 2 serve the service (weights 4:6); 3..=34 hold the prefilled connections, so
/// that new flows find their SNAT ports free as they would in a real table.
const SERVICE_BACKENDS: [(u32, u32); 2] = [(1, 4), (2, 6)];
const PREFILL_BACKENDS: u32 = 32;
/// The backend id of the ping-pong entry that rewrites towards the VIP: the data path checks
/// that a flow's backend id still names its destination, so this id names VIP:80.
const PING_PONG_BACKEND: u32 = 1000;
const PORTS_PER_CLIENT: u32 = 60_000;
/// In-kernel repeats of the calibration frame (the peer's method: 1,000,000).
const PEER_CALIBRATION_REPEATS: u32 = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MicroPath {
    /// A packet of an established flow, client -> backend, the flow hot in the caches.
    Established,
    /// The same for a random flow of the table.
    EstablishedRandom,
    /// The first packet of a new flow: Maglev choice, SNAT port, two table inserts.
    NewFlow,
    /// A reply, backend -> client, hot.
    Reply,
    /// A reply of a random flow.
    ReplyRandom,
    /// Traffic that is not a service's, passed to the kernel.
    NotOurs,
}

impl MicroPath {
    pub const ALL: [MicroPath; 6] = [
        MicroPath::Established,
        MicroPath::EstablishedRandom,
        MicroPath::NewFlow,
        MicroPath::Reply,
        MicroPath::ReplyRandom,
        MicroPath::NotOurs,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MicroPath::Established => "established flow, client -> backend (hot)",
            MicroPath::EstablishedRandom => "established flow, a random one of the table",
            MicroPath::NewFlow => "first packet of a new flow",
            MicroPath::Reply => "reply, backend -> client (hot)",
            MicroPath::ReplyRandom => "reply of a random flow",
            MicroPath::NotOurs => "not ours, passed",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MicroFigure {
    pub path: MicroPath,
    /// Connections in the table (each holds two entries).
    pub connections: u64,
    pub ns_per_packet: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepFigure {
    pub connections: u64,
    pub ms: Summary,
}

/// A path timed with the closest Rust peer's method (issue 13): one test run per sample,
/// repeat 1, a fresh copy of the packet each call; the mean of the kernel's durations, less
/// the calibration constant. Over rounds: median and spread.
#[derive(Clone, Debug, Serialize)]
pub struct PeerMethodFigure {
    pub path: &'static str,
    pub net_ns: Summary,
}

/// The peer's method, whole: its figures and what they are net of.
#[derive(Clone, Debug, Serialize)]
pub struct PeerMethodResults {
    pub figures: Vec<PeerMethodFigure>,
    /// Per-call overhead: an ARP frame's single-call mean less its mean over
    /// `calibration_repeats` in-kernel repeats (median over rounds).
    pub calibration_ns: Summary,
    /// The same for the tc program, whose skb test runs have an overhead of their own.
    pub tc_calibration_ns: Summary,
    pub calibration_repeats: u32,
    pub samples_per_round: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MicroResults {
    pub peer_method: PeerMethodResults,
    pub figures: Vec<MicroFigure>,
    pub sweeps: Vec<SweepFigure>,
    /// The in-kernel expiry's pass over the fullest table: (connections, mean ms, passes).
    pub expiry_pass: (u64, f64, u64),
    /// The per-call overhead subtracted from one-call timings of the established path
    /// (median over levels and rounds).
    pub call_overhead_ns: f64,
    pub calls_per_round: usize,
    pub repeats_per_round: u32,
    pub ping_pong_repeats: u32,
    /// Forwarded frames per second per core through the attached program, beside the
    /// machine's ceiling.
    pub forwarding: Result<ForwardingResults, String>,
}

pub struct MicroOptions {
    pub levels: Vec<u64>,
    pub calls: usize,
    pub repeats: u32,
    /// Samples per path and round of the peer's method (its own: 20,000).
    pub peer_samples: usize,
    /// Seconds per round of the forwarding loop.
    pub forwarding_seconds: f64,
}

/// Runs in its own namespace, on a thread pinned to CPU 0.
pub fn run(opts: MicroOptions) -> Result<MicroResults, String> {
    let ns = namespace();
    ns.spawn_inside(move || {
        pin_current_thread_to_cpu0();
        measure(&opts)
    })
    .join()
    .map_err(|_| "the micro-benchmark thread panicked".to_owned())?
}

fn backend_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 10 + id as u8)
}

/// The fixtures' network, with routes to the benchmark's clients and neighbours for every
/// backend and the hot pair's SNAT address.
fn namespace() -> Netns {
    let ns = network("bench-micro");
    let mut script = format!(
        "ip route add 198.19.0.0/16 via {CLIENT} dev lb0
         ip route add {VIP}/32 via {CLIENT} dev lb0
         ip neigh replace {SNAT_REMOTE} lladdr {backend} dev lb1 nud permanent
",
        backend = mac_text(BACKEND_MAC),
    );
    for id in 1..=2 + PREFILL_BACKENDS {
        script += &format!(
            "ip neigh replace {} lladdr {} dev lb1 nud permanent\n",
            backend_addr(id),
            mac_text(BACKEND_MAC)
        );
    }
    ns.sh(&script);
    ns
}

fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    key(src, sport, dst, dport, TCP)
}

fn flow_value(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    backend: u32,
    flags: u32,
    now: u64,
) -> FlowValue {
    FlowValue {
        last_seen_ns: now,
        ..value(src, sport, dst, dport, backend, flags)
    }
}

/// Prefilled connection `i`: client, client port, backend id, SNAT port.
fn connection(i: u64) -> (Ipv4Addr, u16, u32, u16) {
    let i = i as u32;
    let client = Ipv4Addr::from(u32::from(PREFILL_CLIENTS) + i / PORTS_PER_CLIENT);
    let cport = 1024 + (i % PORTS_PER_CLIENT) as u16;
    let backend = 3 + i % PREFILL_BACKENDS;
    let snat_port = 1024 + (i / PREFILL_BACKENDS) as u16;
    (client, cport, backend, snat_port)
}

/// Both entries of prefilled connection `i`, seen `now`, with their next hops cached as an
/// active flow has them.
fn connection_entries(i: u64, now: u64, hops: &Hops) -> [(FlowKey, FlowValue); 2] {
    let (client, cport, backend, sport) = connection(i);
    let b = backend_addr(backend);
    [
        (
            flow_key(client, cport, VIP, WEB_PORT),
            FlowValue {
                egress_ifindex: hops.lb1,
                src_mac: LB1_MAC,
                dst_mac: BACKEND_MAC,
                fib_ok_len: 1500,
                ..flow_value(SNAT, sport, b, BACKEND_PORT, backend, 0, now)
            },
        ),
        (
            flow_key(b, BACKEND_PORT, SNAT, sport),
            FlowValue {
                egress_ifindex: hops.lb0,
                src_mac: LB0_MAC,
                dst_mac: CLIENT_MAC,
                fib_ok_len: 1500,
                ..flow_value(VIP, WEB_PORT, client, cport, backend, FLOW_REVERSE, now)
            },
        ),
    ]
}

/// Writes connections `from..to`, seen now, in batches.
fn write_connections(dp: &mut Dataplane, from: u64, to: u64, hops: &Hops) -> Result<(), String> {
    const BATCH: u64 = 32_768;
    let now = monotonic_ns();
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        let entries: Vec<(FlowKey, FlowValue)> = (start..end)
            .flat_map(|i| connection_entries(i, now, hops))
            .collect();
        dp.insert_flows(&entries)
            .map_err(|e| format!("prefilling FLOWS: {e}"))?;
        start = end;
    }
    Ok(())
}

/// The devices' indexes, for cached next hops.
struct Hops {
    lb0: u32,
    lb1: u32,
}

/// xorshift64: picks connections at random, so that lookups miss the caches as real traffic does.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Bench {
    dp: Dataplane,
    hops: Hops,
    connections: u64,
    next_new: u32,
    rng: Rng,
}

/// The program a test run goes through: the XDP one, or the tc one of the bridge ports.
#[derive(Clone, Copy, PartialEq)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// The action of a packet passed to the kernel.
    fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_UNSPEC,
        }
    }

    /// The action of a packet sent on.
    fn redirect(self) -> u32 {
        match self {
            Hook::Xdp => XDP_REDIRECT,
            Hook::Tc => TC_ACT_REDIRECT,
        }
    }
}

/// tc's actions (TC_ACT_UNSPEC, -1, as the test run reports it).
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_UNSPEC: u32 = u32::MAX;

impl Bench {
    fn one_call(
        &mut self,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
        want: u32,
    ) -> Result<(u64, Vec<u8>), String> {
        self.call_on(Hook::Xdp, frame, ingress, repeat, want)
    }

    /// One test run through `hook`'s program of `repeat` repeats, checked for the action
    /// `want`: the kernel's time per repeat and the frame as the program left it.
    fn call_on(
        &mut self,
        hook: Hook,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
        want: u32,
    ) -> Result<(u64, Vec<u8>), String> {
        let run = match hook {
            Hook::Xdp => self.dp.test_run(frame, ingress, repeat),
            Hook::Tc => self.dp.tc_test_run(frame, ingress, repeat),
        }
        .map_err(|e| e.to_string())?;
        if run.action != want {
            let counted: Vec<String> = self
                .dp
                .reason_counters()
                .map(|c| {
                    let pass = c.pass.iter().map(|(r, n)| (r.name(), *n));
                    let drop = c.drop.iter().map(|(r, n)| (r.name(), *n));
                    pass.chain(drop)
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| format!("{r} {n}"))
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "test run of {} returned action {}, expected {want}, so the measurement would be of \
                 the wrong path (pass and drop counters so far: {})",
                crate::packet::describe(frame),
                run.action,
                counted.join(", ")
            ));
        }
        Ok((run.duration.as_nanos() as u64, run.frame))
    }

    /// Median one-call time over `calls` frames made by `frame`.
    fn single_calls(
        &mut self,
        calls: usize,
        ingress: u32,
        want: u32,
        mut frame: impl FnMut(&mut Self) -> Vec<u8>,
    ) -> Result<u64, String> {
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let f = frame(self);
            samples.push(self.one_call(&f, ingress, 1, want)?.0);
        }
        Ok(median_u64(&mut samples).unwrap_or(0))
    }

    /// (one-call median, per-packet median over ping-pong calls) of a hot path.
    fn hot(&mut self, calls: usize, frame: &[u8], ingress: u32) -> Result<(f64, f64), String> {
        let single = self.single_calls(calls, ingress, XDP_REDIRECT, |_| frame.to_vec())?;
        let mut samples = Vec::with_capacity(calls / 10 + 1);
        for _ in 0..calls / 10 + 1 {
            let (ns, out) = self.one_call(frame, ingress, PING_PONG_REPEATS, XDP_REDIRECT)?;
            // Every repeat forwarded: each took one from the TTL.
            let ttl = out.get(22).copied().unwrap_or(0);
            if u32::from(ttl) != 255 - PING_PONG_REPEATS {
                return Err(format!(
                    "a ping-pong call left TTL {ttl}: not every repeat took the forwarding path"
                ));
            }
            samples.push(ns);
        }
        Ok((single as f64, median_u64(&mut samples).unwrap_or(0) as f64))
    }

    fn random_established(&mut self) -> Vec<u8> {
        let (client, cport, _, _) = connection(self.rng.below(self.connections));
        pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(client, VIP)
            .tcp(cport, WEB_PORT)
            .ack()
            .build()
    }

    fn random_reply(&mut self) -> Vec<u8> {
        let (_, _, backend, sport) = connection(self.rng.below(self.connections));
        pkt()
            .eth(BACKEND_MAC, LB1_MAC)
            .ipv4(backend_addr(backend), SNAT)
            .tcp(BACKEND_PORT, sport)
            .ack()
            .build()
    }

    /// Each call opens a new flow; its two entries are removed afterwards (untimed), so the
    /// table stays at its level. The one-call times.
    fn new_flows(&mut self, hook: Hook, calls: usize) -> Result<Vec<u64>, String> {
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let n = self.next_new;
            self.next_new = self.next_new.wrapping_add(1);
            let client = Ipv4Addr::from(u32::from(NEW_CLIENTS) + n / PORTS_PER_CLIENT % 4096);
            let cport = 1024 + (n % PORTS_PER_CLIENT) as u16;
            let frame = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv4(client, VIP)
                .tcp(cport, WEB_PORT)
                .syn()
                .build();
            let (ns, out) = self.call_on(hook, &frame, self.hops.lb0, 1, hook.redirect())?;
            samples.push(ns);
            // The rewritten frame names the backend (IPv4 destination) and the SNAT port.
            let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            let sport = u16::from_be_bytes([out[34], out[35]]);
            self.dp
                .remove_flow(&flow_key(client, cport, VIP, WEB_PORT))
                .and_then(|()| {
                    self.dp
                        .remove_flow(&flow_key(backend, BACKEND_PORT, SNAT, sport))
                })
                .map_err(|e| format!("removing a measured flow: {e}"))?;
        }
        Ok(samples)
    }

    /// Mean per packet over `repeats` repeats of a packet that is not ours.
    fn not_ours(&mut self, repeats: u32) -> Result<f64, String> {
        let frame = pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT, OTHER)
            .tcp(40000, WEB_PORT)
            .ack()
            .build();
        Ok(self.one_call(&frame, self.hops.lb0, repeats, XDP_PASS)?.0 as f64)
    }

    /// Grows the table to `target` connections.
    fn fill_to(&mut self, target: u64) -> Result<(), String> {
        write_connections(&mut self.dp, self.connections, target, &self.hops)?;
        self.connections = self.connections.max(target);
        Ok(())
    }

    /// Marks every prefilled connection seen now, so that the random-flow paths measure active
    /// flows (next hop cached) rather than the once-a-second refresh.
    fn refresh(&mut self) -> Result<(), String> {
        write_connections(&mut self.dp, 0, self.connections, &self.hops)
    }

    /// The hot connection, with a second entry for each direction that rewrites that
    /// direction's output back into its input (see the module's comment).
    fn insert_ping_pong(&mut self) -> Result<(), String> {
        let now = monotonic_ns();
        let b1 = backend_addr(1);
        let entries = [
            (
                flow_key(CLIENT, HOT_PORT, VIP, WEB_PORT),
                flow_value(SNAT, HOT_PORT, b1, BACKEND_PORT, 1, 0, now),
            ),
            (
                flow_key(SNAT, HOT_PORT, b1, BACKEND_PORT),
                flow_value(CLIENT, HOT_PORT, VIP, WEB_PORT, PING_PONG_BACKEND, 0, now),
            ),
            (
                flow_key(b1, BACKEND_PORT, SNAT_REMOTE, HOT_PORT),
                flow_value(VIP, WEB_PORT, CLIENT, HOT_PORT, 1, FLOW_REVERSE, now),
            ),
            (
                flow_key(VIP, WEB_PORT, CLIENT, HOT_PORT),
                flow_value(
                    b1,
                    BACKEND_PORT,
                    SNAT_REMOTE,
                    HOT_PORT,
                    1,
                    FLOW_REVERSE,
                    now,
                ),
            ),
        ];
        for (k, v) in entries {
            self.dp
                .insert_flow(k, v)
                .map_err(|e| format!("inserting the hot flow: {e}"))?;
        }
        Ok(())
    }
}

/// The calibration frame: ARP, which the program passes after reading its Ethernet header.
fn arp_frame() -> Vec<u8> {
    pkt()
        .eth(CLIENT_MAC, [0xff; 6])
        .ethertype(0x0806)
        .payload(&[0, 1, 8, 0, 6, 4, 0, 1])
        .build()
}

/// The UDP flow the peer's method times: CLIENT:UDP_PORT -> VIP:53, backend 1.
const UDP_PORT: u16 = 40001;
const DNS_PORT: u16 = 53;
/// The IPv6 services' one backend (B1's IPv6 address), in BACKENDS6.
const BACKEND6_ID: u32 = 900;

/// IPv6's frames on the peer's paths, with the SNAT ports its hot flows took.
struct Frames6 {
    unknown: Vec<u8>,
    established: Vec<u8>,
    reply: Vec<u8>,
    udp: Vec<u8>,
}

impl Bench {
    /// Mean one-call time of `frame` over `samples` calls. Each test run copies the frame into
    /// a fresh buffer: every call sees the packet as sent.
    fn mean_call(
        &mut self,
        hook: Hook,
        samples: usize,
        frame: &[u8],
        ingress: u32,
        want: u32,
    ) -> Result<f64, String> {
        let mut total = 0u64;
        for _ in 0..samples {
            total += self.call_on(hook, frame, ingress, 1, want)?.0;
        }
        Ok(total as f64 / samples.max(1) as f64)
    }

    /// A UDP flow both ways, as after its first reply, for the peer's UDP path.
    fn insert_udp_flow(&mut self) -> Result<(), String> {
        let now = monotonic_ns();
        let b1 = backend_addr(1);
        let state = |v: FlowValue| FlowValue {
            state: lb_common::conntrack::UDP_REPLIED,
            ..v
        };
        let entries = [
            (
                key(CLIENT, UDP_PORT, VIP, DNS_PORT, UDP),
                state(flow_value(SNAT, UDP_PORT, b1, BACKEND_PORT, 1, 0, now)),
            ),
            (
                key(b1, BACKEND_PORT, SNAT, UDP_PORT, UDP),
                state(flow_value(
                    CLIENT,
                    UDP_PORT,
                    VIP,
                    DNS_PORT,
                    1,
                    FLOW_REVERSE,
                    now,
                )),
            ),
        ];
        for (k, v) in entries {
            self.dp
                .insert_flow(k, v)
                .map_err(|e| format!("inserting the UDP flow: {e}"))?;
        }
        Ok(())
    }

    /// IPv6 services (TCP VIP6:80, UDP VIP6:53, full NAT to B1's IPv6 address) and their hot
    /// flows, opened by a first packet each: the frames of the peer's paths over IPv6.
    fn setup_ipv6(&mut self) -> Result<Frames6, String> {
        let backend = SocketAddr::new(B1_6.into(), BACKEND_PORT);
        self.dp
            .set_backend(BACKEND6_ID, backend, true)
            .map_err(|e| e.to_string())?;
        let table = build_table(
            &[MaglevBackend {
                id: BACKEND6_ID,
                addr: backend,
                weight: 1,
            }],
            DEFAULT_MAGLEV_SIZE,
        );
        for (id, port, proto) in [(1, WEB_PORT, TCP), (2, DNS_PORT, UDP)] {
            self.dp
                .set_service(
                    id,
                    service_key6(port, proto),
                    lb_common::SERVICE_MODE_NAT,
                    &[SNAT6.into()],
                    None,
                    &table,
                )
                .map_err(|e| e.to_string())?;
        }
        let lb0 = self.hops.lb0;
        let from_client = || pkt().eth(CLIENT_MAC, LB0_MAC).ipv6(CLIENT6, VIP6);
        let udp = from_client()
            .udp(UDP_PORT, DNS_PORT)
            .payload(b"query")
            .build();
        self.one_call(&udp, lb0, 1, XDP_REDIRECT)?;
        let syn = from_client().tcp(HOT_PORT, WEB_PORT).syn().build();
        let (_, out) = self.one_call(&syn, lb0, 1, XDP_REDIRECT)?;
        // The rewritten SYN's TCP source port (after Ethernet and IPv6): the SNAT port.
        let sport = u16::from_be_bytes([out[54], out[55]]);
        // The backend's SYN-ACK makes the connection established, as the IPv4 hot flow is.
        let syn_ack = pkt()
            .eth(BACKEND_MAC, LB1_MAC)
            .ipv6(B1_6, SNAT6)
            .tcp(BACKEND_PORT, sport)
            .tcp_flags(lb_common::conntrack::TCP_SYN | lb_common::conntrack::TCP_ACK)
            .ack_seq(1001)
            .build();
        self.one_call(&syn_ack, self.hops.lb1, 1, XDP_REDIRECT)?;
        Ok(Frames6 {
            unknown: pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(CLIENT6, ipv6_of(OTHER))
                .tcp(40000, WEB_PORT)
                .ack()
                .build(),
            established: from_client().tcp(HOT_PORT, WEB_PORT).ack().build(),
            reply: pkt()
                .eth(BACKEND_MAC, LB1_MAC)
                .ipv6(B1_6, SNAT6)
                .tcp(BACKEND_PORT, sport)
                .ack()
                .build(),
            udp,
        })
    }

    /// IPv6's new flows, as `new_flows`: the one-call times.
    fn new_flows6(&mut self, hook: Hook, calls: usize) -> Result<Vec<u64>, String> {
        let mut samples = Vec::with_capacity(calls);
        for i in 0..calls {
            let cport = 1024 + (i % 60_000) as u16;
            let frame = pkt()
                .eth(CLIENT_MAC, LB0_MAC)
                .ipv6(CLIENT6, VIP6)
                .tcp(cport, WEB_PORT)
                .syn()
                .build();
            let (ns, out) = self.call_on(hook, &frame, self.hops.lb0, 1, hook.redirect())?;
            samples.push(ns);
            let sport = u16::from_be_bytes([out[54], out[55]]);
            self.dp
                .remove_flow6(&key6(CLIENT6, cport, VIP6, WEB_PORT, TCP))
                .and_then(|()| {
                    self.dp
                        .remove_flow6(&key6(B1_6, BACKEND_PORT, SNAT6, sport, TCP))
                })
                .map_err(|e| format!("removing a measured IPv6 flow: {e}"))?;
        }
        Ok(samples)
    }

    /// The closest Rust peer's method (issue 13), on its paths: `samples` one-call test runs
    /// per path and round, repeat 1, a fresh packet each call, the mean of the kernel's
    /// durations net of the per-call overhead an ARP frame shows (its single-call mean less
    /// its mean over `calibration_repeats` repeats in the kernel). Medians of 3 rounds. The
    /// same paths through the tc program (as the bridge ports' hook meets a container's
    /// packets), net of its own calibration.
    fn peer_method(
        &mut self,
        samples: usize,
        calibration_repeats: u32,
        (established, reply): (&[u8], &[u8]),
    ) -> Result<PeerMethodResults, String> {
        let (lb0, lb1) = (self.hops.lb0, self.hops.lb1);
        let arp = arp_frame();
        let unknown = pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT, OTHER)
            .tcp(40000, WEB_PORT)
            .ack()
            .build();
        let udp = pkt()
            .eth(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT, VIP)
            .udp(UDP_PORT, DNS_PORT)
            .payload(b"query")
            .build();
        self.insert_ping_pong()?;
        self.insert_udp_flow()?;
        let v6 = self.setup_ipv6()?;
        let mut calibrations = [Vec::new(), Vec::new()];
        let mut rounds: Vec<Vec<f64>> = Vec::new();
        for _ in 0..3 {
            let mut round = Vec::new();
            for (i, hook) in [Hook::Xdp, Hook::Tc].into_iter().enumerate() {
                let (pass, redirect) = (hook.pass(), hook.redirect());
                let repeated = self.call_on(hook, &arp, lb0, calibration_repeats, pass)?.0 as f64;
                let single = self.mean_call(hook, samples, &arp, lb0, pass)?;
                let calibration = single - repeated;
                calibrations[i].push(calibration);
                let mean = |samples: Vec<u64>| {
                    samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64
                };
                let new = mean(self.new_flows(hook, samples)?);
                let new6 = mean(self.new_flows6(hook, samples)?);
                let timed = [
                    single,
                    self.mean_call(hook, samples, &unknown, lb0, pass)?,
                    self.mean_call(hook, samples, established, lb0, redirect)?,
                    self.mean_call(hook, samples, reply, lb1, redirect)?,
                    self.mean_call(hook, samples, &udp, lb0, redirect)?,
                    new,
                    self.mean_call(hook, samples, &v6.unknown, lb0, pass)?,
                    self.mean_call(hook, samples, &v6.established, lb0, redirect)?,
                    self.mean_call(hook, samples, &v6.reply, lb1, redirect)?,
                    self.mean_call(hook, samples, &v6.udp, lb0, redirect)?,
                    new6,
                ];
                round.extend(timed.map(|ns| ns - calibration));
            }
            rounds.push(round);
        }
        let paths = [
            "non-IP frame, passed",
            "TCP to an unknown destination, passed",
            "established, forward",
            "established, reply",
            "UDP established",
            "new flow",
            "IPv6: TCP to an unknown destination, passed",
            "IPv6: established, forward",
            "IPv6: established, reply",
            "IPv6: UDP established",
            "IPv6: new flow",
            "tc: non-IP frame, passed",
            "tc: TCP to an unknown destination, passed",
            "tc: established, forward",
            "tc: established, reply",
            "tc: UDP established",
            "tc: new flow",
            "tc: IPv6: TCP to an unknown destination, passed",
            "tc: IPv6: established, forward",
            "tc: IPv6: established, reply",
            "tc: IPv6: UDP established",
            "tc: IPv6: new flow",
        ];
        let figures = paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| {
                let net: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
                Ok(PeerMethodFigure {
                    path,
                    net_ns: Summary::of(&net).ok_or("no samples")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(PeerMethodResults {
            figures,
            calibration_ns: Summary::of(&calibrations[0]).ok_or("no samples")?,
            tc_calibration_ns: Summary::of(&calibrations[1]).ok_or("no samples")?,
            calibration_repeats,
            samples_per_round: samples,
        })
    }
}

impl Bench {
    /// Arms the in-kernel expiry and returns the mean time of its passes over the table as it
    /// is (nothing in it expires: the walk is the cost), in ms, and how many passes that is.
    fn expiry_pass(&mut self) -> Result<(f64, u64), String> {
        let read = |dp: &Dataplane| -> Result<(u64, u64), String> {
            let events = dp.reason_counters().map_err(|e| e.to_string())?.events;
            let event = |name: &str| events.iter().find(|(n, _)| *n == name).map_or(0, |e| e.1);
            Ok((event("expiry_passes"), event("expiry_pass_ns")))
        };
        self.dp.arm_expiry().map_err(|e| e.to_string())?;
        let (passes, ns) = read(&self.dp)?;
        std::thread::sleep(Duration::from_millis(3500));
        let (passes_after, ns_after) = read(&self.dp)?;
        let passes = passes_after - passes;
        if passes == 0 {
            return Err("the expiry timer made no pass in 3.5 s".into());
        }
        Ok(((ns_after - ns) as f64 / passes as f64 / 1e6, passes))
    }
}

/// Timeouts long enough that nothing the benchmark writes expires while it runs.
impl Bench {
    /// The hot established flow's client packet, as a 64-byte frame on the wire, round the
    /// forwarding loop (see `forwarding`) with lb attached to lb0.
    fn forwarding(
        &mut self,
        seconds: f64,
        established: &[u8],
    ) -> Result<ForwardingResults, String> {
        let mut frame = established.to_vec();
        frame.resize(60, 0);
        self.insert_ping_pong()?;
        self.one_call(&frame, self.hops.lb0, 1, XDP_REDIRECT)?;
        let index = |name: &str| ifindex(name).map_err(|e| e.to_string());
        let devices = Loop {
            into_lb: ("peer0", index("peer0")?),
            lb_in: self.hops.lb0,
            lb_out: self.hops.lb1,
            reflector_at: ("peer1", index("peer1")?),
        };
        let dp = &mut self.dp;
        forwarding::measure(&devices, &frame, seconds, 3, |attached| {
            if attached {
                return dp.attach("lb0").map(drop).map_err(|e| e.to_string());
            }
            let failed: Vec<String> = dp
                .detach_all()
                .into_iter()
                .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(format!("detaching lb: {}", failed.join(", ")))
            }
        })
    }
}

fn dp_timeouts() -> FlowTimeouts {
    let hour = Duration::from_secs(3600);
    FlowTimeouts {
        tcp_syn: hour,
        tcp_established: hour,
        tcp_half_closed: hour,
        tcp_closing: hour,
        udp_unreplied: hour,
        udp_replied: hour,
    }
}

fn measure(opts: &MicroOptions) -> Result<MicroResults, String> {
    let capacity = opts.levels.iter().copied().max().unwrap_or(1) * 2 + 65_536;
    let mut dp = Dataplane::load(LoadSettings {
        maglev_size: DEFAULT_MAGLEV_SIZE,
        flow_capacity: u32::try_from(capacity).map_err(|_| "too many connections".to_owned())?,
        snat_port_min: 1024,
        snat_port_max: 32767,
        timeouts: dp_timeouts(),
    })
    .map_err(|e| e.to_string())?;
    let (lb0, lb1) = (
        ifindex("lb0").map_err(|e| e.to_string())?,
        ifindex("lb1").map_err(|e| e.to_string())?,
    );
    for i in [lb0, lb1] {
        dp.add_interface(i, false).map_err(|e| e.to_string())?;
    }
    for id in 1..=2 + PREFILL_BACKENDS {
        dp.set_backend(id, SocketAddrV4::new(backend_addr(id), BACKEND_PORT), true)
            .map_err(|e| e.to_string())?;
    }
    dp.set_backend(PING_PONG_BACKEND, SocketAddrV4::new(VIP, WEB_PORT), true)
        .map_err(|e| e.to_string())?;
    let eligible: Vec<MaglevBackend> = SERVICE_BACKENDS
        .iter()
        .map(|&(id, weight)| MaglevBackend {
            id,
            addr: SocketAddrV4::new(backend_addr(id), BACKEND_PORT).into(),
            weight,
        })
        .collect();
    let key = ServiceKey {
        vip: Be32::from_bytes(VIP.octets()),
        port: Be16::from_host(WEB_PORT),
        proto: TCP,
        _pad: 0,
    };
    dp.set_service(
        0,
        key,
        lb_common::SERVICE_MODE_NAT,
        &[SNAT.into()],
        None,
        &build_table(&eligible, DEFAULT_MAGLEV_SIZE),
    )
    .map_err(|e| e.to_string())?;
    let mut bench = Bench {
        dp,
        hops: Hops { lb0, lb1 },
        connections: 0,
        next_new: 0,
        rng: Rng(0x9e37_79b9_7f4a_7c15),
    };
    let hot_established = pkt()
        .eth(CLIENT_MAC, LB0_MAC)
        .ipv4(CLIENT, VIP)
        .ttl(255)
        .tcp(HOT_PORT, WEB_PORT)
        .ack()
        .build();
    let hot_reply = pkt()
        .eth(BACKEND_MAC, LB1_MAC)
        .ipv4(backend_addr(1), SNAT_REMOTE)
        .ttl(255)
        .tcp(BACKEND_PORT, HOT_PORT)
        .ack()
        .build();
    // The peer's setup: a table holding the measured flows alone.
    let peer_method = bench.peer_method(
        opts.peer_samples,
        PEER_CALIBRATION_REPEATS,
        (&hot_established, &hot_reply),
    )?;
    let mut figures = Vec::new();
    let mut sweeps = Vec::new();
    let mut overheads = Vec::new();
    for &level in &opts.levels {
        let started = Instant::now();
        bench.fill_to(level)?;
        eprintln!(
            "bench: micro: {} connections in the table (filled in {:.1} s)",
            bench.connections,
            started.elapsed().as_secs_f64()
        );
        // The random paths need a connection to pick; "0" has only the hot one.
        let random_ok = bench.connections > 0;
        let mut rounds: Vec<[Option<f64>; 6]> = Vec::new();
        let mut sweep_ms = Vec::new();
        for _ in 0..3 {
            bench.insert_ping_pong()?;
            let (est_one, est_hot) = bench.hot(opts.calls, &hot_established, lb0)?;
            let (reply_one, reply_hot) = bench.hot(opts.calls, &hot_reply, lb1)?;
            let (est_overhead, reply_overhead) = (est_one - est_hot, reply_one - reply_hot);
            overheads.push(est_overhead);
            bench.refresh()?;
            let est_random = if random_ok {
                Some(
                    bench.single_calls(opts.calls, lb0, XDP_REDIRECT, Bench::random_established)?
                        as f64
                        - est_overhead,
                )
            } else {
                None
            };
            let reply_random = if random_ok {
                Some(
                    bench.single_calls(opts.calls, lb1, XDP_REDIRECT, Bench::random_reply)? as f64
                        - reply_overhead,
                )
            } else {
                None
            };
            let new = median_u64(&mut bench.new_flows(Hook::Xdp, opts.calls)?).unwrap_or(0) as f64
                - est_overhead;
            let pass = bench.not_ours(opts.repeats)?;
            rounds.push([
                Some(est_hot),
                est_random,
                Some(new),
                Some(reply_hot),
                reply_random,
                Some(pass),
            ]);
            // What the daemon reads each second: the service's backends' connection counts.
            let started = Instant::now();
            let counted = bench
                .dp
                .count_flows(SERVICE_BACKENDS.iter().map(|&(id, _)| id))
                .map_err(|e| e.to_string())?;
            sweep_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            if counted.active.len() != SERVICE_BACKENDS.len() {
                return Err(format!("counts for {} backends", counted.active.len()));
            }
        }
        for (i, path) in MicroPath::ALL.into_iter().enumerate() {
            let samples: Vec<f64> = rounds.iter().filter_map(|r| r[i]).collect();
            if let Some(summary) = Summary::of(&samples) {
                figures.push(MicroFigure {
                    path,
                    connections: level,
                    ns_per_packet: summary,
                });
            }
        }
        sweeps.push(SweepFigure {
            connections: level,
            ms: Summary::of(&sweep_ms).ok_or("no samples")?,
        });
    }
    let forwarding = bench.forwarding(opts.forwarding_seconds, &hot_established);
    // Last: once armed, the timer walks the table every second, in softirq on some CPU, and
    // would disturb the timings above.
    let (pass_ms, passes) = bench.expiry_pass()?;
    let expiry_pass = (bench.connections, pass_ms, passes);
    Ok(MicroResults {
        peer_method,
        figures,
        sweeps,
        expiry_pass,
        call_overhead_ns: Summary::of(&overheads).map_or(0.0, |s| s.median),
        calls_per_round: opts.calls,
        repeats_per_round: opts.repeats,
        ping_pong_repeats: PING_PONG_REPEATS,
        forwarding,
    })
}
