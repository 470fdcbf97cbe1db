//! A backend server for tests and the demo: answers HTTP requests on a TCP port with its name
//! (keep-alive supported) and echoes UDP datagrams prefixed with its name, so that a client
//! sees which backend served it. A datagram that starts with `delay=MS ` is answered after MS
//! milliseconds, as a recursive resolver answers late. `GET /stream/N/MS` is answered with N
//! lines `chunk I`, MS milliseconds apart, then the connection closes: a download with pauses.
//! Usage: lb-testsrv NAME PORT

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    thread,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(port)) = (
        args.get(1).cloned(),
        args.get(2).and_then(|p| p.parse::<u16>().ok()),
    ) else {
        eprintln!("usage: lb-testsrv NAME PORT");
        std::process::exit(2);
    };
    let udp = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind udp {port}: {e}"));
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let mut reply = format!("{udp_name}: ").into_bytes();
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
    });
    let tcp =
        TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind tcp {port}: {e}"));
    for stream in tcp.incoming().flatten() {
        let name = name.clone();
        thread::spawn(move || serve(stream, &name));
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
    let mut reader = BufReader::new(stream);
    loop {
        let mut close = false;
        let mut stream_asked = None;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            stream_asked = stream_asked.or_else(|| stream_request(&line));
            if line.to_ascii_lowercase().starts_with("connection: close") {
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
        let body = format!("{name}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
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
