//! The control socket: one JSON request per line from the CLI, one JSON response line back.
//! The CLI never touches the maps; the daemon validates every request and survives bad ones.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::ServiceConfig;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    time::timeout,
};

pub const DEFAULT_SOCKET: &str = "/run/lb/control.sock";
/// Larger requests are refused: none of ours comes near it.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A client that sends nothing for this long is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control clients served at once; one more is told the daemon is busy and let go, so idle
/// or stuck clients cannot pile up tasks and descriptors.
pub const MAX_CLIENTS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
    },
    /// Adds a service (checked as the config file's are).
    ServiceAdd {
        // Boxed: a service's config is most of the size of every request otherwise.
        service: Box<ServiceConfig>,
    },
    /// `grace_ms`: how long its backends' connections may go on (None: the service's
    /// `removal_grace`; 0: cut now).
    ServiceRemove {
        service: String,
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    BackendAdd {
        service: String,
        backend: String,
        weight: u32,
    },
    BackendRemove {
        service: String,
        backend: String,
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Re-reads the config file and applies what differs from the running services.
    Reload {
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Switches the data path's debug logs (new flows, drops) on or off.
    DebugLog {
        on: bool,
    },
    /// Which backend a flow from `client` gets, and why (`lb explain`).
    Explain {
        service: String,
        client: std::net::SocketAddr,
        #[serde(default)]
        protocol: Option<crate::config::Protocol>,
    },
}

impl Request {
    /// How long removed backends' connections may go on, if the request says.
    pub fn removal_grace(&self) -> Option<std::time::Duration> {
        match self {
            Request::ServiceRemove { grace_ms, .. }
            | Request::BackendRemove { grace_ms, .. }
            | Request::Reload { grace_ms } => grace_ms.map(std::time::Duration::from_millis),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The request itself was wrong (unknown service, weight out of range, ...): exit code 2.
    #[serde(default)]
    pub bad_input: bool,
    /// Boxed: a response is moved around far more often than it carries a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Status>>,
    /// What a change did, or a warning about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Box<crate::explain::Explanation>>,
}

impl Response {
    pub fn done() -> Self {
        Self {
            ok: true,
            error: None,
            bad_input: false,
            status: None,
            message: None,
            explanation: None,
        }
    }
    pub fn with_message(self, message: Option<String>) -> Self {
        Self { message, ..self }
    }
    pub fn status(status: Status) -> Self {
        Self {
            status: Some(Box::new(status)),
            ..Self::done()
        }
    }
    pub fn explanation(explanation: crate::explain::Explanation) -> Self {
        Self {
            explanation: Some(Box::new(explanation)),
            ..Self::done()
        }
    }
    pub fn bad_input(message: String) -> Self {
        Self {
            ok: false,
            error: Some(message),
            bad_input: true,
            status: None,
            message: None,
            explanation: None,
        }
    }
    pub fn failed(message: String) -> Self {
        Self {
            ok: false,
            error: Some(message),
            bad_input: false,
            status: None,
            message: None,
            explanation: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    /// The socket hooks for clients on the host.
    #[serde(default)]
    pub host: HostStatus,
    pub flows: FlowTableStatus,
    /// Packets per pass/drop reason and forwarding action, and events.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// SNAT ports each backend can use per address of its service's SNAT pool (the
    /// `snat_ports` range).
    #[serde(default)]
    pub snat_ports_per_backend: u64,
    /// Whether the data path logs new flows and drops (`lb debug-log`).
    #[serde(default)]
    pub debug_log: bool,
    /// Exhaustion and the like, as it is now or was in the last second.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Removed backends whose connections go on until they end or their grace runs out.
    #[serde(default)]
    pub terminating: Vec<TerminatingStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminatingStatus {
    pub service: String,
    pub address: String,
    /// Connections it still has (at the last sweep).
    pub active_flows: u64,
    /// Until they are cut.
    pub grace_left_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    /// `ForwardingMode`: "nat" or "dnat".
    #[serde(default)]
    pub mode: String,
    /// The service's SNAT pool (none in DNAT mode).
    pub snat: Vec<String>,
    /// The MSS its TCP handshakes are clamped to, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss: Option<u16>,
    /// The name whose A records are backends (NAME:PORT), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<String>,
    /// Why its last resolution failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_error: Option<String>,
    /// How long a backend coming up takes to reach its full share, if it ramps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_ms: Option<u64>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendSource {
    #[default]
    Config,
    Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    /// The data path saw it refuse or leave unanswered a new connection, and steers new flows
    /// off it until a health check passes.
    #[serde(default)]
    pub suspect: bool,
    /// Where it came from: the config (or the CLI), or DNS.
    #[serde(default)]
    pub source: BackendSource,
    /// Slow start: the share of its weight it takes while it ramps up, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
    pub active_flows: u64,
    /// SNAT ports its flows hold (at the last sweep).
    #[serde(default)]
    pub snat_ports_in_use: u64,
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Why the last health check failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The socket hooks for clients on the host: where they are attached, or why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

impl HostStatus {
    pub fn off(why: &str) -> HostStatus {
        HostStatus {
            why_not: Some(why.to_owned()),
            ..HostStatus::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// "native": XDP in the driver; "tc": the tc program at ingress (a bridge's port);
    /// "bridge": its ports have tc.
    pub mode: String,
    /// Why this hook here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    pub entries: u64,
    pub capacity: u64,
    /// CLOCK_MONOTONIC (ns) when the count behind `entries` and the active flows began: a
    /// count begun after a change (`lb drain --wait`) cannot miss a flow opened before it.
    #[serde(default)]
    pub counted_ns: u64,
}

/// A backend's health as the CLI shows it: down, or up and suspect (new flows steered off
/// it), or up.
pub fn health_word(healthy: bool, suspect: bool) -> &'static str {
    match (healthy, suspect) {
        (false, _) => "down",
        (true, true) => "suspect",
        (true, false) => "up",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}: {source}; is \"lb run\" running?")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {path} sent no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { path: String },
    #[error("the daemon at {path} answered something that is not a response: {message}")]
    Protocol { path: String, message: String },
    #[error("another daemon is already serving {path}; stop it first")]
    InUse { path: String },
    #[error("cannot serve the control socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Sends one request and waits for its response (the CLI side).
pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: p.clone(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(read);
    timeout(REQUEST_TIMEOUT * 6, reader.read_line(&mut answer))
        .await
        .map_err(|_| ControlError::Timeout { path: p.clone() })?
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
        path: p,
        message: e.to_string(),
    })
}

/// Creates the socket, root-only. A stale socket file (nobody answering) is replaced; a live
/// one means another daemon, and is an error.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let p = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse { path: p });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Bind {
            path: p.clone(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: p.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ControlError::Bind { path: p, source })?;
    Ok(listener)
}

/// Accepts control clients until the task is dropped: each is served by `handle` in its own
/// task, at most MAX_CLIENTS at once; beyond that a client gets a "busy" answer at once.
pub async fn serve_clients<F, Fut>(listener: UnixListener, handle: F)
where
    F: Fn(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("control socket accept: {e}");
                // Out of descriptors, most likely: give the clients a moment to go.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match std::sync::Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let served = handle(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let busy = Response::failed(format!(
                        "the daemon is serving {MAX_CLIENTS} control clients already; try again"
                    ));
                    let _ = timeout(REQUEST_TIMEOUT, write_response(stream, &busy)).await;
                });
            }
        }
    }
}

/// Writes one response line.
pub async fn write_response(mut stream: UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).expect("responses always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

/// Reads one request line from a connection: bounded in size and time.
pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request, Response> {
    let mut line = Vec::new();
    let read = async {
        loop {
            let buf = stream.fill_buf().await?;
            if buf.is_empty() {
                return Ok::<bool, std::io::Error>(false);
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], true),
                None => (buf, false),
            };
            let taken = chunk.len() + usize::from(done);
            line.extend_from_slice(chunk);
            stream.consume(taken);
            if done || line.len() > MAX_REQUEST_BYTES {
                return Ok(done);
            }
        }
    };
    match timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => Err(Response::bad_input(format!(
            "no complete request within {REQUEST_TIMEOUT:?}"
        ))),
        Ok(Err(e)) => Err(Response::failed(format!("reading the request: {e}"))),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Err(Response::bad_input(format!(
            "request larger than {MAX_REQUEST_BYTES} bytes"
        ))),
        Ok(Ok(_)) => serde_json::from_slice(&line)
            .map_err(|e| Response::bad_input(format!("malformed request: {e}"))),
    }
}

/// A status with one service and backend, for tests of what is computed from statuses.
#[cfg(test)]
pub(crate) fn sample_status(new_flows: u64, packets: u64, bytes: u64, drops: u64) -> Status {
    Status {
        services: vec![ServiceStatus {
            name: "web".into(),
            vip: "198.18.100.1:80".into(),
            protocol: "tcp".into(),
            mode: "nat".into(),
            snat: vec!["198.18.1.1".into()],
            mss: Some(1360),
            slow_start_ms: Some(10_000),
            discovery: Some("api:8001".into()),
            discovery_error: None,
            backends: vec![BackendStatus {
                address: "198.18.1.11:8000".into(),
                weight: 4,
                healthy: true,
                suspect: false,
                slow_start_percent: Some(30),
                source: BackendSource::Dns,
                active_flows: 7,
                snat_ports_in_use: 7,
                new_flows,
                packets,
                bytes,
                last_error: None,
            }],
        }],
        interfaces: vec![],
        host: HostStatus::off("[host] cgroup = \"off\""),
        flows: FlowTableStatus {
            entries: 14,
            capacity: 1024,
            counted_ns: 0,
        },
        counters: std::collections::BTreeMap::from([("drop_tcp_no_flow".into(), drops)]),
        snat_ports_per_backend: 22768,
        debug_log: false,
        warnings: vec![],
        terminating: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_is_refused_at_the_deadline() {
        let (mut client, server) = UnixStream::pair().expect("pair");
        client
            .write_all(b"{\"command\":")
            .await
            .expect("half a request");
        let mut reader = BufReader::new(server);
        let started = tokio::time::Instant::now();
        let refusal = read_request(&mut reader).await.expect_err("too slow");
        assert!(refusal.bad_input, "{refusal:?}");
        assert!(
            refusal
                .error
                .as_deref()
                .unwrap_or("")
                .contains("no complete request")
        );
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_are_told_busy_and_the_rest_still_served() {
        let dir = std::env::temp_dir().join(format!("lb-control-busy-{}", std::process::id()));
        let path = dir.join("c.sock");
        let listener = bind(&path).await.expect("bind");
        let (release, hold) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve_clients(listener, move |stream| {
            let mut hold = hold.clone();
            async move {
                // Every client is held until released: the slots fill up.
                let _ = hold.wait_for(|go| *go).await;
                let _ = write_response(stream, &Response::done()).await;
            }
        }));
        let mut held = Vec::new();
        for _ in 0..MAX_CLIENTS {
            held.push(UnixStream::connect(&path).await.expect("connect"));
        }
        let extra = UnixStream::connect(&path).await.expect("connect");
        let mut answer = String::new();
        BufReader::new(extra)
            .read_line(&mut answer)
            .await
            .expect("busy answer");
        let busy: Response = serde_json::from_str(&answer).expect("a response");
        assert!(!busy.ok && busy.error.unwrap_or_default().contains("try again"));
        release.send(true).expect("release");
        for client in held {
            let mut answer = String::new();
            BufReader::new(client)
                .read_line(&mut answer)
                .await
                .expect("answer");
            assert!(answer.contains("\"ok\":true"), "{answer}");
        }
        server.abort();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        let set = Request::SetWeight {
            service: "web".into(),
            backend: "198.18.2.11:8000".into(),
            weight: 3,
        };
        assert_eq!(
            serde_json::to_string(&set).expect("json"),
            r#"{"command":"set-weight","service":"web","backend":"198.18.2.11:8000","weight":3}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"status"}"#).expect("json"),
            Request::Status
        );
    }

    #[tokio::test]
    async fn bad_requests_get_bad_input_answers() {
        let dir = std::env::temp_dir().join(format!("lb-control-test-{}", std::process::id()));
        let path = dir.join("c.sock");
        let listener = bind(&path).await.expect("bind");
        let server = tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..3 {
                let (s, _) = listener.accept().await.expect("accept");
                let mut reader = BufReader::new(s);
                answers.push(read_request(&mut reader).await);
            }
            answers
        });
        for payload in [
            &b"{not json}\n"[..],
            &vec![b'x'; MAX_REQUEST_BYTES + 10][..],
            &b"{\"command\":\"reboot\"}\n"[..],
        ] {
            let mut s = UnixStream::connect(&path).await.expect("connect");
            s.write_all(payload).await.expect("write");
            drop(s);
        }
        let answers = server.await.expect("server");
        for a in answers {
            let r = a.expect_err("must be refused");
            assert!(r.bad_input && !r.ok, "{r:?}");
        }
        // A second daemon on the same socket is refused while the first serves it.
        let _keep = UnixListener::bind(dir.join("other.sock")).expect("bind other");
        assert!(matches!(
            bind(&dir.join("other.sock")).await,
            Err(ControlError::InUse { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
