//! The SNAT port range kept out of the kernel's own ephemeral ports, through
//! net.ipv4.ip_local_reserved_ports. The reservation outlives the daemon as the pinned data
//! path does (a host connection must not take a port a balanced flow holds); the range added
//! is recorded in the state directory, and `lb remove` gives it back.

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

/// Whether every port of `want` is in `list`.
pub fn covers(list: &[RangeInclusive<u16>], want: &RangeInclusive<u16>) -> bool {
    (*want.start()..=*want.end()).all(|p| list.iter().any(|r| r.contains(&p)))
}

/// `list` without the ports of `take`.
pub fn subtract(list: &[RangeInclusive<u16>], take: &RangeInclusive<u16>) -> String {
    let mut out = Vec::new();
    for r in list {
        if r.end() < take.start() || r.start() > take.end() {
            out.push(r.clone());
            continue;
        }
        if r.start() < take.start() {
            out.push(*r.start()..=take.start() - 1);
        }
        if r.end() > take.end() {
            out.push(take.end() + 1..=*r.end());
        }
    }
    render(&out)
}

fn write(path: &str, value: &str) -> Result<(), PortsError> {
    std::fs::write(path, value).map_err(|source| PortsError::Write {
        path: path.into(),
        source,
    })
}

/// Reserves `min..=max` (if not reserved already) and records it in `state_dir`.
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
    let current = std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default();
    let list = parse_list(&current);
    if !covers(&list, &(min..=max)) {
        let mut value = current.trim().to_owned();
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(&format!("{min}-{max}"));
        write(RESERVED_PORTS, &value)?;
        log::info!("reserved SNAT ports {min}-{max} from the kernel's ephemeral ports");
    }
    std::fs::create_dir_all(state_dir).map_err(|source| PortsError::Write {
        path: state_dir.display().to_string(),
        source,
    })?;
    let record = state_dir.join(RECORD);
    write(&record.display().to_string(), &format!("{min}-{max}\n"))
}

/// Gives back the range `reserve` recorded in `state_dir`. Returns it, if there was one.
pub fn release(state_dir: &Path) -> Result<Option<String>, PortsError> {
    let record = state_dir.join(RECORD);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return Ok(None);
    };
    let Some(range) = parse_list(&text).into_iter().next() else {
        let _ = std::fs::remove_file(&record);
        return Ok(None);
    };
    let current = std::fs::read_to_string(RESERVED_PORTS).unwrap_or_default();
    let rest = subtract(&parse_list(&current), &range);
    write(RESERVED_PORTS, if rest.is_empty() { "\n" } else { &rest })?;
    let _ = std::fs::remove_file(&record);
    Ok(Some(text.trim().to_owned()))
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
        let list = parse_list("19000-29999");
        assert!(covers(&list, &(20000..=29999)));
        assert!(!covers(&list, &(20000..=30000)));
        assert_eq!(subtract(&list, &(20000..=29999)), "19000-19999");
        assert_eq!(
            subtract(&parse_list("80,20000-29999,31000"), &(20000..=29999)),
            "80,31000"
        );
        assert_eq!(
            subtract(&parse_list("20000-29999"), &(21000..=21999)),
            "20000-20999,22000-29999"
        );
        assert_eq!(subtract(&parse_list("20000-29999"), &(20000..=29999)), "");
    }
}
