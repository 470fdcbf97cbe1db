//! `lb run`: loads and attaches the data path, publishes services and backends, runs health
//! checks and the flow sweeper, and serves the control socket until SIGINT/SIGTERM.
//! All map writes go through the one `Dataplane`, behind one lock.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{io::BufReader, net::UnixStream, signal::unix::SignalKind};

use crate::{
    config::{BackendConfig, Config, HealthConfig, HostCgroup, ServiceConfig},
    control::{self, HostStatus, InterfaceStatus, Request, Response, Status},
    dataplane::{Dataplane, DataplaneError, LoadSettings},
    discovery, health,
    layout::{self, PlacedService},
    metrics, persist,
    state::{ApplyError, HealthReport, Probes, State},
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
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the services cannot be placed in the maps: {0}")]
    Layout(String),
    #[error(transparent)]
    Sysctl(#[from] crate::sysctls::SysctlError),
    #[error(transparent)]
    Ports(#[from] crate::ports::PortsError),
    #[error("cannot serve metrics on {listen} (give --metrics another IP:PORT, or off)")]
    Metrics {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
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

/// Forwarding and accept_local on for `iface` (`sysctls.rs`), recorded for `lb remove`.
pub(crate) fn enable_forwarding(
    iface: &str,
    state_dir: &std::path::Path,
) -> Result<(), DaemonError> {
    for sysctl in crate::sysctls::enable(iface, state_dir)? {
        log::info!(
            "set {sysctl}=1 (needed to forward balanced traffic; the host now routes for {iface}: see the README's \"Firewall\"; lb remove puts it back)"
        );
    }
    Ok(())
}

/// The services to run at start, with their ids: the persisted state if the config file is
/// unchanged since it was written, else the config's (see `persist` for the precedence).
fn initial_services(
    config: &Config,
    digest: &str,
    state_dir: &std::path::Path,
    adopted: &[layout::AdoptedService],
) -> Result<Vec<PlacedService>, DaemonError> {
    let previous = match persist::load(state_dir) {
        Ok(p) => p,
        Err(e) => {
            let aside = persist::set_aside(state_dir);
            log::error!(
                "ignoring the runtime state: {e}; starting from the config{}",
                aside.map_or(String::new(), |p| format!(
                    " (the file is kept as {})",
                    p.display()
                ))
            );
            None
        }
    };
    let old_ids = match previous {
        Some(p) if p.config_digest == digest => {
            log::info!(
                "restoring the runtime state from {} (the config file is unchanged since)",
                state_dir.join(persist::FILE).display()
            );
            return Ok(p.services);
        }
        Some(p) => {
            log::warn!(
                "the config file changed since the runtime state was saved: the config wins, and changes made at runtime are dropped"
            );
            // Ids still follow the old state, so adopted flows keep their backends.
            p.services
        }
        // No saved state: the adopted maps still say which ids the running flows use.
        None if !adopted.is_empty() => {
            log::info!("no saved runtime state: ids read back from the adopted maps");
            layout::previous_from_adopted(&config.services, adopted)
        }
        None => Vec::new(),
    };
    layout::place(&config.services, &old_ids, &[])
        .or_else(|e| {
            log::warn!("cannot keep the old ids ({e}); numbering afresh");
            layout::place(&config.services, &[], &[])
        })
        .map(|(placed, _)| placed)
        .map_err(DaemonError::Layout)
}

/// Builds the state: loads (or adopts) the data path, probes every backend once and publishes
/// the services, and only then attaches, so no packet meets a half-filled map.
async fn start(
    config: Config,
    opts: &RunOptions,
    health_reports: tokio::sync::mpsc::UnboundedSender<HealthReport>,
) -> Result<State, DaemonError> {
    let settings = LoadSettings {
        maglev_size: config.maglev_table_size,
        flow_capacity: config.flows.capacity,
        snat_port_min: config.flows.snat_port_min,
        snat_port_max: config.flows.snat_port_max,
        timeouts: config.flows.timeouts,
    };
    let dataplane = Dataplane::load_pinned(settings, &opts.bpffs)?;
    let adopted = dataplane.adopted();
    if adopted {
        log::info!(
            "adopting the data path pinned in {}: its flows, counters and attachments carry on",
            opts.bpffs.display()
        );
    }
    let text = std::fs::read_to_string(&opts.config).unwrap_or_default();
    let digest = persist::digest(&text);
    let mut config = config;
    discover_at_start(&mut config.services).await;
    let adopted_services = if adopted {
        dataplane.adopted_services()?
    } else {
        Vec::new()
    };
    let placed = initial_services(&config, &digest, &opts.state_dir, &adopted_services)?;
    let interfaces = config.interfaces.clone();
    let config_host = config.host.clone();
    let mut state = State::new(
        dataplane,
        config,
        opts.config.clone(),
        digest,
        opts.state_dir.clone(),
        health_reports,
    );
    let configs: Vec<ServiceConfig> = placed.iter().map(|p| p.config.clone()).collect();
    let probes = probe_all(state.to_probe(&configs)).await;
    let changes = layout::Changes::everything(&placed);
    state.apply(placed, &changes, &probes, !adopted, None)?;
    // What an earlier daemon published and this one does not run.
    let stale = state.dataplane.retain_services(&state.keys())?;
    if stale > 0 {
        log::info!("removed {stale} services the config no longer has");
    }
    let ids = state.backend_ids();
    state.dataplane.clear_backends_except(&ids)?;
    state.dataplane.arm_expiry()?;
    for name in &interfaces {
        enable_forwarding(name, &opts.state_dir)?;
        if crate::host::is_bridge(name) {
            // Balanced packets reach its containers through the kernel's routing; their
            // replies meet the tc program on its ports (`State::follow_bridges`).
            let ifindex = crate::dataplane::ifindex(name)?;
            state.dataplane.add_bridge(ifindex)?;
            state.interfaces.push(InterfaceStatus {
                name: name.clone(),
                ifindex,
                mode: "bridge".into(),
                why: Some("XDP cannot attach to a bridge: tc runs on its ports".into()),
            });
            continue;
        }
        let ifindex = state.dataplane.attach(name)?;
        log::info!("attached to {name} (ifindex {ifindex}) in native mode");
        state.interfaces.push(InterfaceStatus {
            name: name.clone(),
            ifindex,
            mode: "native".into(),
            why: None,
        });
    }
    state.follow_bridges();
    state.host = attach_host(&mut state.dataplane, &config_host, &opts.bpffs)?;
    let attached: Vec<u32> = state
        .interfaces
        .iter()
        .filter(|i| i.mode == "native" || i.mode == "bridge")
        .map(|i| i.ifindex)
        .collect();
    state.dataplane.retain_interfaces(&attached)?;
    for name in state.dataplane.detach_others(&interfaces)? {
        log::info!("detached from {name}: no longer in the config");
    }
    if let Some(warning) = state.persist() {
        log::warn!("{warning}");
    }
    Ok(state)
}

/// Attaches the socket hooks for clients on the host as `[host]` says; says what it did.
fn attach_host(
    dataplane: &mut Dataplane,
    host: &HostCgroup,
    bpffs: &std::path::Path,
) -> Result<HostStatus, DaemonError> {
    let cgroup = match host {
        HostCgroup::Off => {
            let _ = crate::pins::remove_host_links(bpffs);
            return Ok(HostStatus::off("[host] cgroup = \"off\""));
        }
        HostCgroup::Dir(dir) => dir.clone(),
        HostCgroup::Root => match crate::host::default_cgroup() {
            Some(dir) => dir,
            None => {
                let _ = crate::pins::remove_host_links(bpffs);
                log::warn!(
                    "clients on this host are not balanced: no cgroup v2 mount at /sys/fs/cgroup; set [host] cgroup"
                );
                return Ok(HostStatus::off("no cgroup v2 mount found"));
            }
        },
    };
    if !crate::host::is_cgroup2(&cgroup) {
        return Err(DaemonError::Dataplane(DataplaneError::Cgroup {
            path: cgroup.display().to_string(),
            message: "not a cgroup v2 directory ([host] cgroup)".into(),
        }));
    }
    dataplane.attach_host(&cgroup)?;
    log::info!(
        "clients on this host in cgroup {} are balanced at connect time (socket hooks)",
        cgroup.display()
    );
    Ok(HostStatus {
        cgroup: Some(cgroup.display().to_string()),
        hooks: crate::dataplane::HOST_PROGRAMS
            .iter()
            .map(|p| p.trim_start_matches("lb_").to_owned())
            .collect(),
        why_not: None,
    })
}

/// Probes backends at once; results by address.
async fn probe_all(targets: Vec<(SocketAddr, HealthConfig)>) -> Probes {
    let handles: Vec<_> = targets
        .into_iter()
        .map(|(address, cfg)| {
            let key = (address, cfg.clone());
            (
                key,
                tokio::spawn(async move { health::probe(address, &cfg).await }),
            )
        })
        .collect();
    let mut results = Probes::new();
    for (key, handle) in handles {
        let result = handle
            .await
            .unwrap_or_else(|e| Err(format!("health probe task failed: {e}")));
        results.insert(key, result);
    }
    results
}

/// Where the daemon finds its config, keeps what outlives it, and listens.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The Prometheus endpoint's IP:PORT, or `off`.
    pub metrics: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    /// Maps and XDP links, on a bpf filesystem.
    pub bpffs: PathBuf,
    /// Files: the runtime state and the SNAT port reservation.
    pub state_dir: PathBuf,
}

pub async fn run(config: Config, opts: RunOptions) -> Result<(), DaemonError> {
    if !privileged() {
        return Err(DaemonError::NotPrivileged);
    }
    let socket = opts.socket.clone();
    // Before anything is loaded: a second daemon must not touch the first one's maps.
    let listener = control::bind(&socket).await?;
    // Another daemon may serve another socket: the pins are held for this one's whole life.
    let _pins_held =
        match crate::pins::prepare(&opts.bpffs).and_then(|()| crate::pins::lock(&opts.bpffs)) {
            Ok(held) => held,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(DataplaneError::from(e).into());
            }
        };
    let metrics = match metrics::bind(&opts.metrics).await {
        Ok(m) => m,
        Err(source) => {
            let _ = std::fs::remove_file(&socket);
            return Err(DaemonError::Metrics {
                listen: opts.metrics.clone(),
                source,
            });
        }
    };
    let (snat_min, snat_max) = (config.flows.snat_port_min, config.flows.snat_port_max);
    let (reports, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    // Before anything is published: a refused port range must not leave a data path running.
    let started = match crate::ports::reserve(snat_min, snat_max, &opts.state_dir) {
        Ok(()) => start(config, &opts, reports).await,
        Err(e) => Err(e.into()),
    };
    let state = match started {
        Ok(state) => state,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    log::info!("serving the control socket {}", socket.display());
    let mut state = state;
    // Off at every start: a restart is also how an operator turns forgotten logs off.
    state.dataplane.set_debug_log(false)?;
    let logger = state.dataplane.take_logger();
    let state = Arc::new(Mutex::new(state));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(logger) = logger {
        tasks.spawn(forward_data_path_logs(logger));
    }
    let health_state = Arc::clone(&state);
    tasks.spawn(async move {
        while let Some(report) = health_rx.recv().await {
            lock(&health_state).record_health(report);
        }
    });
    // The status as of the last sweep, for scrapes: they never wait for the lock.
    let (status_cache, cached_status) = tokio::sync::watch::channel(lock(&state).status());
    tasks.spawn(count_flows(Arc::clone(&state), status_cache));
    tasks.spawn(follow_links(Arc::clone(&state)));
    tasks.spawn(advance_ramps(Arc::clone(&state)));
    if let Some(listener) = metrics {
        log::info!("serving metrics on http://{}/metrics", opts.metrics);
        tasks.spawn(metrics::serve(listener, move || {
            metrics::render(&cached_status.borrow())
        }));
    }
    // One change of the service set at a time: each is computed from the one before.
    let changing = Arc::new(tokio::sync::Mutex::new(()));
    tasks.spawn(discover(Arc::clone(&state), Arc::clone(&changing)));
    let server = Arc::clone(&state);
    tasks.spawn(control::serve_clients(listener, move |stream| {
        serve(stream, Arc::clone(&server), Arc::clone(&changing))
    }));
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
        opts.bpffs.display()
    );
    Ok(())
}

/// Forwards the data path's log records to the daemon's log as they arrive. A record the reader
/// cannot decode (it panics on one) stops the forwarding, not the daemon.
async fn forward_data_path_logs(logger: crate::dataplane::DataPathLogger) {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the descriptor is the logger's ring buffer, owned by the logger that the AsyncFd
    // owns: it stays open for as long as it is registered, and nothing else closes it.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("the data path's debug logs cannot be read: {e}");
            return;
        }
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("reading the data path's debug logs: {e}");
                return;
            }
        };
        let logger = ready.get_inner_mut();
        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush()));
        if flushed.is_err() {
            log::error!("a data-path log record could not be decoded; its logs stop here");
            return;
        }
        ready.clear_ready();
    }
}

/// Every SWEEP_INTERVAL, reads the data path's per-backend connection counts (a read per
/// backend, whatever the size of the flow table) and records them: active flows and ports per
/// backend, terminating backends done, suspect backends avoided. Expiry is the kernel's. Then
/// caches the status for the metrics endpoint.
async fn count_flows(state: Arc<Mutex<State>>, status_cache: tokio::sync::watch::Sender<Status>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut state = lock(&state);
        match state.count_flows() {
            Ok(sweep) => state.record_sweep(&sweep),
            Err(e) => log::error!("reading the flow counts: {e}"),
        }
        status_cache.send_replace(state.status());
    }
}

/// Follows the configured bridges' ports as links change (`links.rs`); without a netlink
/// socket, once a second.
async fn follow_links(state: Arc<Mutex<State>>) {
    match crate::links::LinkEvents::open() {
        Ok(mut events) => loop {
            if let Err(e) = events.changed().await {
                log::warn!("link changes: {e}; looking at the bridges once a second instead");
                break;
            }
            lock(&state).follow_bridges();
        },
        Err(e) => log::warn!(
            "cannot listen for link changes ({e}); looking at the bridges once a second instead"
        ),
    }
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        lock(&state).follow_bridges();
    }
}

/// Steps slow starts on: a step is at least `slow_start::STEP_MIN` long, and this keeps each
/// within a tenth of that of its time.
async fn advance_ramps(state: Arc<Mutex<State>>) {
    let mut tick = tokio::time::interval(crate::slow_start::STEP_MIN / 10);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        lock(&state).advance_ramps();
    }
}

/// The first answer for each service's discovery, before anything is published: a service
/// whose backends all come from DNS starts with them.
async fn discover_at_start(services: &mut [ServiceConfig]) {
    for service in services.iter_mut() {
        let Some(d) = service.discovery.clone() else {
            continue;
        };
        match discovery::resolve(&d, service.vip).await {
            Ok(found) => {
                if let Some(next) = discovery::reconcile(service, &found) {
                    log::info!(
                        "service \"{}\": {d} gives {} backends",
                        service.name,
                        next.discovered.len()
                    );
                    *service = next;
                }
            }
            Err(e) => log::warn!(
                "service \"{}\": {e}; trying again every {:?}",
                service.name,
                d.interval
            ),
        }
    }
}

/// Resolves each service's discovery name every `interval`, and changes the service when the
/// answer differs (`discovery`). One change of the service set at a time, as the control
/// socket's.
async fn discover(state: Arc<Mutex<State>>, changing: Arc<tokio::sync::Mutex<()>>) {
    let mut due: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let wanted = lock(&state).discoveries();
        due.retain(|name, _| wanted.iter().any(|(n, _, _)| n == name));
        for (name, d, vip) in wanted {
            if due.get(&name).is_some_and(|&at| now < at) {
                continue;
            }
            due.insert(name.clone(), now + d.interval);
            let found = discovery::resolve(&d, vip).await;
            let _one_at_a_time = changing.lock().await;
            let desired = {
                let mut guard = lock(&state);
                guard.record_discovery(&name, found.as_ref().err().cloned());
                let Ok(found) = &found else { continue };
                let mut services = guard.service_configs();
                let Some(i) = services.iter().position(|s| s.name == name) else {
                    continue;
                };
                // The service may have changed while the name was resolved.
                if services[i].discovery.as_ref() != Some(&d) {
                    continue;
                }
                let Some(next) = discovery::reconcile(&services[i], found) else {
                    continue;
                };
                services[i] = next;
                if let Err(e) = layout::check(&services) {
                    log::error!("service \"{name}\": {d} answered backends lb cannot take: {e}");
                    continue;
                }
                Desired {
                    services,
                    note: Some(format!("{d} answered {} addresses", found.len())),
                    digest: None,
                }
            };
            let response = apply_desired(&state, desired, None).await;
            if !response.ok {
                log::error!(
                    "service \"{name}\": applying {d}'s answer: {}",
                    response.error.unwrap_or_default()
                );
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

async fn serve(
    stream: UnixStream,
    state: Arc<Mutex<State>>,
    changing: Arc<tokio::sync::Mutex<()>>,
) {
    let mut reader = BufReader::new(stream);
    let response = match control::read_request(&mut reader).await {
        Ok(
            request @ (Request::ServiceAdd { .. }
            | Request::ServiceRemove { .. }
            | Request::BackendAdd { .. }
            | Request::BackendRemove { .. }
            | Request::Reload { .. }),
        ) => {
            log::debug!("control request {request:?}");
            let _one_at_a_time = changing.lock().await;
            change(&state, request).await
        }
        Ok(Request::Status) => Response::status(lock(&state).status()),
        Ok(Request::Explain {
            service,
            client,
            protocol,
        }) => lock(&state).explain(&service, client, protocol),
        Ok(Request::DebugLog { on }) => {
            let result = lock(&state).dataplane.set_debug_log(on);
            match result {
                Ok(()) => {
                    log::info!("data-path debug logs {}", if on { "on" } else { "off" });
                    Response::done()
                }
                Err(e) => Response::failed(format!("updating the data path: {e}")),
            }
        }
        Ok(Request::SetWeight {
            service,
            backend,
            weight,
        }) => {
            let _one_at_a_time = changing.lock().await;
            lock(&state).set_weight(&service, &backend, weight)
        }
        Err(refusal) => {
            log::debug!("control request refused: {:?}", refusal.error);
            refusal
        }
    };
    if let Err(e) = control::write_response(reader.into_inner(), &response).await {
        log::debug!("control client went away: {e}");
    }
}

/// A change of the service set: the new set is worked out and checked, its new backends are
/// probed (without the lock: probes take up to a timeout), then only the difference is applied
/// and the result saved.
async fn change(state: &Arc<Mutex<State>>, request: Request) -> Response {
    let grace = request.removal_grace();
    if let Request::BackendRemove {
        service, backend, ..
    } = &request
        && grace == Some(std::time::Duration::ZERO)
        && let Some(cut) = lock(state).cut_terminating(service, backend)
    {
        return cut;
    }
    // A service added with discovery starts with what its name gives, as one in the file does.
    let added = match &request {
        Request::ServiceAdd { service } => Some(service.name.clone()),
        _ => None,
    };
    let desired = desired_services(&lock(state), request);
    match desired {
        Ok(mut desired) => {
            if let Some(service) = desired
                .services
                .iter_mut()
                .find(|s| Some(&s.name) == added.as_ref())
            {
                discover_at_start(std::slice::from_mut(service)).await;
            }
            apply_desired(state, desired, grace).await
        }
        Err(refusal) => *refusal,
    }
}

/// Probes what `desired` adds, then applies and saves it: the common end of a request's change
/// and of a DNS answer's.
async fn apply_desired(
    state: &Arc<Mutex<State>>,
    desired: Desired,
    grace: Option<std::time::Duration>,
) -> Response {
    let Desired {
        services: desired,
        note,
        digest,
    } = desired;
    let targets = lock(state).to_probe(&desired);
    let probes = probe_all(targets).await;
    let planned = {
        let mut guard = lock(state);
        layout::place(&desired, &guard.placed(), &guard.terminating_ids())
            .map_err(Response::bad_input)
            .and_then(|(placed, changes)| {
                let plan = guard
                    .plan(placed, &changes, true, grace)
                    .map_err(|e| Response::bad_input(e.to_string()))?;
                Ok((plan, changes))
            })
    };
    let (mut plan, changes) = match planned {
        Ok(p) => p,
        Err(refusal) => return refusal,
    };
    // One service per turn of the lock: status requests, health reports and sweeps go on
    // between them while a large change is written.
    let written = loop {
        let step = lock(state).apply_step(&mut plan, &probes);
        match step {
            Ok(true) => tokio::task::yield_now().await,
            Ok(false) => break lock(state).finish(plan),
            Err(e) => break Err(e),
        }
    };
    let mut guard = lock(state);
    if let Err(e) = written {
        // What was written is what runs now: saved, so that a restart starts from it.
        let message = match e {
            ApplyError::Dataplane(e) => format!("updating the data path: {e}"),
            other => other.to_string(),
        };
        let message = match guard.persist() {
            None => format!("{message}; the services written before it run, and are saved"),
            Some(not_saved) => {
                format!("{message}; the services written before it run ({not_saved})")
            }
        };
        log::error!("{message}");
        return Response::failed(message);
    }
    if let Some(digest) = digest {
        guard.config_digest = digest;
    }
    let saved = guard.persist();
    let mut message = changes.describe();
    for extra in [note, saved].into_iter().flatten() {
        message.push_str("; ");
        message.push_str(&extra);
    }
    log::info!("{message}");
    Response::done().with_message(Some(message))
}

/// The service set a request asks for.
struct Desired {
    services: Vec<ServiceConfig>,
    /// Said in the answer.
    note: Option<String>,
    /// A reload's config digest, which the state then descends from.
    digest: Option<String>,
}

/// Refusals are the request's fault, and boxed: they are the rare path.
fn desired_services(state: &State, request: Request) -> Result<Desired, Box<Response>> {
    let mut services = state.service_configs();
    let refuse = |message: String| Box::new(Response::bad_input(message));
    let find = |services: &[ServiceConfig], name: &str| -> Result<usize, Box<Response>> {
        let name = state.service_name(name).map_err(refuse)?;
        Ok(services
            .iter()
            .position(|s| s.name == name)
            .expect("a running service is in its own config"))
    };
    let address = |text: &str| {
        text.parse::<SocketAddr>().map_err(|_| {
            refuse(format!(
                "backend {text:?} is not an address with port (like 198.18.2.11:8000 or [fd00:2::11]:8000)"
            ))
        })
    };
    match request {
        Request::ServiceAdd { service } => {
            if services.iter().any(|s| s.name == service.name) {
                return Err(refuse(format!(
                    "service \"{}\" exists already",
                    service.name
                )));
            }
            services.push(*service);
        }
        Request::ServiceRemove { service, .. } => {
            let i = find(&services, &service)?;
            services.remove(i);
        }
        Request::BackendAdd {
            service,
            backend,
            weight,
        } => {
            let i = find(&services, &service)?;
            let address = address(&backend)?;
            if services[i].backends.iter().any(|b| b.address == address) {
                return Err(refuse(format!(
                    "backend {address} is in service \"{}\" already",
                    services[i].name
                )));
            }
            services[i].backends.push(BackendConfig { address, weight });
        }
        Request::BackendRemove {
            service, backend, ..
        } => {
            let i = find(&services, &service)?;
            let address = address(&backend)?;
            let Some(b) = services[i]
                .backends
                .iter()
                .position(|b| b.address == address)
            else {
                return Err(refuse(format!(
                    "backend {address} is not in service \"{}\"",
                    services[i].name
                )));
            };
            services[i].backends.remove(b);
        }
        Request::Reload { .. } => {
            let text = std::fs::read_to_string(&state.config_path).map_err(|e| {
                refuse(format!(
                    "cannot read the config {}: {e}",
                    state.config_path.display()
                ))
            })?;
            let origin = state.config_path.display().to_string();
            let mut config = Config::parse(&text, &origin).map_err(|e| refuse(e.to_string()))?;
            let note = restart_needed(&state.config, &config);
            for new in &mut config.services {
                if let Some(running) = services.iter().find(|s| s.name == new.name) {
                    discovery::carry_over(new, running);
                }
            }
            return Ok(Desired {
                services: config.services,
                note,
                digest: Some(persist::digest(&text)),
            });
        }
        Request::Status
        | Request::SetWeight { .. }
        | Request::DebugLog { .. }
        | Request::Explain { .. } => {
            return Err(Box::new(Response::failed(
                "not a change of services".into(),
            )));
        }
    }
    layout::check(&services).map_err(refuse)?;
    Ok(Desired {
        services,
        note: None,
        digest: None,
    })
}

/// Settings a reload cannot change on a running data path, if the new config changes any.
fn restart_needed(running: &Config, new: &Config) -> Option<String> {
    let mut differ = Vec::new();
    if running.interfaces != new.interfaces {
        differ.push("interfaces");
    }
    if running.maglev_table_size != new.maglev_table_size {
        differ.push("maglev_table_size");
    }
    if running.flows != new.flows {
        differ.push("[flows]");
    }
    if running.host != new.host {
        differ.push("[host]");
    }
    (!differ.is_empty()).then(|| {
        format!(
            "not applied until the daemon restarts: {}",
            differ.join(", ")
        )
    })
}
