//! Fuzzing the real XDP program through BPF_PROG_TEST_RUN: random frames, and valid frames of
//! every kind the balancer meets, mutated (bytes flipped, truncated, extended, header lengths
//! and flags scrambled). For every packet:
//! - the action is one of DROP, PASS, TX, REDIRECT (never ABORTED, never anything else);
//! - a frame that cannot be a service's (not IPv4 to the VIP or to the SNAT address) passes
//!   to the kernel byte for byte unchanged;
//! - a valid frame that is rewritten carries correct checksums.
//!
//! Across the run, the counters account for every packet exactly once (the first packets are
//! checked one by one, all of them together at the end), and every FLOWS entry has its other
//! direction. LB_FUZZ_PACKETS sets the volume (default 2,000,000); LB_FUZZ_SEED the seed.

use std::net::SocketAddrV4;

use lb_common::{Be16, Be32, FLOW_REVERSE};
use lb_tests::{
    fixture_net::{
        B1, B1_MAC, B2, BACKEND_PORT, CLIENT, CLIENT_MAC, CLIENT6, DNS_PORT, LB0_MAC, LB1_MAC,
        MAGLEV_SIZE, OTHER, PORT_MIN, SNAT, TCP, UDP, VIP, VIP6, WEB_PORT, XDP_DROP, XDP_PASS,
        XDP_REDIRECT, XDP_TX, service_key, topology,
    },
    netns::{pin_current_thread_to_cpu0, require_root, sweep_stale},
    packet::{PacketBuilder, describe, pkt, verify_checksums},
};
use lb_user::{
    dataplane::{Dataplane, FlowTimeouts, LoadSettings, ReasonCounters, ifindex},
    maglev::{MaglevBackend, build_table},
};

const ACTIONS: [u32; 4] = [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT];
const PORT_MAX: u16 = 20999;
/// Small enough that the fuzz fills it, and SNAT ports run out too.
const FLOW_CAPACITY: u32 = 4096;
/// BPF_PROG_TEST_RUN refuses shorter XDP input (EINVAL); a NIC never delivers it either.
const ETH_HLEN: usize = 14;
/// Packets whose counter movement is checked one by one (a counter read costs ~50 µs).
const CHECKED_ONE_BY_ONE: u64 = 20_000;

/// splitmix64: small, fast, and the same sequence for the same seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn port(&mut self) -> u16 {
        self.next() as u16
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A valid frame of one of the kinds the balancer sees.
fn valid_frame(rng: &mut Rng) -> Vec<u8> {
    let from_client = || pkt().eth(CLIENT_MAC, LB0_MAC);
    let from_backend = || pkt().eth(B1_MAC, LB1_MAC);
    // Few client ports, so later packets meet the flows earlier ones made.
    let cport = 30000 + rng.below(3000) as u16;
    let snat_port = PORT_MIN + rng.below(u64::from(PORT_MAX - PORT_MIN) + 1) as u16;
    let flags = rng.pick(&[0x02u8, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x14, 0x00, 0xff]);
    let payload_len = rng.pick(&[0usize, 1, 10, 100, 1400]);
    let payload = vec![0x5a; payload_len];
    let builder: PacketBuilder = match rng.below(13) {
        0..=3 => from_client()
            .ipv4(CLIENT, VIP)
            .tcp(cport, WEB_PORT)
            .tcp_flags(flags),
        4 => from_client().ipv4(CLIENT, VIP).udp(cport, DNS_PORT),
        5 => from_backend()
            .ipv4(B1, SNAT)
            .tcp(BACKEND_PORT, snat_port)
            .tcp_flags(flags),
        6 => from_backend().ipv4(B1, SNAT).udp(BACKEND_PORT, snat_port),
        7 => from_client()
            .ipv4(CLIENT, rng.pick(&[OTHER, B1, B2, SNAT]))
            .tcp(cport, rng.port())
            .tcp_flags(flags),
        8 => from_client()
            .ipv4(CLIENT, VIP)
            .ip_proto(rng.pick(&[1u8, 47, 132])),
        9 => from_client()
            .ipv4(CLIENT, VIP)
            .tcp(cport, WEB_PORT)
            .syn()
            .ttl(rng.pick(&[0u8, 1, 2]))
            .ip_options(&[1, 1, 1, 0]),
        10 => from_client()
            .ipv4(CLIENT, VIP)
            .udp(cport, DNS_PORT)
            .fragment(rng.chance(50), rng.below(4) as u16),
        // IPv6 has no service here: its fragments' parsing, first or later, must pass them.
        11 => from_client()
            .ipv6(CLIENT6, VIP6)
            .udp(cport, DNS_PORT)
            .fragment6(rng.chance(50), rng.below(4) as u16, rng.below(4) as u32),
        _ => from_client().ethertype(rng.pick(&[0x0806u16, 0x86dd, 0x8100])),
    };
    builder.payload(&payload).build()
}

fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = ETH_HLEN + rng.below(200) as usize;
    let mut frame: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    // Half of them claim to be IPv4 to our addresses, so they reach the later stages.
    if len >= 34 && rng.chance(50) {
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x40 | (frame[14] & 0x0f);
        frame[30..34].copy_from_slice(&rng.pick(&[VIP, SNAT]).octets());
        frame[23] = rng.pick(&[TCP, UDP]);
    }
    frame
}

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            // Headers are where the parser's decisions are; flip bytes there mostly.
            0..=2 if !frame.is_empty() => {
                let span = frame.len().min(64) as u64;
                let at = rng.below(span) as usize;
                frame[at] ^= 1 << rng.below(8);
            }
            3 if frame.len() > ETH_HLEN => {
                let at = ETH_HLEN + rng.below((frame.len() - ETH_HLEN) as u64) as usize;
                frame.truncate(at);
            }
            4 => frame.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            // The IPv4 header length nibble, the TCP data offset.
            _ if frame.len() > 46 => {
                let at = rng.pick(&[14usize, 46]);
                frame[at] = (frame[at] & 0xf0) | rng.below(16) as u8;
            }
            _ => {}
        }
    }
}

/// Could this frame be a service's (or a reply to one)? Only then may the program change it.
fn may_be_ours(frame: &[u8]) -> bool {
    frame.len() >= 34
        && frame[12..14] == [0x08, 0x00]
        && [VIP.octets(), SNAT.octets()].contains(&[frame[30], frame[31], frame[32], frame[33]])
}

fn total(c: &ReasonCounters) -> u64 {
    c.pass.iter().map(|x| x.1).sum::<u64>()
        + c.drop.iter().map(|x| x.1).sum::<u64>()
        + c.tx
        + c.redirect
}

fn service(dp: &mut Dataplane, id: u32, port: u16, proto: u8) {
    let backends = [(1, B1, 4), (2, B2, 6)].map(|(id, addr, weight)| MaglevBackend {
        id,
        addr: SocketAddrV4::new(addr, BACKEND_PORT).into(),
        weight,
    });
    dp.set_service(
        id,
        service_key(port, proto),
        lb_common::SERVICE_MODE_NAT,
        &[SNAT.into()],
        None,
        &build_table(&backends, MAGLEV_SIZE),
    )
    .expect("set service");
}

struct Outcome {
    packets: u64,
    by_action: [u64; 5],
    rewritten: u64,
    flow_entries: usize,
    failures: Vec<String>,
}

fn fuzz(packets: u64, seed: u64) -> Outcome {
    let mut dp = Dataplane::load(LoadSettings {
        maglev_size: MAGLEV_SIZE,
        flow_capacity: FLOW_CAPACITY,
        snat_port_min: PORT_MIN,
        snat_port_max: PORT_MAX,
        timeouts: FlowTimeouts::default(),
    })
    .expect("load");
    // Attached, the program stays in the kernel's XDP dispatcher, and a test run costs
    // microseconds instead of a dispatcher rebuild each. The device carries no traffic (no
    // IPv6 link-local address, so no neighbour discovery), which the counters would count.
    dp.attach("idle0").expect("attach idle0");
    for dev in ["lb0", "lb1"] {
        dp.add_interface(ifindex(dev).expect(dev), false)
            .expect(dev);
    }
    for (id, addr) in [(1, B1), (2, B2)] {
        dp.set_backend(id, SocketAddrV4::new(addr, BACKEND_PORT), true)
            .expect("backend");
    }
    service(&mut dp, 0, WEB_PORT, TCP);
    service(&mut dp, 1, DNS_PORT, UDP);
    let ingress = [ifindex("lb0").expect("lb0"), ifindex("lb1").expect("lb1")];
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut by_action = [0u64; 5];
    let mut rewritten = 0;
    let start = total(&dp.reason_counters().expect("counters"));
    let mut counted = start;
    for i in 0..packets {
        let kind = rng.below(10);
        let mut frame = if kind == 0 {
            random_frame(&mut rng)
        } else {
            valid_frame(&mut rng)
        };
        let valid = kind >= 5;
        if !valid {
            mutate(&mut rng, &mut frame);
        }
        let from = ingress[usize::from(frame.get(30) == Some(&SNAT.octets()[0]) && rng.chance(90))];
        let run = match dp.test_run(&frame, from, 1) {
            Ok(run) => run,
            Err(e) => {
                failures.push(format!("packet {i}: test run failed: {e}"));
                break;
            }
        };
        let mut fail = |what: String| {
            if failures.len() < 20 {
                failures.push(format!("packet {i} ({}): {what}", describe(&frame)));
            }
        };
        if !ACTIONS.contains(&run.action) {
            fail(format!("action {}", run.action));
        } else {
            by_action[run.action as usize] += 1;
        }
        let changed = run.frame != frame;
        rewritten += u64::from(changed);
        if !may_be_ours(&frame) && (changed || run.action != XDP_PASS) {
            fail(format!(
                "not a service's, yet action {} and {}",
                run.action,
                if changed { "rewritten" } else { "unchanged" }
            ));
        }
        if valid
            && changed
            && let Err(e) = verify_checksums(&run.frame)
        {
            fail(format!("rewritten with bad checksums: {e}"));
        }
        if i < CHECKED_ONE_BY_ONE {
            let now = total(&dp.reason_counters().expect("counters"));
            if now != counted + 1 {
                fail(format!("counters moved by {}, not 1", now - counted));
            }
            counted = now;
        }
    }
    let end = total(&dp.reason_counters().expect("counters"));
    if end - start != packets {
        failures.push(format!(
            "counters account for {} packets, {packets} were run",
            end - start
        ));
    }
    let entries = dp.flow_entries().expect("read FLOWS");
    let table: std::collections::HashMap<_, _> = entries.iter().copied().collect();
    for (k, v) in &entries {
        let partner = table.get(&v.peer_key(k.proto));
        let back = partner.map(|p| p.peer_key(k.proto));
        if back != Some(*k)
            || partner.is_some_and(|p| p.flags & FLOW_REVERSE == v.flags & FLOW_REVERSE)
        {
            failures.push(format!("FLOWS[{k:?}] = {v:?} has no other direction"));
            break;
        }
    }
    // Both services' flows are there: the fuzz reached the flow table, not only the parser.
    for (port, proto) in [(WEB_PORT, TCP), (DNS_PORT, UDP)] {
        let vip = Be32::from_bytes(VIP.octets());
        let to_service =
            |k: &lb_common::FlowKey| k.dst_addr == vip && k.dst_port == Be16::from_host(port);
        if !entries
            .iter()
            .any(|(k, _)| k.proto == proto && to_service(k))
        {
            failures.push(format!("no flow to VIP port {port}/{proto} was created"));
        }
    }
    Outcome {
        packets,
        by_action,
        rewritten,
        flow_entries: entries.len(),
        failures,
    }
}

#[test]
fn fuzzed_packets_never_abort_never_touch_others_and_are_all_counted() {
    require_root();
    sweep_stale();
    let packets = std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(2_000_000);
    let seed = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6c62_6675_7a7a);
    let ns = topology();
    ns.sh("ip link add idle0 type veth peer name idle1
         for d in idle0 idle1; do
             sysctl -qw net.ipv6.conf.$d.disable_ipv6=1 && ip link set $d up
         done");
    let started = std::time::Instant::now();
    let outcome = ns
        .spawn_inside(move || {
            pin_current_thread_to_cpu0();
            fuzz(packets, seed)
        })
        .join()
        .expect("fuzz thread panicked");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzzed {} packets (seed {seed:#x}) in {secs:.1} s ({:.0}/s): drop {}, pass {}, tx {}, redirect {}; {} rewritten; {} FLOWS entries at the end",
        outcome.packets,
        outcome.packets as f64 / secs,
        outcome.by_action[1],
        outcome.by_action[2],
        outcome.by_action[3],
        outcome.by_action[4],
        outcome.rewritten,
        outcome.flow_entries,
    );
    assert!(
        outcome.failures.is_empty(),
        "{} failures:\n{}",
        outcome.failures.len(),
        outcome.failures.join("\n")
    );
    // The mix must reach every outcome, or the fuzz is not exercising the program.
    for (action, name) in [(1, "drop"), (2, "pass"), (4, "redirect")] {
        assert!(outcome.by_action[action] > 0, "no packet was a {name}");
    }
}
