//! The self-contained demo (`./dev.sh demo`): the seed's scenario on one host. Replicas of an
//! "api" in containers (network namespaces on veths, default offloads) on a bridge `br-api`,
//! found by their DNS name as compose registers them; lb on the host publishes them at the
//! host's address, port 8080. A client outside and clients on the host (at that address and at
//! localhost:8080) get the 4:6 split set with `lb set-weight`; a replica stops while
//! connections keep coming; a third one is scaled in through DNS. Then everything is removed.
//! Usage: lb-demo PATH-TO-LB

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use lb_tests::{
    harness::{Balancer, ConnectionStream, start_server, tally},
    host::{ClientCgroup, NetnsResolver},
    netns::{Netns, require_root, stop_child, sweep_stale},
    topology::{BACKEND_PORT, Topology},
};

/// The host's address towards the outside client, where the service is published.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PUBLISHED: u16 = 8080;
const CONNECTIONS: usize = 500;

fn main() -> ExitCode {
    let Some(lb) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: lb-demo PATH-TO-LB");
        return ExitCode::from(2);
    };
    require_root();
    sweep_stale();
    let ok = demo(&lb);
    if ok {
        println!(
            "\ndemo finished: the 4:6 split from outside and from the host, no failed connection \
             while a replica stopped, and a third replica taken in from DNS"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("\ndemo: something did not go as expected (see the figures above)");
        ExitCode::from(1)
    }
}

fn demo(lb: &std::path::Path) -> bool {
    println!(
        "== the host: lb0 {HOST} towards an outside client; bridge br-api 198.18.4.1/24 with three \
         containers api-1..3 (their veths keep their default offloads)"
    );
    let topo = Topology::containers(3);
    let replica = |i: usize| format!("{}:{BACKEND_PORT}", topo.backend_addrs[i]);
    let mut servers: Vec<_> = (0..2).map(|i| Some(start_server(&topo, i))).collect();
    servers.push(None);
    let resolver = NetnsResolver::new(&topo.lb.name);
    resolver.hosts(&topo.backend_addrs[..2]);
    println!(
        "   DNS: api -> {}, {}",
        topo.backend_addrs[0], topo.backend_addrs[1]
    );
    // The demo's host clients are the processes of a cgroup of its own, never the machine's.
    let cgroup = ClientCgroup::new(&topo.lb.name);
    let config = format!(
        "interfaces = [\"lb0\", \"br-api\"]\n\
         [host]\ncgroup = \"{cgroup}\"\n\n\
         [[service]]\nname = \"api\"\nvip = \"{HOST}:{PUBLISHED}\"\n\
         [service.discovery]\ndns = \"api:{BACKEND_PORT}\"\ninterval = \"1s\"\n",
        cgroup = cgroup.child.display()
    );
    println!("== lb run, with this config:");
    print_indented(&config);
    let balancer = Balancer::start(lb, &topo, &config);
    for (i, weight) in [(0, "4"), (1, "6")] {
        let out = balancer.cli(&["set-weight", "api", &replica(i), weight]);
        println!("$ lb set-weight api {} {weight}", replica(i));
        print_indented(&String::from_utf8_lossy(&out.stdout));
    }
    println!("$ lb status");
    print_indented(&String::from_utf8_lossy(&balancer.cli(&["status"]).stdout));

    let url = format!("http://{HOST}:{PUBLISHED}/");
    println!("\n== {CONNECTIONS} new connections (curl) from outside to {url}");
    let outside = curl_loop(&topo.client, None, &url, CONNECTIONS);
    let split_ok = show_split(&outside, 2);
    let mut all_ok = split_ok;
    for target in [url.clone(), format!("http://localhost:{PUBLISHED}/")] {
        println!("== {CONNECTIONS} new connections from the host itself to {target}");
        let bodies = curl_loop(&topo.lb, Some(&cgroup), &target, CONNECTIONS);
        all_ok &= show_split(&bodies, 2);
    }

    println!(
        "\n== api-1 stops, while an outside client opens a connection every 20 ms (health \
         checks at their default pace: every 1 s, down after 2 failures)"
    );
    let stream = ConnectionStream::start_to(
        &topo,
        SocketAddr::from((HOST, PUBLISHED)),
        Duration::from_millis(20),
        Duration::from_secs(3),
    );
    std::thread::sleep(Duration::from_secs(1));
    let stopped_at = std::time::Instant::now();
    if let Some(mut server) = servers[0].take() {
        stop_child(&mut server);
    }
    let stopped = std::time::Instant::now();
    let detected = balancer.wait_health("api", &replica(0), false, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let mut report = stream.finish();
    // A request api-1 was serving as it died dies with it: no balancer can carry it on.
    let broken = report.take_broken_by_fault(stopped_at, stopped);
    println!(
        "   health checks marked api-1 down after {:.1} s; meanwhile {} connections, {} failed \
         (worst {:.0} ms: a refused SYN retried on api-2){}",
        detected.as_secs_f64(),
        report.ok,
        report.failures.len(),
        report.worst().as_secs_f64() * 1000.0,
        match broken {
            0 => String::new(),
            n => format!("; {n} already established on api-1 died with it"),
        }
    );
    for (started, error) in &report.failures {
        let at = started.saturating_duration_since(stopped_at).as_secs_f64();
        println!("   a connection opened {at:.2} s after the stop failed: {error}");
    }
    all_ok &= report.failures.is_empty();
    println!("== {} new connections with api-1 down", CONNECTIONS / 5);
    let after = curl_loop(&topo.client, None, &url, CONNECTIONS / 5);
    let (counts, failed) = tally(&after, 3);
    println!(
        "   api-1: {}, api-2: {}, failed: {failed}",
        counts[0], counts[1]
    );
    all_ok &= failed == 0 && counts[1] == CONNECTIONS / 5;

    println!("\n== scaling in api-3: its server starts and DNS gains its address");
    servers[2] = Some(start_server(&topo, 2));
    resolver.hosts(&topo.backend_addrs);
    let taken = std::time::Instant::now();
    let address = replica(2);
    balancer.wait_until(Duration::from_secs(15), "api-3 taken in", |b| {
        b.status()["services"][0]["backends"]
            .as_array()
            .is_some_and(|list| {
                list.iter()
                    .any(|x| x["address"] == address.as_str() && x["healthy"] == true)
            })
    });
    println!(
        "   lb resolved it, probed it and gave it flows after {:.1} s (weight 1 from DNS)",
        taken.elapsed().as_secs_f64()
    );
    let out = balancer.cli(&["set-weight", "api", &replica(2), "6"]);
    println!("$ lb set-weight api {} 6", replica(2));
    print_indented(&String::from_utf8_lossy(&out.stdout));
    println!("== {CONNECTIONS} new connections from outside");
    let scaled = curl_loop(&topo.client, None, &url, CONNECTIONS);
    let (counts, failed) = tally(&scaled, 3);
    show_split(&scaled, 3);
    all_ok &= failed == 0 && counts[0] == 0 && counts[1] > 0 && counts[2] > 0;
    println!("$ lb status");
    print_indented(&String::from_utf8_lossy(&balancer.cli(&["status"]).stdout));

    println!("\n== cleaning up (daemon and its pins, namespaces, cgroup, resolver files)");
    drop(balancer);
    drop(servers);
    drop(cgroup);
    drop(resolver);
    drop(topo);
    all_ok
}

/// `count` sequential curls of `url` from `ns` (by a process of `cgroup`, if given): the
/// bodies, "FAIL" for a failure.
fn curl_loop(ns: &Netns, cgroup: Option<&ClientCgroup>, url: &str, count: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq {count}); do curl -s --connect-timeout 1 --max-time 3 {url} || echo FAIL; done"
    );
    let out = match cgroup {
        Some(cgroup) => cgroup.run_in(ns, &script),
        None => String::from_utf8_lossy(&ns.try_sh(&script).stdout).into_owned(),
    };
    out.lines().map(str::to_owned).collect()
}

/// Prints how many of `bodies` each replica served; whether none failed.
fn show_split(bodies: &[String], replicas: usize) -> bool {
    let (counts, failed) = tally(bodies, replicas);
    for (i, n) in counts.iter().enumerate() {
        println!(
            "   api-{}: {n:4} ({:.1}%)",
            i + 1,
            100.0 * *n as f64 / bodies.len().max(1) as f64
        );
    }
    println!("   failed: {failed}");
    failed == 0
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}
