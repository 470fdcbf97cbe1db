//! The contenders of the end-to-end benchmark, each set up in turn in the same balancer
//! namespace, on the same veths, in front of the same backends with the same 4:6 weights.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    harness::Balancer,
    host::ClientCgroup,
    topology::{BACKEND_PORT, Topology, VIP, VIP6},
};

pub const WEB_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const WEIGHTS: [u32; 2] = [4, 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Contender {
    /// Client straight to the backends, routed by the balancer namespace's kernel.
    Direct,
    /// This balancer: the XDP program in native mode, run by the daemon.
    Xdp,
    /// This balancer in `mode = "dsr"` (L2): the backends, with the VIP on their loopback,
    /// answer the clients over a link of their own (the client hosts' second link on the
    /// backends' segment), not through the balancer.
    XdpDsr,
    /// This balancer over IPv6 (NAT66): the same network with IPv6 beside IPv4, the clients
    /// reaching an IPv6 VIP, the backends at their IPv6 addresses.
    XdpIpv6,
    /// nftables DNAT and masquerade with a weighted `numgen` vmap, as kube-proxy's nftables mode.
    Nftables,
    Haproxy,
    Nginx,
}

impl Contender {
    pub const ALL: [Contender; 7] = [
        Contender::Direct,
        Contender::Xdp,
        Contender::XdpDsr,
        Contender::XdpIpv6,
        Contender::Nftables,
        Contender::Haproxy,
        Contender::Nginx,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct (no balancer)",
            Contender::Xdp => "lb (XDP, native)",
            Contender::XdpDsr => "lb DSR (XDP, L2)",
            Contender::XdpIpv6 => "lb IPv6 (XDP, NAT66)",
            Contender::Nftables => "nftables DNAT+SNAT",
            Contender::Haproxy => "HAProxy (tcp mode)",
            Contender::Nginx => "nginx stream",
        }
    }

    /// Why a contender cannot carry UDP, if it cannot.
    pub fn udp_unsupported(self) -> Option<&'static str> {
        match self {
            Contender::Haproxy => Some("HAProxy has no UDP proxying (tcp and http modes only)"),
            Contender::XdpDsr => Some(
                "the backends' UDP echo answers from its own address, not the VIP, as a UDP server behind DSR must",
            ),
            _ => None,
        }
    }

    /// Why a contender cannot serve `scene`'s deployment, if it cannot.
    pub fn scene_unsupported(self, containers: bool) -> Option<&'static str> {
        match self {
            Contender::XdpDsr if containers => Some(
                "DSR by MAC needs the backends on a segment XDP sends to; containers sit behind a bridge",
            ),
            _ => None,
        }
    }

    /// Whether it is this balancer, run by its daemon.
    pub fn is_lb(self) -> bool {
        matches!(
            self,
            Contender::Xdp | Contender::XdpDsr | Contender::XdpIpv6
        )
    }

    /// The VIP the clients reach it at.
    pub fn vip(self) -> IpAddr {
        match self {
            Contender::XdpIpv6 => VIP6.into(),
            _ => VIP.into(),
        }
    }
}

/// A contender in place in the balancer namespace; `Drop` removes it.
pub enum Running<'a> {
    Nothing,
    Daemon(Box<Balancer>),
    Nftables(&'a Topology),
    Proxy { topo: &'a Topology, child: Child },
}

impl Running<'_> {
    pub fn balancer(&self) -> Option<&Balancer> {
        match self {
            Running::Daemon(b) => Some(b),
            _ => None,
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        match self {
            Running::Nothing | Running::Daemon(_) => {}
            Running::Nftables(topo) => {
                let _ = topo.lb.try_sh("nft delete table ip lbbench");
            }
            Running::Proxy { topo, child } => {
                crate::netns::stop_child(child);
                let _ = topo.lb.try_sh(&format!("ip addr del {VIP}/32 dev lo"));
            }
        }
    }
}

fn backends(topo: &Topology) -> impl Iterator<Item = (String, u32)> + '_ {
    topo.backend_addrs
        .iter()
        .zip(WEIGHTS)
        .map(|(a, w)| (format!("{a}:{BACKEND_PORT}"), w))
}

/// lb's configuration: the interfaces and the services only, so that every other setting (the
/// flow table, SNAT ports, timeouts) is lb's default, as a user who just installed it runs it.
/// The one exception is where the socket hooks attach: to the benchmark's own cgroup for its
/// host clients, or nowhere (never the machine's root).
pub fn daemon_config(topo: &Topology, host_clients: Option<&ClientCgroup>) -> String {
    let backends: Vec<IpAddr> = topo.backend_addrs.iter().map(|&a| a.into()).collect();
    services_config(topo, host_clients, VIP.into(), &backends)
}

/// lb's configuration over IPv6: `daemon_config`'s services on VIP6 and the backends' IPv6
/// addresses (`Topology::add_ipv6`).
fn ipv6_config(topo: &Topology, host_clients: Option<&ClientCgroup>) -> String {
    let backends: Vec<IpAddr> = topo
        .ipv6_backend_addrs()
        .into_iter()
        .map(Into::into)
        .collect();
    services_config(topo, host_clients, VIP6.into(), &backends)
}

/// A TCP and a UDP service on `vip` over `backends` (weighted as WEIGHTS), on the topology's
/// interfaces.
fn services_config(
    topo: &Topology,
    host_clients: Option<&ClientCgroup>,
    vip: IpAddr,
    backends: &[IpAddr],
) -> String {
    let interfaces: Vec<String> = topo
        .lb_interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    let cgroup = host_clients.map_or("off".into(), |c| c.child.display().to_string());
    let mut text = format!(
        "interfaces = [{}]\n[host]\ncgroup = \"{cgroup}\"\n",
        interfaces.join(", ")
    );
    for (name, port, proto) in [("web", WEB_PORT, "tcp"), ("udp", UDP_PORT, "udp")] {
        let vip = SocketAddr::new(vip, port);
        text += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{proto}\"\n\
             [service.health]\nkind = \"tcp\"\nport = {BACKEND_PORT}\ninterval = \"1s\"\n"
        );
        for (&addr, weight) in backends.iter().zip(WEIGHTS) {
            let addr = SocketAddr::new(addr, BACKEND_PORT);
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\nweight = {weight}\n");
        }
    }
    text
}

/// lb's configuration for DSR: the TCP service alone (see `udp_unsupported`), with backends
/// on the VIP's port, defaults otherwise.
fn dsr_config(topo: &Topology) -> String {
    let interfaces: Vec<String> = topo
        .lb_interfaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    let mut text = format!(
        "interfaces = [{}]\n[host]\ncgroup = \"off\"\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP}:{WEB_PORT}\"\nmode = \"dsr\"\ndsr = \"l2\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"1s\"\n",
        interfaces.join(", ")
    );
    for (addr, weight) in topo.backend_addrs.iter().zip(WEIGHTS) {
        text +=
            &format!("[[service.backend]]\naddress = \"{addr}:{WEB_PORT}\"\nweight = {weight}\n");
    }
    text
}

/// The DSR network: the client namespace gets a second link on the backends' segment, and
/// the backends send their answers to every client host that way (the client namespace
/// routes for the others); each holds the VIP on its loopback, unanswered to ARP.
fn dsr_network(topo: &Topology) {
    topo.client.sh(&format!(
        "ip link add eth1 type veth peer name s-c2 netns {switch}
         ip link set eth1 up
         ip addr add {CLIENT_SIDE}/24 dev eth1
         ethtool -K eth1 tx off >/dev/null
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0",
        switch = topo.switch.name
    ));
    topo.switch.sh(
        "ip link set s-c2 up && ip link set s-c2 master br0 && ethtool -K s-c2 gro on >/dev/null",
    );
    for ns in &topo.backends {
        ns.sh(&format!(
            "ip addr add {VIP}/32 dev lo
             sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
             ip route add 198.18.0.0/24 via {CLIENT_SIDE}
             ip route add 198.18.16.0/20 via {CLIENT_SIDE}"
        ));
    }
}

/// The client namespace's address on the backends' segment (`dsr_network`).
const CLIENT_SIDE: &str = "198.18.1.2";

/// One chain per backend and protocol, picked by a weighted `numgen` vmap (kube-proxy's shape),
/// for forwarded connections and for the host's own (the output hook).
fn nftables_rules(topo: &Topology) -> String {
    let mut chains = String::new();
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut start = 0;
    for (i, (addr, weight)) in backends(topo).enumerate() {
        let range = format!("{start}-{}", start + weight - 1);
        start += weight;
        for (proto, vmap) in [("tcp", &mut tcp), ("udp", &mut udp)] {
            chains += &format!("  chain {proto}{i} {{ meta l4proto {proto} dnat to {addr}; }}\n");
            vmap.push(format!("{range} : goto {proto}{i}"));
        }
    }
    let backends: Vec<String> = topo.backend_addrs.iter().map(|a| a.to_string()).collect();
    format!(
        "table ip lbbench {{\n{chains}  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} tcp dport {WEB_PORT} numgen random mod {start} vmap {{ {tcp} }}\n    \
         ip daddr {VIP} udp dport {UDP_PORT} numgen random mod {start} vmap {{ {udp} }}\n  }}\n  \
         chain output {{\n    type nat hook output priority -100; policy accept;\n    \
         ip daddr {VIP} tcp dport {WEB_PORT} numgen random mod {start} vmap {{ {tcp} }}\n  }}\n  \
         chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ip daddr {{ {backends} }} ct status dnat masquerade\n  }}\n}}\n",
        tcp = tcp.join(", "),
        udp = udp.join(", "),
        backends = backends.join(", "),
    )
}

fn haproxy_config(topo: &Topology) -> String {
    let mut servers = String::new();
    for (i, (addr, weight)) in backends(topo).enumerate() {
        servers += &format!("    server b{} {addr} weight {weight}\n", i + 1);
    }
    format!(
        "global\n    nbthread 2\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
         frontend web\n    bind {VIP}:{WEB_PORT}\n    default_backend web\n\
         backend web\n    balance roundrobin\n{servers}"
    )
}

fn nginx_config(topo: &Topology, dir: &Path) -> String {
    let mut web = String::new();
    let mut udp = String::new();
    for (addr, weight) in backends(topo) {
        web += &format!("        server {addr} weight={weight};\n");
        udp += &format!("        server {addr} weight={weight};\n");
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 2;\nuser root;\npid {dir}/nginx-lb.pid;\nerror_log {dir}/nginx-lb.log warn;\n\
         events {{ worker_connections 65536; }}\n\
         stream {{\n    upstream web {{\n{web}    }}\n    upstream udp {{\n{udp}    }}\n    \
         server {{ listen {VIP}:{WEB_PORT} reuseport; proxy_pass web; }}\n    \
         server {{ listen {VIP}:{UDP_PORT} udp reuseport; proxy_pass udp; proxy_timeout 10s; }}\n}}\n",
        dir = dir.display()
    )
}

/// Waits (bounded) until the client can open a TCP connection to VIP:80 (`vip`).
fn wait_for_vip(topo: &Topology, what: &str) -> Result<(), String> {
    wait_for(topo, VIP.into(), what)
}

fn wait_for(topo: &Topology, vip: IpAddr, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo
        .client
        .try_sh(&format!("nc -z -w1 {vip} {WEB_PORT}"))
        .status
        .success()
    {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not accept connections on {vip} port {WEB_PORT} within 10 s"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sets `contender` up in the balancer namespace.
pub fn start<'a>(
    contender: Contender,
    topo: &'a Topology,
    host_clients: Option<&ClientCgroup>,
    dir: &Path,
    lb: &Path,
) -> Result<Running<'a>, String> {
    match contender {
        Contender::Direct => Ok(Running::Nothing),
        Contender::Xdp => {
            let balancer = Balancer::start(lb, topo, &daemon_config(topo, host_clients));
            let running = Running::Daemon(Box::new(balancer));
            wait_for_vip(topo, "lb")?;
            Ok(running)
        }
        Contender::XdpDsr => {
            dsr_network(topo);
            let balancer = Balancer::start(lb, topo, &dsr_config(topo));
            let running = Running::Daemon(Box::new(balancer));
            wait_for_vip(topo, "lb (DSR)")?;
            Ok(running)
        }
        Contender::XdpIpv6 => {
            let balancer = Balancer::start(lb, topo, &ipv6_config(topo, host_clients));
            let running = Running::Daemon(Box::new(balancer));
            wait_for(topo, VIP6.into(), "lb (IPv6)")?;
            Ok(running)
        }
        Contender::Nftables => {
            if host_clients.is_some() {
                // A host's connect() needs a route to the VIP before the output hook's DNAT
                // sees the packet (a real host has its default route; this one has none).
                topo.lb.sh(&format!("ip route add {VIP}/32 dev lb0"));
            }
            let path = dir.join("nftables.conf");
            fs::write(&path, nftables_rules(topo)).map_err(|e| e.to_string())?;
            let out = topo.lb.try_sh(&format!("nft -f {}", path.display()));
            if !out.status.success() {
                return Err(format!(
                    "nft -f: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let running = Running::Nftables(topo);
            wait_for_vip(topo, "nftables")?;
            Ok(running)
        }
        Contender::Haproxy | Contender::Nginx => {
            topo.lb.sh(&format!("ip addr add {VIP}/32 dev lo"));
            let (config, args): (PathBuf, Vec<String>) = if contender == Contender::Haproxy {
                let path = dir.join("haproxy.cfg");
                fs::write(&path, haproxy_config(topo)).map_err(|e| e.to_string())?;
                let p = path.display().to_string();
                (path, vec!["haproxy".into(), "-db".into(), "-f".into(), p])
            } else {
                let path = dir.join("nginx-lb.conf");
                fs::write(&path, nginx_config(topo, dir)).map_err(|e| e.to_string())?;
                let p = path.display().to_string();
                let prefix = format!("{}/", dir.display());
                (
                    path,
                    vec![
                        "nginx".into(),
                        "-p".into(),
                        prefix,
                        "-c".into(),
                        p,
                        "-g".into(),
                        "daemon off;".into(),
                    ],
                )
            };
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let child = topo.lb.spawn(&argv, Stdio::inherit());
            let running = Running::Proxy { topo, child };
            wait_for_vip(topo, &format!("{}", config.display()))?;
            Ok(running)
        }
    }
}
