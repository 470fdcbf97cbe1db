//! Health checks of DSR services that reach the service as clients do: a TCP SYN to the VIP,
//! sent to the backend's MAC (L2 form) or inside the IPIP or GUE headers lb's data path would
//! put on it (as Katran's health-check program does), from lb's own address. The backend answers it
//! directly, as it answers clients: a SYN-ACK says the VIP is on its loopback and something
//! listens on the VIP's port; an RST or silence says not. A probe of the backend's own address
//! cannot tell: the service may listen there and still not own the VIP.
//!
//! The frames are built and read here (pure, unit-tested); `probe` sends one from an AF_PACKET
//! socket on the device towards the backend and reads the answer there (the kernel itself
//! answers the SYN-ACK with an RST: it has no socket for it). An IPv6 VIP is probed the same
//! ways, its tunnels IPv6 inside IPv6.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{
    conntrack::{TCP_ACK, TCP_RST, TCP_SYN},
    reset::{fold, sum_words},
    tunnel::{GUE_PORT, IPPROTO_IPIP, IPPROTO_IPV6, gue_source_port},
};

use crate::config::ForwardingMode;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
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
    /// lb's address towards the backend (of the VIP's family): the SYN's source, where the
    /// answer comes back.
    pub src: IpAddr,
    pub src_port: u16,
    pub vip: SocketAddr,
    pub seq: u32,
    /// The tunnel and the backend it leads to (the outer source is `src`), of `src`'s family.
    pub tunnel_to: Option<(Tunnel, IpAddr)>,
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

/// The IPv6 header of a packet of `proto` with `body_len` bytes after it.
fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, body_len: usize) -> [u8; 40] {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(body_len as u16).to_be_bytes());
    ip[6] = proto;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip
}

/// The probe's frame: Ethernet, (the tunnel's header in the probe's family, and UDP for GUE,)
/// IPv4 or IPv6 and a TCP SYN with no options; `None` if its addresses are of two families.
pub fn syn_frame(p: &SynProbe) -> Option<Vec<u8>> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&p.src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&p.vip.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&p.seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // The pseudo-header's sum: both addresses, the protocol and the segment's length.
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let pseudo =
        sum_words(&octets(p.src), sum_words(&octets(p.vip.ip()), 0)) + u32::from(IPPROTO_TCP) + 20;
    let check = checksum(sum_words(&tcp, pseudo));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    let mut frame = Vec::with_capacity(114);
    frame.extend_from_slice(&p.dst_mac);
    frame.extend_from_slice(&p.src_mac);
    let inner_len = match p.src {
        IpAddr::V4(_) => 20 + tcp.len(),
        IpAddr::V6(_) => 40 + tcp.len(),
    };
    let gue_udp = |frame: &mut Vec<u8>| {
        frame.extend_from_slice(&gue_source_port(p.seq).to_be_bytes());
        frame.extend_from_slice(&GUE_PORT.to_be_bytes());
        frame.extend_from_slice(&((8 + inner_len) as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
    };
    match (p.src, p.vip.ip()) {
        (IpAddr::V4(src), IpAddr::V4(vip)) => {
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            match p.tunnel_to {
                Some((Tunnel::Ipip, IpAddr::V4(backend))) => {
                    frame.extend_from_slice(&ipv4_header(src, backend, IPPROTO_IPIP, inner_len));
                }
                Some((Tunnel::Gue, IpAddr::V4(backend))) => {
                    let outer = ipv4_header(src, backend, IPPROTO_UDP, 8 + inner_len);
                    frame.extend_from_slice(&outer);
                    gue_udp(&mut frame);
                }
                Some((Tunnel::None, _)) | None => {}
                Some((_, IpAddr::V6(_))) => return None,
            }
            frame.extend_from_slice(&ipv4_header(src, vip, IPPROTO_TCP, tcp.len()));
        }
        (IpAddr::V6(src), IpAddr::V6(vip)) => {
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            match p.tunnel_to {
                Some((Tunnel::Ipip, IpAddr::V6(backend))) => {
                    frame.extend_from_slice(&ipv6_header(src, backend, IPPROTO_IPV6, inner_len));
                }
                Some((Tunnel::Gue, IpAddr::V6(backend))) => {
                    let outer = ipv6_header(src, backend, IPPROTO_UDP, 8 + inner_len);
                    frame.extend_from_slice(&outer);
                    gue_udp(&mut frame);
                }
                Some((Tunnel::None, _)) | None => {}
                Some((_, IpAddr::V4(_))) => return None,
            }
            frame.extend_from_slice(&ipv6_header(src, vip, IPPROTO_TCP, tcp.len()));
        }
        _ => return None,
    }
    frame.extend_from_slice(&tcp);
    Some(frame)
}

/// The backend's answer to `p`, if `frame` is one: from the VIP's port to the probe's, for its
/// SYN (the acknowledgement number).
pub fn answer(frame: &[u8], p: &SynProbe) -> Option<Answer> {
    let ip = frame.get(14..)?;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let tcp = match (p.vip.ip(), p.src) {
        (IpAddr::V4(vip), IpAddr::V4(src)) => {
            if ethertype != ETH_P_IP || ip.first()? >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip.get(9)? != &IPPROTO_TCP
                || ip.get(12..16)? != vip.octets()
                || ip.get(16..20)? != src.octets()
            {
                return None;
            }
            ip.get(ihl..ihl + 20)?
        }
        (IpAddr::V6(vip), IpAddr::V6(src)) => {
            if ethertype != ETH_P_IPV6
                || ip.first()? >> 4 != 6
                || ip.get(6)? != &IPPROTO_TCP
                || ip.get(8..24)? != vip.octets()
                || ip.get(24..40)? != src.octets()
            {
                return None;
            }
            ip.get(40..60)?
        }
        _ => return None,
    };
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
fn route_to(addr: IpAddr) -> Result<(String, IpAddr), String> {
    let routes = crate::return_path::read_routes()?;
    let route =
        crate::return_path::route_to(&routes, addr).ok_or_else(|| format!("no route to {addr}"))?;
    Ok((route.device.clone(), route.gateway.unwrap_or(addr)))
}

/// The MAC of `neighbour` on `device`, from the neighbour table (complete entries only): IPv4's
/// in /proc/net/arp, IPv6's as `ip -6 neigh` shows it (the kernel has no file for it).
fn neighbour_mac(neighbour: IpAddr, device: &str) -> Result<[u8; 6], String> {
    let unresolved = || format!("no resolved neighbour entry for {neighbour} on {device}");
    match neighbour {
        IpAddr::V4(v4) => {
            let text = std::fs::read_to_string("/proc/net/arp")
                .map_err(|e| format!("/proc/net/arp: {e}"))?;
            parse_arp(&text, v4, device).ok_or_else(unresolved)
        }
        IpAddr::V6(v6) => {
            let out = std::process::Command::new("ip")
                .args(["-6", "neigh", "show", &v6.to_string(), "dev", device])
                .output()
                .map_err(|e| format!("ip -6 neigh: {e}"))?;
            parse_neigh6(&String::from_utf8_lossy(&out.stdout)).ok_or_else(unresolved)
        }
    }
}

/// The MAC of `ip -6 neigh show ADDR dev DEV`'s entry, if it has one in a state whose address
/// holds (not INCOMPLETE or FAILED).
pub fn parse_neigh6(text: &str) -> Option<[u8; 6]> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "lladdr")?;
        let state = words.last()?;
        if matches!(*state, "INCOMPLETE" | "FAILED") {
            return None;
        }
        parse_mac(words.get(at + 1)?)
    })
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
    vip: SocketAddr,
    backend: IpAddr,
    tunnel: Tunnel,
    timeout: Duration,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || probe_blocking(vip, backend, tunnel, timeout))
        .await
        .map_err(|e| format!("the VIP probe's task: {e}"))?
}

fn probe_blocking(
    vip: SocketAddr,
    backend: IpAddr,
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
    let src = match crate::state::source_address_towards(SocketAddr::new(backend, 9)) {
        Ok(src) if src.is_ipv4() == vip.is_ipv4() => src,
        Ok(other) => {
            return Err(format!(
                "source address {other} towards {backend} is not of the VIP's family"
            ));
        }
        Err(e) => return Err(format!("no source address towards {backend}: {e}")),
    };
    let tunnel_to = (tunnel != Tunnel::None).then_some((tunnel, backend));
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
        tunnel_to,
    };
    let frame = syn_frame(&probe).ok_or("the probe's addresses are of two families")?;
    let socket = PacketSocket::open(ifindex, vip.ip())?;
    socket.send(&frame)?;
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

/// A classic BPF filter keeping 256 bytes of TCP frames from `from` (Ethernet type, protocol
/// and source address checked), and nothing of other frames.
fn answer_filter(from: IpAddr) -> Vec<libc::sock_filter> {
    const LD_H: u16 = 0x28;
    const LD_B: u16 = 0x30;
    const LD_W: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // Each test: a load, then a jump past the rest to the final "nothing" when unequal.
    let (ethertype, proto_at, words): (u16, u32, Vec<(u32, u32)>) = match from {
        IpAddr::V4(a) => (ETH_P_IP, 23, vec![(26, u32::from(a))]),
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                ETH_P_IPV6,
                20,
                (0..4).map(|i| (22 + 4 * i as u32, word(4 * i))).collect(),
            )
        }
    };
    let mut tests = vec![
        (op(LD_H, 12), u32::from(ethertype)),
        (op(LD_B, proto_at), u32::from(IPPROTO_TCP)),
    ];
    tests.extend(words.into_iter().map(|(at, w)| (op(LD_W, at), w)));
    let mut filter = Vec::with_capacity(2 * tests.len() + 2);
    let count = tests.len();
    for (i, (load, value)) in tests.into_iter().enumerate() {
        filter.push(load);
        // From here: the jumps of the tests left, then "keep", then "nothing".
        let to_nothing = 2 * (count - i - 1) + 1;
        filter.push(libc::sock_filter {
            jf: to_nothing as u8,
            ..op(JEQ, value)
        });
    }
    filter.push(op(RET, 256));
    filter.push(op(RET, 0));
    filter
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
    fn open(ifindex: u32, from: IpAddr) -> Result<Self, String> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        let protocol = if from.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }.to_be();
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
        let mut filter = answer_filter(from);
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

    fn probe(tunnel_to: Option<(Tunnel, IpAddr)>) -> SynProbe {
        SynProbe {
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 0, 0x11],
            src: Ipv4Addr::new(198, 18, 1, 1).into(),
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
        let f = syn_frame(&p).expect("one family");
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
        let plain = syn_frame(&probe(None)).expect("one family");
        let f = syn_frame(&probe(Some((Tunnel::Ipip, backend.into())))).expect("one family");
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
        let plain = syn_frame(&probe(None)).expect("one family");
        let f = syn_frame(&probe(Some((Tunnel::Gue, backend.into())))).expect("one family");
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
        assert_eq!(
            answer(&syn_frame(&p).expect("one family"), &p),
            None,
            "our own SYN"
        );
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

    fn probe6() -> SynProbe {
        SynProbe {
            src: "fd00:1::1".parse().expect("address"),
            vip: "[fd00:100::1]:80".parse().expect("vip"),
            ..probe(None)
        }
    }

    /// An IPv6 frame from the VIP's port to the probe's, with these flags and acknowledgement.
    fn reply6(flags: u8, ack: u32, from: &str) -> Vec<u8> {
        let from: Ipv6Addr = from.parse().expect("address");
        let mut f = vec![0u8; 74];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14..54].copy_from_slice(&ipv6_header(
            from,
            "fd00:1::1".parse().expect("address"),
            IPPROTO_TCP,
            20,
        ));
        f[54..56].copy_from_slice(&80u16.to_be_bytes());
        f[56..58].copy_from_slice(&50000u16.to_be_bytes());
        f[62..66].copy_from_slice(&ack.to_be_bytes());
        f[67] = flags;
        f
    }

    #[test]
    fn the_ipv6_syn_goes_to_the_vip_from_lb_with_a_valid_checksum() {
        let p = probe6();
        let f = syn_frame(&p).expect("one family");
        assert_eq!(f.len(), 14 + 40 + 20);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let (ip, tcp) = (&f[14..54], &f[54..]);
        assert_eq!((ip[0], ip[5], ip[6], ip[7]), (0x60, 20, IPPROTO_TCP, 64));
        assert_eq!(
            &ip[8..24],
            &"fd00:1::1".parse::<Ipv6Addr>().expect("a").octets()
        );
        assert_eq!(
            &ip[24..40],
            &"fd00:100::1".parse::<Ipv6Addr>().expect("a").octets()
        );
        assert_eq!(tcp[13], TCP_SYN);
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend([0, 0, 0, 20, 0, 0, 0, IPPROTO_TCP]);
        assert!(verifies(sum_words(tcp, sum_words(&pseudo, 0))));
        let mixed = SynProbe {
            src: Ipv4Addr::new(198, 18, 1, 1).into(),
            ..probe6()
        };
        assert_eq!(syn_frame(&mixed), None, "two families");
    }

    #[test]
    fn the_ipv6_tunnels_wrap_the_same_syn_in_ipv6_for_the_backend() {
        let backend: Ipv6Addr = "fd00:9::11".parse().expect("address");
        let plain = syn_frame(&probe6()).expect("one family");
        let tunnelled = |tunnel| {
            let p = SynProbe {
                tunnel_to: Some((tunnel, backend.into())),
                ..probe6()
            };
            syn_frame(&p).expect("one family")
        };
        let f = tunnelled(Tunnel::Ipip);
        assert_eq!(f.len(), plain.len() + 40);
        let outer = &f[14..54];
        assert_eq!((outer[0], outer[5], outer[6]), (0x60, 60, IPPROTO_IPV6));
        assert_eq!(&outer[8..24], &plain[22..38], "from lb's address");
        assert_eq!(&outer[24..40], &backend.octets());
        assert_eq!(
            &f[54..],
            &plain[14..],
            "the inner packet is the plain probe's"
        );
        let f = tunnelled(Tunnel::Gue);
        assert_eq!(f.len(), plain.len() + 48);
        let outer = &f[14..54];
        assert_eq!((outer[5], outer[6]), (68, IPPROTO_UDP));
        let udp = &f[54..62];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 68);
        assert_eq!(&f[62..], &plain[14..]);
        let mixed = SynProbe {
            tunnel_to: Some((Tunnel::Ipip, Ipv4Addr::new(198, 18, 9, 11).into())),
            ..probe6()
        };
        assert_eq!(syn_frame(&mixed), None, "an IPv4 tunnel for an IPv6 probe");
    }

    #[test]
    fn ipv6_answers_are_read_for_this_probe_only() {
        let p = probe6();
        let vip = "fd00:100::1";
        assert_eq!(
            answer(&reply6(TCP_SYN | TCP_ACK, 8, vip), &p),
            Some(Answer::Accepted)
        );
        assert_eq!(
            answer(&reply6(TCP_RST | TCP_ACK, 8, vip), &p),
            Some(Answer::Refused)
        );
        assert_eq!(
            answer(&reply6(TCP_SYN | TCP_ACK, 9, vip), &p),
            None,
            "another SYN's"
        );
        assert_eq!(
            answer(&reply6(TCP_SYN | TCP_ACK, 8, "fd00:100::2"), &p),
            None,
            "another VIP"
        );
        assert_eq!(
            answer(&reply6(TCP_SYN | TCP_ACK, 8, vip)[..60], &p),
            None,
            "truncated"
        );
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 8, 80), &p),
            None,
            "an IPv4 frame"
        );
    }

    /// What a classic BPF filter keeps of `frame` (the loads, jumps and returns it uses).
    fn run(filter: &[libc::sock_filter], frame: &[u8]) -> u32 {
        let mut a = 0u32;
        let mut pc = 0;
        loop {
            let op = filter[pc];
            let k = op.k as usize;
            let load = |len: usize| {
                frame
                    .get(k..k + len)
                    .map(|b| b.iter().fold(0u32, |v, x| v << 8 | u32::from(*x)))
            };
            match op.code {
                0x28 | 0x30 | 0x20 => {
                    let len = match op.code {
                        0x28 => 2,
                        0x30 => 1,
                        _ => 4,
                    };
                    // A load past the frame's end ends the program: nothing kept.
                    let Some(v) = load(len) else { return 0 };
                    a = v;
                }
                0x15 => pc += usize::from(if a == op.k { op.jt } else { op.jf }),
                0x06 => return op.k,
                code => panic!("unexpected opcode {code:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_socket_keeps_tcp_from_the_vip_only() {
        let v4 = answer_filter(Ipv4Addr::new(198, 18, 100, 1).into());
        assert_eq!(run(&v4, &reply(TCP_SYN | TCP_ACK, 8, 80)), 256);
        let mut other = reply(TCP_SYN | TCP_ACK, 8, 80);
        other[29] = 2;
        assert_eq!(run(&v4, &other), 0, "another source");
        other = reply(TCP_SYN | TCP_ACK, 8, 80);
        other[23] = IPPROTO_UDP;
        assert_eq!(run(&v4, &other), 0, "UDP");
        assert_eq!(
            run(&v4, &reply6(TCP_SYN | TCP_ACK, 8, "fd00:100::1")),
            0,
            "IPv6"
        );

        let v6 = answer_filter("fd00:100::1".parse::<IpAddr>().expect("address"));
        assert_eq!(run(&v6, &reply6(TCP_SYN | TCP_ACK, 8, "fd00:100::1")), 256);
        for other in [
            "fd00:100::2",
            "fd01:100::1",
            "fd00:100:0:1::1",
            "fd00:101::1",
        ] {
            assert_eq!(run(&v6, &reply6(TCP_SYN | TCP_ACK, 8, other)), 0, "{other}");
        }
        let mut udp = reply6(TCP_SYN | TCP_ACK, 8, "fd00:100::1");
        udp[20] = IPPROTO_UDP;
        assert_eq!(run(&v6, &udp), 0, "UDP");
        assert_eq!(run(&v6, &reply(TCP_SYN | TCP_ACK, 8, 80)), 0, "IPv4");
        assert_eq!(
            run(&v6, &reply6(TCP_SYN | TCP_ACK, 8, "fd00:100::1")[..30]),
            0,
            "short"
        );
    }

    #[test]
    fn the_ipv6_neighbour_gives_its_mac_when_resolved() {
        let line = |state: &str| format!("fd00:1::11 lladdr 02:00:00:00:00:11 router {state}\n");
        for state in ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT"] {
            assert_eq!(
                parse_neigh6(&line(state)),
                Some([2, 0, 0, 0, 0, 0x11]),
                "{state}"
            );
        }
        assert_eq!(parse_neigh6("fd00:1::11 INCOMPLETE\n"), None);
        assert_eq!(parse_neigh6(&line("FAILED")), None);
        assert_eq!(parse_neigh6(""), None);
        assert_eq!(parse_neigh6("fd00:1::11 lladdr zz:00 STALE\n"), None);
    }
}
