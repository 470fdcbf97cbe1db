//! Backends from DNS (`[service.discovery]`): every A record of a name is a backend (every AAAA
//! record, for an IPv6 service), as compose
//! registers a service's replicas. The daemon resolves each such name every `interval` with the
//! host's resolver configuration (getaddrinfo: /etc/hosts, then DNS), and changes the service as
//! `lb backend add|remove` would: new addresses are probed first and then take flows, and
//! addresses DNS no longer gives terminate gracefully. A failed resolution changes nothing: a
//! DNS outage must not empty a service.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use crate::config::{BackendConfig, DiscoveryConfig, ServiceConfig};

/// How long one resolution may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses `d`'s name has now in the family of `vip` (its service's), with its port,
/// sorted and without repeats.
pub async fn resolve(d: &DiscoveryConfig, vip: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    let lookup = tokio::net::lookup_host((d.host.as_str(), d.port));
    let addrs = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Err(_) => {
            return Err(format!(
                "resolving {d}: no answer within {RESOLVE_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) => return Err(format!("resolving {d}: {e}")),
        Ok(Ok(addrs)) => addrs,
    };
    let found: BTreeSet<SocketAddr> = addrs.filter(|a| a.is_ipv4() == vip.is_ipv4()).collect();
    if found.is_empty() {
        let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!("resolving {d}: no {family} address"));
    }
    Ok(found.into_iter().collect())
}

/// `service` as it should be once DNS answered `resolved`, or `None` if that changes nothing.
/// Backends listed in the config stay as they are; discovered ones the answer no longer has
/// go; new addresses join with the discovery's weight, and those already there keep theirs
/// (`lb set-weight` outlives the next resolution).
pub fn reconcile(service: &ServiceConfig, resolved: &[SocketAddr]) -> Option<ServiceConfig> {
    let d = service.discovery.as_ref()?;
    let listed = |a: &SocketAddr| {
        service
            .backends
            .iter()
            .any(|b| b.address == *a && !service.discovered.contains(a))
    };
    let discovered: Vec<SocketAddr> = resolved.iter().copied().filter(|a| !listed(a)).collect();
    if discovered.iter().collect::<BTreeSet<_>>() == service.discovered.iter().collect() {
        return None;
    }
    let mut next = service.clone();
    next.backends
        .retain(|b| !service.discovered.contains(&b.address) || discovered.contains(&b.address));
    for &address in &discovered {
        if !next.backends.iter().any(|b| b.address == address) {
            next.backends.push(BackendConfig {
                address,
                weight: d.weight,
            });
        }
    }
    next.discovered = discovered;
    Some(next)
}

/// For a reload: `new` (from the file) keeps the backends `running` discovered, when both
/// resolve the same name, so that a reload does not drain them until the next resolution.
pub fn carry_over(new: &mut ServiceConfig, running: &ServiceConfig) {
    let same = match (&new.discovery, &running.discovery) {
        (Some(a), Some(b)) => (&a.host, a.port) == (&b.host, b.port),
        _ => false,
    };
    if !same || new.name != running.name {
        return;
    }
    for b in &running.backends {
        if running.discovered.contains(&b.address)
            && !new.backends.iter().any(|n| n.address == b.address)
        {
            new.backends.push(b.clone());
            new.discovered.push(b.address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, OnBackendDown, Protocol};

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::new([198, 18, 1, last].into(), 8001)
    }

    fn api(listed: &[(u8, u32)], discovered: &[(u8, u32)]) -> ServiceConfig {
        let backends = listed
            .iter()
            .chain(discovered)
            .map(|&(last, weight)| BackendConfig {
                address: addr(last),
                weight,
            })
            .collect();
        ServiceConfig {
            name: "api".into(),
            vip: "198.18.4.1:8080".parse().expect("vip"),
            protocol: Protocol::Tcp,
            mode: Default::default(),
            snat: Vec::new(),
            mss: None,
            health: HealthConfig::default_for(Protocol::Tcp),
            on_backend_down: OnBackendDown::Keep,
            removal_grace: Duration::from_secs(60),
            slow_start: Duration::ZERO,
            discovery: Some(DiscoveryConfig {
                host: "api".into(),
                port: 8001,
                interval: Duration::from_secs(1),
                weight: 2,
            }),
            discovered: discovered.iter().map(|&(last, _)| addr(last)).collect(),
            backends,
        }
    }

    fn weights(s: &ServiceConfig) -> Vec<(SocketAddr, u32)> {
        let mut w: Vec<_> = s.backends.iter().map(|b| (b.address, b.weight)).collect();
        w.sort();
        w
    }

    #[test]
    fn new_addresses_join_with_the_discovery_weight_and_gone_ones_leave() {
        let running = api(&[(10, 5)], &[(11, 7), (12, 2)]);
        let next = reconcile(&running, &[addr(11), addr(13)]).expect("a change");
        // 10 is listed, 11 keeps the weight set on it, 12 is gone, 13 is new.
        assert_eq!(
            weights(&next),
            [(addr(10), 5), (addr(11), 7), (addr(13), 2)]
        );
        assert_eq!(next.discovered, [addr(11), addr(13)]);
    }

    #[test]
    fn the_same_answer_changes_nothing() {
        let running = api(&[(10, 5)], &[(11, 7), (12, 2)]);
        assert_eq!(reconcile(&running, &[addr(12), addr(11)]), None);
    }

    #[test]
    fn a_listed_address_stays_listed_when_dns_gives_it_too() {
        let running = api(&[(10, 5)], &[]);
        let next = reconcile(&running, &[addr(10), addr(11)]).expect("a change");
        assert_eq!(weights(&next), [(addr(10), 5), (addr(11), 2)]);
        assert_eq!(next.discovered, [addr(11)]);
        // And when DNS drops it, it stays: the config lists it.
        let after = reconcile(&next, &[addr(11)]);
        assert_eq!(after, None);
    }

    #[test]
    fn a_reload_keeps_what_was_discovered_for_the_same_name() {
        let running = api(&[(10, 5)], &[(11, 7)]);
        let mut from_file = api(&[(10, 1)], &[]);
        carry_over(&mut from_file, &running);
        assert_eq!(weights(&from_file), [(addr(10), 1), (addr(11), 7)]);
        assert_eq!(from_file.discovered, [addr(11)]);
        let mut renamed = api(&[(10, 1)], &[]);
        renamed.discovery.as_mut().expect("d").host = "other".into();
        carry_over(&mut renamed, &running);
        assert_eq!(weights(&renamed), [(addr(10), 1)]);
    }

    #[test]
    fn a_service_without_discovery_is_left_alone() {
        let mut plain = api(&[(10, 5)], &[]);
        plain.discovery = None;
        assert_eq!(reconcile(&plain, &[addr(11)]), None);
    }
}
