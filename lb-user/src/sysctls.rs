//! The interface settings lb turns on, and puts back. bpf_fib_lookup needs forwarding on the
//! device a packet arrived on, and accept_local lets the kernel forward a packet passed up for
//! neighbour resolution, whose source is already our own SNAT address. Forwarding on makes the
//! host a router between those devices for every packet the data path passes (README,
//! "Firewall"). Each setting lb changes is recorded with its earlier value in the state
//! directory (the first one recorded wins: a restarted daemon finds the settings on already),
//! and `lb remove` puts them back. IPv6 services add IPv6's forwarding on the same devices
//! (`forwarding` for bpf_fib_lookup, `force_forwarding` for the kernel to forward a packet
//! passed up for neighbour resolution); a device forwarding IPv6 takes no router
//! advertisements unless its `accept_ra` is 2.

use std::{io, path::Path};

const RECORD: &str = "sysctls";
const IPV4_KNOBS: [&str; 2] = ["forwarding", "accept_local"];
const IPV6_KNOBS: [&str; 2] = ["ipv6_forwarding", "ipv6_force_forwarding"];
const KNOBS: [&str; 4] = [IPV4_KNOBS[0], IPV4_KNOBS[1], IPV6_KNOBS[0], IPV6_KNOBS[1]];

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot set {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot record the settings lb changed in {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One setting lb changed: `net.ipv4.conf.IFACE.KNOB` (`net.ipv6.conf.IFACE.K` for a knob
/// `ipv6_K`) was `before`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    pub iface: String,
    pub knob: String,
    pub before: String,
}

/// The record's lines, `IFACE KNOB BEFORE`; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Changed> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (iface, knob, before) = (words.next()?, words.next()?, words.next()?);
            KNOBS.contains(&knob).then(|| Changed {
                iface: iface.into(),
                knob: knob.into(),
                before: before.into(),
            })
        })
        .collect()
}

pub fn render(changed: &[Changed]) -> String {
    changed
        .iter()
        .map(|c| format!("{} {} {}\n", c.iface, c.knob, c.before))
        .collect()
}

/// `recorded` with `change` added, unless the same setting is recorded already (its first
/// earlier value is the one to put back).
pub fn merge(mut recorded: Vec<Changed>, change: Changed) -> Vec<Changed> {
    if !recorded
        .iter()
        .any(|c| c.iface == change.iface && c.knob == change.knob)
    {
        recorded.push(change);
    }
    recorded
}

/// The sysctl's name, `net.ipv4.conf.IFACE.KNOB` or `net.ipv6.conf.IFACE.K`.
pub fn name_of(iface: &str, knob: &str) -> String {
    match knob.strip_prefix("ipv6_") {
        Some(knob) => format!("net.ipv6.conf.{iface}.{knob}"),
        None => format!("net.ipv4.conf.{iface}.{knob}"),
    }
}

fn path_of(iface: &str, knob: &str) -> String {
    match knob.strip_prefix("ipv6_") {
        Some(knob) => format!("/proc/sys/net/ipv6/conf/{iface}/{knob}"),
        None => format!("/proc/sys/net/ipv4/conf/{iface}/{knob}"),
    }
}

/// Turns forwarding and accept_local on for `iface`, recording what it changes in
/// `state_dir`. Returns the sysctls it turned on.
pub fn enable(iface: &str, state_dir: &Path) -> Result<Vec<String>, SysctlError> {
    enable_knobs(iface, state_dir, &IPV4_KNOBS)
}

/// Turns IPv6's forwarding on for `iface`, as `enable`. A kernel without `force_forwarding`
/// (before 6.17) goes without it: its packets passed up for neighbour resolution need
/// `net.ipv6.conf.all.forwarding`.
pub fn enable_ipv6(iface: &str, state_dir: &Path) -> Result<Vec<String>, SysctlError> {
    enable_knobs(iface, state_dir, &IPV6_KNOBS)
}

fn enable_knobs(
    iface: &str,
    state_dir: &Path,
    knobs: &[&'static str],
) -> Result<Vec<String>, SysctlError> {
    let record = state_dir.join(RECORD);
    let mut turned_on = Vec::new();
    for &knob in knobs {
        let path = path_of(iface, knob);
        if knob == "ipv6_force_forwarding" && !Path::new(&path).exists() {
            continue;
        }
        let before = std::fs::read_to_string(&path).unwrap_or_default();
        let before = before.trim();
        if before == "1" {
            continue;
        }
        // Recorded first: a crash between the two must not lose the value to put back.
        let recorded = parse(&std::fs::read_to_string(&record).unwrap_or_default());
        let merged = merge(
            recorded,
            Changed {
                iface: iface.into(),
                knob: knob.into(),
                before: if before.is_empty() { "0" } else { before }.into(),
            },
        );
        let written = std::fs::create_dir_all(state_dir)
            .and_then(|()| std::fs::write(&record, render(&merged)));
        if let Err(source) = written {
            return Err(SysctlError::Record {
                path: record.display().to_string(),
                source,
            });
        }
        std::fs::write(&path, "1").map_err(|source| SysctlError::Write {
            path: path.clone(),
            source,
        })?;
        turned_on.push(name_of(iface, knob));
    }
    Ok(turned_on)
}

/// Puts back every setting recorded in `state_dir`, on the devices that still exist. Returns
/// what it put back, as `net.ipv4.conf.IFACE.KNOB=VALUE`.
pub fn restore(state_dir: &Path) -> Result<Vec<String>, SysctlError> {
    let record = state_dir.join(RECORD);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return Ok(Vec::new());
    };
    let mut restored = Vec::new();
    for c in parse(&text) {
        let path = path_of(&c.iface, &c.knob);
        match std::fs::write(&path, &c.before) {
            Ok(()) => restored.push(format!("{}={}", name_of(&c.iface, &c.knob), c.before)),
            // A container's veth that went away takes its settings with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SysctlError::Write { path, source }),
        }
    }
    let _ = std::fs::remove_file(&record);
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(iface: &str, knob: &str, before: &str) -> Changed {
        Changed {
            iface: iface.into(),
            knob: knob.into(),
            before: before.into(),
        }
    }

    #[test]
    fn the_first_value_recorded_is_the_one_put_back() {
        let once = merge(Vec::new(), changed("eth0", "forwarding", "0"));
        // A restarted daemon finds it on: it records nothing new, and "1" never replaces "0".
        let again = merge(once.clone(), changed("eth0", "forwarding", "1"));
        assert_eq!(again, once);
        let more = merge(again, changed("eth0", "accept_local", "0"));
        assert_eq!(more.len(), 2);
        assert_eq!(parse(&render(&more)), more);
    }

    #[test]
    fn ipv6_knobs_name_ipv6_sysctls() {
        assert_eq!(
            name_of("eth0", "forwarding"),
            "net.ipv4.conf.eth0.forwarding"
        );
        assert_eq!(
            name_of("eth0", "ipv6_force_forwarding"),
            "net.ipv6.conf.eth0.force_forwarding"
        );
        assert_eq!(
            path_of("eth0.100", "ipv6_forwarding"),
            "/proc/sys/net/ipv6/conf/eth0.100/forwarding"
        );
        let text = "eth0 ipv6_forwarding 0\n";
        assert_eq!(parse(text), [changed("eth0", "ipv6_forwarding", "0")]);
    }

    #[test]
    fn a_damaged_record_keeps_what_it_can() {
        let text = "eth0 forwarding 0\ngarbage\nvc1 accept_local 0\neth0 rp_filter 2\n";
        assert_eq!(
            parse(text),
            [
                changed("eth0", "forwarding", "0"),
                changed("vc1", "accept_local", "0")
            ]
        );
    }
}
