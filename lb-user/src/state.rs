//! What the daemon runs, behind its one lock: services and backends with their health, the
//! data path (the only writer of its maps), and the state file. Every change of the service
//! set, from the config at start, `lb reload`, or a runtime command, goes through `apply`,
//! which writes only what differs: services whose config is unchanged get no map write at
//! all, so their flows and Maglev tables stay as they are.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::PathBuf,
};

use lb_common::{Be16, Be32, DropReason, In6};
use tokio::{sync::mpsc::UnboundedSender, task::AbortHandle};

use crate::{
    config::{
        BackendConfig, Config, DiscoveryConfig, ForwardingMode, HealthConfig, HealthKind,
        MAX_WEIGHT, Mss, OnBackendDown, Protocol, ServiceConfig,
    },
    control::{
        BackendSource, BackendStatus, FlowTableStatus, HostStatus, InterfaceStatus, Response,
        ServiceStatus, Status, TerminatingStatus,
    },
    cut,
    dataplane::{Dataplane, DataplaneError, FlowSweep, FlowTimeouts, VipKey, monotonic_ns},
    dsr_probe,
    health::{self, Tracker},
    host,
    layout::{Changes, PlacedService},
    maglev::{MaglevBackend, build_table},
    persist::{self, Persisted},
    return_path,
    slow_start::Ramp,
    steering::{self, Candidate},
};

/// A health probe's result, sent by a backend's probe task.
#[derive(Debug)]
pub struct HealthReport {
    pub backend: u32,
    pub address: SocketAddr,
    pub result: Result<(), String>,
    /// CLOCK_MONOTONIC when the probe began: a pass clears suspect marks made before it.
    pub started_ns: u64,
}

/// First probe results of backends a change adds, by address and health check (one backend
/// may serve a TCP and a UDP service with different checks).
pub type Probes = HashMap<(SocketAddr, HealthConfig), Result<(), String>>;

/// Service keys and backend ids a new set uses.
pub struct InUse {
    keys: Vec<VipKey>,
    backend_ids: std::collections::HashSet<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "service \"{service}\": no snat address given and none found towards {backend}: {source}; set `snat`"
    )]
    NoSnat {
        service: String,
        backend: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("service \"{service}\" has no backends and no `snat` address; set `snat`")]
    NoSnatNoBackends { service: String },
    #[error("service \"{service}\": mss auto: cannot read the MTU of {interface}: {source}")]
    MssMtu {
        service: String,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service \"{service}\": mss auto needs an interface in `interfaces`")]
    MssNoInterfaces { service: String },
    #[error("service \"{service}\": {source}")]
    Ipv6Forwarding {
        service: String,
        #[source]
        source: crate::sysctls::SysctlError,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

struct BackendState {
    id: u32,
    address: SocketAddr,
    weight: u32,
    tracker: Tracker,
    active_flows: u64,
    last_error: Option<String>,
    snat_ports_in_use: u64,
    /// When the data path marked it suspect (read at each sweep).
    suspect_since: Option<u64>,
    /// Slow start: it came up while its service ran and takes a rising share of its weight.
    ramp: Option<Ramping>,
    probe_task: Option<AbortHandle>,
}

/// A backend's slow start: since when it ramps (CLOCK_MONOTONIC ns), and the step its
/// service's published table gives it.
#[derive(Debug, Clone, Copy)]
struct Ramping {
    since_ns: u64,
    published: Ramp,
}

impl Ramping {
    fn start(now_ns: u64, duration: std::time::Duration) -> Option<Ramping> {
        (!duration.is_zero()).then(|| Ramping {
            since_ns: now_ns,
            published: Ramp::at(std::time::Duration::ZERO, duration),
        })
    }
}

impl Drop for BackendState {
    fn drop(&mut self) {
        if let Some(task) = self.probe_task.take() {
            task.abort();
        }
    }
}

/// A removed backend whose connections go on until they end or its grace runs out. It stays
/// in BACKENDS, marked down, so it takes no new flows while its established ones keep their
/// way to it, and its id is kept from new backends (`layout::place`) until it is cut.
struct Terminating {
    id: u32,
    service: String,
    address: SocketAddr,
    since_ns: u64,
    until_ns: u64,
    /// Its connections, as the last sweep counted them.
    active_flows: u64,
    /// Whether a sweep begun after the removal counted them (before, the count may miss a
    /// connection opened a moment before the removal).
    counted: bool,
}

/// What a service's settings resolve to on this host, before any map is written.
struct Resolved {
    snat: Vec<IpAddr>,
    mss: Option<u16>,
}

/// A change of the service set, worked out and checked (`State::plan`), written a service at a
/// time (`State::apply_step`), then finished (`State::finish`).
pub struct Plan {
    /// The changed services, in the new set's order.
    steps: std::collections::VecDeque<Step>,
    /// Every service of the new set, in its order.
    order: Vec<String>,
    /// Services of the old set that the new one does not have (renamed ones excepted), until
    /// the first step takes them out.
    gone: Vec<String>,
    keep: InUse,
    /// Every old backend as it would terminate, for those the change frees.
    leaving: HashMap<u32, Terminating>,
    freed: Vec<u32>,
    fresh_counters: bool,
}

struct Step {
    placed: PlacedService,
    renamed_from: Option<String>,
    resolved: Resolved,
}

struct ServiceState {
    id: u32,
    /// Its settings; the backends are in `backends` only (`placed` puts them back).
    config: ServiceConfig,
    /// `config.snat`, or the address the kernel uses towards the first backend.
    snat: Vec<IpAddr>,
    /// `config.mss`, resolved.
    mss: Option<u16>,
    /// In `config.backends` order.
    backends: Vec<BackendState>,
    /// Suspect backends left out of the table (`steering`).
    avoided: BTreeSet<u32>,
    /// Why its discovery's last resolution failed, if it did.
    discovery_error: Option<String>,
}

impl ServiceState {
    fn key(&self) -> VipKey {
        service_key(&self.config)
    }

    /// Backends that take new flows: healthy, weight > 0.
    fn eligible(&self) -> impl Iterator<Item = &BackendState> {
        self.backends
            .iter()
            .filter(|b| b.tracker.healthy && b.weight > 0)
    }

    /// The Maglev table: eligible backends not avoided for a suspect mark, each with its weight
    /// as far as its slow start has gone.
    fn table(&self, size: u32) -> Vec<u32> {
        let eligible: Vec<MaglevBackend> = self
            .eligible()
            .filter(|b| !self.avoided.contains(&b.id))
            .map(|b| MaglevBackend {
                id: b.id,
                addr: b.address,
                weight: b
                    .ramp
                    .map_or(Ramp::Done, |r| r.published)
                    .table_weight(b.weight),
            })
            .collect();
        build_table(&eligible, size)
    }

    fn placed(&self) -> PlacedService {
        let mut config = self.config.clone();
        config.backends = self
            .backends
            .iter()
            .map(|b| BackendConfig {
                address: b.address,
                weight: b.weight,
            })
            .collect();
        PlacedService {
            id: self.id,
            backend_ids: self.backends.iter().map(|b| b.id).collect(),
            config,
        }
    }
}

/// Writes `service`'s Maglev table and entry to the data path.
fn publish(dataplane: &mut Dataplane, service: &ServiceState) -> Result<(), DataplaneError> {
    let table = service.table(dataplane.settings().maglev_size);
    dataplane.set_service(
        service.id,
        service.key(),
        service.config.mode.number(),
        &service.snat,
        service.mss,
        &table,
    )
}

fn service_key(config: &ServiceConfig) -> VipKey {
    VipKey::new(config.vip, config.protocol.number())
}

pub struct State {
    pub dataplane: Dataplane,
    services: Vec<ServiceState>,
    terminating: Vec<Terminating>,
    pub interfaces: Vec<InterfaceStatus>,
    pub host: HostStatus,
    flow_entries: u64,
    /// When the count behind `flow_entries` and the active flows began.
    counted_ns: u64,
    /// New flows dropped for exhaustion, as counted at the last sweep, and what that sweep
    /// found: the warnings status and metrics show.
    exhaustion_drops: (u64, u64),
    warnings: Vec<String>,
    /// What the last sweep found wrong in the host's setup: DNAT and DSR backends lb cannot
    /// reach or hear back from, bridges whose MAC moves.
    setup_problems: Vec<String>,
    /// The config the daemon started with (settings other than services apply at start only).
    pub config: Config,
    pub config_path: PathBuf,
    /// `persist::digest` of the config file the services descend from.
    pub config_digest: String,
    state_dir: PathBuf,
    health: UnboundedSender<HealthReport>,
}

impl State {
    pub fn new(
        dataplane: Dataplane,
        config: Config,
        config_path: PathBuf,
        config_digest: String,
        state_dir: PathBuf,
        health: UnboundedSender<HealthReport>,
    ) -> Self {
        // An adopted data path's counters carry on: only drops after this start are news.
        let exhaustion_drops = exhaustion_drops(&dataplane).unwrap_or((0, 0));
        Self {
            dataplane,
            services: Vec::new(),
            terminating: Vec::new(),
            interfaces: Vec::new(),
            host: HostStatus::default(),
            flow_entries: 0,
            counted_ns: 0,
            exhaustion_drops,
            warnings: Vec::new(),
            setup_problems: Vec::new(),
            config,
            config_path,
            config_digest,
            state_dir,
            health,
        }
    }

    /// How long idle flows live (from the config the daemon started with).
    pub fn timeouts(&self) -> FlowTimeouts {
        self.config.flows.timeouts
    }

    /// The services as placed in the maps (what `layout::place` compares a new set with).
    pub fn placed(&self) -> Vec<PlacedService> {
        self.services.iter().map(ServiceState::placed).collect()
    }

    pub fn service_configs(&self) -> Vec<ServiceConfig> {
        self.placed().into_iter().map(|p| p.config).collect()
    }

    /// Backends of `desired` that have no probe result yet (new ones, or of a service whose
    /// health check changed): they are probed before the change is applied, so that a new
    /// backend takes traffic only once it answers.
    pub fn to_probe(&self, desired: &[ServiceConfig]) -> Vec<(SocketAddr, HealthConfig)> {
        let mut out = Vec::new();
        for s in desired {
            let current = self.services.iter().find(|c| c.config.name == s.name);
            for b in &s.backends {
                let known = current.is_some_and(|c| {
                    c.config.health == s.health
                        && c.backends.iter().any(|cb| cb.address == b.address)
                });
                if !known {
                    out.push((b.address, s.health.clone()));
                }
            }
        }
        out
    }

    /// Makes the maps and the state hold `placed`, in one go (at start, before anything else
    /// runs; the daemon's changes go through `plan`, `apply_step` and `finish`).
    /// `fresh_counters`: new backend ids start their counters from zero (not when adopting a
    /// pinned data path, whose counters carry on). Backends the change removes become
    /// terminating for `grace`, or their service's `removal_grace`.
    pub fn apply(
        &mut self,
        placed: Vec<PlacedService>,
        changes: &Changes,
        probes: &Probes,
        fresh_counters: bool,
        grace: Option<std::time::Duration>,
    ) -> Result<(), ApplyError> {
        let mut plan = self.plan(placed, changes, fresh_counters, grace)?;
        while self.apply_step(&mut plan, probes)? {}
        self.finish(plan)
    }

    /// Works out a change of the service set without writing anything: everything that can be
    /// refused is refused here. `apply_step` then takes out the services the new set no longer
    /// has and writes one changed service at a time, so that the daemon's lock is free between
    /// services (a service's table is up to 131k slots), and `finish` ends it.
    pub fn plan(
        &mut self,
        placed: Vec<PlacedService>,
        changes: &Changes,
        fresh_counters: bool,
        grace: Option<std::time::Duration>,
    ) -> Result<Plan, ApplyError> {
        let now = monotonic_ns();
        let leaving: HashMap<u32, Terminating> = self
            .services
            .iter()
            .flat_map(|s| {
                let grace = grace.unwrap_or(s.config.removal_grace);
                s.backends.iter().map(move |b| {
                    let terminating = Terminating {
                        id: b.id,
                        service: s.config.name.clone(),
                        address: b.address,
                        since_ns: now,
                        until_ns: now.saturating_add(grace.as_nanos() as u64),
                        active_flows: b.active_flows,
                        counted: false,
                    };
                    (b.id, terminating)
                })
            })
            .collect();
        // What the new set uses: cleaning up after the old set must not touch these (a renamed
        // service keeps its VIP, a freed backend id may already be someone else's).
        let keep = InUse {
            keys: placed.iter().map(|p| service_key(&p.config)).collect(),
            backend_ids: placed
                .iter()
                .flat_map(|p| p.backend_ids.iter().copied())
                .collect(),
        };
        let order: Vec<String> = placed.iter().map(|p| p.config.name.clone()).collect();
        let mut steps = std::collections::VecDeque::new();
        for p in placed
            .into_iter()
            .filter(|p| changes.changed.contains(&p.config.name))
        {
            let resolved = Resolved {
                snat: resolve_snat(&p.config)?,
                mss: self.resolve_mss(&p.config)?,
            };
            let renamed_from = changes
                .renamed
                .iter()
                .find(|(_, to)| *to == p.config.name)
                .map(|(from, _)| from.clone());
            steps.push_back(Step {
                placed: p,
                renamed_from,
                resolved,
            });
        }
        let gone = self
            .services
            .iter()
            .map(|s| s.config.name.clone())
            .filter(|name| {
                !order.contains(name)
                    && !steps.iter().any(|s| s.renamed_from.as_ref() == Some(name))
            })
            .collect();
        Ok(Plan {
            steps,
            order,
            gone,
            keep,
            leaving,
            freed: changes.freed_backends.clone(),
            fresh_counters,
        })
    }

    /// Takes out the services `plan` removes (at the first step), then writes its next changed
    /// service, in place of its previous version: whatever reads the state between two steps
    /// sees each service whole, old or new. False when nothing is left to write.
    pub fn apply_step(&mut self, plan: &mut Plan, probes: &Probes) -> Result<bool, ApplyError> {
        // The services that go, first: SERVICES holds as many as the maps serve, and a set
        // replaced by another would fill it half-way if the new came before the old went.
        while let Some(name) = plan.gone.pop() {
            let Some(i) = self.services.iter().position(|s| s.config.name == name) else {
                continue;
            };
            let service = self.services.remove(i);
            if let Err(e) = self.unpublish(&service, &plan.keep) {
                self.services.insert(i, service);
                return Err(e);
            }
        }
        let Some(step) = plan.steps.pop_front() else {
            return Ok(false);
        };
        let name = &step.placed.config.name;
        let at = self
            .services
            .iter()
            .position(|s| &s.config.name == name)
            .or_else(|| {
                let from = step.renamed_from.as_ref()?;
                self.services.iter().position(|s| &s.config.name == from)
            });
        let previous = at.map(|i| self.services.remove(i));
        let service = self.build(
            step.placed,
            step.resolved,
            previous,
            probes,
            plan.fresh_counters,
            &plan.keep,
        )?;
        self.services
            .insert(at.unwrap_or(self.services.len()), service);
        Ok(!plan.steps.is_empty())
    }

    /// Ends a change whose steps are all written: the backends the change frees terminate (or
    /// are freed), and the services take the new set's order.
    pub fn finish(&mut self, plan: Plan) -> Result<(), ApplyError> {
        let Plan {
            order,
            keep,
            mut leaving,
            freed,
            ..
        } = plan;
        self.services.sort_by_key(|s| {
            order
                .iter()
                .position(|name| *name == s.config.name)
                .unwrap_or(usize::MAX)
        });
        for &id in &freed {
            if keep.backend_ids.contains(&id) {
                continue;
            }
            match leaving.remove(&id) {
                Some(t) => {
                    log::info!(
                        "service \"{}\": backend {} is terminating: no new flows, its connections go on for {:?} at most",
                        t.service,
                        t.address,
                        std::time::Duration::from_nanos(t.until_ns - t.since_ns)
                    );
                    self.terminating.push(t);
                }
                None => self.free_backend(id)?,
            }
        }
        self.end_terminating(None)?;
        Ok(())
    }

    /// Ids of terminating backends, which new backends must not take.
    pub fn terminating_ids(&self) -> Vec<u32> {
        self.terminating.iter().map(|t| t.id).collect()
    }

    fn free_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.dataplane
            .set_backend(id, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0), false)
    }

    /// Ends terminating backends whose connections are all gone (by `sweep`, if it began
    /// after their removal) or whose grace ran out: what is left of their connections is cut,
    /// and their ids are freed.
    fn end_terminating(&mut self, sweep: Option<&FlowSweep>) -> Result<cut::Cut, DataplaneError> {
        let now = monotonic_ns();
        if let Some(sweep) = sweep {
            for t in &mut self.terminating {
                t.active_flows = sweep.active.get(&t.id).copied().unwrap_or(0);
                t.counted |= sweep.started_ns > t.since_ns;
            }
        }
        let (done, going): (Vec<Terminating>, Vec<Terminating>) =
            std::mem::take(&mut self.terminating)
                .into_iter()
                .partition(|t| now >= t.until_ns || (t.counted && t.active_flows == 0));
        self.terminating = going;
        if done.is_empty() {
            return Ok(cut::Cut::default());
        }
        let overdue: std::collections::HashSet<u32> = done
            .iter()
            .filter(|t| !(t.counted && t.active_flows == 0))
            .map(|t| t.id)
            .collect();
        let cut = match cut::backends(&mut self.dataplane, &overdue) {
            Ok(cut) => cut,
            Err(e) => {
                self.terminating.extend(done);
                return Err(e);
            }
        };
        for t in done {
            self.free_backend(t.id)?;
            if overdue.contains(&t.id) {
                log::info!(
                    "service \"{}\": backend {} removed; its remaining connections were cut ({} RSTs for {} connections)",
                    t.service,
                    t.address,
                    cut.resets,
                    cut.connections
                );
            } else {
                log::info!(
                    "service \"{}\": backend {} removed; its connections had all ended",
                    t.service,
                    t.address
                );
            }
        }
        Ok(cut)
    }

    /// `lb backend remove --now` of a backend already terminating: its connections are cut
    /// now. `None` if `service` has no such terminating backend.
    pub fn cut_terminating(&mut self, service: &str, backend: &str) -> Option<Response> {
        let address: SocketAddr = backend.parse().ok()?;
        let name = self
            .service_name(service)
            .unwrap_or_else(|_| service.to_owned());
        let t = self
            .terminating
            .iter_mut()
            .find(|t| t.service == name && t.address == address)?;
        t.until_ns = 0;
        Some(match self.end_terminating(None) {
            Ok(cut) => Response::done().with_message(Some(format!(
                "backend {address} cut: {} connections, {} RSTs sent",
                cut.connections, cut.resets
            ))),
            Err(e) => Response::failed(format!("updating the data path: {e}")),
        })
    }

    fn unpublish(&mut self, gone: &ServiceState, keep: &InUse) -> Result<(), ApplyError> {
        if !keep.keys.contains(&gone.key()) {
            self.dataplane.remove_service(gone.id, gone.key())?;
        }
        for b in gone
            .backends
            .iter()
            .filter(|b| !keep.backend_ids.contains(&b.id))
        {
            self.dataplane.set_backend(b.id, b.address, false)?;
        }
        log::info!("service \"{}\" removed", gone.config.name);
        Ok(())
    }

    /// IPv6's forwarding on the configured interfaces and the bridges' ports (the tc program's
    /// FIB lookups need it on the port a reply arrives by), for an IPv6 service: turned on
    /// with the first, recorded for `lb remove` (`sysctls`).
    fn enable_ipv6_forwarding(&self, service: &str) -> Result<(), ApplyError> {
        let ports = self.interfaces.iter().filter(|i| i.mode == "tc");
        for iface in self.config.interfaces.iter().chain(ports.map(|p| &p.name)) {
            let turned_on =
                crate::sysctls::enable_ipv6(iface, &self.state_dir).map_err(|source| {
                    ApplyError::Ipv6Forwarding {
                        service: service.to_owned(),
                        source,
                    }
                })?;
            for sysctl in turned_on {
                log::info!(
                    "set {sysctl}=1 for IPv6 service \"{service}\" ({iface} takes no router advertisements unless its accept_ra is 2; lb remove puts it back)"
                );
            }
        }
        Ok(())
    }

    /// The MSS `config`'s handshakes are clamped to: "auto" reads the MTUs of the configured
    /// interfaces now.
    fn resolve_mss(&self, config: &ServiceConfig) -> Result<Option<u16>, ApplyError> {
        let Some(mss) = config.mss else {
            return Ok(None);
        };
        let mut mtus = Vec::new();
        if mss == Mss::Auto {
            for name in &self.config.interfaces {
                mtus.push(interface_mtu(name).map_err(|source| ApplyError::MssMtu {
                    service: config.name.clone(),
                    interface: name.clone(),
                    source,
                })?);
            }
        }
        let headroom = if config.vip.is_ipv4() {
            crate::config::MSS_HEADROOM
        } else {
            crate::config::MSS_HEADROOM6
        };
        match mss.resolve(mtus, headroom) {
            Some(mss) => Ok(Some(mss)),
            None => Err(ApplyError::MssNoInterfaces {
                service: config.name.clone(),
            }),
        }
    }

    /// A changed or new service, written to the maps: its backends (new ones as their first
    /// probe found them), then its table, then the removal of what it no longer has.
    fn build(
        &mut self,
        p: PlacedService,
        resolved: Resolved,
        previous: Option<ServiceState>,
        probes: &Probes,
        fresh_counters: bool,
        keep: &InUse,
    ) -> Result<ServiceState, ApplyError> {
        let name = p.config.name.clone();
        if p.config.vip.is_ipv6() {
            self.enable_ipv6_forwarding(&name)?;
        }
        let health_same = previous
            .as_ref()
            .is_some_and(|prev| prev.config.health == p.config.health);
        let previous_discovery_error = previous.as_ref().and_then(|p| p.discovery_error.clone());
        let (old_key, mut old_backends) = match previous {
            Some(mut prev) => (
                Some((prev.id, prev.key())),
                std::mem::take(&mut prev.backends),
            ),
            None => (None, Vec::new()),
        };
        // A new VIP: the old key goes first, so a full SERVICES map has room for the new one.
        if let Some((id, key)) = old_key
            && key != service_key(&p.config)
            && !keep.keys.contains(&key)
        {
            self.dataplane.remove_service(id, key)?;
        }
        let mut backends = Vec::with_capacity(p.config.backends.len());
        for (b, &id) in p.config.backends.iter().zip(&p.backend_ids) {
            let kept = old_backends
                .iter()
                .position(|o| o.id == id && o.address == b.address)
                .map(|i| old_backends.swap_remove(i));
            let existed = kept.is_some();
            let kept_up = match kept {
                Some(mut k) if health_same => {
                    k.weight = b.weight;
                    backends.push(k);
                    continue;
                }
                // Its health check changed: probed again, its probe task replaced.
                Some(k) => k.tracker.healthy,
                None => false,
            };
            // Up before (in this daemon, or in the adopted data path): one failed first probe
            // must not take down its established flows; the tracker's `fall` decides.
            let was_up = kept_up
                || (!fresh_counters && self.dataplane.backend_entry(id) == Some((b.address, true)));
            let first = probes
                .get(&(b.address, p.config.health.clone()))
                .cloned()
                .unwrap_or_else(|| Err("not probed yet".into()));
            if fresh_counters && !existed {
                self.dataplane.reset_backend_stats(id)?;
                self.dataplane.reset_flow_counts(id)?;
                self.dataplane.clear_snat_ports(id)?;
                // A reused id must not inherit its last holder's suspect mark.
                self.dataplane.clear_suspect(id)?;
            }
            let mut tracker = Tracker::new(
                first.is_ok() || was_up,
                p.config.health.rise,
                p.config.health.fall,
            );
            if let Err(e) = &first {
                // With `fall = 1` this one failure takes an adopted "up" backend down.
                tracker.record(false);
                if !tracker.healthy {
                    log::warn!("service \"{name}\": backend {} starts down: {e}", b.address);
                }
            }
            // The data path's state is the tracker's, whatever the first probe said.
            let healthy = tracker.healthy;
            self.dataplane.set_backend(id, b.address, healthy)?;
            // Added to a running service: it ramps up. A new service's backends all start
            // together, and a ramp shared by all of them would change no share.
            let ramp = if healthy && !was_up && old_key.is_some() {
                Ramping::start(monotonic_ns(), p.config.slow_start)
            } else {
                None
            };
            backends.push(BackendState {
                id,
                address: b.address,
                weight: b.weight,
                tracker,
                active_flows: 0,
                last_error: first.err(),
                snat_ports_in_use: 0,
                suspect_since: None,
                ramp,
                probe_task: Some(self.spawn_probe(id, b.address, &p.config)),
            });
        }
        let service = ServiceState {
            id: p.id,
            config: ServiceConfig {
                backends: Vec::new(),
                ..p.config
            },
            snat: resolved.snat,
            mss: resolved.mss,
            backends,
            avoided: BTreeSet::new(),
            discovery_error: previous_discovery_error,
        };
        publish(&mut self.dataplane, &service)?;
        // Backends the service no longer has stop taking flows: their flows move.
        for gone in old_backends
            .iter()
            .filter(|b| !keep.backend_ids.contains(&b.id))
        {
            self.dataplane.set_backend(gone.id, gone.address, false)?;
        }
        let rewrite = match service.config.mode {
            ForwardingMode::Nat => format!("snat {}", pool_text(&service.snat)),
            mode if mode.is_tunnel() => format!("mode {mode} from {}", pool_text(&service.snat)),
            mode => format!("mode {mode}"),
        };
        log::info!(
            "service \"{name}\" {} {} {rewrite}: {} backends",
            service.config.vip,
            service.config.protocol,
            service.backends.len()
        );
        Ok(service)
    }

    fn spawn_probe(&self, id: u32, address: SocketAddr, service: &ServiceConfig) -> AbortHandle {
        let cfg = service.health.clone();
        let reports = self.health.clone();
        // A DSR backend of a TCP service must also answer at the VIP, reached as clients reach
        // it (a SYN is the one probe every TCP service answers).
        let vip_probe = (service.mode.is_dsr()
            && service.protocol == Protocol::Tcp
            && cfg.kind != HealthKind::None)
            .then_some((service.vip, dsr_probe::Tunnel::of(service.mode)));
        // Spread probes of many backends over the interval.
        let delay = health::initial_delay(cfg.interval, id as usize % 16, 16);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let started_ns = crate::dataplane::monotonic_ns();
                let mut result = health::probe(address, &cfg).await;
                if let (Ok(()), Some((vip, tunnel))) = (&result, vip_probe) {
                    result = dsr_probe::probe(vip, address.ip(), tunnel, cfg.timeout).await;
                }
                let report = HealthReport {
                    backend: id,
                    address,
                    result,
                    started_ns,
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
        })
        .abort_handle()
    }

    /// Writes the services to the state file; a failure is logged and returned as a warning.
    pub fn persist(&self) -> Option<String> {
        let state = Persisted {
            config_digest: self.config_digest.clone(),
            services: self.placed(),
        };
        match persist::save(&self.state_dir, &state) {
            Ok(()) => None,
            Err(e) => {
                log::error!("saving the runtime state: {e}");
                Some(format!(
                    "applied, but not saved ({e}): a restart would undo it"
                ))
            }
        }
    }

    fn find_service(&self, name_or_vip: &str) -> Result<usize, String> {
        if let Some(i) = self
            .services
            .iter()
            .position(|s| s.config.name == name_or_vip)
        {
            return Ok(i);
        }
        let Ok(vip) = name_or_vip.parse::<SocketAddr>() else {
            return Err(format!(
                "no service named \"{name_or_vip}\" (give a service name or its VIP:PORT)"
            ));
        };
        let matches: Vec<usize> = (0..self.services.len())
            .filter(|&i| self.services[i].config.vip == vip)
            .collect();
        match matches[..] {
            [i] => Ok(i),
            [] => Err(format!("no service has the VIP {vip}")),
            _ => Err(format!(
                "{vip} is the VIP of a TCP and a UDP service; give the service name instead"
            )),
        }
    }

    /// Which backend a flow from `client` to the service gets, and why (`explain`). With a
    /// `protocol`, a VIP:PORT names that protocol's service.
    pub fn explain(
        &self,
        service: &str,
        client: SocketAddr,
        protocol: Option<crate::config::Protocol>,
    ) -> Response {
        let found = match protocol {
            Some(p) => self
                .services
                .iter()
                .position(|s| {
                    s.config.protocol == p
                        && (s.config.name == service || s.config.vip.to_string() == service)
                })
                .ok_or_else(|| match self.find_service(service) {
                    Ok(i) => format!(
                        "service \"{}\" is {}, not {p}",
                        self.services[i].config.name, self.services[i].config.protocol
                    ),
                    Err(e) => e,
                }),
            None => self.find_service(service),
        };
        let svc = match found {
            Ok(i) => &self.services[i],
            Err(e) => return Response::bad_input(e),
        };
        if client.is_ipv4() != svc.config.vip.is_ipv4() {
            return Response::bad_input(format!(
                "client {client} and vip {} of service \"{}\" are of different address families",
                svc.config.vip, svc.config.name
            ));
        }
        match self.explanation(svc, client) {
            Ok(e) => Response::explanation(e),
            Err(e) => Response::failed(format!("reading the data path: {e}")),
        }
    }

    fn explanation(
        &self,
        svc: &ServiceState,
        client: SocketAddr,
    ) -> Result<crate::explain::Explanation, DataplaneError> {
        use crate::explain::{self, BackendView, ExistingFlow, Explanation, NewFlow};
        let vip = svc.config.vip;
        let proto = svc.config.protocol.number();
        let describe = |id: u32| -> String {
            svc.backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| b.address.to_string())
                .or_else(|| {
                    self.dataplane
                        .backend_entry(id)
                        .map(|(addr, _)| format!("{addr} (removed, terminating)"))
                })
                .unwrap_or_else(|| format!("backend id {id} (unknown)"))
        };
        let now = monotonic_ns();
        let existing_flow =
            |backend_id: u32, state: u32, snat: SocketAddr, last_seen_ns: u64| ExistingFlow {
                backend: describe(backend_id),
                state: lb_common::conntrack::STATES
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or_else(|| format!("state {state}"), |(_, name)| (*name).to_owned()),
                snat: snat.to_string(),
                idle_ms: now.saturating_sub(last_seen_ns) / 1_000_000,
            };
        // The flow's entry and hash in its family's table.
        let (existing, hash) = match (client, vip) {
            (SocketAddr::V4(client), SocketAddr::V4(vip)) => {
                let key = lb_common::FlowKey {
                    src_addr: Be32::from_bytes(client.ip().octets()),
                    dst_addr: Be32::from_bytes(vip.ip().octets()),
                    src_port: Be16::from_host(client.port()),
                    dst_port: Be16::from_host(vip.port()),
                    proto,
                    _pad: [0; 3],
                };
                let existing = self.dataplane.flow(&key).map(|f| {
                    let snat = Ipv4Addr::from(f.nat_src_addr.to_bytes());
                    let snat = SocketAddr::new(snat.into(), f.nat_src_port.to_host());
                    existing_flow(f.backend_id, f.state, snat, f.last_seen_ns)
                });
                (existing, key.hash())
            }
            (SocketAddr::V6(client), SocketAddr::V6(vip)) => {
                let key = lb_common::FlowKey6 {
                    src_addr: In6::from_bytes(client.ip().octets()),
                    dst_addr: In6::from_bytes(vip.ip().octets()),
                    src_port: Be16::from_host(client.port()),
                    dst_port: Be16::from_host(vip.port()),
                    proto,
                    _pad: [0; 3],
                };
                let existing = self.dataplane.flow6(&key).map(|f| {
                    let snat = Ipv6Addr::from(f.nat_src_addr.to_bytes());
                    let snat = SocketAddr::new(snat.into(), f.nat_src_port.to_host());
                    existing_flow(f.backend_id, f.state, snat, f.last_seen_ns)
                });
                (existing, key.hash())
            }
            _ => return Err(DataplaneError::ClientFamily),
        };
        let size = self.dataplane.settings().maglev_size;
        let slot = hash % size;
        let slots = self
            .dataplane
            .live_slots(&svc.key(), slot, 1 + lb_common::SUSPECT_PROBES)?;
        let is_suspect = |id: u32| self.dataplane.live_suspect_mark(id, now).is_some();
        let (chosen, slots_walked, steered_off) = explain::choose(&slots, is_suspect);
        let table = svc.table(size);
        Ok(Explanation {
            service: svc.config.name.clone(),
            vip: vip.to_string(),
            protocol: svc.config.protocol.to_string(),
            client: client.to_string(),
            existing,
            new_flow: NewFlow {
                backend: chosen.map(describe),
                hash,
                slot,
                table_size: size,
                steered_off: steered_off.map(describe),
                slots_walked,
            },
            backends: svc
                .backends
                .iter()
                .map(|b| BackendView {
                    address: b.address.to_string(),
                    weight: b.weight,
                    healthy: b.tracker.healthy,
                    suspect: is_suspect(b.id),
                    slow_start_percent: b.ramp.map(|r| r.published.percent()),
                    table_percent: explain::table_percent(&table, b.id),
                })
                .collect(),
        })
    }

    /// The name of the service `name_or_vip` names.
    pub fn service_name(&self, name_or_vip: &str) -> Result<String, String> {
        self.find_service(name_or_vip)
            .map(|i| self.services[i].config.name.clone())
    }

    pub fn set_weight(&mut self, service: &str, backend: &str, weight: u32) -> Response {
        let index = match self.find_service(service) {
            Ok(i) => i,
            Err(e) => return Response::bad_input(e),
        };
        if weight > MAX_WEIGHT {
            return Response::bad_input(format!(
                "weight {weight} is out of range 0..={MAX_WEIGHT}"
            ));
        }
        let Ok(address) = backend.parse::<SocketAddr>() else {
            return Response::bad_input(format!(
                "backend {backend:?} is not an address with port (like 198.18.2.11:8000 or [fd00:2::11]:8000)"
            ));
        };
        let svc = &mut self.services[index];
        let Some(b) = svc.backends.iter_mut().find(|b| b.address == address) else {
            return Response::bad_input(format!(
                "backend {address} is not in service \"{}\"",
                svc.config.name
            ));
        };
        if b.weight == weight {
            return Response::done();
        }
        let old = std::mem::replace(&mut b.weight, weight);
        let name = svc.config.name.clone();
        if let Err(e) = publish(&mut self.dataplane, &self.services[index]) {
            // Keep what the data path still has.
            if let Some(b) = self.services[index]
                .backends
                .iter_mut()
                .find(|b| b.address == address)
            {
                b.weight = old;
            }
            return Response::failed(format!("updating the data path: {e}"));
        }
        log::info!("service \"{name}\": backend {address} weight {old} -> {weight}");
        Response::done().with_message(self.persist())
    }

    pub fn record_health(&mut self, report: HealthReport) {
        let Some((s, b)) = self.services.iter().enumerate().find_map(|(s, svc)| {
            svc.backends
                .iter()
                .position(|b| b.id == report.backend && b.address == report.address)
                .map(|b| (s, b))
        }) else {
            return;
        };
        let health = &self.services[s].config.health;
        // Only a check of the port clients use can take back what the data path saw there.
        let checks_service_port = health.kind != HealthKind::None
            && health.port.is_none_or(|p| p == report.address.port());
        let ok = report.result.is_ok();
        self.services[s].backends[b].last_error = report.result.err();
        if ok && checks_service_port {
            // The health check confirms the backend: a suspect mark from before this probe
            // goes, and new flows may go to it again.
            let id = report.backend;
            match self.dataplane.suspect_since(id) {
                Ok(Some(since)) if since <= report.started_ns => {
                    if let Err(e) = self.dataplane.clear_suspect(id) {
                        log::error!("clearing backend {} suspect: {e}", report.address);
                    } else {
                        log::info!(
                            "backend {} passed its health check: no longer suspect",
                            report.address
                        );
                        self.services[s].backends[b].suspect_since = None;
                        self.steer_off_suspects(s);
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("reading SUSPECT: {e}"),
            }
        }
        let slow_start = self.services[s].config.slow_start;
        let backend = &mut self.services[s].backends[b];
        let Some(healthy) = backend.tracker.record(ok) else {
            return;
        };
        backend.ramp = if healthy {
            Ramping::start(monotonic_ns(), slow_start)
        } else {
            None
        };
        let (id, address) = (backend.id, backend.address);
        let why = backend.last_error.clone().unwrap_or_default();
        let name = self.services[s].config.name.clone();
        let written = self
            .dataplane
            .set_backend(id, address, healthy)
            .and_then(|()| publish(&mut self.dataplane, &self.services[s]));
        match (written, healthy) {
            (Err(e), _) => log::error!(
                "service \"{name}\": backend {address} is {}, but updating the data path failed: {e}",
                if healthy { "up" } else { "down" }
            ),
            (Ok(()), true) => log::info!("service \"{name}\": backend {address} is up"),
            (Ok(()), false) => log::warn!("service \"{name}\": backend {address} is down: {why}"),
        }
        if !healthy && self.services[s].config.on_backend_down == OnBackendDown::Reset {
            match cut::backends(&mut self.dataplane, &[id].into()) {
                Ok(cut) => log::warn!(
                    "service \"{name}\": backend {address} down with on_backend_down = \"reset\": {} connections cut, {} RSTs sent",
                    cut.connections,
                    cut.resets
                ),
                Err(e) => log::error!("cutting backend {address}'s connections: {e}"),
            }
        }
    }

    /// Moves every slow start to the step its time has come to, publishing the tables that
    /// change, and ends the ramps that are done.
    pub fn advance_ramps(&mut self) {
        let now = monotonic_ns();
        for s in 0..self.services.len() {
            let svc = &mut self.services[s];
            let duration = svc.config.slow_start;
            let mut changed = false;
            for b in &mut svc.backends {
                let Some(ramp) = &mut b.ramp else { continue };
                let at = Ramp::at(
                    std::time::Duration::from_nanos(now.saturating_sub(ramp.since_ns)),
                    duration,
                );
                if at == ramp.published {
                    continue;
                }
                ramp.published = at;
                changed = true;
            }
            if !changed {
                continue;
            }
            let name = svc.config.name.clone();
            if let Err(e) = publish(&mut self.dataplane, &self.services[s]) {
                log::error!("service \"{name}\": publishing a slow-start step: {e}");
                continue;
            }
            for b in &mut self.services[s].backends {
                let Some(ramp) = b.ramp else { continue };
                if ramp.published == Ramp::Done {
                    log::info!(
                        "service \"{name}\": backend {} has its full weight",
                        b.address
                    );
                    b.ramp = None;
                } else {
                    log::debug!(
                        "service \"{name}\": backend {} at {}% of its weight",
                        b.address,
                        ramp.published.percent()
                    );
                }
            }
        }
    }

    /// Keeps the tc program on every port of the configured bridges: containers come and go,
    /// and a restarted one brings a new veth.
    pub fn follow_bridges(&mut self) {
        let mut now: Vec<(String, String, u32)> = Vec::new();
        for bridge in self.config.interfaces.iter().filter(|n| host::is_bridge(n)) {
            for port in host::bridge_ports(bridge) {
                if let Ok(index) = crate::dataplane::ifindex(&port) {
                    now.push((bridge.clone(), port, index));
                }
            }
        }
        let gone: Vec<String> = self
            .interfaces
            .iter()
            .filter(|i| {
                i.mode == "tc" && !now.iter().any(|(_, p, x)| *p == i.name && *x == i.ifindex)
            })
            .map(|i| i.name.clone())
            .collect();
        for port in gone {
            self.dataplane.forget_tc(&port);
            self.interfaces.retain(|i| i.name != port);
            log::info!("bridge port {port} went away");
        }
        let followed = now.clone();
        for (bridge, port, _) in now {
            if self.interfaces.iter().any(|i| i.name == port) {
                continue;
            }
            let attached = self
                .enable_port_forwarding(&port)
                .and_then(|()| self.dataplane.attach_tc(&port).map_err(|e| e.to_string()));
            match attached {
                Ok(ifindex) => {
                    log::info!("attached the tc program to {port} (a port of {bridge})");
                    self.interfaces.push(InterfaceStatus {
                        name: port,
                        ifindex,
                        mode: "tc".into(),
                        why: Some(format!(
                            "a port of bridge {bridge}: containers' veths send partial checksums, which XDP cannot finish"
                        )),
                    });
                }
                Err(e) => log::warn!("bridge {bridge} port {port}: {e}"),
            }
        }
        let ports: Vec<(u32, u32)> = self
            .interfaces
            .iter()
            .filter(|i| i.mode == "tc")
            .filter_map(|port| {
                let (bridge, _, _) = followed.iter().find(|(_, p, _)| *p == port.name)?;
                let bridge = self.interfaces.iter().find(|b| b.name == *bridge)?;
                Some((port.ifindex, bridge.ifindex))
            })
            .collect();
        if let Err(e) = self.dataplane.set_bridge_ports(&ports) {
            log::warn!("telling the data path the bridges' ports: {e}");
        }
    }

    /// Forwarding on a bridge's port in each family lb serves: the FIB lookup of a reply needs
    /// it on the device the reply arrived by.
    fn enable_port_forwarding(&self, port: &str) -> Result<(), String> {
        crate::daemon::enable_forwarding(port, &self.state_dir).map_err(|e| e.to_string())?;
        if self.services.iter().any(|s| s.config.vip.is_ipv6()) {
            let turned_on =
                crate::sysctls::enable_ipv6(port, &self.state_dir).map_err(|e| e.to_string())?;
            for sysctl in turned_on {
                log::info!("set {sysctl}=1 (for the replies of IPv6 services' containers)");
            }
        }
        Ok(())
    }

    /// The services that take backends from DNS, and how.
    /// Each discovering service's name, discovery and VIP (whose family its records take).
    pub fn discoveries(&self) -> Vec<(String, DiscoveryConfig, SocketAddr)> {
        self.services
            .iter()
            .filter_map(|s| {
                let d = s.config.discovery.clone()?;
                Some((s.config.name.clone(), d, s.config.vip))
            })
            .collect()
    }

    /// Records how the last resolution of `service`'s discovery went (`None`: it answered).
    pub fn record_discovery(&mut self, service: &str, error: Option<String>) {
        let Some(svc) = self.services.iter_mut().find(|s| s.config.name == service) else {
            return;
        };
        match (&svc.discovery_error, &error) {
            (None, Some(e)) => {
                log::warn!("service \"{service}\": {e}; its backends stay as they are")
            }
            (Some(_), None) => log::info!("service \"{service}\": its discovery answers again"),
            _ => {}
        }
        svc.discovery_error = error;
    }

    /// The data path's counts for every backend the daemon knows, terminating ones included.
    pub fn count_flows(&self) -> Result<FlowSweep, DataplaneError> {
        let ids = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .chain(self.terminating.iter().map(|t| t.id));
        self.dataplane.count_flows(ids.collect::<BTreeSet<u32>>())
    }

    pub fn record_sweep(&mut self, sweep: &FlowSweep) {
        self.flow_entries = sweep.entries;
        self.counted_ns = sweep.started_ns;
        if let Err(e) = self.end_terminating(Some(sweep)) {
            log::error!("ending terminating backends: {e}");
        }
        self.warnings = self.exhaustion(sweep);
        for w in &self.warnings {
            log::warn!("{w}");
        }
        let problems: Vec<String> = self
            .return_path_problems()
            .into_iter()
            .chain(self.bridge_problems())
            .collect();
        for problem in problems.iter().filter(|p| !self.setup_problems.contains(p)) {
            log::warn!("{problem}");
        }
        self.setup_problems = problems;
        self.warnings.extend(self.setup_problems.iter().cloned());
        for svc in &mut self.services {
            for b in &mut svc.backends {
                b.active_flows = sweep.active.get(&b.id).copied().unwrap_or(0);
                b.snat_ports_in_use = if svc.config.mode.is_nat() {
                    sweep.ports.get(&b.id).copied().unwrap_or(0)
                } else {
                    0
                };
                let since = self.dataplane.live_suspect_mark(b.id, sweep.started_ns);
                if since.is_some() && b.suspect_since.is_none() {
                    log::warn!(
                        "service \"{}\": backend {} refused or left unanswered a new connection; new connections avoid it until a health check passes",
                        svc.config.name,
                        b.address
                    );
                }
                b.suspect_since = since;
            }
        }
        for s in 0..self.services.len() {
            self.steer_off_suspects(s);
        }
    }

    /// Republishes service `s`'s table without its suspect backends, within the share
    /// `steering` allows, and clears the marks beyond it.
    fn steer_off_suspects(&mut self, s: usize) {
        let svc = &self.services[s];
        let candidates: Vec<Candidate> = svc
            .eligible()
            .map(|b| Candidate {
                id: b.id,
                marked_since: b.suspect_since,
            })
            .collect();
        let decision = steering::decide(&candidates);
        let name = svc.config.name.clone();
        for &id in &decision.unmarked {
            let Some(b) = self.services[s].backends.iter_mut().find(|b| b.id == id) else {
                continue;
            };
            match self.dataplane.clear_suspect(id) {
                Ok(()) => {
                    log::warn!(
                        "service \"{name}\": backend {} is suspect, but half of the backends already are: new flows still go to it",
                        b.address
                    );
                    b.suspect_since = None;
                }
                Err(e) => log::error!("clearing backend {} suspect: {e}", b.address),
            }
        }
        if decision.avoided == self.services[s].avoided {
            return;
        }
        let before = std::mem::replace(&mut self.services[s].avoided, decision.avoided);
        if let Err(e) = publish(&mut self.dataplane, &self.services[s]) {
            log::error!("service \"{name}\": publishing its table without suspect backends: {e}");
            self.services[s].avoided = before;
            return;
        }
        let svc = &self.services[s];
        let listed = |ids: &BTreeSet<u32>| -> Vec<String> {
            svc.backends
                .iter()
                .filter(|b| ids.contains(&b.id))
                .map(|b| b.address.to_string())
                .collect()
        };
        log::info!(
            "service \"{name}\": new flows avoid suspect backends [{}] (were [{}])",
            listed(&svc.avoided).join(", "),
            listed(&before).join(", ")
        );
    }

    /// What ran out since the last sweep, or is about to: new flows dropped because the flow
    /// table was full or a backend had no SNAT port left, and tables or port ranges 90% used.
    /// Existing flows are not affected by either; the warnings say what to change.
    fn exhaustion(&mut self, sweep: &FlowSweep) -> Vec<String> {
        let mut warnings = Vec::new();
        let drops = exhaustion_drops(&self.dataplane).unwrap_or(self.exhaustion_drops);
        let (full, no_port) = (
            drops.0.saturating_sub(self.exhaustion_drops.0),
            drops.1.saturating_sub(self.exhaustion_drops.1),
        );
        self.exhaustion_drops = drops;
        let capacity = u64::from(self.dataplane.settings().flow_capacity);
        if full > 0 {
            warnings.push(format!(
                "flow table full: {full} new flows dropped since the last sweep (existing flows are unaffected); raise [flows] capacity ({capacity}) or shorten the idle timeouts"
            ));
        } else if self.flow_entries * 10 >= capacity * 9 {
            warnings.push(format!(
                "flow table {}% full ({} of {capacity} entries)",
                self.flow_entries * 100 / capacity.max(1),
                self.flow_entries
            ));
        }
        if no_port > 0 {
            warnings.push(format!(
                "SNAT ports exhausted: {no_port} new flows dropped since the last sweep (existing flows are unaffected); widen [flows] snat_ports or add backends"
            ));
        }
        // A DNAT service's flows hold no SNAT port.
        for svc in self.services.iter().filter(|s| s.config.mode.is_nat()) {
            let range = self.snat_ports_per_backend() * svc.snat.len() as u64;
            for b in &svc.backends {
                let used = sweep.ports.get(&b.id).copied().unwrap_or(0);
                if used * 10 >= range * 9 {
                    warnings.push(format!(
                        "service \"{}\": backend {} holds {used} of its {range} SNAT ports",
                        svc.config.name, b.address
                    ));
                }
            }
        }
        warnings
    }

    /// Configured bridges without a MAC of their own. Such a bridge takes its ports' lowest,
    /// so a container that comes or goes can change it: the kernel then flushes the bridge's
    /// neighbours, and the containers send to the old MAC (which the bridge floods) until
    /// their ARP entries age, so new connections lose their first packets meanwhile.
    fn bridge_problems(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .filter(|i| i.mode == "bridge" && !host::has_own_mac(&i.name))
            .map(|i| {
                format!(
                    "bridge {0} has no MAC of its own: it takes its ports', so a container that comes or goes can change it and cost new connections their first packets; give it one (ip link set {0} address ...), as Docker does",
                    i.name
                )
            })
            .collect()
    }

    /// Backends of DNAT and DSR services that are not on a segment lb forwards through
    /// (`return_path`): a DNAT backend's replies would bypass lb, a MAC rewrite cannot reach a
    /// DSR one.
    fn return_path_problems(&self) -> Vec<String> {
        let on_link = || {
            self.services
                .iter()
                .filter(|s| s.config.mode.needs_backends_on_link())
        };
        if on_link().next().is_none() {
            return Vec::new();
        }
        let routes = match return_path::read_routes() {
            Ok(routes) => routes,
            Err(e) => return vec![format!("cannot check backends' routes: {e}")],
        };
        let managed = &self.config.interfaces;
        let routes = &routes;
        on_link()
            .flat_map(|svc| {
                let mode = svc.config.mode;
                let outcome = match mode {
                    ForwardingMode::DsrL2 => {
                        "a MAC rewrite cannot reach it, and its new flows are dropped (dsr_cannot_forward)"
                    }
                    _ => {
                        "its replies would bypass lb and the connections fail (use mode \"nat\", or make lb the backend's gateway)"
                    }
                };
                svc.backends.iter().filter_map(move |b| {
                    return_path::problem(routes, b.address.ip(), managed).map(|why| {
                        format!(
                            "service \"{}\" (mode {mode}): {why}; {outcome}",
                            svc.config.name
                        )
                    })
                })
            })
            .collect()
    }

    fn snat_ports_per_backend(&self) -> u64 {
        let s = self.dataplane.settings();
        u64::from(s.snat_port_max) - u64::from(s.snat_port_min) + 1
    }

    pub fn keys(&self) -> Vec<VipKey> {
        self.services.iter().map(ServiceState::key).collect()
    }

    pub fn backend_ids(&self) -> Vec<u32> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    pub fn status(&self) -> Status {
        let mut counters = std::collections::BTreeMap::new();
        match self.dataplane.reason_counters() {
            Ok(c) => {
                for (r, n) in c.pass {
                    counters.insert(format!("pass_{}", r.name()), n);
                }
                for (r, n) in c.drop {
                    counters.insert(format!("drop_{}", r.name()), n);
                }
                counters.insert("tx".into(), c.tx);
                counters.insert("redirect".into(), c.redirect);
                for (name, n) in c.events {
                    counters.insert(format!("event_{name}"), n);
                }
            }
            Err(e) => log::warn!("reading counters: {e}"),
        }
        Status {
            services: self
                .services
                .iter()
                .map(|s| ServiceStatus {
                    name: s.config.name.clone(),
                    vip: s.config.vip.to_string(),
                    protocol: s.config.protocol.to_string(),
                    mode: s.config.mode.to_string(),
                    snat: s.snat.iter().map(IpAddr::to_string).collect(),
                    mss: s.mss,
                    discovery: s.config.discovery.as_ref().map(ToString::to_string),
                    discovery_error: s.discovery_error.clone(),
                    slow_start_ms: (!s.config.slow_start.is_zero())
                        .then_some(s.config.slow_start.as_millis() as u64),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let stats = self.dataplane.backend_stats(b.id).unwrap_or_default();
                            BackendStatus {
                                address: b.address.to_string(),
                                weight: b.weight,
                                healthy: b.tracker.healthy,
                                suspect: b.suspect_since.is_some(),
                                slow_start_percent: b.ramp.map(|r| r.published.percent()),
                                source: if s.config.discovered.contains(&b.address) {
                                    BackendSource::Dns
                                } else {
                                    BackendSource::Config
                                },
                                active_flows: b.active_flows,
                                snat_ports_in_use: b.snat_ports_in_use,
                                new_flows: stats.new_flows,
                                packets: stats.packets,
                                bytes: stats.bytes,
                                last_error: b.last_error.clone(),
                            }
                        })
                        .collect(),
                })
                .collect(),
            interfaces: self.interfaces.clone(),
            host: self.host.clone(),
            flows: FlowTableStatus {
                entries: self.flow_entries,
                capacity: u64::from(self.dataplane.settings().flow_capacity),
                counted_ns: self.counted_ns,
            },
            counters,
            snat_ports_per_backend: self.snat_ports_per_backend(),
            debug_log: self.dataplane.debug_log(),
            warnings: self.warnings.clone(),
            terminating: {
                let now = monotonic_ns();
                self.terminating
                    .iter()
                    .map(|t| TerminatingStatus {
                        service: t.service.clone(),
                        address: t.address.to_string(),
                        active_flows: t.active_flows,
                        grace_left_ms: t.until_ns.saturating_sub(now) / 1_000_000,
                    })
                    .collect()
            },
        }
    }
}

/// New flows dropped so far because the flow table was full, and for want of a SNAT port.
fn exhaustion_drops(dataplane: &Dataplane) -> Option<(u64, u64)> {
    let c = dataplane.reason_counters().ok()?;
    let count = |r: DropReason| c.drop.iter().find(|d| d.0 == r).map_or(0, |d| d.1);
    Some((
        count(DropReason::FlowTableFull),
        count(DropReason::SnatPortsExhausted),
    ))
}

/// The SNAT pool of a service: its own, or the address the kernel uses towards its first
/// backend.
/// An interface's MTU, as the kernel reports it.
fn interface_mtu(name: &str) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn resolve_snat(config: &ServiceConfig) -> Result<Vec<IpAddr>, ApplyError> {
    if !config.mode.has_source_pool() {
        return Ok(Vec::new());
    }
    if !config.snat.is_empty() {
        return Ok(config.snat.clone());
    }
    match config.backends.first() {
        Some(b) => source_address_towards(b.address)
            .map(|a| vec![a])
            .map_err(|source| ApplyError::NoSnat {
                service: config.name.clone(),
                backend: b.address,
                source,
            }),
        None => Err(ApplyError::NoSnatNoBackends {
            service: config.name.clone(),
        }),
    }
}

/// A SNAT pool as the log and the CLI show it.
pub fn pool_text(pool: &[IpAddr]) -> String {
    pool.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The source address the kernel would use towards `backend`.
pub(crate) fn source_address_towards(backend: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if backend.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(backend)?;
    Ok(socket.local_addr()?.ip())
}
