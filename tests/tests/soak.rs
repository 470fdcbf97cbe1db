//! A bounded soak: mixed load (a new connection every 20 ms, keep-alive connections sending a
//! request every 100 ms, UDP requests) while weights change twice a second and one backend
//! (b3) is killed and restarted every few seconds. At the end:
//! - no keep-alive connection on b1 or b2 failed or moved: weight changes never break an
//!   established flow (b3's may break when b3 dies, and are reopened);
//! - no new connection failed, except ones already established with b3 when it was killed;
//! - once the load stops, the flow table empties: no entry leaked;
//! - the daemon still answers, and its log has no panic.
//!
//! LB_SOAK_SECS sets the length (default 20, as CI runs it; 600 for a long run).

use std::{
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    harness::{
        Balancer, ConnectionStream, keep_alive_request, lb_binary, start_server, udp_request,
    },
    netns::{require_root, stop_child, sweep_stale},
    topology::{Arms, BACKEND_PORT, Topology, VIP},
};

const KEEP_ALIVE_CONNECTIONS: usize = 9;

/// What the keep-alive clients saw.
#[derive(Default)]
struct KeepAliveReport {
    requests: u64,
    /// (backend, when, why) of connections that failed.
    broken: Vec<(String, Instant, String)>,
    /// (from, to) of connections whose answers came from another backend without a failure.
    moved: Vec<(String, String)>,
}

fn connect() -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&(VIP, 80).into(), Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Keep-alive connections from the client namespace, each asking every 100 ms.
fn keep_alive(topo: &Topology, stop: Arc<AtomicBool>) -> thread::JoinHandle<KeepAliveReport> {
    topo.client.spawn_inside(move || {
        let mut report = KeepAliveReport::default();
        let mut conns: Vec<Option<(TcpStream, String)>> =
            (0..KEEP_ALIVE_CONNECTIONS).map(|_| None).collect();
        while !stop.load(Ordering::Relaxed) {
            for slot in &mut conns {
                let fresh = slot.is_none();
                if fresh {
                    *slot = connect().ok().map(|s| (s, String::new()));
                }
                let Some((stream, backend)) = slot.as_mut() else {
                    continue;
                };
                let when = Instant::now();
                match keep_alive_request(stream) {
                    Ok(body) => {
                        report.requests += 1;
                        if backend.is_empty() {
                            *backend = body;
                        } else if *backend != body {
                            report.moved.push((backend.clone(), body));
                            *slot = None;
                        }
                    }
                    Err(why) => {
                        report.broken.push((backend.clone(), when, why));
                        *slot = None;
                    }
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        report
    })
}

fn soak_secs() -> u64 {
    std::env::var("LB_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[test]
fn soak_mixed_load_with_flapping_backend_and_weight_changes() {
    require_root();
    sweep_stale();
    let secs = soak_secs();
    let topo = Topology::new(Arms::Two, 3);
    let mut servers: Vec<_> = (0..3).map(|i| start_server(&topo, i)).collect();
    let config = topo.config(&[4, 6, 5]).replace(
        "capacity = 65536\n",
        // Every timeout class short, so that the end can check that nothing leaks: a request
        // to the killed backend leaves an unanswered UDP flow, a broken connection a
        // half-closed one.
        "capacity = 65536\ntcp_syn_timeout = \"2s\"\ntcp_idle_timeout = \"3s\"\ntcp_half_closed_timeout = \"3s\"\ntcp_closing_timeout = \"1s\"\nudp_unreplied_timeout = \"2s\"\nudp_idle_timeout = \"1s\"\n",
    );
    let balancer = Balancer::start(&lb_binary(), &topo, &config);
    let address = |i: usize| format!("{}:{BACKEND_PORT}", topo.backend_addrs[i]);

    let stop = Arc::new(AtomicBool::new(false));
    let keep = keep_alive(&topo, Arc::clone(&stop));
    let stream = ConnectionStream::start(&topo, Duration::from_millis(20), Duration::from_secs(3));
    let udp_stop = Arc::clone(&stop);
    // (when, answered) of each UDP request.
    let udp_answers = Arc::new(Mutex::new(Vec::<(Instant, bool)>::new()));
    let udp_tally = Arc::clone(&udp_answers);
    let kills = thread::scope(|scope| {
        let udp = scope.spawn(|| {
            let mut port = 45000u16;
            while !udp_stop.load(Ordering::Relaxed) {
                let when = Instant::now();
                let answered = udp_request(&topo, "soak", port).ends_with(": soak");
                udp_tally.lock().expect("tally").push((when, answered));
                port = if port >= 45900 { 45000 } else { port + 1 };
                thread::sleep(Duration::from_millis(50));
            }
        });
        // The chaos: weights every 500 ms (pseudo-random, fixed sequence), b3 killed for 2 s
        // every 5 s.
        let started = Instant::now();
        let mut kills = Vec::new();
        let mut step = 0u64;
        let mut b3_down_since: Option<Instant> = None;
        while started.elapsed() < Duration::from_secs(secs) {
            step += 1;
            let i = (step % 3) as usize;
            let weight = (step * 7 + 3) % 11;
            let out = balancer.cli(&["set-weight", "web", &address(i), &weight.to_string()]);
            assert!(out.status.success(), "set-weight: {out:?}");
            match b3_down_since {
                None if step % 10 == 5 => {
                    kills.push(Instant::now());
                    stop_child(&mut servers[2]);
                    b3_down_since = Some(Instant::now());
                }
                Some(since) if since.elapsed() >= Duration::from_secs(2) => {
                    servers[2] = start_server(&topo, 2);
                    b3_down_since = None;
                }
                _ => {}
            }
            thread::sleep(Duration::from_millis(500));
        }
        if b3_down_since.is_some() {
            servers[2] = start_server(&topo, 2);
        }
        stop.store(true, Ordering::Relaxed);
        udp.join().expect("udp thread");
        kills
    });
    let connections = stream.finish();
    let kept = keep.join().expect("keep-alive thread");
    let udp = std::mem::take(&mut *udp_answers.lock().expect("tally"));
    // UDP has no handshake to fail over on: a request to b3 between its death and the health
    // check that notices is lost, as it would be without a balancer.
    let b3_dead = |when: &Instant| {
        kills
            .iter()
            .any(|k| *when + Duration::from_secs(1) >= *k && *when <= *k + Duration::from_secs(2))
    };
    let udp_lost: Vec<_> = udp
        .iter()
        .filter(|(when, answered)| !answered && !b3_dead(when))
        .collect();
    let udp_ok = udp.iter().filter(|u| u.1).count();

    let near_kill = |when: &Instant| {
        kills.iter().any(|k| {
            *when <= *k + Duration::from_millis(50) && *when + Duration::from_secs(3) >= *k
        })
    };
    let b3 = "b3";
    let broken_elsewhere: Vec<_> = kept
        .broken
        .iter()
        .filter(|(backend, when, _)| !(backend == b3 || backend.is_empty() && near_kill(when)))
        .collect();
    let new_failed: Vec<_> = connections
        .failures
        .iter()
        .filter(|(when, why)| !(why.starts_with("read") && near_kill(when)))
        .collect();
    println!(
        "soak {secs} s: {} new connections ({} failed, {} of them established with b3 when it was killed), worst {:?}; {} keep-alive requests, {} connections broken ({} on b3), {} moved; {udp_ok}/{} UDP answered; b3 killed {} times",
        connections.ok,
        connections.failures.len(),
        connections.failures.len() - new_failed.len(),
        connections.worst(),
        kept.requests,
        kept.broken.len(),
        kept.broken.len() - broken_elsewhere.len(),
        kept.moved.len(),
        udp.len(),
        kills.len()
    );
    assert!(
        broken_elsewhere.is_empty(),
        "keep-alive connections broken off b3: {broken_elsewhere:?}"
    );
    assert!(kept.moved.is_empty(), "connections moved: {:?}", kept.moved);
    assert!(
        new_failed.is_empty(),
        "new connections failed: {new_failed:?}"
    );
    assert!(
        kept.requests > secs * 50,
        "too few keep-alive requests: {}",
        kept.requests
    );
    assert!(
        udp_lost.is_empty(),
        "UDP requests lost while b3 was up: {udp_lost:?}"
    );
    assert!(
        udp.len() as u64 >= secs / 2,
        "too few UDP requests: {}",
        udp.len()
    );

    // No leak: with the load gone, every flow expires (3 s at most, one sweep each).
    balancer.wait_until(Duration::from_secs(15), "an empty flow table", |b| {
        b.flow_entries() == 0
    });
    assert!(!balancer.log().contains("panicked"), "{}", balancer.log());
    for mut s in servers {
        stop_child(&mut s);
    }
}
