//! Health checks: one tokio task per backend probes it every `interval` (TCP connect, an HTTP
//! GET by hyper's client whose status and body must be as expected, or a UDP exchange) and
//! reports each result; `Tracker` turns results into
//! up/down with rise/fall hysteresis. Writes no map: the daemon applies state changes.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::timeout};

use crate::config::{HTTP_BODY_READ_MAX, HealthConfig, HealthKind, HttpCheck};

/// Probes `addr` once; `Err` says why it is down.
pub async fn probe(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), String> {
    let target = SocketAddr::new(addr.ip(), cfg.port.unwrap_or(addr.port()));
    match &cfg.kind {
        HealthKind::None => Ok(()),
        HealthKind::Tcp => timeout(cfg.timeout, TcpStream::connect(target))
            .await
            .map_err(|_| format!("connect to {target} timed out after {:?}", cfg.timeout))?
            .map(drop)
            .map_err(|e| format!("connect to {target}: {e}")),
        HealthKind::Udp { send, expect } => timeout(
            cfg.timeout,
            udp_exchange(target, send.as_bytes(), expect.as_deref()),
        )
        .await
        .map_err(|_| format!("no answer from {target} within {:?}", cfg.timeout))?,
        HealthKind::Http(check) => timeout(cfg.timeout, http_get(target, check))
            .await
            .map_err(|_| {
                format!(
                    "GET http://{target}{} timed out after {:?}",
                    check.path, cfg.timeout
                )
            })?,
    }
}

/// One datagram to `target` and its answer. On a connected socket the ICMP port unreachable
/// of a closed port comes back as a refused receive: down at once, no need to wait.
async fn udp_exchange(target: SocketAddr, send: &[u8], expect: Option<&str>) -> Result<(), String> {
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any)
        .await
        .map_err(|e| format!("a UDP socket for {target}: {e}"))?;
    socket
        .connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    socket
        .send(send)
        .await
        .map_err(|e| format!("send to {target}: {e}"))?;
    let mut answer = vec![0u8; 2048];
    let n = socket
        .recv(&mut answer)
        .await
        .map_err(|e| format!("answer from {target}: {e}"))?;
    match expect {
        Some(want) if !String::from_utf8_lossy(&answer[..n]).contains(want) => {
            Err(format!("the answer from {target} does not hold {want:?}"))
        }
        _ => Ok(()),
    }
}

/// Aborts a task when dropped: a probe that times out takes its connection's task with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 exchange by hyper's client: the status must be accepted, and the body, if the
/// check expects something, must hold it within its first HTTP_BODY_READ_MAX bytes.
async fn http_get(target: SocketAddr, check: &HttpCheck) -> Result<(), String> {
    let url = format!("http://{target}{}", check.path);
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = hyper::Request::get(check.path.as_str())
        .header(
            HOST,
            check.host.clone().unwrap_or_else(|| target.to_string()),
        )
        .header(CONNECTION, "close")
        .header(USER_AGENT, "lb-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let code = response.status().as_u16();
    if !check.accepts(code) {
        return Err(format!("GET {url} answered {code}"));
    }
    let Some(want) = &check.expect else {
        return Ok(());
    };
    let mut body = response.into_body();
    let mut seen: Vec<u8> = Vec::new();
    while seen.len() < HTTP_BODY_READ_MAX
        && let Some(frame) = body.frame().await
    {
        let frame = frame.map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            let room = HTTP_BODY_READ_MAX - seen.len();
            seen.extend_from_slice(&data[..data.len().min(room)]);
            if seen.windows(want.len()).any(|w| w == want.as_bytes()) {
                return Ok(());
            }
        }
    }
    Err(format!(
        "GET {url} answered {code}, but its body does not hold {want:?} (read {} bytes)",
        seen.len()
    ))
}

/// Consecutive results -> state, with `rise` successes to come up and `fall` failures to go
/// down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    pub healthy: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Tracker {
    pub fn new(healthy: bool, rise: u32, fall: u32) -> Self {
        Self {
            healthy,
            streak: 0,
            rise,
            fall,
        }
    }

    /// Records one result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// The pause before the first probe of a backend: spreads many backends' probes over the
/// interval instead of firing them all at once.
pub fn initial_delay(interval: Duration, index: usize, count: usize) -> Duration {
    if count == 0 {
        Duration::ZERO
    } else {
        interval.mul_f64(index as f64 / count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_failures_and_up_after_rise_successes() {
        let mut t = Tracker::new(true, 2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert!(!t.healthy);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert!(t.healthy);
    }

    #[test]
    fn an_interrupted_streak_starts_over() {
        let mut t = Tracker::new(true, 2, 2);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
    }

    #[test]
    fn delays_spread_over_the_interval() {
        let i = Duration::from_millis(1000);
        assert_eq!(initial_delay(i, 0, 4), Duration::ZERO);
        assert_eq!(initial_delay(i, 2, 4), Duration::from_millis(500));
        assert_eq!(initial_delay(i, 0, 0), Duration::ZERO);
    }

    #[tokio::test]
    async fn tcp_probe_sees_a_listener_and_a_closed_port_in_either_family() {
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(any).expect("bind");
            let addr = listener.local_addr().expect("addr");
            let cfg = HealthConfig::default_for(crate::config::Protocol::Tcp);
            assert_eq!(probe(addr, &cfg).await, Ok(()), "{addr}");
            drop(listener);
            assert!(probe(addr, &cfg).await.is_err(), "{addr}");
        }
    }

    #[tokio::test]
    async fn udp_probe_over_ipv6_reads_the_answer_and_sees_a_closed_port() {
        let server = tokio::net::UdpSocket::bind("[::1]:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).await.expect("recv");
            assert_eq!(&buf[..n], b"ping");
            server.send_to(b"pong", from).await.expect("send");
        });
        let cfg = HealthConfig {
            kind: HealthKind::Udp {
                send: "ping".into(),
                expect: Some("pong".into()),
            },
            ..HealthConfig::default_for(crate::config::Protocol::Udp)
        };
        assert_eq!(probe(addr, &cfg).await, Ok(()));
        echo.await.expect("echo");
        assert!(probe(addr, &cfg).await.is_err(), "the port is closed now");
    }

    /// A listener on a free loopback port, and its address.
    async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// A one-shot HTTP server answering `answer`; gives its address and the request head it read.
    async fn one_answer(answer: String) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (listener, addr) = loopback_listener().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer.as_bytes()).await;
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, server)
    }

    fn http_config(check: HttpCheck) -> HealthConfig {
        HealthConfig {
            kind: HealthKind::Http(check),
            ..HealthConfig::default_for(crate::config::Protocol::Tcp)
        }
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        for (status, up) in [
            ("200 OK", true),
            ("302 Found", true),
            ("503 Unavailable", false),
        ] {
            let (addr, server) =
                one_answer(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")).await;
            let cfg = http_config(HttpCheck::new("/"));
            assert_eq!(probe(addr, &cfg).await.is_ok(), up, "status {status}");
            server.await.expect("server");
        }
    }

    #[tokio::test]
    async fn http_probe_sends_host_and_close_and_takes_status_ranges() {
        let (addr, server) =
            one_answer("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".into()).await;
        let check = HttpCheck {
            host: Some("api.example".into()),
            status: vec![(200, 299), (503, 503)],
            ..HttpCheck::new("/healthz?deep=1")
        };
        assert_eq!(probe(addr, &http_config(check)).await, Ok(()));
        let head = server.await.expect("server");
        assert!(
            head.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
            "{head}"
        );
        let head = head.to_ascii_lowercase();
        assert!(head.contains("host: api.example\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");

        let (addr, server) =
            one_answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into()).await;
        let check = HttpCheck {
            status: vec![(204, 204)],
            ..HttpCheck::new("/")
        };
        let why = probe(addr, &http_config(check))
            .await
            .expect_err("200 is not 204");
        assert!(why.contains("answered 200"), "{why}");
        let head = server.await.expect("server");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("host: {addr}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn http_probe_looks_for_the_expected_body() {
        for (body, up) in [("status: ok\n", true), ("status: degraded\n", false)] {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let (addr, server) = one_answer(answer).await;
            let check = HttpCheck {
                expect: Some("ok".into()),
                ..HttpCheck::new("/")
            };
            let result = probe(addr, &http_config(check)).await;
            assert_eq!(result.is_ok(), up, "{body:?}: {result:?}");
            server.await.expect("server");
        }
        // A chunked body, the word past the first chunk.
        let answer =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nok\r\n0\r\n\r\n";
        let (addr, server) = one_answer(answer.into()).await;
        let check = HttpCheck {
            expect: Some("cok".into()),
            ..HttpCheck::new("/")
        };
        assert_eq!(probe(addr, &http_config(check)).await, Ok(()));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn http_probe_fails_on_garbage_and_on_a_server_that_never_answers() {
        let (addr, server) = one_answer("SSH-2.0-OpenSSH\r\n\r\n".into()).await;
        assert!(
            probe(addr, &http_config(HttpCheck::new("/")))
                .await
                .is_err()
        );
        server.await.expect("server");
        // Accepts and reads, never answers: the timeout says so.
        let (listener, addr) = loopback_listener().await;
        let _server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let cfg = HealthConfig {
            timeout: Duration::from_millis(200),
            ..http_config(HttpCheck::new("/"))
        };
        let why = probe(addr, &cfg).await.expect_err("no answer");
        assert!(why.contains("timed out"), "{why}");
    }
}
