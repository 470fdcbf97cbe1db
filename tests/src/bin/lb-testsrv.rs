//! A backend server for tests and the demo: answers HTTP requests on a TCP port with its name
//! (keep-alive supported) and echoes UDP datagrams prefixed with its name, so that a client
//! sees which backend served it. A datagram that starts with `delay=MS ` is answered after MS
//! milliseconds, as a recursive resolver answers late. `GET /stream/N/MS` is answered with N
//! lines `chunk I`, MS milliseconds apart, then the connection closes: a download with pauses.
//! `GET /bytes/N` is answered with N bytes (at most 16 MiB), for downloads; a request with a
//! body (`Content-Length`) is answered with `NAME received N`, for uploads. `GET /peer` is
//! answered with `NAME ADDRESS:PORT`, the peer as the server sees it (the client's address, or
//! the balancer's SNAT address).
//! It listens on IPv4 and, where the host has IPv6, on IPv6.
//! Usage: lb-testsrv NAME PORT

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

use socket2::{Domain, Socket, Type};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(port)) = (
        args.get(1).cloned(),
        args.get(2).and_then(|p| p.parse::<u16>().ok()),
    ) else {
        eprintln!("usage: lb-testsrv NAME PORT");
        std::process::exit(2);
    };
    for udp in bind_both(port, Type::DGRAM) {
        let udp: UdpSocket = udp.into();
        let name = name.clone();
        thread::spawn(move || echo(&udp, &name));
    }
    let mut listeners: Vec<TcpListener> = bind_both(port, Type::STREAM)
        .into_iter()
        .map(|s| {
            s.listen(1024)
                .unwrap_or_else(|e| panic!("listen {port}: {e}"));
            s.into()
        })
        .collect();
    let first = listeners.remove(0);
    for tcp in listeners {
        let name = name.clone();
        thread::spawn(move || accept(&tcp, &name));
    }
    accept(&first, &name);
}

/// Sockets of `ty` on `port`: IPv4 at 0.0.0.0 and, where the host has IPv6, IPv6 alone at
/// [::] (IPV6_V6ONLY, so that IPv4 peers stay IPv4 addresses).
fn bind_both(port: u16, ty: Type) -> Vec<Socket> {
    // As std's TcpListener::bind: a restarted server binds past its old TIME_WAIT sockets.
    let reuse = ty == Type::STREAM;
    let v4 = Socket::new(Domain::IPV4, ty, None).unwrap_or_else(|e| panic!("socket: {e}"));
    v4.set_reuse_address(reuse)
        .unwrap_or_else(|e| panic!("SO_REUSEADDR: {e}"));
    let any4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, port).into();
    v4.bind(&any4.into())
        .unwrap_or_else(|e| panic!("bind {any4}: {e}"));
    let mut sockets = vec![v4];
    let v6 = Socket::new(Domain::IPV6, ty, None).and_then(|s| {
        s.set_only_v6(true)?;
        s.set_reuse_address(reuse)?;
        let any6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
        s.bind(&any6.into())?;
        Ok(s)
    });
    sockets.extend(v6.ok());
    sockets
}

fn accept(tcp: &TcpListener, name: &str) {
    for stream in tcp.incoming().flatten() {
        let name = name.to_owned();
        thread::spawn(move || serve(stream, &name));
    }
}

/// Answers each datagram with `NAME: ` and the datagram.
fn echo(udp: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = format!("{name}: ").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        match reply_delay(&buf[..n]) {
            None => {
                let _ = udp.send_to(&reply, peer);
            }
            Some(delay) => {
                let Ok(socket) = udp.try_clone() else {
                    continue;
                };
                thread::spawn(move || {
                    thread::sleep(delay);
                    let _ = socket.send_to(&reply, peer);
                });
            }
        }
    }
}

/// The delay a datagram asks for with a leading `delay=MS `, at most 10 s.
fn reply_delay(datagram: &[u8]) -> Option<std::time::Duration> {
    let text = std::str::from_utf8(datagram).ok()?;
    let ms: u64 = text
        .strip_prefix("delay=")?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms.min(10_000)))
}

/// Answers each request on the connection until the client closes it or asks to.
fn serve(stream: TcpStream, name: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let peer = stream.peer_addr().map_or_else(
        |_| "unknown".to_owned(),
        |a| std::net::SocketAddr::new(a.ip().to_canonical(), a.port()).to_string(),
    );
    let mut reader = BufReader::new(stream);
    loop {
        let mut close = false;
        let mut stream_asked = None;
        let mut bytes_asked = None;
        let mut peer_asked = false;
        let mut body_len: u64 = 0;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            stream_asked = stream_asked.or_else(|| stream_request(&line));
            bytes_asked = bytes_asked.or_else(|| bytes_request(&line));
            peer_asked |= line.starts_with("GET /peer ");
            if let Some(len) = header_value(&line, "content-length") {
                body_len = len.parse().unwrap_or(0);
            }
            if header_value(&line, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                close = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        if let Some((chunks, pause)) = stream_asked {
            let _ = stream_chunks(&mut writer, chunks, pause);
            return;
        }
        let body = if body_len > 0 {
            let Ok(received) = std::io::copy(
                &mut std::io::Read::take(&mut reader, body_len),
                &mut std::io::sink(),
            ) else {
                return;
            };
            format!("{name} received {received}\n").into_bytes()
        } else if let Some(n) = bytes_asked {
            vec![b'x'; n]
        } else if peer_asked {
            format!("{name} {peer}\n").into_bytes()
        } else {
            format!("{name}\n").into_bytes()
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&body).is_err() || close {
            return;
        }
    }
}

/// `GET /bytes/N`: N bytes, at most 16 MiB.
fn bytes_request(line: &str) -> Option<usize> {
    let n: usize = line
        .strip_prefix("GET /bytes/")?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some(n.min(16 << 20))
}

/// The value of the header `name` (lower case) if `line` is that header.
fn header_value<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (key, value) = line.split_once(':')?;
    key.eq_ignore_ascii_case(name).then(|| value.trim())
}

/// `GET /stream/N/MS`: N chunks (at most 100), MS milliseconds apart (at most 10 s).
fn stream_request(line: &str) -> Option<(u32, std::time::Duration)> {
    let path = line.strip_prefix("GET /stream/")?.split(' ').next()?;
    let (chunks, pause) = path.split_once('/')?;
    let chunks: u32 = chunks.parse().ok()?;
    let pause: u64 = pause.parse().ok()?;
    Some((
        chunks.min(100),
        std::time::Duration::from_millis(pause.min(10_000)),
    ))
}

fn stream_chunks(
    writer: &mut TcpStream,
    chunks: u32,
    pause: std::time::Duration,
) -> std::io::Result<()> {
    writer
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")?;
    for i in 0..chunks {
        if i > 0 {
            thread::sleep(pause);
        }
        writer.write_all(format!("chunk {i}\n").as_bytes())?;
    }
    Ok(())
}
