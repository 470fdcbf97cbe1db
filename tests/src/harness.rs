//! Runs the real `lb` daemon and real servers and clients in a `Topology`: the daemon in the
//! balancer namespace, `lb-testsrv` in each backend namespace, curl and nc in the client's.
//! Every wait is bounded; everything stops on `Drop`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::topology::{BACKEND_PORT, Topology, VIP};

/// The `lb` binary: $LB_BIN (set by `cargo xtask test`), else the release build.
pub fn lb_binary() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"))
}

/// The daemon, running in the balancer namespace, with its data path pinned on a bpf
/// filesystem mounted for it (and unmounted on `Drop`, which removes what was pinned).
pub struct Balancer {
    /// `None` only while no daemon has been started yet.
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    config: PathBuf,
    netns: String,
    lb: PathBuf,
}

impl Balancer {
    pub fn start(lb: &Path, topo: &Topology, config: &str) -> Balancer {
        assert!(
            lb.exists(),
            "no lb binary at {} (run `cargo xtask build`)",
            lb.display()
        );
        let dir = std::env::temp_dir().join(format!("{}-{}", topo.lb.name, "run"));
        let mount = dir.join("bpf");
        fs::create_dir_all(&mount).expect("create the run folder");
        // In the root mount namespace: `ip netns exec` remounts /sys only, so the daemon sees
        // this mount, and its pins outlive the daemon as /sys/fs/bpf's would.
        crate::netns::run(&["mount", "-t", "bpf", "bpf", &mount.display().to_string()]);
        let bpffs = mount.join("lb");
        let config_path = dir.join("lb.toml");
        fs::write(&config_path, config).expect("write the config");
        let socket = dir.join("control.sock");
        let mut balancer = Balancer {
            child: None,
            socket,
            bpffs,
            config: config_path,
            netns: topo.lb.name.clone(),
            lb: lb.to_path_buf(),
            dir,
        };
        balancer.launch();
        balancer
    }

    /// Starts `lb run` and waits until it answers on its socket.
    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("open the daemon log");
        let mut child = self
            .in_netns("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lb run");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("lb run exited ({status}):\n{}", self.log());
            }
            if self.cli(&["status", "--json"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lb run did not serve its socket within 20 s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        self.child = Some(child);
    }

    /// Stops the daemon and starts a new one on the same config and pins. Returns how long
    /// the control socket was unanswered.
    pub fn restart(&mut self) -> Duration {
        let start = Instant::now();
        assert!(self.stop(), "lb run did not exit cleanly:\n{}", self.log());
        self.launch();
        start.elapsed()
    }

    /// `lb remove` in the balancer's namespace (its SNAT port reservation is that namespace's).
    pub fn remove(&self) -> Output {
        self.in_netns("remove").output().expect("run lb remove")
    }

    /// `lb SUBCOMMAND` in the balancer's namespace, with this balancer's socket, pins and state.
    fn in_netns(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.lb)
            .arg(subcommand)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"));
        cmd
    }

    /// Replaces the config file (for `lb reload` or the next start).
    pub fn write_config(&self, config: &str) {
        fs::write(&self.config, config).expect("write the config");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs `lb ARGS --socket S` from the root namespace (the socket is a file, reachable from
    /// any network namespace).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.lb);
        cmd.args(args);
        // `--socket` is an option of each subcommand: it goes after the subcommand's name.
        cmd.arg("--socket").arg(&self.socket);
        cmd.output().expect("run the lb CLI")
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "lb status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("lb status --json prints JSON")
    }

    /// The data path's counters that are not zero, one `name value` per line: what a failed
    /// assertion shows of the packets' fate.
    pub fn nonzero_counters(&self) -> String {
        let status = self.status();
        status["counters"]
            .as_object()
            .map(|counters| {
                counters
                    .iter()
                    .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
                    .map(|(name, v)| format!("{name} {v}\n"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The status entry of `backend` (IP:PORT) in service `service`.
    pub fn backend(&self, service: &str, backend: &str) -> serde_json::Value {
        let status = self.status();
        status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .and_then(|s| s["backends"].as_array())
            .and_then(|b| b.iter().find(|b| b["address"] == backend))
            .cloned()
            .unwrap_or_else(|| panic!("no backend {backend} in service {service}: {status}"))
    }

    /// Waits (at most `limit`) until the daemon reports `backend` of `service` healthy or not.
    pub fn wait_health(
        &self,
        service: &str,
        backend: &str,
        healthy: bool,
        limit: Duration,
    ) -> Duration {
        let what = format!("backend {backend} {}", if healthy { "up" } else { "down" });
        self.wait_until(limit, &what, |b| {
            b.backend(service, backend)["healthy"] == healthy
        })
    }

    /// Polls `done` every 50 ms until it holds and returns how long that took; panics with
    /// `what` and the daemon's log after `limit`.
    pub fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Balancer) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < limit,
                "not {what} within {limit:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    /// Entries in the flow table at the daemon's last sweep.
    pub fn flow_entries(&self) -> u64 {
        self.status()["flows"]["entries"]
            .as_u64()
            .expect("flow entries in the status")
    }

    /// Entries in the pinned FLOWS map, read directly: works while no daemon runs.
    pub fn pinned_flow_entries(&self) -> usize {
        use std::os::fd::AsFd as _;
        let map = aya::maps::MapData::from_pin(self.bpffs.join("FLOWS")).expect("pinned FLOWS");
        lb_user::map_batch::lookup_all::<lb_common::FlowKey, lb_common::FlowValue>(map.fd().as_fd())
            .expect("read FLOWS")
            .len()
    }

    /// The daemon's process id (`ip netns exec` execs it), while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `lb run` on this balancer's config and pins, with another socket and state directory
    /// and no metrics listener, as a second daemon would be started by mistake; waited for
    /// (at most 20 s: one that runs is stopped then).
    pub fn second_daemon(&self) -> Output {
        self.run_once(
            &self.dir.join("second.sock"),
            &self.dir.join("second-state"),
        )
    }

    /// `lb run` on this balancer's config, pins, socket and state, expected to stop at once
    /// (a refusal); waited for, at most 20 s.
    pub fn run_refused(&self) -> Output {
        self.run_once(&self.socket, &self.dir.join("state"))
    }

    fn run_once(&self, socket: &Path, state: &Path) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.args(["20", "ip", "netns", "exec", &self.netns])
            .arg(&self.lb)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(socket)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(state)
            .args(["--metrics", "off"]);
        cmd.output().expect("run lb run")
    }

    /// Writes `version` as the pinned maps' layout (LAYOUT), as a build of another layout
    /// would have left it.
    pub fn set_pinned_layout(&self, version: u32) {
        let map = aya::maps::MapData::from_pin(self.bpffs.join("LAYOUT")).expect("pinned LAYOUT");
        let mut layout: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("LAYOUT is an array");
        layout.set(0, &version, 0).expect("write LAYOUT");
    }

    /// Whether the pinned BACKENDS (what the data path reads) holds `address` healthy; `None`
    /// if it holds no such backend. Read directly: works while no daemon runs.
    pub fn pinned_backend_healthy(&self, address: std::net::SocketAddrV4) -> Option<bool> {
        let map =
            aya::maps::MapData::from_pin(self.bpffs.join("BACKENDS")).expect("pinned BACKENDS");
        let backends: aya::maps::Array<_, lb_common::Backend> =
            aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("BACKENDS is an array");
        let (addr, port) = (
            lb_common::Be32::from_bytes(address.ip().octets()),
            lb_common::Be16::from_host(address.port()),
        );
        backends
            .iter()
            .filter_map(Result::ok)
            .find(|b| b.addr == addr && b.port == port)
            .map(|b| b.flags & lb_common::BACKEND_HEALTHY != 0)
    }

    /// Stops the daemon with SIGTERM and returns whether it exited cleanly within 10 s. The
    /// pinned data path keeps forwarding.
    pub fn stop(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        crate::netns::terminate(child, Duration::from_secs(10)).is_some_and(|s| s.success())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            self.stop();
        }
        // Unmounting drops every pin: the links detach, the maps go.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("bpf"))
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `lb-testsrv` next to the running executable (tests and the demo are built with it).
pub fn testsrv_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe folder");
    // Integration tests run from target/<profile>/deps, binaries live one level up.
    [dir.join("lb-testsrv"), dir.join("../lb-testsrv")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no lb-testsrv near {}", exe.display()))
}

/// Starts `lb-testsrv bN` in backend `index`'s namespace.
pub fn start_server(topo: &Topology, index: usize) -> Child {
    start_server_on(topo, index, BACKEND_PORT)
}

/// Starts `lb-testsrv bN` on `port` in backend `index`'s namespace (another port: a health
/// check endpoint that can fail while the service runs).
pub fn start_server_on(topo: &Topology, index: usize, port: u16) -> Child {
    let name = format!("b{}", index + 1);
    let port = port.to_string();
    let bin = testsrv_binary();
    let child = topo.backends[index].spawn(
        &[bin.to_str().expect("utf-8 path"), &name, &port],
        Stdio::inherit(),
    );
    // Bounded wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !topo.backends[index]
        .try_sh(&format!("nc -z -w1 127.0.0.1 {port}"))
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "lb-testsrv {name} did not start listening"
        );
        thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `count` HTTP requests from the client to VIP:80, each on a new connection (curl),
/// sequentially. Returns each body ("b1", ...) or "FAIL".
pub fn http_requests(topo: &Topology, count: usize) -> Vec<String> {
    http_requests_to(topo, 80, count)
}

/// As `http_requests`, to VIP:`port`.
pub fn http_requests_to(topo: &Topology, port: u16, count: usize) -> Vec<String> {
    let out = topo.client.try_sh(&format!(
        "for i in $(seq {count}); do curl -s --connect-timeout 1 --max-time 2 http://{VIP}:{port}/ || echo FAIL; done"
    ));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// One UDP request from the client to VIP:53 (nc); the answer, or "" if none within a second.
pub fn udp_request(topo: &Topology, payload: &str, source_port: u16) -> String {
    let out = topo.client.try_sh(&format!(
        "printf '{payload}' | nc -u -w1 -p {source_port} {VIP} 53"
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How many of `bodies` each backend served, in backend order, plus failures.
pub fn tally(bodies: &[String], backends: usize) -> (Vec<usize>, usize) {
    let mut counts = vec![0; backends];
    let mut failed = 0;
    for body in bodies {
        match body
            .strip_prefix('b')
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            Some(n) if (1..=backends).contains(&n) => counts[n - 1] += 1,
            _ => failed += 1,
        }
    }
    (counts, failed)
}

/// What a `ConnectionStream` saw: every connection's outcome and time.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub ok: usize,
    /// (when the connection began, why it failed)
    pub failures: Vec<(Instant, String)>,
    pub latencies: Vec<Duration>,
}

impl StreamReport {
    pub fn worst(&self) -> Duration {
        self.latencies.iter().max().copied().unwrap_or_default()
    }
    pub fn median(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(l.len() / 2).copied().unwrap_or_default()
    }

    /// Takes out the failures of connections already established when a backend died, between
    /// `from` and `to` (begun at most 50 ms before): their state died with it, and no balancer
    /// can carry them on. How many there were.
    pub fn take_broken_by_fault(&mut self, from: Instant, to: Instant) -> usize {
        let before = self.failures.len();
        self.failures.retain(|(when, why)| {
            let established = !why.starts_with("connect");
            let in_flight = *when + Duration::from_millis(50) >= from && *when <= to;
            !(established && in_flight)
        });
        before - self.failures.len()
    }
}

/// A steady, bounded stream of new connections from the client namespace to VIP:80 (or a
/// target of its own), one at a time every `every`: each connects, sends a request, and must
/// read a backend's answer within `limit` (a client's patience; SYN retransmits are included).
pub struct ConnectionStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<StreamReport>,
}

impl ConnectionStream {
    pub fn start(topo: &Topology, every: Duration, limit: Duration) -> ConnectionStream {
        ConnectionStream::start_to(topo, (VIP, 80).into(), every, limit)
    }

    /// As `start`, to `target`.
    pub fn start_to(
        topo: &Topology,
        target: std::net::SocketAddr,
        every: Duration,
        limit: Duration,
    ) -> ConnectionStream {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = topo.client.spawn_inside(move || {
            let mut report = StreamReport::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                match one_request(target, limit) {
                    Ok(()) => {
                        report.ok += 1;
                        report.latencies.push(started.elapsed());
                    }
                    Err(e) => report.failures.push((started, e)),
                }
                thread::sleep(every.saturating_sub(started.elapsed()));
            }
            report
        });
        ConnectionStream { stop, thread }
    }

    pub fn finish(self) -> StreamReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("connection stream thread")
    }
}

fn one_request(target: std::net::SocketAddr, limit: Duration) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let deadline = Instant::now() + limit;
    let mut stream = std::net::TcpStream::connect_timeout(&target, limit)
        .map_err(|e| format!("connect: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    if text.starts_with("HTTP/1.") && text.trim_end().ends_with(|c: char| c.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("unexpected answer {text:?}"))
    }
}

/// Sends one request on a keep-alive connection and returns the body (the backend's name).
pub fn keep_alive_request(stream: &mut std::net::TcpStream) -> Result<String, String> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("closed".into());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| "bad length".to_owned())?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}
