//! The Prometheus endpoint: `GET /metrics` in the OpenMetrics text format, encoded by the
//! Prometheus project's `prometheus-client` from the status the daemon caches each second (a
//! scrape never takes the daemon's lock). Listens on 127.0.0.1:9640 unless `lb run --metrics`
//! says otherwise (`off` disables it). hyper serves HTTP/1.1 with the bounds a hostile client
//! needs: a request head of at most 8 KiB (431 beyond), read within a deadline that also bounds
//! the whole exchange, one request per connection, and at most 32 connections at once.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header::CONTENT_TYPE};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, time::timeout};

use crate::control::{BackendStatus, Status};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9640";
/// hyper's smallest read buffer, and so the largest request head.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 32;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ValueGauge = Gauge<u64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    vip: String,
    protocol: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

type Field = fn(&BackendStatus) -> u64;

/// Per-backend counters: the names get `_total` from the encoder.
const BACKEND_COUNTERS: [(&str, &str, Field); 3] = [
    (
        "lb_backend_packets",
        "Packets forwarded for the backend's flows, both directions.",
        |b| b.packets,
    ),
    (
        "lb_backend_bytes",
        "Bytes forwarded for the backend's flows, both directions.",
        |b| b.bytes,
    ),
    (
        "lb_backend_new_flows",
        "Flows the data path gave the backend.",
        |b| b.new_flows,
    ),
];

const BACKEND_GAUGES: [(&str, &str, Field); 6] = [
    (
        "lb_backend_active_flows",
        "Connections of the backend not closing, at the last sweep.",
        |b| b.active_flows,
    ),
    (
        "lb_backend_healthy",
        "1 if the backend passes its health checks.",
        |b| u64::from(b.healthy),
    ),
    (
        "lb_backend_suspect",
        "1 if the data path saw the backend fail a new connection and steers new flows off it.",
        |b| u64::from(b.suspect),
    ),
    (
        "lb_backend_weight",
        "The backend's weight (0: drained).",
        |b| u64::from(b.weight),
    ),
    (
        "lb_backend_slow_start_percent",
        "The share of its weight the backend takes: below 100 while it ramps up (slow_start).",
        |b| u64::from(b.slow_start_percent.unwrap_or(100)),
    ),
    (
        "lb_backend_snat_ports_in_use",
        "SNAT ports the backend's flows hold, at the last sweep.",
        |b| b.snat_ports_in_use,
    ),
];

/// The exposition text for `status`.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();
    let backends = || {
        status.services.iter().flat_map(|s| {
            s.backends.iter().map(move |b| {
                let labels = BackendLabels {
                    service: s.name.clone(),
                    vip: s.vip.clone(),
                    protocol: s.protocol.clone(),
                    backend: b.address.clone(),
                };
                (labels, b)
            })
        })
    };
    for (name, help, field) in BACKEND_COUNTERS {
        let family = Family::<BackendLabels, Counter>::default();
        for (labels, b) in backends() {
            family.get_or_create(&labels).inc_by(field(b));
        }
        registry.register(name, help, family);
    }
    for (name, help, field) in BACKEND_GAUGES {
        let family = Family::<BackendLabels, ValueGauge>::default();
        for (labels, b) in backends() {
            family.get_or_create(&labels).set(field(b));
        }
        registry.register(name, help, family);
    }
    let single = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let gauge = ValueGauge::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    single(
        &mut registry,
        "lb_snat_ports_per_backend",
        "SNAT ports each backend can use per address of its service's SNAT pool.",
        status.snat_ports_per_backend,
    );
    single(
        &mut registry,
        "lb_flow_table_entries",
        "Flow table entries (two per connection).",
        status.flows.entries,
    );
    single(
        &mut registry,
        "lb_flow_table_capacity",
        "Flow table size in entries.",
        status.flows.capacity,
    );
    let packets = Family::<VerdictLabels, Counter>::default();
    let events = Family::<EventLabels, Counter>::default();
    for (counter, &value) in &status.counters {
        let verdict = match counter.split_once('_') {
            Some(("pass", reason)) => Some(("pass", reason)),
            Some(("drop", reason)) => Some(("drop", reason)),
            _ if counter == "tx" || counter == "redirect" => Some((counter.as_str(), "forwarded")),
            _ => None,
        };
        if let Some((verdict, reason)) = verdict {
            let labels = VerdictLabels {
                verdict: verdict.into(),
                reason: reason.into(),
            };
            packets.get_or_create(&labels).inc_by(value);
        } else if let Some(event) = counter.strip_prefix("event_") {
            let labels = EventLabels {
                event: event.into(),
            };
            events.get_or_create(&labels).inc_by(value);
        }
    }
    registry.register(
        "lb_packets",
        "Packets by verdict (pass to the kernel, drop, tx, redirect) and reason.",
        packets,
    );
    registry.register(
        "lb_events",
        "Data-path events besides verdicts (backends marked suspect, flows steered off them).",
        events,
    );
    single(
        &mut registry,
        "lb_warnings",
        "Warnings lb status shows now (exhaustion and the like).",
        status.warnings.len() as u64,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// The answer to a request: the metrics for `GET /metrics`, else an error status.
pub fn reply(
    method: &Method,
    path: &str,
    metrics: impl FnOnce() -> String,
) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (method, path) {
        (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics()),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only /metrics is served\n".into(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "send GET /metrics\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
    response
}

/// Serves the endpoint until the task is dropped; `metrics` renders the current text.
pub async fn serve<F>(listener: TcpListener, metrics: F)
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics endpoint accept: {e}");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = reply(request.method(), request.uri().path(), &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_DEADLINE)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = timeout(REQUEST_DEADLINE, connection).await;
        });
    }
}

/// Binds the endpoint; `None` for `off`.
pub async fn bind(listen: &str) -> std::io::Result<Option<TcpListener>> {
    if listen == "off" {
        return Ok(None);
    }
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| std::io::Error::other(format!("{listen:?} is not IP:PORT or off")))?;
    TcpListener::bind(addr).await.map(Some)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;
    use crate::control::sample_status;

    #[test]
    fn every_family_has_help_and_type_and_samples_parse() {
        let mut status = sample_status(10, 100, 1000, 3);
        status.counters.insert("pass_not_service".into(), 5);
        status.counters.insert("redirect".into(), 90);
        status.counters.insert("event_suspect_refused".into(), 2);
        status.services[0].name = "we\"b".into();
        let text = render(&status);
        let mut families = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                assert!(
                    rest.ends_with(" counter") || rest.ends_with(" gauge"),
                    "{line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") || line == "# EOF" {
                continue;
            }
            // name{labels} value, or name value
            let (series, value) = line.rsplit_once(' ').expect("a sample");
            value.parse::<u64>().expect("an integer value");
            assert!(series.starts_with("lb_"), "{line}");
        }
        assert_eq!(families, 15);
        assert_eq!(
            text.lines().last(),
            Some("# EOF"),
            "OpenMetrics ends its text"
        );
        assert!(text.contains(
            "lb_backend_packets_total{service=\"we\\\"b\",vip=\"198.18.100.1:80\",protocol=\"tcp\",backend=\"198.18.1.11:8000\"} 100"
        ));
        assert!(text.contains("lb_packets_total{verdict=\"drop\",reason=\"tcp_no_flow\"} 3"));
        assert!(text.contains("lb_packets_total{verdict=\"pass\",reason=\"not_service\"} 5"));
        assert!(text.contains("lb_packets_total{verdict=\"redirect\",reason=\"forwarded\"} 90"));
        assert!(text.contains("lb_events_total{event=\"suspect_refused\"} 2"));
        assert!(text.contains(
            "lb_backend_slow_start_percent{service=\"we\\\"b\",vip=\"198.18.100.1:80\",protocol=\"tcp\",backend=\"198.18.1.11:8000\"} 30"
        ));
        assert!(text.contains("lb_flow_table_capacity 1024"));
        assert!(text.contains("lb_backend_healthy{"));
    }

    #[tokio::test]
    async fn only_get_metrics_is_answered_with_metrics() {
        use http_body_util::BodyExt as _;
        let ok = reply(&Method::GET, "/metrics", || "m 1\n".into());
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[CONTENT_TYPE], OPENMETRICS);
        let body = ok.into_body().collect().await.expect("a full body");
        assert_eq!(body.to_bytes(), Bytes::from("m 1\n"));
        let missing = reply(&Method::GET, "/", || unreachable!());
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let posted = reply(&Method::POST, "/metrics", || unreachable!());
        assert_eq!(posted.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    /// One raw exchange with the server: what it answers to `request`.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let _ = client.write_all(request).await;
        let mut reply = Vec::new();
        let _ = client.read_to_end(&mut reply).await;
        String::from_utf8_lossy(&reply).into_owned()
    }

    #[tokio::test]
    async fn the_server_answers_and_survives_slow_oversized_and_garbled_clients() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, || "lb_up 1\n".to_owned()));
        // A client that sends nothing holds a slot, not the server.
        let _idle = TcpStream::connect(addr).await.expect("idle");
        let big = exchange(addr, &vec![b'a'; MAX_REQUEST_HEAD + 10]).await;
        assert!(
            big.starts_with("HTTP/1.1 431") || big.starts_with("HTTP/1.1 400"),
            "{big}"
        );
        let garbled = exchange(addr, b"\xff\xfe garbage\r\n\r\n").await;
        assert!(garbled.starts_with("HTTP/1.1 400"), "{garbled}");
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.ends_with("lb_up 1\n"), "{ok}");
        server.abort();
    }
}
