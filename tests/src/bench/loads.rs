//! The loads of the end-to-end benchmark and what each run costs the balancer: wrk for HTTP
//! (a new connection per request from one client host and from four at once, keep-alive
//! requests, and a bulk download), `lb-bench udp-load` for UDP. Every load is bounded in time;
//! every external command is bounded by `timeout`.

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
};

use serde::Serialize;

use super::{
    contenders::{Contender, UDP_PORT, WEB_PORT, WEIGHTS},
    summary::Summary,
    udp::UdpLoadResult,
};
use crate::{
    host::ClientCgroup,
    netns::Netns,
    topology::{BACKEND_PORT, Topology},
};

/// Size of the object the bulk load downloads over and over (keep-alive).
pub const BULK_BYTES: usize = 16 << 20;
/// wrk threads: 5 lets the direct path split them 2:3 over the backends (4:6).
const WRK_THREADS: usize = 5;
const WRK_CONNECTIONS: usize = 50;
/// The client hosts of the four-client load (`Topology::add_clients`), and wrk's threads and
/// connections on each of them (32 connections in all).
pub const MORE_CLIENTS: usize = 4;
const MORE_CLIENT_WRK_THREADS: usize = 2;
const MORE_CLIENT_WRK_CONNECTIONS: usize = 8;
/// New-connection loads run at least this long per run (outside `--quick`): the goal is a rate
/// sustained for 15 s, long enough for the backends' TIME_WAIT to fill with the run's ports.
const NEW_CONNECTION_SECONDS: f64 = 15.0;
const UDP_FLOWS: usize = 20;
const UDP_WINDOW: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Load {
    /// A new TCP connection per request (HTTP with `Connection: close`).
    NewConnections,
    /// As NewConnections, from four other client hosts at once, each with its own address
    /// (wrk -t2 -c8 on each): a balancer that rewrites the source now carries several hosts'
    /// connections to a backend on one address.
    NewConnectionsFourClients,
    /// Requests on kept-alive connections.
    KeepAlive,
    /// Bulk TCP: a 16 MiB object downloaded over and over on 5 connections.
    Bulk,
    /// Small UDP requests and their echoes.
    Udp,
    /// The single-host deployment (`Topology::containers`: the backends in containers on a
    /// bridge of the balancer's host, with their default offloads): a new connection per
    /// request from the outside client ...
    ContainersNewConnections,
    /// ... and from a process on the balancer's host itself ...
    ContainersHostNewConnections,
    /// ... the bulk download (the containers' GSO replies) ...
    ContainersBulk,
    /// ... and UDP.
    ContainersUdp,
}

/// The network a load runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scene {
    /// Client, balancer and backends on three segments (`Topology::new(Arms::Two, 2)`).
    TwoArm,
    /// Containers on a bridge of the balancer's host (`Topology::containers(2)`).
    Containers,
}

impl Load {
    pub const ALL: [Load; 9] = [
        Load::NewConnections,
        Load::NewConnectionsFourClients,
        Load::KeepAlive,
        Load::Bulk,
        Load::Udp,
        Load::ContainersNewConnections,
        Load::ContainersHostNewConnections,
        Load::ContainersBulk,
        Load::ContainersUdp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Load::NewConnections => "new connection per request",
            Load::NewConnectionsFourClients => "new connections, 4 client hosts",
            Load::KeepAlive => "keep-alive requests",
            Load::Bulk => "bulk TCP download",
            Load::Udp => "UDP request/response",
            Load::ContainersNewConnections => "containers: new connection per request",
            Load::ContainersHostNewConnections => "containers: new connections from the host",
            Load::ContainersBulk => "containers: bulk TCP download",
            Load::ContainersUdp => "containers: UDP request/response",
        }
    }

    pub fn unit(self) -> &'static str {
        if self.is_bulk() {
            "Gbit/s"
        } else if self.is_udp() {
            "replies/s"
        } else {
            "requests/s"
        }
    }

    pub fn scene(self) -> Scene {
        match self {
            Load::NewConnections
            | Load::NewConnectionsFourClients
            | Load::KeepAlive
            | Load::Bulk
            | Load::Udp => Scene::TwoArm,
            Load::ContainersNewConnections
            | Load::ContainersHostNewConnections
            | Load::ContainersBulk
            | Load::ContainersUdp => Scene::Containers,
        }
    }

    pub fn is_bulk(self) -> bool {
        matches!(self, Load::Bulk | Load::ContainersBulk)
    }

    pub fn is_udp(self) -> bool {
        matches!(self, Load::Udp | Load::ContainersUdp)
    }

    /// Loads that open a TCP connection per request: their runs count the backends' PAWS
    /// rejections and the clients' SYN retransmits.
    pub fn new_connections(self) -> bool {
        matches!(
            self,
            Load::NewConnections
                | Load::NewConnectionsFourClients
                | Load::ContainersNewConnections
                | Load::ContainersHostNewConnections
        )
    }

    /// Seconds per run: `seconds`, or at least NEW_CONNECTION_SECONDS for the two-arm
    /// new-connection loads unless `quick` (the containers' loads compare paths, not PAWS).
    pub fn seconds(self, seconds: f64, quick: bool) -> f64 {
        if self.new_connections() && self.scene() == Scene::TwoArm && !quick {
            seconds.max(NEW_CONNECTION_SECONDS)
        } else {
            seconds
        }
    }
}

/// One run of one load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// In the load's unit.
    pub value: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Failed requests: wrk's connect/read/write/timeout errors and non-2xx answers, or UDP
    /// requests without a reply.
    pub errors: u64,
    pub requests: u64,
    /// New-connection loads: SYNs the backends dropped because they met a connection of the
    /// same addresses and ports in TIME_WAIT with a newer timestamp (`TcpExtPAWSTimewait`,
    /// summed over the backends' namespaces).
    pub paws_timewait: Option<u64>,
    /// New-connection loads: SYNs the load's client hosts sent again (`TcpExtTCPSynRetrans`).
    pub syn_retrans: Option<u64>,
    pub cost: Cost,
}

/// What a run cost, where it can be attributed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    /// The XDP program's own run time per packet (kernel BPF statistics).
    pub xdp_ns_per_packet: Option<f64>,
    /// CPU the balancer used, in CPU-seconds per second of load: the XDP program's run time, or
    /// the proxy processes' user+system time.
    pub balancer_cpu: Option<f64>,
    /// The whole machine's busy share (both cores; clients and backends included), 0..=1.
    pub machine_busy: f64,
    /// Of which softirq (the kernel's packet processing, where nftables and veth run).
    pub machine_softirq: f64,
    /// Frames the balancer namespace's veths dropped (rings full, failed XDP transmits).
    pub device_drops: u64,
}

/// The backend servers; stopped when dropped.
pub struct Servers(Vec<std::process::Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            crate::netns::stop_child(child);
        }
    }
}

/// Writes the backend servers' files and starts them: nginx (HTTP on BACKEND_PORT, `/` answers
/// with the backend's name, `/bulk` the bulk object) and `lb-bench udp-echo` on BACKEND_PORT.
pub fn start_backends(
    topo: &Topology,
    scene: Scene,
    dir: &Path,
    bench: &Path,
) -> Result<Servers, String> {
    let mut servers = Servers(Vec::new());
    match scene {
        Scene::TwoArm => {
            // The direct path: the client reaches the backends through the balancer
            // namespace's routing.
            topo.client.sh("ip route add 198.18.1.0/24 via 198.18.0.1");
            // Frames reach the balancer at wire size, as from a real switch: GRO on the switch
            // ports facing the backends would hand the bridge 64 KB aggregates, which a
            // single-buffer XDP program cannot take (veth drops them) and which the kernel
            // path would get for free.
            for i in 1..=topo.backends.len() {
                topo.switch.sh(&format!("ethtool -K s-b{i} gro off"));
            }
        }
        // The containers keep their offloads: GSO replies are what the tc program gets.
        Scene::Containers => {
            topo.client.sh("ip route add 198.18.4.0/24 via 198.18.0.1");
        }
    }
    let www = dir.join("www");
    fs::create_dir_all(&www).map_err(|e| e.to_string())?;
    fs::write(www.join("bulk"), vec![0x5a; BULK_BYTES]).map_err(|e| e.to_string())?;
    for (i, ns) in topo.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let prefix = dir.join(&name);
        fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
        let conf = prefix.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\nuser root;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
                 events {{ worker_connections 65536; }}\n\
                 http {{\n    access_log off;\n    keepalive_requests 100000000;\n    sendfile on;\n    \
                 server {{\n        listen {BACKEND_PORT} reuseport backlog=65535;\n        \
                 listen [::]:{BACKEND_PORT} reuseport backlog=65535;\n        \
                 listen {WEB_PORT} reuseport backlog=65535;\n        \
                 location = / {{ return 200 \"{name}\\n\"; }}\n        \
                 location = /bulk {{ alias {www}/bulk; }}\n    }}\n}}\n",
                p = prefix.display(),
                www = www.display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let prefix_arg = format!("{}/", prefix.display());
        let conf_arg = conf.display().to_string();
        servers.0.push(ns.spawn(
            &[
                "nginx",
                "-p",
                &prefix_arg,
                "-c",
                &conf_arg,
                "-g",
                "daemon off;",
            ],
            std::process::Stdio::inherit(),
        ));
        let bench_arg = bench.display().to_string();
        let port = BACKEND_PORT.to_string();
        servers.0.push(ns.spawn(
            &[&bench_arg, "udp-echo", &port],
            std::process::Stdio::inherit(),
        ));
    }
    for (ns, addr) in topo.backends.iter().zip(&topo.backend_addrs) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ns
            .try_sh(&format!(
                "curl -sf -o /dev/null http://{addr}:{BACKEND_PORT}/"
            ))
            .status
            .success()
        {
            if std::time::Instant::now() > deadline {
                return Err(format!("the backend server on {addr} did not start"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Ok(servers)
}

/// The backend (0 or 1) of each of the direct path's `threads` wrk threads or UDP targets, as
/// near the weights 4:6 as whole threads allow: 5 split 2:3, the four-client load's 8 (2 per
/// host) 3:5.
pub fn direct_split(threads: usize) -> Vec<usize> {
    let first = u64::from(WEIGHTS[0]);
    let total = u64::from(WEIGHTS.iter().sum::<u32>());
    (0..threads as u64)
        .map(|k| usize::from((k + 1) * first / total == k * first / total))
        .collect()
}

/// The wrk script: reports the figures on one line, and for the direct path sends wrk's
/// threads straight to the backends, thread k to backend `backends[k]`.
fn wrk_script(contender: Contender, topo: &Topology, backends: &[usize]) -> String {
    let mut script = String::new();
    if contender == Contender::Direct {
        let targets: Vec<String> = backends
            .iter()
            .map(|&i| format!("\"{}\"", topo.backend_addrs[i]))
            .collect();
        script += &format!(
            "local targets = {{ {} }}\nlocal n = 0\n\
             function setup(thread)\n  n = n + 1\n  thread.addr = wrk.lookup(targets[n], \"{BACKEND_PORT}\")[1]\nend\n",
            targets.join(", ")
        );
    }
    script += "function done(summary, latency, requests)\n\
        local e = summary.errors\n\
        io.write(string.format(\"LBBENCH requests=%d duration_us=%d bytes=%d errors=%d p50_us=%d p99_us=%d\\n\",\n\
        summary.requests, summary.duration, summary.bytes,\n\
        e.connect + e.read + e.write + e.timeout + e.status,\n\
        latency:percentile(50), latency:percentile(99)))\nend\n";
    script
}

fn field(line: &str, name: &str) -> Result<f64, String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {name} in wrk's report line {line:?}"))
}

/// Parses the report line our wrk script prints.
pub fn parse_wrk(stdout: &str, load: Load) -> Result<Outcome, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("LBBENCH "))
        .ok_or_else(|| format!("wrk printed no report line:\n{stdout}"))?;
    let requests = field(line, "requests")?;
    let seconds = field(line, "duration_us")? / 1e6;
    let bytes = field(line, "bytes")?;
    if seconds <= 0.0 {
        return Err(format!("wrk ran for no time: {line}"));
    }
    let value = if load.is_bulk() {
        bytes * 8.0 / seconds / 1e9
    } else {
        requests / seconds
    };
    Ok(Outcome {
        value,
        p50_ms: Some(field(line, "p50_us")? / 1000.0),
        p99_ms: Some(field(line, "p99_us")? / 1000.0),
        errors: field(line, "errors")? as u64,
        requests: requests as u64,
        ..Outcome::default()
    })
}

/// One run of the four-client load from each host's run: rates, requests and errors add up,
/// p50 is the median of the hosts' p50s, p99 the worst host's p99.
pub fn combine_hosts(hosts: &[Outcome]) -> Outcome {
    let p50s: Vec<f64> = hosts.iter().filter_map(|o| o.p50_ms).collect();
    let p99s: Vec<f64> = hosts.iter().filter_map(|o| o.p99_ms).collect();
    let every = |v: &Vec<f64>| !hosts.is_empty() && v.len() == hosts.len();
    Outcome {
        value: hosts.iter().map(|o| o.value).sum(),
        p50_ms: every(&p50s)
            .then(|| Summary::of(&p50s).map(|s| s.median))
            .flatten(),
        p99_ms: every(&p99s).then(|| p99s.iter().copied().fold(f64::MIN, f64::max)),
        errors: hosts.iter().map(|o| o.errors).sum(),
        requests: hosts.iter().map(|o| o.requests).sum(),
        ..Outcome::default()
    }
}

/// The UDP load from the client namespace: `lb-bench udp-load`, bounded by `limit` seconds.
fn udp_load(
    contender: Contender,
    topo: &Topology,
    bench: &Path,
    seconds: f64,
    limit: u64,
) -> Result<Outcome, String> {
    let targets: Vec<String> = if contender == Contender::Direct {
        direct_split(WRK_THREADS)
            .iter()
            .map(|&i| SocketAddrV4::new(topo.backend_addrs[i], BACKEND_PORT).to_string())
            .collect()
    } else {
        vec![SocketAddr::new(contender.vip(), UDP_PORT).to_string()]
    };
    let out = topo.client.try_sh(&format!(
        "timeout {limit} {} udp-load --targets {} --flows {UDP_FLOWS} --window {UDP_WINDOW} --seconds {seconds}",
        bench.display(),
        targets.join(",")
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "udp-load failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let r: UdpLoadResult = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("udp-load printed {stdout:?}: {e}"))?;
    let secs = r.elapsed_us as f64 / 1e6;
    Ok(Outcome {
        value: r.received as f64 / secs,
        p50_ms: None,
        p99_ms: None,
        errors: r.lost,
        requests: r.sent,
        ..Outcome::default()
    })
}

/// Runs one load for `seconds` from the client namespace, from `more_clients` (the hosts of
/// `Topology::add_clients`) for the four-client load, or from the balancer's namespace by a
/// process of `host_clients` for the host's load, without its cost.
#[allow(clippy::too_many_arguments)]
pub fn run(
    load: Load,
    contender: Contender,
    topo: &Topology,
    more_clients: &[Netns],
    host_clients: Option<&ClientCgroup>,
    dir: &Path,
    bench: &Path,
    seconds: f64,
) -> Result<Outcome, String> {
    let limit = seconds.ceil() as u64 + 20;
    // wrk checks the URL's address before its threads start, so the direct path names the
    // first backend; its script then spreads the threads over both.
    let target = if contender == Contender::Direct {
        SocketAddr::new(topo.backend_addrs[0].into(), BACKEND_PORT)
    } else {
        SocketAddr::new(contender.vip(), WEB_PORT)
    };
    let wrk = |host: &Netns, name: &str, backends: &[usize], connections: usize, options: &str| {
        let script = dir.join(format!("wrk-{contender:?}-{name}.lua"));
        fs::write(&script, wrk_script(contender, topo, backends)).map_err(|e| e.to_string())?;
        let path = if load.is_bulk() { "/bulk" } else { "/" };
        let command = format!(
            "timeout {limit} wrk -t{} -c{connections} -d{seconds}s --timeout 2s {options} -s {} http://{target}{path}",
            backends.len(),
            script.display()
        );
        if let Some(cgroup) = host_clients.filter(|_| load == Load::ContainersHostNewConnections) {
            // Only stdout comes back: a failed wrk shows as a missing report line.
            return parse_wrk(&cgroup.run_in(host, &command), load);
        }
        let out = host.try_sh(&command);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "wrk in {name} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_wrk(&stdout, load)
    };
    let close = "-H 'Connection: close'";
    match load {
        Load::ContainersHostNewConnections => {
            if host_clients.is_none() {
                return Err("the host's load needs a cgroup for its clients".into());
            }
            wrk(
                &topo.lb,
                "host",
                &direct_split(WRK_THREADS),
                WRK_CONNECTIONS,
                close,
            )
        }
        Load::NewConnections | Load::ContainersNewConnections => wrk(
            &topo.client,
            "client",
            &direct_split(WRK_THREADS),
            WRK_CONNECTIONS,
            close,
        ),
        Load::NewConnectionsFourClients => {
            if more_clients.len() < MORE_CLIENTS {
                return Err(format!(
                    "{MORE_CLIENTS} more client hosts needed, {} set up",
                    more_clients.len()
                ));
            }
            // The direct path spreads the 8 threads of all hosts 3:5 over the backends.
            let split = direct_split(MORE_CLIENTS * MORE_CLIENT_WRK_THREADS);
            let hosts: Vec<Result<Outcome, String>> = std::thread::scope(|scope| {
                let runs: Vec<_> = more_clients[..MORE_CLIENTS]
                    .iter()
                    .zip(split.chunks(MORE_CLIENT_WRK_THREADS))
                    .enumerate()
                    .map(|(i, (host, backends))| {
                        let wrk = &wrk;
                        scope.spawn(move || {
                            wrk(
                                host,
                                &format!("client{}", i + 1),
                                backends,
                                MORE_CLIENT_WRK_CONNECTIONS,
                                close,
                            )
                        })
                    })
                    .collect();
                runs.into_iter()
                    .map(|r| {
                        r.join()
                            .unwrap_or_else(|_| Err("wrk's thread panicked".into()))
                    })
                    .collect()
            });
            Ok(combine_hosts(
                &hosts.into_iter().collect::<Result<Vec<_>, _>>()?,
            ))
        }
        Load::KeepAlive => wrk(
            &topo.client,
            "client",
            &direct_split(WRK_THREADS),
            WRK_CONNECTIONS,
            "",
        ),
        Load::Bulk | Load::ContainersBulk => wrk(
            &topo.client,
            "client",
            &direct_split(WRK_THREADS),
            WRK_THREADS,
            "",
        ),
        Load::Udp | Load::ContainersUdp => udp_load(contender, topo, bench, seconds, limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report_line() {
        let out = "Running 1s test\nLBBENCH requests=5000 duration_us=2000000 bytes=8000 errors=3 p50_us=1500 p99_us=9000\n";
        let o = parse_wrk(out, Load::KeepAlive).expect("parses");
        assert_eq!(o.value, 2500.0);
        assert_eq!((o.p50_ms, o.p99_ms, o.errors), (Some(1.5), Some(9.0), 3));
        let o = parse_wrk(out, Load::Bulk).expect("parses");
        assert!((o.value - 8000.0 * 8.0 / 2.0 / 1e9).abs() < 1e-12);
    }

    #[test]
    fn direct_split_follows_the_weights() {
        assert_eq!(direct_split(5), vec![1, 1, 0, 1, 0]);
        let eight = direct_split(8);
        assert_eq!(eight.iter().filter(|&&b| b == 0).count(), 3, "{eight:?}");
        assert_eq!(eight.len(), 8);
        assert!(direct_split(0).is_empty());
    }

    #[test]
    fn hosts_add_up_with_median_p50_and_worst_p99() {
        let host = |value, p50, p99, errors| Outcome {
            value,
            p50_ms: Some(p50),
            p99_ms: Some(p99),
            errors,
            requests: value as u64 * 15,
            ..Outcome::default()
        };
        let all = combine_hosts(&[
            host(100.0, 1.0, 10.0, 1),
            host(200.0, 4.0, 50.0, 0),
            host(300.0, 2.0, 20.0, 2),
            host(400.0, 3.0, 30.0, 3),
        ]);
        assert_eq!(all.value, 1000.0);
        assert_eq!((all.errors, all.requests), (6, 15_000));
        assert_eq!((all.p50_ms, all.p99_ms), (Some(2.5), Some(50.0)));
        let mut no_latency = host(1.0, 1.0, 1.0, 0);
        no_latency.p99_ms = None;
        let some = combine_hosts(&[host(1.0, 1.0, 1.0, 0), no_latency]);
        assert_eq!((some.p50_ms, some.p99_ms), (Some(1.0), None));
        assert_eq!(combine_hosts(&[]).p50_ms, None);
    }

    #[test]
    fn a_missing_line_or_field_is_an_error() {
        assert!(parse_wrk("no line", Load::KeepAlive).is_err());
        assert!(parse_wrk("LBBENCH requests=1", Load::KeepAlive).is_err());
        assert!(
            parse_wrk(
                "LBBENCH requests=1 duration_us=0 bytes=0 errors=0 p50_us=1 p99_us=1",
                Load::KeepAlive
            )
            .is_err()
        );
    }
}
