//! `lb explain SERVICE CLIENT_IP:PORT`: which backend a flow from that client gets, and why.
//!
//! An existing flow is read from the flow table. A new one is worked out as the data path
//! does it (lb-ebpf's `select.rs`): the flow hash picks a slot of the service's live Maglev
//! table, read from the map itself, and a suspect backend there is passed over for the next
//! slots' first unmarked one. The daemon gathers the inputs under its lock; the choice and the
//! text are here, without a kernel.

use serde::{Deserialize, Serialize};

use lb_common::NO_BACKEND;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub service: String,
    pub vip: String,
    pub protocol: String,
    pub client: String,
    /// The flow the table holds for this client, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<ExistingFlow>,
    /// What a new flow (a SYN, or a UDP datagram without a flow) from the client gets.
    pub new_flow: NewFlow,
    /// The service's backends, as the daemon and the table see them.
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistingFlow {
    pub backend: String,
    /// Its connection-tracking state (`lb status`'s names).
    pub state: String,
    /// The source address and port the backend sees.
    pub snat: String,
    /// Since the flow's last packet (refreshed at most once a second by the data path).
    pub idle_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFlow {
    /// The backend, or None: new flows from this client are dropped (`no_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
    /// The slot's own backend, when a suspect mark made the data path pass it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered_off: Option<String>,
    /// Slots the data path walked past the hashed one.
    #[serde(default)]
    pub slots_walked: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    pub suspect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
    /// The share of the live table's slots it holds, in percent.
    pub table_percent: f64,
}

// The share is a count of slots over their number: never NaN.
impl Eq for BackendView {}

/// The data path's choice from a hashed slot onwards: `slots[0]` is the hashed slot's backend
/// id, then the ids of the slots after it (lb-common's SUSPECT_PROBES of them). The result is
/// the chosen id (None: no backend), how many slots were walked, and the passed-over id.
pub fn choose(slots: &[u32], is_suspect: impl Fn(u32) -> bool) -> (Option<u32>, u32, Option<u32>) {
    let Some(&first) = slots.first() else {
        return (None, 0, None);
    };
    if first == NO_BACKEND {
        return (None, 0, None);
    }
    if !is_suspect(first) {
        return (Some(first), 0, None);
    }
    for (step, &id) in slots.iter().enumerate().skip(1) {
        if id != NO_BACKEND && !is_suspect(id) {
            return (Some(id), step as u32, Some(first));
        }
    }
    // No unmarked backend in reach: the suspect one is still the best there is.
    (Some(first), 0, None)
}

/// Each id's share of `table`, in percent.
pub fn table_percent(table: &[u32], id: u32) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    let held = table.iter().filter(|&&slot| slot == id).count();
    100.0 * held as f64 / table.len() as f64
}

/// The text `lb explain` prints.
pub fn render(e: &Explanation) -> String {
    let mut out = format!(
        "service {} ({} {}), client {}\n",
        e.service, e.vip, e.protocol, e.client
    );
    if let Some(flow) = &e.existing {
        out += &format!(
            "existing flow: backend {} ({}, seen by the backend as {}, idle {:.1} s)\n",
            flow.backend,
            flow.state,
            flow.snat,
            flow.idle_ms as f64 / 1000.0
        );
        if matches!(flow.state.as_str(), "time_wait" | "closed") {
            out += "  it is closing: a new connection from this port is balanced anew, as below\n";
        }
    } else {
        out += "existing flow: none\n";
    }
    let n = &e.new_flow;
    match &n.backend {
        Some(backend) => out += &format!("new flow: backend {backend}\n"),
        None => out += "new flow: dropped, no backend takes new flows\n",
    }
    out += &format!(
        "  flow hash {:#010x} -> Maglev slot {} of {}\n",
        n.hash, n.slot, n.table_size
    );
    if let Some(off) = &n.steered_off {
        out += &format!(
            "  the slot's backend {off} is suspect: passed over for the next slot's unmarked one, {} slot(s) on\n",
            n.slots_walked
        );
    }
    out += "backends:\n";
    let width = e
        .backends
        .iter()
        .map(|b| b.address.len())
        .max()
        .unwrap_or(0)
        .max(7);
    out += &format!(
        "  {:<width$}  WEIGHT  HEALTH  SUSPECT  SLOW-START  TABLE\n",
        "ADDRESS"
    );
    for b in &e.backends {
        out += &format!(
            "  {:<width$}  {:>6}  {:<6}  {:<7}  {:>10}  {:>5.1}%\n",
            b.address,
            b.weight,
            if b.healthy { "up" } else { "down" },
            if b.suspect { "yes" } else { "no" },
            b.slow_start_percent
                .map_or("-".to_owned(), |p| format!("{p}%")),
            b.table_percent
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmarked_slot_is_taken_as_it_is() {
        assert_eq!(choose(&[3, 4, 5], |_| false), (Some(3), 0, None));
    }

    #[test]
    fn a_suspect_slot_is_passed_over_for_the_next_unmarked_one() {
        assert_eq!(
            choose(&[3, 3, NO_BACKEND, 4, 5], |id| id == 3),
            (Some(4), 3, Some(3))
        );
    }

    #[test]
    fn a_suspect_backend_with_no_other_in_reach_is_kept() {
        assert_eq!(choose(&[3, 3, 3], |id| id == 3), (Some(3), 0, None));
    }

    #[test]
    fn an_empty_table_has_no_backend() {
        assert_eq!(
            choose(&[NO_BACKEND, NO_BACKEND], |_| false),
            (None, 0, None)
        );
        assert_eq!(choose(&[], |_| false), (None, 0, None));
    }

    #[test]
    fn shares_count_slots() {
        assert_eq!(table_percent(&[1, 2, 2, 2], 2), 75.0);
        assert_eq!(table_percent(&[], 2), 0.0);
    }

    #[test]
    fn the_text_names_the_choice_and_the_steering() {
        let e = Explanation {
            service: "web".into(),
            vip: "198.18.100.1:80".into(),
            protocol: "tcp".into(),
            client: "198.18.0.2:40000".into(),
            existing: Some(ExistingFlow {
                backend: "198.18.1.2:8080".into(),
                state: "time_wait".into(),
                snat: "198.18.1.1:10001".into(),
                idle_ms: 1500,
            }),
            new_flow: NewFlow {
                backend: Some("198.18.1.3:8080".into()),
                hash: 0xdead_beef,
                slot: 42,
                table_size: 65537,
                steered_off: Some("198.18.1.2:8080".into()),
                slots_walked: 1,
            },
            backends: vec![BackendView {
                address: "198.18.1.2:8080".into(),
                weight: 4,
                healthy: true,
                suspect: true,
                slow_start_percent: Some(50),
                table_percent: 40.0,
            }],
        };
        let text = render(&e);
        for want in [
            "existing flow: backend 198.18.1.2:8080 (time_wait, seen by the backend as 198.18.1.1:10001, idle 1.5 s)",
            "balanced anew",
            "new flow: backend 198.18.1.3:8080",
            "flow hash 0xdeadbeef -> Maglev slot 42 of 65537",
            "198.18.1.2:8080 is suspect",
            "       4  up      yes             50%   40.0%",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
