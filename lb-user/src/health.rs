//! Health checks: one tokio task per backend probes it every `interval` (TCP connect, or an
//! HTTP GET whose status must be 2xx/3xx) and reports each result; `Tracker` turns results into
//! up/down with rise/fall hysteresis. Writes no map: the daemon applies state changes.

use std::{net::SocketAddrV4, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use crate::config::{HealthConfig, HealthKind};

/// Probes `addr` once; `Err` says why it is down.
pub async fn probe(addr: SocketAddrV4, cfg: &HealthConfig) -> Result<(), String> {
    let target = SocketAddrV4::new(*addr.ip(), cfg.port.unwrap_or(addr.port()));
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
        HealthKind::Http { path } => {
            timeout(cfg.timeout, http_get(target, path))
                .await
                .map_err(|_| {
                    format!(
                        "GET http://{target}{path} timed out after {:?}",
                        cfg.timeout
                    )
                })?
        }
    }
}

/// One datagram to `target` and its answer. On a connected socket the ICMP port unreachable
/// of a closed port comes back as a refused receive: down at once, no need to wait.
async fn udp_exchange(
    target: SocketAddrV4,
    send: &[u8],
    expect: Option<&str>,
) -> Result<(), String> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", 0))
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

async fn http_get(target: SocketAddrV4, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {target}: {e}"))?;
    // The status line is all we need: "HTTP/1.x NNN".
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        let n = stream
            .read(&mut head[got..])
            .await
            .map_err(|e| format!("read from {target}: {e}"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = String::from_utf8_lossy(&head[..got]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200..400) => Ok(()),
        Some(code) => Err(format!("GET http://{target}{path} answered {code}")),
        None => Err(format!("GET http://{target}{path}: not an HTTP response")),
    }
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
    async fn tcp_probe_sees_a_listener_and_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("v4")
        };
        let cfg = HealthConfig::default_for(crate::config::Protocol::Tcp);
        assert_eq!(probe(addr, &cfg).await, Ok(()));
        drop(listener);
        assert!(probe(addr, &cfg).await.is_err());
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        for (status, up) in [
            ("200 OK", true),
            ("302 Found", true),
            ("503 Unavailable", false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
                panic!("v4")
            };
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await;
            });
            let cfg = HealthConfig {
                kind: HealthKind::Http { path: "/".into() },
                ..HealthConfig::default_for(crate::config::Protocol::Tcp)
            };
            assert_eq!(probe(addr, &cfg).await.is_ok(), up, "status {status}");
            server.await.expect("server");
        }
    }
}
