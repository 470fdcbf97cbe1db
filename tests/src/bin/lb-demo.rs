//! The self-contained demo (`./dev.sh demo`): a client, the balancer and two backends weighted
//! 4:6, each in its own network namespace. Sends connections through the VIP and prints the
//! split, stops one backend and shows the survivor taking every connection, then cleans up.
//! Usage: lb-demo PATH-TO-LB

use std::{path::PathBuf, process::ExitCode, time::Duration};

use lb_tests::{
    harness::{Balancer, http_requests, start_server, tally},
    netns::{require_root, sweep_stale},
    topology::{Arms, BACKEND_PORT, Topology, VIP},
};

const CONNECTIONS: usize = 500;

fn main() -> ExitCode {
    let Some(lb) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: lb-demo PATH-TO-LB");
        return ExitCode::from(2);
    };
    require_root();
    sweep_stale();
    println!("== building the network: client, balancer (XDP native mode), backends b1 and b2");
    let topo = Topology::new(Arms::Two, 2);
    let mut servers: Vec<_> = (0..2).map(|i| start_server(&topo, i)).collect();
    let balancer = Balancer::start(&lb, &topo, &topo.config(&[4, 6]));
    let b = |i: usize| format!("{}:{BACKEND_PORT}", topo.backend_addrs[i]);
    println!(
        "   VIP {VIP}:80 -> b1 {} (weight 4), b2 {} (weight 6)\n",
        b(0),
        b(1)
    );

    println!("== {CONNECTIONS} new HTTP connections (curl) through the VIP");
    let (counts, failed) = tally(&http_requests(&topo, CONNECTIONS), 2);
    for (i, n) in counts.iter().enumerate() {
        println!(
            "   b{}: {n:4} connections ({:.1}%)",
            i + 1,
            100.0 * *n as f64 / CONNECTIONS as f64
        );
    }
    println!("   failed: {failed}\n");
    println!("== lb status");
    let status = balancer.cli(&["status"]);
    print!(
        "{}",
        String::from_utf8_lossy(&status.stdout)
            .lines()
            .map(|l| format!("   {l}\n"))
            .collect::<String>()
    );

    println!("\n== stopping b1's server");
    let _ = servers[0].kill();
    let _ = servers[0].wait();
    let detected = balancer.wait_health("web", &b(0), false, Duration::from_secs(10));
    println!(
        "   health checks marked b1 down after {:.0} ms",
        detected.as_secs_f64() * 1000.0
    );
    let after = CONNECTIONS / 5;
    println!("== {after} new connections with b1 down");
    let (counts2, failed2) = tally(&http_requests(&topo, after), 2);
    println!("   b1: {} b2: {} failed: {failed2}", counts2[0], counts2[1]);

    let ok = failed == 0 && failed2 == 0 && counts2 == [0, after];
    println!("\n== cleaning up (namespaces, daemon, servers)");
    drop(balancer);
    drop(servers);
    drop(topo);
    if ok {
        println!(
            "demo finished: weighted split {counts:?} for 4:6, and the survivor served all {after} connections after b1 stopped"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("demo: something did not go as expected (see the figures above)");
        ExitCode::from(1)
    }
}
