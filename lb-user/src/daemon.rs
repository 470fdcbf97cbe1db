//! `lb run`: loads and attaches the data path, publishes services and backends, runs health
//! checks and the flow sweeper, and serves the control socket until SIGINT/SIGTERM.
//! All map writes go through the one `Dataplane`, behind one lock.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_common::{Be16, Be32, ServiceKey};
use tokio::{io::AsyncWriteExt as _, io::BufReader, net::UnixStream, signal::unix::SignalKind};

use crate::{
    config::{Config, HealthConfig, MAX_WEIGHT, Protocol},
    control::{
        self, BackendStatus, FlowTableStatus, InterfaceStatus, Request, Response, ServiceStatus,
        Status,
    },
    dataplane::{Dataplane, DataplaneError, FlowSweep, FlowTable, FlowTimeouts, LoadSettings},
    health::{self, Tracker},
    maglev::{MaglevBackend, build_table},
};

/// How often idle flows are swept and active flows counted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("lb run needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN")]
    NotPrivileged,
    #[error(
        "service \"{service}\": no snat address given and none found towards {backend}: {source}; set `snat` in the config"
    )]
    NoSnat {
        service: String,
        backend: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "service \"{service}\" has no backends and no `snat` address; set `snat` in the config"
    )]
    NoSnatNoBackends { service: String },
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ports(#[from] crate::ports::PortsError),
    #[error("cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
}

struct BackendState {
    id: u32,
    address: SocketAddrV4,
    weight: u32,
    tracker: Tracker,
    active_flows: u64,
    last_error: Option<String>,
}

struct ServiceState {
    id: u32,
    name: String,
    vip: SocketAddrV4,
    protocol: Protocol,
    snat: Ipv4Addr,
    health: HealthConfig,
    backends: Vec<BackendState>,
}

impl ServiceState {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: Be32::from_bytes(self.vip.ip().octets()),
            port: Be16::from_host(self.vip.port()),
            proto: self.protocol.number(),
            _pad: 0,
        }
    }

    /// The Maglev table: backends that take new flows (healthy, weight > 0).
    fn table(&self, size: u32) -> Vec<u32> {
        let eligible: Vec<MaglevBackend> = self
            .backends
            .iter()
            .filter(|b| b.tracker.healthy && b.weight > 0)
            .map(|b| MaglevBackend {
                id: b.id,
                addr: b.address,
                weight: b.weight,
            })
            .collect();
        build_table(&eligible, size)
    }
}

/// Everything the daemon knows, behind one lock.
pub struct State {
    dataplane: Dataplane,
    services: Vec<ServiceState>,
    interfaces: Vec<InterfaceStatus>,
    timeouts: FlowTimeouts,
    flow_entries: u64,
}

impl State {
    fn publish(&mut self, index: usize) -> Result<(), DataplaneError> {
        let svc = &self.services[index];
        let table = svc.table(self.dataplane.settings().maglev_size);
        let (id, key, snat) = (svc.id, svc.key(), svc.snat);
        self.dataplane.set_service(id, key, snat, &table)
    }

    fn find_service(&self, name_or_vip: &str) -> Result<usize, String> {
        if let Some(i) = self.services.iter().position(|s| s.name == name_or_vip) {
            return Ok(i);
        }
        let Ok(vip) = name_or_vip.parse::<SocketAddrV4>() else {
            return Err(format!(
                "no service named \"{name_or_vip}\" (give a service name or its VIP:PORT)"
            ));
        };
        let matches: Vec<usize> = (0..self.services.len())
            .filter(|&i| self.services[i].vip == vip)
            .collect();
        match matches[..] {
            [i] => Ok(i),
            [] => Err(format!("no service has the VIP {vip}")),
            _ => Err(format!(
                "{vip} is the VIP of a TCP and a UDP service; give the service name instead"
            )),
        }
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
        let svc = &mut self.services[index];
        let Ok(address) = backend.parse::<SocketAddrV4>() else {
            return Response::bad_input(format!(
                "backend {backend:?} is not an IPv4 address with port (like 198.18.2.11:8000)"
            ));
        };
        let Some(b) = svc.backends.iter_mut().find(|b| b.address == address) else {
            return Response::bad_input(format!(
                "backend {address} is not in service \"{}\"",
                svc.name
            ));
        };
        if b.weight == weight {
            return Response::done();
        }
        let old = std::mem::replace(&mut b.weight, weight);
        let name = svc.name.clone();
        if let Err(e) = self.publish(index) {
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
        Response::done()
    }

    fn record_health(&mut self, s: usize, b: usize, result: Result<(), String>) {
        let backend = &mut self.services[s].backends[b];
        let ok = result.is_ok();
        backend.last_error = result.err();
        let Some(healthy) = backend.tracker.record(ok) else {
            return;
        };
        let (id, address) = (backend.id, backend.address);
        let name = self.services[s].name.clone();
        let why = self.services[s].backends[b]
            .last_error
            .clone()
            .unwrap_or_default();
        let written = self
            .dataplane
            .set_backend(id, address, healthy)
            .and_then(|()| self.publish(s));
        match (written, healthy) {
            (Err(e), _) => log::error!(
                "service \"{name}\": backend {address} is {}, but updating the data path failed: {e}",
                if healthy { "up" } else { "down" }
            ),
            (Ok(()), true) => log::info!("service \"{name}\": backend {address} is up"),
            (Ok(()), false) => log::warn!("service \"{name}\": backend {address} is down: {why}"),
        }
    }

    fn record_sweep(&mut self, sweep: &FlowSweep) {
        self.flow_entries = sweep.entries - sweep.removed;
        for b in self.services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
            b.active_flows = sweep.active.get(&b.id).copied().unwrap_or(0);
        }
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
            }
            Err(e) => log::warn!("reading counters: {e}"),
        }
        Status {
            services: self
                .services
                .iter()
                .map(|s| ServiceStatus {
                    name: s.name.clone(),
                    vip: s.vip.to_string(),
                    protocol: s.protocol.to_string(),
                    snat: s.snat.to_string(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| {
                            let stats = self.dataplane.backend_stats(b.id).unwrap_or_default();
                            BackendStatus {
                                address: b.address.to_string(),
                                weight: b.weight,
                                healthy: b.tracker.healthy,
                                active_flows: b.active_flows,
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
            flows: FlowTableStatus {
                entries: self.flow_entries,
                capacity: u64::from(self.dataplane.settings().flow_capacity),
            },
            counters,
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::status(self.status()),
            Request::SetWeight {
                service,
                backend,
                weight,
            } => self.set_weight(&service, &backend, weight),
        }
    }
}

fn monotonic_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid and clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC is the data path's clock (bpf_ktime_get_coarse_ns); `ts` is a
    // valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Root, or CAP_BPF (or CAP_SYS_ADMIN) together with CAP_NET_ADMIN.
fn privileged() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    (has(39) || has(21)) && has(12)
}

/// The source address the kernel would use towards `backend`.
fn source_address_towards(backend: SocketAddrV4) -> std::io::Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(backend)?;
    match socket.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(*a.ip()),
        std::net::SocketAddr::V6(_) => Err(std::io::Error::other("IPv6 source")),
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), DaemonError> {
    std::fs::write(path, value).map_err(|source| DaemonError::Sysctl {
        path: path.into(),
        source,
    })
}

/// bpf_fib_lookup needs forwarding on the ingress device; accept_local lets the kernel forward
/// packets passed up for neighbour resolution, whose source is now our own SNAT address.
fn enable_forwarding(iface: &str) -> Result<(), DaemonError> {
    for knob in ["forwarding", "accept_local"] {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/{knob}");
        if std::fs::read_to_string(&path)
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
        {
            continue;
        }
        write_sysctl(&path, "1")?;
        log::info!("set net.ipv4.conf.{iface}.{knob}=1 (needed to forward balanced traffic)");
    }
    Ok(())
}

/// Builds the state from the config: loads the program, fills the maps, probes every backend
/// once, and only then attaches, so no packet meets a half-filled map.
async fn start(config: &Config, paths: &Paths) -> Result<State, DaemonError> {
    let settings = LoadSettings {
        maglev_size: config.maglev_table_size,
        flow_capacity: config.flows.capacity,
        snat_port_min: config.flows.snat_port_min,
        snat_port_max: config.flows.snat_port_max,
    };
    let mut dataplane = Dataplane::load_pinned(settings, &paths.bpffs)?;
    let adopted = dataplane.adopted();
    if adopted {
        log::info!(
            "adopting the data path pinned in {}: its flows, counters and attachments carry on",
            paths.bpffs.display()
        );
    }
    let mut services = Vec::new();
    let mut next_backend = 0u32;
    for (id, svc) in (0u32..).zip(&config.services) {
        let snat = match (svc.snat, svc.backends.first()) {
            (Some(a), _) => a,
            (None, Some(b)) => {
                source_address_towards(b.address).map_err(|source| DaemonError::NoSnat {
                    service: svc.name.clone(),
                    backend: b.address,
                    source,
                })?
            }
            (None, None) => {
                return Err(DaemonError::NoSnatNoBackends {
                    service: svc.name.clone(),
                });
            }
        };
        let first = probe_all(svc).await;
        let mut backends = Vec::new();
        for (b, result) in svc.backends.iter().zip(first) {
            let healthy = result.is_ok();
            if let Err(e) = &result {
                log::warn!(
                    "service \"{}\": backend {} starts down: {e}",
                    svc.name,
                    b.address
                );
            }
            if !adopted {
                dataplane.reset_backend_stats(next_backend)?;
            }
            dataplane.set_backend(next_backend, b.address, healthy)?;
            backends.push(BackendState {
                id: next_backend,
                address: b.address,
                weight: b.weight,
                tracker: Tracker::new(healthy, svc.health.rise, svc.health.fall),
                active_flows: 0,
                last_error: result.err(),
            });
            next_backend += 1;
        }
        services.push(ServiceState {
            id,
            name: svc.name.clone(),
            vip: svc.vip,
            protocol: svc.protocol,
            snat,
            health: svc.health.clone(),
            backends,
        });
    }
    let mut state = State {
        dataplane,
        services,
        interfaces: Vec::new(),
        timeouts: FlowTimeouts {
            tcp_idle: config.flows.tcp_idle_timeout,
            tcp_closing: config.flows.tcp_closing_timeout,
            udp_idle: config.flows.udp_idle_timeout,
        },
        flow_entries: 0,
    };
    for i in 0..state.services.len() {
        state.publish(i)?;
        let s = &state.services[i];
        log::info!(
            "service \"{}\" {} {} snat {}: {} backends",
            s.name,
            s.vip,
            s.protocol,
            s.snat,
            s.backends.len()
        );
    }
    // What an earlier daemon published and this config no longer has.
    let keys: Vec<ServiceKey> = state.services.iter().map(ServiceState::key).collect();
    let stale = state.dataplane.retain_services(&keys)?;
    if stale > 0 {
        log::info!("removed {stale} services the config no longer has");
    }
    let ids: Vec<u32> = state
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.id))
        .collect();
    state.dataplane.clear_backends_except(&ids)?;
    for name in &config.interfaces {
        enable_forwarding(name)?;
        let ifindex = state.dataplane.attach(name)?;
        log::info!("attached to {name} (ifindex {ifindex}) in native mode");
        state.interfaces.push(InterfaceStatus {
            name: name.clone(),
            ifindex,
            mode: "native".into(),
        });
    }
    for name in state.dataplane.detach_others(&config.interfaces)? {
        log::info!("detached from {name}: no longer in the config");
    }
    Ok(state)
}

/// Where the daemon keeps what outlives it.
#[derive(Clone, Debug)]
pub struct Paths {
    pub socket: PathBuf,
    /// Maps and XDP links, on a bpf filesystem.
    pub bpffs: PathBuf,
    /// Files: the SNAT port reservation.
    pub state_dir: PathBuf,
}

/// Probes every backend of a service at once; results in backend order.
async fn probe_all(svc: &crate::config::ServiceConfig) -> Vec<Result<(), String>> {
    let handles: Vec<_> = svc
        .backends
        .iter()
        .map(|b| {
            let (address, cfg) = (b.address, svc.health.clone());
            tokio::spawn(async move { health::probe(address, &cfg).await })
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(
            handle
                .await
                .unwrap_or_else(|e| Err(format!("health probe task failed: {e}"))),
        );
    }
    results
}

pub async fn run(config: Config, paths: Paths) -> Result<(), DaemonError> {
    if !privileged() {
        return Err(DaemonError::NotPrivileged);
    }
    let socket = paths.socket.clone();
    // Before anything is loaded: a second daemon must not touch the first one's maps.
    let listener = control::bind(&socket).await?;
    let state = match start(&config, &paths).await {
        Ok(state) => state,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    crate::ports::reserve(
        config.flows.snat_port_min,
        config.flows.snat_port_max,
        &paths.state_dir,
    )?;
    log::info!("serving the control socket {}", socket.display());
    let state = Arc::new(Mutex::new(state));
    let mut tasks = tokio::task::JoinSet::new();
    spawn_health_checks(&state, &mut tasks);
    let (table, timeouts) = {
        let guard = lock(&state);
        (guard.dataplane.flow_table()?, guard.timeouts)
    };
    tasks.spawn(sweep_flows(table, timeouts, Arc::clone(&state)));
    let server = Arc::clone(&state);
    tasks.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let state = Arc::clone(&server);
                    tokio::spawn(serve(stream, state));
                }
                Err(e) => log::warn!("control socket accept: {e}"),
            }
        }
    });
    let mut term =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int =
        tokio::signal::unix::signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: exiting"),
        _ = int.recv() => log::info!("SIGINT: exiting"),
    }
    tasks.abort_all();
    let _ = std::fs::remove_file(&socket);
    drop(state);
    log::info!(
        "forwarding continues from the data path pinned in {}; the next `lb run` adopts it, `lb remove` ends it",
        paths.bpffs.display()
    );
    Ok(())
}

/// Every SWEEP_INTERVAL, expires idle flows on a blocking thread (a large table takes seconds)
/// and then records what the sweep counted, so that the runtime and the state stay free.
async fn sweep_flows(mut table: FlowTable, timeouts: FlowTimeouts, state: Arc<Mutex<State>>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let swept = tokio::task::spawn_blocking(move || {
            let result = table.sweep(monotonic_ns(), &timeouts);
            (table, result)
        })
        .await;
        match swept {
            Ok((back, result)) => {
                table = back;
                match result {
                    Ok(sweep) => lock(&state).record_sweep(&sweep),
                    Err(e) => log::error!("sweeping the flow table: {e}"),
                }
            }
            Err(e) => {
                log::error!("the flow sweeper stopped: {e}; idle flows no longer expire");
                return;
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock would be a bug; the state itself stays consistent because
    // every change is applied to the maps before it is recorded.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn spawn_health_checks(state: &Arc<Mutex<State>>, tasks: &mut tokio::task::JoinSet<()>) {
    let guard = lock(state);
    let count: usize = guard.services.iter().map(|s| s.backends.len()).sum();
    let mut n = 0;
    for (s, svc) in guard.services.iter().enumerate() {
        for (b, backend) in svc.backends.iter().enumerate() {
            let cfg = svc.health.clone();
            let address = backend.address;
            let state = Arc::clone(state);
            let delay = health::initial_delay(cfg.interval, n, count);
            n += 1;
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                let mut tick = tokio::time::interval(cfg.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = health::probe(address, &cfg).await;
                    lock(&state).record_health(s, b, result);
                }
            });
        }
    }
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(stream);
    let response = match control::read_request(&mut reader).await {
        Ok(request) => {
            log::debug!("control request {request:?}");
            lock(&state).handle(request)
        }
        Err(refusal) => {
            log::debug!("control request refused: {:?}", refusal.error);
            refusal
        }
    };
    let mut line = serde_json::to_string(&response).expect("responses always serialise");
    line.push('\n');
    let mut stream = reader.into_inner();
    if let Err(e) = stream.write_all(line.as_bytes()).await {
        log::debug!("control client went away: {e}");
    }
}
