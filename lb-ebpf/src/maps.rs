//! Every map of the program and its load-time settings. The daemon (lb-user's dataplane.rs) is
//! the only writer of configuration maps; the data path writes only FLOWS, SNAT_PORTS,
//! SNAT_FULL, SNAT_NEXT, TS_HIGH, RESET_BUDGET, ICMP_BUDGET, FRAGMENTS(6), HOP_CACHE(6), SUSPECT
//! marks and the counters (EXPIRY, the timer, is in `expiry.rs`), and the socket hooks
//! SOCK_REVERSE(6). Sizes marked "set at load" are overridden by the daemon.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, Backend6, BackendStats, Be32, DEFAULT_FLOW_CAPACITY, DEFAULT_MAGLEV_SIZE,
    FRAGMENTS_CAPACITY, FlowCounts, FlowKey, FlowKey6, FlowValue, FlowValue6, FragmentKey,
    FragmentKey6, FragmentKeyOf, FragmentValue, FragmentValue6, FragmentValueOf, HostPortKey,
    Iface, In6, MAX_BACKENDS, MAX_BRIDGE_PORTS, MAX_INTERFACES, MAX_SERVICES, SNAT_BITMAPS,
    SNAT_PORT_WORDS, SNAT_SUMMARY_WORDS, SOCK_REVERSE_CAPACITY, STATS_SLOTS, Service, Service6,
    ServiceKey, ServiceKey6, SockKey, SockKey6, SockVip, SockVip6, TCP_OPTIONS_MAX,
    conntrack::STATE_SLOTS, icmp::ICMP_BUDGET_SLOTS, reset::ResetBudget,
};

use crate::hop_cache::HopCacheOf;

/// VIP:port/proto -> service (live Maglev table, SNAT addresses). Daemon writes; data path reads.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// backend id -> address, port, health. Daemon writes; data path reads.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// SERVICES' IPv6 twin: a service's Maglev table and backend ids are those of the one id space.
#[map]
pub static SERVICES6: HashMap<ServiceKey6, Service6> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// BACKENDS' IPv6 twin, indexed by the same backend ids: an id is in use in one of the two.
#[map]
pub static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev slots of every service, two tables each (live and staging): slot -> backend id.
/// Daemon writes the staging table, then flips `Service::maglev_base`. Size set at load.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * 2 * DEFAULT_MAGLEV_SIZE, 0);

/// One direction of a connection -> its rewrite. Data path inserts and refreshes; the expiry
/// timer (`expiry.rs`) removes what outlived its state's timeout. Size set at load.
#[map]
pub static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// FLOWS' IPv6 twin. Size set at load. Not preallocated: a balancer with no IPv6 service
/// spends no memory on it (FLOWS' million entries take about 140 MB).
#[map]
pub static FLOWS6: HashMap<FlowKey6, FlowValue6> =
    HashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, BPF_F_NO_PREALLOC);

/// backend id -> packets, bytes, new flows (per CPU). Data path writes; daemon reads.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// backend id -> connections opened, ended and released (per CPU, `flow_count.rs`). Data path
/// writes; daemon reads, and zeroes a backend's after cutting its connections.
#[map]
pub static FLOW_COUNTS: PerCpuArray<FlowCounts> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// lb_common::reason slot -> packets (per CPU). Data path writes; daemon reads.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

/// backend id -> when the data path saw it refuse or ignore a new connection (0: never, or
/// cleared by the daemon after a passing health check). Data path marks; daemon clears.
#[map]
pub static SUSPECT: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// [0] -> 1 if the data path logs new flows, drops and suspect marks (aya-log). Daemon writes
/// (`lb debug-log on|off`); off at every start.
#[map]
pub static DEBUG_LOG: Array<u32> = Array::with_max_entries(1, 0);

/// (SNAT pool address, backend id) x port word -> the ports held by reply entries
/// (`snat.rs`). Data path writes; the daemon zeroes a backend's when none of its entries is
/// left.
#[map]
pub static SNAT_PORTS: Array<u64> = Array::with_max_entries(SNAT_BITMAPS * SNAT_PORT_WORDS, 0);

/// (SNAT pool address, backend id) x summary word -> which port words are full (`snat.rs`).
/// As above.
#[map]
pub static SNAT_FULL: Array<u64> = Array::with_max_entries(SNAT_BITMAPS * SNAT_SUMMARY_WORDS, 0);

/// (SNAT pool address, backend id) -> the port word this CPU last took a port from. Data path
/// only.
#[map]
pub static SNAT_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(SNAT_BITMAPS, 0);

/// [0] -> a copy of the TCP options being walked for one of them (`tcp_options.rs`).
/// Data path only: scratch space off the stack.
#[map]
pub static TCP_OPTIONS: PerCpuArray<[u8; TCP_OPTIONS_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// [0] -> the highest TCP timestamp sent to a backend yet, in its low 32 bits (`timestamps.rs`).
/// Data path only; 64 bits because the target's atomics are.
#[map]
pub static TS_HIGH: Array<u64> = Array::with_max_entries(1, 0);

/// [0] -> this CPU's allowance of RSTs for segments with no flow. Data path only.
#[map]
pub static RESET_BUDGET: PerCpuArray<ResetBudget> = PerCpuArray::with_max_entries(1, 0);

/// [ICMP_BUDGET_ECHO] and [ICMP_BUDGET_ERRORS] -> this CPU's allowance of echo replies to
/// pings of a VIP, and of ICMP errors forwarded or sent (`icmp.rs`). Data path only.
#[map]
pub static ICMP_BUDGET: PerCpuArray<ResetBudget> =
    PerCpuArray::with_max_entries(ICMP_BUDGET_SLOTS, 0);

/// A fragmented datagram -> the flow its first fragment was balanced by (`fragments.rs`). Data
/// path only; not pinned (a datagram in flight across a restart is retransmitted).
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

/// FRAGMENTS' IPv6 twin.
#[map]
pub static FRAGMENTS6: LruHashMap<FragmentKey6, FragmentValue6> =
    LruHashMap::with_max_entries(FRAGMENTS_CAPACITY, 0);

/// A first fragment's FRAGMENTS entry, built here rather than on the stack (IPv6's balancing
/// path has no 88 bytes to spare), then inserted.
#[map]
pub static FRAGMENT_SCRATCH: PerCpuArray<FragmentEntryOf<Be32>> =
    PerCpuArray::with_max_entries(1, 0);

/// FRAGMENT_SCRATCH's IPv6 twin.
#[map]
pub static FRAGMENT_SCRATCH6: PerCpuArray<FragmentEntryOf<In6>> =
    PerCpuArray::with_max_entries(1, 0);

/// A FRAGMENTS entry whole, key and value.
#[repr(C)]
pub struct FragmentEntryOf<A> {
    pub key: FragmentKeyOf<A>,
    pub value: FragmentValueOf<A>,
}

/// VIP -> 1: the addresses of SERVICES' keys, for traffic that has no port (`icmp.rs`). Daemon
/// writes; data path reads.
#[map]
pub static VIPS: HashMap<Be32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// VIPS for SERVICES6.
#[map]
pub static VIPS6: HashMap<In6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// ifindex -> how to send out of it. Daemon writes; data path reads.
#[map]
pub static IFACES: HashMap<u32, Iface> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// The pinned maps' layout version (lb_common::LAYOUT_VERSION), for the daemon that adopts
/// them. Daemon only; no program reads it.
#[map]
pub static LAYOUT: Array<u32> = Array::with_max_entries(1, 0);

/// The flow value `flow::create` builds, off the stack (per CPU; data path only, not pinned).
#[map]
pub static FLOW_SCRATCH: PerCpuArray<FlowValue> = PerCpuArray::with_max_entries(1, 0);

/// backend id -> its next hop, for new flows (per CPU; data path only, not pinned:
/// `hop_cache.rs`).
#[map]
pub static HOP_CACHE: PerCpuArray<HopCacheOf<Be32>> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// HOP_CACHE's IPv6 twin.
#[map]
pub static HOP_CACHE6: PerCpuArray<HopCacheOf<In6>> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// FLOW_SCRATCH's IPv6 twin.
#[map]
pub static FLOW_SCRATCH6: PerCpuArray<FlowValue6> = PerCpuArray::with_max_entries(1, 0);

/// The key of the reply entry in FLOW_SCRATCH6, handed between `xdp6.rs`'s steps.
#[map]
pub static REPLY_KEY_SCRATCH6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(1, 0);

/// A bridge port's ifindex -> its bridge's: a container's packets meet the tc program on the
/// port, while the flow's next hop is the bridge. Daemon writes; data path reads.
#[map]
pub static BRIDGE_PORTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

/// ifindex -> the same device, for bpf_redirect_map. Daemon writes (from the balancer's
/// network namespace: the kernel resolves ifindexes in the writer's namespace).
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// A host socket the socket hooks balanced and its backend -> the address the application
/// asked for (`sock.rs`): getpeername and recvmsg show it that. Hooks only; pinned, so that a
/// connection made before a restart still shows its VIP.
#[map]
pub static SOCK_REVERSE: LruHashMap<SockKey, SockVip> =
    LruHashMap::with_max_entries(SOCK_REVERSE_CAPACITY, 0);

/// SOCK_REVERSE's IPv6 twin.
#[map]
pub static SOCK_REVERSE6: LruHashMap<SockKey6, SockVip6> =
    LruHashMap::with_max_entries(SOCK_REVERSE_CAPACITY, 0);

/// A service's port and protocol on a host address -> that address: the socket hooks balance
/// host clients reaching it at a loopback address too. Daemon writes.
#[map]
pub static HOST_PORTS: HashMap<HostPortKey, Be32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// HOST_PORTS for IPv6 services on a host address, reached at ::1.
#[map]
pub static HOST_PORTS6: HashMap<HostPortKey, In6> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// The network namespace (its cookie) of the daemon, the only one the socket hooks act in:
/// cgroup hooks run in every namespace. 0: they act nowhere. Set at load.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// First SNAT source port. Set at load.
#[unsafe(no_mangle)]
static SNAT_PORT_MIN: u32 = 10000;
/// Number of SNAT source ports from SNAT_PORT_MIN on. Set at load.
#[unsafe(no_mangle)]
static SNAT_PORT_COUNT: u32 = 22768;
/// Slots of one Maglev table (a prime). Set at load.
#[unsafe(no_mangle)]
static MAGLEV_SIZE: u32 = DEFAULT_MAGLEV_SIZE;
/// Possible CPUs: each CPU walks its own interleaved sequence of SNAT ports. Set at load.
#[unsafe(no_mangle)]
static CPU_COUNT: u32 = 1;
/// Added to CLOCK_MONOTONIC_COARSE in milliseconds to make the TCP timestamp clock: the
/// realtime clock's milliseconds, which keep moving forward across reboots. Set at load.
#[unsafe(no_mangle)]
static TS_CLOCK_OFFSET_MS: u32 = 0;
/// conntrack state -> how long a connection in it lives without traffic. Set at load.
#[unsafe(no_mangle)]
static STATE_TIMEOUT_NS: [u64; STATE_SLOTS] = [0; STATE_SLOTS];

#[inline(always)]
pub fn host_netns_cookie() -> u64 {
    // SAFETY: as `setting`'s.
    unsafe { core::ptr::read_volatile(&HOST_NETNS_COOKIE) }
}

/// Reads a load-time setting. Volatile, or the compiler folds in the default above.
#[inline(always)]
fn setting(value: &'static u32) -> u32 {
    // SAFETY: a reference to a static is valid; the loader wrote it before the program ran.
    unsafe { core::ptr::read_volatile(value) }
}

#[inline(always)]
pub fn snat_port_min() -> u32 {
    setting(&SNAT_PORT_MIN)
}

#[inline(always)]
pub fn snat_port_count() -> u32 {
    setting(&SNAT_PORT_COUNT)
}

#[inline(always)]
pub fn maglev_size() -> u32 {
    setting(&MAGLEV_SIZE)
}

#[inline(always)]
pub fn cpu_count() -> u32 {
    setting(&CPU_COUNT)
}

#[inline(always)]
pub fn ts_clock_offset_ms() -> u32 {
    setting(&TS_CLOCK_OFFSET_MS)
}

/// How long a connection in `state` lives without traffic; 0 for a state it does not know.
#[inline(always)]
pub fn state_timeout(state: u32) -> u64 {
    match STATE_TIMEOUT_NS.get(state as usize) {
        // SAFETY: a reference into a static is valid; volatile, or the compiler folds in the
        // default above.
        Some(timeout) => unsafe { core::ptr::read_volatile(timeout) },
        None => 0,
    }
}

/// VIP -> 1: the inner destinations `lb decap` strips IPIP for (`decap.rs`, on a DSR backend).
/// Written by `lb decap`; the balancer's daemon does not use it.
#[map]
pub static DECAP_VIPS: HashMap<Be32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// DECAP_VIPS for IPv6 VIPs (IPv6 in IPv6, or in IPv6 and UDP).
#[map]
pub static DECAP_VIPS6: HashMap<In6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
