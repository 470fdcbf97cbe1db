//! End to end: the real daemon and XDP program in native mode on veth, real servers, curl and
//! nc, in network namespaces made by each test (see lb_tests::topology). Each test builds its
//! own namespaces, so they can't disturb each other; `cargo xtask test` runs them one at a time.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Child,
    time::{Duration, Instant},
};

use lb_tests::{
    bench::cost::kernel_counter,
    harness::{
        Balancer, ConnectionStream, http_requests, http_requests_to, keep_alive_request, lb_binary,
        start_server, start_server_on, tally, udp_request,
    },
    host::{ClientCgroup, NetnsResolver},
    netns::{Netns, require_root, stop_child, sweep_stale},
    topology::{Arms, BACKEND_PORT, CLIENT, CLIENT6, Topology, VIP, VIP6},
};

struct Setup {
    topo: Topology,
    balancer: Balancer,
    servers: Vec<Child>,
}

fn setup(arms: Arms, weights: &[u32]) -> Setup {
    setup_with(arms, weights, |config| config)
}

/// As `setup`, with the generated config passed through `edit` first.
fn setup_with(arms: Arms, weights: &[u32], edit: impl FnOnce(String) -> String) -> Setup {
    require_root();
    sweep_stale();
    setup_on(Topology::new(arms, weights.len()), weights, edit)
}

/// The single-host deployment's setup: `Topology::containers`, one container per weight.
fn setup_containers_with(weights: &[u32], edit: impl FnOnce(String) -> String) -> Setup {
    require_root();
    sweep_stale();
    setup_on(Topology::containers(weights.len()), weights, edit)
}

fn setup_on(topo: Topology, weights: &[u32], edit: impl FnOnce(String) -> String) -> Setup {
    let servers = (0..weights.len()).map(|i| start_server(&topo, i)).collect();
    let balancer = Balancer::start(&lb_binary(), &topo, &edit(topo.config(weights)));
    Setup {
        topo,
        balancer,
        servers,
    }
}

/// `setup_with`, with `flows` (TOML lines) added to the topology's `[flows]` section.
fn setup_with_flows(arms: Arms, weights: &[u32], flows: &str) -> Setup {
    setup_with(arms, weights, |config| {
        config.replace("capacity = 65536\n", &format!("capacity = 65536\n{flows}"))
    })
}

fn backend(topo: &Topology, i: usize) -> String {
    format!("{}:{BACKEND_PORT}", topo.backend_addrs[i])
}

/// A numeric field of each backend of `service` in `lb status --json`, in backend order.
fn per_backend(balancer: &Balancer, topo: &Topology, service: &str, field: &str) -> Vec<u64> {
    (0..topo.backends.len())
        .map(|i| {
            balancer.backend(service, &backend(topo, i))[field]
                .as_u64()
                .expect("a number")
        })
        .collect()
}

/// Asserts that backend 1's share of `counts` is `want_percent` ± `points`. Client ports make
/// each connection's slot an independent draw, so a share has a binomial spread: with 1000
/// connections at 40% one standard deviation is 1.5 points, and ±5 is 3.2 of them. A share
/// also moves when a backend leaves the table or is steered around for a while: the failure
/// says whether the daemon saw a backend go down or the data path marked one suspect.
fn assert_share(balancer: &Balancer, counts: &[usize], want_percent: f64, points: f64, what: &str) {
    let total: usize = counts.iter().sum();
    let share = 100.0 * counts[0] as f64 / total as f64;
    if (share - want_percent).abs() <= points {
        return;
    }
    let log = balancer.log();
    let downs: Vec<&str> = log.lines().filter(|l| l.contains(" is down")).collect();
    let suspects: Vec<String> = [
        "event_suspect_refused",
        "event_suspect_unanswered",
        "event_steered_off_suspect",
    ]
    .iter()
    .map(|name| format!("{name} {}", counter(balancer, name)))
    .collect();
    panic!(
        "{what}: backend 1 got {share:.1}% of {total} ({counts:?}), expected {want_percent}% ± {points}\n\
         backends the daemon took down: {downs:#?}\nsuspect marks: {}",
        suspects.join(", ")
    );
}

#[test]
fn two_arm_tcp_splits_4_6_and_fails_over_to_the_survivor() {
    let Setup {
        topo,
        balancer,
        mut servers,
    } = setup(Arms::Two, &[4, 6]);
    let bodies = http_requests(&topo, 1000);
    let (counts, failed) = tally(&bodies, 2);
    println!("two-arm, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "4:6 split");
    // The data path counted the same new flows the clients saw.
    let new_flows: Vec<u64> = per_backend(&balancer, &topo, "web", "new_flows");
    assert_eq!(
        new_flows,
        counts.iter().map(|&c| c as u64).collect::<Vec<_>>()
    );

    // Stop backend 1: health checks take it out, and every new connection lands on backend 2.
    servers[0].kill().expect("stop backend 1's server");
    servers[0].wait().expect("reap backend 1's server");
    let detected = balancer.wait_health("web", &backend(&topo, 0), false, Duration::from_secs(5));
    println!("backend 1 stopped: marked down after {detected:?}");
    let bodies = http_requests(&topo, 200);
    let (counts, failed) = tally(&bodies, 2);
    assert_eq!(
        (counts.clone(), failed),
        (vec![0, 200], 0),
        "after backend 1 stopped"
    );
}

/// Slow start: a backend that comes back up takes a rising share of new connections over the
/// service's `slow_start` (6 s here: ten steps of 600 ms), not its full share at once. At 1:1,
/// its share of each 1.5-s window must rise from about a tenth towards a half. The backends
/// are containers on a bridge (the single-host deployment).
#[test]
fn a_recovered_backend_ramps_up_over_slow_start() {
    let Setup {
        topo,
        balancer,
        mut servers,
    } = setup_containers_with(&[1, 1], |config| {
        config.replacen(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nslow_start = \"6s\"\n",
            1,
        )
    });
    let b2 = backend(&topo, 1);
    servers[1].kill().expect("stop backend 2's server");
    servers[1].wait().expect("reap backend 2's server");
    balancer.wait_health("web", &b2, false, Duration::from_secs(5));
    servers[1] = start_server(&topo, 1);
    balancer.wait_health("web", &b2, true, Duration::from_secs(5));
    let ramping = balancer.backend("web", &b2)["slow_start_percent"].as_u64();
    assert!(
        ramping.is_some_and(|p| p < 50),
        "just up, backend 2 takes {ramping:?}% of its weight"
    );
    // Timestamped requests for 7.5 s from two loops at once: the ramp and the 1.5 s after it.
    let out = topo.client.sh(&format!(
        "end=$(( $(date +%s%N) + 7500000000 ))
         for loop in 1 2; do
             while [ $(date +%s%N) -lt $end ]; do
                 echo \"$(date +%s%N) $(curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL)\"
             done &
         done
         wait"
    ));
    let samples: Vec<(u64, String)> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(t, body)| Some((t.parse().ok()?, body.trim().to_owned())))
        .collect();
    let start = samples
        .iter()
        .map(|s| s.0)
        .min()
        .expect("requests were made");
    // Three phases: the ramp's first 1.5 s, its middle 3 s, and the 3 s around its end. Wider
    // phases than the ramp's steps keep each share's sampling noise a few points wide.
    let mut phases = [(0usize, 0usize); 3];
    for (t, body) in &samples {
        let phase = match (t - start) / 1_500_000_000 {
            0 => 0,
            1 | 2 => 1,
            _ => 2,
        };
        match body.as_str() {
            "b1" => phases[phase].0 += 1,
            "b2" => phases[phase].1 += 1,
            other => panic!(
                "a request failed during the ramp: {other:?}\n{}",
                balancer.log()
            ),
        }
    }
    let shares: Vec<f64> = phases
        .iter()
        .map(|&(b1, b2)| 100.0 * b2 as f64 / (b1 + b2).max(1) as f64)
        .collect();
    println!("backend 2's share in the ramp's start, middle and end: {shares:.1?} of {phases:?}");
    assert!(shares[0] < 25.0, "the first 1.5 s: {shares:.1?}");
    assert!(
        shares[0] < shares[1] && shares[1] < shares[2],
        "no ramp: {shares:.1?}"
    );
    assert!(shares[2] > 38.0, "after the ramp: {shares:.1?}");
    assert_eq!(
        balancer.backend("web", &b2)["slow_start_percent"],
        serde_json::Value::Null
    );
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(shown.contains("slow_start 6.0s"), "{shown}");
}

/// Backends from DNS, as compose registers replicas: the service lists none and takes every
/// A record of `api`. Two replicas at start share the load; `lb set-weight` on one outlives
/// re-resolution; a third is picked up once probed; one removed from DNS takes no new flows
/// and terminates; a failing resolution keeps the backends there are.
#[test]
fn backends_from_dns_follow_the_name() {
    require_root();
    sweep_stale();
    // Compose's replicas: containers on a bridge of the balancer's host.
    let topo = Topology::containers(3);
    let _servers: Vec<Child> = (0..3).map(|i| start_server(&topo, i)).collect();
    let resolver = NetnsResolver::new(&topo.lb.name);
    let [a1, a2, a3] = [0, 1, 2].map(|i| topo.backend_addrs[i]);
    resolver.hosts(&[a1, a2]);
    let interfaces: Vec<String> = topo
        .lb_interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    let config = format!(
        "interfaces = [{}]\n[host]\ncgroup = \"off\"\n[flows]\ncapacity = 65536\n[[service]]\nname = \"api\"\nvip = \"{VIP}:80\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n\
         [service.discovery]\ndns = \"api:{BACKEND_PORT}\"\ninterval = \"300ms\"\n",
        interfaces.join(", ")
    );
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    let b = |a: std::net::Ipv4Addr| format!("{a}:{BACKEND_PORT}");
    let backends = |balancer: &Balancer| -> Vec<(String, String, bool)> {
        let status = balancer.status();
        status["services"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["source"].as_str().unwrap_or_default().to_owned(),
                    b["healthy"] == true,
                )
            })
            .collect()
    };
    let shown = backends(&balancer);
    assert_eq!(
        shown,
        [(b(a1), "dns".into(), true), (b(a2), "dns".into(), true)],
        "at start"
    );
    let (counts, failed) = tally(&http_requests(&topo, 100), 3);
    println!("two replicas from DNS: {counts:?}, {failed} failed");
    assert!(
        failed == 0 && counts[0] > 0 && counts[1] > 0 && counts[2] == 0,
        "{counts:?}"
    );

    cli_ok(&balancer, &["set-weight", "api", &b(a2), "3"]);
    resolver.hosts(&[a1, a2, a3]);
    balancer.wait_until(Duration::from_secs(5), "the third replica up", |bal| {
        backends(bal).contains(&(b(a3), "dns".into(), true))
    });
    assert_eq!(
        balancer.backend("api", &b(a2))["weight"],
        3,
        "set-weight outlived re-resolution"
    );
    let (counts, failed) = tally(&http_requests(&topo, 150), 3);
    println!("three replicas, the second at weight 3: {counts:?}, {failed} failed");
    assert!(failed == 0 && counts.iter().all(|&c| c > 0), "{counts:?}");
    assert!(counts[1] > counts[0] && counts[1] > counts[2], "{counts:?}");

    resolver.hosts(&[a2, a3]);
    balancer.wait_until(Duration::from_secs(5), "the first replica gone", |bal| {
        !backends(bal).iter().any(|(a, _, _)| *a == b(a1))
    });
    let leaving = balancer.status()["terminating"].clone();
    assert!(
        leaving.to_string().contains(&b(a1)),
        "terminating: {leaving}"
    );
    let (counts, failed) = tally(&http_requests(&topo, 100), 3);
    println!("the first replica removed from DNS: {counts:?}, {failed} failed");
    assert_eq!((counts[0], failed), (0, 0), "{counts:?}");

    // The name stops resolving: the service keeps its backends and says why.
    resolver.hosts::<std::net::Ipv4Addr>(&[]);
    balancer.wait_until(Duration::from_secs(5), "the failure shown", |bal| {
        bal.status()["services"][0]["discovery_error"].is_string()
    });
    assert_eq!(backends(&balancer).len(), 2);
    let (_, failed) = tally(&http_requests(&topo, 50), 3);
    assert_eq!(failed, 0);
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        shown.contains(&format!("discovery api:{BACKEND_PORT} (failing")),
        "{shown}"
    );
    resolver.hosts(&[a2, a3]);
    balancer.wait_until(
        Duration::from_secs(5),
        "the discovery answering again",
        |bal| bal.status()["services"][0]["discovery_error"].is_null(),
    );
}

/// Clients on the balancer's host are balanced at connect time by the socket hooks, attached to
/// a child cgroup the test made: the 4:6 split for curl at the VIP, the application seeing the
/// VIP as its peer (getpeername), a UDP answer coming from the VIP (recvmsg), a VIP on a host
/// address reached at 127.0.0.1 and its port, and nothing done to a process of the same cgroup
/// in another network namespace.
#[test]
fn clients_on_the_host_are_balanced_at_connect_time() {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::Two, 2);
    let _servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let cgroup = ClientCgroup::new(&topo.lb.name);
    let config = topo.config(&[4, 6]).replace(
        "cgroup = \"off\"",
        &format!("cgroup = \"{}\"", cgroup.child.display()),
    );
    let mut balancer = Balancer::start(&lb_binary(), &topo, &config);
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        shown.contains(&format!(
            "host clients: balanced in cgroup {}",
            cgroup.child.display()
        )),
        "{shown}"
    );

    let out = cgroup.run_in(
        &topo.lb,
        &format!(
            "for i in $(seq 400); do curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL; done"
        ),
    );
    let bodies: Vec<String> = out.lines().map(str::to_owned).collect();
    let (counts, failed) = tally(&bodies, 2);
    println!("400 connections from the balancer's host at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "{out}");
    assert_share(&balancer, &counts, 40.0, 7.0, "host clients' 4:6 split");
    assert_eq!(counter(&balancer, "event_host_balanced"), 400);

    let peer = cgroup.run_in(
        &topo.lb,
        &format!(
            "python3 -c \"import socket; s = socket.create_connection(('{VIP}', 80), 2); print(s.getpeername())\""
        ),
    );
    assert_eq!(peer.trim(), format!("('{VIP}', 80)"), "getpeername");
    let answer = cgroup.run_in(
        &topo.lb,
        &format!(
            "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b'ping', ('{VIP}', 53)); d, a = s.recvfrom(100); print(d.decode(), a)\""
        ),
    );
    let answer = answer.trim();
    assert!(
        (answer.starts_with("b1: ping") || answer.starts_with("b2: ping"))
            && answer.ends_with(&format!("('{VIP}', 53)")),
        "UDP answer: {answer:?}"
    );

    // A VIP on a host address answers on localhost too, as a published port does.
    let (b1, b2) = (backend(&topo, 0), backend(&topo, 1));
    cli_ok(
        &balancer,
        &[
            "service",
            "add",
            "local",
            "198.18.0.1:8080",
            "--backend",
            &b1,
            "--backend",
            &b2,
        ],
    );
    balancer.wait_health("local", &b2, true, Duration::from_secs(5));
    let out = cgroup.run_in(
        &topo.lb,
        "for i in $(seq 20); do curl -s --max-time 2 http://127.0.0.1:8080/ || echo FAIL; done",
    );
    let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!("20 connections to 127.0.0.1:8080: {counts:?}, {failed} failed");
    assert!(failed == 0 && counts[0] > 0 && counts[1] > 0, "{out}");

    // The cgroup's processes in another namespace are the data path's, not the hooks'.
    let before = counter(&balancer, "event_host_balanced");
    let out = cgroup.run_in(&topo.client, &format!("curl -s --max-time 2 http://{VIP}/"));
    let out = out.trim();
    assert!(
        out == "b1" || out == "b2",
        "from the client namespace: {out:?}"
    );
    assert_eq!(counter(&balancer, "event_host_balanced"), before);

    // The hooks are pinned: they balance while no daemon runs, a restart takes them over
    // without a second set, and `lb remove` ends them.
    let twenty = format!(
        "for i in $(seq 20); do curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL; done"
    );
    let served = |out: String| tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    assert!(balancer.stop(), "lb run did not exit cleanly");
    let (_, failed) = served(cgroup.run_in(&topo.lb, &twenty));
    assert_eq!(failed, 0, "host clients while no daemon runs");
    balancer.restart();
    let pins = balancer.bpffs.clone();
    // `lb remove` takes the directory too, once it is empty.
    let host_links = || {
        std::fs::read_dir(&pins).map_or(0, |dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("host_"))
                .count()
        })
    };
    assert_eq!(
        host_links(),
        lb_user::dataplane::HOST_PROGRAMS.len(),
        "one pinned link per hook after a restart"
    );
    let (counts, failed) = served(cgroup.run_in(&topo.lb, &twenty));
    assert!(
        failed == 0 && counts.iter().sum::<usize>() == 20,
        "after a restart: {counts:?}"
    );
    assert_eq!(counter(&balancer, "event_host_balanced"), before + 40);
    assert!(balancer.stop(), "lb run did not exit cleanly");
    let removed = balancer.remove();
    assert!(removed.status.success(), "lb remove: {removed:?}");
    assert_eq!(host_links(), 0);
    let out = cgroup.run_in(
        &topo.lb,
        &format!("curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL"),
    );
    assert_eq!(out.trim(), "FAIL", "a host client after lb remove");
}

/// The classic single-host deployment: the backends are containers on a bridge of the
/// balancer's host, with their default offloads (partial checksums, TSO). XDP runs on the
/// client-side NIC, the tc program on the bridge's ports (and `lb status` says why); new
/// connections split 4:6, from outside and from the host itself (at a service on the host's
/// address and at localhost, as a published port), a 1 MB download (the containers' GSO
/// replies) arrives whole, with its handshake's MSS clamped both ways, UDP answers, a
/// container's own connections to the VIP are balanced, and a restarted container (a new
/// veth) is picked up.
#[test]
fn containers_on_a_bridge_with_their_default_offloads_are_balanced() {
    require_root();
    sweep_stale();
    let topo = Topology::containers(2);
    let _servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let cgroup = ClientCgroup::new(&topo.lb.name);
    // As a published port: a service on the host's own address, port 8080.
    // A bridge made as `ip link add` makes one: without a MAC of its own.
    topo.lb
        .sh("ip link add br-bare type bridge && ip link set br-bare up");
    let mut config = topo
        .config(&[4, 6])
        .replace(
            "cgroup = \"off\"",
            &format!("cgroup = \"{}\"", cgroup.child.display()),
        )
        .replace("\"br-api\"]", "\"br-api\", \"br-bare\"]");
    // Its handshakes clamped: the client's SYN at XDP, the container's SYN-ACK at tc.
    config += "[[service]]\nname = \"site\"\nvip = \"198.18.0.1:8080\"\nmss = 1200\n";
    for (addr, weight) in topo.backend_addrs.iter().zip([4, 6]) {
        config += &format!(
            "[[service.backend]]\naddress = \"{addr}:{BACKEND_PORT}\"\nweight = {weight}\n"
        );
    }
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    let hooks = |balancer: &Balancer| -> Vec<(String, String)> {
        balancer.status()["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .map(|i| {
                (
                    i["name"].as_str().unwrap_or_default().to_owned(),
                    i["mode"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let mut shown = hooks(&balancer);
    shown.sort();
    assert_eq!(
        shown,
        [
            ("br-api".into(), "bridge".into()),
            ("br-bare".into(), "bridge".into()),
            ("lb0".into(), "native".into()),
            ("vc1".into(), "tc".into()),
            ("vc2".into(), "tc".into())
        ],
        "hooks"
    );
    let text = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("  vc1 ") && l.contains(" tc      a port of bridge br-api")),
        "{text}"
    );
    // Its MAC can move as containers come and go; br-api's (set, as Docker sets one) cannot.
    wait_for_warning(&balancer, &["bridge br-bare has no MAC of its own"]);
    let warnings = balancer.status()["warnings"].to_string();
    assert!(!warnings.contains("br-api"), "{warnings}");

    let (counts, failed) = tally(&http_requests(&topo, 400), 2);
    println!("400 connections to containers at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 7.0, "containers' 4:6 split");
    // Clients on the host: at the published address, and at localhost as a published port.
    balancer.wait_health("site", &backend(&topo, 1), true, Duration::from_secs(5));
    for url in ["http://198.18.0.1:8080/", "http://127.0.0.1:8080/"] {
        let out = cgroup.run_in(
            &topo.lb,
            &format!(
                "for i in $(seq 400); do curl -s --connect-timeout 1 --max-time 2 {url} || echo FAIL; done"
            ),
        );
        let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
        println!("400 host connections to {url} at 4:6: {counts:?}, {failed} failed");
        assert_eq!(failed, 0, "{url}: {out}");
        // 3.3 standard deviations of a 400-connection share: two such checks here, several
        // in the suite.
        assert_share(&balancer, &counts, 40.0, 8.0, url);
    }
    let out = topo.client.sh(
        "for i in $(seq 100); do curl -s --connect-timeout 1 --max-time 2 http://198.18.0.1:8080/ || echo FAIL; done",
    );
    let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!("100 external connections to 198.18.0.1:8080: {counts:?}, {failed} failed");
    assert!(failed == 0 && counts[0] > 0 && counts[1] > 0, "{counts:?}");
    let clamped = counter(&balancer, "event_mss_clamped");
    assert!(clamped >= 200, "SYNs and SYN-ACKs clamped: {clamped}");
    let (out, ok) = curl_in(
        &topo.client,
        "-o /dev/null -w '%{size_download}' http://198.18.0.1:8080/bytes/1000000",
    );
    assert!(ok && out == "1000000", "a clamped 1 MB download: {out}");
    let (out, ok) = curl_in(
        &topo.client,
        &format!("-o /dev/null -w '%{{size_download}}' http://{VIP}/bytes/1000000"),
    );
    assert!(
        ok && out == "1000000",
        "a 1 MB download from a container: {out}"
    );
    let answer = udp_request(&topo, "hello", 41999);
    assert!(
        answer == "b1: hello" || answer == "b2: hello",
        "UDP answer: {answer:?}"
    );
    // A container is a client of the service too (its own replica included).
    assert_a_container_is_balanced(&balancer, &topo, &format!("http://{VIP}/"));

    // A container restarts: its veth is a new device, and the tc program follows it.
    let before = balancer.backend("web", &backend(&topo, 1))["new_flows"]
        .as_u64()
        .expect("new flows");
    topo.plug_container(1);
    balancer.wait_until(Duration::from_secs(5), "the new port attached", |b| {
        let status = b.status();
        let new_index: u64 = topo
            .lb
            .sh("cat /sys/class/net/vc2/ifindex")
            .trim()
            .parse()
            .expect("an ifindex");
        status["interfaces"].as_array().is_some_and(|a| {
            a.iter()
                .any(|i| i["name"] == "vc2" && i["ifindex"] == new_index)
        })
    });
    balancer.wait_health("web", &backend(&topo, 1), true, Duration::from_secs(5));
    let answers = http_requests(&topo, 100);
    let (counts, failed) = tally(&answers, 2);
    println!("after container 2 restarted: {counts:?}, {failed} failed");
    assert!(
        failed == 0 && counts[1] > 0,
        "{counts:?}, failed at {:?}\ncounters:\n{}\nlog:\n{}",
        answers
            .iter()
            .enumerate()
            .filter(|(_, a)| *a == "FAIL")
            .map(|(i, _)| i)
            .collect::<Vec<_>>(),
        balancer.nonzero_counters(),
        balancer.log()
    );
    let after = balancer.backend("web", &backend(&topo, 1))["new_flows"]
        .as_u64()
        .expect("new flows");
    assert!(after > before);
}

/// A container's server stops (its kernel refuses new connections with RST), and later the
/// container itself goes (its veth deleted, SYNs unanswered): with health checks at the
/// default pace, the data path carries the clients through the seconds before they notice,
/// whichever hook sees the container's answer.
#[test]
fn a_stopped_or_removed_container_fails_no_connection() {
    let setup = setup_containers_with(&[4, 6], default_health_pace);
    no_connection_fails_across_backend_faults(setup, |topo| {
        topo.lb.sh("ip link del vc1");
    });
}

/// The single-host deployment over IPv6: a client's packets meet XDP on lb0 and go up to the
/// kernel for the bridge; the containers' replies (partial checksums, GSO, their default
/// offloads) meet the tc program on their ports, which translates them back from the VIP.
/// New connections split 4:6 with none failed, a 1 MB download arrives whole, UDP answers,
/// and a container's own connections to the VIP are balanced at its port.
#[test]
fn containers_serve_ipv6_clients_through_the_tc_hook() {
    require_root();
    sweep_stale();
    let topo = Topology::containers(2);
    let addrs6 = topo.add_ipv6();
    let config = dual_stack_config(&topo, &addrs6, &[4, 6]);
    let Setup { topo, balancer, .. } = setup_on(topo, &[4, 6], |_| config);
    for addr in &addrs6 {
        let b6 = format!("[{addr}]:{BACKEND_PORT}");
        balancer.wait_health("web6", &b6, true, Duration::from_secs(5));
    }
    let before = counter(&balancer, "redirect");
    let (counts, failed) = tally(&http_requests6(&topo, 400), 2);
    println!("400 IPv6 connections to containers at 4:6: {counts:?}, {failed} failed");
    assert_eq!(
        failed,
        0,
        "counters:\n{}\nlog:\n{}",
        balancer.nonzero_counters(),
        balancer.log()
    );
    assert_share(&balancer, &counts, 40.0, 8.0, "IPv6 containers' 4:6 split");
    // Every reply segment was the tc program's to send: a handshake and a response each.
    let redirected = counter(&balancer, "redirect") - before;
    assert!(redirected >= 2 * 400, "replies redirected: {redirected}");
    let (out, ok) = curl_in(
        &topo.client,
        &format!("-g -o /dev/null -w '%{{size_download}}' http://[{VIP6}]/bytes/1000000"),
    );
    assert!(ok && out == "1000000", "a 1 MB download over IPv6: {out}");
    let answer = topo
        .client
        .sh(&format!("printf 'hello6' | nc -u -w1 -p 40053 {VIP6} 53"));
    assert!(
        answer.trim() == "b1: hello6" || answer.trim() == "b2: hello6",
        "UDP over IPv6 answered {answer:?}\n{}",
        balancer.nonzero_counters()
    );
    // A container is a client of the IPv6 service too: balanced at its port's tc hook.
    assert_a_container_is_balanced(&balancer, &topo, &format!("http://[{VIP6}]/"));
}

/// 100 connections from container 1 to `url` (a service's VIP): none failed, and both
/// containers served some (its own replica included).
fn assert_a_container_is_balanced(balancer: &Balancer, topo: &Topology, url: &str) {
    let out = topo.backends[0].sh(&format!(
        "for i in $(seq 100); do curl -s -g --connect-timeout 1 --max-time 2 {url} || echo FAIL; done"
    ));
    let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!("100 connections from container 1 to {url}: {counts:?}, {failed} failed");
    assert!(
        failed == 0 && counts[0] > 0 && counts[1] > 0,
        "{out}\ncounters:\n{}",
        balancer.nonzero_counters()
    );
}

#[test]
fn one_arm_tcp_splits_by_weight_and_udp_answers() {
    let Setup { topo, balancer, .. } = setup(Arms::One, &[4, 6]);
    let bodies = http_requests(&topo, 1000);
    let (counts, failed) = tally(&bodies, 2);
    println!("one-arm, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "one-arm 4:6 split");

    let mut served = [0usize; 2];
    for i in 0..20u16 {
        let answer = udp_request(&topo, &format!("ping{i}"), 41000 + i);
        let backend = match answer.split_once(": ") {
            Some((name, payload)) if payload == format!("ping{i}") => name.to_owned(),
            _ => panic!("UDP request {i}: answer {answer:?}\n{}", balancer.log()),
        };
        served[if backend == "b1" { 0 } else { 1 }] += 1;
    }
    println!("one-arm UDP: 20 requests answered, by backend {served:?}");
    let udp_flows: u64 = per_backend(&balancer, &topo, "dns", "new_flows")
        .iter()
        .sum();
    assert_eq!(udp_flows, 20);
}

/// `lb explain --json` for a client port of the client namespace.
fn explain(balancer: &Balancer, service: &str, port: u16) -> serde_json::Value {
    let out = balancer.cli(&["explain", "--json", service, &format!("{CLIENT}:{port}")]);
    assert!(
        out.status.success(),
        "lb explain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lb explain --json prints JSON")
}

#[test]
fn explain_agrees_with_the_backends_that_served_1000_flows() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[4, 6]);
    let addrs: Vec<String> = (0..2).map(|i| backend(&topo, i)).collect();
    // Ports the client's kernel would not pick itself, spread out, each used once.
    let ports: Vec<u16> = (0..1000u16).map(|i| 20_000 + i * 7).collect();
    let predicted: Vec<String> = ports
        .iter()
        .map(|&port| {
            let e = explain(&balancer, "web", port);
            assert!(e["existing"].is_null(), "a flow before any traffic: {e}");
            e["new_flow"]["backend"]
                .as_str()
                .unwrap_or_else(|| panic!("no backend for a new flow: {e}"))
                .to_owned()
        })
        .collect();
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let out = topo.client.sh(&format!(
        "for p in {list}; do curl -s --local-port $p --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL; done"
    ));
    let bodies: Vec<&str> = out.lines().collect();
    assert_eq!(bodies.len(), ports.len(), "{out}");
    let mut disagreements = Vec::new();
    for ((port, want), body) in ports.iter().zip(&predicted).zip(&bodies) {
        let served = match *body {
            "b1" => &addrs[0],
            "b2" => &addrs[1],
            other => panic!("port {port}: {other:?}\n{}", balancer.log()),
        };
        if served != want {
            disagreements.push(format!("port {port}: explained {want}, served by {served}"));
        }
    }
    let (counts, _) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!(
        "explain: 1000 flows predicted, {} disagreements; served {counts:?}",
        disagreements.len()
    );
    assert!(disagreements.is_empty(), "{disagreements:#?}");

    // The flows just made are in the table, with the backend that served them.
    for (port, body) in ports.iter().zip(&bodies).rev().take(20) {
        let e = explain(&balancer, "web", *port);
        let served = if *body == "b1" { &addrs[0] } else { &addrs[1] };
        assert_eq!(
            e["existing"]["backend"],
            served.as_str(),
            "port {port}: {e}"
        );
    }
    // A drained backend takes no new flow: the explanation follows at once.
    let drained = ports
        .iter()
        .zip(&predicted)
        .find(|(_, b)| **b == addrs[0])
        .map(|(p, _)| *p)
        .expect("backend 1 had flows");
    assert!(
        balancer
            .cli(&["set-weight", "web", &addrs[0], "0"])
            .status
            .success()
    );
    let e = explain(&balancer, "web", drained);
    assert_eq!(e["new_flow"]["backend"], addrs[1].as_str(), "{e}");
    let row = e["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == addrs[0].as_str()))
        .cloned()
        .expect("backend 1 in the explanation");
    assert_eq!(row["weight"], 0);
    assert_eq!(row["table_percent"], 0.0);

    // The text names the choice; bad input is refused with exit 2.
    let out = balancer.cli(&["explain", "web", &format!("{CLIENT}:{drained}")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("new flow: backend {}", addrs[1])),
        "{text}"
    );
    for (args, message) in [
        (
            vec!["explain", "nosuch", "198.18.0.2:1"],
            "no service named \"nosuch\"",
        ),
        (
            vec!["explain", "--protocol", "udp", "web", "198.18.0.2:1"],
            "service \"web\" is tcp, not udp",
        ),
        (vec!["explain", "web", "198.18.0.2"], "invalid value"),
    ] {
        let out = balancer.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// A client connection in the client namespace, for a connection kept open across changes.
fn connect_in(ns: &Netns) -> TcpStream {
    ns.spawn_inside(|| {
        TcpStream::connect((VIP, 80)).expect("connect to the VIP from the client namespace")
    })
    .join()
    .expect("connect thread")
}

/// Sends one keep-alive request and returns the body (the backend's name).
fn request_on(stream: &mut TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    keep_alive_request(stream).expect("a request on the long-lived connection")
}

#[test]
fn set_weight_moves_new_flows_and_keeps_a_long_lived_connection() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[4, 6]);
    let mut long_lived = connect_in(&topo.client);
    let first = request_on(&mut long_lived);
    println!("long-lived connection served by {first}");

    // 500 connections at 1:1: one standard deviation is 2.2 points; ±9 is 4 of them.
    for (weights, want_b1) in [([0, 10], 0.0), ([10, 0], 100.0), ([1, 1], 50.0)] {
        for (i, w) in weights.iter().enumerate() {
            let out = balancer.cli(&["set-weight", "web", &backend(&topo, i), &w.to_string()]);
            assert!(
                out.status.success(),
                "set-weight: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            balancer.backend("web", &backend(&topo, 0))["weight"],
            weights[0]
        );
        let (counts, failed) = tally(&http_requests(&topo, 500), 2);
        println!("weights {weights:?}: {counts:?}");
        assert_eq!(failed, 0);
        let points = if want_b1 == 50.0 { 9.0 } else { 0.0 };
        assert_share(
            &balancer,
            &counts,
            want_b1,
            points,
            &format!("weights {weights:?}"),
        );
        assert_eq!(
            request_on(&mut long_lived),
            first,
            "the long-lived connection moved after weights {weights:?}"
        );
    }
    // The VIP:PORT form names the same service.
    let out = balancer.cli(&["set-weight", &format!("{VIP}:80"), &backend(&topo, 0), "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(balancer.backend("web", &backend(&topo, 0))["weight"], 3);
}

/// The IPv4 services of `Topology::config` and their IPv6 twins "web6" and "dns6" on
/// [VIP6]:80 and :53 over the backends' IPv6 addresses, with these weights.
fn dual_stack_config(topo: &Topology, addrs6: &[std::net::Ipv6Addr], weights: &[u32]) -> String {
    let mut text = topo.config(weights);
    for (name, port, proto) in [("web6", 80, "tcp"), ("dns6", 53, "udp")] {
        text += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"[{VIP6}]:{port}\"\nprotocol = \"{proto}\"\n\
             [service.health]\nkind = \"tcp\"\nport = {BACKEND_PORT}\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"
        );
        for (addr, weight) in addrs6.iter().zip(weights) {
            text += &format!(
                "[[service.backend]]\naddress = \"[{addr}]:{BACKEND_PORT}\"\nweight = {weight}\n"
            );
        }
    }
    text
}

/// `count` HTTP requests over IPv6 from the client to [VIP6]:80, each on a new connection.
fn http_requests6(topo: &Topology, count: usize) -> Vec<String> {
    http_requests_at(topo, &format!("http://[{VIP6}]"), count)
}

/// `count` HTTP requests from the client to `url`'s root, each on a new connection: each
/// answer's body, or FAIL.
fn http_requests_at(topo: &Topology, url: &str, count: usize) -> Vec<String> {
    let out = topo.client.try_sh(&format!(
        "for i in $(seq {count}); do curl -s -g --connect-timeout 1 --max-time 2 {url}/ || echo FAIL; done"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// IPv6 end to end, in NAT66 beside IPv4 services on the same daemon: the 4:6 split of new
/// connections, `lb explain` agreeing with the data path's choice, a UDP exchange, `set-weight`
/// moving new flows while a long-lived connection stays, backends from AAAA records, a restart
/// that keeps the long-lived connection, and failover to the survivor when a backend stops.
#[test]
fn ipv6_splits_4_6_follows_set_weight_keeps_a_long_lived_connection_and_fails_over() {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::Two, 2);
    let addrs6 = topo.add_ipv6();
    let mut servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    // Before the daemon starts: `ip netns exec` mounts the namespace's hosts file as it starts.
    let resolver = NetnsResolver::new(&topo.lb.name);
    let mut balancer = Balancer::start(
        &lb_binary(),
        &topo,
        &dual_stack_config(&topo, &addrs6, &[4, 6]),
    );
    let b6 = |i: usize| format!("[{}]:{BACKEND_PORT}", addrs6[i]);
    for i in 0..2 {
        balancer.wait_health("web6", &b6(i), true, Duration::from_secs(5));
    }

    let mut long_lived = topo
        .client
        .spawn_inside(|| TcpStream::connect((VIP6, 80)).expect("connect to [VIP6]:80"))
        .join()
        .expect("connect thread");
    let first = request_on(&mut long_lived);
    println!("IPv6 long-lived connection served by {first}");

    let (counts, failed) = tally(&http_requests6(&topo, 1000), 2);
    println!("IPv6, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "IPv6 4:6 split");
    let new_flows: Vec<u64> = (0..2)
        .map(|i| {
            balancer.backend("web6", &b6(i))["new_flows"]
                .as_u64()
                .expect("a number")
        })
        .collect();
    // The 1000, and the long-lived connection.
    assert_eq!(new_flows.iter().sum::<u64>(), 1001, "{new_flows:?}");
    // The IPv4 service beside it still serves.
    assert_eq!(tally(&http_requests(&topo, 20), 2).1, 0);

    // `lb explain` predicts the data path's choice for an IPv6 client.
    let ports: Vec<u16> = (0..20u16).map(|i| 30_000 + i * 11).collect();
    for &port in &ports {
        let client = format!("[{CLIENT6}]:{port}");
        let out = balancer.cli(&["explain", "--json", "web6", &client]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let predicted = e["new_flow"]["backend"]
            .as_str()
            .expect("a backend")
            .to_owned();
        let body = topo.client.sh(&format!(
            "curl -s -g --local-port {port} --connect-timeout 1 --max-time 2 http://[{VIP6}]/ || echo FAIL"
        ));
        let served = match body.trim() {
            "b1" => b6(0),
            "b2" => b6(1),
            other => panic!("port {port}: {other:?}\n{}", balancer.log()),
        };
        assert_eq!(served, predicted, "client port {port}: explained vs served");
    }
    // A client of the other family is refused with a reason.
    let out = balancer.cli(&["explain", "web6", &format!("{CLIENT}:40000")]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // UDP over IPv6: the answer comes back from the VIP.
    let answer = topo
        .client
        .sh(&format!("printf 'hello6' | nc -u -w1 -p 40053 {VIP6} 53"));
    assert!(
        answer.trim() == "b1: hello6" || answer.trim() == "b2: hello6",
        "UDP over IPv6 answered {answer:?}\n{}",
        balancer.log()
    );

    // Backends from AAAA records: a service added from the CLI on [VIP6]:8080 takes the name's
    // IPv6 addresses, and lets one go when the name no longer has it.
    resolver.hosts(&addrs6);
    let api6 = format!("[{VIP6}]:8080");
    cli_ok(
        &balancer,
        &["service", "add", "api6", &api6, "--discover", "api:8000"],
    );
    let discovered = |bal: &Balancer| -> Vec<(String, bool)> {
        bal.status()["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "api6"))
            .and_then(|s| s["backends"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|b| b["source"] == "dns")
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["healthy"] == true,
                )
            })
            .collect()
    };
    balancer.wait_until(Duration::from_secs(5), "both AAAA records up", |bal| {
        discovered(bal) == [(b6(0), true), (b6(1), true)]
    });
    let out = topo.client.try_sh(&format!(
        "for i in $(seq 100); do curl -s -g --connect-timeout 1 --max-time 2 http://[{VIP6}]:8080/ || echo FAIL; done"
    ));
    let (counts, failed) = tally(
        &String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
        2,
    );
    println!("api6 from AAAA records: {counts:?}, {failed} failed");
    assert!(failed == 0 && counts.iter().all(|&c| c > 0), "{counts:?}");
    resolver.hosts(&addrs6[1..]);
    balancer.wait_until(
        Duration::from_secs(5),
        "the first AAAA record gone",
        |bal| discovered(bal) == [(b6(1), true)],
    );
    cli_ok(&balancer, &["service", "remove", "api6"]);

    // set-weight by the backend's [address]:port, and the VIP's [address]:port.
    for (weights, want_b1) in [([0, 10], 0.0), ([10, 0], 100.0)] {
        for (i, w) in weights.iter().enumerate() {
            cli_ok(
                &balancer,
                &[
                    "set-weight",
                    &format!("[{VIP6}]:80"),
                    &b6(i),
                    &w.to_string(),
                ],
            );
        }
        let (counts, failed) = tally(&http_requests6(&topo, 100), 2);
        assert_eq!(failed, 0);
        assert_share(
            &balancer,
            &counts,
            want_b1,
            0.0,
            &format!("IPv6 weights {weights:?}"),
        );
        assert_eq!(
            request_on(&mut long_lived),
            first,
            "the IPv6 long-lived connection moved after weights {weights:?}"
        );
    }
    cli_ok(&balancer, &["set-weight", "web6", &b6(1), "6"]);

    // A restart adopts the IPv6 service and its flows: the long-lived connection goes on.
    let gap = balancer.restart();
    println!("restarted in {gap:?}");
    assert_eq!(request_on(&mut long_lived), first, "after the restart");
    assert_eq!(
        tally(&http_requests6(&topo, 50), 2).1,
        0,
        "after the restart"
    );

    // Stop backend 1: health checks over IPv6 take it out, and new connections go to backend 2.
    servers[0].kill().expect("stop backend 1's server");
    servers[0].wait().expect("reap backend 1's server");
    let detected = balancer.wait_health("web6", &b6(0), false, Duration::from_secs(5));
    println!("IPv6 backend 1 stopped: marked down after {detected:?}");
    let (counts, failed) = tally(&http_requests6(&topo, 200), 2);
    assert_eq!(
        (counts, failed),
        (vec![0, 200], 0),
        "after backend 1 stopped"
    );
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(shown.contains(&format!("[{VIP6}]:80")), "{shown}");
}

/// Processes on the balancer's host reaching an IPv6 VIP are balanced at connect time by the
/// IPv6 socket hooks (connect6, sendmsg6, getpeername6, recvmsg6), in a cgroup of the test's
/// own: the 4:6 split, the VIP shown as the peer, and a UDP answer from the VIP; a service on
/// the balancer's own IPv6 address is reached at [::1]:PORT, as a published port answers on
/// localhost, and shown there as the peer.
#[test]
fn ipv6_clients_on_the_host_are_balanced_at_connect_time() {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::Two, 2);
    let addrs6 = topo.add_ipv6();
    let _servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let cgroup = ClientCgroup::new(&topo.lb.name);
    // A service on the balancer's own IPv6 address, as a published port: reached at ::1 too.
    let mut published = "[[service]]\nname = \"published6\"\nvip = \"[fd00::1]:8080\"\n\
                         [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\n"
        .to_owned();
    for addr in &addrs6 {
        published += &format!("[[service.backend]]\naddress = \"[{addr}]:{BACKEND_PORT}\"\n");
    }
    let config = dual_stack_config(&topo, &addrs6, &[4, 6]).replace(
        "cgroup = \"off\"",
        &format!("cgroup = \"{}\"", cgroup.child.display()),
    ) + &published;
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    for addr in &addrs6 {
        let b = format!("[{addr}]:{BACKEND_PORT}");
        balancer.wait_health("web6", &b, true, Duration::from_secs(5));
        balancer.wait_health("published6", &b, true, Duration::from_secs(5));
    }
    let out = cgroup.run_in(
        &topo.lb,
        &format!(
            "for i in $(seq 300); do curl -s -g --connect-timeout 1 --max-time 2 http://[{VIP6}]/ || echo FAIL; done"
        ),
    );
    let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!("300 IPv6 connections from the balancer's host at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "{out}");
    // 300 at 40%: one standard deviation is 2.8 points; ±10 is 3.5 of them.
    assert_share(
        &balancer,
        &counts,
        40.0,
        10.0,
        "IPv6 host clients' 4:6 split",
    );
    assert_eq!(counter(&balancer, "event_host_balanced"), 300);

    let peer = cgroup.run_in(
        &topo.lb,
        &format!(
            "python3 -c \"import socket; s = socket.create_connection(('{VIP6}', 80), 2); print(s.getpeername()[:2])\""
        ),
    );
    assert_eq!(peer.trim(), format!("('{VIP6}', 80)"), "getpeername");
    let answer = cgroup.run_in(
        &topo.lb,
        &format!(
            "python3 -c \"import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b'ping', ('{VIP6}', 53)); d, a = s.recvfrom(100); print(d.decode(), a[:2])\""
        ),
    );
    let answer = answer.trim();
    assert!(
        (answer.starts_with("b1: ping") || answer.starts_with("b2: ping"))
            && answer.ends_with(&format!("('{VIP6}', 53)")),
        "UDP answer: {answer:?}"
    );

    let before = counter(&balancer, "event_host_balanced");
    let out = cgroup.run_in(
        &topo.lb,
        "for i in $(seq 20); do curl -s -g --max-time 2 http://[::1]:8080/ || echo FAIL; done",
    );
    let (counts, failed) = tally(&out.lines().map(str::to_owned).collect::<Vec<_>>(), 2);
    println!("20 connections to [::1]:8080: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "{out}");
    assert_eq!(counter(&balancer, "event_host_balanced") - before, 20);
    let peer = cgroup.run_in(
        &topo.lb,
        "python3 -c \"import socket; s = socket.create_connection(('::1', 8080), 2); print(s.getpeername()[:2])\"",
    );
    assert_eq!(peer.trim(), "('::1', 8080)", "getpeername at ::1");
}

#[test]
fn cli_rejects_bad_input_with_exit_2_and_the_daemon_survives() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    let b1 = backend(&topo, 0);
    let cases: [(&[&str], &str); 5] = [
        (
            &["set-weight", "nosuch", &b1, "1"],
            "no service named \"nosuch\"",
        ),
        (
            &["set-weight", "web", "198.18.9.9:1", "1"],
            "backend 198.18.9.9:1 is not in service \"web\"",
        ),
        (&["set-weight", "web", &b1, "10001"], "out of range"),
        (
            &["set-weight", "web", "not-an-address", "1"],
            "not an address with port",
        ),
        (&["set-weight", "web", &b1, "-1"], "unexpected argument"),
    ];
    for (args, message) in cases {
        let out = balancer.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{args:?}: stderr {stderr:?} lacks {message:?}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            if message == "unexpected argument" {
                stderr.trim().lines().count()
            } else {
                1
            },
            "{args:?}: one line: {stderr}"
        );
    }
    // Garbage on the socket does not hurt the daemon.
    let mut raw = std::os::unix::net::UnixStream::connect(&balancer.socket).expect("connect");
    raw.write_all(b"\x00\xffnot json at all\n").expect("write");
    let mut answer = String::new();
    raw.read_to_string(&mut answer).expect("read");
    assert!(answer.contains("\"bad_input\":true"), "{answer}");
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!((counts.iter().sum::<usize>(), failed), (20, 0));

    // No daemon: exit 1 and a hint.
    let out = std::process::Command::new(lb_binary())
        .args(["status", "--socket", "/nonexistent/lb.sock"])
        .output()
        .expect("run lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is \"lb run\" running?"), "{stderr}");
}

#[test]
fn lb_run_reports_config_errors_with_their_line_and_exit_2() {
    require_root();
    let dir = std::env::temp_dir().join(format!("lbt-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "interfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n[[service.backend]]\naddress = \"198.18.1.11:8000\"\nweight = 70000\n").expect("write");
    let out = std::process::Command::new(lb_binary())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 7") && stderr.contains("weight"),
        "{stderr}"
    );
    let out = std::process::Command::new(lb_binary())
        .args(["run", "--config", "/nonexistent.toml"])
        .output()
        .expect("run lb");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
    // Without privileges: exit 1 and what is needed (setpriv drops to nobody, no capabilities).
    std::fs::write(&path, "interfaces = [\"lo\"]\n").expect("write");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(lb_binary())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn closed_and_idle_flows_expire_while_an_open_connection_stays() {
    let Setup { topo, balancer, .. } = setup_with_flows(
        Arms::Two,
        &[1, 1],
        "tcp_closing_timeout = \"1s\"\nudp_idle_timeout = \"3s\"\n",
    );
    let mut long_lived = connect_in(&topo.client);
    let served_by = request_on(&mut long_lived);
    let (counts, failed) = tally(&http_requests(&topo, 50), 2);
    assert_eq!((counts.iter().sum::<usize>(), failed), (50, 0));
    for i in 0..5u16 {
        assert!(udp_request(&topo, "x", 42000 + i).ends_with(": x"));
    }
    // Each nc waits a second after its answer, so the last UDP flow is about 2.5 s idle here:
    // still inside its 3 s timeout, while the closed TCP flows are gone.
    std::thread::sleep(Duration::from_millis(1500));
    let busy = balancer.flow_entries();
    assert!(busy > 2, "flow table after traffic: {busy} entries");
    // Closed TCP flows go after 1 s, idle UDP flows after 3 s; the sweeper runs every second.
    balancer.wait_until(Duration::from_secs(10), "expired down to 2 entries", |b| {
        b.flow_entries() == 2
    });
    println!(
        "flow table: {busy} entries after traffic, 2 (the open connection) once the rest expired"
    );
    assert_eq!(
        request_on(&mut long_lived),
        served_by,
        "the open connection survived the sweeps"
    );
    let active: u64 = per_backend(&balancer, &topo, "web", "active_flows")
        .iter()
        .sum();
    assert_eq!(active, 1, "the open connection is the one active flow");
}

#[test]
fn a_request_on_an_expired_connection_is_reset_at_once() {
    let Setup { topo, balancer, .. } =
        setup_with_flows(Arms::Two, &[1, 1], "tcp_idle_timeout = \"1s\"\n");
    let mut idle = connect_in(&topo.client);
    request_on(&mut idle);
    let waited = assert_reset_once_expired(&balancer, &mut idle);
    println!("request on the expired connection reset after {waited:?}");
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(
        (counts.iter().sum::<usize>(), failed),
        (20, 0),
        "reconnecting works"
    );
}

/// The same for a container's connection to a VIP, whose segments meet the tc hook on its
/// bridge port: the RST goes back out of that port, over the container's partial checksums.
#[test]
fn a_containers_request_on_an_expired_connection_is_reset_at_once() {
    let Setup { topo, balancer, .. } = setup_containers_with(&[1, 1], |config| {
        config.replace(
            "capacity = 65536\n",
            "capacity = 65536\ntcp_idle_timeout = \"1s\"\n",
        )
    });
    let mut idle = connect_in(&topo.backends[0]);
    let served_by = request_on(&mut idle);
    let waited = assert_reset_once_expired(&balancer, &mut idle);
    println!(
        "container 1's request on its expired connection (served by {served_by}) reset after {waited:?}"
    );
    assert_a_container_is_balanced(&balancer, &topo, &format!("http://{VIP}/"));
}

/// Waits until the idle connection `stream`'s flow is past its 1-s timeout, then sends a
/// request on it: it must fail with a reset within a second (without the RST the client would
/// retransmit into silence for minutes), counted. How long the reset took.
fn assert_reset_once_expired(balancer: &Balancer, stream: &mut TcpStream) -> Duration {
    // Past the timeout, the flow is gone whether a sweep removed it or the data path finds it
    // expired (the status's entry count, from the last sweep, can lag by a second).
    std::thread::sleep(Duration::from_millis(2500));
    let resets_before = counter(balancer, "event_reset_no_flow");
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let outcome = keep_alive_request(stream);
    let waited = started.elapsed();
    let error = outcome.expect_err("a request on a flow the balancer forgot");
    assert!(
        error.contains("Connection reset by peer"),
        "after {waited:?}: {error}\ncounters:\n{}",
        balancer.nonzero_counters()
    );
    assert!(waited < Duration::from_secs(1), "the reset took {waited:?}");
    assert!(counter(balancer, "event_reset_no_flow") > resets_before);
    waited
}

/// Established TCP connections from the balancer's SNAT address to `backend`'s server, as the
/// backend's kernel sees them.
fn established_at(topo: &Topology, backend: usize) -> usize {
    topo.backends[backend]
        .sh(&format!(
            "ss -Htn state established '( sport = :{BACKEND_PORT} )'"
        ))
        .lines()
        .count()
}

/// Asserts that `stream` was reset: the request fails with ECONNRESET, not a timeout.
fn assert_reset(stream: &mut TcpStream, what: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let error = keep_alive_request(stream).expect_err(what);
    assert!(
        error.contains("Connection reset by peer"),
        "{what}: {error}"
    );
}

/// A backend whose health check (on its own port) fails for a few intervals while its service
/// runs, with `on_backend_down = policy`. Returns the long-lived connection to it, the
/// topology, the balancer and the backend's index, once the backend is down.
fn health_blip(policy: &str) -> (TcpStream, String, Setup, usize) {
    require_root();
    sweep_stale();
    const HEALTH_PORT: u16 = 9000;
    let topo = Topology::new(Arms::Two, 2);
    let mut servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let mut checks: Vec<Child> = (0..2)
        .map(|i| start_server_on(&topo, i, HEALTH_PORT))
        .collect();
    let config = topo
        .config(&[1, 1])
        .replace(
            &format!("port = {BACKEND_PORT}\n"),
            &format!("port = {HEALTH_PORT}\n"),
        )
        .replace(
            "protocol = \"tcp\"\n",
            &format!("protocol = \"tcp\"\non_backend_down = \"{policy}\"\n"),
        );
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    let mut long_lived = connect_in(&topo.client);
    let served_by = request_on(&mut long_lived);
    let i: usize = served_by[1..].parse::<usize>().expect("bN") - 1;
    assert_eq!(established_at(&topo, i), 1, "the long-lived connection");
    stop_child(&mut checks[i]);
    let took = balancer.wait_health("web", &backend(&topo, i), false, Duration::from_secs(5));
    println!("{served_by}'s health check failed; marked down after {took:?}");
    servers.append(&mut checks);
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(failed, 0);
    assert_eq!(
        counts[i], 0,
        "new connections avoid the down backend: {counts:?}"
    );
    (
        long_lived,
        served_by,
        Setup {
            topo,
            balancer,
            servers,
        },
        i,
    )
}

#[test]
fn a_failing_health_check_keeps_a_long_lived_connection() {
    let (mut long_lived, served_by, Setup { topo, balancer, .. }, i) = health_blip("keep");
    // Requests across several more failed checks: the connection carries on.
    for _ in 0..5 {
        assert_eq!(request_on(&mut long_lived), served_by);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(established_at(&topo, i), 1);
    // The check comes back: the backend takes new flows again.
    let mut check = start_server_on(&topo, i, 9000);
    balancer.wait_health("web", &backend(&topo, i), true, Duration::from_secs(5));
    assert_eq!(request_on(&mut long_lived), served_by);
    stop_child(&mut check);
}

#[test]
fn a_backend_down_with_on_backend_down_reset_has_its_connections_reset_at_both_ends() {
    let (mut long_lived, _, Setup { topo, balancer, .. }, i) = health_blip("reset");
    balancer.wait_until(Duration::from_secs(3), "the backend's end reset", |_| {
        established_at(&topo, i) == 0
    });
    assert_reset(&mut long_lived, "the client's end");
    assert!(
        balancer.log().contains("connections cut"),
        "{}",
        balancer.log()
    );
}

#[test]
fn a_suspect_backend_with_most_of_the_weight_takes_no_new_flows() {
    require_root();
    sweep_stale();
    const HEALTH_PORT: u16 = 9000;
    let topo = Topology::new(Arms::Two, 2);
    let mut servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    servers.extend((0..2).map(|i| start_server_on(&topo, i, HEALTH_PORT)));
    let config = topo.config(&[9, 1]).replace(
        &format!("port = {BACKEND_PORT}\n"),
        &format!("port = {HEALTH_PORT}\n"),
    );
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    let heavy = backend(&topo, 0);
    // The heavy backend's service stops while its health check goes on passing: only the data
    // path sees it refuse. The data path's own steering looks a few Maglev slots ahead, and
    // with 9 of 10 slots the heavy backend's, many flows would find no other there.
    stop_child(&mut servers[0]);
    // Until the daemon republishes the table (within a second), that steering is all there
    // is: these requests mark the backend, whatever becomes of them.
    let _ = http_requests(&topo, 3);
    balancer.wait_until(Duration::from_secs(3), "the heavy backend avoided", |b| {
        b.backend("web", &heavy)["suspect"] == true
            && b.log().contains("new flows avoid suspect backends")
    });
    let (counts, failed) = tally(&http_requests(&topo, 100), 2);
    println!("after the mark: {counts:?}, {failed} failed");
    assert_eq!((counts, failed), (vec![0, 100], 0));
    assert_eq!(balancer.backend("web", &heavy)["healthy"], true);
}

/// A client that shut down writing while its backend streams, with pauses longer than the 2 s
/// after which an ended connection's SNAT port may be taken. Before half-close was tracked per
/// direction, the first FIN marked the connection closing, a new flow took its port in a pause,
/// and the rest of the stream went to the new flow's client.
#[test]
fn a_half_closed_connection_keeps_its_port_while_the_backend_streams() {
    use std::io::{Read as _, Write as _};
    let Setup { topo, balancer, .. } =
        setup_with_flows(Arms::Two, &[1, 0], "snat_ports = \"30000-30001\"\n");
    let mut download = connect_in(&topo.client);
    download
        .write_all(b"GET /stream/4/2500 HTTP/1.1\r\nHost: vip\r\n\r\n")
        .expect("send the request");
    download
        .shutdown(std::net::Shutdown::Write)
        .expect("shut down writing");
    // New connections meanwhile, each closed at once: they take and give up the other port
    // (and would take this one, were it free).
    let script = format!(
        "for i in $(seq 25); do \
         curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL; sleep 0.2; done"
    );
    let (read, body, others) = std::thread::scope(|scope| {
        let others = scope.spawn(|| topo.client.try_sh(&script));
        download
            .set_read_timeout(Some(Duration::from_secs(6)))
            .expect("timeout");
        let mut body = String::new();
        let read = download.read_to_string(&mut body);
        let others = others.join().expect("the other connections");
        (
            read,
            body,
            String::from_utf8_lossy(&others.stdout).into_owned(),
        )
    });
    let served = others.lines().filter(|l| *l == "b1").count();
    println!(
        "half-closed download: {read:?}, {body:?}; {served} other connections served meanwhile"
    );
    assert!(read.is_ok(), "the download broke: {read:?} after {body:?}");
    for i in 0..4 {
        assert!(
            body.contains(&format!("chunk {i}\n")),
            "chunk {i} missing: {body:?}"
        );
    }
    assert!(
        served >= 5,
        "too few other connections took ports meanwhile: {others}"
    );
    assert!(
        counter(&balancer, "drop_snat_ports_exhausted") >= 1,
        "the ports were never short"
    );
}

/// `config` without the backend `address` (IP:PORT) in any service.
fn without_backend(config: &str, address: &str) -> String {
    let block =
        |weight: u32| format!("[[service.backend]]\naddress = \"{address}\"\nweight = {weight}\n");
    config.replace(&block(0), "").replace(&block(1), "")
}

#[test]
fn a_removed_backend_finishes_its_connections_and_now_cuts_them() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 0]);
    let (gone, stays) = (backend(&topo, 0), backend(&topo, 1));
    let mut first = connect_in(&topo.client);
    let mut second = connect_in(&topo.client);
    assert_eq!(request_on(&mut first), "b1");
    assert_eq!(request_on(&mut second), "b1");
    balancer.write_config(&without_backend(&topo.config(&[0, 1]), &gone));
    let said = cli_ok(&balancer, &["reload"]);
    println!("reload: {said}");
    let terminating = |b: &Balancer| {
        b.status()["terminating"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let web_entry = |b: &Balancer| {
        terminating(b)
            .into_iter()
            .find(|t| t["service"] == "web" && t["address"] == gone.as_str())
    };
    assert!(web_entry(&balancer).is_some(), "{}", balancer.status());
    // Its connections go on; new ones go to the backend that stays.
    assert_eq!(request_on(&mut first), "b1");
    assert_eq!(request_on(&mut second), "b1");
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(
        (counts.clone(), failed),
        (vec![0, 20], 0),
        "new flows after the removal"
    );
    // One ends on its own; the sweep counts the other.
    drop(first);
    balancer.wait_until(Duration::from_secs(5), "one connection left", |b| {
        web_entry(b).is_some_and(|t| t["active_flows"] == 1)
    });
    // The dns service's copy of the backend had no connections: it ends at the next sweep.
    balancer.wait_until(Duration::from_secs(5), "dns's copy ended", |b| {
        terminating(b).iter().all(|t| t["service"] == "web")
    });
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        shown.contains(&format!(
            "terminating: service web backend {gone}: 1 active flows"
        )),
        "{shown}"
    );
    assert_eq!(request_on(&mut second), "b1");
    assert_eq!(established_at(&topo, 0), 1);
    let said = cli_ok(&balancer, &["backend", "remove", "web", &gone, "--now"]);
    assert!(said.contains("1 connections, 2 RSTs sent"), "{said}");
    assert_eq!(established_at(&topo, 0), 0, "the backend's end was reset");
    assert_reset(&mut second, "the client's end");
    assert!(terminating(&balancer).is_empty());
    // And a removal with --now of a backend that serves cuts at once (b1 comes back with
    // weight 0 first: a service keeps a backend).
    cli_ok(
        &balancer,
        &["backend", "add", "web", &gone, "--weight", "0"],
    );
    let mut third = connect_in(&topo.client);
    assert_eq!(request_on(&mut third), "b2");
    let said = cli_ok(&balancer, &["backend", "remove", "web", &stays, "--now"]);
    println!("remove --now: {said}");
    assert_reset(&mut third, "a connection to a backend removed with --now");
    assert!(terminating(&balancer).is_empty());
}

#[test]
fn stats_reports_per_second_rates_while_traffic_flows() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    // A bounded stream of new connections in the background (killed with the namespace).
    let mut traffic = topo.client.spawn(
        &[
            "sh",
            "-c",
            &format!(
                "for i in $(seq 2000); do curl -s --max-time 2 http://{VIP}/ >/dev/null; done"
            ),
        ],
        std::process::Stdio::null(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = balancer.cli(&["stats", "--json", "--interval", "1s"]);
    assert!(
        out.status.success(),
        "lb stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rates: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("lb stats --json prints JSON");
    let web = rates["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("no service web in {rates}"));
    let new_flows: f64 = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["new_flows_per_s"].as_f64().expect("a rate"))
        .sum();
    let seconds = rates["seconds"].as_f64().expect("seconds");
    println!("lb stats over {seconds:.2} s: {new_flows:.0} new flows/s");
    assert!((0.9..2.0).contains(&seconds), "{rates}");
    assert!(
        new_flows > 5.0,
        "curl's connections show as new flows: {rates}"
    );
    assert!(
        rates["counters"]["redirect"]
            .as_f64()
            .expect("redirect rate")
            > new_flows,
        "every connection forwards several packets: {rates}"
    );
    // lb top, piped: its frames one after another, each with both backends' shares.
    let out = balancer.cli(&["top", "--interval", "500ms", "--count", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lb top: {text}");
    assert_eq!(text.matches("lb top: every 500ms").count(), 2, "{text}");
    for i in 0..2 {
        let row = text
            .lines()
            .find(|l| l.contains(&backend(&topo, i)))
            .unwrap_or_else(|| panic!("backend {i} in\n{text}"));
        // Weights 1:1: half the weights, and some share of the new flows.
        assert!(
            row.contains(" up ") && row.contains("##########..........  50.0%"),
            "{text}"
        );
        let flow_share: f64 = row
            .split('%')
            .nth(1)
            .and_then(|part| part.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a new-flow share in {row:?}"));
        assert!(flow_share > 0.0, "{text}");
    }
    println!("{text}");
    let _ = traffic.kill();
    let _ = traffic.wait();
    let out = balancer.cli(&["stats", "--interval", "5ms"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an interval under 100ms is bad input"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
}

#[test]
fn drain_takes_no_new_flows_and_waits_for_the_active_ones() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    let mut long_lived = connect_in(&topo.client);
    let served_by = request_on(&mut long_lived);
    let index: usize = served_by
        .strip_prefix('b')
        .and_then(|n| n.parse::<usize>().ok())
        .expect("a backend name")
        - 1;
    let drained = backend(&topo, index);
    // At once, with no wait for the daemon's count: the drain must see a connection opened a
    // moment before it (it waits for a count begun after it).
    let out = balancer.cli(&["drain", "web", &drained, "--wait", "1500ms"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("still has 1 active flows after"),
        "{stderr}"
    );
    assert_eq!(balancer.backend("web", &drained)["weight"], 0);
    let (counts, failed) = tally(&http_requests(&topo, 100), 2);
    assert_eq!(
        (counts[index], failed),
        (0, 0),
        "new flows avoid {drained}: {counts:?}"
    );
    assert_eq!(
        request_on(&mut long_lived),
        served_by,
        "the drained connection continues"
    );
    drop(long_lived);
    let started = Instant::now();
    let out = balancer.cli(&["drain", &format!("{VIP}:80"), &drained, "--wait", "10s"]);
    assert!(
        out.status.success(),
        "drain --wait after the close: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "drain --wait returned {:?} after the last connection closed",
        started.elapsed()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("has no active flows"));
}

/// Whether any device in `ns` has an XDP program attached.
fn has_xdp(ns: &Netns) -> bool {
    let links = ns.sh("ip -d link show");
    links.contains("prog/xdp") || links.contains("xdp/id:")
}

#[test]
fn restart_keeps_flows_and_serves_new_connections_and_remove_ends_forwarding() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[4, 6]);
    let mut long_lived = connect_in(&topo.client);
    let first = request_on(&mut long_lived);
    let stream = ConnectionStream::start(&topo, Duration::from_millis(20), Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1));
    let packets = |b: &Balancer| per_backend(b, &topo, "web", "packets").iter().sum::<u64>();
    let before = packets(&balancer);
    let restart = balancer.restart();
    std::thread::sleep(Duration::from_secs(1));
    let report = stream.finish();
    println!(
        "restart: control socket back after {restart:?}; {} new connections during the run, {} failed, median {:?}, worst {:?}",
        report.ok,
        report.failures.len(),
        report.median(),
        report.worst()
    );
    assert!(
        report.failures.is_empty(),
        "connections failed across the restart: {:?}",
        report.failures
    );
    assert!(
        report.ok >= 50,
        "too few connections measured: {}",
        report.ok
    );
    assert_eq!(
        request_on(&mut long_lived),
        first,
        "the long-lived connection moved or broke across the restart"
    );
    assert!(
        balancer.log().contains("adopting the data path pinned"),
        "the new daemon did not adopt the pinned state:\n{}",
        balancer.log()
    );
    // Counters carry on rather than starting again.
    assert!(
        packets(&balancer) > before,
        "per-backend packets restarted from zero"
    );

    // `lb remove` is refused while a daemon runs; once it is stopped, it ends forwarding.
    let refused = balancer.remove();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(has_xdp(&topo.lb), "the refused remove detached anyway");
    assert!(balancer.stop());
    assert!(
        has_xdp(&topo.lb),
        "stopping the daemon detached the program"
    );
    assert!(
        tally(&http_requests(&topo, 5), 2).1 == 0,
        "forwarding stopped with the daemon"
    );
    let removed = balancer.remove();
    assert!(
        removed.status.success(),
        "lb remove: {}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(!has_xdp(&topo.lb), "lb remove left XDP attached");
    assert!(!balancer.bpffs.join("FLOWS").exists());
    let reserved = topo.lb.sh("cat /proc/sys/net/ipv4/ip_local_reserved_ports");
    assert!(
        reserved.trim().is_empty(),
        "SNAT ports still reserved: {reserved}"
    );
    drop(long_lived);
}

/// An upgrade from a build without the per-backend connection counts adopts connections it
/// never saw open: it counts them once, before its program is attached, and their ends after.
/// An adopted backend that was up fails its first probe with `fall = 1`: the new daemon takes
/// it down, and so must the data path (the daemon wrote the adopted state "up" and its
/// tracker said "down", and nothing ever changed either again).
#[test]
fn an_adopted_backend_failing_its_first_probe_with_fall_1_is_down_in_the_data_path() {
    let Setup {
        topo,
        mut balancer,
        mut servers,
    } = setup_with(Arms::Two, &[1, 1], |c| c.replace("fall = 2", "fall = 1"));
    let b1: std::net::SocketAddrV4 = backend(&topo, 0).parse().expect("an address");
    assert_eq!(balancer.pinned_backend_healthy(b1), Some(true));
    assert!(balancer.stop(), "lb run did not exit cleanly");
    stop_child(&mut servers[0]);
    balancer.restart();
    balancer.wait_health("web", &b1.to_string(), false, Duration::from_secs(5));
    // A few probe intervals: a later probe must not be what mends it.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        balancer.pinned_backend_healthy(b1),
        Some(false),
        "the data path still sends new flows to a backend the daemon has down:\n{}",
        balancer.log()
    );
    let (counts, failed) = tally(&http_requests(&topo, 40), 2);
    assert_eq!((counts[0], failed), (0, 0), "{counts:?}");
}

/// One lb process at a time on a pin directory: a second daemon given another socket is
/// refused before it touches anything, and so is `lb remove` while a daemon holds the pins,
/// even one that no longer answers (stopped with SIGSTOP here).
#[test]
fn a_second_daemon_or_lb_remove_is_refused_while_a_daemon_holds_the_pins() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    let second = balancer.second_daemon();
    let said = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(
        !second.status.success() && said.contains("is held by another lb process"),
        "a second daemon on the same pins: {:?} {said}",
        second.status
    );
    assert!(
        !balancer.dir.join("second.sock").exists(),
        "the refused daemon left its socket"
    );
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(
        failed, 0,
        "the first daemon's service after the refusal: {counts:?}"
    );

    let pid = balancer.pid().expect("the daemon runs").to_string();
    lb_tests::netns::run(&["kill", "-STOP", &pid]);
    let removed = balancer.remove();
    lb_tests::netns::run(&["kill", "-CONT", &pid]);
    let said = String::from_utf8_lossy(&removed.stderr).into_owned();
    assert!(
        !removed.status.success() && said.contains("is held by another lb process"),
        "lb remove beside a hung daemon: {:?} {said}",
        removed.status
    );
    assert!(
        balancer.bpffs.join("FLOWS").exists(),
        "lb remove took the pins of a daemon that holds them"
    );
    let (_, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(failed, 0, "the daemon's service after the refused remove");
}

/// The SNAT ports lb reserves from the kernel: only what it added is its own. A range the
/// admin had reserved stays reserved through `lb remove`, and a changed `snat_ports` gives
/// back what the old range reserved beyond the new one.
#[test]
fn snat_port_reservations_give_back_only_what_lb_added() {
    let Setup {
        topo, mut balancer, ..
    } = setup_with(Arms::Two, &[1, 1], |config| {
        config.replace(
            "capacity = 65536\n",
            "capacity = 65536\nsnat_ports = \"20000-29999\"\n",
        )
    });
    let reserved = || {
        topo.lb
            .sh("cat /proc/sys/net/ipv4/ip_local_reserved_ports")
            .trim()
            .to_owned()
    };
    assert_eq!(reserved(), "20000-29999");
    assert!(balancer.stop(), "lb run did not exit cleanly");
    // The admin reserves ports of their own beside lb's while no daemon runs, and lb's next
    // range takes in some of them and drops most of its own.
    topo.lb
        .sh("sysctl -qw net.ipv4.ip_local_reserved_ports=20000-29999,30000-30999");
    let config = std::fs::read_to_string(balancer.dir.join("lb.toml")).expect("the config");
    balancer.write_config(&config.replace("20000-29999", "26000-30999"));
    balancer.restart();
    assert_eq!(reserved(), "26000-30999", "after snat_ports changed");
    let (_, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(failed, 0);
    assert!(balancer.stop(), "lb run did not exit cleanly");
    let removed = balancer.remove();
    assert!(removed.status.success(), "lb remove: {removed:?}");
    assert_eq!(
        reserved(),
        "30000-30999",
        "after lb remove: the admin's ports only"
    );
}

/// The interface settings lb turns on (forwarding, accept_local) are put back by `lb remove`:
/// a host that did not route before lb does not route after it.
#[test]
fn lb_remove_puts_back_the_interface_settings_lb_changed() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[1, 1]);
    let read = |knob: &str| {
        topo.lb
            .sh(&format!("cat /proc/sys/net/ipv4/conf/{knob}"))
            .trim()
            .to_owned()
    };
    assert!(balancer.stop(), "lb run did not exit cleanly");
    // As on a host that does not route: lb must turn these on, and remember they were off.
    topo.lb.sh(
        "sysctl -qw net.ipv4.conf.lb0.forwarding=0 net.ipv4.conf.lb1.forwarding=0 net.ipv4.conf.lb1.accept_local=0",
    );
    balancer.restart();
    assert_eq!(
        (
            read("lb0/forwarding"),
            read("lb1/forwarding"),
            read("lb1/accept_local")
        ),
        ("1".into(), "1".into(), "1".into())
    );
    assert!(
        balancer.log().contains("the host now routes for lb0"),
        "{}",
        balancer.log()
    );
    let (_, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(failed, 0);
    // A restart finds them on, and must not forget they were off.
    balancer.restart();
    assert!(balancer.stop(), "lb run did not exit cleanly");
    let removed = balancer.remove();
    let said = String::from_utf8_lossy(&removed.stdout).into_owned();
    assert!(removed.status.success(), "lb remove: {removed:?}");
    assert!(
        said.contains("put back net.ipv4.conf.lb0.forwarding=0"),
        "{said}"
    );
    assert_eq!(
        (
            read("lb0/forwarding"),
            read("lb1/forwarding"),
            read("lb1/accept_local")
        ),
        ("0".into(), "0".into(), "0".into()),
        "after lb remove"
    );
}

/// The README's firewall: with forwarding on, the host routes a client straight to a
/// container's address; its forward filter stops that and leaves balanced traffic alone.
#[test]
fn the_readmes_forward_filter_stops_routing_and_keeps_balancing() {
    let Setup { topo, balancer, .. } = setup_containers_with(&[1, 1], |c| c);
    let snat = balancer.status()["services"][0]["snat"][0]
        .as_str()
        .expect("the SNAT address")
        .to_owned();
    topo.client.sh("ip route add 198.18.4.0/24 via 198.18.0.1");
    let direct = format!(
        "curl -s --connect-timeout 1 --max-time 2 http://{}/ || echo FAIL",
        backend(&topo, 0)
    );
    assert_eq!(
        topo.client.sh(&direct).trim(),
        "b1",
        "routed before the filter"
    );
    topo.lb.sh(&format!(
        "nft -f - <<'EOF'
table inet lb_guard {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ip saddr {snat} accept
  }}
}}
EOF"
    ));
    assert_eq!(
        topo.client.sh(&direct).trim(),
        "FAIL",
        "routed through the filter"
    );
    let (counts, failed) = tally(&http_requests(&topo, 40), 2);
    assert!(
        failed == 0 && counts.iter().all(|&c| c > 0),
        "balanced: {counts:?}"
    );
    let answer = udp_request(&topo, "hello", 41998);
    assert!(
        answer.ends_with(": hello"),
        "UDP through the filter: {answer:?}"
    );
}

/// Pinned maps of another layout are refused even when every size matches (a daemon that
/// read a flow's fields in another order would corrupt every flow), and forwarding goes on.
#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[1, 1]);
    assert!(balancer.stop(), "lb run did not exit cleanly");
    balancer.set_pinned_layout(999);
    let refused = balancer.run_refused();
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && said.contains("its maps have layout 999, this lb's is 1"),
        "lb run on maps of another layout: {:?} {said}",
        refused.status
    );
    let (_, failed) = tally(&http_requests(&topo, 20), 2);
    assert_eq!(failed, 0, "the pinned data path stopped forwarding");
}

/// The saved state lost, a restart reads the backends' ids back from the adopted maps: a
/// config whose order would number them otherwise must not move a running connection's
/// count (or its backend) to another service's backend.
#[test]
fn a_lost_state_file_keeps_the_adopted_ids() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[4, 6]);
    let mut long_lived = connect_in(&topo.client);
    let holder = request_on(&mut long_lived);
    let holder_address = backend(&topo, if holder == "b1" { 0 } else { 1 });
    let counted =
        |b: &Balancer| b.backend("web", &holder_address)["active_flows"].as_u64() >= Some(1);
    balancer.wait_until(Duration::from_secs(3), "the connection counted", counted);
    // The same services, dns first: ids stay by name on reload...
    let config = topo.config(&[4, 6]);
    let parts: Vec<&str> = config.split("[[service]]\n").collect();
    assert_eq!(parts.len(), 3, "{config}");
    balancer.write_config(&format!(
        "{}[[service]]\n{}[[service]]\n{}",
        parts[0], parts[2], parts[1]
    ));
    cli_ok(&balancer, &["reload"]);
    // ... and with the saved state gone, the file alone would number dns's first.
    assert!(balancer.stop(), "lb run did not exit cleanly");
    std::fs::remove_file(balancer.dir.join("state").join("state.json")).expect("the state file");
    balancer.restart();
    assert!(
        balancer
            .log()
            .contains("ids read back from the adopted maps"),
        "{}",
        balancer.log()
    );
    balancer.wait_until(
        Duration::from_secs(3),
        "the connection counted under web, its service",
        counted,
    );
    assert_eq!(request_on(&mut long_lived), holder);
}

/// A UDP service checked with a datagram (`kind = "udp"`): a backend whose server stops is
/// taken down by the check (the ICMP port unreachable), and its datagrams go to the other.
#[test]
fn a_udp_health_check_takes_a_silent_backend_down() {
    let Setup {
        topo,
        balancer,
        mut servers,
    } = setup_with(Arms::Two, &[1, 1], |config| {
        let parts: Vec<&str> = config.split("[[service]]\n").collect();
        let dns = parts[2].replace(
            &format!("kind = \"tcp\"\nport = {BACKEND_PORT}\n"),
            "kind = \"udp\"\nsend = \"probe\"\nexpect = \": probe\"\n",
        );
        format!("{}[[service]]\n{}[[service]]\n{dns}", parts[0], parts[1])
    });
    let b1 = backend(&topo, 0);
    assert_eq!(balancer.backend("dns", &b1)["healthy"], true);
    stop_child(&mut servers[0]);
    balancer.wait_health("dns", &b1, false, Duration::from_secs(3));
    let why = balancer.backend("dns", &b1)["last_error"].clone();
    println!("dns backend 1 down: {why}");
    assert!(why.to_string().contains("refused"), "{why}");
    for port in 42200..42205 {
        let answer = udp_request(&topo, "hello", port);
        assert_eq!(answer, "b2: hello", "from port {port}");
    }
}

/// An HTTP check (hyper's client) with a Host, a status range and an expected body: the
/// backends answer every GET with their name, so expecting "b1" keeps backend 2 down, and all
/// new connections go to backend 1; accepting only 204 takes both down.
#[test]
fn an_http_health_check_wants_its_status_and_body() {
    let http_check = |status: &'static str| {
        move |config: String| {
            config.replacen(
                &format!("kind = \"tcp\"\nport = {BACKEND_PORT}\n"),
                &format!(
                    "kind = \"http\"\npath = \"/healthz\"\nhost = \"web.internal\"\n\
                     status = \"{status}\"\nexpect = \"b1\"\nport = {BACKEND_PORT}\n"
                ),
                1,
            )
        }
    };
    let Setup { topo, balancer, .. } = setup_with(Arms::Two, &[1, 1], http_check("200-299"));
    let (b1, b2) = (backend(&topo, 0), backend(&topo, 1));
    assert_eq!(balancer.backend("web", &b1)["healthy"], true);
    let b2_status = balancer.backend("web", &b2);
    assert_eq!(b2_status["healthy"], false, "{b2_status}");
    let why = b2_status["last_error"].to_string();
    assert!(why.contains("does not hold \\\"b1\\\""), "{why}");
    let (counts, failed) = tally(&http_requests(&topo, 50), 2);
    assert_eq!((counts, failed), (vec![50, 0], 0));

    balancer.write_config(&http_check("204")(topo.config(&[1, 1])));
    let out = balancer.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    balancer.wait_health("web", &b1, false, Duration::from_secs(3));
    let why = balancer.backend("web", &b1)["last_error"].to_string();
    assert!(why.contains("answered 200"), "{why}");
}

#[test]
fn an_upgrade_counts_the_connections_it_adopts() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[1, 0]);
    let b1 = backend(&topo, 0);
    let active = |b: &Balancer| b.backend("web", &b1)["active_flows"].clone();
    let mut long_lived = connect_in(&topo.client);
    assert_eq!(request_on(&mut long_lived), "b1");
    balancer.wait_until(Duration::from_secs(3), "the connection counted", |b| {
        active(b) == 1
    });
    // What such a build leaves pinned: everything but the counts.
    std::fs::remove_file(balancer.bpffs.join("FLOW_COUNTS")).expect("unpin FLOW_COUNTS");
    balancer.restart();
    balancer.wait_until(
        Duration::from_secs(3),
        "the adopted connection counted",
        |b| active(b) == 1,
    );
    assert_eq!(request_on(&mut long_lived), "b1");
    drop(long_lived);
    balancer.wait_until(Duration::from_secs(5), "its end counted", |b| {
        active(b) == 0
    });
}

/// Runs the CLI and asserts success; returns what it printed.
fn cli_ok(balancer: &Balancer, args: &[&str]) -> String {
    let out = balancer.cli(args);
    assert!(
        out.status.success(),
        "lb {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        balancer.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lb status --json`'s services without the figures the sweep refreshes each second
/// (flows, ports, packets): what a change sets, and a refused change must leave.
fn configured(services: &serde_json::Value) -> serde_json::Value {
    let mut services = services.clone();
    for service in services.as_array_mut().into_iter().flatten() {
        for backend in service["backends"].as_array_mut().into_iter().flatten() {
            if let Some(fields) = backend.as_object_mut() {
                for figure in [
                    "active_flows",
                    "snat_ports_in_use",
                    "new_flows",
                    "packets",
                    "bytes",
                ] {
                    fields.remove(figure);
                }
            }
        }
    }
    services
}

/// A reload that adds 62 services writes one service per turn of the daemon's lock: `lb
/// status` goes on answering meanwhile, and what it shows mid-change is each service whole,
/// some of the new ones already there.
#[test]
fn a_large_reload_lets_status_requests_through_between_services() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    let base = topo.config(&[1, 1]);
    let web = base.split("[[service]]\n").nth(1).expect("the web service");
    let mut big = base.clone();
    for i in 0..62u16 {
        big += "[[service]]\n";
        big += &web
            .replace("name = \"web\"", &format!("name = \"s{i}\""))
            .replace(":80\"", &format!(":{}\"", 1000 + i));
    }
    balancer.write_config(&big);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let done = std::sync::Arc::clone(&done);
        let (lb, socket) = (lb_binary(), balancer.socket.clone());
        std::thread::spawn(move || {
            // (services shown, how long the answer took) per request until the reload ends.
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let out = std::process::Command::new(&lb)
                    .args(["status", "--json", "--socket"])
                    .arg(&socket)
                    .output()
                    .expect("lb status");
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).expect("lb status --json");
                let services = status["services"].as_array().map_or(0, Vec::len);
                seen.push((services, asked.elapsed()));
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let out = balancer.cli(&["reload"]);
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = poller.join().expect("the status poller");
    let mid_change: Vec<usize> = seen
        .iter()
        .map(|&(n, _)| n)
        .filter(|&n| n > 2 && n < 64)
        .collect();
    let worst = seen.iter().map(|&(_, t)| t).max().unwrap_or_default();
    println!(
        "reload of 62 services: {took:?}; {} status answers, {} of them mid-change, the slowest {worst:?}",
        seen.len(),
        mid_change.len()
    );
    assert!(
        !mid_change.is_empty(),
        "no status answered mid-change: {seen:?}"
    );
    assert_eq!(
        balancer.status()["services"].as_array().map(Vec::len),
        Some(64)
    );
}

/// A reload that replaces 40 services by 40 others (new names, new VIP ports): SERVICES holds
/// 64 entries, so the old ones must go before the new ones come, or the map fills half-way
/// and the change stops there. It applies whole, and the old VIPs no longer balance.
#[test]
fn a_reload_replacing_40_services_by_40_others_applies_whole() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    let base = topo.config(&[1, 1]);
    let (head, web) = {
        let mut parts = base.split("[[service]]\n");
        (
            parts.next().expect("the settings"),
            parts.next().expect("the web service"),
        )
    };
    let set = |prefix: &str, first_port: u16| {
        let mut config = head.to_owned();
        for i in 0..40u16 {
            config += "[[service]]\n";
            config += &web
                .replace("name = \"web\"", &format!("name = \"{prefix}{i}\""))
                .replace(":80\"", &format!(":{}\"", first_port + i));
        }
        config
    };
    balancer.write_config(&set("old", 1000));
    let out = balancer.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    balancer.write_config(&set("new", 2000));
    let out = balancer.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = balancer.status();
    let names: Vec<&str> = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names.len(), 40, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("new")), "{names:?}");
    // The last new service balances, and an old VIP no longer does.
    let (counts, failed) = tally(&http_requests_to(&topo, 2039, 10), 2);
    assert_eq!(
        (counts.iter().sum::<usize>(), failed),
        (10, 0),
        "{counts:?}"
    );
    let (_, failed) = tally(&http_requests_to(&topo, 1000, 3), 2);
    assert_eq!(failed, 3, "an old VIP still balances");
}

#[test]
fn runtime_changes_apply_only_the_difference_and_survive_restart_and_reload() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[4, 6]);
    let mut long_lived = connect_in(&topo.client);
    let holder = request_on(&mut long_lived);
    let (mine, other) = if holder == "b1" {
        (backend(&topo, 0), backend(&topo, 1))
    } else {
        (backend(&topo, 1), backend(&topo, 0))
    };
    println!("long-lived connection on {holder} ({mine})");

    // A new service, taking flows once its backends' first probes pass.
    let said = cli_ok(
        &balancer,
        &[
            "service",
            "add",
            "api",
            &format!("{VIP}:81"),
            "--backend",
            &format!("{mine}=1"),
            "--backend",
            &other,
        ],
    );
    assert!(said.contains("added api"), "{said}");
    let (counts, failed) = tally(&http_requests_to(&topo, 81, 40), 2);
    assert_eq!(failed, 0, "the added service failed requests");
    assert!(
        counts.iter().all(|&c| c > 0),
        "api uses both backends: {counts:?}"
    );

    // Removing the other backend of web moves all new flows to the long-lived one's backend.
    let said = cli_ok(&balancer, &["backend", "remove", "web", &other]);
    assert!(
        said.contains("updated web") && !said.contains("api"),
        "{said}"
    );
    let bodies = http_requests_to(&topo, 80, 30);
    assert!(bodies.iter().all(|b| *b == holder), "{bodies:?}");
    assert_eq!(request_on(&mut long_lived), holder);
    cli_ok(
        &balancer,
        &["backend", "add", "web", &other, "--weight", "6"],
    );
    cli_ok(&balancer, &["set-weight", "web", &mine, "2"]);
    let (counts, failed) = tally(&http_requests(&topo, 60), 2);
    assert_eq!(failed, 0);
    assert!(
        counts.iter().all(|&c| c > 0),
        "web uses both again: {counts:?}"
    );

    // Bad changes are refused with exit 2 and change nothing.
    let before = configured(&balancer.status()["services"]);
    for args in [
        &["service", "add", "web", &format!("{VIP}:82")][..],
        &["service", "add", "x", &format!("{VIP}:80")][..],
        &["backend", "add", "nosuch", &other][..],
        &["backend", "add", "web", &other][..],
        &["backend", "remove", "web", "198.18.9.9:1"][..],
        &["service", "remove", "nosuch"][..],
        &["backend", "add", "web", "198.18.9.9:1", "--weight", "70000"][..],
        &["service", "add", "y", &format!("{VIP}:84"), "--mss", "100"][..],
        &[
            "service",
            "add",
            "y",
            &format!("{VIP}:84"),
            "--mode",
            "tunnel",
        ][..],
        &[
            "service",
            "add",
            "y",
            &format!("{VIP}:84"),
            "--mode",
            "dsr",
            "--dsr",
            "gre",
        ][..],
        &[
            "service",
            "add",
            "y",
            &format!("{VIP}:84"),
            "--mode",
            "dsr",
            "--backend",
            "198.18.1.11:8000",
        ][..],
        &[
            "service",
            "add",
            "y",
            &format!("{VIP}:84"),
            "--mode",
            "dnat",
            "--snat",
            "198.18.1.1",
        ][..],
        &[
            "service",
            "add",
            "y",
            &format!("{VIP}:84"),
            "--protocol",
            "udp",
            "--mss",
            "1360",
        ][..],
    ] {
        let out = balancer.cli(args);
        assert_eq!(out.status.code(), Some(2), "lb {args:?}: {out:?}");
    }
    assert_eq!(configured(&balancer.status()["services"]), before);

    // A restart with the config file unchanged keeps every runtime change.
    balancer.restart();
    assert!(balancer.log().contains("restoring the runtime state"));
    assert_eq!(
        balancer.status()["services"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(balancer.backend("web", &mine)["weight"], 2);
    assert_eq!(balancer.backend("web", &other)["weight"], 6);
    assert_eq!(request_on(&mut long_lived), holder);

    // A reload makes the file the truth again: api goes, web takes the file's weights; the
    // long-lived connection's flow is untouched.
    let packets_before = balancer.backend("web", &mine)["packets"]
        .as_u64()
        .expect("n");
    // web (the first service in the file) goes to 1:1; dns keeps 4:6, and must not be touched.
    let file = topo.config(&[4, 6]);
    let file = file
        .replacen("weight = 4", "weight = 1", 1)
        .replacen("weight = 6", "weight = 1", 1);
    balancer.write_config(&file);
    let said = cli_ok(&balancer, &["reload"]);
    assert!(
        said.contains("updated web") && said.contains("removed api") && !said.contains("dns"),
        "{said}"
    );
    assert_eq!(balancer.backend("web", &mine)["weight"], 1);
    assert!(
        balancer.backend("web", &mine)["packets"]
            .as_u64()
            .expect("n")
            >= packets_before
    );
    assert_eq!(
        http_requests_to(&topo, 81, 3),
        ["FAIL", "FAIL", "FAIL"],
        "the removed service still answers"
    );
    assert_eq!(request_on(&mut long_lived), holder);
    // A reload of a broken file changes nothing.
    balancer.write_config("interfaces = [\n");
    let out = balancer.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        balancer.status()["services"].as_array().map(Vec::len),
        Some(2)
    );
    let said = cli_ok(&balancer, &["status"]);
    assert!(said.contains("service web"), "{said}");
    // A rename keeps the VIP, the ids and so the connections: the long-lived one stays on its
    // backend, counted there, and no backend terminates.
    balancer.write_config(
        &topo
            .config(&[4, 6])
            .replace("name = \"dns\"", "name = \"names\"")
            .replace("name = \"web\"", "name = \"site\""),
    );
    let said = cli_ok(&balancer, &["reload"]);
    assert!(
        said.contains("renamed web to site") && said.contains("renamed dns to names"),
        "{said}"
    );
    assert_eq!(
        balancer.status()["terminating"],
        serde_json::json!([]),
        "a rename must not end the old name's backends"
    );
    assert_eq!(request_on(&mut long_lived), holder);
    let holder_address = backend(&topo, if holder == "b1" { 0 } else { 1 });
    balancer.wait_until(
        Duration::from_secs(3),
        "the long-lived connection counted under the new name",
        |b| b.backend("site", &holder_address)["active_flows"].as_u64() >= Some(1),
    );
    let answer = udp_request(&topo, "renamed", 42100);
    assert!(
        answer.ends_with(": renamed"),
        "the renamed service's VIP stopped: {answer:?}"
    );
}

/// Runs a steady stream of new connections while `fault` happens to backend 1, and for
/// `settle` after. Returns what the clients saw, less the connections that were already
/// established with the backend when the fault hit (no balancer can save those): their number
/// is returned too. The fault takes effect somewhere between its start and its end (`ip`
/// in another namespace takes tens of milliseconds, more on a busy machine), so a connection
/// begun meanwhile may have been established with the backend before it did.
fn connections_across(
    topo: &Topology,
    fault: impl FnOnce(),
    settle: Duration,
) -> (lb_tests::harness::StreamReport, usize) {
    let stream = ConnectionStream::start(topo, Duration::from_millis(20), Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1));
    let fault_at = std::time::Instant::now();
    fault();
    let fault_done = std::time::Instant::now();
    std::thread::sleep(settle);
    let mut report = stream.finish();
    let broken = report.take_broken_by_fault(fault_at, fault_done);
    (report, broken)
}

fn counter(balancer: &Balancer, name: &str) -> u64 {
    balancer.status()["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_killed_or_unreachable_backend_fails_no_connection() {
    let setup = setup_with(Arms::Two, &[4, 6], default_health_pace);
    no_connection_fails_across_backend_faults(setup, |topo| {
        topo.backends[0].sh("ip link set eth0 down");
    });
}

/// Health checks at the default pace (1 s, down after 2 failures): the data path must carry
/// the clients through the seconds before they notice.
fn default_health_pace(config: String) -> String {
    config
        .replace("interval = \"200ms\"", "interval = \"1s\"")
        .replace("timeout = \"150ms\"", "timeout = \"500ms\"")
}

/// Backend 1's server dies (its host answers new SYNs with RST until health checks notice),
/// comes back, and then backend 1 becomes unreachable by `unplug` (SYNs go unanswered, the
/// clients' retransmissions move to the other backend): under a steady stream of new
/// connections, none may fail.
fn no_connection_fails_across_backend_faults(setup: Setup, unplug: impl FnOnce(&Topology)) {
    let Setup {
        topo,
        balancer,
        mut servers,
    } = setup;
    let b1 = backend(&topo, 0);
    let (refused, in_flight) = connections_across(
        &topo,
        || lb_tests::netns::stop_child(&mut servers[0]),
        Duration::from_secs(3),
    );
    println!(
        "backend's server stopped: {} new connections, {} failed, median {:?}, worst {:?} ({in_flight} established ones broken)",
        refused.ok,
        refused.failures.len(),
        refused.median(),
        refused.worst()
    );
    assert!(refused.failures.is_empty(), "{:?}", refused.failures);
    assert!(refused.ok >= 100, "too few connections: {}", refused.ok);
    assert!(counter(&balancer, "event_suspect_refused") >= 1);
    assert!(counter(&balancer, "drop_backend_refused") >= 1);
    balancer.wait_health("web", &b1, false, Duration::from_secs(5));

    // Back: health checks bring it up and clear the mark.
    servers[0] = start_server(&topo, 0);
    balancer.wait_health("web", &b1, true, Duration::from_secs(10));
    balancer.wait_until(Duration::from_secs(3), "b1 cleared of suspicion", |b| {
        b.backend("web", &b1)["suspect"] == false
    });
    let (counts, failed) = tally(&http_requests(&topo, 50), 2);
    assert_eq!(failed, 0);
    assert!(counts[0] > 0, "b1 takes flows again: {counts:?}");

    let (unanswered, in_flight) =
        connections_across(&topo, || unplug(&topo), Duration::from_secs(3));
    println!(
        "backend unreachable: {} new connections, {} failed, median {:?}, worst {:?} ({in_flight} established ones broken)",
        unanswered.ok,
        unanswered.failures.len(),
        unanswered.median(),
        unanswered.worst()
    );
    assert!(unanswered.failures.is_empty(), "{:?}", unanswered.failures);
    assert!(
        unanswered.ok >= 100,
        "too few connections: {}",
        unanswered.ok
    );
    assert!(counter(&balancer, "event_suspect_unanswered") >= 1);
    balancer.wait_health("web", &b1, false, Duration::from_secs(5));
}

/// Sends one datagram to VIP:53 from each of `ports` in the client namespace, without waiting
/// for answers: each is a new UDP flow.
fn udp_flows(topo: &Topology, ports: std::ops::Range<u16>) {
    topo.client
        .spawn_inside(move || {
            for port in ports {
                let socket =
                    std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind a client port");
                socket.send_to(b"x", (VIP, 53)).expect("send");
            }
        })
        .join()
        .expect("udp sender");
}

/// Every datagram `socket` receives within `window`.
fn datagrams_within(socket: &std::net::UdpSocket, window: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match socket.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    got
}

/// One datagram from client port `port` to VIP:53 after `after`; what came back within `window`.
fn udp_exchange(
    topo: &Topology,
    port: u16,
    payload: &'static str,
    after: Duration,
    window: Duration,
) -> std::thread::JoinHandle<Vec<String>> {
    topo.client.spawn_inside(move || {
        std::thread::sleep(after);
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind a client port");
        socket.send_to(payload.as_bytes(), (VIP, 53)).expect("send");
        datagrams_within(&socket, window)
    })
}

/// A backend answers client A after 3 s, while client B opens a flow 2.5 s after A. With one
/// SNAT port, an unanswered flow that gave its port up after 2 s sent A's answer to B. The
/// unanswered flow now keeps its port for udp_unreplied_timeout: A gets its answer, B never
/// gets A's (B's own datagram finds no free port and is dropped, counted).
#[test]
fn a_slow_udp_reply_reaches_only_the_client_that_asked() {
    let Setup { topo, balancer, .. } =
        setup_with_flows(Arms::Two, &[1, 0], "snat_ports = \"30000-30000\"\n");
    let a = udp_exchange(
        &topo,
        20000,
        "delay=3000 from A",
        Duration::ZERO,
        Duration::from_secs(6),
    );
    let b = udp_exchange(
        &topo,
        20001,
        "from B",
        Duration::from_millis(2500),
        Duration::from_secs(4),
    );
    let (a, b) = (a.join().expect("client A"), b.join().expect("client B"));
    println!("client A received {a:?}; client B received {b:?}");
    assert_eq!(a.len(), 1, "client A's answers: {a:?}");
    assert!(a[0].ends_with(": delay=3000 from A"), "client A: {a:?}");
    assert!(
        b.iter().all(|m| !m.contains("from A")),
        "client B received client A's answer: {b:?}"
    );
    assert!(counter(&balancer, "drop_snat_ports_exhausted") >= 1);
}

/// Sends `count` SYNs to VIP:80 from the client namespace at about `per_second`, from spoofed
/// sources on the client segment that no host owns (198.18.0.128-254, random ports): their
/// SYN-ACKs are never acknowledged. Bounded in count and time; through a raw socket.
fn spoofed_syn_flood(topo: &Topology, count: u32, per_second: u32) -> std::thread::JoinHandle<u32> {
    topo.client.spawn_inside(move || {
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dst.sin_family = libc::AF_INET as libc::sa_family_t;
        dst.sin_addr.s_addr = u32::from_ne_bytes(VIP.octets());
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let started = Instant::now();
        let mut sent = 0;
        for i in 0..count {
            let r = next();
            let src = std::net::Ipv4Addr::new(198, 18, 0, 128 + (r % 127) as u8);
            let frame = lb_tests::packet::pkt()
                .eth([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
                .ipv4(src, VIP)
                .tcp(1024 + (r >> 16) as u16 % 60000, 80)
                .seq(next())
                .syn()
                .build();
            let ip = &frame[14..];
            // SAFETY: a valid buffer and address of the sizes given.
            let n = unsafe {
                libc::sendto(
                    fd,
                    ip.as_ptr().cast(),
                    ip.len(),
                    0,
                    (&raw const dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
            let due = Duration::from_secs_f64(f64::from(i + 1) / f64::from(per_second));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // SAFETY: the descriptor opened above.
        unsafe { libc::close(fd) };
        sent
    })
}

/// A SYN flood from spoofed sources with the default [flows] settings: legitimate connections
/// during and after it all succeed, and its half-open flows are gone within 15 s of its end.
#[test]
fn a_spoofed_syn_flood_fails_no_legitimate_connection_and_leaves_no_half_open_flows() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[4, 6]);
    let flood = spoofed_syn_flood(&topo, 30_000, 6_000);
    std::thread::sleep(Duration::from_millis(500));
    let during = ConnectionStream::start(&topo, Duration::from_millis(40), Duration::from_secs(5));
    let sent = flood.join().expect("flood thread");
    let during = during.finish();
    let flooded = balancer.pinned_flow_entries();
    let (counts, failed_after) = tally(&http_requests(&topo, 200), 2);
    let ended = std::time::Instant::now();
    balancer.wait_until(Duration::from_secs(15), "half-open flows gone", |b| {
        b.pinned_flow_entries() <= 4
    });
    let drained = ended.elapsed();
    // The daemon's view, from the data path's per-backend counts rather than the table: it
    // must agree, after every flow the flood made was evicted or expired.
    balancer.wait_until(Duration::from_secs(3), "the counts agree", |b| {
        let sum = |field: &str| -> u64 {
            (0..2)
                .map(|i| {
                    b.backend("web", &backend(&topo, i))[field]
                        .as_u64()
                        .unwrap_or(0)
                })
                .sum()
        };
        b.flow_entries() <= 4 && sum("active_flows") <= 2 && sum("snat_ports_in_use") <= 2
    });
    let evicted = counter(&balancer, "event_half_open_evicted");
    println!(
        "flood: {sent} SYNs; {flooded} entries at its end; during it {} of {} connections \
         failed (worst {:?}); after it {failed_after} of 200 failed; table drained {drained:?} \
         after; {evicted} half-open flows evicted",
        during.failures.len(),
        during.ok + during.failures.len(),
        during.worst(),
    );
    assert!(sent >= 29_000, "the flood sent only {sent} SYNs");
    assert!(
        flooded > 5_000,
        "the flood left only {flooded} entries: did it reach the balancer?"
    );
    assert!(
        during.ok > 50,
        "only {} connections during the flood",
        during.ok
    );
    assert!(
        during.failures.is_empty(),
        "failed during the flood: {:?}",
        during.failures
    );
    assert_eq!(
        (counts.iter().sum::<usize>(), failed_after),
        (200, 0),
        "after the flood"
    );
}

#[test]
fn flows_expire_in_the_kernel_while_no_daemon_runs() {
    let Setup {
        topo, mut balancer, ..
    } = setup(Arms::Two, &[1, 1]);
    assert!(balancer.stop(), "lb run did not exit cleanly");
    // Forwarding goes on without the daemon; so must expiry.
    let sent = spoofed_syn_flood(&topo, 12_000, 6_000)
        .join()
        .expect("flood thread");
    let flooded = balancer.pinned_flow_entries();
    let ended = std::time::Instant::now();
    assert!(
        flooded > 5_000,
        "the flood of {sent} SYNs left only {flooded} entries"
    );
    // Half-open flows live tcp_syn_timeout (5 s) from their SYN; the timer passes every second.
    while balancer.pinned_flow_entries() > 0 {
        assert!(
            ended.elapsed() < Duration::from_secs(15),
            "{} of {flooded} entries left 15 s after the flood, with no daemon",
            balancer.pinned_flow_entries()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained = ended.elapsed();
    let (counts, failed) = tally(&http_requests(&topo, 20), 2);
    println!(
        "no daemon: {sent} SYNs left {flooded} entries, all gone {drained:?} after the flood; \
         then 20 connections: {counts:?}"
    );
    assert_eq!(failed, 0, "connections after the flood, with no daemon");
}

/// What one kind of exhaustion looks like: the `[flows]` settings that bring it on with 700 new
/// UDP flows, its drop reason, and the warning that names it.
struct Exhaustion {
    flows: &'static str,
    reason: &'static str,
    warning: &'static str,
}

/// Runs 700 new UDP flows into a balancer set up to run out, and checks that an open TCP
/// connection is untouched, the drops are counted, `lb status` and the metrics say so, and new
/// flows are served again once the UDP ones expire.
fn exhaustion(case: Exhaustion) {
    let Setup { topo, balancer, .. } = setup_with(Arms::Two, &[4, 6], |c| {
        c.replace(
            "capacity = 65536\n",
            &format!("{}udp_idle_timeout = \"2s\"\n", case.flows),
        )
    });
    let mut long_lived = connect_in(&topo.client);
    let holder = request_on(&mut long_lived);
    udp_flows(&topo, 41000..41700);
    assert_eq!(
        request_on(&mut long_lived),
        holder,
        "an existing flow suffered from the exhaustion"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let status = balancer.status();
    let counter = format!("drop_{}", case.reason);
    let dropped = status["counters"][&counter].as_u64().unwrap_or(0);
    assert!(
        dropped >= 150,
        "new flows dropped as {}: {dropped}",
        case.reason
    );
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains(case.warning), "{status}");
    let text = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!("warning: {}", case.warning)),
        "{text}"
    );

    // Scrapes read the status the daemon caches at each one-second sweep.
    let series = format!(
        "lb_packets_total{{verdict=\"drop\",reason=\"{}\"}}",
        case.reason
    );
    let scrape = || {
        topo.lb
            .sh("curl -s --max-time 2 http://127.0.0.1:9640/metrics")
    };
    let value = |metrics: &str, series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let metrics = loop {
        let metrics = scrape();
        if value(&metrics, &series).is_some_and(|n| n >= dropped) || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let sample = |series: &str| {
        value(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(sample(&series) >= dropped, "{metrics}");
    assert!(sample("lb_warnings") >= 1);
    assert!(sample("lb_backend_snat_ports_in_use{service=\"dns\"") > 0);
    assert!(sample("lb_backend_healthy{service=\"web\"") == 1);
    // Once the UDP flows expire, new ones are served again, and the warning goes.
    std::thread::sleep(Duration::from_secs(4));
    let answer = udp_request(&topo, "again", 42000);
    assert!(
        answer.ends_with(": again"),
        "no answer after expiry: {answer:?}"
    );
    let status = balancer.status();
    assert!(status.get("warnings").is_none(), "{status}");
}

#[test]
fn a_full_flow_table_drops_new_flows_only_and_says_so_in_status_and_metrics() {
    // 700 new flows want 1400 entries of 1024.
    exhaustion(Exhaustion {
        flows: "capacity = 1024\n",
        reason: "flow_table_full",
        warning: "flow table full",
    });
}

#[test]
fn exhausted_snat_ports_drop_new_flows_only_and_say_so_in_status_and_metrics() {
    // 100 ports per backend, two backends: 700 new flows want far more.
    exhaustion(Exhaustion {
        flows: "capacity = 65536\nsnat_ports = \"20000-20099\"\n",
        reason: "snat_ports_exhausted",
        warning: "SNAT ports exhausted",
    });
}

#[test]
fn data_path_debug_logs_are_off_by_default_and_switch_at_runtime() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[4, 6]);
    let lines = |b: &Balancer, what: &str| b.log().matches(what).count();
    let (_, failed) = tally(&http_requests(&topo, 3), 2);
    assert_eq!(failed, 0);
    assert_eq!(balancer.status()["debug_log"], false);
    assert_eq!(lines(&balancer, "new flow "), 0, "logs were on by default");

    cli_ok(&balancer, &["debug-log", "on"]);
    assert_eq!(balancer.status()["debug_log"], true);
    let (_, failed) = tally(&http_requests(&topo, 3), 2);
    assert_eq!(failed, 0);
    // A drop: no backend takes new flows.
    for i in 0..2 {
        cli_ok(&balancer, &["set-weight", "web", &backend(&topo, i), "0"]);
    }
    let (_, failed) = tally(&http_requests(&topo, 1), 2);
    assert_eq!(failed, 1);
    std::thread::sleep(Duration::from_millis(300));
    let log = balancer.log();
    let client = lb_tests::topology::CLIENT.to_string();
    assert!(
        log.lines()
            .filter(|l| {
                l.contains("new flow ") && l.contains(&client) && l.contains(&format!("{VIP}:80"))
            })
            .count()
            >= 3,
        "no new-flow lines:\n{log}"
    );
    assert!(log.contains("drop no_backend: "), "no drop line:\n{log}");

    cli_ok(&balancer, &["debug-log", "off"]);
    for i in 0..2 {
        cli_ok(&balancer, &["set-weight", "web", &backend(&topo, i), "1"]);
    }
    let before = lines(&balancer, "new flow ");
    let (_, failed) = tally(&http_requests(&topo, 3), 2);
    assert_eq!(failed, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&balancer, "new flow "), before, "logs after off");
    let out = balancer.cli(&["debug-log", "maybe"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Connections `wrk` reports it completed ("N requests in ...").
fn wrk_requests(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{stdout}"))
}

/// Four client hosts open connections to one backend, each closed by the server (which keeps
/// it in TIME_WAIT), until SNAT ports come round again, with lb's default `[flows]`. A backend
/// compares a reused tuple's SYN with its TIME_WAIT's last TCP timestamp (PAWS): the clients'
/// timestamps are offset per address pair, so without the balancer's translation about half of
/// those SYNs would be refused, each costing its client a second. The goal: below 0.1%.
/// Two services with the same backends and SNAT address share each backend's ports in FLOWS,
/// but each has its own bitmaps: the second service's bitmap hands out the ports the first one
/// used a moment ago. The probes in FLOWS that follow must find a free port: no connection is
/// dropped as exhausted in a range that is almost all free.
#[test]
fn two_services_on_the_same_backends_take_ports_the_other_holds_in_stride() {
    let Setup { topo, balancer, .. } = setup_with(Arms::Two, &[1, 1], |config| {
        let web = config
            .split("[[service]]\n")
            .nth(1)
            .expect("the web service")
            .replace("name = \"web\"", "name = \"web2\"")
            .replace(":80\"", ":81\"");
        format!("{config}[[service]]\n{web}")
    });
    let mut failed = 0;
    for round in 0..4 {
        // Alternately, each service's bitmaps meet the ports the other's connections hold.
        for port in [81, 80] {
            let (counts, f) = tally(&http_requests_to(&topo, port, 60), 2);
            failed += f;
            println!("round {round}, port {port}: {counts:?}, {f} failed");
        }
    }
    let exhausted = counter(&balancer, "drop_snat_ports_exhausted");
    assert_eq!(
        (failed, exhausted),
        (0, 0),
        "{}",
        balancer.nonzero_counters()
    );
}

#[test]
fn four_client_hosts_reusing_snat_ports_meet_no_paws_refusal() {
    let s = setup_with(Arms::Two, &[1], |config| {
        config.replace("[flows]\ncapacity = 65536\n", "")
    });
    let clients = s.topo.add_clients(4);
    let backend = [&s.topo.backends[0]];
    let client_hosts: Vec<&Netns> = clients.iter().collect();
    let paws_before = kernel_counter(&backend, "TcpExtPAWSTimewait");
    let retrans_before = kernel_counter(&client_hosts, "TcpExtTCPSynRetrans");
    // The default range holds 22,768 ports: past that many connections, every new one reuses
    // a tuple the backend still holds in TIME_WAIT (60 s). Rounds of 5 s, at most 12.
    let mut connections = 0;
    for _ in 0..12 {
        let outputs: Vec<_> = std::thread::scope(|scope| {
            let runs: Vec<_> = clients
                .iter()
                .map(|ns| {
                    scope.spawn(move || {
                        ns.try_sh(&format!(
                            "timeout 30 wrk -t1 -c8 -d5s --timeout 3s -H 'Connection: close' http://{VIP}:80/"
                        ))
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().expect("wrk thread"))
                .collect()
        });
        for out in outputs {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "wrk failed: {stdout}");
            connections += wrk_requests(&stdout);
        }
        if connections > 30_000 {
            break;
        }
    }
    let paws = kernel_counter(&backend, "TcpExtPAWSTimewait") - paws_before;
    let retrans = kernel_counter(&client_hosts, "TcpExtTCPSynRetrans") - retrans_before;
    println!(
        "{connections} connections; backend PAWS refusals {paws}; client SYN retransmissions {retrans}"
    );
    assert!(
        connections > 30_000,
        "only {connections} connections in a minute: SNAT ports did not come round"
    );
    // A handful can come from late segments meeting a TIME_WAIT (the direct path, with no
    // rewriting, shows some too); refused SYNs would be thousands (about half of those reusing
    // a tuple), each a client's SYN retransmission.
    assert!(
        paws * 1000 <= connections,
        "the backend refused {paws} segments for PAWS, over 0.1% of {connections} connections"
    );
}

/// A service with a SNAT pool of two addresses and a range of 64 ports holds 100 connections to
/// its one backend at once: every address has the whole range, so the backend sees both as
/// sources. One address alone would refuse the 65th. Then all of them close, and 100 new ones
/// find ports at once: none is dropped as exhausted (and waits for its SYN's retransmission).
#[test]
fn a_snat_pool_of_two_addresses_holds_more_connections_than_one_address_has_ports() {
    const POOL: [&str; 2] = ["198.18.2.1", "198.18.2.2"];
    let Setup { topo, balancer, .. } = setup_with(Arms::Two, &[1], |config| {
        config
            .replace(
                "capacity = 65536\n",
                "capacity = 65536\nsnat_ports = \"20000-20063\"\n",
            )
            .replacen(
                "protocol = \"tcp\"\n",
                &format!(
                    "protocol = \"tcp\"\nsnat = [\"{}\", \"{}\"]\n",
                    POOL[0], POOL[1]
                ),
                1,
            )
    });
    balancer.wait_health("web", &backend(&topo, 0), true, Duration::from_secs(10));
    let web = balancer.status()["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web").cloned())
        .expect("service web in the status");
    assert_eq!(web["snat"], serde_json::json!(POOL), "{web}");
    for round in 1..=2 {
        let mut connections: Vec<TcpStream> = (0..100).map(|_| connect_in(&topo.client)).collect();
        for (i, c) in connections.iter_mut().enumerate() {
            assert_eq!(request_on(c), "b1", "round {round}, connection {i}");
        }
        let peers = topo.backends[0].sh(&format!(
            "ss -Htn state established '( sport = :{BACKEND_PORT} )' | awk '{{print $4}}'"
        ));
        let from = |addr: &str| {
            peers
                .lines()
                .filter(|p| p.starts_with(&format!("{addr}:")))
                .count()
        };
        let (first, second) = (from(POOL[0]), from(POOL[1]));
        println!(
            "round {round}: the backend sees {first} connections from {}, {second} from {}",
            POOL[0], POOL[1]
        );
        assert_eq!(
            first + second,
            100,
            "round {round}: the backend's peers:\n{peers}"
        );
        assert!(
            first > 0 && second > 0 && first <= 64 && second <= 64,
            "round {round}: {first} and {second} connections on the two addresses"
        );
        drop(connections);
        // Ended connections give their ports back FLOW_RECLAIM_NS (2 s) after they went
        // silent, at the next pass of the in-kernel expiry (every second).
        std::thread::sleep(Duration::from_secs(4));
    }
    assert_eq!(counter(&balancer, "drop_snat_ports_exhausted"), 0);
}

/// `ping` of the VIP from the client: the balancer answers while a service holds the address,
/// and the kernel (which does not hold it) leaves pings unanswered once none does.
#[test]
fn a_vip_answers_ping_while_a_service_holds_it() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1]);
    let ping = || {
        topo.client
            .try_sh(&format!("ping -n -c 3 -i 0.2 -W 1 {VIP}"))
    };
    let out = ping();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "no echo reply from the VIP:\n{text}");
    assert!(text.contains("3 received"), "{text}");
    assert!(text.contains("ttl=64"), "{text}");
    assert_eq!(counter(&balancer, "event_icmp_echo_replied"), 3);
    for service in ["web", "dns"] {
        cli_ok(&balancer, &["service", "remove", service]);
    }
    let out = ping();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        !out.status.success(),
        "the VIP answered with no service on it:\n{text}"
    );
    assert_eq!(counter(&balancer, "event_icmp_echo_replied"), 3);
}

/// `curl` in `ns` against the VIP, at most 10 s: its output (the body, or what `-w` asks) and
/// whether it succeeded.
fn curl_in(ns: &Netns, args: &str) -> (String, bool) {
    let out = ns.try_sh(&format!("curl -sS -m 10 {args}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (format!("{text}{err}"), out.status.success())
}

/// A POST of `len` bytes from `ns` to the VIP: the backend's answer, and whether it succeeded.
fn upload_in(ns: &Netns, len: usize) -> (String, bool) {
    let out = ns.try_sh(&format!(
        "head -c {len} /dev/zero | curl -sS -m 10 -H 'Expect:' --data-binary @- http://{VIP}/upload"
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (format!("{text}{err}"), out.status.success())
}

/// The issue's bottleneck: client host -(1400)- router -(1500)- balancer -(1500)- backend,
/// with the client announcing MSS 1460 (as a host behind a tunnel does). The backend's
/// full-size segments do not fit the router's last link, so the router's "fragmentation
/// needed" goes to the VIP; the balancer must hand it to the backend, translated, or the
/// download stalls for good (before: 0 bytes in 10 s). The upload must complete too.
#[test]
fn a_download_through_a_narrower_link_completes_by_path_mtu_discovery() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1]);
    let hosts = topo.add_clients(1);
    let host = &hosts[0];
    // The client namespace routes for the host (see Topology::add_clients): the host's link
    // is c0 there and eth0 on the host.
    topo.client.sh("ip link set c0 mtu 1400");
    host.sh("ip link set eth0 mtu 1400
             ip route change default via 198.18.16.1 dev eth0 advmss 1460");
    let (out, ok) = curl_in(
        host,
        &format!("-o /dev/null -w '%{{size_download}}' http://{VIP}/bytes/300000"),
    );
    assert!(ok && out == "300000", "download: {out}");
    let translated = counter(&balancer, "event_icmp_error_to_backend");
    println!("download: 300000 bytes; fragmentation-needed forwarded to the backend: {translated}");
    assert!(
        translated >= 1,
        "no ICMP error reached the backend through the balancer"
    );
    let pmtu = topo.backends[0].sh("ip route get 198.18.1.1");
    assert!(
        pmtu.contains("mtu 1400"),
        "the backend's route cache: {pmtu}"
    );
    let (out, ok) = upload_in(host, 300_000);
    assert!(ok && out.trim() == "b1 received 300000", "upload: {out}");
}

/// The same bottleneck on a path that drops ICMP: the router sends no "fragmentation needed",
/// so path MTU discovery cannot work and a download through the VIP stalls (shown first, so
/// the test cannot pass for another reason). A service added from the CLI with `--mss 1360`
/// lowers the MSS the client's SYN announces, the backend sends segments that fit the narrow
/// link, and the same download through it completes.
#[test]
fn mss_clamping_carries_a_download_across_a_link_that_drops_icmp() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1]);
    let hosts = topo.add_clients(1);
    let host = &hosts[0];
    topo.client.sh("ip link set c0 mtu 1400
         nft add table inet drop_icmp
         nft add chain inet drop_icmp out '{ type filter hook output priority 0; }'
         nft add rule inet drop_icmp out icmp type destination-unreachable drop");
    host.sh("ip link set eth0 mtu 1400
             ip route change default via 198.18.16.1 dev eth0 advmss 1460");
    let download = |port: u16| {
        curl_in(
            host,
            &format!("-o /dev/null -w '%{{size_download}}' http://{VIP}:{port}/bytes/300000"),
        )
    };
    let (out, ok) = download(80);
    println!("without clamping: {out}");
    assert!(
        !ok,
        "the download crossed a path that drops ICMP unclamped: {out}"
    );
    assert_eq!(counter(&balancer, "event_icmp_error_to_backend"), 0);

    let b1 = backend(&topo, 0);
    let said = cli_ok(
        &balancer,
        &[
            "service",
            "add",
            "clamped",
            &format!("{VIP}:81"),
            "--mss",
            "1360",
            "--backend",
            &b1,
        ],
    );
    assert!(said.contains("added clamped"), "{said}");
    balancer.wait_health("clamped", &b1, true, Duration::from_secs(5));
    let shown = String::from_utf8_lossy(&balancer.cli(&["status"]).stdout).into_owned();
    assert!(
        shown.contains("clamped") && shown.contains("mss 1360"),
        "{shown}"
    );
    let (out, ok) = download(81);
    let clamped = counter(&balancer, "event_mss_clamped");
    println!("with mss 1360: {out}; handshakes clamped: {clamped}");
    assert!(ok && out == "300000", "download: {out}");
    // The client's SYN and the backend's SYN-ACK.
    assert_eq!(clamped, 2);

    // "auto" takes the balancer's own links (1500 here): the MSS that fits them.
    cli_ok(
        &balancer,
        &[
            "service",
            "add",
            "auto",
            &format!("{VIP}:82"),
            "--mss",
            "auto",
            "--backend",
            &b1,
        ],
    );
    let status = balancer.status();
    let auto = status["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "auto"))
        .expect("the service added");
    assert_eq!(auto["mss"], 1460, "{auto}");
}

/// The balancer's own link to the backends is narrower (1400) than the client's, while the
/// backend announces MSS 1460 (its link is 1500): the client's full-size segments do not fit
/// the balancer's next hop. The balancer answers each with "fragmentation needed" (MTU 1400,
/// from the VIP, quoting the segment as the client sent it), so a 300 KB upload completes.
#[test]
fn an_upload_too_big_for_the_backend_link_gets_frag_needed_from_the_balancer() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1]);
    topo.lb.sh("ip link set lb1 mtu 1400");
    topo.switch.sh("ip link set s-lb mtu 1400");
    let (out, ok) = upload_in(&topo.client, 300_000);
    let sent = counter(&balancer, "event_frag_needed_sent");
    println!("upload: {out}; fragmentation-needed sent by the balancer: {sent}");
    assert!(ok && out.trim() == "b1 received 300000", "upload: {out}");
    assert!(sent >= 1, "the balancer sent no fragmentation-needed");
    let pmtu = topo.client.sh(&format!("ip route get {VIP}"));
    assert!(
        pmtu.contains("mtu 1400"),
        "the client's route cache: {pmtu}"
    );
}

/// IPv6 through the balancer's ICMPv6, on the IPv4 tests' bottlenecks (routers never fragment
/// IPv6, so path MTU discovery is all there is): `ping -6` of the VIP is answered; a download
/// to a client host behind a 1400-byte link completes once the router's "packet too big",
/// addressed to the VIP, reaches the backend translated; an upload too big for the balancer's
/// own 1400-byte link to the backends completes by the "packet too big" the balancer sends.
#[test]
fn ipv6_path_mtu_discovery_works_both_ways_through_the_balancer_and_the_vip_answers_ping() {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::Two, 1);
    let addrs6 = topo.add_ipv6();
    let hosts = topo.add_clients(1);
    topo.add_ipv6_clients(&hosts);
    let host = &hosts[0];
    let config = dual_stack_config(&topo, &addrs6, &[1]);
    let Setup { topo, balancer, .. } = setup_on(topo, &[1], |_| config);
    let b6 = format!("[{}]:{BACKEND_PORT}", addrs6[0]);
    balancer.wait_health("web6", &b6, true, Duration::from_secs(5));

    let out = topo
        .client
        .try_sh(&format!("ping -6 -n -c 3 -i 0.2 -W 1 {VIP6}"));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success() && text.contains("3 received"),
        "{text}"
    );
    assert!(text.contains("ttl=64"), "{text}");
    assert_eq!(counter(&balancer, "event_icmp_echo_replied"), 3);

    // The client namespace routes for the host: its link is c0 there and eth0 on the host,
    // which announces the MSS of a 1500-byte path (as a host behind a tunnel does).
    topo.client.sh("ip link set c0 mtu 1400");
    host.sh("ip link set eth0 mtu 1400
             ip -6 route change default via fd00:10::1 dev eth0 advmss 1440");
    let (out, ok) = curl_in(
        host,
        &format!("-g -o /dev/null -w '%{{size_download}}' http://[{VIP6}]/bytes/300000"),
    );
    let translated = counter(&balancer, "event_icmp_error_to_backend");
    println!("download: {out}; packet-too-big forwarded to the backend: {translated}");
    assert!(ok && out == "300000", "download: {out}");
    assert!(translated >= 1, "no ICMPv6 error reached the backend");
    let snat6 = "fd00:1::1";
    let pmtu = topo.backends[0].sh(&format!("ip -6 route get {snat6}"));
    assert!(
        pmtu.contains("mtu 1400"),
        "the backend's route cache: {pmtu}"
    );

    // The backend forgets the path's MTU, or its SYN-ACK would announce the MSS that fits it.
    topo.backends[0].sh("ip -6 route flush cache");
    topo.lb.sh("ip link set lb1 mtu 1400");
    topo.switch.sh("ip link set s-lb mtu 1400");
    let out = topo.client.try_sh(&format!(
        "head -c 300000 /dev/zero | curl -sS -m 10 -g -H 'Expect:' --data-binary @- http://[{VIP6}]/upload"
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sent = counter(&balancer, "event_packet_too_big_sent");
    println!("upload: {text}; packet-too-big sent by the balancer: {sent}");
    assert!(text.trim() == "b1 received 300000", "upload: {text}");
    assert!(sent >= 1, "the balancer sent no packet-too-big");
    let pmtu = topo.client.sh(&format!("ip -6 route get {VIP6}"));
    assert!(
        pmtu.contains("mtu 1400"),
        "the client's route cache: {pmtu}"
    );
}

/// A 4,000-byte UDP request and its answer cross the balancer in fragments (MTU 1500 both
/// ways, three fragments each): the first fragment is balanced, the later ones follow it, and
/// each side reassembles the whole datagram. Before, the fragments went to the balancer's
/// kernel unbalanced and the request was lost.
#[test]
fn a_fragmented_udp_request_and_answer_cross_the_balancer_whole() {
    let Setup { topo, balancer, .. } = setup(Arms::Two, &[1, 1]);
    assert_fragmented_round_trip(&topo, &balancer, IpAddr::V4(VIP));
}

/// The same over IPv6, where the senders fragment (routers do not) and the fragment header
/// carries the identification. Before, IPv6 fragments passed to the balancer's kernel as
/// extension headers and the request was lost.
#[test]
fn a_fragmented_ipv6_udp_request_and_answer_cross_the_balancer_whole() {
    let (Setup { topo, balancer, .. }, backends) =
        setup_ipv6(Arms::Two, &[1, 1], |topo, addrs6| {
            dual_stack_config(topo, addrs6, &[1, 1])
        });
    for b in &backends {
        balancer.wait_health("dns6", b, true, Duration::from_secs(5));
    }
    assert_fragmented_round_trip(&topo, &balancer, IpAddr::V6(VIP6));
}

/// Containers' fragmented UDP answers reach the client whole, over IPv4 and IPv6: the tc hook
/// translates an answer's first fragment and has the later ones follow it (as XDP does the
/// request's). Before, the later fragments went on untranslated and the answer was lost.
#[test]
fn containers_fragmented_udp_answers_reach_the_client_whole() {
    require_root();
    sweep_stale();
    let topo = Topology::containers(2);
    let addrs6 = topo.add_ipv6();
    let config = dual_stack_config(&topo, &addrs6, &[1, 1]);
    let Setup { topo, balancer, .. } = setup_on(topo, &[1, 1], |_| config);
    for addr in &addrs6 {
        let b6 = format!("[{addr}]:{BACKEND_PORT}");
        balancer.wait_health("dns6", &b6, true, Duration::from_secs(5));
    }
    assert_fragmented_round_trip(&topo, &balancer, IpAddr::V4(VIP));
    assert_fragmented_round_trip(&topo, &balancer, IpAddr::V6(VIP6));
}

/// Sends a 4,000-byte datagram from the client to `vip`:53 and asserts that a backend echoed it
/// whole, its fragments balanced and followed both ways (three each way at MTU 1500).
fn assert_fragmented_round_trip(topo: &Topology, balancer: &Balancer, vip: IpAddr) {
    let fragment_counters = || {
        (
            counter(balancer, "event_first_fragments"),
            counter(balancer, "event_fragments_followed"),
        )
    };
    let before = fragment_counters();
    let request: Vec<u8> = (0..4000).map(|i| b'a' + (i % 26) as u8).collect();
    let sent = request.clone();
    let answer = topo
        .client
        .spawn_inside(move || -> std::io::Result<Vec<u8>> {
            let any = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&sent, (vip, 53))?;
            let mut buf = vec![0u8; 65536];
            let n = socket.recv(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
        .join()
        .expect("client thread")
        .expect("an answer within 2 s");
    let text = String::from_utf8_lossy(&answer);
    let (server, echoed) = text.split_once(": ").expect("NAME: request");
    assert!(["b1", "b2"].contains(&server), "answered by {server}");
    assert!(
        echoed.as_bytes() == request.as_slice(),
        "the answer is {} bytes, not the request echoed whole",
        answer.len()
    );
    let after = fragment_counters();
    let (first, followed) = (after.0 - before.0, after.1 - before.1);
    println!(
        "{vip}: {} bytes answered by {server}; first fragments {first}, later ones followed {followed}",
        answer.len()
    );
    assert_eq!(
        (first, followed),
        (2, 4),
        "one datagram of three fragments each way"
    );
}

/// `mode = "dnat"` over IPv6 (the balancer is the backends' IPv6 gateway): each backend sees
/// the client's own IPv6 address and port, new connections split 4:6, a UDP answer comes back
/// from the VIP, and an IPv6 backend lb reaches through a gateway is reported.
#[test]
fn ipv6_dnat_mode_shows_backends_the_client_address_and_splits_by_weight() {
    let far = "[[service]]\nname = \"far6\"\nvip = \"[fd00:100::1]:81\"\nmode = \"dnat\"\n\
               [service.health]\nkind = \"none\"\n\
               [[service.backend]]\naddress = \"[fd00:50::10]:8000\"\n";
    let (Setup { topo, balancer, .. }, b6) = setup_ipv6(Arms::Two, &[4, 6], |topo, addrs6| {
        dnat_config(dual_stack_config(topo, addrs6, &[4, 6])) + far
    });
    let b6 = |i: usize| b6[i].clone();
    let status = balancer.status();
    let web6 = status["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web6"))
        .expect("web6");
    assert_eq!(web6["mode"], "dnat", "{web6}");

    assert_backends_see(
        &balancer,
        &topo,
        IpAddr::V6(CLIENT6),
        &format!("http://[{VIP6}]"),
        45200,
        20,
    );

    let (counts, failed) = tally(&http_requests6(&topo, 1000), 2);
    println!("IPv6 dnat, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "IPv6 dnat 4:6 split");

    let answer = topo
        .client
        .sh(&format!("printf 'hello6' | nc -u -w1 -p 45300 {VIP6} 53"));
    assert!(
        answer.trim() == "b1: hello6" || answer.trim() == "b2: hello6",
        "UDP answer through IPv6 DNAT: {answer:?}"
    );

    topo.lb
        .sh("ip -6 route add fd00:50::/64 via fd00:1::11 dev lb1");
    wait_for_warning(&balancer, &["\"far6\"", "gateway fd00:1::11"]);
    let warnings = balancer.status()["warnings"].to_string();
    assert!(
        !warnings.contains("web6"),
        "web6's backends are on lb1, lb is their gateway: {warnings}"
    );
    assert_eq!(balancer.backend("web6", &b6(0))["snat_ports_in_use"], 0);
    assert_eq!(counter(&balancer, "drop_dnat_tuple_taken"), 0);
}

/// An IPv6 connection cut on purpose (its backend removed, then cut with `--now`) is reset at
/// both ends, as an IPv4 one: the backend's socket is gone at once and the client's next request
/// fails with ECONNRESET, not a timeout.
#[test]
fn ipv6_a_backend_removed_now_has_its_connections_reset_at_both_ends() {
    let (Setup { topo, balancer, .. }, b6) = setup_ipv6(Arms::Two, &[1, 1], |topo, addrs6| {
        dual_stack_config(topo, addrs6, &[1, 1])
    });
    let b6 = |i: usize| b6[i].clone();
    let mut long_lived = topo
        .client
        .spawn_inside(|| TcpStream::connect((VIP6, 80)).expect("connect to [VIP6]:80"))
        .join()
        .expect("connect thread");
    let served_by = request_on(&mut long_lived);
    let i: usize = served_by[1..].parse::<usize>().expect("bN") - 1;
    assert_eq!(established_at(&topo, i), 1, "the long-lived connection");
    // Removed, it finishes its connections (terminating); `--now` then cuts them.
    cli_ok(&balancer, &["backend", "remove", "web6", &b6(i)]);
    assert_eq!(
        request_on(&mut long_lived),
        served_by,
        "still served while terminating"
    );
    let said = cli_ok(&balancer, &["backend", "remove", "web6", &b6(i), "--now"]);
    assert!(said.contains("1 connections, 2 RSTs sent"), "{said}");
    assert_eq!(established_at(&topo, i), 0, "the backend's end was reset");
    assert_reset(&mut long_lived, "the client's end");
}

/// An IPv6 setup (`Topology::add_ipv6` on `arms`, one backend per weight): the daemon runs
/// on what `prepare` returns, given the topology and the backends' IPv6 addresses, once it
/// has set up what it needs; its service "web6" is healthy on every backend. Returns the
/// setup and the backends as `[address]:port`.
fn setup_ipv6(
    arms: Arms,
    weights: &[u32],
    prepare: impl FnOnce(&Topology, &[std::net::Ipv6Addr]) -> String,
) -> (Setup, Vec<String>) {
    require_root();
    sweep_stale();
    let topo = Topology::new(arms, weights.len());
    let addrs6 = topo.add_ipv6();
    let config = prepare(&topo, &addrs6);
    let setup = setup_on(topo, weights, |_| config);
    let backends: Vec<String> = addrs6
        .iter()
        .map(|a| format!("[{a}]:{BACKEND_PORT}"))
        .collect();
    for b in &backends {
        setup
            .balancer
            .wait_health("web6", b, true, Duration::from_secs(5));
    }
    (setup, backends)
}

/// Waits (5 s at most) for a warning in `lb status` that holds every one of `parts`.
fn wait_for_warning(balancer: &Balancer, parts: &[&str]) {
    balancer.wait_until(
        Duration::from_secs(5),
        &format!("a warning with {parts:?}"),
        |b| {
            b.status()["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str())
                .any(|w| parts.iter().all(|p| w.contains(p)))
        },
    );
}

/// The topology's config with every service in `mode = "dnat"`.
fn dnat_config(config: String) -> String {
    config
        .replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nmode = \"dnat\"\n",
        )
        .replace(
            "protocol = \"udp\"\n",
            "protocol = \"udp\"\nmode = \"dnat\"\n",
        )
}

/// `mode = "dnat"` (two-arm: the balancer is the backends' gateway): each backend sees the
/// client's own address and port, new connections split 4:6, a weight change moves new
/// connections while a long-lived one stays, and UDP answers come back from the VIP. A DNAT
/// service whose backend lb reaches through a gateway is reported, as its replies would bypass
/// lb.
#[test]
fn dnat_mode_shows_backends_the_client_address_and_splits_by_weight() {
    let far = "[[service]]\nname = \"far\"\nvip = \"198.18.100.1:81\"\nmode = \"dnat\"\n\
               [service.health]\nkind = \"none\"\n\
               [[service.backend]]\naddress = \"198.18.50.10:8000\"\n";
    let Setup { topo, balancer, .. } =
        setup_with(Arms::Two, &[4, 6], |config| dnat_config(config) + far);
    let status = balancer.status();
    let modes: Vec<&str> = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["mode"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(modes, ["dnat", "dnat", "dnat"]);

    // Each backend names the peer it saw: the client, on the port curl bound.
    assert_backends_see_the_client(&balancer, &topo, &format!("http://{VIP}"), 45000, 20);

    let (counts, failed) = tally(&http_requests(&topo, 1000), 2);
    println!("dnat, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "dnat 4:6 split");

    assert_weights_move_new_connections_only(&balancer, &topo, 80);

    // nc only takes an answer from the address it sent to: the VIP.
    let answer = udp_request(&topo, "hello", 45100);
    assert!(
        answer.ends_with(": hello") && answer.starts_with('b'),
        "UDP answer through DNAT: {answer:?}"
    );

    // lb reaches "far"'s backend through a gateway: reported, naming the service and why.
    topo.lb
        .sh("ip route add 198.18.50.0/24 via 198.18.1.11 dev lb1");
    wait_for_warning(&balancer, &["\"far\"", "gateway 198.18.1.11"]);
    let warnings = balancer.status()["warnings"].to_string();
    assert!(
        !warnings.contains("\"web\"") && !warnings.contains("\\\"web\\\""),
        "web's backends are on lb1, lb is their gateway: {warnings}"
    );
    assert!(
        !warnings.contains("SNAT ports"),
        "DNAT flows hold no SNAT port: {warnings}"
    );
    assert_eq!(
        balancer.backend("web", &backend(&topo, 0))["snat_ports_in_use"],
        0
    );
    assert_eq!(counter(&balancer, "drop_dnat_tuple_taken"), 0);
}

/// Weights 0:10, then 10:0 (`lb set-weight`): each time, all of 100 new connections to
/// VIP:`port` go to the weighted backend, and a long-lived connection stays on its own.
fn assert_weights_move_new_connections_only(balancer: &Balancer, topo: &Topology, port: u16) {
    let mut long_lived = topo
        .client
        .spawn_inside(move || TcpStream::connect((VIP, port)).expect("connect to the VIP"))
        .join()
        .expect("connect thread");
    let first = request_on(&mut long_lived);
    for (weights, want_b1) in [([0, 10], 0.0), ([10, 0], 100.0)] {
        for (i, w) in weights.iter().enumerate() {
            cli_ok(
                balancer,
                &["set-weight", "web", &backend(topo, i), &w.to_string()],
            );
        }
        let (counts, failed) = tally(&http_requests_to(topo, port, 100), 2);
        assert_eq!(failed, 0, "weights {weights:?}");
        assert_share(
            balancer,
            &counts,
            want_b1,
            0.0,
            &format!("weights {weights:?}"),
        );
        assert_eq!(
            request_on(&mut long_lived),
            first,
            "the long-lived connection moved after weights {weights:?}"
        );
    }
}

/// Each of `count` connections from client ports `first_port`.. to `url` (`GET /peer`) is
/// answered with the peer its backend saw: the client itself, on that port.
fn assert_backends_see_the_client(
    balancer: &Balancer,
    topo: &Topology,
    url: &str,
    first_port: u16,
    count: u16,
) {
    assert_backends_see(balancer, topo, IpAddr::V4(CLIENT), url, first_port, count);
}

/// As `assert_backends_see_the_client`, for the client's address `client` (of `url`'s family).
/// A failure says what the data path counted and which neighbours lb and the client knew.
fn assert_backends_see(
    balancer: &Balancer,
    topo: &Topology,
    client: IpAddr,
    url: &str,
    first_port: u16,
    count: u16,
) {
    let last = first_port + count - 1;
    let peers = topo.client.sh(&format!(
        "for p in $(seq {first_port} {last}); do curl -s -g --max-time 2 --local-port $p {url}/peer || echo FAIL; done"
    ));
    let peers: Vec<&str> = peers.lines().collect();
    assert_eq!(peers.len(), usize::from(count), "{peers:?}");
    for (i, line) in peers.iter().enumerate() {
        let seen = line.split(' ').nth(1).unwrap_or("");
        let expected = SocketAddr::new(client, first_port + i as u16).to_string();
        assert!(
            seen == expected,
            "backend's view of connection {i}: {line}, expected {expected}\ncounters:\n{}\n\
             lb's neighbours:\n{}\nthe client's:\n{}\nlog:\n{}",
            balancer.nonzero_counters(),
            topo.lb.sh("ip neigh; ip -6 neigh"),
            topo.client.sh("ip neigh; ip -6 neigh"),
            balancer.log()
        );
    }
}

/// A 4 MB download from `url` reaches the client while lb carries only the client's side of
/// it (the byte counts of `service`'s `backends`, which the sweep refreshes each second).
fn assert_download_skips_lb(
    balancer: &Balancer,
    topo: &Topology,
    (service, backends): (&str, &[String]),
    url: &str,
    what: &str,
) {
    let bytes = || -> u64 {
        backends
            .iter()
            .map(|b| balancer.backend(service, b)["bytes"].as_u64().unwrap_or(0))
            .sum()
    };
    let bytes_before = bytes();
    let got = topo.client.sh(&format!(
        "curl -s -g --max-time 10 {url}/bytes/4000000 | wc -c"
    ));
    assert_eq!(got.trim(), "4000000", "the download");
    std::thread::sleep(Duration::from_millis(1500));
    let through_lb = bytes() - bytes_before;
    println!("{what}: a 4000000-byte download took {through_lb} bytes through lb");
    assert!(
        through_lb > 0 && through_lb < 400_000,
        "lb carried {through_lb} bytes of a 4 MB download: the replies did not skip it"
    );
}

/// A DSR service's config for the one-arm topology: VIP:8000 over both backends (which listen
/// on the VIP's port), with fast health checks.
fn dsr_config(topo: &Topology, weights: &[u32]) -> String {
    let mut text = format!(
        "interfaces = [\"lb0\"]\n[host]\ncgroup = \"off\"\n[flows]\ncapacity = 65536\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}:{BACKEND_PORT}\"\nmode = \"dsr\"\ndsr = \"l2\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"
    );
    for (addr, weight) in topo.backend_addrs.iter().zip(weights) {
        text += &format!(
            "[[service.backend]]\naddress = \"{addr}:{BACKEND_PORT}\"\nweight = {weight}\n"
        );
    }
    text
}

/// `mode = "dsr"`, L2 form, over IPv6 (one-arm on fd00::/64, the VIP on each backend's
/// loopback: IPv6 answers neighbour solicitations only for addresses of the receiving device,
/// so nothing like arp_ignore is needed): backends see the client's own address, new
/// connections split 4:6, a 4 MB download passes lb one way only, and the health check through
/// the VIP takes a backend without the VIP out.
#[test]
fn ipv6_dsr_l2_backends_answer_the_client_directly() {
    let (Setup { topo, balancer, .. }, b6) = setup_ipv6(Arms::One, &[4, 6], |topo, addrs6| {
        for ns in &topo.backends {
            ns.sh(&format!("ip -6 addr add {VIP6}/128 dev lo"));
        }
        let mut config = format!(
            "interfaces = [\"lb0\"]\n[host]\ncgroup = \"off\"\n[flows]\ncapacity = 65536\n\
             [[service]]\nname = \"web6\"\nvip = \"[{VIP6}]:{BACKEND_PORT}\"\nmode = \"dsr\"\ndsr = \"l2\"\n\
             [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"
        );
        for (addr, weight) in addrs6.iter().zip([4, 6]) {
            config += &format!(
                "[[service.backend]]\naddress = \"[{addr}]:{BACKEND_PORT}\"\nweight = {weight}\n"
            );
        }
        config
    });
    let b6 = |i: usize| b6[i].clone();
    assert_eq!(balancer.status()["services"][0]["mode"], "dsr-l2");
    let url = format!("http://[{VIP6}]:{BACKEND_PORT}");

    assert_backends_see(&balancer, &topo, IpAddr::V6(CLIENT6), &url, 46200, 10);

    let (counts, failed) = tally(&http_requests_at(&topo, &url, 1000), 2);
    println!("IPv6 dsr l2, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "IPv6 dsr 4:6 split");

    let backends: Vec<String> = (0..2).map(b6).collect();
    assert_download_skips_lb(&balancer, &topo, ("web6", &backends), &url, "IPv6 dsr l2");

    // Without the VIP on its loopback, a backend still answering on its own address is down.
    topo.backends[0].sh(&format!("ip -6 addr del {VIP6}/128 dev lo"));
    balancer.wait_health("web6", &b6(0), false, Duration::from_secs(5));
    let why = balancer.backend("web6", &b6(0))["last_error"].to_string();
    assert!(why.contains("is the VIP on its loopback"), "{why}");
    topo.backends[0].sh(&format!("ip -6 addr add {VIP6}/128 dev lo"));
    balancer.wait_health("web6", &b6(0), true, Duration::from_secs(5));
    let warnings = balancer.status()["warnings"].to_string();
    assert!(!warnings.contains("web6"), "{warnings}");
    assert_eq!(counter(&balancer, "drop_dsr_cannot_forward"), 0);
}

/// `mode = "dsr"`, L2 form (one-arm: the client and the backends share lb0's segment; each
/// backend has the VIP on its loopback, with arp_ignore/arp_announce set): the backends see the
/// client's address and answer it directly, so a 4 MB download passes lb in one direction only
/// (lb counts the client's segments alone); new connections split 4:6, set-weight moves new
/// connections while a long-lived one stays, and a stopped backend's share moves to the other.
#[test]
fn dsr_l2_backends_answer_the_client_directly() {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::One, 2);
    for ns in &topo.backends {
        ns.sh(&format!(
            "ip addr add {VIP}/32 dev lo
             sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
             sysctl -qw net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2"
        ));
    }
    let mut servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let balancer = Balancer::start(&lb_binary(), &topo, &dsr_config(&topo, &[4, 6]));
    for i in 0..2 {
        balancer.wait_health("web", &backend(&topo, i), true, Duration::from_secs(5));
    }
    assert_eq!(balancer.status()["services"][0]["mode"], "dsr-l2");
    let url = format!("http://{VIP}:{BACKEND_PORT}");

    assert_backends_see_the_client(&balancer, &topo, &url, 46000, 10);

    let (counts, failed) = tally(&http_requests_to(&topo, BACKEND_PORT, 1000), 2);
    println!("dsr l2, 1000 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(&balancer, &counts, 40.0, 5.0, "dsr 4:6 split");

    let backends: Vec<String> = (0..2).map(|i| backend(&topo, i)).collect();
    assert_download_skips_lb(&balancer, &topo, ("web", &backends), &url, "dsr l2");

    assert_weights_move_new_connections_only(&balancer, &topo, BACKEND_PORT);
    cli_ok(&balancer, &["set-weight", "web", &backend(&topo, 1), "10"]);

    // Health checks reach the service as clients do (a SYN to the VIP, to the backend's MAC):
    // without the VIP on its loopback, a backend still answering on its own address is down.
    let b1 = backend(&topo, 0);
    topo.backends[0].sh(&format!("ip addr del {VIP}/32 dev lo"));
    balancer.wait_health("web", &b1, false, Duration::from_secs(5));
    let why = balancer.backend("web", &b1)["last_error"].to_string();
    assert!(why.contains("is the VIP on its loopback"), "{why}");
    let (counts, failed) = tally(&http_requests_to(&topo, BACKEND_PORT, 50), 2);
    assert_eq!(
        (counts, failed),
        (vec![0, 50], 0),
        "backend 1 without the VIP"
    );
    topo.backends[0].sh(&format!("ip addr add {VIP}/32 dev lo"));
    balancer.wait_health("web", &b1, true, Duration::from_secs(5));

    // Stop backend 1: health checks take it out, every new connection lands on backend 2.
    servers[0].kill().expect("stop backend 1's server");
    servers[0].wait().expect("reap backend 1's server");
    balancer.wait_health("web", &backend(&topo, 0), false, Duration::from_secs(5));
    let (counts, failed) = tally(&http_requests_to(&topo, BACKEND_PORT, 100), 2);
    assert_eq!(
        (counts, failed),
        (vec![0, 100], 0),
        "after backend 1 stopped"
    );
    let warnings = balancer.status()["warnings"].to_string();
    assert!(!warnings.contains("\"web\""), "{warnings}");
    assert_eq!(counter(&balancer, "drop_dsr_cannot_forward"), 0);
}

/// `mode = "dsr"` with `dsr = "ipip"`: the packet reaches the backend inside an IPIP header that
/// `lb decap` (run on each backend) strips; the backends see the client's address and answer it
/// over a path that skips lb (the client has a second link on their segment). Without `lb
/// decap` no connection gets through (this kernel has no ipip module), and the health checks,
/// which take the tunnel as clients do, hold the backends down.
#[test]
fn dsr_ipip_reaches_backends_through_lb_decap() {
    dsr_tunnel_reaches_backends_through_lb_decap("ipip", Family::V4);
}

/// The same with `dsr = "gue"`: IPv4 and UDP to port 6080, the flow's hash in the source port.
#[test]
fn dsr_gue_reaches_backends_through_lb_decap() {
    dsr_tunnel_reaches_backends_through_lb_decap("gue", Family::V4);
}

/// The IPIP form for an IPv6 service: IPv6 inside IPv6, stripped by `lb decap`.
#[test]
fn ipv6_dsr_ipip_reaches_backends_through_lb_decap() {
    dsr_tunnel_reaches_backends_through_lb_decap("ipip", Family::V6);
}

/// The GUE form for an IPv6 service: IPv6 inside IPv6 and UDP.
#[test]
fn ipv6_dsr_gue_reaches_backends_through_lb_decap() {
    dsr_tunnel_reaches_backends_through_lb_decap("gue", Family::V6);
}

/// The address family a test runs its service in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn dsr_tunnel_reaches_backends_through_lb_decap(form: &str, family: Family) {
    require_root();
    sweep_stale();
    let topo = Topology::new(Arms::Two, 2);
    let addrs6 = if family == Family::V6 {
        topo.add_ipv6()
    } else {
        Vec::new()
    };
    topo.client.sh(&format!(
        "ip link add eth1 type veth peer name s-c2 netns {switch}
         ip link set eth1 up
         ip addr add 198.18.1.2/24 dev eth1
         ethtool -K eth1 tx off >/dev/null
         sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0",
        switch = topo.switch.name
    ));
    topo.switch
        .sh("ip link set s-c2 up && ip link set s-c2 master br0");
    for ns in &topo.backends {
        ns.sh(&format!(
            "ip addr add {VIP}/32 dev lo
             ip route add {CLIENT}/32 via 198.18.1.2"
        ));
    }
    if family == Family::V6 {
        topo.client.sh("ip -6 addr add fd00:1::2/64 dev eth1 nodad");
        for ns in &topo.backends {
            ns.sh(&format!(
                "ip -6 addr add {VIP6}/128 dev lo
                 ip -6 route add {CLIENT6}/128 via fd00:1::2"
            ));
        }
    }
    let _servers: Vec<Child> = (0..2).map(|i| start_server(&topo, i)).collect();
    let mut config = dsr_config(&topo, &[4, 6])
        .replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"lb1\"]")
        .replace("dsr = \"l2\"", &format!("dsr = \"{form}\""));
    let (service, vip, client, backends): (&str, IpAddr, IpAddr, Vec<String>) = match family {
        Family::V4 => (
            "web",
            VIP.into(),
            CLIENT.into(),
            (0..2).map(|i| backend(&topo, i)).collect(),
        ),
        Family::V6 => {
            // The IPv4 service's twin on the backends' IPv6 addresses, beside it.
            config += &format!(
                "[[service]]\nname = \"web6\"\nvip = \"[{VIP6}]:{BACKEND_PORT}\"\nmode = \"dsr\"\ndsr = \"{form}\"\n\
                 [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"
            );
            for (addr, weight) in addrs6.iter().zip([4, 6]) {
                config += &format!(
                    "[[service.backend]]\naddress = \"[{addr}]:{BACKEND_PORT}\"\nweight = {weight}\n"
                );
            }
            (
                "web6",
                VIP6.into(),
                CLIENT6.into(),
                addrs6
                    .iter()
                    .map(|a| format!("[{a}]:{BACKEND_PORT}"))
                    .collect(),
            )
        }
    };
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    // The health checks go through the tunnel, as clients do: without lb decap, down.
    for b in &backends {
        balancer.wait_until(Duration::from_secs(5), "a failed VIP probe", |lb| {
            lb.backend(service, b)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("lb decap running"))
        });
        balancer.wait_health(service, b, false, Duration::from_secs(5));
    }
    let mode = balancer.status()["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .map(|s| s["mode"].clone());
    assert_eq!(mode, Some(format!("dsr-{form}").into()));
    let url = format!("http://{}", SocketAddr::new(vip, BACKEND_PORT));
    let curl = |path: &str| {
        topo.client
            .sh(&format!("curl -s -g --max-time 2 {url}{path} || echo FAIL"))
            .trim()
            .to_owned()
    };
    assert_eq!(curl("/"), "FAIL", "got through without lb decap");

    let lb = lb_binary();
    let mut decaps: Vec<Child> = topo
        .backends
        .iter()
        .map(|ns| {
            ns.spawn(
                &[
                    lb.to_str().expect("utf-8 path"),
                    "decap",
                    "--interface",
                    "eth0",
                    "--vip",
                    &vip.to_string(),
                ],
                std::process::Stdio::piped(),
            )
        })
        .collect();
    for b in &backends {
        balancer.wait_health(service, b, true, Duration::from_secs(10));
    }
    assert_ne!(curl("/"), "FAIL", "no connection through lb decap");

    assert_backends_see(&balancer, &topo, client, &url, 47000, 10);

    let (counts, failed) = tally(&http_requests_at(&topo, &url, 400), 2);
    println!("dsr {form} ({service}), 400 connections at 4:6: {counts:?}, {failed} failed");
    assert_eq!(failed, 0, "failed connections:\n{}", balancer.log());
    assert_share(
        &balancer,
        &counts,
        40.0,
        7.5,
        &format!("dsr {form} 4:6 split"),
    );

    assert_download_skips_lb(
        &balancer,
        &topo,
        (service, &backends),
        &url,
        &format!("dsr {form} ({service})"),
    );
    assert_eq!(counter(&balancer, "drop_dsr_cannot_forward"), 0);

    // Stopped, each decap says what it stripped, and detaches: connections fail again.
    let mut stripped = 0;
    for child in &mut decaps {
        lb_tests::netns::terminate(child, Duration::from_secs(3))
            .expect("lb decap exits on SIGTERM");
        let mut log = String::new();
        if let Some(mut err) = child.stderr.take() {
            err.read_to_string(&mut log).expect("read lb decap's log");
        }
        let count: u64 = log
            .split(" packets stripped")
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in lb decap's log: {log}"));
        stripped += count;
    }
    println!("lb decap stripped {stripped} packets on both backends");
    assert!(stripped > 400, "{stripped} packets stripped");
    balancer.wait_health(service, &backends[0], false, Duration::from_secs(5));
    assert_eq!(curl("/"), "FAIL", "got through after lb decap stopped");
}
