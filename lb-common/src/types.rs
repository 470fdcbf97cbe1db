//! Map keys and values. Network byte order lives in the type (`Be16`/`Be32`); no `bool`, enum or
//! implicit padding crosses the kernel boundary, and every size is asserted.

use crate::SNAT_POOL_MAX;

/// A 32-bit value in network byte order, stored as the packet has it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Be32(pub u32);

/// A 16-bit value in network byte order, stored as the packet has it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Be16(pub u16);

impl Be32 {
    pub const fn from_host(v: u32) -> Self {
        Self(v.to_be())
    }
    pub const fn to_host(self) -> u32 {
        u32::from_be(self.0)
    }
    pub const fn from_bytes(b: [u8; 4]) -> Self {
        Self(u32::from_ne_bytes(b))
    }
    pub const fn to_bytes(self) -> [u8; 4] {
        self.0.to_ne_bytes()
    }
}

impl Be16 {
    pub const fn from_host(v: u16) -> Self {
        Self(v.to_be())
    }
    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0)
    }
    pub const fn from_bytes(b: [u8; 2]) -> Self {
        Self(u16::from_ne_bytes(b))
    }
    pub const fn to_bytes(self) -> [u8; 2] {
        self.0.to_ne_bytes()
    }
}

/// An IPv6 address, stored as the packet has it: four 32-bit words, each read from the packet's
/// bytes in native order (as `Be32` holds an IPv4 address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct In6(pub [u32; 4]);
const _: () = assert!(core::mem::size_of::<In6>() == 16);

impl In6 {
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self([
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ])
    }
    pub const fn to_bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        let mut i = 0;
        while i < 4 {
            let w = self.0[i].to_ne_bytes();
            out[i * 4] = w[0];
            out[i * 4 + 1] = w[1];
            out[i * 4 + 2] = w[2];
            out[i * 4 + 3] = w[3];
            i += 1;
        }
        out
    }
}

/// An address family's address as the maps hold it: `Be32` (IPv4) or `In6` (IPv6). The maps'
/// keys and values are generic over it (`FlowKeyOf`, ...), and their IPv4 forms keep the names
/// and layout they had before IPv6.
pub trait Address: Copy + Default + Eq + core::fmt::Debug + 'static {
    /// The address's bytes, as a packet holds them.
    type Bytes: Copy + Default + Eq + core::fmt::Debug;
    /// The address folded to 32 bits, for hashes: an IPv4 address is itself.
    fn fold(self) -> u32;
    fn bytes(self) -> Self::Bytes;
}

impl Address for Be32 {
    type Bytes = [u8; 4];
    #[inline(always)]
    fn fold(self) -> u32 {
        self.0
    }
    #[inline(always)]
    fn bytes(self) -> [u8; 4] {
        self.to_bytes()
    }
}

impl Address for In6 {
    type Bytes = [u8; 16];
    #[inline(always)]
    fn fold(self) -> u32 {
        let [a, b, c, d] = self.0;
        a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24)
    }
    #[inline(always)]
    fn bytes(self) -> [u8; 16] {
        self.to_bytes()
    }
}

/// Key of SOCK_REVERSE (SOCK_REVERSE6): a socket on the host that a socket hook balanced (its
/// cookie, low word first, so that no key has padding) and the backend it was sent to, as the
/// kernel then reports the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKeyOf<A> {
    pub cookie: [u32; 2],
    pub addr: A,
    pub port: Be16,
    pub _pad: u16,
}
pub type SockKey = SockKeyOf<Be32>;
pub type SockKey6 = SockKeyOf<In6>;
const _: () = assert!(core::mem::size_of::<SockKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockKey6>() == 28);

impl<A> SockKeyOf<A> {
    pub const fn new(cookie: u64, addr: A, port: Be16) -> Self {
        Self {
            cookie: [cookie as u32, (cookie >> 32) as u32],
            addr,
            port,
            _pad: 0,
        }
    }
}

/// Value of SOCK_REVERSE (SOCK_REVERSE6): the address the application asked for (a VIP, or a
/// loopback address for a VIP on a host address), shown to it in place of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockVipOf<A> {
    pub addr: A,
    pub port: Be16,
    pub _pad: u16,
}
pub type SockVip = SockVipOf<Be32>;
pub type SockVip6 = SockVipOf<In6>;
const _: () = assert!(core::mem::size_of::<SockVip>() == 8);
const _: () = assert!(core::mem::size_of::<SockVip6>() == 20);

/// Key of HOST_PORTS: a port and protocol that a service has on a host address, which host
/// clients may also reach at a loopback address (as a published port answers on localhost).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPortKey {
    pub port: Be16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<HostPortKey>() == 4);

impl HostPortKey {
    pub const fn of(port: Be16, proto: u8) -> Self {
        Self {
            port,
            proto,
            _pad: 0,
        }
    }
}

/// Key of FRAGMENTS and FRAGMENTS6: a fragmented datagram, as its fragments arrive (the
/// reassembly key of RFC 791 and RFC 8200: addresses, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKeyOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    /// The identification's bytes as on the wire, widened: IPv4's 16 bits, IPv6's 32.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
pub type FragmentKey = FragmentKeyOf<Be32>;
pub type FragmentKey6 = FragmentKeyOf<In6>;
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentKey6>() == 40);

/// Value of FRAGMENTS and FRAGMENTS6: the flow whose rewrite the datagram's first fragment got,
/// and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValueOf<A> {
    pub flow: FlowKeyOf<A>,
    pub first_seen_ns: u64,
}
pub type FragmentValue = FragmentValueOf<Be32>;
pub type FragmentValue6 = FragmentValueOf<In6>;
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 24);
const _: () = assert!(core::mem::size_of::<FragmentValue6>() == 48);

/// Key of FLOWS (FLOWS6): one direction of a balanced connection, as the packet arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
pub type FlowKey = FlowKeyOf<Be32>;
pub type FlowKey6 = FlowKeyOf<In6>;
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

/// Value of FLOWS: what a packet of that direction is rewritten to, where it goes, and the
/// connection's state (see `conntrack`).
///
/// The other direction's key is always `(nat_dst_addr, nat_src_addr, nat_dst_port, nat_src_port)`:
/// the forward entry rewrites client -> VIP into SNAT -> backend, whose reply backend -> SNAT is
/// the reverse entry's key. So neither side stores its peer.
///
/// The next hop (`egress_*`, `*_mac`) caches what bpf_fib_lookup gave for this direction, so an
/// established flow skips the FIB: valid while `egress_ifindex != 0`, for packets of at most
/// `fib_ok_len` bytes (IPv4 total length; the largest the FIB has approved for this flow, which
/// keeps the MTU check). The data path clears it whenever it refreshes `last_seen_ns`, so route
/// and neighbour changes reach every flow within FLOW_TOUCH_INTERVAL_NS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValueOf<A> {
    pub nat_src_addr: A,
    pub nat_dst_addr: A,
    pub nat_src_port: Be16,
    pub nat_dst_port: Be16,
    /// Index into BACKENDS and BACKEND_STATS.
    pub backend_id: u32,
    /// `FLOW_REVERSE | FLOW_FIN_SENT`.
    pub flags: u32,
    /// The cached next hop's device; 0: none cached.
    pub egress_ifindex: u32,
    /// CLOCK_MONOTONIC of this direction's last packet (refreshed at most every
    /// FLOW_TOUCH_INTERVAL_NS, and not by a half-open connection's handshake); 0 for a reverse
    /// entry that has seen no reply yet.
    pub last_seen_ns: u64,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub fib_ok_len: u16,
    /// The egress device's `Iface::flags`.
    pub egress_flags: u16,
    /// Host order, TCP: the sequence number after the last byte this direction sent.
    pub seq_next: u32,
    /// The connection's `conntrack` state, the same in both entries.
    pub state: u32,
    /// With FLOW_TS: added to the TSval of a forward segment, and to the TSecr of a reply, so
    /// that the backend sees the balancer's timestamp clock (`timestamps`).
    pub ts_add: u32,
    /// Which address of the service's SNAT pool the flow took (`Service::snat_addrs`): with
    /// `backend_id`, the port bitmap its port is marked in (`snat_ports::PortMap`).
    pub snat_index: u16,
    /// The service's `Service::mss` when the flow began: both directions' SYNs are clamped to it.
    pub mss: u16,
}
pub type FlowValue = FlowValueOf<Be32>;
pub type FlowValue6 = FlowValueOf<In6>;
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);
const _: () = assert!(core::mem::size_of::<FlowValue6>() == 88);
// lb-ebpf sets `flags` bits with a 64-bit atomic over `flags` and `egress_ifindex`.
const _: () = assert!(
    core::mem::offset_of!(FlowValue, flags) % 8 == 0
        && core::mem::offset_of!(FlowValue, egress_ifindex)
            == core::mem::offset_of!(FlowValue, flags) + 4
        && core::mem::offset_of!(FlowValue6, flags) % 8 == 0
        && core::mem::offset_of!(FlowValue6, egress_ifindex)
            == core::mem::offset_of!(FlowValue6, flags) + 4
);

impl<A: Address> FlowKeyOf<A> {
    /// The flow's hash (`flow_hash` of its addresses, ports and protocol): its Maglev slot,
    /// and GUE's UDP source port.
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        crate::flow_hash(
            self.src_addr.fold(),
            self.dst_addr.fold(),
            self.src_port.0,
            self.dst_port.0,
            self.proto,
        )
    }
}

impl<A: Address> FlowValueOf<A> {
    /// The key of the other direction of this flow.
    #[inline(always)]
    pub fn peer_key(&self, proto: u8) -> FlowKeyOf<A> {
        FlowKeyOf {
            src_addr: self.nat_dst_addr,
            dst_addr: self.nat_src_addr,
            src_port: self.nat_dst_port,
            dst_port: self.nat_src_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Key of SERVICES (SERVICES6): a virtual address, port and protocol (IPPROTO_TCP or
/// IPPROTO_UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyOf<A> {
    pub vip: A,
    pub port: Be16,
    pub proto: u8,
    pub _pad: u8,
}
pub type ServiceKey = ServiceKeyOf<Be32>;
pub type ServiceKey6 = ServiceKeyOf<In6>;
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);

/// Value of SERVICES (SERVICES6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceOf<A> {
    /// Index of the live Maglev table's first slot in MAGLEV. Flipping this one field (a single
    /// map update) switches the service to a fully written new table.
    pub maglev_base: u32,
    /// How many of `snat_addrs` are the service's SNAT pool: at least 1 in NAT mode.
    pub snat_count: u8,
    /// `SERVICE_MODE_*`. Builds before modes had a u16 `snat_count` here, whose high byte (0,
    /// little-endian) reads as SERVICE_MODE_NAT: their pinned services load unchanged.
    pub mode: u8,
    /// TCP: the largest MSS its connections' SYN and SYN-ACK may announce, lowered to it on the
    /// way through (for paths that drop ICMP, so path MTU discovery cannot work); 0: untouched.
    pub mss: u16,
    /// Source addresses of the flows this service sends to its backends. Each backend's
    /// connections may take every port of the range on each.
    pub snat_addrs: [A; SNAT_POOL_MAX as usize],
}
pub type Service = ServiceOf<Be32>;
pub type Service6 = ServiceOf<In6>;
const _: () = assert!(core::mem::size_of::<Service>() == 8 + 4 * SNAT_POOL_MAX as usize);
const _: () = assert!(core::mem::size_of::<Service6>() == 8 + 16 * SNAT_POOL_MAX as usize);

/// Value of BACKENDS (BACKENDS6), indexed by backend id: one id space for both families, so
/// the Maglev tables, counters and suspect marks serve both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOf<A> {
    pub addr: A,
    pub port: Be16,
    pub _pad: u16,
    /// `BACKEND_HEALTHY`.
    pub flags: u32,
}
pub type Backend = BackendOf<Be32>;
pub type Backend6 = BackendOf<In6>;
const _: () = assert!(core::mem::size_of::<Backend>() == 12);
const _: () = assert!(core::mem::size_of::<Backend6>() == 24);

/// Value of BACKEND_STATS (per CPU), indexed by backend id. Both directions count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 24);

/// Value of FLOW_COUNTS (per CPU), indexed by backend id: what the data path did to the
/// backend's connections. Summed over CPUs, `opened - ended` are its open connections and
/// `opened - released` those still holding a SNAT port: the daemon reads them in O(backends)
/// instead of reading the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Forward entries inserted.
    pub opened: u64,
    /// Connections that ended (both FINs, an RST) or were removed before they did: once each,
    /// by whoever sets FLOW_END_COUNTED on the forward entry.
    pub ended: u64,
    /// Forward entries removed.
    pub released: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCounts>() == 24);

impl FlowCounts {
    /// Open connections.
    pub fn open(&self) -> u64 {
        self.opened.saturating_sub(self.ended)
    }

    /// SNAT ports held by connections, ended ones included.
    pub fn holding_ports(&self) -> u64 {
        self.opened.saturating_sub(self.released)
    }

    pub fn add(&mut self, other: &FlowCounts) {
        self.opened = self.opened.wrapping_add(other.opened);
        self.ended = self.ended.wrapping_add(other.ended);
        self.released = self.released.wrapping_add(other.released);
    }
}

/// Value of IFACES, keyed by ifindex: an interface the program forwards through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Iface {
    /// `IFACE_XDP_TX`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Iface>() == 4);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with only integer fields and no implicit padding
    // (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for Be32 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl<A: aya::Pod> aya::Pod for FragmentKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: aya::Pod> aya::Pod for SockKeyOf<A> {}
    // SAFETY: as above.
    unsafe impl<A: aya::Pod> aya::Pod for SockVipOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostPortKey {}
    // SAFETY: as above.
    unsafe impl<A: aya::Pod> aya::Pod for FragmentValueOf<A> {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Iface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for In6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Service6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in6_keeps_the_packets_bytes() {
        let bytes: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        assert_eq!(In6::from_bytes(bytes).to_bytes(), bytes);
        // Each word as a packet's four bytes read in native order, as Be32 holds IPv4.
        assert_eq!(
            In6::from_bytes(bytes).0[0],
            Be32::from_bytes([1, 2, 3, 4]).0
        );
    }

    #[test]
    fn ipv6_flows_hash_by_every_word_of_their_addresses() {
        let key = |last: u8, word: usize| {
            let mut addr = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
            addr[word * 4 + 3] ^= last;
            FlowKey6 {
                src_addr: In6::from_bytes(addr),
                dst_addr: In6::from_bytes([0xfd; 16]),
                src_port: Be16::from_host(40000),
                dst_port: Be16::from_host(80),
                proto: 6,
                _pad: [0; 3],
            }
        };
        let base = key(0, 0).hash();
        for word in 0..4 {
            assert_ne!(key(0x40, word).hash(), base, "word {word} of the source");
        }
        // An IPv4 key hashes as before the keys were generic: its address is its fold.
        let v4 = FlowKey {
            src_addr: Be32(7),
            dst_addr: Be32(9),
            src_port: Be16(1),
            dst_port: Be16(2),
            proto: 17,
            _pad: [0; 3],
        };
        assert_eq!(v4.hash(), crate::flow_hash(7, 9, 1, 2, 17));
    }

    #[test]
    fn a_flows_peer_key_is_the_other_direction() {
        let value = FlowValue6 {
            nat_src_addr: In6([1, 2, 3, 4]),
            nat_dst_addr: In6([5, 6, 7, 8]),
            nat_src_port: Be16(10),
            nat_dst_port: Be16(20),
            ..FlowValue6::default()
        };
        let peer = value.peer_key(6);
        assert_eq!(
            (peer.src_addr, peer.dst_addr, peer.src_port, peer.dst_port),
            (In6([5, 6, 7, 8]), In6([1, 2, 3, 4]), Be16(20), Be16(10))
        );
    }
}
