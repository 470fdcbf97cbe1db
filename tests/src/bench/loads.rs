//! The loads of the end-to-end benchmark and what each run costs the balancer: wrk for HTTP
//! (a new connection per request, keep-alive requests, and a bulk download), `lb-bench udp-load`
//! for UDP. Every load is bounded in time; every external command is bounded by `timeout`.

use std::{fs, net::SocketAddrV4, path::Path};

use serde::Serialize;

use super::{
    contenders::{Contender, UDP_PORT, WEB_PORT},
    udp::UdpLoadResult,
};
use crate::topology::{BACKEND_PORT, Topology, VIP};

/// Size of the object the bulk load downloads over and over (keep-alive).
pub const BULK_BYTES: usize = 16 << 20;
/// wrk threads: 5 lets the direct path split them 2:3 over the backends (4:6).
const WRK_THREADS: usize = 5;
const WRK_CONNECTIONS: usize = 50;
const UDP_FLOWS: usize = 20;
const UDP_WINDOW: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Load {
    /// A new TCP connection per request (HTTP with `Connection: close`).
    NewConnections,
    /// Requests on kept-alive connections.
    KeepAlive,
    /// Bulk TCP: a 16 MiB object downloaded over and over on 5 connections.
    Bulk,
    /// Small UDP requests and their echoes.
    Udp,
}

impl Load {
    pub const ALL: [Load; 4] = [Load::NewConnections, Load::KeepAlive, Load::Bulk, Load::Udp];

    pub fn label(self) -> &'static str {
        match self {
            Load::NewConnections => "new connection per request",
            Load::KeepAlive => "keep-alive requests",
            Load::Bulk => "bulk TCP download",
            Load::Udp => "UDP request/response",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Load::NewConnections | Load::KeepAlive => "requests/s",
            Load::Bulk => "Gbit/s",
            Load::Udp => "replies/s",
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
pub fn start_backends(topo: &Topology, dir: &Path, bench: &Path) -> Result<Servers, String> {
    let mut servers = Servers(Vec::new());
    // The direct path: the client reaches the backends through the balancer namespace's routing.
    topo.client.sh("ip route add 198.18.1.0/24 via 198.18.0.1");
    // Frames reach the balancer at wire size, as from a real switch: GRO on the switch ports
    // facing the backends would hand the bridge 64 KB aggregates, which a single-buffer XDP
    // program cannot take (veth drops them) and which the kernel path would get for free.
    for i in 1..=topo.backends.len() {
        topo.switch.sh(&format!("ethtool -K s-b{i} gro off"));
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

/// The wrk script: reports the figures on one line, and for the direct path sends wrk's
/// threads straight to the backends, 2 to the first and 3 to the second (4:6).
fn wrk_script(contender: Contender, topo: &Topology) -> String {
    let mut script = String::new();
    if contender == Contender::Direct {
        let targets: Vec<String> = [0, 0, 1, 1, 1]
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
    let value = match load {
        Load::Bulk => bytes * 8.0 / seconds / 1e9,
        _ => requests / seconds,
    };
    Ok(Outcome {
        value,
        p50_ms: Some(field(line, "p50_us")? / 1000.0),
        p99_ms: Some(field(line, "p99_us")? / 1000.0),
        errors: field(line, "errors")? as u64,
        requests: requests as u64,
        cost: Cost::default(),
    })
}

/// Runs one load for `seconds` from the client namespace (without its cost).
pub fn run(
    load: Load,
    contender: Contender,
    topo: &Topology,
    dir: &Path,
    bench: &Path,
    seconds: f64,
) -> Result<Outcome, String> {
    let limit = seconds.ceil() as u64 + 20;
    if load == Load::Udp {
        let targets: Vec<String> = if contender == Contender::Direct {
            [0, 0, 1, 1, 1]
                .iter()
                .map(|&i| SocketAddrV4::new(topo.backend_addrs[i], BACKEND_PORT).to_string())
                .collect()
        } else {
            vec![SocketAddrV4::new(VIP, UDP_PORT).to_string()]
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
        return Ok(Outcome {
            value: r.received as f64 / secs,
            p50_ms: None,
            p99_ms: None,
            errors: r.lost,
            requests: r.sent,
            cost: Cost::default(),
        });
    }
    let script = dir.join(format!("wrk-{contender:?}.lua"));
    fs::write(&script, wrk_script(contender, topo)).map_err(|e| e.to_string())?;
    let (path, connections, close) = match load {
        Load::NewConnections => ("/", WRK_CONNECTIONS, "-H 'Connection: close'"),
        Load::KeepAlive => ("/", WRK_CONNECTIONS, ""),
        _ => ("/bulk", WRK_THREADS, ""),
    };
    // wrk checks the URL's address before its threads start, so the direct path names the
    // first backend; its script then spreads the threads over both.
    let target = if contender == Contender::Direct {
        SocketAddrV4::new(topo.backend_addrs[0], BACKEND_PORT)
    } else {
        SocketAddrV4::new(VIP, WEB_PORT)
    };
    let out = topo.client.try_sh(&format!(
        "timeout {limit} wrk -t{WRK_THREADS} -c{connections} -d{seconds}s --timeout 2s {close} -s {} http://{target}{path}",
        script.display()
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&stdout, load)
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
