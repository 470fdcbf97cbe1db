//! The SNAT port range kept out of the kernel's own ephemeral ports, through
//! net.ipv4.ip_local_reserved_ports. The reservation outlives the daemon as the pinned data
//! path does (a host connection must not take a port a balanced flow holds). Only the ports lb
//! added are recorded in the state directory: a range changed later gives back what it no
//! longer covers, and `lb remove` gives back what lb added, never what the admin had reserved.

use std::{ops::RangeInclusive, path::Path};

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RECORD: &str = "reserved-ports";

#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "snat_ports {min}-{max} would take every ephemeral port of this host ({lo}-{hi}), leaving none for its health checks; narrow snat_ports or move net.ipv4.ip_local_port_range"
    )]
    NoEphemeralPorts {
        min: u16,
        max: u16,
        lo: u16,
        hi: u16,
    },
}

/// `a-b,c,d-e` as the kernel prints it, into ranges; unparsable items are skipped.
pub fn parse_list(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
            (a <= b).then_some(a..=b)
        })
        .collect()
}

fn render(ranges: &[RangeInclusive<u16>]) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect();
    items.join(",")
}

fn write(path: &str, value: &str) -> Result<(), PortsError> {
    std::fs::write(path, value).map_err(|source| PortsError::Write {
        path: path.into(),
        source,
    })
}

/// Ports as a set, one flag per port.
fn set_of(ranges: &[RangeInclusive<u16>]) -> Vec<bool> {
    let mut set = vec![false; 1 << 16];
    for r in ranges {
        for p in r.clone() {
            set[usize::from(p)] = true;
        }
    }
    set
}

/// A set of ports as the fewest ranges, in order.
fn ranges_of(set: &[bool]) -> Vec<RangeInclusive<u16>> {
    let mut out = Vec::new();
    let mut start = None;
    for (port, &on) in set.iter().enumerate() {
        match (on, start) {
            (true, None) => start = Some(port),
            (false, Some(s)) => {
                out.push(s as u16..=(port - 1) as u16);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(s as u16..=u16::MAX);
    }
    out
}

/// What a reservation of `want` changes: the kernel's new list, and lb's new record.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub reserved: Vec<RangeInclusive<u16>>,
    pub recorded: Vec<RangeInclusive<u16>>,
    /// Ports lb reserves now, and ports it gives back (an earlier range's it no longer needs).
    pub added: Vec<RangeInclusive<u16>>,
    pub given_back: Vec<RangeInclusive<u16>>,
}

/// `want` reserved, given the kernel's `current` list and what lb `recorded` adding before.
/// Recorded ports someone else unreserved since are no longer lb's to give back.
pub fn plan(
    current: &[RangeInclusive<u16>],
    recorded: &[RangeInclusive<u16>],
    want: &RangeInclusive<u16>,
) -> Plan {
    let (cur, rec, want) = (
        set_of(current),
        set_of(recorded),
        set_of(std::slice::from_ref(want)),
    );
    let ports = 0..cur.len();
    let owned: Vec<bool> = ports.clone().map(|p| rec[p] && cur[p]).collect();
    let given_back: Vec<bool> = ports.clone().map(|p| owned[p] && !want[p]).collect();
    let added: Vec<bool> = ports.clone().map(|p| want[p] && !cur[p]).collect();
    let reserved: Vec<bool> = ports
        .clone()
        .map(|p| (cur[p] && !given_back[p]) || want[p])
        .collect();
    let recorded: Vec<bool> = ports.map(|p| (owned[p] && want[p]) || added[p]).collect();
    Plan {
        reserved: ranges_of(&reserved),
        recorded: ranges_of(&recorded),
        added: ranges_of(&added),
        given_back: ranges_of(&given_back),
    }
}

/// Reserves `min..=max`, gives back what an earlier range of lb's reserved beyond it, and
/// records the ports lb reserved in `state_dir`.
pub fn reserve(min: u16, max: u16, state_dir: &Path) -> Result<(), PortsError> {
    // The host's own connections (health checks) need an ephemeral port outside the range.
    if let Some((lo, hi)) = std::fs::read_to_string(EPHEMERAL_PORTS).ok().and_then(|t| {
        let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    }) && min <= lo
        && hi <= max
    {
        return Err(PortsError::NoEphemeralPorts { min, max, lo, hi });
    }
    let current = parse_list(&std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default());
    let record = state_dir.join(RECORD);
    let recorded = parse_list(&std::fs::read_to_string(&record).unwrap_or_default());
    let plan = plan(&current, &recorded, &(min..=max));
    if plan.reserved != current {
        write(RESERVED_PORTS, &list_text(&plan.reserved))?;
    }
    if !plan.added.is_empty() {
        log::info!(
            "reserved SNAT ports {} from the kernel's ephemeral ports",
            render(&plan.added)
        );
    }
    if !plan.given_back.is_empty() {
        log::info!(
            "gave SNAT ports {} back to the kernel (snat_ports no longer covers them)",
            render(&plan.given_back)
        );
    }
    std::fs::create_dir_all(state_dir).map_err(|source| PortsError::Write {
        path: state_dir.display().to_string(),
        source,
    })?;
    write(
        &record.display().to_string(),
        &format!("{}\n", render(&plan.recorded)),
    )
}

/// The kernel's list as it is written: an empty one as a newline.
fn list_text(ranges: &[RangeInclusive<u16>]) -> String {
    let text = render(ranges);
    if text.is_empty() { "\n".into() } else { text }
}

/// Gives back the ports `reserve` recorded in `state_dir` (those still reserved). Returns
/// them, if there were any.
pub fn release(state_dir: &Path) -> Result<Option<String>, PortsError> {
    let record = state_dir.join(RECORD);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return Ok(None);
    };
    let current = parse_list(&std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default());
    let (cur, rec) = (set_of(&current), set_of(&parse_list(&text)));
    let owned: Vec<bool> = (0..cur.len()).map(|p| cur[p] && rec[p]).collect();
    let rest: Vec<bool> = (0..cur.len()).map(|p| cur[p] && !owned[p]).collect();
    let owned = ranges_of(&owned);
    if !owned.is_empty() {
        write(RESERVED_PORTS, &list_text(&ranges_of(&rest)))?;
    }
    let _ = std::fs::remove_file(&record);
    Ok((!owned.is_empty()).then(|| render(&owned)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_the_kernel_prints_them() {
        assert_eq!(
            parse_list("8080,20000-29999\n"),
            [8080..=8080, 20000..=29999]
        );
        assert_eq!(parse_list("\n"), []);
        assert_eq!(parse_list("x,5-3,7"), vec![7..=7]);
    }

    #[test]
    fn a_range_merged_by_the_kernel_still_counts_as_reserved_and_comes_out_cleanly() {
        // The kernel keeps a bitmap: adjacent ranges come back merged.
        let p = plan(&parse_list("19000-29999"), &[], &(20000..=29999));
        assert!(p.added.is_empty(), "{p:?}");
        let p = plan(&parse_list("80,31000"), &[], &(20000..=29999));
        assert_eq!(p.reserved, parse_list("80,20000-29999,31000"));
        let p = plan(&p.reserved, &p.recorded, &(21000..=21999));
        assert_eq!(p.reserved, parse_list("80,21000-21999,31000"));
        assert_eq!(p.given_back, parse_list("20000-20999,22000-29999"));
    }

    #[test]
    fn a_changed_range_gives_back_what_lb_no_longer_needs() {
        let p = plan(
            &parse_list("8080,10000-32767"),
            &parse_list("10000-32767"),
            &(20000..=29999),
        );
        assert_eq!(p.reserved, parse_list("8080,20000-29999"));
        assert_eq!(p.recorded, parse_list("20000-29999"));
        assert_eq!(p.given_back, parse_list("10000-19999,30000-32767"));
        assert!(p.added.is_empty());
    }

    #[test]
    fn a_range_the_admin_reserved_is_never_lbs_to_give_back() {
        // The admin reserved 20000-24999; lb adds only the rest of its range.
        let p = plan(&parse_list("20000-24999"), &[], &(20000..=29999));
        assert_eq!(p.reserved, parse_list("20000-29999"));
        assert_eq!(p.added, parse_list("25000-29999"));
        assert_eq!(p.recorded, parse_list("25000-29999"));
        // Already all reserved: nothing added, nothing recorded.
        let p = plan(&parse_list("1024-65535"), &[], &(20000..=29999));
        assert!(p.added.is_empty() && p.recorded.is_empty(), "{p:?}");
        assert_eq!(p.reserved, parse_list("1024-65535"));
        // A recorded port the admin unreserved since is not given back by a later change.
        let p = plan(
            &parse_list("25000-26999"),
            &parse_list("25000-29999"),
            &(1000..=2000),
        );
        assert_eq!(p.given_back, parse_list("25000-26999"));
        assert_eq!(p.reserved, parse_list("1000-2000"));
    }

    #[test]
    fn port_sets_come_back_as_the_fewest_ranges() {
        let ranges = parse_list("0,5-7,65535");
        assert_eq!(ranges_of(&set_of(&ranges)), ranges);
        assert!(ranges_of(&set_of(&[])).is_empty());
    }
}
