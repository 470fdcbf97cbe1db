//! `lb stats` and `lb top`: per-second rates between two status readings of the daemon. Pure:
//! the CLI fetches the readings and prints what this computes.

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
    let _ = writeln!(out, "packets: {}", words_or(&moving, "none"));
    out
}

/// `items` joined by spaces, or `empty` when there are none.
pub fn words_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_owned()
    } else {
        items.join(" ")
    }
}

/// Width of `lb top`'s share bars, in characters.
const BAR_WIDTH: usize = 20;

/// One frame of `lb top`: per backend its weight's share of the service and its share of the
/// new flows of the last interval side by side (a bar each), health, active flows and rates;
/// then the flow table, the warnings, and the drop reasons that moved, busiest first.
pub fn top_screen(r: &Rates, warnings: &[String], title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let bar = |percent: f64| {
        let filled = ((percent / 100.0) * BAR_WIDTH as f64).round() as usize;
        let filled = filled.min(BAR_WIDTH);
        format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled))
    };
    for s in &r.services {
        let weights: u64 = s
            .backends
            .iter()
            .filter(|b| b.healthy)
            .map(|b| u64::from(b.weight))
            .sum();
        let new_flows: f64 = s.backends.iter().map(|b| b.new_flows_per_s).sum();
        let _ = writeln!(
            out,
            "\n{} {}/{}  {:.1} new flows/s",
            s.name, s.vip, s.protocol, new_flows
        );
        let _ = writeln!(
            out,
            "  {:<22} {:<8} {:>6} {:<27} {:<27} {:>8} {:>9}",
            "BACKEND", "HEALTH", "WEIGHT", "WEIGHT SHARE", "NEW-FLOW SHARE", "ACTIVE", "Mbit/s"
        );
        for b in &s.backends {
            let weight_share = if b.healthy && weights > 0 {
                100.0 * f64::from(b.weight) / weights as f64
            } else {
                0.0
            };
            let flow_share = if new_flows > 0.0 {
                100.0 * b.new_flows_per_s / new_flows
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  {:<22} {:<8} {:>6} {} {:>5.1}% {} {:>5.1}% {:>8} {:>9.3}",
                b.address,
                crate::control::health_word(b.healthy, b.suspect),
                b.weight,
                bar(weight_share),
                weight_share,
                bar(flow_share),
                flow_share,
                b.active_flows,
                b.bits_per_s / 1e6
            );
        }
    }
    let _ = writeln!(
        out,
        "\nflow table: {} of {} entries",
        r.flows.entries, r.flows.capacity
    );
    for warning in warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let mut drops: Vec<(&String, f64)> = r
        .counters
        .iter()
        .filter(|(name, v)| name.starts_with("drop_") && **v > 0.0)
        .map(|(name, v)| (name, *v))
        .collect();
    drops.sort_by(|a, b| b.1.total_cmp(&a.1));
    let drops: Vec<String> = drops
        .iter()
        .take(5)
        .map(|(name, v)| format!("{}={v:.1}/s", &name["drop_".len()..]))
        .collect();
    let _ = writeln!(out, "drops: {}", words_or(&drops, "none"));
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
    fn top_sets_the_new_flow_share_beside_the_weight_share() {
        let mut before = status(0, 0, 0, 0);
        let mut second = before.services[0].backends[0].clone();
        second.address = "198.18.1.12:8000".into();
        second.weight = 3;
        before.services[0].backends[0].weight = 1;
        before.services[0].backends.push(second);
        before.counters.insert("drop_no_backend".into(), 0);
        let mut after = before.clone();
        after.services[0].backends[0].new_flows = 25;
        after.services[0].backends[1].new_flows = 75;
        after.counters.insert("drop_tcp_no_flow".into(), 4);
        after.counters.insert("drop_no_backend".into(), 10);
        let r = rates(&before, &after, 1.0);
        let text = top_screen(&r, &["flow table full".into()], "lb top");
        let row = |addr: &str| {
            text.lines()
                .find(|l| l.contains(addr))
                .unwrap_or_else(|| panic!("{addr} in\n{text}"))
                .to_owned()
        };
        // Weight 1 of 4, and a quarter of the new flows: five of twenty characters each.
        let first = row("198.18.1.11:8000");
        assert!(
            first.contains("#####...............  25.0% #####...............  25.0%"),
            "{text}"
        );
        assert!(row("198.18.1.12:8000").contains("75.0%"), "{text}");
        assert!(text.contains("100.0 new flows/s"), "{text}");
        assert!(text.contains("warning: flow table full"), "{text}");
        assert!(
            text.contains("drops: no_backend=10.0/s tcp_no_flow=4.0/s"),
            "{text}"
        );
        // A down backend has no share of the weights.
        after.services[0].backends[1].healthy = false;
        let text = top_screen(&rates(&before, &after, 1.0), &[], "lb top");
        assert!(
            text.contains(".................... 100.0%")
                || text.contains("#################### 100.0%"),
            "{text}"
        );
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
