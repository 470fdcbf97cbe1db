//! `cargo xtask bench`: this balancer measured against what users would run instead, in one
//! run, on one machine, on the same virtual wires. Part 1 times the XDP program alone
//! (BPF_PROG_TEST_RUN); part 2 runs real loads end to end in network namespaces through each
//! contender in turn; the report gives every figure as the median of 3 runs with min and max.

pub mod contenders;
pub mod cost;
pub mod forwarding;
pub mod loads;
pub mod micro;
pub mod report;
pub mod summary;
pub mod udp;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use serde::Serialize;

use self::{
    contenders::{Contender, Running},
    cost::{
        BpfStats, MachineCpu, device_drops, kernel_counter, namespace_cpu_seconds, program_runtime,
    },
    loads::{Cost, Load, MORE_CLIENTS, Outcome, Scene},
    micro::{MicroOptions, MicroResults},
    summary::Summary,
};
use crate::{
    host::ClientCgroup,
    netns::{Netns, sweep_stale},
    topology::{Arms, Topology},
};

const RUNS: usize = 3;
/// lb's packet programs: XDP on the NICs, tc on the containers' bridge ports. Their run time
/// together is lb's cost per packet.
const LB_PROGRAMS: [&str; 2] = ["lb_xdp", "lb_tc"];
/// The balancer namespace's devices, whose drops each run counts, per scene.
const TWO_ARM_DEVICES: [&str; 2] = ["lb0", "lb1"];
const CONTAINER_DEVICES: [&str; 3] = ["lb0", "vc1", "vc2"];

/// (run time ns, run count) of lb's programs together.
fn lb_runtime() -> (u64, u64) {
    LB_PROGRAMS
        .iter()
        .map(|p| program_runtime(p))
        .fold((0, 0), |(t, c), (pt, pc)| (t + pt, c + pc))
}

pub struct Options {
    pub quick: bool,
    pub lb: PathBuf,
    /// This benchmark's own binary (its udp-echo and udp-load subcommands run in namespaces).
    pub bench: PathBuf,
    /// Only these contenders (all when empty), and no micro-benchmark unless `Xdp` is named.
    pub only: Vec<Contender>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub mode: String,
    pub seconds_per_run: f64,
    /// The new-connection loads' runs, sustained longer.
    pub new_connection_seconds_per_run: f64,
}

/// The figures of one contender under one load, over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub value: Summary,
    pub p50_ms: Option<Summary>,
    pub p99_ms: Option<Summary>,
    /// Failed requests over all runs.
    pub errors: u64,
    pub requests: u64,
    /// New-connection loads: the backends' PAWS rejections of SYNs (`TcpExtPAWSTimewait`) and
    /// the clients' SYN retransmits (`TcpExtTCPSynRetrans`), over all runs.
    pub paws_timewait: Option<u64>,
    pub syn_retrans: Option<u64>,
    pub xdp_ns_per_packet: Option<Summary>,
    pub balancer_cpu: Option<Summary>,
    pub machine_busy: Summary,
    pub machine_softirq: Summary,
    /// Frames the balancer namespace's veths dropped, over all runs.
    pub device_drops: u64,
    /// lb only: its pass and drop counters that moved over the runs.
    pub lb_counters: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize)]
pub enum Cell {
    Measured(Box<Measured>),
    NotApplicable(String),
    Failed(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub contender: Contender,
    pub load: Load,
    pub cell: Cell,
    pub runs: Vec<Outcome>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub micro: Result<MicroResults, String>,
    pub entries: Vec<Entry>,
    /// Contenders that could not be measured at all, and why.
    pub absent: Vec<(String, String)>,
    pub elapsed_s: f64,
}

impl Results {
    /// Figures that should have been measured and were not.
    pub fn failures(&self, opts: &Options) -> Vec<String> {
        let mut list: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| match &e.cell {
                Cell::Failed(why) => Some(format!(
                    "{} / {}: {why}",
                    e.contender.label(),
                    e.load.label()
                )),
                _ => None,
            })
            .collect();
        if let Err(e) = &self.micro
            && (opts.only.is_empty() || opts.only.contains(&Contender::Xdp))
        {
            list.push(format!("micro-benchmark: {e}"));
        }
        if let Ok(micro) = &self.micro
            && let Err(e) = &micro.forwarding
        {
            list.push(format!("micro-benchmark, forwarding loop: {e}"));
        }
        list
    }

    pub fn cell(&self, contender: Contender, load: Load) -> Option<&Cell> {
        self.entries
            .iter()
            .find(|e| e.contender == contender && e.load == load)
            .map(|e| &e.cell)
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn machine(quick: bool, seconds: f64) -> Machine {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let memory_kib: f64 = read_trim("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        date,
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib: memory_kib / 1024.0 / 1024.0,
        mode: if quick { "quick" } else { "default" }.into(),
        seconds_per_run: seconds,
        new_connection_seconds_per_run: Load::NewConnections.seconds(seconds, quick),
    }
}

pub fn micro_options(quick: bool) -> MicroOptions {
    MicroOptions {
        levels: if quick {
            vec![0, 10_000, 100_000]
        } else {
            vec![0, 10_000, 1_000_000]
        },
        // A one-call test run costs the caller ~0.4 ms here (the kernel re-points its XDP
        // dispatcher around each call), so one-call samples are the micro-benchmark's budget.
        calls: if quick { 300 } else { 2_000 },
        repeats: if quick { 200_000 } else { 1_000_000 },
        peer_samples: if quick { 2_000 } else { 20_000 },
        forwarding_seconds: if quick { 0.5 } else { 2.0 },
    }
}

/// Runs everything and returns the figures; the caller writes the report.
pub fn run(opts: &Options) -> Results {
    let started = Instant::now();
    sweep_stale();
    let seconds = if opts.quick { 1.0 } else { 5.0 };
    let micro = if opts.only.is_empty() || opts.only.contains(&Contender::Xdp) {
        micro::run(micro_options(opts.quick))
    } else {
        Err("not run (only some contenders were asked for)".into())
    };
    let mut results = Results {
        machine: machine(opts.quick, seconds),
        micro,
        entries: Vec::new(),
        absent: Vec::new(),
        elapsed_s: 0.0,
    };
    if !Path::new("/proc/net/ip_vs").exists() {
        results.absent.push((
            "IPVS".into(),
            "not in this kernel (no /proc/net/ip_vs, and the kernel loads no modules)".into(),
        ));
    }
    end_to_end(opts, seconds, &mut results);
    results.elapsed_s = started.elapsed().as_secs_f64();
    results
}

fn end_to_end(opts: &Options, seconds: f64, results: &mut Results) {
    let stats = BpfStats::enable();
    for scene in [Scene::TwoArm, Scene::Containers] {
        for contender in Contender::ALL {
            if !opts.only.is_empty() && !opts.only.contains(&contender) {
                continue;
            }
            eprintln!("bench: {} ({scene:?})", contender.label());
            one_contender(opts, scene, contender, seconds, &stats, results);
        }
    }
}

/// Every load of `scene` through `contender`, on a network of their own.
fn one_contender(
    opts: &Options,
    scene: Scene,
    contender: Contender,
    seconds: f64,
    stats: &Result<BpfStats, String>,
    results: &mut Results,
) {
    let loads: Vec<Load> = Load::ALL
        .into_iter()
        .filter(|l| l.scene() == scene)
        .collect();
    if let Some(why) = contender.scene_unsupported(scene == Scene::Containers) {
        for load in loads {
            results.entries.push(Entry {
                contender,
                load,
                cell: Cell::NotApplicable(why.into()),
                runs: vec![],
            });
        }
        return;
    }
    // A fresh network per contender: TIME_WAIT sockets on the backends, conntrack entries
    // and sysctls left by one contender would otherwise tax the next (a backend's TIME_WAIT
    // refuses a SYN that reuses its addresses and ports with an older timestamp, and
    // another connection's timestamps are unrelated). Every host keeps the kernel's TCP
    // defaults, and lb its default configuration. (`tcp_timestamps=1` offsets timestamps
    // by a secret hash of the connection's addresses and ports, measured on 6.18: the same
    // four values get the same offset again, another source port an unrelated one.)
    let (topo, more_clients, host_clients) = match scene {
        Scene::TwoArm => {
            let topo = Topology::new(Arms::Two, 2);
            let more = topo.add_clients(MORE_CLIENTS);
            if contender == Contender::XdpIpv6 {
                topo.add_ipv6();
                topo.add_ipv6_clients(&more);
            }
            (topo, more, None)
        }
        Scene::Containers => {
            let topo = Topology::containers(2);
            if contender == Contender::XdpIpv6 {
                topo.add_ipv6();
            }
            let cgroup = ClientCgroup::new(&topo.lb.name);
            (topo, Vec::new(), Some(cgroup))
        }
    };
    // The client hosts reuse their own TIME_WAIT ports, as load generators are tuned: wrk
    // closes each `Connection: close` connection as soon as it has read the answer, while
    // the server closes its end, so both ends keep TIME_WAIT (2 s of wrk -c10 straight
    // to nginx left about 5,000 on the client and 9,000 on the server), and without reuse
    // wrk's connect() soon spends the CPU searching for a free port among 28,232.
    for host in std::iter::once(&topo.client).chain(&more_clients) {
        host.sh("sysctl -qw net.ipv4.tcp_tw_reuse=1");
    }
    if scene == Scene::Containers {
        topo.lb.sh("sysctl -qw net.ipv4.tcp_tw_reuse=1");
    }
    let dir = std::env::temp_dir().join(format!("{}-bench", topo.lb.name));
    let _cleanup = RemoveDir(dir.clone());
    let running = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| loads::start_backends(&topo, scene, &dir, &opts.bench))
        .and_then(|servers| {
            Ok((
                servers,
                contenders::start(contender, &topo, host_clients.as_ref(), &dir, &opts.lb)?,
            ))
        });
    let (_servers, running) = match running {
        Ok(r) => r,
        Err(e) => {
            for load in loads {
                results.entries.push(Entry {
                    contender,
                    load,
                    cell: Cell::Failed(format!("setting up: {e}")),
                    runs: vec![],
                });
            }
            return;
        }
    };
    // Warm-up: neighbours resolved, caches and pools filled; not recorded.
    let _ = loads::run(
        Load::KeepAlive,
        contender,
        &topo,
        &more_clients,
        None,
        &dir,
        &opts.bench,
        1.0,
    );
    let hosts = Hosts {
        topo: &topo,
        more_clients: &more_clients,
        host_clients: host_clients.as_ref(),
        dir: &dir,
    };
    for load in loads {
        if load.is_udp()
            && let Some(why) = contender.udp_unsupported()
        {
            results.entries.push(Entry {
                contender,
                load,
                cell: Cell::NotApplicable(why.into()),
                runs: vec![],
            });
            continue;
        }
        let entry = measure(
            opts,
            contender,
            load,
            &hosts,
            load.seconds(seconds, opts.quick),
            &running,
            stats,
        );
        if let Cell::Measured(m) = &entry.cell {
            let tcp = match (m.paws_timewait, m.syn_retrans) {
                (Some(paws), Some(syn)) => {
                    format!("; PAWS rejections {paws}, SYN retransmits {syn}")
                }
                _ => String::new(),
            };
            eprintln!(
                "bench:   {:<42} {:>12.2} {} (min {:.2}, max {:.2}; errors {}){tcp}",
                load.label(),
                m.value.median,
                load.unit(),
                m.value.min,
                m.value.max,
                m.errors
            );
        }
        results.entries.push(entry);
    }
    drop(running);
}

/// Where the loads run: the network, the four-client load's client hosts, the cgroup of the
/// host's clients, the run's folder.
struct Hosts<'a> {
    topo: &'a Topology,
    more_clients: &'a [Netns],
    host_clients: Option<&'a ClientCgroup>,
    dir: &'a Path,
}

impl Hosts<'_> {
    /// The hosts that open `load`'s connections.
    fn clients(&self, load: Load) -> Vec<&Netns> {
        match load {
            Load::NewConnectionsFourClients => self.more_clients.iter().collect(),
            Load::ContainersHostNewConnections => vec![&self.topo.lb],
            _ => vec![&self.topo.client],
        }
    }

    /// (the backends' PAWS rejections, the clients' SYN retransmits) so far, for a load that
    /// opens a connection per request.
    fn tcp_counters(&self, load: Load) -> Option<(u64, u64)> {
        let backends: Vec<&Netns> = self.topo.backends.iter().collect();
        load.new_connections().then(|| {
            (
                kernel_counter(&backends, "TcpExtPAWSTimewait"),
                kernel_counter(&self.clients(load), "TcpExtTCPSynRetrans"),
            )
        })
    }
}

fn measure(
    opts: &Options,
    contender: Contender,
    load: Load,
    hosts: &Hosts<'_>,
    seconds: f64,
    running: &Running<'_>,
    stats: &Result<BpfStats, String>,
) -> Entry {
    let topo = hosts.topo;
    let counters_before = running
        .balancer()
        .map(|b| lb_counters(&b.status()))
        .unwrap_or_default();
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let cpu_before = MachineCpu::read();
        let lb_before = namespace_cpu_seconds(&topo.lb);
        let devices: &[&str] = match load.scene() {
            Scene::TwoArm => &TWO_ARM_DEVICES,
            Scene::Containers => &CONTAINER_DEVICES,
        };
        let drops_before = device_drops(&topo.lb, devices);
        let xdp_before = lb_runtime();
        let tcp_before = hosts.tcp_counters(load);
        let started = Instant::now();
        let outcome = loads::run(
            load,
            contender,
            topo,
            hosts.more_clients,
            hosts.host_clients,
            hosts.dir,
            &opts.bench,
            seconds,
        );
        let wall = started.elapsed().as_secs_f64();
        let tcp_after = hosts.tcp_counters(load);
        let xdp_after = lb_runtime();
        let lb_after = namespace_cpu_seconds(&topo.lb);
        let drops_after = device_drops(&topo.lb, devices);
        let cpu_after = MachineCpu::read();
        let mut outcome = match outcome {
            Ok(o) if o.value > 0.0 => o,
            Ok(_) => {
                return failed(contender, load, runs, "no traffic got through".into());
            }
            Err(e) => return failed(contender, load, runs, e),
        };
        if let (Some(before), Some(after)) = (tcp_before, tcp_after) {
            outcome.paws_timewait = Some(after.0.saturating_sub(before.0));
            outcome.syn_retrans = Some(after.1.saturating_sub(before.1));
        }
        let (busy, softirq) = cpu_before.shares_until(&cpu_after);
        let process_cpu = (lb_after - lb_before) / wall;
        let (xdp_ns, xdp_runs) = (xdp_after.0 - xdp_before.0, xdp_after.1 - xdp_before.1);
        outcome.cost = Cost {
            xdp_ns_per_packet: (contender.is_lb() && xdp_runs > 0 && stats.is_ok())
                .then(|| xdp_ns as f64 / xdp_runs as f64),
            balancer_cpu: match contender {
                // The program's run time plus the daemon's own CPU (health checks, sweeps).
                Contender::Xdp | Contender::XdpDsr | Contender::XdpIpv6 if stats.is_ok() => {
                    Some(xdp_ns as f64 / 1e9 / wall + process_cpu)
                }
                Contender::Haproxy | Contender::Nginx => Some(process_cpu),
                _ => None,
            },
            machine_busy: busy,
            machine_softirq: softirq,
            device_drops: drops_after.saturating_sub(drops_before),
        };
        runs.push(outcome);
    }
    let mut moved = Vec::new();
    if let Some(b) = running.balancer() {
        let status = b.status();
        for (name, after) in lb_counters(&status) {
            let before = counters_before
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |c| c.1);
            if after > before && (name.starts_with("drop_") || name.starts_with("pass_")) {
                moved.push((name, after - before));
            }
        }
        // A failed balancer must not pass for a fast one.
        let new_flows: u64 = status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["backends"].as_array().into_iter().flatten())
            .filter_map(|b| b["new_flows"].as_u64())
            .sum();
        // The host's clients are balanced by the socket hooks, which make no flows.
        let host_balanced = |counters: &[(String, u64)]| {
            counters
                .iter()
                .find(|(n, _)| n == "event_host_balanced")
                .map_or(0, |c| c.1)
        };
        let host_moved =
            host_balanced(&lb_counters(&status)).saturating_sub(host_balanced(&counters_before));
        if load == Load::ContainersHostNewConnections && host_moved == 0 {
            return failed(
                contender,
                load,
                runs,
                "the socket hooks balanced no connection".into(),
            );
        }
        if new_flows == 0 {
            return failed(
                contender,
                load,
                runs,
                "the daemon counted no new flows".into(),
            );
        }
    }
    let pick = |f: &dyn Fn(&Outcome) -> Option<f64>| -> Option<Summary> {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (v.len() == runs.len()).then(|| Summary::of(&v)).flatten()
    };
    let cell = Cell::Measured(Box::new(Measured {
        value: pick(&|o| Some(o.value)).expect("every run has a value"),
        p50_ms: pick(&|o| o.p50_ms),
        p99_ms: pick(&|o| o.p99_ms),
        errors: runs.iter().map(|o| o.errors).sum(),
        requests: runs.iter().map(|o| o.requests).sum(),
        paws_timewait: runs.iter().map(|o| o.paws_timewait).sum(),
        syn_retrans: runs.iter().map(|o| o.syn_retrans).sum(),
        xdp_ns_per_packet: pick(&|o| o.cost.xdp_ns_per_packet),
        balancer_cpu: pick(&|o| o.cost.balancer_cpu),
        machine_busy: pick(&|o| Some(o.cost.machine_busy)).expect("always measured"),
        machine_softirq: pick(&|o| Some(o.cost.machine_softirq)).expect("always measured"),
        device_drops: runs.iter().map(|o| o.cost.device_drops).sum(),
        lb_counters: moved,
    }));
    Entry {
        contender,
        load,
        cell,
        runs,
    }
}

/// The daemon's counters, from `lb status --json`.
fn lb_counters(status: &serde_json::Value) -> Vec<(String, u64)> {
    status["counters"]
        .as_object()
        .map(|c| {
            c.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn failed(contender: Contender, load: Load, runs: Vec<Outcome>, why: String) -> Entry {
    eprintln!("bench:   {}: FAILED: {why}", load.label());
    Entry {
        contender,
        load,
        cell: Cell::Failed(why),
        runs,
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
