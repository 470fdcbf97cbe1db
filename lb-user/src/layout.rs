//! The set of services the daemon runs, as ids in the maps: which service and backend ids a
//! new set keeps, which it takes, and what changed. Ids are what flows refer to (a FLOWS entry
//! names its backend id; a service id is its place in MAGLEV), so a service keeps its id by
//! name, and a backend by service name and address, across runtime changes, reloads and
//! restarts. Pure: the daemon applies the result to the maps.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use lb_common::{MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

use crate::config::{
    DISCOVERY_INTERVAL_RANGE, HEALTH_COUNT_RANGE, HEALTH_INTERVAL_RANGE, HealthConfig, HealthKind,
    MAX_WEIGHT, Protocol, SLOW_START_RANGE, ServiceConfig, UDP_PROBE_MAX, check_host_name,
};

const SERVICE_NAME_MAX_LEN: usize = 64;

/// A service with the ids it has in the maps; `backend_ids[i]` is `config.backends[i]`'s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedService {
    pub id: u32,
    pub backend_ids: Vec<u32>,
    pub config: ServiceConfig,
}

/// A service as an adopted data path holds it: its key, its id (where its table lies in
/// MAGLEV) and the backends its live table holds (id, address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedService {
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub id: u32,
    pub backends: Vec<(u32, SocketAddr)>,
}

/// The previous set `place` needs when the saved state is lost but the maps were adopted: the
/// services of `desired` found in `adopted` (by VIP, port and protocol) with the ids the data
/// path uses, so adopted flows keep their backends' ids.
pub fn previous_from_adopted(
    desired: &[ServiceConfig],
    adopted: &[AdoptedService],
) -> Vec<PlacedService> {
    desired
        .iter()
        .filter_map(|s| {
            let a = adopted
                .iter()
                .find(|a| a.vip == s.vip && a.protocol == s.protocol)?;
            let mut config = s.clone();
            config.backends = a
                .backends
                .iter()
                .map(|&(_, address)| crate::config::BackendConfig { address, weight: 1 })
                .collect();
            Some(PlacedService {
                id: a.id,
                backend_ids: a.backends.iter().map(|&(id, _)| id).collect(),
                config,
            })
        })
        .collect()
}

/// How a new set differs from the running one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services in the new set whose config differs from (or is not in) the old one.
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Services that kept their VIP, port and protocol under a new name: (old name, new name).
    /// They keep their ids, and their backends theirs, so their connections go on.
    pub renamed: Vec<(String, String)>,
    /// Backend ids no longer in use.
    pub freed_backends: Vec<u32>,
}

impl Changes {
    /// Every service of `placed` new: what a daemon with nothing published yet applies.
    pub fn everything(placed: &[PlacedService]) -> Self {
        let names: Vec<String> = placed.iter().map(|p| p.config.name.clone()).collect();
        Self {
            changed: names.clone(),
            added: names,
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }

    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "nothing changed".into();
        }
        let mut parts = Vec::new();
        let list = |names: &[String]| names.join(", ");
        if !self.added.is_empty() {
            parts.push(format!("added {}", list(&self.added)));
        }
        let updated: Vec<String> = (self.changed.iter())
            .filter(|n| !self.added.contains(n))
            .cloned()
            .collect();
        if !updated.is_empty() {
            parts.push(format!("updated {}", list(&updated)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", list(&self.removed)));
        }
        for (from, to) in &self.renamed {
            parts.push(format!("renamed {from} to {to}"));
        }
        parts.join("; ")
    }
}

/// Checks a whole set of services the way the config file's are checked (the file's checks
/// also point at lines; these guard runtime changes and the persisted state).
pub fn check(services: &[ServiceConfig]) -> Result<(), String> {
    if services.len() > MAX_SERVICES as usize {
        return Err(format!(
            "more than {MAX_SERVICES} services; that is all the maps hold"
        ));
    }
    let backends: usize = services.iter().map(|s| s.backends.len()).sum();
    if backends > MAX_BACKENDS as usize {
        return Err(format!(
            "more than {MAX_BACKENDS} backends in all; that is all the maps hold"
        ));
    }
    let mut names = HashSet::new();
    let mut vips: HashMap<(SocketAddr, Protocol), &str> = HashMap::new();
    for s in services {
        let name = s.name.as_str();
        let valid_char = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
        if !(1..=SERVICE_NAME_MAX_LEN).contains(&name.len()) || !name.bytes().all(valid_char) {
            return Err(format!(
                "service name \"{name}\" is not 1 to {SERVICE_NAME_MAX_LEN} of a-z, A-Z, 0-9, '_', '.', '-'"
            ));
        }
        if !names.insert(name) {
            return Err(format!("service \"{name}\" exists already"));
        }
        if s.vip.port() == 0 {
            return Err(format!("service \"{name}\": vip {} has port 0", s.vip));
        }
        if let Some(other) = vips.insert((s.vip, s.protocol), name) {
            return Err(format!(
                "service \"{name}\": vip {} ({}) is already used by service \"{other}\"",
                s.vip, s.protocol
            ));
        }
        crate::config::check_family(s).map_err(|e| format!("service \"{name}\": {e}"))?;
        check_health(name, s.protocol, &s.health)?;
        if !SLOW_START_RANGE.contains(&s.slow_start) {
            return Err(format!(
                "service \"{name}\": slow_start {:?} is out of range 0s..=1h",
                s.slow_start
            ));
        }
        if let Some(d) = &s.discovery {
            check_host_name(&d.host).map_err(|e| format!("service \"{name}\": dns {e}"))?;
            if d.port == 0
                || !DISCOVERY_INTERVAL_RANGE.contains(&d.interval)
                || d.weight > MAX_WEIGHT
            {
                return Err(format!(
                    "service \"{name}\": discovery {d}: port, interval or weight out of range"
                ));
            }
        }
        if let Some(a) = s
            .discovered
            .iter()
            .find(|a| !s.backends.iter().any(|b| b.address == **a))
        {
            return Err(format!(
                "service \"{name}\": discovered backend {a} is not among its backends"
            ));
        }
        if s.mss.is_some() && s.protocol != Protocol::Tcp {
            return Err(format!(
                "service \"{name}\": mss applies to TCP services only"
            ));
        }
        crate::config::check_snat_pool(&s.snat)
            .map_err(|e| format!("service \"{name}\": snat {e}"))?;
        if s.mode.is_dsr()
            && let Some(b) = s.backends.iter().find(|b| b.address.port() != s.vip.port())
        {
            return Err(format!(
                "service \"{name}\": backend {}: in mode \"dsr\" the backend answers from the VIP, so it listens on the VIP's port {}",
                b.address,
                s.vip.port()
            ));
        }
        if !s.mode.has_source_pool() && !s.snat.is_empty() {
            return Err(format!(
                "service \"{name}\": snat has no use in mode \"{}\": the backends see the client's address",
                s.mode
            ));
        }
        let mut seen = HashSet::new();
        for b in &s.backends {
            if b.address.port() == 0 {
                return Err(format!(
                    "service \"{name}\": backend {} has port 0",
                    b.address
                ));
            }
            if !seen.insert(b.address) {
                return Err(format!(
                    "service \"{name}\": backend {} is listed twice",
                    b.address
                ));
            }
            if b.weight > MAX_WEIGHT {
                return Err(format!(
                    "service \"{name}\": backend {} weight {} is out of range 0..={MAX_WEIGHT}",
                    b.address, b.weight
                ));
            }
        }
    }
    Ok(())
}

/// The config file's health rules: a probe task with a zero interval would panic, an endless
/// timeout would hold every later change, a path with control characters would break the
/// request.
fn check_health(name: &str, protocol: Protocol, h: &HealthConfig) -> Result<(), String> {
    let ctx = format!("service \"{name}\" health");
    if let HealthKind::Udp { send, .. } = &h.kind
        && (protocol != Protocol::Udp || send.is_empty() || send.len() > UDP_PROBE_MAX)
    {
        return Err(format!(
            "{ctx}: a udp check is for UDP services, with 1 to {UDP_PROBE_MAX} bytes to send"
        ));
    }
    if !HEALTH_INTERVAL_RANGE.contains(&h.interval) {
        return Err(format!(
            "{ctx}: interval {:?} is out of range 10ms..=1h",
            h.interval
        ));
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        return Err(format!(
            "{ctx}: timeout {:?} must be above 0 and at most the interval",
            h.timeout
        ));
    }
    if !HEALTH_COUNT_RANGE.contains(&h.rise) || !HEALTH_COUNT_RANGE.contains(&h.fall) {
        return Err(format!("{ctx}: rise and fall must be 1..=100"));
    }
    if h.port == Some(0) {
        return Err(format!("{ctx}: port 0"));
    }
    if let HealthKind::Http(check) = &h.kind
        && let Some(problem) = check.problem()
    {
        return Err(format!("{ctx}: {problem}"));
    }
    Ok(())
}

/// Gives `desired` its ids: what `previous` had for the same service (by name, or by VIP, port
/// and protocol for a renamed one) and backend address, fresh ones for the rest (ids freed by this change are not reused by it, so a new backend
/// never inherits flows of a removed one; `terminating` ids, of removed backends whose
/// connections go on, are not reused at all). Fails only when the maps are full.
pub fn place(
    desired: &[ServiceConfig],
    previous: &[PlacedService],
    terminating: &[u32],
) -> Result<(Vec<PlacedService>, Changes), String> {
    check(desired)?;
    let mut old: HashMap<&str, &PlacedService> = previous
        .iter()
        .map(|p| (p.config.name.as_str(), p))
        .collect();
    // A service whose name is gone, and whose VIP, port and protocol a new name serves, was
    // renamed: the new name takes its place (its ids, its backends' ids).
    let mut renamed = Vec::new();
    for s in desired {
        if old.contains_key(s.name.as_str()) {
            continue;
        }
        let same_key = previous.iter().find(|p| {
            p.config.vip == s.vip
                && p.config.protocol == s.protocol
                && !desired.iter().any(|d| d.name == p.config.name)
        });
        if let Some(p) = same_key
            && !renamed
                .iter()
                .any(|(from, _): &(String, String)| *from == p.config.name)
        {
            renamed.push((p.config.name.clone(), s.name.clone()));
            old.insert(s.name.as_str(), p);
        }
    }
    let old_backend = |service: &str, addr: SocketAddr| {
        let p = old.get(service)?;
        let i = p.config.backends.iter().position(|b| b.address == addr)?;
        p.backend_ids.get(i).copied()
    };
    // Ids the old set used are handed out again only when no other is left; ids the new set
    // keeps, never.
    let kept_services = desired
        .iter()
        .filter_map(|s| old.get(s.name.as_str()).map(|p| p.id));
    let kept_backends = desired.iter().flat_map(|s| {
        s.backends
            .iter()
            .filter_map(|b| old_backend(&s.name, b.address))
    });
    let mut fresh_service =
        FreshIds::new(MAX_SERVICES, previous.iter().map(|p| p.id), kept_services);
    let mut fresh_backend = FreshIds::new(
        MAX_BACKENDS,
        previous.iter().flat_map(|p| p.backend_ids.iter().copied()),
        kept_backends.chain(terminating.iter().copied()),
    );
    let mut placed = Vec::with_capacity(desired.len());
    let mut changes = Changes::default();
    for s in desired {
        let id = match old.get(s.name.as_str()) {
            Some(p) => p.id,
            None => {
                changes.added.push(s.name.clone());
                fresh_service.take()?
            }
        };
        let mut backend_ids = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let id = match old_backend(&s.name, b.address) {
                Some(id) => id,
                None => fresh_backend.take()?,
            };
            backend_ids.push(id);
        }
        if old.get(s.name.as_str()).is_none_or(|p| p.config != *s) {
            changes.changed.push(s.name.clone());
        }
        placed.push(PlacedService {
            id,
            backend_ids,
            config: s.clone(),
        });
    }
    let kept: HashSet<&str> = desired
        .iter()
        .map(|s| s.name.as_str())
        .chain(renamed.iter().map(|(from, _)| from.as_str()))
        .collect();
    let in_use: HashSet<u32> = placed
        .iter()
        .flat_map(|p| p.backend_ids.iter().copied())
        .collect();
    for p in previous {
        if !kept.contains(p.config.name.as_str()) {
            changes.removed.push(p.config.name.clone());
        }
        changes.freed_backends.extend(
            p.backend_ids
                .iter()
                .copied()
                .filter(|id| !in_use.contains(id)),
        );
    }
    changes.renamed = renamed;
    Ok((placed, changes))
}

/// Hands out the lowest id neither used now nor by the old set; once those run out, the
/// lowest id not used now.
struct FreshIds {
    limit: u32,
    old: HashSet<u32>,
    used: HashSet<u32>,
}

impl FreshIds {
    fn new(
        limit: u32,
        old: impl IntoIterator<Item = u32>,
        kept: impl IntoIterator<Item = u32>,
    ) -> Self {
        Self {
            limit,
            old: old.into_iter().collect(),
            used: kept.into_iter().collect(),
        }
    }

    fn take(&mut self) -> Result<u32, String> {
        let free = |id: &u32| !self.used.contains(id);
        let id = (0..self.limit)
            .find(|id| free(id) && !self.old.contains(id))
            .or_else(|| (0..self.limit).find(free))
            .ok_or_else(|| format!("no free id below {}: the maps are full", self.limit))?;
        self.used.insert(id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, DEFAULT_REMOVAL_GRACE, HealthConfig, OnBackendDown};

    fn svc(name: &str, port: u16, backends: &[(u8, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            vip: SocketAddr::new([198, 18, 100, 1].into(), port),
            protocol: Protocol::Tcp,
            mode: Default::default(),
            snat: Vec::new(),
            mss: None,
            health: HealthConfig::default_for(Protocol::Tcp),
            on_backend_down: OnBackendDown::Keep,
            removal_grace: DEFAULT_REMOVAL_GRACE,
            slow_start: std::time::Duration::ZERO,
            discovery: None,
            discovered: Vec::new(),
            backends: backends
                .iter()
                .map(|&(host, weight)| BackendConfig {
                    address: SocketAddr::new([198, 18, 1, host].into(), 8000),
                    weight,
                })
                .collect(),
        }
    }

    #[test]
    fn a_first_set_takes_ids_in_order() {
        let (placed, changes) = place(
            &[svc("web", 80, &[(1, 4), (2, 6)]), svc("api", 81, &[(3, 1)])],
            &[],
            &[],
        )
        .expect("place");
        assert_eq!(placed[0].id, 0);
        assert_eq!(placed[0].backend_ids, [0, 1]);
        assert_eq!((placed[1].id, placed[1].backend_ids.clone()), (1, vec![2]));
        assert_eq!(changes.added, ["web", "api"]);
        assert_eq!(changes.describe(), "added web, api");
    }

    #[test]
    fn unchanged_services_keep_their_ids_and_are_not_changed() {
        let set = [svc("web", 80, &[(1, 4), (2, 6)]), svc("api", 81, &[(3, 1)])];
        let (before, _) = place(&set, &[], &[]).expect("place");
        let (after, changes) = place(&set, &before, &[]).expect("again");
        assert_eq!(after, before);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(changes.describe(), "nothing changed");
    }

    #[test]
    fn removals_free_ids_that_the_same_change_does_not_reuse() {
        let (before, _) = place(
            &[svc("web", 80, &[(1, 4), (2, 6)]), svc("api", 81, &[(3, 1)])],
            &[],
            &[],
        )
        .expect("place");
        // api goes, web loses backend .1 and gains .4, a new service comes.
        let (after, changes) = place(
            &[svc("web", 80, &[(2, 6), (4, 1)]), svc("dns", 53, &[(5, 1)])],
            &before,
            &[],
        )
        .expect("place");
        assert_eq!(after[0].id, 0);
        assert_eq!(after[0].backend_ids[0], 1, "backend .2 keeps its id");
        assert_eq!(
            after[0].backend_ids[1], 3,
            "the new backend takes no freed id"
        );
        assert_eq!(after[1].id, 2, "the new service takes no freed id");
        assert_eq!(changes.added, ["dns"]);
        assert_eq!(changes.changed, ["web", "dns"]);
        assert_eq!(changes.removed, ["api"]);
        let mut freed = changes.freed_backends.clone();
        freed.sort();
        assert_eq!(freed, [0, 2]);
        assert_eq!(changes.describe(), "added dns; updated web; removed api");
    }

    #[test]
    fn a_weight_change_is_a_change_of_that_service_only() {
        let (before, _) = place(
            &[svc("web", 80, &[(1, 4), (2, 6)]), svc("api", 81, &[(3, 1)])],
            &[],
            &[],
        )
        .expect("place");
        let (after, changes) = place(
            &[svc("web", 80, &[(1, 5), (2, 6)]), svc("api", 81, &[(3, 1)])],
            &before,
            &[],
        )
        .expect("place");
        assert_eq!(changes.changed, ["web"]);
        assert_eq!(after[0].backend_ids, before[0].backend_ids);
    }

    #[test]
    fn bad_sets_are_refused_with_the_reason() {
        let dup = [svc("web", 80, &[]), svc("web", 81, &[])];
        assert!(check(&dup).expect_err("dup").contains("exists already"));
        let vip = [svc("web", 80, &[]), svc("api", 80, &[])];
        assert!(check(&vip).expect_err("vip").contains("already used"));
        let twice = [svc("web", 80, &[(1, 1), (1, 2)])];
        assert!(check(&twice).expect_err("twice").contains("listed twice"));
        let heavy = [svc("web", 80, &[(1, MAX_WEIGHT + 1)])];
        assert!(check(&heavy).expect_err("weight").contains("out of range"));
        let name = [svc("web site", 80, &[])];
        assert!(check(&name).expect_err("name").contains("service name"));
        let mut zero = svc("web", 80, &[]);
        zero.vip.set_port(0);
        assert!(check(&[zero]).expect_err("port").contains("port 0"));
        // Health settings a hand-edited state file could carry.
        let mut never = svc("web", 80, &[]);
        never.health.interval = std::time::Duration::ZERO;
        assert!(check(&[never]).expect_err("interval").contains("interval"));
        let mut endless = svc("web", 80, &[]);
        endless.health.timeout = std::time::Duration::from_secs(86_400);
        assert!(check(&[endless]).expect_err("timeout").contains("timeout"));
        let mut crlf = svc("web", 80, &[]);
        crlf.health.kind = HealthKind::Http(crate::config::HttpCheck::new("/x\r\nHost: evil"));
        assert!(check(&[crlf]).expect_err("path").contains("path"));
        let mut rise = svc("web", 80, &[]);
        rise.health.rise = 0;
        assert!(check(&[rise]).expect_err("rise").contains("rise"));
    }

    #[test]
    fn a_full_table_reuses_freed_ids_and_refuses_more() {
        let many: Vec<ServiceConfig> = (0..MAX_SERVICES as u16)
            .map(|i| svc(&format!("s{i}"), 1000 + i, &[]))
            .collect();
        let (placed, _) = place(&many, &[], &[]).expect("exactly full");
        let mut swapped = many.clone();
        swapped[0] = svc("other", 999, &[]);
        let (after, _) = place(&swapped, &placed, &[]).expect("one out, one in");
        assert_eq!(after[0].id, 0, "the only free id is the one s0 left");
        let mut more = many.clone();
        more.push(svc("one-too-many", 999, &[]));
        let err = place(&more, &placed, &[]).expect_err("full");
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn terminating_backends_keep_their_ids_from_new_backends() {
        let (before, _) = place(&[svc("web", 80, &[(1, 1), (2, 1)])], &[], &[]).expect("place");
        // .1 leaves and is terminating (id 0); .3 comes, and later .4.
        let (after, changes) =
            place(&[svc("web", 80, &[(2, 1), (3, 1)])], &before, &[0]).expect("place");
        assert_eq!(changes.freed_backends, [0]);
        assert_eq!(after[0].backend_ids, [1, 2]);
        let (later, _) =
            place(&[svc("web", 80, &[(2, 1), (3, 1), (4, 1)])], &after, &[0]).expect("place");
        assert_eq!(
            later[0].backend_ids,
            [1, 2, 3],
            "id 0 stays with its connections"
        );
    }

    /// A service renamed (same VIP, port and protocol) keeps its id and its backends' ids:
    /// its connections, counted under those ids, go on.
    #[test]
    fn a_renamed_service_keeps_its_ids() {
        let (before, _) = place(
            &[svc("web", 80, &[(1, 1), (2, 1)]), svc("dns", 53, &[(3, 1)])],
            &[],
            &[],
        )
        .expect("place");
        let (after, changes) = place(
            &[
                svc("site", 80, &[(1, 1), (2, 1), (4, 1)]),
                svc("dns", 53, &[(3, 1)]),
            ],
            &before,
            &[],
        )
        .expect("place");
        assert_eq!(after[0].id, before[0].id);
        assert_eq!(after[0].backend_ids[..2], before[0].backend_ids[..]);
        assert!(
            !before
                .iter()
                .any(|p| p.backend_ids.contains(&after[0].backend_ids[2]))
        );
        assert_eq!(changes.renamed, [("web".to_owned(), "site".to_owned())]);
        assert!(changes.removed.is_empty(), "{:?}", changes.removed);
        assert!(changes.freed_backends.is_empty());
        assert_eq!(changes.changed, ["site"]);
        assert_eq!(changes.describe(), "updated site; renamed web to site");
        // Another port is another service: not a rename.
        let (_, changes) = place(&[svc("site", 8080, &[(1, 1)])], &before, &[]).expect("place");
        assert!(changes.renamed.is_empty());
        assert_eq!(changes.removed, ["web", "dns"]);
    }

    /// The saved state lost, the adopted maps still say which ids serve which service: a
    /// config whose order would number them otherwise gets the data path's ids back.
    #[test]
    fn ids_come_back_from_the_adopted_maps() {
        let desired = [
            svc("dns", 53, &[(1, 1), (2, 1)]),
            svc("web", 80, &[(1, 4), (2, 6)]),
        ];
        let b = |host: u8| SocketAddr::new([198, 18, 1, host].into(), 8000);
        let adopted = [
            AdoptedService {
                vip: desired[1].vip,
                protocol: Protocol::Tcp,
                id: 0,
                backends: vec![(1, b(2)), (0, b(1))],
            },
            AdoptedService {
                vip: desired[0].vip,
                protocol: Protocol::Tcp,
                id: 1,
                backends: vec![(2, b(1))],
            },
        ];
        let previous = previous_from_adopted(&desired, &adopted);
        let (placed, _) = place(&desired, &previous, &[]).expect("place");
        assert_eq!((placed[1].id, &placed[1].backend_ids[..]), (0, &[0, 1][..]));
        // dns's second backend held no slot (drained): a fresh id, none of the adopted ones.
        assert_eq!(placed[0].id, 1);
        assert_eq!(placed[0].backend_ids[0], 2);
        assert!(placed[0].backend_ids[1] > 2, "{:?}", placed[0].backend_ids);
    }
}
