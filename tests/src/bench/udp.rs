//! The UDP side of the end-to-end benchmark, run inside the namespaces as `lb-bench udp-echo`
//! (on each backend) and `lb-bench udp-load` (on the client).
//!
//! The load is closed-loop and bounded: each flow (its own socket and source port) keeps at most
//! `window` requests in flight, so the generator never floods a slow contender into a loss
//! spiral, and it stops after `seconds`. A flow that hears nothing for 100 ms counts its
//! requests in flight as lost and starts again.

use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

const PAYLOAD: &[u8] = b"lb-bench udp request, 32 bytes!!";
const LOSS_TIMEOUT: Duration = Duration::from_millis(100);

/// Echoes every datagram back to its sender, forever (the namespace's guard kills it).
pub fn echo(port: u16) -> std::io::Result<()> {
    // Both families on one socket (IPv4 clients as mapped addresses), IPv4 alone without IPv6.
    let socket = UdpSocket::bind(("::", port)).or_else(|_| UdpSocket::bind(("0.0.0.0", port)))?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        // A full send buffer drops the reply, as a loaded server would.
        let _ = socket.send_to(&buf[..n], peer);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpLoadResult {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub elapsed_us: u64,
}

struct Flow {
    socket: UdpSocket,
    in_flight: u32,
    last_progress: Instant,
}

/// Runs `flows` flows over `targets` (flow i goes to targets[i % len]) for `seconds`.
pub fn load(
    targets: &[SocketAddr],
    flows: usize,
    window: u32,
    seconds: f64,
) -> std::io::Result<UdpLoadResult> {
    if targets.is_empty() || flows == 0 || window == 0 {
        return Err(std::io::Error::other(
            "udp-load needs targets, flows and a window",
        ));
    }
    let mut list = Vec::with_capacity(flows);
    for i in 0..flows {
        let target = targets[i % targets.len()];
        let any = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(target)?;
        socket.set_nonblocking(true)?;
        list.push(Flow {
            socket,
            in_flight: 0,
            last_progress: Instant::now(),
        });
    }
    let mut result = UdpLoadResult::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut buf = [0u8; 2048];
    let mut pollfds: Vec<libc::pollfd> = list
        .iter()
        .map(|f| libc::pollfd {
            fd: f.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while Instant::now() < deadline {
        let now = Instant::now();
        for flow in &mut list {
            if flow.in_flight > 0 && now - flow.last_progress > LOSS_TIMEOUT {
                result.lost += u64::from(flow.in_flight);
                flow.in_flight = 0;
            }
            while flow.in_flight < window {
                match flow.socket.send(PAYLOAD) {
                    Ok(_) => {
                        if flow.in_flight == 0 {
                            flow.last_progress = now;
                        }
                        flow.in_flight += 1;
                        result.sent += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ECONNREFUSED from an earlier ICMP error: counted as lost by the timeout.
                    Err(_) => break,
                }
            }
        }
        // SAFETY: pollfds is a valid array of `len` pollfd structs for the call's duration.
        let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 1) };
        if ready <= 0 {
            continue;
        }
        for (flow, pfd) in list.iter_mut().zip(&pollfds) {
            if pfd.revents == 0 {
                continue;
            }
            while flow.socket.recv(&mut buf).is_ok() {
                result.received += 1;
                flow.in_flight = flow.in_flight.saturating_sub(1);
                flow.last_progress = Instant::now();
            }
        }
    }
    result.elapsed_us = start.elapsed().as_micros() as u64;
    Ok(result)
}
