//! The kernel side of the daemon: loads the XDP object, attaches it, and is the only writer of
//! its maps. Everything here is a thin, checked wrapper over one map or one syscall; the
//! decisions (which backend, which weights) are made by the callers.

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, IterableMap as _, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, TestRun,
        TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Address, Backend, Backend6, BackendOf, BackendStats, Be16, Be32, DropReason,
    FLOW_PORT_RELEASED, FLOW_REVERSE, FlowCounts, FlowKey, FlowKey6, FlowValue, FlowValue6,
    HostPortKey, IFACE_VIA_STACK, IFACE_XDP_TX, Iface, In6, LAYOUT_VERSION, MAX_BACKENDS,
    MAX_SERVICES, PassReason, SNAT_POOL_MAX, SNAT_PORT_WORDS, SNAT_SUMMARY_WORDS, STAT_REDIRECT,
    STAT_TX, Service, Service6, ServiceKey, ServiceKey6, ServiceOf,
    conntrack::{
        STATE_SLOTS, STATES, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_SYN_RECV, TCP_SYN_SENT,
        UDP_REPLIED, UDP_UNREPLIED,
    },
    snat_ports::{PortMap, in_range, port_bit},
};

use crate::{map_batch, pins};

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
const PROGRAM: &str = "lb_xdp";
/// The tc hook for backends in containers on a bridge (lb-ebpf's `tc.rs`).
pub const TC_PROGRAM: &str = "lb_tc";
/// The socket hooks for clients on the host itself (lb-ebpf's `sock.rs`).
pub const HOST_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];
/// Arms the in-kernel expiry timer (lb-ebpf's expiry.rs); run once, never attached.
const EXPIRY_ARM_PROGRAM: &str = "lb_expiry_arm";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this lb was built with AYA_BUILD_SKIP=1 and has no XDP program; build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("cannot load the XDP program: {source} (lb needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("cannot load the XDP program into the kernel: {source}")]
    Program {
        #[source]
        source: ProgramError,
    },
    #[error(
        "the kernel refused to arm the flow-expiry timer (BPF timers need Linux 5.15 or later)"
    )]
    Expiry,
    #[error("BPF_PROG_TEST_RUN failed: {source}")]
    TestRun {
        #[source]
        source: ProgramError,
    },
    #[error("the XDP object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("the XDP object has no XDP program {name}")]
    MissingProgram { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: batch operation: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map TX_PORTS: {source}")]
    TxPorts {
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("no interface named {name:?} in this network namespace")]
    NoInterface { name: String },
    #[error("cannot attach XDP in native (driver) mode to {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("a service's SNAT pool is of another address family than its VIP")]
    SnatFamily,
    #[error("a flow's client is of another address family than its service's VIP")]
    ClientFamily,
    #[error("service id {id} is out of range (at most {MAX_SERVICES} services)")]
    ServiceId { id: u32 },
    #[error("a service's SNAT pool holds 1 to {SNAT_POOL_MAX} addresses, not {count}")]
    SnatPool { count: usize },
    #[error("backend id {id} is out of range (at most {MAX_BACKENDS} backends)")]
    BackendId { id: u32 },
    #[error("a Maglev table has {got} slots, the program was loaded for {want}")]
    TableSize { got: usize, want: u32 },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    #[error("cannot read the data path's logs: {0}")]
    Logger(String),
    #[error(
        "cannot adopt the state pinned in {dir}: {source}. Its maps differ from what this lb would create (flow capacity, Maglev table size, or a map layout changed by an upgrade). `lb remove --bpffs {dir}` removes it, which stops forwarding and drops every flow"
    )]
    Adopt {
        dir: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "cannot adopt the state pinned in {dir}: its maps have layout {found}, this lb's is {expected} (an upgrade changed a map's layout). `lb remove --bpffs {dir}` removes it, which stops forwarding and drops every flow"
    )]
    Layout {
        dir: String,
        found: u32,
        expected: u32,
    },
    #[error("{name}: pinning its link in {dir}: {message}")]
    PinLink {
        name: String,
        dir: String,
        message: String,
    },
    #[error("cgroup {path}: {message}")]
    Cgroup { path: String, message: String },
    #[error("bridge port {port}: attaching the tc program: {message}")]
    Tc { port: String, message: String },
}

/// Settings fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSettings {
    pub maglev_size: u32,
    pub flow_capacity: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub timeouts: FlowTimeouts,
}

/// How long a connection lives without traffic, per class of `conntrack` state. The data path
/// expires by them (lazily, as it meets flows) and so does the daemon's sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// Half-open (SYN sent, SYN-ACK seen), counted from the SYN.
    pub tcp_syn: Duration,
    /// Established.
    pub tcp_established: Duration,
    /// One direction sent a FIN; the other still sends.
    pub tcp_half_closed: Duration,
    /// Both FINs, time-wait, or an RST.
    pub tcp_closing: Duration,
    /// UDP, before the backend's first answer.
    pub udp_unreplied: Duration,
    /// UDP, after it.
    pub udp_replied: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(5),
            tcp_established: Duration::from_secs(300),
            tcp_half_closed: Duration::from_secs(120),
            tcp_closing: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_secs(30),
        }
    }
}

impl FlowTimeouts {
    /// The data path's STATE_TIMEOUT_NS: each state's timeout in nanoseconds.
    pub fn by_state(&self) -> [u64; STATE_SLOTS] {
        let mut table = [0u64; STATE_SLOTS];
        for (state, _) in STATES {
            let timeout = match state {
                TCP_SYN_SENT | TCP_SYN_RECV => self.tcp_syn,
                TCP_ESTABLISHED => self.tcp_established,
                TCP_FIN_WAIT => self.tcp_half_closed,
                UDP_UNREPLIED => self.udp_unreplied,
                UDP_REPLIED => self.udp_replied,
                _ => self.tcp_closing,
            };
            table[state as usize] = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        }
        table
    }
}

/// What one sweep of FLOWS found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowSweep {
    /// CLOCK_MONOTONIC when it began: it counts no connection that ended before.
    pub started_ns: u64,
    /// Entries in FLOWS before the sweep (both directions).
    pub entries: u64,
    /// backend id -> connections that have not ended (half-open ones included).
    pub active: StdHashMap<u32, u64>,
    /// backend id -> SNAT ports held (reply entries, closing ones included).
    pub ports: StdHashMap<u32, u64>,
}

/// Packets counted per reason, from STATS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReasonCounters {
    pub pass: Vec<(PassReason, u64)>,
    pub drop: Vec<(DropReason, u64)>,
    pub tx: u64,
    pub redirect: u64,
    /// Events counted besides verdicts (lb_common::EVENTS), by name.
    pub events: Vec<(&'static str, u64)>,
}

/// The reader of the data path's log records (aya-log), forwarding them to `log`.
pub type DataPathLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub struct Dataplane {
    ebpf: Ebpf,
    settings: LoadSettings,
    services: HashMap<MapData, ServiceKey, Service>,
    /// SERVICES' addresses (`sync_vips`).
    vips: HashMap<MapData, Be32, u32>,
    vips6: HashMap<MapData, In6, u32>,
    /// SERVICES' ports on host addresses (`sync_vips`).
    host_ports: HashMap<MapData, HostPortKey, Be32>,
    host_ports6: HashMap<MapData, HostPortKey, In6>,
    backends: Array<MapData, Backend>,
    services6: HashMap<MapData, ServiceKey6, Service6>,
    backends6: Array<MapData, Backend6>,
    maglev: Array<MapData, u32>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    flows6: HashMap<MapData, FlowKey6, FlowValue6>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    flow_counts: PerCpuArray<MapData, FlowCounts>,
    suspect: Array<MapData, u64>,
    ts_high: Array<MapData, u64>,
    snat_ports: Array<MapData, u64>,
    snat_full: Array<MapData, u64>,
    debug_log: Array<MapData, u32>,
    /// Reads the data path's aya-log records; taken by the daemon's log task.
    logger: Option<DataPathLogger>,
    stats: PerCpuArray<MapData, u64>,
    ifaces: HashMap<MapData, u32, Iface>,
    tx_ports: DevMapHash<MapData>,
    bridge_ports: HashMap<MapData, u32, u32>,
    /// service id -> which of its two tables (0 or 1) is live.
    live_table: StdHashMap<u32, u32>,
    /// What this daemon last wrote to each table half, by its first slot: the next table
    /// written there is written as a difference.
    staged_tables: StdHashMap<u32, Vec<u32>>,
    links: Vec<(String, XdpLinkId)>,
    /// Where maps and links are pinned: they outlive this process, and the next daemon adopts
    /// them. `None`: everything goes when this is dropped.
    pin_dir: Option<std::path::PathBuf>,
    /// Links pinned in `pin_dir`: dropping these closes our descriptors only.
    pinned_links: Vec<(String, FdLink)>,
    adopted: bool,
}

/// A service's key in SERVICES or SERVICES6, by its VIP's family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl VipKey {
    pub fn new(vip: SocketAddr, proto: u8) -> Self {
        match vip {
            SocketAddr::V4(v) => Self::V4(ServiceKey {
                vip: Be32::from_bytes(v.ip().octets()),
                port: Be16::from_host(v.port()),
                proto,
                _pad: 0,
            }),
            SocketAddr::V6(v) => Self::V6(ServiceKey6 {
                vip: In6::from_bytes(v.ip().octets()),
                port: Be16::from_host(v.port()),
                proto,
                _pad: 0,
            }),
        }
    }
}

impl From<ServiceKey> for VipKey {
    fn from(key: ServiceKey) -> Self {
        Self::V4(key)
    }
}

impl From<ServiceKey6> for VipKey {
    fn from(key: ServiceKey6) -> Self {
        Self::V6(key)
    }
}

/// A BACKENDS (BACKENDS6) entry.
fn backend_entry<A>(
    id: u32,
    addr: A,
    port: u16,
    healthy: bool,
) -> Result<BackendOf<A>, DataplaneError> {
    if id >= MAX_BACKENDS {
        return Err(DataplaneError::BackendId { id });
    }
    Ok(BackendOf {
        addr,
        port: Be16::from_host(port),
        _pad: 0,
        flags: if healthy {
            lb_common::BACKEND_HEALTHY
        } else {
            0
        },
    })
}

/// A service's source pool as its map holds it: every address of the VIP's family (`of`).
fn of_family<A>(
    snat: &[IpAddr],
    of: impl Fn(IpAddr) -> Option<A>,
) -> Result<Vec<A>, DataplaneError> {
    snat.iter()
        .map(|a| of(*a).ok_or(DataplaneError::SnatFamily))
        .collect()
}

/// Makes `map` hold exactly the entries of `want`.
fn sync_address_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    want: impl Iterator<Item = (K, V)>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let want: std::collections::BTreeMap<K, V> = want.collect();
    let have: Vec<(K, V)> = map.iter().filter_map(Result::ok).collect();
    for (key, _) in have.iter().filter(|(k, _)| !want.contains_key(k)) {
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(in_map(name)(source)),
        }
    }
    for (key, value) in &want {
        if !have.iter().any(|(k, v)| k == key && v == value) {
            map.insert(key, value, 0).map_err(in_map(name))?;
        }
    }
    Ok(())
}

fn in_map(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, DataplaneError> {
    let raw = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    convert(raw).map_err(in_map(name))
}

/// The layout version of the maps pinned in `dir`: LAYOUT's, or 1 for a build from before it
/// was pinned.
fn pinned_layout(dir: &Path) -> Result<u32, DataplaneError> {
    let path = dir.join("LAYOUT");
    if !path.exists() {
        return Ok(1);
    }
    let data = aya::maps::MapData::from_pin(&path).map_err(in_map("LAYOUT"))?;
    let layout: Array<_, u32> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(in_map("LAYOUT"))?;
    layout.get(&0, 0).map_err(in_map("LAYOUT"))
}

impl Dataplane {
    /// Loads the program and creates its maps; attaches nothing. Everything goes on drop.
    pub fn load(settings: LoadSettings) -> Result<Self, DataplaneError> {
        Self::load_in(settings, None)
    }

    /// Loads the program with its maps pinned in `dir` (on a bpf filesystem): maps pinned there
    /// by an earlier daemon are adopted with their flows and counters, missing ones are created
    /// and pinned. Links made by `attach` are pinned too, so forwarding outlives this process.
    pub fn load_pinned(settings: LoadSettings, dir: &Path) -> Result<Self, DataplaneError> {
        pins::prepare(dir)?;
        Self::load_in(settings, Some(dir))
    }

    /// Whether `load_pinned` found an earlier daemon's maps.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn load_in(settings: LoadSettings, pin_dir: Option<&Path>) -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let cpus = possible_cpus()? as u32;
        let port_min = u32::from(settings.snat_port_min);
        let port_count = u32::from(settings.snat_port_max) - port_min + 1;
        let state_timeouts = settings.timeouts.by_state();
        let ts_clock_offset = ts_clock_offset_ms();
        // Without it (a kernel before 5.14) the socket hooks act nowhere.
        let netns_cookie = crate::host::netns_cookie().unwrap_or(0);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("SNAT_PORT_MIN", &port_min, true)
            .override_global("SNAT_PORT_COUNT", &port_count, true)
            .override_global("MAGLEV_SIZE", &settings.maglev_size, true)
            .override_global("CPU_COUNT", &cpus, true)
            .override_global("STATE_TIMEOUT_NS", &state_timeouts, true)
            .override_global("TS_CLOCK_OFFSET_MS", &ts_clock_offset, true)
            .override_global("HOST_NETNS_COOKIE", &netns_cookie, true)
            .map_max_entries("MAGLEV", MAX_SERVICES * 2 * settings.maglev_size)
            .map_max_entries("FLOWS", settings.flow_capacity)
            .map_max_entries("FLOWS6", settings.flow_capacity);
        let adopted = pin_dir.is_some_and(|dir| dir.join("FLOWS").exists());
        // An upgrade from a build without FLOW_COUNTS adopts flows it never counted opened,
        // and from one without SNAT_PORTS, flows holding ports its bitmaps do not show.
        let counts_fresh = !pin_dir.is_some_and(|dir| dir.join("FLOW_COUNTS").exists());
        let ports_fresh = !pin_dir.is_some_and(|dir| dir.join("SNAT_PORTS").exists());
        if let Some(dir) = pin_dir {
            if adopted {
                let found = pinned_layout(dir)?;
                if found != LAYOUT_VERSION {
                    return Err(DataplaneError::Layout {
                        dir: dir.display().to_string(),
                        found,
                        expected: LAYOUT_VERSION,
                    });
                }
            }
            for name in pins::MAP_NAMES {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| match pin_dir {
            Some(dir) if adopted => DataplaneError::Adopt {
                dir: dir.display().to_string(),
                source: Box::new(source),
            },
            _ => DataplaneError::Load { source },
        })?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { name: PROGRAM })?;
        program
            .load()
            .map_err(|source| DataplaneError::Program { source })?;
        let arm: &mut Xdp = ebpf
            .program_mut(EXPIRY_ARM_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram {
                name: EXPIRY_ARM_PROGRAM,
            })?;
        arm.load()
            .map_err(|source| DataplaneError::Program { source })?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { name: TC_PROGRAM })?;
        tc.load()
            .map_err(|source| DataplaneError::Program { source })?;
        for name in HOST_PROGRAMS {
            let hook: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DataplaneError::MissingProgram { name })?;
            hook.load()
                .map_err(|source| DataplaneError::Program { source })?;
        }
        let mut dataplane = Self {
            services: map(&mut ebpf, "SERVICES", HashMap::try_from)?,
            vips: map(&mut ebpf, "VIPS", HashMap::try_from)?,
            vips6: map(&mut ebpf, "VIPS6", HashMap::try_from)?,
            host_ports: map(&mut ebpf, "HOST_PORTS", HashMap::try_from)?,
            host_ports6: map(&mut ebpf, "HOST_PORTS6", HashMap::try_from)?,
            backends: map(&mut ebpf, "BACKENDS", Array::try_from)?,
            services6: map(&mut ebpf, "SERVICES6", HashMap::try_from)?,
            backends6: map(&mut ebpf, "BACKENDS6", Array::try_from)?,
            maglev: map(&mut ebpf, "MAGLEV", Array::try_from)?,
            flows: map(&mut ebpf, "FLOWS", HashMap::try_from)?,
            flows6: map(&mut ebpf, "FLOWS6", HashMap::try_from)?,
            backend_stats: map(&mut ebpf, "BACKEND_STATS", PerCpuArray::try_from)?,
            flow_counts: map(&mut ebpf, "FLOW_COUNTS", PerCpuArray::try_from)?,
            suspect: map(&mut ebpf, "SUSPECT", Array::try_from)?,
            ts_high: map(&mut ebpf, "TS_HIGH", Array::try_from)?,
            snat_ports: map(&mut ebpf, "SNAT_PORTS", Array::try_from)?,
            snat_full: map(&mut ebpf, "SNAT_FULL", Array::try_from)?,
            debug_log: map(&mut ebpf, "DEBUG_LOG", Array::try_from)?,
            logger: Some(
                aya_log::EbpfLogger::init(&mut ebpf)
                    .map_err(|e| DataplaneError::Logger(e.to_string()))?,
            ),
            stats: map(&mut ebpf, "STATS", PerCpuArray::try_from)?,
            ifaces: map(&mut ebpf, "IFACES", HashMap::try_from)?,
            tx_ports: map(&mut ebpf, "TX_PORTS", DevMapHash::try_from)?,
            bridge_ports: map(&mut ebpf, "BRIDGE_PORTS", HashMap::try_from)?,
            ebpf,
            settings,
            live_table: StdHashMap::new(),
            staged_tables: StdHashMap::new(),
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            pinned_links: Vec::new(),
            adopted,
        };
        if adopted && counts_fresh {
            // Before this program is attached, so no data path writes FLOW_COUNTS meanwhile.
            dataplane.seed_flow_counts()?;
        }
        if adopted && ports_fresh {
            dataplane.seed_snat_ports()?;
        }
        // An adopted SERVICES from a build without VIPS, or VIPS from one that kept it apart.
        dataplane.sync_vips()?;
        let mut layout: Array<_, u32> = map(&mut dataplane.ebpf, "LAYOUT", Array::try_from)?;
        layout
            .set(0, &LAYOUT_VERSION, 0)
            .map_err(in_map("LAYOUT"))?;
        Ok(dataplane)
    }

    /// Marks the ports the adopted table's reply entries hold in the SNAT port bitmaps.
    fn seed_snat_ports(&mut self) -> Result<(), DataplaneError> {
        for (key, value) in self.flow_entries()? {
            if value.flags & (FLOW_REVERSE | FLOW_PORT_RELEASED) == FLOW_REVERSE {
                self.mark_snat_port(
                    value.backend_id,
                    u32::from(value.snat_index),
                    key.dst_port.to_host(),
                )?;
            }
        }
        Ok(())
    }

    /// Marks `port` held by a connection of backend `id` on the `snat_index`th address of its
    /// service's SNAT pool in the port bitmaps (lb-common's `snat_ports`), as the data path
    /// does when it takes one: for adopting a table, and for fixtures that start from one.
    pub fn mark_snat_port(
        &mut self,
        id: u32,
        snat_index: u32,
        port: u16,
    ) -> Result<(), DataplaneError> {
        if snat_index >= SNAT_POOL_MAX {
            // An entry of a pool address the data path cannot have given.
            return Ok(());
        }
        let ports = PortMap::of(id, snat_index);
        let index = ports.word_index(port);
        let bits = self
            .snat_ports
            .get(&index, 0)
            .map_err(in_map("SNAT_PORTS"))?
            | port_bit(port);
        self.snat_ports
            .set(index, &bits, 0)
            .map_err(in_map("SNAT_PORTS"))?;
        let (first, last) = (
            u32::from(self.settings.snat_port_min),
            u32::from(self.settings.snat_port_max),
        );
        let word = u32::from(port) / 64;
        let valid = in_range(word, first, last);
        if valid != 0 && bits & valid == valid {
            let summary = ports.summary_index(word);
            let full = self
                .snat_full
                .get(&summary, 0)
                .map_err(in_map("SNAT_FULL"))?;
            self.snat_full
                .set(summary, &(full | 1 << (word % 64)), 0)
                .map_err(in_map("SNAT_FULL"))?;
        }
        Ok(())
    }

    /// Clears backend `id`'s SNAT port bitmaps: none of its entries is left (cut), or the id is
    /// given to a new backend.
    pub fn clear_snat_ports(&mut self, id: u32) -> Result<(), DataplaneError> {
        // One batch each for the words and the summaries of every pool address.
        let maps: Vec<u32> = (0..SNAT_POOL_MAX).map(|i| PortMap::of(id, i).0).collect();
        for (map, name, words) in [
            (&self.snat_ports, "SNAT_PORTS", SNAT_PORT_WORDS),
            (&self.snat_full, "SNAT_FULL", SNAT_SUMMARY_WORDS),
        ] {
            let keys: Vec<u32> = maps
                .iter()
                .flat_map(|m| m * words..(m + 1) * words)
                .collect();
            let zeros = vec![0u64; keys.len()];
            map_batch::update(map.map().fd().as_fd(), &keys, &zeros, 0)
                .map_err(|source| DataplaneError::Batch { name, source })?;
        }
        Ok(())
    }

    /// Counts the adopted table's connections as opened, per backend (their ends and releases
    /// the data path counts as they come).
    fn seed_flow_counts(&mut self) -> Result<(), DataplaneError> {
        let mut opened: StdHashMap<u32, u64> = StdHashMap::new();
        for (_, value) in self.flow_entries()? {
            if value.flags & FLOW_REVERSE == 0 {
                *opened.entry(value.backend_id).or_default() += 1;
            }
        }
        for (id, opened) in opened {
            self.set_flow_counts(
                id,
                FlowCounts {
                    opened,
                    ..FlowCounts::default()
                },
            )?;
        }
        Ok(())
    }

    /// A backend's connection counts, summed over CPUs.
    pub fn flow_counts(&self, id: u32) -> Result<FlowCounts, DataplaneError> {
        let per_cpu = self
            .flow_counts
            .get(&id, 0)
            .map_err(in_map("FLOW_COUNTS"))?;
        Ok(per_cpu.iter().fold(FlowCounts::default(), |mut sum, c| {
            sum.add(c);
            sum
        }))
    }

    /// Zeroes a backend's connection counts: its connections were all removed (cut), so no
    /// data path will count one of them again.
    pub fn reset_flow_counts(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.set_flow_counts(id, FlowCounts::default())
    }

    /// Sets a backend's counts: `counts` on the first CPU, zero on the others.
    fn set_flow_counts(&mut self, id: u32, counts: FlowCounts) -> Result<(), DataplaneError> {
        let mut values = vec![FlowCounts::default(); possible_cpus()?];
        values[0] = counts;
        let values = aya::maps::PerCpuValues::try_from(values)
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        self.flow_counts
            .set(id, values, 0)
            .map_err(in_map("FLOW_COUNTS"))
    }

    /// Each backend's open connections and the SNAT ports they hold, from FLOW_COUNTS: a read
    /// per backend, whatever the size of the flow table.
    pub fn count_flows(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<FlowSweep, DataplaneError> {
        let mut sweep = FlowSweep {
            started_ns: monotonic_ns(),
            ..FlowSweep::default()
        };
        for id in ids {
            let counts = self.flow_counts(id)?;
            sweep.active.insert(id, counts.open());
            sweep.ports.insert(id, counts.holding_ports());
            sweep.entries += 2 * counts.holding_ports();
        }
        Ok(sweep)
    }

    pub fn settings(&self) -> LoadSettings {
        self.settings
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked that the program exists and is XDP")
    }

    /// Attaches in native mode and makes the interface a forwarding target. Returns its ifindex.
    /// Pinned: a link an earlier daemon pinned for this interface is taken over, its program
    /// replaced in one step (no packet meets no program); otherwise a new link is pinned.
    pub fn attach(&mut self, name: &str) -> Result<u32, DataplaneError> {
        let ifindex = ifindex(name)?;
        self.add_interface(ifindex, is_physical(name))?;
        let attach_error = |source| DataplaneError::Attach {
            name: name.to_owned(),
            source,
        };
        let Some(dir) = self.pin_dir.clone() else {
            let link = self
                .program()
                .attach(ifindex, XdpMode::Driver)
                .map_err(attach_error)?;
            self.links.push((name.to_owned(), link));
            return Ok(ifindex);
        };
        let pin_error = |message: String| DataplaneError::PinLink {
            name: name.to_owned(),
            dir: dir.display().to_string(),
            message,
        };
        let path = pins::link_path(&dir, name);
        let link = match self.take_over(&path) {
            Ok(Some(link)) => link,
            Ok(None) => {
                let id = self
                    .program()
                    .attach(ifindex, XdpMode::Driver)
                    .map_err(attach_error)?;
                let link = self.program().take_link(id).map_err(attach_error)?;
                let fd = FdLink::try_from(link).map_err(|e| {
                    pin_error(format!("the kernel made a netlink XDP attachment ({e}); pinning needs a BPF link (Linux 5.9 or later)"))
                })?;
                let pinned = fd.pin(&path).map_err(|e| pin_error(e.to_string()))?;
                FdLink::from(pinned)
            }
            Err(e) => {
                // A link whose device went away (deleted and re-created) cannot be updated:
                // attach afresh.
                log::warn!(
                    "interface {name}: the pinned link cannot be taken over ({e}); attaching anew"
                );
                let _ = std::fs::remove_file(&path);
                return self.attach(name);
            }
        };
        self.pinned_links.push((name.to_owned(), link));
        Ok(ifindex)
    }

    /// Replaces the program of the link pinned at `path`, if there is one.
    fn take_over(&mut self, path: &Path) -> Result<Option<FdLink>, String> {
        if !path.exists() {
            return Ok(None);
        }
        let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
        let id = self
            .program()
            .attach_to_link(link)
            .map_err(|e| e.to_string())?;
        let link = self.program().take_link(id).map_err(|e| e.to_string())?;
        FdLink::try_from(link).map(Some).map_err(|e| e.to_string())
    }

    /// Forgets forwarding targets other than `keep` (ifindexes): an adopted IFACES may hold
    /// interfaces the config no longer has, which the program would still redirect through.
    pub fn retain_interfaces(&mut self, keep: &[u32]) -> Result<(), DataplaneError> {
        let stale: Vec<u32> = self
            .ifaces
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !keep.contains(i))
            .collect();
        for ifindex in stale {
            self.ifaces.remove(&ifindex).map_err(in_map("IFACES"))?;
            let _ = self.tx_ports.remove(ifindex);
        }
        Ok(())
    }

    /// Unpins the links of pinned interfaces not in `keep`, which detaches the program there.
    pub fn detach_others(&mut self, keep: &[String]) -> Result<Vec<String>, DataplaneError> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(Vec::new());
        };
        Ok(pins::remove_links_except(&dir, keep)?)
    }

    /// Makes `ifindex` a device the program forwards through; `xdp_tx`: hairpin with XDP_TX.
    pub fn add_interface(&mut self, ifindex: u32, xdp_tx: bool) -> Result<(), DataplaneError> {
        let flags = if xdp_tx { IFACE_XDP_TX } else { 0 };
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DataplaneError::TxPorts { source })?;
        self.ifaces
            .insert(&ifindex, &Iface { flags }, 0)
            .map_err(in_map("IFACES"))
    }

    /// Makes `ifindex`, a bridge of containers, a next hop the program caches in flows while
    /// the kernel forwards into it.
    pub fn add_bridge(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.ifaces
            .insert(
                &ifindex,
                &Iface {
                    flags: IFACE_VIA_STACK,
                },
                0,
            )
            .map_err(in_map("IFACES"))
    }

    /// Makes BRIDGE_PORTS say exactly `ports`: (a port's ifindex, its bridge's).
    pub fn set_bridge_ports(&mut self, ports: &[(u32, u32)]) -> Result<(), DataplaneError> {
        let stale: Vec<u32> = self
            .bridge_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !ports.iter().any(|(port, _)| port == p))
            .collect();
        for port in stale {
            self.bridge_ports
                .remove(&port)
                .map_err(in_map("BRIDGE_PORTS"))?;
        }
        for (port, bridge) in ports {
            if self.bridge_ports.get(port, 0).ok() != Some(*bridge) {
                self.bridge_ports
                    .insert(port, bridge, 0)
                    .map_err(in_map("BRIDGE_PORTS"))?;
            }
        }
        Ok(())
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) -> Vec<(String, Result<(), DataplaneError>)> {
        let links = std::mem::take(&mut self.links);
        links
            .into_iter()
            .map(|(name, link)| {
                let result = self
                    .program()
                    .detach(link)
                    .map_err(|source| DataplaneError::Attach {
                        name: name.clone(),
                        source,
                    });
                (name, result)
            })
            .collect()
    }

    /// Writes backend `id` into its family's map, BACKENDS or BACKENDS6 (one id space), and
    /// clears the id in the other: an id a freed backend of the other family held takes no
    /// traffic there.
    pub fn set_backend(
        &mut self,
        id: u32,
        addr: impl Into<SocketAddr>,
        healthy: bool,
    ) -> Result<(), DataplaneError> {
        let addr = addr.into();
        let v4 = match addr {
            SocketAddr::V4(a) => {
                backend_entry(id, Be32::from_bytes(a.ip().octets()), a.port(), healthy)?
            }
            SocketAddr::V6(_) => backend_entry(id, Be32::default(), 0, false)?,
        };
        let v6 = match addr {
            SocketAddr::V6(a) => {
                backend_entry(id, In6::from_bytes(a.ip().octets()), a.port(), healthy)?
            }
            SocketAddr::V4(_) => backend_entry(id, In6::default(), 0, false)?,
        };
        // The family's entry last: a stale one in the other map is down before this is up.
        let (write_v4, write_v6) = (
            |me: &mut Self| me.backends.set(id, &v4, 0).map_err(in_map("BACKENDS")),
            |me: &mut Self| me.backends6.set(id, &v6, 0).map_err(in_map("BACKENDS6")),
        );
        if addr.is_ipv4() {
            write_v6(self)?;
            write_v4(self)
        } else {
            write_v4(self)?;
            write_v6(self)
        }
    }

    /// Publishes a service with a new Maglev table: the table goes into the service's staging
    /// half of MAGLEV first, then one SERVICES update flips the service to it, so the data
    /// path never sees a half-written table.
    /// An IPv4 service goes to SERVICES, an IPv6 one to SERVICES6 (one id space and MAGLEV);
    /// `snat` must be of the key's family.
    pub fn set_service(
        &mut self,
        id: u32,
        key: impl Into<VipKey>,
        mode: u8,
        snat: &[IpAddr],
        mss: Option<u16>,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        let staging = match key.into() {
            VipKey::V4(key) => {
                let snat = of_family(snat, |a| match a {
                    IpAddr::V4(a) => Some(Be32::from_bytes(a.octets())),
                    IpAddr::V6(_) => None,
                })?;
                let (staging, service) = self.stage_service(id, mode, &snat, mss, table)?;
                self.services
                    .insert(&key, &service, 0)
                    .map_err(in_map("SERVICES"))?;
                staging
            }
            VipKey::V6(key) => {
                let snat = of_family(snat, |a| match a {
                    IpAddr::V6(a) => Some(In6::from_bytes(a.octets())),
                    IpAddr::V4(_) => None,
                })?;
                let (staging, service) = self.stage_service(id, mode, &snat, mss, table)?;
                self.services6
                    .insert(&key, &service, 0)
                    .map_err(in_map("SERVICES6"))?;
                staging
            }
        };
        self.live_table.insert(id, staging);
        self.sync_vips()
    }

    /// Writes a service's new Maglev table into its staging half of MAGLEV, and returns the
    /// half and the service value that flips to it once written to SERVICES (SERVICES6).
    fn stage_service<A: Address>(
        &mut self,
        id: u32,
        mode: u8,
        snat: &[A],
        mss: Option<u16>,
        table: &[u32],
    ) -> Result<(u32, ServiceOf<A>), DataplaneError> {
        let snat_needed =
            mode == lb_common::SERVICE_MODE_NAT || mode == lb_common::SERVICE_MODE_DSR_IPIP;
        if (snat_needed && snat.is_empty()) || snat.len() > SNAT_POOL_MAX as usize {
            return Err(DataplaneError::SnatPool { count: snat.len() });
        }
        if id >= MAX_SERVICES {
            return Err(DataplaneError::ServiceId { id });
        }
        let size = self.settings.maglev_size;
        if table.len() != size as usize {
            return Err(DataplaneError::TableSize {
                got: table.len(),
                want: size,
            });
        }
        // The staging half is one no service serves from: after adoption, the live half is
        // the one SERVICES points at, whichever service (and id) it was published for.
        let serving: Vec<u32> = self
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(_, s)| s.maglev_base)
            .chain(
                self.services6
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(_, s)| s.maglev_base),
            )
            .collect();
        let base_of = |half: u32| (id * 2 + half) * size;
        let staging = match self.live_table.get(&id) {
            Some(0) => 1,
            Some(_) => 0,
            None if serving.contains(&base_of(0)) => 1,
            None => 0,
        };
        let base = base_of(staging);
        // One batched write of the slots that differ from what the half holds: a weight
        // change moves few slots, and a table is up to 131k of them.
        let changed =
            crate::maglev::changed_slots(self.staged_tables.remove(&base).as_deref(), table);
        let slots: Vec<u32> = changed.iter().map(|&i| base + i).collect();
        let ids: Vec<u32> = changed.iter().map(|&i| table[i as usize]).collect();
        map_batch::update(self.maglev.map().fd().as_fd(), &slots, &ids, 0).map_err(|source| {
            DataplaneError::Batch {
                name: "MAGLEV",
                source,
            }
        })?;
        self.staged_tables.insert(base, table.to_vec());
        let mut snat_addrs = [A::default(); SNAT_POOL_MAX as usize];
        for (slot, addr) in snat_addrs.iter_mut().zip(snat) {
            *slot = *addr;
        }
        let service = ServiceOf {
            maglev_base: base,
            snat_count: snat.len() as u8,
            mode,
            mss: mss.unwrap_or(0),
            snat_addrs,
        };
        Ok((staging, service))
    }

    /// Removes every service but `keep` from SERVICES (an adopted table may hold services the
    /// config no longer has). Returns how many went.
    pub fn retain_services(&mut self, keep: &[VipKey]) -> Result<usize, DataplaneError> {
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&VipKey::V4(*k)))
            .collect();
        for key in &stale {
            self.services.remove(key).map_err(in_map("SERVICES"))?;
        }
        let stale6: Vec<ServiceKey6> = self
            .services6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&VipKey::V6(*k)))
            .collect();
        for key in &stale6 {
            self.services6.remove(key).map_err(in_map("SERVICES6"))?;
        }
        self.sync_vips()?;
        Ok(stale.len() + stale6.len())
    }

    /// What BACKENDS or BACKENDS6 holds for `id` (whichever has an address): its address and
    /// whether it is marked healthy.
    pub fn backend_entry(&self, id: u32) -> Option<(SocketAddr, bool)> {
        let b = self.backends.get(&id, 0).ok()?;
        if b.addr != Be32::default() || b.flags != 0 {
            let addr = SocketAddr::new(Ipv4Addr::from(b.addr.to_bytes()).into(), b.port.to_host());
            return Some((addr, b.flags & lb_common::BACKEND_HEALTHY != 0));
        }
        let b6 = self.backends6.get(&id, 0).ok()?;
        if b6.addr == In6::default() && b6.flags == 0 {
            let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), b.port.to_host());
            return Some((addr, false));
        }
        let addr = SocketAddr::new(Ipv6Addr::from(b6.addr.to_bytes()).into(), b6.port.to_host());
        Some((addr, b6.flags & lb_common::BACKEND_HEALTHY != 0))
    }

    /// The services the (adopted) maps serve, each with the backends its live table holds:
    /// what the ids were when no saved state says (`layout::previous_from_adopted`). Reads
    /// every slot of every live table: paid only at a start without the saved state.
    pub fn adopted_services(&self) -> Result<Vec<crate::layout::AdoptedService>, DataplaneError> {
        let mut found = Vec::new();
        for entry in self.services.iter() {
            let (key, svc) = entry.map_err(in_map("SERVICES"))?;
            let vip = SocketAddr::new(
                Ipv4Addr::from(key.vip.to_bytes()).into(),
                key.port.to_host(),
            );
            found.extend(self.adopted_service(vip, key.proto, svc.maglev_base)?);
        }
        for entry in self.services6.iter() {
            let (key, svc) = entry.map_err(in_map("SERVICES6"))?;
            let vip = SocketAddr::new(
                Ipv6Addr::from(key.vip.to_bytes()).into(),
                key.port.to_host(),
            );
            found.extend(self.adopted_service(vip, key.proto, svc.maglev_base)?);
        }
        Ok(found)
    }

    fn adopted_service(
        &self,
        vip: SocketAddr,
        proto: u8,
        maglev_base: u32,
    ) -> Result<Option<crate::layout::AdoptedService>, DataplaneError> {
        let size = self.settings.maglev_size;
        let protocol = match proto {
            6 => crate::config::Protocol::Tcp,
            17 => crate::config::Protocol::Udp,
            _ => return Ok(None),
        };
        let mut ids: Vec<u32> = Vec::new();
        for slot in maglev_base..maglev_base.saturating_add(size) {
            let id = self.maglev.get(&slot, 0).map_err(in_map("MAGLEV"))?;
            if id != lb_common::NO_BACKEND && !ids.contains(&id) {
                ids.push(id);
            }
        }
        let backends = ids
            .into_iter()
            .filter_map(|id| Some((id, self.backend_entry(id)?.0)))
            .collect();
        Ok(Some(crate::layout::AdoptedService {
            vip,
            protocol,
            id: maglev_base / (2 * size),
            backends,
        }))
    }

    /// Marks every backend id but `keep` as not taking traffic: flows an earlier daemon left to
    /// a backend that is gone now move on their next packet.
    pub fn clear_backends_except(&mut self, keep: &[u32]) -> Result<(), DataplaneError> {
        for id in (0..MAX_BACKENDS).filter(|id| !keep.contains(id)) {
            let b = self.backends.get(&id, 0).map_err(in_map("BACKENDS"))?;
            if b.flags != 0 {
                self.backends
                    .set(id, &Backend { flags: 0, ..b }, 0)
                    .map_err(in_map("BACKENDS"))?;
            }
            let b6 = self.backends6.get(&id, 0).map_err(in_map("BACKENDS6"))?;
            if b6.flags != 0 {
                self.backends6
                    .set(id, &Backend6 { flags: 0, ..b6 }, 0)
                    .map_err(in_map("BACKENDS6"))?;
            }
        }
        Ok(())
    }

    pub fn remove_service(&mut self, id: u32, key: VipKey) -> Result<(), DataplaneError> {
        self.live_table.remove(&id);
        let removed = match key {
            VipKey::V4(key) => self.services.remove(&key).map_err(|e| ("SERVICES", e)),
            VipKey::V6(key) => self.services6.remove(&key).map_err(|e| ("SERVICES6", e)),
        };
        match removed {
            Ok(()) | Err((_, MapError::KeyNotFound)) => {}
            Err((name, source)) => return Err(in_map(name)(source)),
        }
        self.sync_vips()
    }

    /// Makes VIPS (VIPS6) hold the addresses of SERVICES' (SERVICES6') keys, and no other: the
    /// data path answers pings to these (at most MAX_SERVICES, so reading the maps whole is
    /// cheap).
    fn sync_vips(&mut self) -> Result<(), DataplaneError> {
        let want = self
            .services
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.vip, 1));
        sync_address_map(&mut self.vips, want, "VIPS")?;
        let want6 = self
            .services6
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.vip, 1));
        sync_address_map(&mut self.vips6, want6, "VIPS6")?;
        self.sync_host_ports()
    }

    /// Makes HOST_PORTS (HOST_PORTS6) hold the ports of services whose VIP is a host address.
    fn sync_host_ports(&mut self) -> Result<(), DataplaneError> {
        let on_host = |vip: IpAddr| crate::host::is_host_address(vip);
        let want = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| on_host(Ipv4Addr::from(k.vip.to_bytes()).into()))
            .map(|k| (HostPortKey::of(k.port, k.proto), k.vip));
        sync_address_map(&mut self.host_ports, want, "HOST_PORTS")?;
        let want6 = self
            .services6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| on_host(Ipv6Addr::from(k.vip.to_bytes()).into()))
            .map(|k| (HostPortKey::of(k.port, k.proto), k.vip));
        sync_address_map(&mut self.host_ports6, want6, "HOST_PORTS6")
    }

    /// Attaches the tc program at the ingress of `port` (a bridge's port: a container's veth),
    /// pinned as `tc_<port>` in place of an earlier daemon's link (which then detaches).
    pub fn attach_tc(&mut self, port: &str) -> Result<u32, DataplaneError> {
        let index = ifindex(port)?;
        let attach_error = |e: ProgramError| DataplaneError::Tc {
            port: port.to_owned(),
            message: e.to_string(),
        };
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { name: TC_PROGRAM })?;
        let id = program
            .attach(index, TcAttachType::Ingress)
            .map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        let link = FdLink::try_from(link).map_err(|e| DataplaneError::Tc {
            port: port.to_owned(),
            message: format!("not a tcx link ({e}); container ports need Linux 6.6 or later"),
        })?;
        self.keep_link(port, link, pins::tc_link_path)?;
        Ok(index)
    }

    /// Keeps `link` for as long as lb runs: pinned (by `path_of` the pin directory) in place
    /// of an earlier daemon's, whose link then detaches, or held by this process.
    fn keep_link(
        &mut self,
        name: &str,
        link: FdLink,
        path_of: fn(&Path, &str) -> std::path::PathBuf,
    ) -> Result<(), DataplaneError> {
        let Some(pins) = self.pin_dir.clone() else {
            self.pinned_links.push((name.to_owned(), link));
            return Ok(());
        };
        let pin_error = |message: String| DataplaneError::PinLink {
            name: name.to_owned(),
            dir: pins.display().to_string(),
            message,
        };
        let path = path_of(&pins, name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(pin_error(e.to_string()));
            }
            _ => {}
        }
        let pinned = link.pin(&path).map_err(|e| pin_error(e.to_string()))?;
        self.pinned_links
            .push((name.to_owned(), FdLink::from(pinned)));
        Ok(())
    }

    /// Forgets the tc link of `port` (gone with its device, or no longer a port).
    pub fn forget_tc(&mut self, port: &str) {
        self.pinned_links.retain(|(name, _)| name != port);
        if let Some(pins) = &self.pin_dir {
            let _ = std::fs::remove_file(pins::tc_link_path(pins, port));
        }
    }

    /// Attaches the socket hooks to the cgroup v2 directory `cgroup`, so that its processes'
    /// connections to a VIP are balanced. Pinned like the XDP links: the new links are pinned
    /// in place of an earlier daemon's, which then detach (for a moment both run; the second
    /// finds no VIP left to balance).
    pub fn attach_host(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let attach_error = |e: ProgramError| DataplaneError::Cgroup {
            path: cgroup.display().to_string(),
            message: format!("attaching the socket hooks: {e}"),
        };
        let dir = std::fs::File::open(cgroup).map_err(|e| DataplaneError::Cgroup {
            path: cgroup.display().to_string(),
            message: e.to_string(),
        })?;
        for name in HOST_PROGRAMS {
            let hook: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DataplaneError::MissingProgram { name })?;
            let id = hook
                // A cgroup link runs beside others whatever the mode; the kernel wants none.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link = hook.take_link(id).map_err(attach_error)?;
            let link = FdLink::try_from(link).map_err(|e| DataplaneError::Cgroup {
                path: cgroup.display().to_string(),
                message: format!("not a BPF link ({e}); socket hooks need Linux 5.7 or later"),
            })?;
            self.keep_link(name, link, pins::host_link_path)?;
        }
        Ok(())
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, DataplaneError> {
        let per_cpu = self
            .backend_stats
            .get(&id, 0)
            .map_err(in_map("BACKEND_STATS"))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |sum, s| BackendStats {
                packets: sum.packets + s.packets,
                bytes: sum.bytes + s.bytes,
                new_flows: sum.new_flows + s.new_flows,
            }))
    }

    /// Clears a backend's counters (its id is being given to another backend).
    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let zero =
            aya::maps::PerCpuValues::try_from(vec![BackendStats::default(); possible_cpus()?])
                .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(in_map("BACKEND_STATS"))
    }

    fn stat(&self, slot: u32) -> Result<u64, DataplaneError> {
        let per_cpu = self.stats.get(&slot, 0).map_err(in_map("STATS"))?;
        Ok(per_cpu.iter().sum())
    }

    pub fn reason_counters(&self) -> Result<ReasonCounters, DataplaneError> {
        Ok(ReasonCounters {
            pass: PassReason::ALL
                .iter()
                .map(|r| Ok((*r, self.stat(r.stat_slot())?)))
                .collect::<Result<_, DataplaneError>>()?,
            drop: DropReason::ALL
                .iter()
                .map(|r| Ok((*r, self.stat(r.stat_slot())?)))
                .collect::<Result<_, DataplaneError>>()?,
            tx: self.stat(STAT_TX)?,
            redirect: self.stat(STAT_REDIRECT)?,
            events: lb_common::EVENTS
                .iter()
                .map(|&(slot, name)| Ok((name, self.stat(slot)?)))
                .collect::<Result<_, DataplaneError>>()?,
        })
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    pub fn flow6(&self, key: &FlowKey6) -> Option<FlowValue6> {
        self.flows6.get(key, 0).ok()
    }

    /// `count` slots of the live Maglev table of the service at `key`, from `slot` on (wrapping
    /// around): what the data path reads for a new flow. Empty if no service is at `key`.
    pub fn live_slots(
        &self,
        key: &VipKey,
        slot: u32,
        count: u32,
    ) -> Result<Vec<u32>, DataplaneError> {
        let base = match key {
            VipKey::V4(key) => self.services.get(key, 0).map(|s| s.maglev_base),
            VipKey::V6(key) => self.services6.get(key, 0).map(|s| s.maglev_base),
        };
        let Ok(base) = base else {
            return Ok(Vec::new());
        };
        let size = self.settings.maglev_size;
        (0..count)
            .map(|step| {
                let index = base + (slot + step) % size;
                self.maglev.get(&index, 0).map_err(in_map("MAGLEV"))
            })
            .collect()
    }

    /// The data path's log reader, for a task that waits on its descriptor (once).
    pub fn take_logger(&mut self) -> Option<DataPathLogger> {
        self.logger.take()
    }

    /// Switches the data path's debug logs on or off.
    pub fn set_debug_log(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.debug_log
            .set(0, &u32::from(on), 0)
            .map_err(in_map("DEBUG_LOG"))
    }

    pub fn debug_log(&self) -> bool {
        self.debug_log.get(&0, 0).is_ok_and(|v| v != 0)
    }

    /// When the data path marked backend `id` suspect (CLOCK_MONOTONIC ns), if it has.
    pub fn suspect_since(&self, id: u32) -> Result<Option<u64>, DataplaneError> {
        let since = self.suspect.get(&id, 0).map_err(in_map("SUSPECT"))?;
        Ok((since != 0).then_some(since))
    }

    /// When the data path marked backend `id` suspect, if the mark is still live at `now_ns`
    /// (CLOCK_MONOTONIC): the data path steers off it for SUSPECT_HOLD_NS.
    pub fn live_suspect_mark(&self, id: u32, now_ns: u64) -> Option<u64> {
        self.suspect_since(id)
            .ok()
            .flatten()
            .filter(|&since| now_ns.saturating_sub(since) < lb_common::SUSPECT_HOLD_NS)
    }

    /// Clears backend `id`'s suspect mark: new flows may go to it again.
    pub fn clear_suspect(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.set_suspect(id, 0)
    }

    /// Marks backend `id` suspect since `since` (CLOCK_MONOTONIC ns; 0 clears it).
    pub fn set_suspect(&mut self, id: u32, since: u64) -> Result<(), DataplaneError> {
        self.suspect.set(id, &since, 0).map_err(in_map("SUSPECT"))
    }

    /// The highest TCP timestamp the data path has sent a backend (lb-common's `timestamps`).
    pub fn ts_highest(&self) -> Result<u32, DataplaneError> {
        Ok(self.ts_high.get(&0, 0).map_err(in_map("TS_HIGH"))? as u32)
    }

    /// Sets the highest TCP timestamp sent, as a fixture's starting point.
    pub fn set_ts_highest(&mut self, value: u32) -> Result<(), DataplaneError> {
        self.ts_high
            .set(0, &u64::from(value), 0)
            .map_err(in_map("TS_HIGH"))
    }

    /// Every entry of FLOWS, read in batches (a million entries take about a second).
    pub fn flow_entries(&self) -> Result<Vec<(FlowKey, FlowValue)>, DataplaneError> {
        map_batch::lookup_all(self.flows.map().fd().as_fd()).map_err(|source| {
            DataplaneError::Batch {
                name: "FLOWS",
                source,
            }
        })
    }

    /// Every entry of FLOWS6, as `flow_entries`.
    pub fn flow_entries6(&self) -> Result<Vec<(FlowKey6, FlowValue6)>, DataplaneError> {
        map_batch::lookup_all(self.flows6.map().fd().as_fd()).map_err(|source| {
            DataplaneError::Batch {
                name: "FLOWS6",
                source,
            }
        })
    }

    pub fn remove_flow6(&mut self, key: &FlowKey6) -> Result<(), DataplaneError> {
        self.flows6.remove(key).map_err(in_map("FLOWS6"))
    }

    pub fn insert_flow(&mut self, key: FlowKey, value: FlowValue) -> Result<(), DataplaneError> {
        self.flows.insert(&key, &value, 0).map_err(in_map("FLOWS"))
    }

    pub fn insert_flow6(&mut self, key: FlowKey6, value: FlowValue6) -> Result<(), DataplaneError> {
        self.flows6
            .insert(&key, &value, 0)
            .map_err(in_map("FLOWS6"))
    }

    /// Inserts or replaces many flow entries at once.
    pub fn insert_flows(&mut self, entries: &[(FlowKey, FlowValue)]) -> Result<(), DataplaneError> {
        let (keys, values): (Vec<FlowKey>, Vec<FlowValue>) = entries.iter().copied().unzip();
        map_batch::update(self.flows.map().fd().as_fd(), &keys, &values, 0).map_err(|source| {
            DataplaneError::Batch {
                name: "FLOWS",
                source,
            }
        })
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), DataplaneError> {
        self.flows.remove(key).map_err(in_map("FLOWS"))
    }

    /// Starts the in-kernel expiry: from now on the kernel removes flows past their state's
    /// timeout every EXPIRY_INTERVAL_NS, with or without a daemon (the timer lives in the
    /// pinned EXPIRY map). A timer an earlier daemon armed is taken over: it runs this
    /// program's callback, with this config's timeouts, from now on.
    pub fn arm_expiry(&mut self) -> Result<(), DataplaneError> {
        let arm: &mut Xdp = self
            .ebpf
            .program_mut(EXPIRY_ARM_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram {
                name: EXPIRY_ARM_PROGRAM,
            })?;
        // The program reads no packet; XDP's test run wants an Ethernet header's worth.
        let frame = [0u8; 64];
        let result = arm
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::default()
            })
            .map_err(|source| DataplaneError::TestRun { source })?;
        const XDP_PASS: u32 = 2;
        if result.return_value != XDP_PASS {
            return Err(DataplaneError::Expiry);
        }
        Ok(())
    }

    /// Runs the program on `frame` through BPF_PROG_TEST_RUN, as if it arrived on
    /// `ingress_ifindex`, `repeat` times (the kernel does not restore the frame between repeats,
    /// so only a path that leaves the frame unchanged can be repeated meaningfully).
    pub fn test_run(
        &mut self,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome, DataplaneError> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
        let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let program = self.program();
        test_run_of(frame, &ctx_bytes, repeat, |opts| program.test_run(opts))
    }

    /// Runs the tc program on `frame` through BPF_PROG_TEST_RUN, as an skb on `ifindex`'s
    /// ingress, `repeat` times (as `test_run`). The action is the tc one (TC_ACT_UNSPEC as
    /// u32::MAX).
    pub fn tc_test_run(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome, DataplaneError> {
        // struct __sk_buff (192 bytes): a test run may set `ifindex` (offset 40), the
        // device the skb is on.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let program: &SchedClassifier = self
            .ebpf
            .program(TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram { name: TC_PROGRAM })?;
        test_run_of(frame, &ctx, repeat, |opts| program.test_run(opts))
    }
}

/// One BPF_PROG_TEST_RUN of `frame` with context `ctx`, by `run` (the program's own).
fn test_run_of(
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
    run: impl FnOnce(TestRunOptions<'_>) -> Result<aya::programs::TestRunResult, ProgramError>,
) -> Result<TestRunOutcome, DataplaneError> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::default()
    })
    .map_err(|source| DataplaneError::TestRun { source })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutcome {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}

/// What one BPF_PROG_TEST_RUN call gave back.
#[derive(Clone, Debug)]
pub struct TestRunOutcome {
    /// The XDP action (or tc action) of the last run.
    pub action: u32,
    /// The frame as the last run left it.
    pub frame: Vec<u8>,
    /// The kernel's time per run (its own clock around the program, divided by the repeats).
    pub duration: Duration,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        for (name, result) in self.detach_all() {
            if let Err(e) = result {
                log::warn!("detaching from {name}: {e}");
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the data path's clock (`bpf_ktime_get_coarse_ns`), the one
/// `FlowValue::last_seen_ns` and SUSPECT marks are stamped with.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: a zeroed timespec is valid and clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the data path adds to its monotonic milliseconds to make its TCP timestamp clock
/// (lb-common's `timestamps`): the realtime clock's milliseconds, so that the clock keeps moving
/// forward across reboots, when a fresh map no longer remembers the highest value sent.
fn ts_clock_offset_ms() -> u32 {
    let realtime = (clock_ns(libc::CLOCK_REALTIME) / 1_000_000) as u32;
    realtime.wrapping_sub((monotonic_ns() / 1_000_000) as u32)
}

/// The TCP timestamp clock as the data path reads it now (give or take a tick).
pub fn ts_clock_ms() -> u32 {
    ((monotonic_ns() / 1_000_000) as u32).wrapping_add(ts_clock_offset_ms())
}

fn possible_cpus() -> Result<usize, DataplaneError> {
    aya::util::nr_cpus()
        .map(|n| n.get() as usize)
        .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))
}

/// The interface's index in this network namespace.
pub fn ifindex(name: &str) -> Result<u32, DataplaneError> {
    let no_interface = || DataplaneError::NoInterface {
        name: name.to_owned(),
    };
    let c_name = CString::new(name).map_err(|_| no_interface())?;
    // SAFETY: a valid NUL-terminated string; the call reads it and nothing else.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        Err(no_interface())
    } else {
        Ok(index)
    }
}

/// A device backed by hardware (it has a `device` link in sysfs), where XDP_TX back out of the
/// ingress port works and is fastest; virtual devices such as veth need a redirect.
pub fn is_physical(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("device")
        .exists()
}
