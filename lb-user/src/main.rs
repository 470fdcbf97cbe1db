//! `lb`: the XDP load balancer's daemon (`lb run`) and its CLI (`lb status`, `lb stats`,
//! `lb top`, `lb set-weight`, `lb drain`, `lb service`, `lb backend`, `lb reload`,
//! `lb explain`, `lb remove`).
//! Exit codes: 0 success, 2 bad input, 1 any other failure.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_user::{
    config::{
        BackendConfig, Config, DiscoveryConfig, ForwardingMode, HealthConfig, HealthKind, Mss,
        OnBackendDown, Protocol, ServiceConfig,
    },
    control::{self, BackendSource, Request, Response, Status},
    daemon, metrics, pins, ports, stats,
};

const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per command: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print shell completions for lb (`./dev.sh install` installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print lb's man page, roff (`./dev.sh install` installs it as lb(1)).
    Manpage,
    /// Run the daemon in the foreground: attach XDP, health-check, serve the control socket.
    /// The data path is pinned: it keeps forwarding after the daemon stops, and the next
    /// `lb run` adopts it with its flows.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Directory on a bpf filesystem for the pinned maps and XDP links.
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Directory for the daemon's own state.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Prometheus endpoint, IP:PORT (GET /metrics), or off.
        #[arg(long, default_value = metrics::DEFAULT_LISTEN)]
        metrics: String,
    },
    /// Stop forwarding for good: detach XDP, drop every flow and the pinned maps, and give the
    /// SNAT ports back to the kernel. Refused while a daemon runs.
    Remove {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Show services and backends: weight, health, flows, packets, bytes.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Per-second rates: new flows, packets and bits per backend, and every pass/drop reason.
    Stats {
        #[arg(long)]
        json: bool,
        /// Print a new reading every interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// Time between the two readings a rate comes from (like 500ms, 2s).
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// A live view, refreshed in place every interval: per backend its health, its weight's
    /// share beside its share of the new flows, active flows and throughput; the flow table,
    /// warnings and the busiest drop reasons. Ctrl-C ends it.
    Top {
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Stop after this many refreshes (as top -n).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// On a backend of a `dsr = "ipip"` or `"gue"` service: strip the tunnel's headers of
    /// packets for these VIPs at INTERFACE's ingress (a tc program), until interrupted. The VIPs go on the
    /// backend's loopback, as for any DSR backend. An IPv6 VIP's packets come inside IPv6.
    Decap {
        /// The interface the tunnel's packets arrive on.
        #[arg(long)]
        interface: String,
        /// A VIP whose packets to strip; repeat for more.
        #[arg(long = "vip", required = true)]
        vips: Vec<std::net::IpAddr>,
    },
    /// Stop sending new flows to a backend (weight 0); existing flows continue. With --wait,
    /// return once it has no active flows, or fail (exit 1) when the wait runs out.
    Drain {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// How long to wait for the backend's active flows to end (like 30s, 5m).
        #[arg(long, value_parser = parse_interval)]
        wait: Option<std::time::Duration>,
        /// Service name, or its VIP:PORT.
        service: String,
        /// Backend IP:PORT.
        backend: String,
    },
    /// Add or remove a service at runtime (kept across restarts; see README, "Runtime changes").
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Add or remove a backend of a service at runtime. A new backend takes flows once its first
    /// health probe passes; a removed backend's flows move to the others.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Re-read the config file and apply what differs: services and backends that did not
    /// change keep their flows untouched. Runtime changes not in the file are dropped.
    /// A backend the file no longer has is removed as `lb backend remove` does.
    Reload {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        grace: GraceArgs,
    },
    /// Switch the data path's debug logs on or off (off at every start): new flows and drops,
    /// with addresses, in the daemon's log.
    DebugLog {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Which backend a flow from CLIENT gets, and why: its existing flow in the table, and what
    /// a new one would get (flow hash, Maglev slot, suspect steering), with the service's
    /// weights, health, suspect marks, slow start and table shares.
    Explain {
        #[arg(long)]
        json: bool,
        /// The service's protocol; picks between a TCP and a UDP service on one VIP:PORT.
        #[arg(long, value_parser = parse_protocol)]
        protocol: Option<Protocol>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Service name, or its VIP:PORT.
        service: String,
        /// The client's address and source port, IP:PORT.
        client: std::net::SocketAddr,
    },
    /// Set a backend's weight (0 drains it: no new flows); takes effect for new flows at once.
    SetWeight {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Service name, or its VIP:PORT.
        service: String,
        /// Backend IP:PORT.
        backend: String,
        weight: u32,
    },
}

// Parsed once per command: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ServiceAction {
    Add {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        name: String,
        /// The virtual address clients connect to, IP:PORT or [IPv6]:PORT.
        vip: std::net::SocketAddr,
        #[arg(long, default_value = "tcp", value_parser = parse_protocol)]
        protocol: Protocol,
        /// What the balancer rewrites: nat (source and destination: backends see lb's SNAT
        /// address), dnat (destination only: backends see the client, and lb must be their
        /// gateway), or dsr (the MACs only: backends on lb's segment, with the VIP on their
        /// loopback, answer clients directly).
        #[arg(long, default_value = "nat")]
        mode: String,
        /// With --mode dsr: its form, l2 (backends on lb's segment), ipip or gue (anywhere, with
        /// `lb decap` on each; --snat gives the tunnels' outer sources).
        #[arg(long)]
        dsr: Option<String>,
        /// Source address towards the backends (default: the one the kernel picks); give it
        /// again for a pool (at most 4), whose every address has the whole port range.
        #[arg(long)]
        snat: Vec<std::net::IpAddr>,
        /// TCP: the largest MSS its handshakes may announce (536 to 65495), or "auto" (the
        /// attached interfaces' smallest MTU less 40), for networks that drop ICMP.
        #[arg(long)]
        mss: Option<Mss>,
        /// Health check: tcp, none, http:/PATH, or udp[:PAYLOAD] for a UDP service (a datagram
        /// answered; default: tcp for TCP, none for UDP).
        #[arg(long, value_parser = parse_health)]
        health: Option<HealthKind>,
        /// What a backend marked down does to its established connections: keep, or reset.
        #[arg(long, default_value = "keep", value_parser = parse_on_backend_down)]
        on_backend_down: OnBackendDown,
        /// How long a removed backend's connections may go on (like 30s, 5m).
        #[arg(long, default_value = "60s", value_parser = parse_grace)]
        removal_grace: std::time::Duration,
        /// How long a backend that comes up (recovered, or added later) takes to reach its
        /// full share of new connections, in steps (like 10s; at most 1h; default: at once).
        #[arg(long, default_value = "0s", value_parser = parse_slow_start)]
        slow_start: std::time::Duration,
        /// Backends from DNS: every A record of NAME (AAAA for an IPv6 VIP) is a backend on PORT, re-resolved each
        /// second (the config file's [service.discovery] sets the interval and weight).
        #[arg(long, value_name = "NAME:PORT", value_parser = parse_discovery)]
        discover: Option<DiscoveryConfig>,
        /// A backend, IP:PORT or IP:PORT=WEIGHT (weight 1 if not given); repeat for more.
        #[arg(long = "backend", value_parser = parse_backend)]
        backends: Vec<BackendConfig>,
    },
    /// Its backends' connections go on for the grace period, as `lb backend remove` says.
    Remove {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        grace: GraceArgs,
        /// Service name, or its VIP:PORT.
        service: String,
    },
}

/// How long a removed backend's connections may go on.
#[derive(clap::Args)]
struct GraceArgs {
    /// Let them go on for this long (like 30s, 5m; 0s cuts them), instead of the service's
    /// `removal_grace`.
    #[arg(long, value_parser = parse_grace, conflicts_with = "now")]
    grace: Option<std::time::Duration>,
    /// Cut them at once, with an RST to both ends; also cuts a backend already terminating.
    #[arg(long)]
    now: bool,
}

impl GraceArgs {
    fn ms(&self) -> Option<u64> {
        let grace = if self.now {
            Some(std::time::Duration::ZERO)
        } else {
            self.grace
        };
        grace.map(|g| g.as_millis() as u64)
    }
}

#[derive(Subcommand)]
enum BackendAction {
    Add {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Service name, or its VIP:PORT.
        service: String,
        /// Backend IP:PORT.
        backend: String,
    },
    /// It takes no new flows at once; its connections go on until they end or the grace
    /// period (the service's `removal_grace`, 60 s by default) runs out, then get an RST at
    /// both ends. `lb status` shows it as terminating meanwhile.
    Remove {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        grace: GraceArgs,
        service: String,
        backend: String,
    },
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb: error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("lb: error: {}", error_text(&error));
            ExitCode::from(code)
        }
    }
}

fn completions(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(
        shell,
        &mut <Cli as clap::CommandFactory>::command(),
        "lb",
        &mut out,
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn manpage() -> std::io::Result<String> {
    let mut out = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `error` and its causes, each once: most messages already say their cause, and the chain
/// would repeat it.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text += ": ";
        }
        text += &cause;
    }
    text
}

async fn execute(command: Command) -> Result<(), Failure> {
    match command {
        Command::Completions { shell } => {
            print!("{}", completions(shell));
            Ok(())
        }
        Command::Manpage => {
            print!("{}", manpage().context("rendering the man page")?);
            Ok(())
        }
        Command::Run {
            config,
            socket,
            bpffs,
            state_dir,
            metrics,
        } => {
            let cfg = Config::load(&config).map_err(|e| Failure {
                code: 2,
                error: e.into(),
            })?;
            let opts = daemon::RunOptions {
                metrics,
                config,
                socket,
                bpffs,
                state_dir,
            };
            daemon::run(cfg, opts).await.context("lb run")?;
            Ok(())
        }
        Command::Remove {
            socket,
            bpffs,
            state_dir,
        } => {
            if control::call(&socket, &Request::Status).await.is_ok() {
                return Err(anyhow::anyhow!(
                    "a daemon is serving {}: stop it first (it would re-create what this removes)",
                    socket.display()
                )
                .into());
            }
            let detached = pins::remove(&bpffs).context("removing the pinned data path")?;
            for name in &detached {
                println!("detached from {name}");
            }
            println!("removed the maps pinned in {}", bpffs.display());
            if let Some(range) = ports::release(&state_dir).context("releasing SNAT ports")? {
                println!("gave SNAT ports {range} back to the kernel");
            }
            for setting in lb_user::sysctls::restore(&state_dir)
                .context("putting back the interface settings lb changed")?
            {
                println!("put back {setting}");
            }
            Ok(())
        }
        Command::Status { json, socket } => {
            let status = fetch_status(&socket).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("encoding the status")?
                );
            } else {
                print!("{}", render(&status));
            }
            Ok(())
        }
        Command::Stats {
            json,
            watch,
            interval,
            socket,
        } => {
            let mut before = fetch_status(&socket).await?;
            let mut taken = std::time::Instant::now();
            loop {
                tokio::time::sleep(interval).await;
                let after = fetch_status(&socket).await?;
                let now = std::time::Instant::now();
                let rates = stats::rates(&before, &after, (now - taken).as_secs_f64());
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&rates).context("encoding the rates")?
                    );
                } else {
                    print!("{}", stats::render(&rates));
                }
                if !watch {
                    return Ok(());
                }
                if !json {
                    println!();
                }
                (before, taken) = (after, now);
            }
        }
        Command::Decap { interface, vips } => {
            let decap = lb_user::decap::Decap::attach(&interface, &vips)?;
            let listed: Vec<String> = vips.iter().map(ToString::to_string).collect();
            log::info!(
                "lb decap: stripping IPIP and GUE (UDP port {}) for {} at {interface}'s ingress; Ctrl-C or SIGTERM ends it",
                lb_common::tunnel::GUE_PORT,
                listed.join(", ")
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let counts = decap.counts()?;
            log::info!(
                "lb decap: {} packets stripped, {} for other destinations left alone; detached",
                counts.decapsulated,
                counts.unknown_vip
            );
            Ok(())
        }
        Command::Top {
            interval,
            count,
            socket,
        } => {
            use std::io::IsTerminal as _;
            // In place on a terminal; piped, one frame after another.
            let terminal = std::io::stdout().is_terminal();
            let mut before = fetch_status(&socket).await?;
            let mut taken = std::time::Instant::now();
            let mut shown = 0;
            while count.is_none_or(|n| shown < n) {
                tokio::time::sleep(interval).await;
                let after = fetch_status(&socket).await?;
                let now = std::time::Instant::now();
                let rates = stats::rates(&before, &after, (now - taken).as_secs_f64());
                let title = format!(
                    "lb top: every {}, Ctrl-C to quit",
                    humantime_interval(interval)
                );
                let screen = stats::top_screen(&rates, &after.warnings, &title);
                if terminal {
                    print!("\x1b[H\x1b[2J{screen}");
                } else {
                    println!("{screen}");
                }
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                shown += 1;
                (before, taken) = (after, now);
            }
            Ok(())
        }
        Command::Drain {
            socket,
            wait,
            service,
            backend,
        } => {
            set_weight(&socket, &service, &backend, 0).await?;
            // Only a count begun after this moment has seen every connection made before it.
            let drained_ns = lb_user::dataplane::monotonic_ns();
            println!("service {service}: backend {backend} drained (weight 0): no new flows");
            let Some(wait) = wait else {
                return Ok(());
            };
            let deadline = std::time::Instant::now() + wait;
            loop {
                let status = fetch_status(&socket).await?;
                if status.flows.counted_ns <= drained_ns {
                    if std::time::Instant::now() >= deadline {
                        return Err(anyhow::anyhow!(
                            "the daemon has not counted the flows since the drain began; backend {backend} takes no new flows"
                        )
                        .into());
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                let active = active_flows(&status, &service, &backend).ok_or_else(|| {
                    anyhow::anyhow!("service {service} or backend {backend} left the daemon")
                })?;
                if active == 0 {
                    println!("service {service}: backend {backend} has no active flows");
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(anyhow::anyhow!(
                        "backend {backend} of service {service} still has {active} active flows after {}; it takes no new flows",
                        lb_user::config::format_duration(wait)
                    )
                    .into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Command::Service { action } => {
            let (socket, request) = match action {
                ServiceAction::Add {
                    socket,
                    name,
                    vip,
                    protocol,
                    mode,
                    dsr,
                    snat,
                    mss,
                    health,
                    on_backend_down,
                    removal_grace,
                    slow_start,
                    discover,
                    backends,
                } => {
                    let mut check = HealthConfig::default_for(protocol);
                    if let Some(kind) = health {
                        check.kind = kind;
                    }
                    let mode =
                        ForwardingMode::from_names(&mode, dsr.as_deref()).map_err(|e| Failure {
                            code: 2,
                            error: anyhow::anyhow!("--mode: {e}"),
                        })?;
                    let service = ServiceConfig {
                        name,
                        vip,
                        protocol,
                        mode,
                        snat,
                        mss,
                        health: check,
                        on_backend_down,
                        removal_grace,
                        slow_start,
                        discovery: discover,
                        discovered: Vec::new(),
                        backends,
                    };
                    (
                        socket,
                        Request::ServiceAdd {
                            service: Box::new(service),
                        },
                    )
                }
                ServiceAction::Remove {
                    socket,
                    grace,
                    service,
                } => (
                    socket,
                    Request::ServiceRemove {
                        service,
                        grace_ms: grace.ms(),
                    },
                ),
            };
            report(call(&socket, request).await?);
            Ok(())
        }
        Command::Backend { action } => {
            let (socket, request) = match action {
                BackendAction::Add {
                    socket,
                    weight,
                    service,
                    backend,
                } => (
                    socket,
                    Request::BackendAdd {
                        service,
                        backend,
                        weight,
                    },
                ),
                BackendAction::Remove {
                    socket,
                    grace,
                    service,
                    backend,
                } => (
                    socket,
                    Request::BackendRemove {
                        service,
                        backend,
                        grace_ms: grace.ms(),
                    },
                ),
            };
            report(call(&socket, request).await?);
            Ok(())
        }
        Command::DebugLog { socket, state } => {
            let on = state == "on";
            call(&socket, Request::DebugLog { on }).await?;
            println!("data-path debug logs {state}");
            Ok(())
        }
        Command::Explain {
            json,
            protocol,
            socket,
            service,
            client,
        } => {
            let request = Request::Explain {
                service,
                client,
                protocol,
            };
            let explanation = call(&socket, request)
                .await?
                .explanation
                .context("the daemon sent no explanation")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                print!("{}", lb_user::explain::render(&explanation));
            }
            Ok(())
        }
        Command::Reload { socket, grace } => {
            let request = Request::Reload {
                grace_ms: grace.ms(),
            };
            report(call(&socket, request).await?);
            Ok(())
        }
        Command::SetWeight {
            socket,
            service,
            backend,
            weight,
        } => {
            let done = set_weight(&socket, &service, &backend, weight).await?;
            println!("service {service}: backend {backend} weight {weight}");
            report(done);
            Ok(())
        }
    }
}

/// Prints what a change did.
fn report(response: Response) {
    if let Some(message) = response.message {
        println!("{message}");
    }
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("{text:?} is not tcp or udp")),
    }
}

fn parse_health(text: &str) -> Result<HealthKind, String> {
    let udp = |send: &str| HealthKind::Udp {
        send: send.into(),
        expect: None,
    };
    match text {
        "tcp" => Ok(HealthKind::Tcp),
        "none" => Ok(HealthKind::None),
        "udp" => Ok(udp(lb_user::config::DEFAULT_UDP_PROBE)),
        _ => match (text.strip_prefix("http:"), text.strip_prefix("udp:")) {
            (Some(path), _) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                Ok(HealthKind::Http(lb_user::config::HttpCheck::new(path)))
            }
            (_, Some(send)) if !send.is_empty() && send.len() <= lb_user::config::UDP_PROBE_MAX => {
                Ok(udp(send))
            }
            _ => Err(format!(
                "{text:?} is not tcp, none, http:/PATH, udp or udp:PAYLOAD"
            )),
        },
    }
}

/// `IP:PORT` or `IP:PORT=WEIGHT`.
fn parse_backend(text: &str) -> Result<BackendConfig, String> {
    let (address, weight) = text.split_once('=').unwrap_or((text, "1"));
    let address = address
        .parse()
        .map_err(|_| format!("{address:?} is not an address with port (IP:PORT or [IPv6]:PORT)"))?;
    let weight = weight
        .parse()
        .map_err(|_| format!("weight {weight:?} is not a number"))?;
    Ok(BackendConfig { address, weight })
}

async fn fetch_status(socket: &std::path::Path) -> Result<Status, Failure> {
    Ok(call(socket, Request::Status)
        .await?
        .status
        .map(|s| *s)
        .unwrap_or_default())
}

async fn set_weight(
    socket: &std::path::Path,
    service: &str,
    backend: &str,
    weight: u32,
) -> Result<Response, Failure> {
    call(
        socket,
        Request::SetWeight {
            service: service.to_owned(),
            backend: backend.to_owned(),
            weight,
        },
    )
    .await
}

/// The active flows of `backend` (IP:PORT) in the service named, or with VIP:PORT, `service`.
fn active_flows(status: &Status, service: &str, backend: &str) -> Option<u64> {
    status
        .services
        .iter()
        .filter(|s| s.name == service || s.vip == service)
        .flat_map(|s| s.backends.iter())
        .find(|b| b.address == backend)
        .map(|b| b.active_flows)
}

/// `--interval`, `--wait`: a duration from 100ms to 1h.
/// `500ms`, `2s`: an interval as the options take it.
fn humantime_interval(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = lb_user::config::parse_duration(text)?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{text} is out of range 100ms..=1h"));
    }
    Ok(d)
}

fn parse_on_backend_down(text: &str) -> Result<OnBackendDown, String> {
    match text {
        "keep" => Ok(OnBackendDown::Keep),
        "reset" => Ok(OnBackendDown::Reset),
        _ => Err(format!("{text:?} is not keep or reset")),
    }
}

fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    let d = lb_user::config::parse_duration(text)?;
    if !lb_user::config::REMOVAL_GRACE_RANGE.contains(&d) {
        return Err(format!("{text} is out of range 0s..=24h"));
    }
    Ok(d)
}

fn parse_discovery(text: &str) -> Result<DiscoveryConfig, String> {
    let Some((host, port)) = text
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|&p| p != 0)?)))
    else {
        return Err(format!("{text:?} is not NAME:PORT (like api:8001)"));
    };
    lb_user::config::check_host_name(host)?;
    Ok(DiscoveryConfig {
        host: host.to_owned(),
        port,
        interval: lb_user::config::DEFAULT_DISCOVERY_INTERVAL,
        weight: 1,
    })
}

fn parse_slow_start(text: &str) -> Result<std::time::Duration, String> {
    let d = lb_user::config::parse_duration(text)?;
    if !lb_user::config::SLOW_START_RANGE.contains(&d) {
        return Err(format!("{text} is out of range 0s..=1h"));
    }
    Ok(d)
}

async fn call(socket: &std::path::Path, request: Request) -> Result<Response, Failure> {
    let response = control::call(socket, &request).await?;
    if response.ok {
        return Ok(response);
    }
    let message = response
        .error
        .unwrap_or_else(|| "the daemon refused the request".into());
    Err(Failure {
        code: if response.bad_input { 2 } else { 1 },
        error: anyhow::anyhow!(message),
    })
}

fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for s in &status.services {
        let mss = s.mss.map(|m| format!(" mss {m}")).unwrap_or_default();
        let discovery = match (&s.discovery, &s.discovery_error) {
            (Some(d), None) => format!(" discovery {d}"),
            (Some(d), Some(e)) => format!(" discovery {d} (failing: {e})"),
            _ => String::new(),
        };
        let slow_start = s
            .slow_start_ms
            .map(|ms| format!(" slow_start {:.1}s", ms as f64 / 1000.0))
            .unwrap_or_default();
        let rewrite = match s.mode.as_str() {
            "nat" | "" => format!("snat {}", s.snat.join(",")),
            mode @ ("dsr-ipip" | "dsr-gue") => format!("mode {mode} from {}", s.snat.join(",")),
            mode => format!("mode {mode}"),
        };
        let _ = writeln!(
            out,
            "service {} {}/{} {rewrite}{mss}{slow_start}{discovery}",
            s.name, s.vip, s.protocol,
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>11} {:<7} {:<6} {:>8} {:>10} {:>12} {:>14}",
            "backend", "weight", "health", "from", "active", "new_flows", "packets", "bytes"
        );
        for b in &s.backends {
            let weight = match b.slow_start_percent {
                Some(p) => format!("{} ({p}%)", b.weight),
                None => b.weight.to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<22} {:>11} {:<7} {:<6} {:>8} {:>10} {:>12} {:>14}",
                b.address,
                weight,
                control::health_word(b.healthy, b.suspect),
                match b.source {
                    BackendSource::Config => "config",
                    BackendSource::Dns => "dns",
                },
                b.active_flows,
                b.new_flows,
                b.packets,
                b.bytes
            );
        }
    }
    for t in &status.terminating {
        let _ = writeln!(
            out,
            "terminating: service {} backend {}: {} active flows, cut in {:.1} s",
            t.service,
            t.address,
            t.active_flows,
            t.grace_left_ms as f64 / 1000.0
        );
    }
    // One device a line: a bridge of many containers lists them all.
    let _ = writeln!(out, "interfaces:");
    let width = status
        .interfaces
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0);
    for i in &status.interfaces {
        let line = format!(
            "  {:width$}  {:6}  {}",
            i.name,
            i.mode,
            i.why.as_deref().unwrap_or("")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let _ = match (&status.host.cgroup, &status.host.why_not) {
        (Some(cgroup), _) => writeln!(
            out,
            "host clients: balanced in cgroup {cgroup} ({})",
            status.host.hooks.join(", ")
        ),
        (None, Some(why)) => writeln!(out, "host clients: not balanced ({why})"),
        (None, None) => Ok(()),
    };
    let _ = writeln!(
        out,
        "flow table: {} of {} entries",
        status.flows.entries, status.flows.capacity
    );
    let nonzero: Vec<String> = status
        .counters
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    for w in &status.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(out, "packets: {}", stats::words_or(&nonzero, "none yet"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_the_man_page_know_every_command() {
        let page = manpage().expect("a man page");
        assert!(page.starts_with(".ie") || page.contains(".TH lb"), "{page}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let text = completions(shell);
            for command in ["set-weight", "drain", "reload", "remove"] {
                assert!(text.contains(command), "{shell}: no {command}");
            }
        }
        for command in ["set\\-weight", "drain", "reload"] {
            assert!(
                page.contains(command),
                "the man page lacks {command}:\n{page}"
            );
        }
    }

    #[test]
    fn each_cause_is_given_once() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let unreachable = anyhow::Error::from(control::ControlError::Connect {
            path: "/run/lb/control.sock".into(),
            source: missing(),
        });
        let text = error_text(&unreachable);
        assert_eq!(text.matches("entity not found").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot reach the daemon at /run/lb/control.sock"),
            "{text}"
        );
        let unread = anyhow::Error::from(lb_user::config::ConfigError::Read {
            path: "/nonexistent".into(),
            source: missing(),
        });
        assert_eq!(
            error_text(&unread),
            "cannot read config /nonexistent: entity not found"
        );
        // A context that does not say its cause still gets it.
        let wrapped = anyhow::Error::from(missing()).context("lb run");
        assert_eq!(error_text(&wrapped), "lb run: entity not found");
    }
}
