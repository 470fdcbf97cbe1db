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

/// The daemon, running in the balancer namespace.
pub struct Balancer {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
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
        fs::create_dir_all(&dir).expect("create the run folder");
        let config_path = dir.join("lb.toml");
        fs::write(&config_path, config).expect("write the config");
        let socket = dir.join("control.sock");
        let log = fs::File::create(dir.join("daemon.log")).expect("create the daemon log");
        let child = Command::new("ip")
            .args(["netns", "exec", &topo.lb.name])
            .arg(lb)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lb run");
        let mut balancer = Balancer {
            child,
            dir,
            socket,
            lb: lb.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = balancer.child.try_wait() {
                panic!("lb run exited ({status}):\n{}", balancer.log());
            }
            if balancer.cli(&["status", "--json"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "lb run did not serve its socket within 20 s:\n{}",
                balancer.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        balancer
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
        let start = Instant::now();
        while self.backend(service, backend)["healthy"] != healthy {
            assert!(
                start.elapsed() < limit,
                "backend {backend} not {} within {limit:?}:\n{}",
                if healthy { "up" } else { "down" },
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    /// Stops the daemon with SIGTERM and returns whether it exited cleanly within 10 s.
    pub fn stop(&mut self) -> bool {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
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
    let name = format!("b{}", index + 1);
    let port = BACKEND_PORT.to_string();
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

/// `count` HTTP requests from the client, each on a new connection (curl), sequentially.
/// Returns each body ("b1", ...) or "FAIL".
pub fn http_requests(topo: &Topology, count: usize) -> Vec<String> {
    let out = topo.client.try_sh(&format!(
        "for i in $(seq {count}); do curl -s --connect-timeout 1 --max-time 2 http://{VIP}/ || echo FAIL; done"
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
