//! The Prometheus endpoint: `GET /metrics` in the text exposition format (0.0.4), rendered from
//! the same status `lb status` shows. Listens on 127.0.0.1:9640 unless `lb run --metrics` says
//! otherwise (`off` disables it). The server reads at most one bounded request head per
//! connection, with a deadline, and closes: a slow or hostile client costs a task and a timer.

use std::{fmt::Write as _, future::Future, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use crate::control::Status;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9640";
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 32;

/// Label values escaped as the format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its HELP and TYPE lines, then samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// The exposition text for `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    type Field = fn(&crate::control::BackendStatus) -> u64;
    let per_backend: [(&str, &str, &str, Field); 9] = [
        (
            "lb_backend_packets_total",
            "counter",
            "Packets forwarded for the backend's flows, both directions.",
            |b| b.packets,
        ),
        (
            "lb_backend_bytes_total",
            "counter",
            "Bytes forwarded for the backend's flows, both directions.",
            |b| b.bytes,
        ),
        (
            "lb_backend_new_flows_total",
            "counter",
            "Flows the data path gave the backend.",
            |b| b.new_flows,
        ),
        (
            "lb_backend_active_flows",
            "gauge",
            "Connections of the backend not closing, at the last sweep.",
            |b| b.active_flows,
        ),
        (
            "lb_backend_healthy",
            "gauge",
            "1 if the backend passes its health checks.",
            |b| u64::from(b.healthy),
        ),
        (
            "lb_backend_suspect",
            "gauge",
            "1 if the data path saw the backend fail a new connection and steers new flows off it.",
            |b| u64::from(b.suspect),
        ),
        (
            "lb_backend_weight",
            "gauge",
            "The backend's weight (0: drained).",
            |b| u64::from(b.weight),
        ),
        (
            "lb_backend_slow_start_percent",
            "gauge",
            "The share of its weight the backend takes: below 100 while it ramps up (slow_start).",
            |b| u64::from(b.slow_start_percent.unwrap_or(100)),
        ),
        (
            "lb_backend_snat_ports_in_use",
            "gauge",
            "SNAT ports the backend's flows hold, at the last sweep.",
            |b| b.snat_ports_in_use,
        ),
    ];
    for (name, kind, help, field) in per_backend {
        let mut family = Family::new(&mut out, name, kind, help);
        for s in &status.services {
            for b in &s.backends {
                let labels = [
                    ("service", s.name.as_str()),
                    ("vip", s.vip.as_str()),
                    ("protocol", s.protocol.as_str()),
                    ("backend", b.address.as_str()),
                ];
                family.sample(name, &labels, field(b));
            }
        }
    }
    let name = "lb_snat_ports_per_backend";
    Family::new(
        &mut out,
        name,
        "gauge",
        "SNAT ports each backend can use per address of its service's SNAT pool.",
    )
    .sample(name, &[], status.snat_ports_per_backend);
    let name = "lb_flow_table_entries";
    Family::new(
        &mut out,
        name,
        "gauge",
        "Flow table entries (two per connection).",
    )
    .sample(name, &[], status.flows.entries);
    let name = "lb_flow_table_capacity";
    Family::new(&mut out, name, "gauge", "Flow table size in entries.").sample(
        name,
        &[],
        status.flows.capacity,
    );
    let name = "lb_packets_total";
    let mut family = Family::new(
        &mut out,
        name,
        "counter",
        "Packets by verdict (pass to the kernel, drop, tx, redirect) and reason.",
    );
    for (counter, &value) in &status.counters {
        let (verdict, reason) = match counter.split_once('_') {
            Some(("pass", r)) => ("pass", r),
            Some(("drop", r)) => ("drop", r),
            _ if counter == "tx" || counter == "redirect" => (counter.as_str(), "forwarded"),
            _ => continue,
        };
        family.sample(name, &[("verdict", verdict), ("reason", reason)], value);
    }
    let name = "lb_events_total";
    let mut family = Family::new(
        &mut out,
        name,
        "counter",
        "Data-path events besides verdicts (backends marked suspect, flows steered off them).",
    );
    for (counter, &value) in &status.counters {
        if let Some(event) = counter.strip_prefix("event_") {
            family.sample(name, &[("event", event)], value);
        }
    }
    let name = "lb_warnings";
    Family::new(
        &mut out,
        name,
        "gauge",
        "Warnings lb status shows now (exhaustion and the like).",
    )
    .sample(name, &[], status.warnings.len() as u64);
    out
}

/// An HTTP/1.x answer to a request head: the metrics for `GET /metrics`, else an error status.
pub fn answer(head: &[u8], metrics: impl FnOnce() -> String) -> String {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (status, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", metrics()),
        (Some("GET"), Some(_)) => ("404 Not Found", "only /metrics is served\n".into()),
        _ => ("400 Bad Request", "send GET /metrics\n".into()),
    };
    let kind = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves the endpoint until the task is dropped; `metrics` renders the current text.
pub async fn serve<F, Fut>(listener: TcpListener, metrics: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = String> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = std::sync::Arc::clone(&slots).acquire_owned().await else {
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
            let _ = timeout(REQUEST_DEADLINE, respond(stream, metrics)).await;
        });
    }
}

async fn respond<F, Fut>(mut stream: TcpStream, metrics: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = if head.len() >= MAX_REQUEST_HEAD {
        answer(b"", String::new)
    } else {
        let body = metrics().await;
        answer(&head, || body)
    };
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
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
            if line.starts_with("# HELP ") {
                continue;
            }
            // name{labels} value, or name value
            let (series, value) = line.rsplit_once(' ').expect("a sample");
            value.parse::<u64>().expect("an integer value");
            assert!(series.starts_with("lb_"), "{line}");
        }
        assert_eq!(families, 15);
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

    #[test]
    fn only_get_metrics_is_answered_with_metrics() {
        let ok = answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || {
            "m 1\n".into()
        });
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("version=0.0.4") && ok.ends_with("\r\n\r\nm 1\n"));
        assert!(ok.contains("Content-Length: 4\r\n"));
        let missing = answer(b"GET / HTTP/1.1\r\n\r\n", || unreachable!());
        assert!(missing.starts_with("HTTP/1.1 404"));
        for bad in [
            &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
            b"",
            b"\xff\xfe garbage",
        ] {
            assert!(answer(bad, || unreachable!()).starts_with("HTTP/1.1 400"));
        }
    }

    #[tokio::test]
    async fn the_server_answers_and_survives_slow_and_oversized_clients() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, || async { "lb_up 1\n".to_owned() }));
        // A client that sends nothing, and one that sends an endless head.
        let _idle = TcpStream::connect(addr).await.expect("idle");
        let mut big = TcpStream::connect(addr).await.expect("big");
        let _ = big.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 10]).await;
        let mut reply = String::new();
        let _ = big.read_to_string(&mut reply).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        let mut client = TcpStream::connect(addr).await.expect("client");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.expect("read");
        assert!(reply.ends_with("lb_up 1\n"), "{reply}");
        server.abort();
    }
}
