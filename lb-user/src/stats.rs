//! `lb stats`: per-second rates between two status readings of the daemon. Pure: the CLI
//! fetches the readings and prints what this computes.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::control::{FlowTableStatus, Status};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the two readings.
    pub seconds: f64,
    pub services: Vec<ServiceRates>,
    pub flows: FlowTableStatus,
    /// Pass, drop and forwarding counters, per second.
    pub counters: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceRates {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub backends: Vec<BackendRates>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRates {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    /// Up, with new flows steered off it (`lb status` says so too).
    pub suspect: bool,
    pub active_flows: u64,
    pub new_flows_per_s: f64,
    pub packets_per_s: f64,
    pub bits_per_s: f64,
}

/// The change from `before` to `after` over `seconds`, for what `after` holds. A counter that
/// went down (the daemon restarted in between) counts as no change, not as a negative rate.
pub fn rates(before: &Status, after: &Status, seconds: f64) -> Rates {
    let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / seconds.max(f64::MIN_POSITIVE);
    let services = after
        .services
        .iter()
        .map(|s| {
            let old = before.services.iter().find(|o| o.name == s.name);
            ServiceRates {
                name: s.name.clone(),
                vip: s.vip.clone(),
                protocol: s.protocol.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let prev =
                            old.and_then(|o| o.backends.iter().find(|p| p.address == b.address));
                        let (new_flows, packets, bytes) = prev
                            .map_or((b.new_flows, b.packets, b.bytes), |p| {
                                (p.new_flows, p.packets, p.bytes)
                            });
                        BackendRates {
                            address: b.address.clone(),
                            weight: b.weight,
                            healthy: b.healthy,
                            suspect: b.suspect,
                            active_flows: b.active_flows,
                            new_flows_per_s: per_s(b.new_flows, new_flows),
                            packets_per_s: per_s(b.packets, packets),
                            bits_per_s: per_s(b.bytes, bytes) * 8.0,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let counters = after
        .counters
        .iter()
        .map(|(name, &n)| {
            let old = before.counters.get(name).copied().unwrap_or(n);
            (name.clone(), per_s(n, old))
        })
        .collect();
    Rates {
        seconds,
        services,
        flows: after.flows.clone(),
        counters,
    }
}

pub fn render(r: &Rates) -> String {
    let mut out = String::new();
    for s in &r.services {
        let _ = writeln!(out, "service {} {}/{}", s.name, s.vip, s.protocol);
        let _ = writeln!(
            out,
            "  {:<22} {:>6} {:<7} {:>8} {:>12} {:>12} {:>12}",
            "backend", "weight", "health", "active", "new flows/s", "packets/s", "Mbit/s"
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  {:<22} {:>6} {:<7} {:>8} {:>12.1} {:>12.1} {:>12.3}",
                b.address,
                b.weight,
                crate::control::health_word(b.healthy, b.suspect),
                b.active_flows,
                b.new_flows_per_s,
                b.packets_per_s,
                b.bits_per_s / 1e6
            );
        }
    }
    let _ = writeln!(
        out,
        "flow table: {} of {} entries",
        r.flows.entries, r.flows.capacity
    );
    let moving: Vec<String> = r
        .counters
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k}={v:.1}/s"))
        .collect();
    let _ = writeln!(
        out,
        "packets: {}",
        if moving.is_empty() {
            "none".to_owned()
        } else {
            moving.join(" ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(new_flows: u64, packets: u64, bytes: u64, drops: u64) -> Status {
        crate::control::sample_status(new_flows, packets, bytes, drops)
    }

    #[test]
    fn rates_per_second() {
        let r = rates(&status(10, 100, 1000, 1), &status(30, 300, 3000, 5), 2.0);
        let b = &r.services[0].backends[0];
        assert_eq!(
            (b.new_flows_per_s, b.packets_per_s, b.bits_per_s),
            (10.0, 100.0, 8000.0)
        );
        assert_eq!(b.active_flows, 7);
        assert_eq!(r.counters["drop_tcp_no_flow"], 2.0);
        let text = render(&r);
        assert!(text.contains("drop_tcp_no_flow=2.0/s"), "{text}");
        assert!(text.contains("198.18.1.11:8000"), "{text}");
    }

    /// As `lb status` says: a suspect backend is not shown `up`.
    #[test]
    fn a_suspect_backend_is_shown_suspect() {
        let mut after = status(30, 300, 3000, 5);
        after.services[0].backends[0].suspect = true;
        let r = rates(&status(10, 100, 1000, 1), &after, 1.0);
        assert!(r.services[0].backends[0].suspect);
        let text = render(&r);
        let row = text
            .lines()
            .find(|l| l.contains("198.18.1.11:8000"))
            .expect("the backend's row");
        assert!(row.contains(" suspect "), "{text}");
        after.services[0].backends[0].healthy = false;
        let text = render(&rates(&status(10, 100, 1000, 1), &after, 1.0));
        assert!(text.contains(" down "), "{text}");
    }

    #[test]
    fn a_restarted_daemon_or_a_new_backend_is_no_negative_rate() {
        let r = rates(&status(30, 300, 3000, 5), &status(10, 100, 1000, 1), 1.0);
        let b = &r.services[0].backends[0];
        assert_eq!((b.new_flows_per_s, b.packets_per_s), (0.0, 0.0));
        assert_eq!(r.counters["drop_tcp_no_flow"], 0.0);
        let mut empty = status(0, 0, 0, 0);
        empty.services.clear();
        let r = rates(&empty, &status(30, 300, 3000, 5), 1.0);
        assert_eq!(r.services[0].backends[0].new_flows_per_s, 0.0);
    }
}
