//! Map sizes and flag bits. Sizes that depend on the deployment (flow table, Maglev table) are set
//! by lb-user at load time; these are the fixed ones and the defaults.

/// Services the maps hold at most (each has two Maglev tables: live and staging).
pub const MAX_SERVICES: u32 = 64;
/// Backends across all services; a backend id indexes BACKENDS and BACKEND_STATS.
pub const MAX_BACKENDS: u32 = 1024;
/// Interfaces the program can be attached to and forward through.
pub const MAX_INTERFACES: u32 = 64;
/// Default Maglev table size per service: a prime well above 100 x the backends of a service.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Default FLOWS capacity in entries; a balanced connection takes two (one per direction).
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// A MAGLEV slot that names no backend (the service has none with weight > 0).
pub const NO_BACKEND: u32 = u32::MAX;

/// `Backend::flags`: the backend passes its health checks; flows to it are forwarded.
pub const BACKEND_HEALTHY: u32 = 1;

/// `FlowValue::flags`: the entry is the backend -> client direction.
pub const FLOW_REVERSE: u32 = 1;
// Bit 2 was FLOW_CLOSING, retired for `FlowValue::state`.
/// `FlowValue::flags`: this direction sent a FIN.
pub const FLOW_FIN_SENT: u32 = 4;
/// `FlowValue::flags`: the in-kernel expiry found this reply entry without its forward entry
/// once; if it still has none at the next pass, it goes. One pass of grace covers a flow that a
/// CPU is creating (reply entry first) while the pass runs.
pub const FLOW_ORPHAN_SEEN: u32 = 8;
/// `FlowValue::flags`, forward entry: the SYN that opened the flow was well formed (no data, a
/// correct checksum), so the backend leaving it unanswered is evidence against the backend.
pub const FLOW_SYN_WELL_FORMED: u32 = 16;
/// `FlowValue::flags`, forward entry: its connection's end is counted in FLOW_COUNTS. Set with
/// an atomic fetch-or, so that of the CPUs (and the expiry timer) that meet the end at once,
/// exactly one counts it.
pub const FLOW_END_COUNTED: u32 = 32;
/// `FlowValue::flags`, both entries: the connection negotiated TCP timestamps, and its
/// segments' timestamps are translated by `FlowValue::ts_add` (`timestamps`).
pub const FLOW_TS: u32 = 64;
/// `FlowValue::flags`, both entries: the in-kernel expiry found the connection ended and silent
/// for FLOW_RECLAIM_NS, and cleared its SNAT port's bit, so that the port search finds the port
/// (and takes it over in FLOWS) long before the entries time out. Removing the entries then
/// leaves the bit alone: it is the next holder's.
pub const FLOW_PORT_RELEASED: u32 = 128;
/// `FlowValue::flags`, both entries: a `SERVICE_MODE_DNAT` flow. The reply entry is keyed by
/// the client's own address and port, which the flow keeps: it holds no SNAT port.
pub const FLOW_DNAT: u32 = 256;
/// `FlowValue::flags`: a `SERVICE_MODE_DSR_L2` flow. It has a forward entry alone (the backend
/// answers the client directly), whose `nat_dst_*` name the backend: the FIB's destination.
/// The packet keeps its addresses and ports; only its MACs change.
pub const FLOW_DSR: u32 = 512;
/// `FlowValue::flags`, with FLOW_DSR: a `SERVICE_MODE_DSR_IPIP` flow. The packet goes inside an
/// IPv4 header from `nat_src_addr` (an address of the service's pool) to the backend.
pub const FLOW_IPIP: u32 = 1024;
/// `FlowValue::flags`, with FLOW_DSR: a `SERVICE_MODE_DSR_GUE` flow. The packet goes inside
/// IPv4 from `nat_src_addr` to the backend and UDP from `nat_src_port` (the flow's hash:
/// `tunnel::gue_source_port`) to `tunnel::GUE_PORT`.
pub const FLOW_GUE: u32 = 2048;

/// `Service::mode`: full NAT, source and destination rewritten (the default).
pub const SERVICE_MODE_NAT: u8 = 0;
/// `Service::mode`: the destination alone is rewritten, so the backend sees the client's
/// address; its replies must come back through the balancer (its gateway).
pub const SERVICE_MODE_DNAT: u8 = 1;
/// `Service::mode`: direct server return on a shared segment. The frame goes to the backend's
/// MAC unchanged otherwise (the VIP sits on the backend's loopback), and the backend answers
/// the client itself. Its backends listen on the VIP's port.
pub const SERVICE_MODE_DSR_L2: u8 = 2;
/// `Service::mode`: direct server return through an IPIP tunnel to backends on any subnet,
/// whose `lb decap` strips it (`tunnel`). Its backends listen on the VIP's port.
pub const SERVICE_MODE_DSR_IPIP: u8 = 3;
/// `Service::mode`: as SERVICE_MODE_DSR_IPIP, through a GUE tunnel (IPv4 and UDP), which the
/// backend's NIC spreads over its queues by the UDP source port.
pub const SERVICE_MODE_DSR_GUE: u8 = 4;

/// Whether a `Service::mode` is direct server return (its backends answer clients directly).
pub const fn is_dsr_mode(mode: u8) -> bool {
    matches!(
        mode,
        SERVICE_MODE_DSR_L2 | SERVICE_MODE_DSR_IPIP | SERVICE_MODE_DSR_GUE
    )
}

/// How often the in-kernel expiry (lb-ebpf's `expiry.rs`) walks the flow table; less often
/// (up to EXPIRY_INTERVAL_MAX_NS) when a walk takes more than a fifth of that.
pub const EXPIRY_INTERVAL_NS: u64 = 1_000_000_000;
pub const EXPIRY_INTERVAL_MAX_NS: u64 = 5_000_000_000;

/// `Iface::flags`: the device is a real NIC, where XDP_TX back out of the ingress device is the
/// fastest action. Virtual devices (veth) need a redirect instead (see ENGINEERING.md).
pub const IFACE_XDP_TX: u32 = 1;
/// `Iface::flags`: a bridge of containers. The kernel forwards through it (XDP cannot send into
/// a bridge), but its next hop is cached in the flow all the same: a container's refusal,
/// seen by the tc program on the bridge's port, is recognised by it (`BRIDGE_PORTS`).
pub const IFACE_VIA_STACK: u32 = 2;
/// How many bridge ports (container veths) the tc program can tell the bridge of.
pub const MAX_BRIDGE_PORTS: u32 = 1024;

/// How often the data path refreshes `FlowValue::last_seen_ns`: writing the shared entry on every
/// packet would bounce its cache line between CPUs for no gain in expiry precision.
pub const FLOW_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
/// How long an ended connection (both FINs, or an RST) must have been silent before a new flow
/// may take its SNAT port: late retransmissions of the close still find their flow, and the
/// port is not held for the whole closing timeout, which at high connection rates would exhaust
/// a backend's ports. Linux reuses a TIME_WAIT tuple of its own after the same second
/// (`tcp_tw_reuse`, whose delay is 1 s by default); the backend accepts the new SYN for the
/// translated timestamps (`timestamps`). Every packet of an ended connection counts as heard
/// (`flow::lookup`), so the second runs from its last one.
pub const FLOW_RECLAIM_NS: u64 = 1_000_000_000;
/// A half-open connection at least this old gives its SNAT port to a new one when the ports
/// tried for the new one are all taken: a genuine handshake completes within a round trip,
/// and under a SYN flood the ports go to connections that can complete.
pub const HALF_OPEN_EVICT_NS: u64 = 1_000_000_000;
/// TCP options take at most 40 bytes.
pub const TCP_OPTIONS_MAX: usize = 40;
/// SNAT addresses a service's pool holds at most: a backend's connections may take every port
/// of the range on each (lb-ebpf's `snat.rs`).
pub const SNAT_POOL_MAX: u32 = 4;
/// SNAT port bitmaps (lb-ebpf's `snat.rs`): one per backend id and address of its service's
/// pool (a backend id serves one service, so one protocol).
pub const SNAT_BITMAPS: u32 = MAX_BACKENDS * SNAT_POOL_MAX;
/// 64-bit words of ports per bitmap, covering every port number, and words of their summary
/// bits.
pub const SNAT_PORT_WORDS: u32 = 1024;
pub const SNAT_SUMMARY_WORDS: u32 = SNAT_PORT_WORDS / 64;
/// Tries at finding a SNAT port by probing FLOWS, when the bitmaps have none free (ports held
/// by connections that ended or expired but were not removed yet), before a new flow is
/// dropped as exhausted.
pub const SNAT_PORT_TRIES: u32 = 8;
/// A SYN that arrives again this long after its flow was made, while the backend has answered
/// nothing, is a client's retransmission: the backend is suspect and the connection moves.
/// Shorter than any TCP's initial retransmission timeout (1 s on Linux), longer than a
/// duplicate in flight.
pub const SYN_UNANSWERED_NS: u64 = 500_000_000;
/// How long the data path steers new connections off a backend it saw refuse or ignore one,
/// unless the daemon's next passing health check clears the mark first.
pub const SUSPECT_HOLD_NS: u64 = 10_000_000_000;
/// Maglev slots after a suspect backend's tried for a new flow: each is another backend with
/// the probability of its weight share.
pub const SUSPECT_PROBES: u32 = 8;

/// Datagrams whose fragments FRAGMENTS follows at once (least recently used go first).
pub const FRAGMENTS_CAPACITY: u32 = 16384;
/// Host sockets the socket hooks remember the VIP of (LRU: the oldest go first).
pub const SOCK_REVERSE_CAPACITY: u32 = 65536;
/// How long after its first fragment a datagram's later fragments are followed: fragments of
/// one datagram arrive within milliseconds; a reused IP identification must not inherit the
/// rewrite long after.
pub const FRAGMENT_FOLLOW_NS: u64 = 2_000_000_000;

/// The layout of the pinned maps (keys, values, flags and what they mean), pinned in LAYOUT. A
/// daemon adopts pinned maps only of its own layout: bump this with any change to a pinned
/// map's key or value, or to a flag's meaning, even one that keeps the sizes. 1: the layout
/// of the builds before it was pinned.
pub const LAYOUT_VERSION: u32 = 1;
