//! Health checks of DSR services that reach the service as clients do: a TCP SYN to the VIP,
//! sent to the backend's MAC (L2 form) or inside the IPIP or GUE headers lb's data path would
//! put on it (as Katran's health-check program does), from lb's own address. The backend answers it
//! directly, as it answers clients: a SYN-ACK says the VIP is on its loopback and something
//! listens on the VIP's port; an RST or silence says not. A probe of the backend's own address
//! cannot tell: the service may listen there and still not own the VIP.
//!
//! The frames are built and read here (pure, unit-tested); `probe` sends one from an AF_PACKET
//! socket on the device towards the backend and reads the answer there (the kernel itself
//! answers the SYN-ACK with an RST: it has no socket for it).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{
    conntrack::{TCP_ACK, TCP_RST, TCP_SYN},
    reset::{fold, sum_words},
    tunnel::{GUE_PORT, IPPROTO_IPIP, gue_source_port},
};

use crate::config::ForwardingMode;

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The tunnel a DSR service's packets take, which its probes take too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// L2: none, the frame goes to the backend's MAC.
    None,
    Ipip,
    Gue,
}

impl Tunnel {
    pub fn of(mode: ForwardingMode) -> Self {
        match mode {
            ForwardingMode::DsrIpip => Self::Ipip,
            ForwardingMode::DsrGue => Self::Gue,
            _ => Self::None,
        }
    }
}

/// One probe: where it goes and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynProbe {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// lb's address towards the backend: the SYN's source, where the answer comes back.
    pub src: Ipv4Addr,
    pub src_port: u16,
    pub vip: SocketAddrV4,
    pub seq: u32,
    /// The tunnel and the backend it leads to (the outer source is `src`).
    pub tunnel_to: Option<(Tunnel, Ipv4Addr)>,
}

/// What the backend said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// SYN-ACK for our SYN.
    Accepted,
    /// RST for our SYN: the VIP is there, nothing listens on the port.
    Refused,
}

/// The Internet checksum of words summed to `sum`.
fn checksum(sum: u32) -> u16 {
    !fold(sum)
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body_len: usize) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + body_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let check = checksum(sum_words(&ip, 0));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

/// The probe's frame: Ethernet, (the tunnel's IPv4 header,) IPv4 and a TCP SYN with no options.
pub fn syn_frame(p: &SynProbe) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&p.src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&p.vip.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&p.seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&p.src.octets());
    pseudo[4..8].copy_from_slice(&p.vip.ip().octets());
    pseudo[9] = IPPROTO_TCP;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let check = checksum(sum_words(&tcp, sum_words(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    let inner = ipv4_header(p.src, *p.vip.ip(), IPPROTO_TCP, tcp.len());
    let mut frame = Vec::with_capacity(74);
    frame.extend_from_slice(&p.dst_mac);
    frame.extend_from_slice(&p.src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    match p.tunnel_to {
        Some((Tunnel::Ipip, backend)) => {
            frame.extend_from_slice(&ipv4_header(p.src, backend, IPPROTO_IPIP, 40));
        }
        Some((Tunnel::Gue, backend)) => {
            frame.extend_from_slice(&ipv4_header(p.src, backend, IPPROTO_UDP, 48));
            frame.extend_from_slice(&gue_source_port(p.seq).to_be_bytes());
            frame.extend_from_slice(&GUE_PORT.to_be_bytes());
            frame.extend_from_slice(&48u16.to_be_bytes());
            frame.extend_from_slice(&[0, 0]);
        }
        Some((Tunnel::None, _)) | None => {}
    }
    frame.extend_from_slice(&inner);
    frame.extend_from_slice(&tcp);
    frame
}

/// The backend's answer to `p`, if `frame` is one: from the VIP's port to the probe's, for its
/// SYN (the acknowledgement number).
pub fn answer(frame: &[u8], p: &SynProbe) -> Option<Answer> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != ETH_P_IP.to_be_bytes() || ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip.get(9)? != &IPPROTO_TCP
        || ip.get(12..16)? != p.vip.ip().octets()
        || ip.get(16..20)? != p.src.octets()
    {
        return None;
    }
    let tcp = ip.get(ihl..ihl + 20)?;
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    if port(0) != p.vip.port() || port(2) != p.src_port {
        return None;
    }
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    if ack != p.seq.wrapping_add(1) || flags & TCP_ACK == 0 {
        return None;
    }
    if flags & TCP_RST != 0 {
        return Some(Answer::Refused);
    }
    (flags & TCP_SYN != 0).then_some(Answer::Accepted)
}

/// The device and next hop the main table gives towards `addr`.
fn route_to(addr: Ipv4Addr) -> Result<(String, Ipv4Addr), String> {
    let text =
        std::fs::read_to_string("/proc/net/route").map_err(|e| format!("/proc/net/route: {e}"))?;
    let routes = crate::return_path::parse_routes(&text);
    let route =
        crate::return_path::route_to(&routes, addr).ok_or_else(|| format!("no route to {addr}"))?;
    let next_hop = match route.gateway {
        Some(std::net::IpAddr::V4(gateway)) => gateway,
        _ => addr,
    };
    Ok((route.device.clone(), next_hop))
}

/// The MAC of `neighbour` on `device`, from the neighbour table (complete entries only).
fn neighbour_mac(neighbour: Ipv4Addr, device: &str) -> Result<[u8; 6], String> {
    let text =
        std::fs::read_to_string("/proc/net/arp").map_err(|e| format!("/proc/net/arp: {e}"))?;
    parse_arp(&text, neighbour, device)
        .ok_or_else(|| format!("no resolved neighbour entry for {neighbour} on {device}"))
}

/// `/proc/net/arp`'s entry for `ip` on `device`, if complete (flag 0x2).
pub fn parse_arp(text: &str, ip: Ipv4Addr, device: &str) -> Option<[u8; 6]> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (addr, flags, mac, dev) = (f.first()?, f.get(2)?, f.get(3)?, f.get(5)?);
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        if addr.parse::<Ipv4Addr>().ok()? != ip || *dev != device || flags & 0x2 == 0 {
            return None;
        }
        parse_mac(mac)
    })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Probes `vip` at `backend` as its clients reach it (through `tunnel`).
pub async fn probe(
    vip: SocketAddrV4,
    backend: Ipv4Addr,
    tunnel: Tunnel,
    timeout: Duration,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || probe_blocking(vip, backend, tunnel, timeout))
        .await
        .map_err(|e| format!("the VIP probe's task: {e}"))?
}

fn probe_blocking(
    vip: SocketAddrV4,
    backend: Ipv4Addr,
    tunnel: Tunnel,
    timeout: Duration,
) -> Result<(), String> {
    let (device, next_hop) = route_to(backend)?;
    let dst_mac = neighbour_mac(next_hop, &device)?;
    let mac_path = format!("/sys/class/net/{device}/address");
    let src_mac = std::fs::read_to_string(&mac_path)
        .ok()
        .and_then(|text| parse_mac(text.trim()))
        .ok_or_else(|| format!("no MAC address in {mac_path}"))?;
    let src = match crate::state::source_address_towards(SocketAddrV4::new(backend, 9).into()) {
        Ok(std::net::IpAddr::V4(src)) => src,
        Ok(other) => {
            return Err(format!(
                "source address {other} towards {backend} is not IPv4"
            ));
        }
        Err(e) => return Err(format!("no source address towards {backend}: {e}")),
    };
    let ifindex = crate::dataplane::ifindex(&device).map_err(|e| e.to_string())?;
    let clock = crate::dataplane::monotonic_ns();
    let probe = SynProbe {
        src_mac,
        dst_mac,
        src,
        // An ephemeral port no socket of this host holds for long: the kernel answers the
        // SYN-ACK with an RST, as it answers any it has no socket for.
        src_port: 49152 | (clock as u16 & 0x3fff),
        vip,
        seq: (clock >> 14) as u32,
        tunnel_to: (tunnel != Tunnel::None).then_some((tunnel, backend)),
    };
    let socket = PacketSocket::open(ifindex, *vip.ip())?;
    socket.send(&syn_frame(&probe))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        let n = socket.recv(&mut buf)?;
        match answer(&buf[..n], &probe) {
            Some(Answer::Accepted) => return Ok(()),
            Some(Answer::Refused) => {
                return Err(format!(
                    "{vip} at backend {backend} refused a client's SYN: nothing listens on the VIP's port there"
                ));
            }
            None => {}
        }
    }
    let decap = if tunnel == Tunnel::None {
        ""
    } else {
        " and lb decap running"
    };
    Err(format!(
        "{vip} at backend {backend} did not answer a client's SYN within {timeout:?} (is the VIP on its loopback{decap}?)"
    ))
}

/// An AF_PACKET socket on one device that sees TCP from one address only (a classic BPF
/// filter: the probe must not copy the device's traffic to user space).
struct PacketSocket(std::os::fd::OwnedFd);

/// setsockopt(2) of a SOL_SOCKET option whose value is `value`.
///
/// # Safety
/// `fd` is an open socket and `T` the type the option takes.
unsafe fn set_option<T>(fd: i32, option: i32, value: &T) -> i32 {
    // SAFETY: the caller's contract; the pointer and size are of a live `T`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    }
}

impl PacketSocket {
    fn open(ifindex: u32, from: Ipv4Addr) -> Result<Self, String> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        let protocol = ETH_P_IP.to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if fd < 0 {
            return Err(error("an AF_PACKET socket"));
        }
        // SAFETY: a fresh fd of ours.
        let socket = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let raw = socket.0.as_raw_fd();
        let from = u32::from(from);
        let mut filter = [
            // Ethernet type IPv4, protocol TCP, source `from`: keep 256 bytes; else nothing.
            libc::sock_filter {
                code: 0x28,
                jt: 0,
                jf: 0,
                k: 12,
            },
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 5,
                k: u32::from(ETH_P_IP),
            },
            libc::sock_filter {
                code: 0x30,
                jt: 0,
                jf: 0,
                k: 23,
            },
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 3,
                k: u32::from(IPPROTO_TCP),
            },
            libc::sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 26,
            },
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: from,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 256,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0,
            },
        ];
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: an all-zero sockaddr_ll is valid; the pointers and sizes below are of live
        // values of the types the calls expect.
        unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex as i32;
            if set_option(raw, libc::SO_ATTACH_FILTER, &program) != 0 {
                return Err(error("attaching the probe's filter"));
            }
            if set_option(raw, libc::SO_RCVTIMEO, &timeout) != 0 {
                return Err(error("the probe's receive timeout"));
            }
            if libc::bind(
                raw,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(error("binding the probe's socket"));
            }
        }
        Ok(socket)
    }

    fn send(&self, frame: &[u8]) -> Result<(), String> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid buffer of the given length.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent != frame.len() as isize {
            return Err(format!(
                "sending the probe: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// A frame's length, or 0 when none came within the receive timeout.
    fn recv(&self, buf: &mut [u8]) -> Result<usize, String> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid buffer of the given length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
            _ => Err(format!("receiving the probe's answer: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(tunnel_to: Option<(Tunnel, Ipv4Addr)>) -> SynProbe {
        SynProbe {
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 0, 0x11],
            src: Ipv4Addr::new(198, 18, 1, 1),
            src_port: 50000,
            vip: "198.18.100.1:80".parse().expect("vip"),
            seq: 7,
            tunnel_to,
        }
    }

    /// A header and its checksum sum to 0xffff.
    fn verifies(sum: u32) -> bool {
        checksum(sum) == 0
    }

    #[test]
    fn the_syn_goes_to_the_vip_from_lb_with_valid_checksums() {
        let p = probe(None);
        let f = syn_frame(&p);
        assert_eq!(f.len(), 54);
        assert_eq!(&f[0..6], &p.dst_mac);
        assert_eq!(&f[12..14], &[8, 0]);
        let (ip, tcp) = (&f[14..34], &f[34..]);
        assert!(verifies(sum_words(ip, 0)));
        assert_eq!(&ip[12..16], &[198, 18, 1, 1]);
        assert_eq!(&ip[16..20], &[198, 18, 100, 1]);
        assert_eq!(tcp[13], TCP_SYN);
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[11] = 20;
        assert!(verifies(sum_words(tcp, sum_words(&pseudo, 0))));
    }

    #[test]
    fn the_ipip_form_wraps_the_same_syn_for_the_backend() {
        let backend = Ipv4Addr::new(198, 18, 9, 11);
        let plain = syn_frame(&probe(None));
        let f = syn_frame(&probe(Some((Tunnel::Ipip, backend))));
        assert_eq!(f.len(), plain.len() + 20);
        let outer = &f[14..34];
        assert!(verifies(sum_words(outer, 0)));
        assert_eq!(
            (outer[9], u16::from_be_bytes([outer[2], outer[3]])),
            (4, 60)
        );
        assert_eq!(&outer[16..20], &backend.octets());
        assert_eq!(
            &f[34..],
            &plain[14..],
            "the inner packet is the plain probe's"
        );
    }

    #[test]
    fn the_gue_form_wraps_it_in_ipv4_and_udp_to_the_gue_port() {
        let backend = Ipv4Addr::new(198, 18, 9, 11);
        let plain = syn_frame(&probe(None));
        let f = syn_frame(&probe(Some((Tunnel::Gue, backend))));
        assert_eq!(f.len(), plain.len() + 28);
        let outer = &f[14..34];
        assert!(verifies(sum_words(outer, 0)));
        assert_eq!(
            (outer[9], u16::from_be_bytes([outer[2], outer[3]])),
            (17, 68)
        );
        let udp = &f[34..42];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 48);
        assert_eq!(
            &f[42..],
            &plain[14..],
            "the inner packet is the plain probe's"
        );
    }

    /// A frame from the VIP's port to the probe's, with these flags and acknowledgement.
    fn reply(flags: u8, ack: u32, from_port: u16) -> Vec<u8> {
        let mut f = vec![0u8; 54];
        f[12..14].copy_from_slice(&[8, 0]);
        f[14] = 0x45;
        f[23] = IPPROTO_TCP;
        f[26..30].copy_from_slice(&[198, 18, 100, 1]);
        f[30..34].copy_from_slice(&[198, 18, 1, 1]);
        f[34..36].copy_from_slice(&from_port.to_be_bytes());
        f[36..38].copy_from_slice(&50000u16.to_be_bytes());
        f[42..46].copy_from_slice(&ack.to_be_bytes());
        f[47] = flags;
        f
    }

    #[test]
    fn answers_are_read_for_this_probe_only() {
        let p = probe(None);
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 8, 80), &p),
            Some(Answer::Accepted)
        );
        assert_eq!(
            answer(&reply(TCP_RST | TCP_ACK, 8, 80), &p),
            Some(Answer::Refused)
        );
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 9, 80), &p),
            None,
            "another SYN's"
        );
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 8, 81), &p),
            None,
            "another port"
        );
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 8, 80)[..40], &p),
            None,
            "truncated"
        );
        assert_eq!(answer(&syn_frame(&p), &p), None, "our own SYN");
    }

    #[test]
    fn the_neighbour_table_gives_complete_entries_on_the_device() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device
198.18.1.11      0x1         0x2         02:00:00:00:00:11     *        lb1
198.18.1.12      0x1         0x0         00:00:00:00:00:00     *        lb1
198.18.0.2       0x1         0x2         02:00:00:00:00:02     *        lb0
";
        let b1 = Ipv4Addr::new(198, 18, 1, 11);
        assert_eq!(parse_arp(table, b1, "lb1"), Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(parse_arp(table, b1, "lb0"), None);
        assert_eq!(
            parse_arp(table, Ipv4Addr::new(198, 18, 1, 12), "lb1"),
            None,
            "incomplete"
        );
    }
}
