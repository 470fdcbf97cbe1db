//! What a run costs: the machine's CPU (/proc/stat), the balancer namespace's processes
//! (/proc/PID/stat), the XDP program's own run time (the kernel's BPF statistics, switched
//! on for the benchmark's lifetime through BPF_ENABLE_STATS), and the hosts' TCP counters
//! (/proc/net/netstat, as `nstat` names them).

use std::os::fd::OwnedFd;

use crate::netns::Netns;

/// Jiffies of the whole machine, or of one CPU: (busy, softirq, total).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    busy: u64,
    softirq: u64,
    total: u64,
}

impl MachineCpu {
    /// The whole machine's.
    pub fn read() -> MachineCpu {
        Self::read_line("cpu")
    }

    /// CPU `cpu`'s alone.
    pub fn read_cpu(cpu: usize) -> MachineCpu {
        Self::read_line(&format!("cpu{cpu}"))
    }

    fn read_line(name: &str) -> MachineCpu {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        parse_proc_stat(&text, name)
    }

    /// (busy share, softirq share) between `self` and a later reading.
    pub fn shares_until(&self, later: &MachineCpu) -> (f64, f64) {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        (
            later.busy.saturating_sub(self.busy) as f64 / total,
            later.softirq.saturating_sub(self.softirq) as f64 / total,
        )
    }

    /// Whether time passed between `self` and a later reading: not if /proc/stat could not be
    /// read, or has no such line.
    pub fn advanced_to(&self, later: &MachineCpu) -> bool {
        later.total > self.total
    }
}

/// The line of /proc/stat named `name` ("cpu" for the whole machine, "cpu0" for one CPU):
/// user nice system idle iowait irq softirq steal ...; zeros if there is none.
pub fn parse_proc_stat(text: &str, name: &str) -> MachineCpu {
    let fields: Vec<u64> = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    MachineCpu {
        busy: total - get(3) - get(4),
        softirq: get(6),
        total,
    }
}

/// User plus system time, in seconds, of every process in `ns`.
pub fn namespace_cpu_seconds(ns: &Netns) -> f64 {
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &ns.name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.split_whitespace()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| process_ticks(&stat) as f64 / ticks)
        .sum()
}

/// utime + stime from a /proc/PID/stat line (fields 14 and 15; the name may hold spaces).
pub fn process_ticks(stat: &str) -> u64 {
    let Some(after_name) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// Frames the veth devices in `ns` dropped: ring overflows and failed XDP transmits (a frame
/// lost there is invisible to the balancer's own counters).
pub fn device_drops(ns: &Netns, devices: &[&str]) -> u64 {
    devices
        .iter()
        .map(|dev| {
            parse_device_drops(&String::from_utf8_lossy(
                &ns.try_sh(&format!("ethtool -S {dev}")).stdout,
            ))
        })
        .sum()
}

/// Sums `rx_queue_N_drops`, `rx_queue_N_xdp_tx_errors` and `tx_queue_N_xdp_xmit_errors` of
/// `ethtool -S` output.
pub fn parse_device_drops(text: &str) -> u64 {
    ethtool_counters(text)
        .filter(|(name, _)| {
            name.ends_with("_drops") && !name.ends_with("xdp_drops")
                || name.ends_with("xdp_tx_errors")
                || name.ends_with("xdp_xmit_errors")
        })
        .map(|(_, v)| v)
        .sum()
}

/// The named counters of `ethtool -S` output.
pub fn ethtool_counters(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter_map(|(name, v)| Some((name, v.trim().parse::<u64>().ok()?)))
}

/// The sum of the kernel counter `name` (nstat's name: `TcpExtPAWSTimewait`) over the
/// namespaces `hosts`, read from /proc/net/netstat and /proc/net/snmp inside each; a host
/// whose counters cannot be read adds 0.
pub fn kernel_counter(hosts: &[&Netns], name: &str) -> u64 {
    hosts
        .iter()
        .map(|ns| {
            let out = ns.try_sh("cat /proc/net/netstat /proc/net/snmp");
            parse_kernel_counters(&String::from_utf8_lossy(&out.stdout))
                .into_iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| v)
        })
        .sum()
}

/// The counters of /proc/net/netstat or /proc/net/snmp text, named as nstat names them (the
/// group and the field: `TcpExtPAWSTimewait`): each group is a line of names followed by a
/// line of values with the same `Group:` prefix. Negative values (Tcp MaxConn) are left out.
pub fn parse_kernel_counters(text: &str) -> Vec<(String, u64)> {
    let mut counters = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let (Some((group, names)), Some((value_group, values))) =
            (pair[0].split_once(':'), pair[1].split_once(':'))
        else {
            continue;
        };
        let values: Vec<&str> = values.split_whitespace().collect();
        let names: Vec<&str> = names.split_whitespace().collect();
        let numeric = |v: &[&str]| v.iter().all(|f| f.parse::<i64>().is_ok());
        if group != value_group
            || names.len() != values.len()
            || numeric(&names)
            || !numeric(&values)
        {
            continue;
        }
        for (name, value) in names.iter().zip(values) {
            if let Ok(v) = value.parse::<u64>() {
                counters.push((format!("{group}{name}"), v));
            }
        }
    }
    counters
}

/// Keeps the kernel's BPF run-time statistics on while alive.
pub struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    pub fn enable() -> Result<BpfStats, String> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| BpfStats { _fd: fd })
            .map_err(|e| format!("enabling BPF run-time statistics: {e}"))
    }
}

/// (run time ns, run count) summed over loaded programs named `name`.
pub fn program_runtime(name: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .fold((0, 0), |(t, c), p| {
            (t + p.run_time().as_nanos() as u64, c + p.run_count())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_shares() {
        let a = parse_proc_stat("cpu  100 0 50 800 50 0 10 0 0 0\ncpu0 1 2 3", "cpu");
        let b = parse_proc_stat("cpu  200 0 100 850 50 0 30 0 0 0\n", "cpu");
        let (busy, softirq) = a.shares_until(&b);
        // total grew by 100+50+50+20 = 220; idle by 50.
        assert!((busy - 170.0 / 220.0).abs() < 1e-9);
        assert!((softirq - 20.0 / 220.0).abs() < 1e-9);
        assert!(a.advanced_to(&b));
    }

    #[test]
    fn proc_stat_reads_one_cpus_line() {
        let text = |softirq: u64| {
            format!(
                "cpu  900 0 0 900 0 0 900 0 0 0\ncpu0 10 0 0 80 0 0 {softirq} 0 0 0\n\
                 cpu1 5 0 0 5 0 0 5 0 0 0\ncpu10 1 1 1 1 1 1 1 0 0 0\n"
            )
        };
        let (a, b) = (
            parse_proc_stat(&text(10), "cpu0"),
            parse_proc_stat(&text(110), "cpu0"),
        );
        let (busy, softirq) = a.shares_until(&b);
        assert!((busy - 1.0).abs() < 1e-9, "cpu0's softirq is its busy time");
        assert!((softirq - 1.0).abs() < 1e-9);
        let missing = parse_proc_stat(&text(10), "cpu2");
        assert!(!missing.advanced_to(&parse_proc_stat(&text(110), "cpu2")));
    }

    #[test]
    fn device_drops_count_losses_not_program_drops() {
        let text = "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_drops: 3\n     \
                    rx_queue_0_xdp_drops: 100\n     rx_queue_0_xdp_tx_errors: 4\n     \
                    tx_queue_0_xdp_xmit: 50\n     tx_queue_0_xdp_xmit_errors: 5\n";
        assert_eq!(parse_device_drops(text), 12);
        assert_eq!(parse_device_drops("garbage"), 0);
    }

    #[test]
    fn kernel_counters_pair_names_with_values() {
        let text = "TcpExt: SyncookiesSent PAWSTimewait TCPSynRetrans\n\
                    TcpExt: 0 1234 56\n\
                    IpExt: InNoRoutes InOctets\n\
                    IpExt: 7 8\n\
                    Tcp: RtoAlgorithm MaxConn ActiveOpens\n\
                    Tcp: 1 -1 99\n";
        let counters = parse_kernel_counters(text);
        let get = |name: &str| counters.iter().find(|(n, _)| n == name).map(|c| c.1);
        assert_eq!(get("TcpExtPAWSTimewait"), Some(1234));
        assert_eq!(get("TcpExtTCPSynRetrans"), Some(56));
        assert_eq!(get("IpExtInOctets"), Some(8));
        assert_eq!(get("TcpActiveOpens"), Some(99));
        assert_eq!(get("TcpMaxConn"), None);
        // A names line is never taken for values, nor a group for another's.
        assert_eq!(get("TcpExtInNoRoutes"), None);
        assert_eq!(counters.len(), 7, "{counters:?}");
        assert!(parse_kernel_counters("garbage\nTcpExt: 1 2\n").is_empty());
        assert!(parse_kernel_counters("TcpExt: A B\nTcpExt: 1\n").is_empty());
    }

    #[test]
    fn process_ticks_skip_names_with_spaces() {
        let stat = "42 (nginx: worker) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(process_ticks(stat), 12);
        assert_eq!(process_ticks("garbage"), 0);
    }
}
