//! The benchmark's report: markdown tables (every figure a median with min and max, and its
//! ratio to the direct path and to this balancer) and an SVG chart of the main figures.
//!
//! One file, past the usual size: half of it is the tests of the tables and the chart.

use std::fmt::Write as _;

use super::{
    Cell, Measured, Results, contenders::Contender, loads::Load, micro::MicroPath, summary::Summary,
};

fn number(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn spread(s: &Summary) -> String {
    format!("{} [{}–{}]", number(s.median), number(s.min), number(s.max))
}

/// The closest Rust peer's figures on its own method, as issue 13 gives them (net ns), by
/// the path names of `micro::Bench::peer_method`.
const PEER_NET_NS: [(&str, f64); 6] = [
    ("non-IP frame, passed", 46.0),
    ("TCP to an unknown destination, passed", 130.0),
    ("established, forward", 132.0),
    ("established, reply", 124.0),
    ("UDP established", 119.0),
    ("new flow", 856.0),
];

/// lb's figures on the peer's method, beside the peer's.
fn peer_method_table(r: &mut String, peer: &super::micro::PeerMethodResults) {
    let _ = write!(
        r,
        "\n### Per packet, the closest Rust peer's method (issue 13)\n\n\
         One BPF_PROG_TEST_RUN per sample, repeat 1, a fresh copy of the packet each call, {} \
         samples per path and round, the mean of the kernel-reported durations, net of the \
         per-call overhead: an ARP frame's single-call mean less its mean over {} in-kernel \
         repeats ({} ns, median [min–max] of 3 rounds). Medians of 3 rounds, pinned to one \
         CPU, the table holding the measured flows alone. The peer's figures (umars28/xdp-lb, \
         measured side by side on a machine of this kind with the same method) are issue \
         13's; it has no IPv6, whose rows are lb's NAT66 on the same paths. The rows marked \
         tc are the same packets through lb's tc program (the hook of a bridge's ports, where \
         containers' packets meet it), net of its own per-call overhead ({} ns).\n\n\
         | path | lb (net ns) | peer (net ns) | lb / peer |\n|---|---:|---:|---:|\n",
        number(peer.samples_per_round as f64),
        number(f64::from(peer.calibration_repeats)),
        spread(&peer.calibration_ns),
        spread(&peer.tc_calibration_ns),
    );
    for figure in &peer.figures {
        let theirs = PEER_NET_NS
            .iter()
            .find(|(path, _)| *path == figure.path)
            .map(|(_, ns)| *ns);
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} |",
            figure.path,
            spread(&figure.net_ns),
            theirs.map_or("–".into(), number),
            theirs.map_or("–".into(), |ns| format!(
                "{:.2}",
                figure.net_ns.median / ns
            )),
        );
    }
}

/// Forwarded packets per second per core, beside the machine's ceiling (see
/// `bench::forwarding`).
fn forwarding_table(
    r: &mut String,
    forwarding: &Result<super::forwarding::ForwardingResults, String>,
) {
    let _ = write!(
        r,
        "\n### Forwarded packets per second, one core (issue 13)\n\n"
    );
    let f = match forwarding {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(r, "FAILED: {e}");
            return;
        }
    };
    let _ = write!(
        r,
        "{} frames of {} bytes ({} on the wire) go round a loop of native XDP programs on two \
         veth pairs: into lb0, forwarded by lb's established path (full NAT) out of lb1, and \
         written back whole by a reflector on lb1's peer, which redirects them into lb0 again. \
         The kernel's live-frames test run, which the issue names, was refused by the kernels \
         this was written on (EPERM), so the frames are not generated but kept going round. The ceiling \
         is the same loop with a program that only redirects in lb's place. All of it runs in \
         softirq on one CPU (softirq held it {:.0}% of the time, in the least busy measurement). \
         Medians [min–max] of 3 \
         rounds of {} s.\n\n\
         | loop through | Mpps | ns per trip round |\n|---|---:|---:|\n\
         | redirect only (ceiling) | {} | {:.0} |\n\
         | lb, established flow | {} | {:.0} |\n\n\
         What lb adds to a trip over the redirect-only program: {:.0} ns.\n",
        f.frames_in_flight,
        f.frame_len,
        f.frame_len + 4,
        f.min_softirq_share * 100.0,
        f.seconds_per_round,
        spread(&f.ceiling_mpps),
        1e3 / f.ceiling_mpps.median,
        spread(&f.lb_mpps),
        1e3 / f.lb_mpps.median,
        1e3 / f.lb_mpps.median - 1e3 / f.ceiling_mpps.median,
    );
}

fn median_of(results: &Results, contender: Contender, load: Load) -> Option<f64> {
    match results.cell(contender, load)? {
        Cell::Measured(m) => Some(m.value.median),
        _ => None,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn short(cell: Option<&Cell>) -> String {
    match cell {
        Some(Cell::Measured(m)) => number(m.value.median),
        Some(Cell::NotApplicable(_)) => "n/a".into(),
        Some(Cell::Failed(_)) => "failed".into(),
        None => "–".into(),
    }
}

/// The summary table: one row per load, one column per contender, medians, and each
/// contender's ratio to the direct path.
pub fn summary_table(results: &Results) -> String {
    let mut t = String::from("| load | ");
    t += &Contender::ALL.map(|c| c.label()).join(" | ");
    t += " |\n|---|";
    t += &"---:|".repeat(Contender::ALL.len());
    t += "\n";
    for load in Load::ALL {
        let direct = median_of(results, Contender::Direct, load);
        let _ = write!(t, "| {} ({}) |", load.label(), load.unit());
        for c in Contender::ALL {
            let cell = results.cell(c, load);
            let value = short(cell);
            if c == Contender::Direct || !matches!(cell, Some(Cell::Measured(_))) {
                let _ = write!(t, " {value} |");
            } else {
                let _ = write!(
                    t,
                    " {value} ({}) |",
                    ratio(median_of(results, c, load), direct)
                );
            }
        }
        t += "\n";
    }
    if let Ok(micro) = &results.micro {
        let _ = write!(t, "| XDP program alone, ns/packet |");
        let established: Vec<String> = micro
            .figures
            .iter()
            .filter(|f| f.path == MicroPath::EstablishedRandom)
            .map(|f| {
                format!(
                    "{} at {} flows",
                    number(f.ns_per_packet.median),
                    number(f.connections as f64)
                )
            })
            .collect();
        let hot = micro
            .figures
            .iter()
            .find(|f| f.path == MicroPath::Established)
            .map_or("–".into(), |f| number(f.ns_per_packet.median));
        let _ = writeln!(
            t,
            " established flow: {hot} hot; random flow: {} |",
            established.join(", ")
        );
    }
    t
}

/// A whole count, grouped: `1,234`.
fn count(n: u64) -> String {
    if n >= 100 {
        number(n as f64)
    } else {
        n.to_string()
    }
}

/// A count and its share of `of`: `1,234 (2.5%)`.
fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return count(n);
    }
    let pct = n as f64 / of as f64 * 100.0;
    let pct = if pct > 0.0 && pct < 0.01 {
        "<0.01".to_owned()
    } else if pct < 10.0 {
        format!("{pct:.2}")
    } else {
        format!("{pct:.1}")
    };
    format!("{} ({pct}%)", count(n))
}

fn detail_table(results: &Results, load: Load) -> String {
    let direct = median_of(results, Contender::Direct, load);
    let ours = median_of(results, Contender::Xdp, load);
    let latency = !load.is_bulk() && !load.is_udp();
    let tcp = load.new_connections();
    let mut t = format!(
        "| contender | {} median [min–max] | ÷ direct | ÷ lb |{} failed / sent |{} veth drops | balancer CPU (CPU-s/s) | XDP ns/packet | machine busy (softirq) |\n|---|---:|---:|---:|{}---:|{}---:|---:|---:|---:|\n",
        load.unit(),
        if latency { " p50 ms | p99 ms |" } else { "" },
        if tcp {
            " backends' PAWS rejections (of connections) | clients' SYN retransmits |"
        } else {
            ""
        },
        if latency { "---:|---:|" } else { "" },
        if tcp { "---:|---:|" } else { "" },
    );
    for c in Contender::ALL {
        match results.cell(c, load) {
            Some(Cell::Measured(m)) => {
                let Measured {
                    value,
                    p50_ms,
                    p99_ms,
                    errors,
                    requests,
                    paws_timewait,
                    syn_retrans,
                    xdp_ns_per_packet,
                    balancer_cpu,
                    machine_busy,
                    machine_softirq,
                    device_drops,
                    lb_counters: _,
                } = m.as_ref();
                let _ = write!(
                    t,
                    "| {} | {} | {} | {} |",
                    c.label(),
                    spread(value),
                    ratio(Some(value.median), direct),
                    ratio(Some(value.median), ours)
                );
                if latency {
                    let f = |s: &Option<Summary>| s.as_ref().map_or("–".into(), spread);
                    let _ = write!(t, " {} | {} |", f(p50_ms), f(p99_ms));
                }
                let cpu = balancer_cpu.as_ref().map_or_else(
                    || match c {
                        Contender::Direct => "none".to_owned(),
                        _ => "not attributable (softirq)".to_owned(),
                    },
                    |s| format!("{:.3}", s.median),
                );
                let _ = write!(t, " {errors} / {requests} |");
                if tcp {
                    let _ = write!(
                        t,
                        " {} | {} |",
                        paws_timewait.map_or("–".into(), |p| share(p, *requests)),
                        syn_retrans.map_or("–".into(), count),
                    );
                }
                let _ = writeln!(
                    t,
                    " {device_drops} | {cpu} | {} | {:.0}% ({:.0}%) |",
                    xdp_ns_per_packet
                        .as_ref()
                        .map_or("–".into(), |s| format!("{:.0}", s.median)),
                    machine_busy.median * 100.0,
                    machine_softirq.median * 100.0,
                );
            }
            Some(Cell::NotApplicable(why)) => {
                let _ = writeln!(t, "| {} | n/a: {why} |", c.label());
            }
            Some(Cell::Failed(why)) => {
                let _ = writeln!(t, "| {} | FAILED: {} |", c.label(), why.replace('\n', " "));
            }
            None => {}
        }
    }
    t
}

/// Loads where this balancer is not ahead of every other contender (the direct path aside).
pub fn behind(results: &Results) -> Vec<String> {
    let mut list = Vec::new();
    for load in Load::ALL {
        let Some(ours) = median_of(results, Contender::Xdp, load) else {
            continue;
        };
        for c in [Contender::Nftables, Contender::Haproxy, Contender::Nginx] {
            if let Some(theirs) = median_of(results, c, load)
                && theirs >= ours
            {
                list.push(format!(
                    "{}: {} {} vs lb {} ({})",
                    load.label(),
                    c.label(),
                    number(theirs),
                    number(ours),
                    ratio(Some(ours), Some(theirs))
                ));
            }
        }
        if let Some(direct) = median_of(results, Contender::Direct, load)
            && ours < 0.9 * direct
        {
            list.push(format!(
                "{}: lb is {} of the direct path (goal: within 10%)",
                load.label(),
                ratio(Some(ours), Some(direct))
            ));
        }
    }
    list
}

/// Whether one of the goals is met by this run's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    NotMeasured,
}

/// The goals for new connections with the defaults (lb's configuration and the hosts'
/// TCP settings): per new-connection load, lb ≥ 0.95× the direct path, lb ahead of nftables,
/// and the backends' PAWS rejections under lb < 0.1% of its connections. Reported, never
/// enforced: the benchmark's exit status does not depend on them.
pub fn goals(results: &Results) -> Vec<(Met, String)> {
    let mut list = Vec::new();
    let judge = |measured: Option<bool>| match measured {
        Some(true) => Met::Yes,
        Some(false) => Met::No,
        None => Met::NotMeasured,
    };
    for (load, from) in [
        (Load::NewConnections, "1 client host"),
        (Load::NewConnectionsFourClients, "4 client hosts"),
    ] {
        let ours = median_of(results, Contender::Xdp, load);
        let direct = median_of(results, Contender::Direct, load);
        let nft = median_of(results, Contender::Nftables, load);
        let figure = |v: Option<f64>| v.map_or("–".into(), number);
        list.push((
            judge(ours.zip(direct).map(|(o, d)| o >= 0.95 * d)),
            format!(
                "new connections/s with the defaults from {from} ≥ 0.95× direct: lb {}, direct {} ({})",
                figure(ours),
                figure(direct),
                ratio(ours, direct)
            ),
        ));
        list.push((
            judge(ours.zip(nft).map(|(o, n)| o > n)),
            format!(
                "new connections/s with the defaults from {from} ahead of nftables: lb {}, nftables {} ({})",
                figure(ours),
                figure(nft),
                ratio(ours, nft)
            ),
        ));
        let paws = match results.cell(Contender::Xdp, load) {
            Some(Cell::Measured(m)) => m.paws_timewait.zip(Some(m.requests)),
            _ => None,
        };
        list.push((
            judge(paws.map(|(p, r)| r > 0 && (p as f64) < 0.001 * r as f64)),
            format!(
                "lb's PAWS rejections from {from} < 0.1% of connections: {}",
                paws.map_or("–".into(), |(p, r)| format!(
                    "{} of {} connections",
                    share(p, r),
                    count(r)
                ))
            ),
        ));
    }
    list
}

/// The goals as markdown list lines.
pub fn goals_text(results: &Results) -> String {
    let mut t = String::new();
    for (met, goal) in goals(results) {
        let status = match met {
            Met::Yes => "met",
            Met::No => "NOT MET",
            Met::NotMeasured => "not measured",
        };
        let _ = writeln!(t, "- {status}: {goal}");
    }
    t
}

pub fn markdown(results: &Results, command: &str) -> String {
    let m = &results.machine;
    let mut r = format!(
        "# lb benchmark, {}\n\n\
         Machine: {} CPUs ({}), {:.0} GiB, kernel {}. Mode: {}, {} runs of {} s per figure; \
         the whole run took {:.0} s. Reproduce with `{command}`.\n\n\
         Every figure is the median of the runs, with [min–max]; ratios compare medians. All \
         contenders run in turn in the same balancer namespace, on the same veth wires, in \
         front of the same two backends (nginx for HTTP, `lb-bench udp-echo` for UDP) with \
         weights 4:6; the client runs wrk (5 threads; 50 connections, or 5 for bulk) and \
         `lb-bench udp-load` (20 flows, 8 requests in flight each); for the four-client load, \
         four other client hosts (each its own address, routed through the client's \
         namespace) run wrk at once (2 threads, 8 connections each). New-connection loads \
         run {} s per run. Clients and backends send full checksums (`ethtool -K tx off`, \
         which also turns TSO off) for every contender alike, since native XDP cannot finish \
         partial checksums on veth. Everything runs with its defaults: lb's configuration \
         names only its interfaces and services, and every host keeps the kernel's TCP \
         settings, timestamps offset by a hash of each connection's addresses and ports \
         included: a backend refuses a SYN that reuses the addresses and ports of a \
         connection in its TIME_WAIT with an older timestamp (the backends' PAWS rejections; \
         a balancer that maps another client port onto that source port sends one about half \
         of the time), and the client sends that SYN again (the clients' SYN retransmits). The client hosts alone reuse their own \
         TIME_WAIT ports (`net.ipv4.tcp_tw_reuse=1`), as load generators are tuned.\n\n\
         The loads named \"containers\" run on another network, the single-host deployment: \
         the two backends are containers (namespaces on veths) on a bridge of the balancer's \
         host, with their default offloads (partial checksums, TSO; lb's tc program on the \
         bridge's ports), the client outside; \"from the host\" is wrk in the balancer's own \
         namespace (for lb, balanced by its socket hooks; for nftables, an output-hook DNAT; \
         the proxies listen there). Their new-connection runs last as long as the others.\n\n\
         \"lb DSR\" is lb in `mode = \"dsr\"` (L2) on the two-arm network: the backends hold the \
         VIP on their loopback and answer the clients over a second link of the client \
         namespace on their segment, so a download's data skips the balancer (its UDP and \
         containers cells do not apply).\n\n\
         \"lb IPv6\" is lb with the same services on an IPv6 VIP (NAT66), on each network \
         with IPv6 beside IPv4 (fd00::/8): the clients, the extra client hosts, the containers \
         and the host's own clients reach each other over IPv6.\n\n\
         ## Summary\n\n{}\n\
         ## Goals\n\n{}\n",
        m.date,
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.mode,
        super::RUNS,
        m.seconds_per_run,
        results.elapsed_s,
        m.new_connection_seconds_per_run,
        summary_table(results),
        goals_text(results),
    );
    for (name, why) in &results.absent {
        let _ = writeln!(r, "{name}: {why}; not measured.\n");
    }
    let behind = behind(results);
    if behind.is_empty() {
        r += "lb is ahead of every other balancer on every load, and within 10% of the direct path.\n\n";
    } else {
        r += "Where lb is not ahead of every peer, or not within 10% of the direct path (see \
              the README's benchmark section for why and what it would take):\n\n";
        for b in &behind {
            let _ = writeln!(r, "- {b}");
        }
        r += "\n";
    }
    r += "![main figures relative to the direct path](chart.svg)\n\n## End to end\n\n";
    for load in Load::ALL {
        let _ = writeln!(
            r,
            "### {} ({})\n\n{}",
            load.label(),
            load.unit(),
            detail_table(results, load)
        );
        if let Some(Cell::Measured(m)) = results.cell(Contender::Xdp, load) {
            let moved: Vec<String> = m
                .lb_counters
                .iter()
                .map(|(n, v)| format!("{n} {v}"))
                .collect();
            let _ = writeln!(
                r,
                "lb's pass and drop counters over these runs: {}.\n",
                if moved.is_empty() {
                    "none moved".to_owned()
                } else {
                    moved.join(", ")
                }
            );
        }
    }
    r += "Balancer CPU: for lb, the XDP program's run time (kernel BPF statistics) plus the \
          daemon's own CPU; for the proxies, their processes' user and system time. nftables \
          works in softirq context, which is not attributable to the balancer namespace; its \
          cost shows in the machine's softirq share. The BPF statistics add two clock reads to \
          every run of the program while the benchmark runs.\n\n";
    r += "## The XDP program alone (BPF_PROG_TEST_RUN)\n\n";
    match &results.micro {
        Ok(micro) => {
            let levels: Vec<u64> = {
                let mut l: Vec<u64> = micro.figures.iter().map(|f| f.connections).collect();
                l.dedup();
                l
            };
            r += "| path | ";
            r += &levels
                .iter()
                .map(|l| format!("{} connections (ns/packet)", number(*l as f64)))
                .collect::<Vec<_>>()
                .join(" | ");
            r += " |\n|---|";
            r += &"---:|".repeat(levels.len());
            r += "\n";
            for path in MicroPath::ALL {
                let _ = write!(r, "| {} |", path.label());
                for l in &levels {
                    let cell = micro
                        .figures
                        .iter()
                        .find(|f| f.path == path && f.connections == *l)
                        .map_or("–".into(), |f| spread(&f.ns_per_packet));
                    let _ = write!(r, " {cell} |");
                }
                r += "\n";
            }
            let _ = write!(
                r,
                "| daemon: one read of the backends' connection counts (ms) |"
            );
            for l in &levels {
                let cell = micro
                    .sweeps
                    .iter()
                    .find(|s| s.connections == *l)
                    .map_or("–".into(), |s| spread(&s.ms));
                let _ = write!(r, " {cell} |");
            }
            let _ = write!(
                r,
                "\n\nA connection holds two table entries. Hot paths repeat one flow's packet \
                 {} times a call through a ping-pong pair of entries (the second rewrites the \
                 first's output back into its input, along the same path), so they show the \
                 cost per packet with the flow in the caches. Random-flow paths pick a random \
                 connection of the table for each call, so its lookups miss the caches as real \
                 traffic over many flows does; they and the new-flow path are timed one call at \
                 a time ({} calls a round) less the per-call overhead of the same path (one-call \
                 time minus repeated time of the hot flow; {:.0} ns for the established path). \
                 The pass path is the mean over {} repeats. Times include the FIB lookup and \
                 the redirect decision, not the transmit. The daemon's read is what it does \
                 once a second to learn each backend's connections: one per-CPU counter per \
                 backend, whatever the size of the table.\n",
                micro.ping_pong_repeats,
                micro.calls_per_round,
                micro.call_overhead_ns,
                number(f64::from(micro.repeats_per_round))
            );
            peer_method_table(&mut r, &micro.peer_method);
            forwarding_table(&mut r, &micro.forwarding);
            let (connections, ms, passes) = micro.expiry_pass;
            let _ = writeln!(
                r,
                "\nThe in-kernel expiry's pass over the table ({} connections, {} entries), once \
                 a second in softirq: {ms:.2} ms (mean of {passes} passes).",
                number(connections as f64),
                number((connections * 2) as f64),
            );
        }
        Err(e) => {
            let _ = writeln!(r, "FAILED: {e}");
        }
    }
    r
}

/// A bar chart, one panel per load: each contender's median relative to the direct path.
pub fn chart_svg(results: &Results) -> String {
    const PANEL_W: f64 = 300.0;
    const PANEL_H: f64 = 260.0;
    const TOP: f64 = 64.0;
    const BAR_AREA: f64 = 170.0;
    let colours = [
        "#888888", "#d62728", "#ff7f0e", "#e377c2", "#1f77b4", "#2ca02c", "#9467bd",
    ];
    let width = PANEL_W * Load::ALL.len() as f64 + 20.0;
    let height = TOP + PANEL_H;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\">lb benchmark, {}: median of each contender, relative to the direct path (= 100%)</text>\n",
        xml(&results.machine.date)
    );
    for (i, (c, colour)) in Contender::ALL.iter().zip(colours).enumerate() {
        let x = 10.0 + i as f64 * 180.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"30\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{}\" y=\"39\">{}</text>",
            x + 14.0,
            xml(c.label())
        );
    }
    for (p, load) in Load::ALL.iter().enumerate() {
        let x0 = 10.0 + p as f64 * PANEL_W;
        let y0 = TOP + 20.0;
        let direct = median_of(results, Contender::Direct, *load);
        let values: Vec<Option<f64>> = Contender::ALL
            .iter()
            .map(|c| median_of(results, *c, *load))
            .collect();
        let max = values
            .iter()
            .flatten()
            .fold(direct.unwrap_or(0.0), |m, v| m.max(*v))
            .max(f64::MIN_POSITIVE);
        let _ = writeln!(
            s,
            "<text x=\"{x0}\" y=\"{}\" font-size=\"12\">{}</text>\n\
             <text x=\"{x0}\" y=\"{y0}\" font-size=\"11\" fill=\"#555\">{}</text>",
            y0 - 14.0,
            xml(load.label()),
            load.unit()
        );
        let base = y0 + 20.0 + BAR_AREA;
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
            x0 + PANEL_W - 30.0
        );
        let bar_w = (PANEL_W - 40.0) / Contender::ALL.len() as f64;
        for (i, (v, colour)) in values.iter().zip(colours).enumerate() {
            let x = x0 + 5.0 + i as f64 * bar_w;
            match v {
                Some(v) => {
                    let h = BAR_AREA * v / max;
                    let pct = direct.map_or(String::new(), |d| format!("{:.0}%", v / d * 100.0));
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{colour}\"/>\n\
                         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{pct}</text>\n\
                         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                        base - h,
                        bar_w - 6.0,
                        x + (bar_w - 6.0) / 2.0,
                        base - h - 4.0,
                        x + (bar_w - 6.0) / 2.0,
                        base + 12.0,
                        number(*v)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">n/a</text>",
                        x + (bar_w - 6.0) / 2.0,
                        base - 4.0
                    );
                }
            }
        }
    }
    s += "</svg>\n";
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Entry, Machine};

    fn cell(v: f64) -> Cell {
        let s = Summary::of(&[v * 0.9, v, v * 1.1]).expect("samples");
        Cell::Measured(Box::new(Measured {
            value: s,
            p50_ms: Some(s),
            p99_ms: None,
            errors: 0,
            requests: 10_000,
            paws_timewait: Some(5),
            syn_retrans: Some(7),
            xdp_ns_per_packet: None,
            balancer_cpu: None,
            machine_busy: s,
            machine_softirq: s,
            device_drops: 0,
            lb_counters: vec![],
        }))
    }

    fn results(ours: f64) -> Results {
        let mut entries = Vec::new();
        for load in Load::ALL {
            for (c, v) in [
                (Contender::Direct, 100.0),
                (Contender::Xdp, ours),
                (Contender::XdpDsr, 110.0),
                (Contender::XdpIpv6, 90.0),
                (Contender::Nftables, 80.0),
                (Contender::Nginx, 50.0),
            ] {
                entries.push(Entry {
                    contender: c,
                    load,
                    cell: cell(v),
                    runs: vec![],
                });
            }
            entries.push(Entry {
                contender: Contender::Haproxy,
                load,
                cell: Cell::NotApplicable("no UDP".into()),
                runs: vec![],
            });
        }
        Results {
            machine: Machine {
                date: "2026-11-30 <test>".into(),
                kernel: "6.18".into(),
                cpus: 2,
                cpu_model: "test".into(),
                memory_gib: 24.0,
                mode: "quick".into(),
                seconds_per_run: 1.0,
                new_connection_seconds_per_run: 1.0,
            },
            micro: Err("not run".into()),
            entries,
            absent: vec![],
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn summary_table_has_ratios_to_direct() {
        let t = summary_table(&results(95.0));
        assert!(
            t.contains("| 100 | 95.0 (0.95×) | 110 (1.10×) | 90.0 (0.90×) | 80.0 (0.80×) | n/a | 50.0 (0.50×) |"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 2 + Load::ALL.len());
    }

    #[test]
    fn behind_names_peers_ahead_and_the_gap_to_direct() {
        assert!(behind(&results(95.0)).is_empty());
        let list = behind(&results(70.0));
        // Per load: nftables ahead, and lb below 90% of direct.
        assert_eq!(list.len(), 2 * Load::ALL.len(), "{list:?}");
        assert!(list[0].contains("nftables"));
    }

    #[test]
    fn chart_is_one_svg_with_every_contender_and_escaped_text() {
        let svg = chart_svg(&results(95.0));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for c in Contender::ALL {
            assert!(svg.contains(&xml(c.label())), "{}", c.label());
        }
        assert!(svg.contains("&lt;test&gt;") && !svg.contains("<test>"));
        assert!(svg.contains(">95%<"));
    }

    #[test]
    fn goals_are_judged_per_new_connection_load() {
        let met = |r: &Results| goals(r).iter().map(|g| g.0).collect::<Vec<_>>();
        // 5 PAWS rejections of 10,000 connections is 0.05%.
        assert_eq!(met(&results(95.0)), vec![Met::Yes; 6]);
        let mut behind = results(70.0);
        assert_eq!(
            met(&behind),
            [Met::No, Met::No, Met::Yes, Met::No, Met::No, Met::Yes]
        );
        behind.entries.retain(|e| {
            !(e.contender == Contender::Nftables && e.load == Load::NewConnectionsFourClients)
        });
        assert_eq!(met(&behind)[4], Met::NotMeasured);
        let text = goals_text(&behind);
        assert!(text.contains("- NOT MET: new connections/s with the defaults from 1 client host ≥ 0.95× direct: lb 70.0, direct 100 (0.70×)"), "{text}");
        assert!(text.contains("- met: lb's PAWS rejections from 4 client hosts < 0.1% of connections: 5 (0.05%) of 10,000 connections"), "{text}");
    }

    #[test]
    fn detail_table_counts_paws_for_new_connections_only() {
        let r = results(95.0);
        let t = detail_table(&r, Load::NewConnections);
        assert!(t.contains("| 0 / 10000 | 5 (0.05%) | 7 |"), "{t}");
        assert!(!detail_table(&r, Load::KeepAlive).contains("PAWS"));
        assert_eq!(share(3, 0), "3");
        assert_eq!(share(1, 1_000_000), "1 (<0.01%)");
        assert_eq!(share(250, 1000), "250 (25.0%)");
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(number(1234567.4), "1,234,567");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.2345), "1.23");
        assert_eq!(
            (count(5), count(12), count(1234)),
            ("5".into(), "12".into(), "1,234".into())
        );
    }
}
