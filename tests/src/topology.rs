//! The test and demo network: a client, the balancer and N backends, each in its own network
//! namespace, in 198.18.0.0/15. Backends sit on a bridge in a "switch" namespace.
//!
//! - two-arm: client 198.18.0.2 -- lb0 198.18.0.1 | lb1 198.18.1.1 -- switch -- 198.18.1.1x
//! - one-arm: client 198.18.0.2 and backends 198.18.0.1x share the switch with lb0 198.18.0.1
//! - more client hosts (two-arm, `add_clients`): 198.18.(16+i).2 behind the client namespace,
//!   which routes for them (198.18.16.0/20)
//! - IPv6 (`add_ipv6`), beside IPv4: two-arm, client fd00::2 -- lb0 fd00::1 | lb1 fd00:1::1 --
//!   switch -- fd00:1::1x; one-arm, client fd00::2 and backends fd00::1x share the switch with
//!   lb0 fd00::1; containers, client fd00::2 -- lb0 fd00::1 | br-api fd00:4::1 -- fd00:4::1x;
//!   VIP fd00:100::1
//!
//! veth rules from ENGINEERING.md: GRO on every veth end (redirected frames need NAPI on the
//! peer), and checksum offload off on the client, the backends and the switch's port to the
//! balancer (native XDP cannot finish partial checksums).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::netns::Netns;

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BACKEND_PORT: u16 = 8000;
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The client hosts that `Topology::add_clients` adds: 198.18.(16+i).0/24 each.
const MORE_CLIENTS_NET: &str = "198.18.16.0/20";
const MORE_CLIENTS_MAX: usize = 16;

/// The address of the client host that `Topology::add_clients` numbers `i` (from 0).
pub fn more_client_addr(i: usize) -> Ipv4Addr {
    assert!(
        i < MORE_CLIENTS_MAX,
        "client host {i} is outside {MORE_CLIENTS_NET}"
    );
    Ipv4Addr::new(198, 18, 16 + i as u8, 2)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arms {
    One,
    Two,
}

pub struct Topology {
    pub arms: Arms,
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
    pub backends: Vec<Netns>,
    pub backend_addrs: Vec<Ipv4Addr>,
    /// Interfaces in the balancer namespace that the XDP program attaches to.
    pub lb_interfaces: Vec<String>,
    /// Client hosts added by `add_clients` so far (their numbering goes on across calls).
    more_clients: AtomicUsize,
}

/// Connects `a`'s device `a_dev` to `b`'s device `b_dev` with a veth pair.
fn wire(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    a.run(&[
        "ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ]);
    a.run(&["ip", "link", "set", a_dev, "up"]);
    b.run(&["ip", "link", "set", b_dev, "up"]);
    a.run(&["ethtool", "-K", a_dev, "gro", "on"]);
    b.run(&["ethtool", "-K", b_dev, "gro", "on"]);
}

impl Topology {
    pub fn new(arms: Arms, backend_count: usize) -> Topology {
        let client = Netns::new("client");
        let lb = Netns::new("lb");
        let switch = Netns::new("switch");
        switch.sh("ip link add br0 type bridge && ip link set br0 up");
        let backends: Vec<Netns> = (1..=backend_count)
            .map(|i| Netns::new(&format!("b{i}")))
            .collect();
        let backend_net = if arms == Arms::Two { 1 } else { 0 };
        let backend_addrs: Vec<Ipv4Addr> = (1..=backend_count)
            .map(|i| Ipv4Addr::new(198, 18, backend_net, 10 + i as u8))
            .collect();
        let lb_side = Ipv4Addr::new(198, 18, backend_net, 1);

        if arms == Arms::Two {
            wire(&client, "eth0", &lb, "lb0");
            lb.sh("ip addr add 198.18.0.1/24 dev lb0");
            wire(&lb, "lb1", &switch, "s-lb");
            lb.sh("ip addr add 198.18.1.1/24 dev lb1");
        } else {
            wire(&client, "eth0", &switch, "s-client");
            switch.run(&["ip", "link", "set", "s-client", "master", "br0"]);
            wire(&lb, "lb0", &switch, "s-lb");
            lb.sh("ip addr add 198.18.0.1/24 dev lb0");
        }
        switch.run(&["ip", "link", "set", "s-lb", "master", "br0"]);
        // The switch re-segments what GRO merged on its ports (a backend's burst, such as its
        // retransmissions after a path MTU change), and with checksum offload the segments it
        // sends the balancer would carry partial checksums, which native XDP cannot finish.
        switch.sh("ethtool -K s-lb tx off >/dev/null");
        client.sh(&format!(
            "ip addr add {CLIENT}/24 dev eth0
             ip route add {VIP}/32 via 198.18.0.1
             ethtool -K eth0 tx off >/dev/null"
        ));
        for (i, (ns, addr)) in backends.iter().zip(&backend_addrs).enumerate() {
            let port = format!("s-b{}", i + 1);
            wire(ns, "eth0", &switch, &port);
            switch.run(&["ip", "link", "set", &port, "master", "br0"]);
            ns.sh(&format!(
                "ip addr add {addr}/24 dev eth0
                 ip route add default via {lb_side}
                 ethtool -K eth0 tx off >/dev/null"
            ));
        }
        let lb_interfaces: Vec<String> = match arms {
            Arms::One => vec!["lb0".into()],
            Arms::Two => vec!["lb0".into(), "lb1".into()],
        };
        lb.sh("sysctl -qw net.ipv4.ip_forward=1");
        Topology {
            arms,
            client,
            lb,
            switch,
            backends,
            backend_addrs,
            lb_interfaces,
            more_clients: AtomicUsize::new(0),
        }
    }

    /// The single-host deployment: the balancer's namespace is the host, with `lb0` towards the
    /// client (198.18.0.1) and a bridge `br-api` (198.18.4.1/24) whose ports `vcN` are veths to
    /// `count` containers (198.18.4.1N, their default route the bridge's address). The
    /// containers keep their default offloads (partial checksums, TSO); the client sends full
    /// checksums, as a real NIC hands XDP. The bridge has a MAC of its own, as Docker gives
    /// one: otherwise it takes its ports' lowest, and a restarted container can change it.
    /// `switch` is unused.
    pub fn containers(count: usize) -> Topology {
        let client = Netns::new("client");
        let lb = Netns::new("lb");
        let switch = Netns::new("switch");
        wire(&client, "eth0", &lb, "lb0");
        lb.sh("ip addr add 198.18.0.1/24 dev lb0
             ip link add br-api address 02:42:c6:12:04:01 type bridge
             ip link set br-api up
             ip addr add 198.18.4.1/24 dev br-api
             sysctl -qw net.ipv4.ip_forward=1");
        client.sh(&format!(
            "ip addr add {CLIENT}/24 dev eth0
             ip route add {VIP}/32 via 198.18.0.1
             ethtool -K eth0 tx off >/dev/null"
        ));
        let backends: Vec<Netns> = (1..=count).map(|i| Netns::new(&format!("c{i}"))).collect();
        let backend_addrs: Vec<Ipv4Addr> = (1..=count)
            .map(|i| Ipv4Addr::new(198, 18, 4, 10 + i as u8))
            .collect();
        let topo = Topology {
            arms: Arms::Two,
            client,
            lb,
            switch,
            backends,
            backend_addrs,
            lb_interfaces: vec!["lb0".into(), "br-api".into()],
            more_clients: AtomicUsize::new(0),
        };
        for i in 0..count {
            topo.plug_container(i);
        }
        topo
    }

    /// (Re)creates container `i`'s veth and its port on `br-api`, as a container restart
    /// does: a new device each time, with the same MAC.
    pub fn plug_container(&self, i: usize) {
        let port = format!("vc{}", i + 1);
        let _ = self.lb.try_sh(&format!("ip link del {port}"));
        wire(&self.backends[i], "eth0", &self.lb, &port);
        self.lb
            .run(&["ip", "link", "set", &port, "master", "br-api"]);
        // Docker derives a container's MAC from its address: a restarted one keeps it, and
        // the host's neighbour entry stays right.
        let [_, _, c, d] = self.backend_addrs[i].octets();
        self.backends[i].sh(&format!(
            "ip link set eth0 address 02:42:c6:12:{c:02x}:{d:02x}
             ip addr add {}/24 dev eth0
             ip route add default via 198.18.4.1",
            self.backend_addrs[i]
        ));
    }

    /// Adds `n` client hosts (two-arm only), each in its own namespace and wired by a veth pair
    /// to the client namespace, which forwards for them: client i (counted across calls from 0)
    /// is 198.18.(16+i).2/24 on its `eth0`, the client namespace's side 198.18.(16+i).1/24 on
    /// `cI`; their default route goes through the client namespace, and the balancer namespace
    /// routes 198.18.16.0/20 back through it. They send full checksums, as the client does.
    /// The namespaces are removed when the returned values are dropped.
    pub fn add_clients(&self, n: usize) -> Vec<Netns> {
        assert_eq!(
            self.arms,
            Arms::Two,
            "more client hosts need the two-arm topology (the client namespace routes for them)"
        );
        let first = self.more_clients.fetch_add(n, Ordering::Relaxed);
        assert!(
            first + n <= MORE_CLIENTS_MAX,
            "at most {MORE_CLIENTS_MAX} more client hosts fit in {MORE_CLIENTS_NET}"
        );
        self.client.sh("sysctl -qw net.ipv4.ip_forward=1");
        self.lb
            .sh(&format!("ip route replace {MORE_CLIENTS_NET} via {CLIENT}"));
        (first..first + n)
            .map(|i| {
                let ns = Netns::new(&format!("client{}", i + 1));
                let addr = more_client_addr(i);
                let [a, b, c, _] = addr.octets();
                let gateway = Ipv4Addr::new(a, b, c, 1);
                let dev = format!("c{i}");
                wire(&self.client, &dev, &ns, "eth0");
                self.client
                    .sh(&format!("ip addr add {gateway}/24 dev {dev}"));
                ns.sh(&format!(
                    "ip addr add {addr}/24 dev eth0
                     ip route add default via {gateway}
                     ethtool -K eth0 tx off >/dev/null"
                ));
                ns
            })
            .collect()
    }

    /// Gives the topology IPv6 beside IPv4 (module docs), and returns the backends' IPv6
    /// addresses. Addresses skip duplicate address detection (nodad), so they serve at once;
    /// the switch floods multicast (no MLD querier here), so neighbour discovery works whatever
    /// the reports.
    pub fn add_ipv6(&self) -> Vec<Ipv6Addr> {
        self.lb.sh("ip -6 addr add fd00::1/64 dev lb0 nodad");
        let gateway = if self.has_containers() {
            self.lb.sh("ip link set br-api type bridge mcast_snooping 0
                 ip -6 addr add fd00:4::1/64 dev br-api nodad");
            "fd00:4::1"
        } else if self.arms == Arms::Two {
            self.switch
                .sh("ip link set br0 type bridge mcast_snooping 0");
            self.lb.sh("ip -6 addr add fd00:1::1/64 dev lb1 nodad");
            "fd00:1::1"
        } else {
            self.switch
                .sh("ip link set br0 type bridge mcast_snooping 0");
            "fd00::1"
        };
        self.client.sh(&format!(
            "ip -6 addr add {CLIENT6}/64 dev eth0 nodad
             ip -6 route add {VIP6}/128 via fd00::1"
        ));
        let addrs = self.ipv6_backend_addrs();
        for (ns, addr) in self.backends.iter().zip(&addrs) {
            ns.sh(&format!(
                "ip -6 addr add {addr}/64 dev eth0 nodad
                 ip -6 route add default via {gateway}"
            ));
        }
        for ns in [&self.lb, &self.client].into_iter().chain(&self.backends) {
            wait_for_link_locals(ns);
        }
        addrs
    }

    /// The backends' IPv6 addresses (`add_ipv6`): fd00:1::1N (two-arm), fd00::1N (one-arm),
    /// fd00:4::1N (containers, on the bridge's fd00:4::1/64).
    pub fn ipv6_backend_addrs(&self) -> Vec<Ipv6Addr> {
        let net = if self.has_containers() {
            4
        } else if self.arms == Arms::Two {
            1
        } else {
            0
        };
        (1..=self.backends.len())
            .map(|i| Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, 0x10 + i as u16))
            .collect()
    }

    /// Whether this is the single-host deployment (`containers`).
    fn has_containers(&self) -> bool {
        self.lb_interfaces.iter().any(|i| i == "br-api")
    }

    /// IPv6 for the client hosts `add_clients` made (`more`, in their order, the first call's):
    /// fd00:(0x10+i)::2 behind the client namespace, which routes for them (fd00:10::/28).
    pub fn add_ipv6_clients(&self, more: &[Netns]) {
        self.client.sh("sysctl -qw net.ipv6.conf.all.forwarding=1");
        self.lb.sh("ip -6 route add fd00:10::/28 via fd00::2");
        for (i, ns) in more.iter().enumerate() {
            let net = 0x10 + i as u16;
            self.client
                .sh(&format!("ip -6 addr add fd00:{net:x}::1/64 dev c{i} nodad"));
            ns.sh(&format!(
                "ip -6 addr add fd00:{net:x}::2/64 dev eth0 nodad
                 ip -6 route add default via fd00:{net:x}::1"
            ));
        }
    }

    /// A config for one TCP service "web" on VIP:80 and one UDP service "dns" on VIP:53 over
    /// all backends with these weights, with fast health checks.
    pub fn config(&self, weights: &[u32]) -> String {
        let mut text = format!(
            // Socket hooks only where a test asks for them, on a cgroup of its own.
            "interfaces = [{}]\n[host]\ncgroup = \"off\"\n[flows]\ncapacity = 65536\n",
            self.lb_interfaces
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (name, port, proto) in [("web", 80, "tcp"), ("dns", 53, "udp")] {
            text += &format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{VIP}:{port}\"\nprotocol = \"{proto}\"\n\
                 [service.health]\nkind = \"tcp\"\nport = {BACKEND_PORT}\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2\n"
            );
            for (addr, weight) in self.backend_addrs.iter().zip(weights) {
                text += &format!(
                    "[[service.backend]]\naddress = \"{addr}:{BACKEND_PORT}\"\nweight = {weight}\n"
                );
            }
        }
        text
    }
}

/// Waits (5 s at most) until no IPv6 address of `ns` is tentative. A link-local address runs
/// duplicate address detection for a second or two after its device comes up, and until then
/// the host sends no neighbour solicitation (Linux wants a ready link-local source): a DSR
/// backend that must resolve a client it has never heard from would answer its first SYN a
/// second late, after the client's retransmission went elsewhere. Hosts in service are long
/// past this.
fn wait_for_link_locals(ns: &Netns) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let tentative = ns.sh("ip -6 addr show tentative");
        if tentative.trim().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "IPv6 addresses still tentative after 5 s:\n{tentative}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
