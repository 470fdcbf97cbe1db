//! The daemon's TOML configuration (`lb.toml`): interfaces, flow-table settings and services with
//! their health checks and backends. The whole file is parsed and validated before anything
//! touches the maps, so a bad file changes nothing; every error names the key and the line.
//!
//! Parsing goes through `Raw*` structs whose fields are `toml::Spanned`, so that validation
//! errors can point at a line, then into the plain types below. Raw integers are `i64` (TOML's
//! own type) so that any out-of-range value gets the same "is out of range" message.
//!
//! Over the ~400-line guideline: about 25 validation rules, each pointing at a line, and a test
//! for each (the tests are more than half of the file).

use std::{
    collections::HashMap,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    DEFAULT_FLOW_CAPACITY, DEFAULT_MAGLEV_SIZE, MAX_BACKENDS, MAX_INTERFACES, MAX_SERVICES,
    SNAT_POOL_MAX,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::{dataplane::FlowTimeouts, maglev::is_prime};

/// What makes a SNAT pool valid, whether from the file or the CLI: an empty pool (the kernel's
/// choice) or up to SNAT_POOL_MAX addresses, none twice.
pub fn check_snat_pool(pool: &[IpAddr]) -> Result<(), String> {
    if pool.len() > SNAT_POOL_MAX as usize {
        return Err(format!(
            "has {} addresses; a SNAT pool holds at most {SNAT_POOL_MAX}",
            pool.len()
        ));
    }
    for (i, a) in pool.iter().enumerate() {
        if pool[..i].contains(a) {
            return Err(format!("lists {a} twice"));
        }
        if a.is_unspecified() || a.is_multicast() || a == &IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(format!("{a} cannot be a source address"));
        }
    }
    Ok(())
}

/// One service, one address family: its VIP's, in every mode (DSR's tunnels carry IPv6 inside
/// IPv6); NAT46/64 is not offered.
pub fn check_family(s: &ServiceConfig) -> Result<(), String> {
    let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    let vip = family(s.vip.ip());
    if let Some(b) = s.backends.iter().find(|b| family(b.address.ip()) != vip) {
        return Err(format!(
            "backend {} is {} but vip {} is {vip}: a service's backends are of its VIP's family",
            b.address,
            family(b.address.ip()),
            s.vip
        ));
    }
    if let Some(a) = s.snat.iter().find(|a| family(**a) != vip) {
        return Err(format!(
            "snat {a} is {} but vip {} is {vip}: the source pool is of the VIP's family",
            family(*a),
            s.vip
        ));
    }
    Ok(())
}

/// Highest backend weight: keeps a weight's share meaningful in a table of ~65k slots.
pub const MAX_WEIGHT: u32 = 10_000;

/// Large enough for ~100 backends per service at 1% imbalance, small enough that the two tables
/// per service (live and staging) of all services fit in memory: 131071 = 2^17 - 1 is prime.
const MAGLEV_SIZE_RANGE: RangeInclusive<u32> = 101..=131_071;
const FLOW_CAPACITY_RANGE: RangeInclusive<u32> = 1024..=67_108_864;
/// Ports below 1024 are for servers; SNAT must not collide with them.
const SNAT_PORT_FLOOR: u32 = 1024;
const DEFAULT_SNAT_PORTS: (u16, u16) = (10_000, 32_767);
const FLOW_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
pub const HEALTH_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
pub const HEALTH_COUNT_RANGE: RangeInclusive<u32> = 1..=100;
const WEIGHT_RANGE: RangeInclusive<u32> = 0..=MAX_WEIGHT;
/// Linux's IFNAMSIZ (16) less the terminating NUL.
const IFNAME_MAX_LEN: usize = 15;
const SERVICE_NAME_MAX_LEN: usize = 64;

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Devices the XDP program attaches to and forwards through.
    pub interfaces: Vec<String>,
    /// Slots of each service's Maglev table (prime).
    pub maglev_table_size: u32,
    pub flows: FlowSettings,
    /// Which host processes the socket hooks balance.
    pub host: HostCgroup,
    pub services: Vec<ServiceConfig>,
}

/// `[host] cgroup`: the cgroup v2 directory whose processes' connections to a VIP are balanced
/// by the socket hooks (its descendants' too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostCgroup {
    /// The root of the cgroup v2 mount: every process on the host.
    #[default]
    Root,
    Dir(PathBuf),
    /// `cgroup = "off"`: host clients are not balanced.
    Off,
}

/// `[flows]`: the flow table and SNAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSettings {
    /// FLOWS entries; a balanced connection takes two (one per direction).
    pub capacity: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub timeouts: FlowTimeouts,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_FLOW_CAPACITY,
            snat_port_min: DEFAULT_SNAT_PORTS.0,
            snat_port_max: DEFAULT_SNAT_PORTS.1,
            timeouts: FlowTimeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as in the IPv4 header and map keys.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One `[[service]]`: a VIP:port and protocol balanced over its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// What the balancer rewrites, and so whose address the backends see.
    #[serde(default, skip_serializing_if = "ForwardingMode::is_nat")]
    pub mode: ForwardingMode,
    /// Source addresses of balanced flows towards the backends (a pool of up to
    /// SNAT_POOL_MAX); empty: the one the kernel uses towards the first backend. NAT mode only.
    #[serde(default, deserialize_with = "snat_pool")]
    pub snat: Vec<IpAddr>,
    /// TCP: clamp the MSS its connections' SYN and SYN-ACK announce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss: Option<Mss>,
    pub health: HealthConfig,
    /// What a backend marked down does to its established connections.
    #[serde(default)]
    pub on_backend_down: OnBackendDown,
    /// How long the connections of a removed backend may go on before they are reset (a
    /// removal's `--grace` or `--now` overrides it).
    #[serde(default = "default_removal_grace")]
    pub removal_grace: Duration,
    /// How long a backend that comes up while the service runs takes to reach its full share of
    /// new connections (`slow_start`); zero: at once.
    #[serde(default, skip_serializing_if = "Duration::is_zero")]
    pub slow_start: Duration,
    /// Backends from DNS, besides `backends` listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryConfig>,
    /// Which of `backends` DNS gave (runtime state, which the config file cannot set): they
    /// go when DNS no longer gives them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovered: Vec<SocketAddr>,
    pub backends: Vec<BackendConfig>,
}

/// `mss`: the largest MSS a TCP service's handshakes may announce, for networks that drop the
/// ICMP path MTU discovery needs: a value, or "auto", the smallest MTU of the attached
/// interfaces less 40 (IPv4 and TCP headers; 60 for IPv6), read when the service is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MssText", into = "MssText")]
pub enum Mss {
    Auto,
    Fixed(u16),
}

/// From 536, the MSS every IPv4 host must accept (RFC 9293), to what a 64 KiB packet holds.
pub const MSS_RANGE: RangeInclusive<u16> = 536..=65_495;
/// IPv4 and TCP headers without options: an MTU less this is the MSS that fits it.
pub const MSS_HEADROOM: u32 = 40;
/// IPv6's (a 40-byte header, no options).
pub const MSS_HEADROOM6: u32 = 60;

impl Mss {
    /// The value to clamp to: `mtus` are the attached interfaces' (for "auto"), `headroom`
    /// the family's headers (MSS_HEADROOM, MSS_HEADROOM6).
    pub fn resolve(self, mtus: impl IntoIterator<Item = u32>, headroom: u32) -> Option<u16> {
        match self {
            Self::Fixed(mss) => Some(mss),
            Self::Auto => {
                let mtu = mtus.into_iter().min()?;
                let mss = mtu.saturating_sub(headroom);
                let mss = u16::try_from(mss).unwrap_or(*MSS_RANGE.end());
                Some(mss.clamp(*MSS_RANGE.start(), *MSS_RANGE.end()))
            }
        }
    }
}

impl std::str::FromStr for Mss {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        let (min, max) = (MSS_RANGE.start(), MSS_RANGE.end());
        match text.parse::<u16>() {
            Ok(mss) if MSS_RANGE.contains(&mss) => Ok(Self::Fixed(mss)),
            _ => Err(format!(
                "\"{text}\" is not \"auto\" or an MSS in {min}..={max}"
            )),
        }
    }
}

impl fmt::Display for Mss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(mss) => write!(f, "{mss}"),
        }
    }
}

/// `Mss` as the config file, the state file and the control socket write it: a number or "auto".
#[derive(Clone, Serialize)]
#[serde(untagged)]
enum MssText {
    Value(i64),
    Word(String),
}

impl<'de> Deserialize<'de> for MssText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MssText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an MSS (a number) or \"auto\"")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MssText, E> {
                Ok(MssText::Value(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MssText, E> {
                Ok(MssText::Value(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MssText, E> {
                Ok(MssText::Word(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl TryFrom<MssText> for Mss {
    type Error = String;

    fn try_from(text: MssText) -> Result<Self, String> {
        let (min, max) = (MSS_RANGE.start(), MSS_RANGE.end());
        match text {
            MssText::Value(n) => match u16::try_from(n) {
                Ok(mss) if MSS_RANGE.contains(&mss) => Ok(Mss::Fixed(mss)),
                _ => Err(format!("{n} is out of range {min}..={max}")),
            },
            MssText::Word(w) if w == "auto" => Ok(Mss::Auto),
            MssText::Word(w) => Err(format!(
                "\"{w}\" is not \"auto\" or an MSS (a number, {min}..={max})"
            )),
        }
    }
}

impl From<Mss> for MssText {
    fn from(mss: Mss) -> Self {
        match mss {
            Mss::Auto => MssText::Word("auto".into()),
            Mss::Fixed(n) => MssText::Value(i64::from(n)),
        }
    }
}

/// `mode`: what the balancer rewrites. `nat` (full NAT) works whatever the backends' routes,
/// and they see the balancer's SNAT address; `dnat` keeps the client's address (as IPVS NAT
/// does), and the backends' replies must come back through the balancer, their gateway;
/// `dsr` with `dsr = "l2"` (direct server return, as IPVS DR does) sends the frame to the
/// backend's MAC unchanged otherwise, and the backend, with the VIP on its loopback, answers
/// the client directly; `dsr = "ipip"` (as IPVS TUN and Katran do) sends the packet inside an
/// IPIP header to backends on any subnet, whose `lb decap` strips it, and `dsr = "gue"` inside
/// IPv4 and UDP (GUE, as Katran does), whose source port spreads it over the backends' queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardingMode {
    #[default]
    Nat,
    Dnat,
    DsrL2,
    DsrIpip,
    DsrGue,
}

impl ForwardingMode {
    pub fn is_nat(&self) -> bool {
        *self == Self::Nat
    }

    /// `Service::mode`.
    pub fn number(self) -> u8 {
        match self {
            Self::Nat => lb_common::SERVICE_MODE_NAT,
            Self::Dnat => lb_common::SERVICE_MODE_DNAT,
            Self::DsrL2 => lb_common::SERVICE_MODE_DSR_L2,
            Self::DsrIpip => lb_common::SERVICE_MODE_DSR_IPIP,
            Self::DsrGue => lb_common::SERVICE_MODE_DSR_GUE,
        }
    }

    /// The mode of the config's `mode` and `dsr` (`None`: not given).
    pub fn from_names(mode: &str, dsr: Option<&str>) -> Result<Self, String> {
        match (mode, dsr) {
            ("nat", None) => Ok(Self::Nat),
            ("dnat", None) => Ok(Self::Dnat),
            ("dsr", None | Some("l2")) => Ok(Self::DsrL2),
            ("dsr", Some("ipip")) => Ok(Self::DsrIpip),
            ("dsr", Some("gue")) => Ok(Self::DsrGue),
            ("dsr", Some(other)) => Err(format!(
                "dsr \"{other}\" is not one of \"l2\", \"ipip\", \"gue\""
            )),
            ("nat" | "dnat", Some(_)) => {
                Err(format!("dsr applies to mode \"dsr\" only, not \"{mode}\""))
            }
            (other, _) => Err(format!(
                "mode \"{other}\" is not one of \"nat\", \"dnat\", \"dsr\""
            )),
        }
    }

    /// Whether its backends must be on a segment of a device lb forwards through.
    pub fn needs_backends_on_link(self) -> bool {
        matches!(self, Self::Dnat | Self::DsrL2)
    }

    /// Whether the backends answer clients directly (and so listen on the VIP's port).
    pub fn is_dsr(self) -> bool {
        matches!(self, Self::DsrL2 | Self::DsrIpip | Self::DsrGue)
    }

    /// Whether its packets reach the backends through a tunnel (`lb decap` strips it).
    pub fn is_tunnel(self) -> bool {
        matches!(self, Self::DsrIpip | Self::DsrGue)
    }

    /// Whether the service has a pool of source addresses (`snat`): its SNAT pool in NAT
    /// mode, its tunnels' outer sources in DSR's encapsulated forms.
    pub fn has_source_pool(self) -> bool {
        self == Self::Nat || self.is_tunnel()
    }
}

impl fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nat => "nat",
            Self::Dnat => "dnat",
            Self::DsrL2 => "dsr-l2",
            Self::DsrIpip => "dsr-ipip",
            Self::DsrGue => "dsr-gue",
        })
    }
}

/// `on_backend_down`: a health check can fail while the service still serves (a slow check
/// endpoint, a GC pause), so by default connections a backend holds go on (as IPVS with
/// `expire_nodest_conn=0`); `reset` ends them at once with an RST to both ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendDown {
    #[default]
    Keep,
    Reset,
}

impl fmt::Display for OnBackendDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keep => "keep",
            Self::Reset => "reset",
        })
    }
}

/// Long enough for a request in flight and a keep-alive connection's idle close (nginx: 75 s
/// on the client side, but most servers close idle upstream connections within a minute).
pub const DEFAULT_REMOVAL_GRACE: Duration = Duration::from_secs(60);
pub const REMOVAL_GRACE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(24 * 3600);

/// `[service.discovery]`: every A record of a name (AAAA, for an IPv6 VIP) is a backend, as compose registers a
/// service's replicas; resolved with the host's resolver configuration (getaddrinfo).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiscoveryConfig {
    pub host: String,
    /// The backends' port.
    pub port: u16,
    pub interval: Duration,
    /// The weight a discovered backend starts with (`lb set-weight` changes it per address).
    pub weight: u32,
}

impl fmt::Display for DiscoveryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub const DISCOVERY_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);
const HOST_NAME_MAX_LEN: usize = 253;

/// What makes a name to resolve valid: DNS's letters, digits, '-', '_' and dots, within its
/// length.
pub fn check_host_name(name: &str) -> Result<(), String> {
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
    if name.is_empty() || name.len() > HOST_NAME_MAX_LEN || !name.bytes().all(valid) {
        return Err(format!(
            "\"{name}\" is not a host name (1 to {HOST_NAME_MAX_LEN} of a-z, A-Z, 0-9, '-', '_', '.')"
        ));
    }
    Ok(())
}

pub const SLOW_START_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(3600);

fn default_removal_grace() -> Duration {
    DEFAULT_REMOVAL_GRACE
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP/1.1 GET answers with an accepted status (and body).
    Http(HttpCheck),
    /// A datagram `send` gets an answer (holding `expect`, if given) within the timeout; an
    /// ICMP port unreachable says down at once. For UDP services.
    Udp {
        send: String,
        expect: Option<String>,
    },
    /// No probes: backends are always up.
    None,
}

/// `kind = "http"`: `GET path` with `Host: host` (the backend's IP:PORT by default), one
/// request per connection, answered with a status in `status` and, if `expect` is given, a body
/// holding it (as HAProxy's `http-check expect status` and `string`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpCheck {
    pub path: String,
    #[serde(default)]
    pub host: Option<String>,
    /// Accepted statuses, as inclusive ranges.
    #[serde(default = "default_http_status")]
    pub status: Vec<(u16, u16)>,
    #[serde(default)]
    pub expect: Option<String>,
}

/// 2xx and 3xx.
fn default_http_status() -> Vec<(u16, u16)> {
    vec![(200, 399)]
}

/// The longest `expect` of an HTTP or UDP check, and how much of a body an HTTP check reads for it.
pub const EXPECT_MAX: usize = 1024;
pub const HTTP_BODY_READ_MAX: usize = 64 * 1024;

impl HttpCheck {
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            host: None,
            status: default_http_status(),
            expect: None,
        }
    }

    /// Whether `code` is an accepted status.
    pub fn accepts(&self, code: u16) -> bool {
        self.status
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&code))
    }

    /// What is wrong with it, if anything: each value goes into the request or is compared with
    /// the answer as is, so each is checked wherever a check comes from (file or socket).
    pub fn problem(&self) -> Option<String> {
        let unsafe_text = |t: &str| {
            t.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        };
        if !self.path.starts_with('/') || unsafe_text(&self.path) {
            return Some(format!(
                "path {:?} must start with '/' and have no spaces",
                self.path
            ));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || host.len() > HOST_NAME_MAX_LEN || unsafe_text(host))
        {
            return Some(format!(
                "host {host:?} must be 1 to {HOST_NAME_MAX_LEN} characters without spaces"
            ));
        }
        if self.status.is_empty()
            || self
                .status
                .iter()
                .any(|&(lo, hi)| lo < 100 || hi > 599 || lo > hi)
        {
            return Some("status must be ranges within 100-599, like \"200-399\"".into());
        }
        if let Some(expect) = &self.expect
            && (expect.is_empty() || expect.len() > EXPECT_MAX)
        {
            return Some(format!("expect must hold 1 to {EXPECT_MAX} bytes"));
        }
        None
    }
}

/// `"200-399"`, `"200"`, `"200,204,300-399"`: accepted HTTP statuses.
pub fn parse_http_status(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let bad = || {
        format!(
            "status {text:?} is not a list of statuses or ranges, like \"200-399\" or \"200,204\""
        )
    };
    let ranges = text
        .split(',')
        .map(|part| {
            let part = part.trim();
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let number = |t: &str| t.trim().parse::<u16>().map_err(|_| bad());
            Ok((number(lo)?, number(hi)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let check = HttpCheck {
        status: ranges,
        ..HttpCheck::new("/")
    };
    match check.problem() {
        Some(problem) => Err(problem),
        None => Ok(check.status),
    }
}

/// What a `kind = "udp"` check sends when the config says nothing.
pub const DEFAULT_UDP_PROBE: &str = "lb-health";
/// The largest datagram a UDP check sends.
pub const UDP_PROBE_MAX: usize = 1024;

/// `[service.health]`: how backends are probed and when their state flips.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// Probe this port instead of the backend's own.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that mark a down backend up.
    pub rise: u32,
    /// Consecutive failures that mark an up backend down.
    pub fall: u32,
}

impl HealthConfig {
    /// Health checking of a service without `[service.health]`: TCP connects for TCP services;
    /// none for UDP, where there is no handshake to probe.
    pub fn default_for(protocol: Protocol) -> Self {
        Self {
            kind: match protocol {
                Protocol::Tcp => HealthKind::Tcp,
                Protocol::Udp => HealthKind::None,
            },
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        }
    }
}

/// One `[[service.backend]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    pub address: SocketAddr,
    /// Relative share of new flows, 0..=MAX_WEIGHT; 0 drains (no new flows).
    pub weight: u32,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not TOML, a value of the wrong type, or an unknown key.
    #[error("config {origin} line {line}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    /// Well-formed, but a value is not acceptable.
    #[error("config {origin} line {line}: key \"{key}\": {message}")]
    Invalid {
        origin: String,
        line: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The 1-based line the error is about, if it is about a line.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => Some(*line),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors (usually the file's path).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let checker = Checker { text, origin };
        let raw: RawConfig = toml::from_str(text).map_err(|e| checker.syntax(&e))?;
        checker.config(raw)
    }
}

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`, e.g. `500ms`, `2s`, `1m`. The error
/// is one line that quotes `s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("\"{s}\" is not a duration like \"500ms\", \"2s\", \"1m\" or \"1h\"");
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(unit_at);
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let too_long = || format!("duration \"{s}\" is too long");
    Ok(match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(too_long)?),
        "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(too_long)?),
        _ => return Err(bad()),
    })
}

/// Writes `d` in the largest unit that [`parse_duration`] reads back exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    for (unit_ms, unit) in [(3_600_000, "h"), (60_000, "m"), (1000, "s")] {
        if ms.is_multiple_of(unit_ms) {
            return format!("{}{unit}", ms / unit_ms);
        }
    }
    format!("{ms}ms")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    maglev_table_size: Option<Spanned<i64>>,
    flows: Option<RawFlows>,
    host: Option<RawHost>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    cgroup: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    capacity: Option<Spanned<i64>>,
    snat_ports: Option<Spanned<String>>,
    tcp_syn_timeout: Option<Spanned<String>>,
    tcp_idle_timeout: Option<Spanned<String>>,
    tcp_half_closed_timeout: Option<Spanned<String>>,
    tcp_closing_timeout: Option<Spanned<String>>,
    udp_unreplied_timeout: Option<Spanned<String>>,
    udp_idle_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    vip: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    dsr: Option<Spanned<String>>,
    snat: Option<Spanned<RawSnat>>,
    mss: Option<Spanned<MssText>>,
    on_backend_down: Option<Spanned<String>>,
    removal_grace: Option<Spanned<String>>,
    slow_start: Option<Spanned<String>>,
    health: Option<RawHealth>,
    discovery: Option<Spanned<RawDiscovery>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

/// `snat`: an address, a prefix, or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSnat {
    One(String),
    Many(Vec<String>),
}

/// `ServiceConfig::snat` as saved: an address or null (before pools), or a list.
fn snat_pool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Saved {
        One(IpAddr),
        Many(Vec<IpAddr>),
    }
    Ok(match Option::<Saved>::deserialize(d)? {
        None => Vec::new(),
        Some(Saved::One(a)) => vec![a],
        Some(Saved::Many(v)) => v,
    })
}

/// The addresses of one `snat` item: an address, or every address of a prefix (IPv4 or IPv6).
fn snat_item(text: &str) -> Result<Vec<IpAddr>, String> {
    let not_one = || format!("\"{text}\" is not an IP address or prefix");
    let Some((addr, len)) = text.split_once('/') else {
        return text
            .parse::<IpAddr>()
            .map(|a| vec![a])
            .map_err(|_| not_one());
    };
    let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u32>()) else {
        return Err(not_one());
    };
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    if len > bits {
        return Err(format!("\"{text}\" has a prefix length above {bits}"));
    }
    let host_bits = bits - len;
    if host_bits > SNAT_POOL_MAX.ilog2() {
        return Err(format!(
            "\"{text}\" holds {} addresses; a SNAT pool holds at most {SNAT_POOL_MAX}",
            if host_bits >= 64 {
                "2^".to_owned() + &host_bits.to_string()
            } else {
                (1u64 << host_bits).to_string()
            }
        ));
    }
    let size = 1u128 << host_bits;
    let value = match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let first = value & !(size - 1);
    let at = |v: u128| match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    };
    if first != value {
        return Err(format!(
            "\"{text}\" has host bits set; the prefix starts at {}",
            at(first)
        ));
    }
    Ok((0..size).map(|i| at(first + i)).collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    dns: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    status: Option<Spanned<String>>,
    send: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

/// Turns raw values into checked ones, and byte spans into errors with line numbers. `ctx`
/// arguments prefix messages with the object a key belongs to, e.g. `service "web": `.
struct Checker<'a> {
    text: &'a str,
    origin: &'a str,
}

/// What earlier services hold, for the duplicate and limit checks.
#[derive(Default)]
struct Seen {
    /// Service name -> its line.
    names: HashMap<String, usize>,
    /// (VIP, protocol) -> service name.
    vips: HashMap<(SocketAddr, Protocol), String>,
    backends: usize,
}

impl Checker<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        1 + self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn fail<T>(&self, span: Range<usize>, key: &str, message: String) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line: self.line(span.start),
            key: key.to_owned(),
            message,
        })
    }

    /// toml's messages say what is wrong but, for type errors and duplicate keys, not where:
    /// name the key of the `key = value` line the error points into. An error without a span
    /// (none seen in practice) is put on line 1.
    fn syntax(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map_or(0, |span| span.start);
        let mut message = error
            .message()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(key) = self.key_of_line(offset)
            && !message.contains(&key)
        {
            message = format!("key \"{key}\": {message}");
        }
        let (origin, line) = (self.origin.to_owned(), self.line(offset));
        ConfigError::Syntax {
            origin,
            line,
            message,
        }
    }

    /// The key of the `key = value` line that `offset` falls in, if it is one.
    fn key_of_line(&self, offset: usize) -> Option<String> {
        let bytes = self.text.as_bytes();
        let offset = offset.min(bytes.len());
        let start = bytes[..offset]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |nl| nl + 1);
        let eq = bytes[start..]
            .iter()
            .position(|&b| b == b'=' || b == b'\n')?;
        let key = String::from_utf8_lossy(&bytes[start..start + eq])
            .trim()
            .to_owned();
        let key_like = |b: u8| b.is_ascii_alphanumeric() || b"_-.\" ".contains(&b);
        let is_key =
            bytes.get(start + eq) == Some(&b'=') && !key.is_empty() && key.bytes().all(key_like);
        is_key.then_some(key)
    }

    fn int<T>(
        &self,
        value: Option<&Spanned<i64>>,
        key: &str,
        ctx: &str,
        range: RangeInclusive<T>,
    ) -> Result<Option<T>, ConfigError>
    where
        T: TryFrom<i64> + PartialOrd + fmt::Display,
    {
        let Some(value) = value else { return Ok(None) };
        match T::try_from(*value.get_ref()) {
            Ok(v) if range.contains(&v) => Ok(Some(v)),
            _ => {
                let (min, max) = (range.start(), range.end());
                let message = format!(
                    "{ctx}{key} {} is out of range {min}..={max}",
                    value.get_ref()
                );
                self.fail(value.span(), key, message)
            }
        }
    }

    fn duration(
        &self,
        value: Option<&Spanned<String>>,
        key: &str,
        ctx: &str,
        range: RangeInclusive<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        match parse_duration(value.get_ref()) {
            Ok(d) if range.contains(&d) => return Ok(Some(d)),
            Ok(_) => {}
            Err(e) => return self.fail(value.span(), key, format!("{ctx}{key}: {e}")),
        }
        let (min, max) = (
            format_duration(*range.start()),
            format_duration(*range.end()),
        );
        let message = format!(
            "{ctx}{key} {} is out of range {min}..={max}",
            value.get_ref()
        );
        self.fail(value.span(), key, message)
    }

    /// The value named by one of `choices`.
    fn choice<T: Clone>(
        &self,
        value: Option<&Spanned<String>>,
        key: &str,
        ctx: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        if let Some((_, v)) = choices.iter().find(|(name, _)| name == value.get_ref()) {
            return Ok(Some(v.clone()));
        }
        let names: Vec<String> = choices
            .iter()
            .map(|(name, _)| format!("\"{name}\""))
            .collect();
        let message = format!(
            "{ctx}{key} \"{}\" is not one of {}",
            value.get_ref(),
            names.join(", ")
        );
        self.fail(value.span(), key, message)
    }

    /// A service's SNAT pool: at least one address, at most SNAT_POOL_MAX, none twice.
    fn snat(&self, value: &Spanned<RawSnat>, ctx: &str) -> Result<Vec<IpAddr>, ConfigError> {
        let items = match value.get_ref() {
            RawSnat::One(item) => std::slice::from_ref(item),
            RawSnat::Many(items) => items.as_slice(),
        };
        if items.is_empty() {
            let message =
                format!("{ctx}snat is an empty list; leave it out for the address routing picks");
            return self.fail(value.span(), "snat", message);
        }
        let mut pool = Vec::new();
        for item in items {
            match snat_item(item) {
                Ok(addrs) => pool.extend(addrs),
                Err(e) => return self.fail(value.span(), "snat", format!("{ctx}snat {e}")),
            }
        }
        if let Err(e) = check_snat_pool(&pool) {
            return self.fail(value.span(), "snat", format!("{ctx}snat {e}"));
        }
        Ok(pool)
    }

    fn socket_addr(
        &self,
        value: &Spanned<String>,
        key: &str,
        ctx: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let text = value.get_ref();
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(addr),
            Ok(addr) => self.fail(value.span(), key, format!("{ctx}{key} {addr} has port 0")),
            Err(_) => {
                let message = format!(
                    "{ctx}{key} \"{text}\" is not an address and port like \"198.18.0.1:80\" or \"[fd00::1]:80\""
                );
                self.fail(value.span(), key, message)
            }
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interfaces = self.interfaces(raw.interfaces)?;
        let (key, value) = ("maglev_table_size", raw.maglev_table_size.as_ref());
        let size = self
            .int(value, key, "", MAGLEV_SIZE_RANGE)?
            .unwrap_or(DEFAULT_MAGLEV_SIZE);
        if let Some(value) = value
            && !is_prime(size)
        {
            // Only a prime size makes every backend's permutation reach every slot.
            return self.fail(
                value.span(),
                key,
                format!("{key} {size} is not prime (e.g. 65537)"),
            );
        }
        let flows = match &raw.flows {
            None => FlowSettings::default(),
            Some(flows) => self.flows(flows)?,
        };
        let mut seen = Seen::default();
        let services = (raw.service.into_iter().enumerate())
            .map(|(index, service)| self.service(index, service, &mut seen))
            .collect::<Result<Vec<_>, _>>()?;
        let host = match raw.host.and_then(|h| h.cgroup) {
            None => HostCgroup::Root,
            Some(dir) if dir.get_ref() == "off" => HostCgroup::Off,
            Some(dir) if dir.get_ref().starts_with('/') => {
                HostCgroup::Dir(PathBuf::from(dir.get_ref()))
            }
            Some(dir) => {
                let message = format!(
                    "[host] cgroup \"{}\" is not an absolute path (a cgroup v2 directory) or \"off\"",
                    dir.get_ref()
                );
                return self.fail(dir.span(), "cgroup", message);
            }
        };
        Ok(Config {
            interfaces,
            maglev_table_size: size,
            flows,
            host,
            services,
        })
    }

    fn interfaces(
        &self,
        raw: Option<Spanned<Vec<Spanned<String>>>>,
    ) -> Result<Vec<String>, ConfigError> {
        let key = "interfaces";
        let Some(list) = raw else {
            let message =
                format!("{key} is required: the devices to attach to, e.g. {key} = [\"eth0\"]");
            return self.fail(0..0, key, message);
        };
        let count = list.get_ref().len();
        if count == 0 {
            return self.fail(
                list.span(),
                key,
                format!("{key} is empty: name at least one device"),
            );
        }
        if count > MAX_INTERFACES as usize {
            let message =
                format!("{key} lists {count} devices; at most {MAX_INTERFACES} are supported");
            return self.fail(list.span(), key, message);
        }
        let mut names: Vec<String> = Vec::with_capacity(count);
        for name in list.into_inner() {
            let text = name.get_ref();
            // The kernel's dev_valid_name().
            let valid = !text.is_empty()
                && text.len() <= IFNAME_MAX_LEN
                && text != "."
                && text != ".."
                && !text.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
            if !valid {
                return self.fail(
                    name.span(),
                    key,
                    format!("\"{text}\" is not a network device name"),
                );
            }
            if names.contains(text) {
                return self.fail(
                    name.span(),
                    key,
                    format!("device \"{text}\" is listed twice"),
                );
            }
            names.push(name.into_inner());
        }
        Ok(names)
    }

    fn flows(&self, raw: &RawFlows) -> Result<FlowSettings, ConfigError> {
        let ctx = "flows: ";
        let defaults = FlowSettings::default();
        let (snat_port_min, snat_port_max) = match &raw.snat_ports {
            None => DEFAULT_SNAT_PORTS,
            Some(value) => self.snat_ports(value)?,
        };
        let timeout = |value: &Option<Spanned<String>>, key: &str, default: Duration| {
            let d = self.duration(value.as_ref(), key, ctx, FLOW_TIMEOUT_RANGE)?;
            Ok::<_, ConfigError>(d.unwrap_or(default))
        };
        let default = defaults.timeouts;
        Ok(FlowSettings {
            capacity: (self.int(raw.capacity.as_ref(), "capacity", ctx, FLOW_CAPACITY_RANGE)?)
                .unwrap_or(defaults.capacity),
            snat_port_min,
            snat_port_max,
            timeouts: FlowTimeouts {
                tcp_syn: timeout(&raw.tcp_syn_timeout, "tcp_syn_timeout", default.tcp_syn)?,
                tcp_established: timeout(
                    &raw.tcp_idle_timeout,
                    "tcp_idle_timeout",
                    default.tcp_established,
                )?,
                tcp_half_closed: timeout(
                    &raw.tcp_half_closed_timeout,
                    "tcp_half_closed_timeout",
                    default.tcp_half_closed,
                )?,
                tcp_closing: timeout(
                    &raw.tcp_closing_timeout,
                    "tcp_closing_timeout",
                    default.tcp_closing,
                )?,
                udp_unreplied: timeout(
                    &raw.udp_unreplied_timeout,
                    "udp_unreplied_timeout",
                    default.udp_unreplied,
                )?,
                udp_replied: timeout(
                    &raw.udp_idle_timeout,
                    "udp_idle_timeout",
                    default.udp_replied,
                )?,
            },
        })
    }

    fn snat_ports(&self, value: &Spanned<String>) -> Result<(u16, u16), ConfigError> {
        let (key, text) = ("snat_ports", value.get_ref());
        let fail =
            |why: String| self.fail(value.span(), key, format!("flows: {key} \"{text}\" {why}"));
        // Digits only: `str::parse` would also take a sign.
        let port = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        let Some((min, max)) = text
            .split_once('-')
            .and_then(|(a, b)| Some((port(a)?, port(b)?)))
        else {
            return fail("is not a port range like \"10000-32767\"".to_owned());
        };
        if min < SNAT_PORT_FLOOR {
            return fail(format!(
                "starts below {SNAT_PORT_FLOOR}, among the server ports"
            ));
        }
        if min > max {
            return fail(format!("is empty: {min} is above {max}"));
        }
        match (u16::try_from(min), u16::try_from(max)) {
            (Ok(min), Ok(max)) => Ok((min, max)),
            _ => fail(format!("ends above {}", u16::MAX)),
        }
    }

    fn service(
        &self,
        index: usize,
        raw: Spanned<RawService>,
        seen: &mut Seen,
    ) -> Result<ServiceConfig, ConfigError> {
        let table_span = raw.span();
        let raw = raw.into_inner();
        // Where to point when a key is missing: the name, else the `[[service]]` line.
        let anchor = raw.name.as_ref().map_or(table_span.clone(), Spanned::span);
        if index >= MAX_SERVICES as usize {
            let message = format!("more than {MAX_SERVICES} services; that is all the maps hold");
            return self.fail(anchor, "service", message);
        }
        let Some(name) = &raw.name else {
            return self.fail(table_span, "name", "service has no name".to_owned());
        };
        let (name_span, name) = (name.span(), name.get_ref().clone());
        let valid_char = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
        if !(1..=SERVICE_NAME_MAX_LEN).contains(&name.len()) || !name.bytes().all(valid_char) {
            let message = format!(
                "service name \"{name}\" is not 1 to {SERVICE_NAME_MAX_LEN} of a-z, A-Z, 0-9, '_', '.', '-'"
            );
            return self.fail(name_span, "name", message);
        }
        if let Some(first) = seen.names.insert(name.clone(), self.line(name_span.start)) {
            let message = format!("service \"{name}\" is defined twice (first at line {first})");
            return self.fail(name_span, "name", message);
        }
        let ctx = format!("service \"{name}\": ");

        let protocols = [("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
        let protocol = self.choice(raw.protocol.as_ref(), "protocol", &ctx, &protocols)?;
        let protocol = protocol.unwrap_or(Protocol::Tcp);
        let Some(vip_value) = &raw.vip else {
            return self.fail(anchor, "vip", format!("{ctx}vip is required"));
        };
        let vip = self.socket_addr(vip_value, "vip", &ctx)?;
        if let Some(other) = seen.vips.insert((vip, protocol), name.clone()) {
            let message =
                format!("{ctx}vip {vip} ({protocol}) is already used by service \"{other}\"");
            return self.fail(vip_value.span(), "vip", message);
        }
        let names = (
            raw.mode.as_ref().map_or("nat", |m| m.get_ref().as_str()),
            raw.dsr.as_ref().map(|d| d.get_ref().as_str()),
        );
        let mode = match ForwardingMode::from_names(names.0, names.1) {
            Ok(mode) => mode,
            Err(e) => {
                let unknown_mode = raw
                    .mode
                    .as_ref()
                    .filter(|m| !["nat", "dnat", "dsr"].contains(&m.get_ref().as_str()));
                let (key, span) = match (unknown_mode, &raw.dsr) {
                    (Some(m), _) => ("mode", m.span()),
                    (None, Some(d)) => ("dsr", d.span()),
                    (None, None) => ("mode", raw.mode.as_ref().map_or(anchor, Spanned::span)),
                };
                return self.fail(span, key, format!("{ctx}{e}"));
            }
        };
        let snat = match &raw.snat {
            None => Vec::new(),
            Some(value) if !mode.has_source_pool() => {
                let message = format!(
                    "{ctx}snat has no use in mode \"{mode}\": the backends see the client's address"
                );
                return self.fail(value.span(), "snat", message);
            }
            Some(value) => self.snat(value, &ctx)?,
        };
        let mss = match &raw.mss {
            None => None,
            Some(value) => Some(self.mss(value, protocol, &ctx)?),
        };
        let choices = [
            ("keep", OnBackendDown::Keep),
            ("reset", OnBackendDown::Reset),
        ];
        let on_backend_down = self
            .choice(
                raw.on_backend_down.as_ref(),
                "on_backend_down",
                &ctx,
                &choices,
            )?
            .unwrap_or_default();
        let removal_grace = self
            .duration(
                raw.removal_grace.as_ref(),
                "removal_grace",
                &ctx,
                REMOVAL_GRACE_RANGE,
            )?
            .unwrap_or(DEFAULT_REMOVAL_GRACE);
        let slow_start = self
            .duration(
                raw.slow_start.as_ref(),
                "slow_start",
                &ctx,
                SLOW_START_RANGE,
            )?
            .unwrap_or_default();
        let discovery = match &raw.discovery {
            None => None,
            Some(d) => Some(self.discovery(d, &format!("service \"{name}\" discovery: "))?),
        };
        let health = match &raw.health {
            None => HealthConfig::default_for(protocol),
            Some(health) => {
                self.health(health, protocol, &format!("service \"{name}\" health: "))?
            }
        };

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
        // Address -> its line, for the duplicate error.
        let mut lines: HashMap<SocketAddr, usize> = HashMap::new();
        for backend in &raw.backend {
            let table_span = backend.span();
            let backend = backend.get_ref();
            let anchor = backend.address.as_ref().map_or(table_span, Spanned::span);
            seen.backends += 1;
            if seen.backends > MAX_BACKENDS as usize {
                let message = format!(
                    "{ctx}more than {MAX_BACKENDS} backends in all services; that is all the maps hold"
                );
                return self.fail(anchor, "backend", message);
            }
            let Some(address) = &backend.address else {
                return self.fail(
                    anchor,
                    "address",
                    format!("{ctx}backend #{} has no address", backends.len() + 1),
                );
            };
            let addr = self.socket_addr(address, "address", &format!("{ctx}backend "))?;
            if let Some(first) = lines.insert(addr, self.line(address.span().start)) {
                let message =
                    format!("{ctx}backend {addr} is listed twice (first at line {first})");
                return self.fail(address.span(), "address", message);
            }
            if mode.is_dsr() && addr.port() != vip.port() {
                let message = format!(
                    "{ctx}backend {addr}: in mode \"dsr\" the backend answers from the VIP, so it listens on the VIP's port {}",
                    vip.port()
                );
                return self.fail(address.span(), "address", message);
            }
            let ctx = format!("service \"{name}\" backend {addr}: ");
            let weight = self.int(backend.weight.as_ref(), "weight", &ctx, WEIGHT_RANGE)?;
            backends.push(BackendConfig {
                address: addr,
                weight: weight.unwrap_or(1),
            });
        }
        let service = ServiceConfig {
            name,
            vip,
            protocol,
            mode,
            snat,
            mss,
            health,
            on_backend_down,
            removal_grace,
            slow_start,
            discovery,
            discovered: Vec::new(),
            backends,
        };
        match check_family(&service) {
            Ok(()) => Ok(service),
            Err(e) => self.fail(vip_value.span(), "vip", format!("{ctx}{e}")),
        }
    }

    fn discovery(
        &self,
        raw: &Spanned<RawDiscovery>,
        ctx: &str,
    ) -> Result<DiscoveryConfig, ConfigError> {
        let (span, raw) = (raw.span(), raw.get_ref());
        let Some(dns) = &raw.dns else {
            let message = format!("{ctx}dns = \"NAME:PORT\" is required");
            return self.fail(span, "dns", message);
        };
        let text = dns.get_ref();
        let parsed = text
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
        let (host, port) = match parsed {
            Some((host, port)) if port != 0 => (host, port),
            _ => {
                let message = format!("{ctx}dns \"{text}\" is not NAME:PORT (like \"api:8001\")");
                return self.fail(dns.span(), "dns", message);
            }
        };
        if let Err(e) = check_host_name(host) {
            return self.fail(dns.span(), "dns", format!("{ctx}dns {e}"));
        }
        let interval = self
            .duration(
                raw.interval.as_ref(),
                "interval",
                ctx,
                DISCOVERY_INTERVAL_RANGE,
            )?
            .unwrap_or(DEFAULT_DISCOVERY_INTERVAL);
        let weight = self.int(raw.weight.as_ref(), "weight", ctx, WEIGHT_RANGE)?;
        Ok(DiscoveryConfig {
            host: host.to_owned(),
            port,
            interval,
            weight: weight.unwrap_or(1),
        })
    }

    fn mss(
        &self,
        value: &Spanned<MssText>,
        protocol: Protocol,
        ctx: &str,
    ) -> Result<Mss, ConfigError> {
        if protocol != Protocol::Tcp {
            let message = format!("{ctx}mss applies to TCP services only");
            return self.fail(value.span(), "mss", message);
        }
        match Mss::try_from(value.get_ref().clone()) {
            Ok(mss) => Ok(mss),
            Err(e) => self.fail(value.span(), "mss", format!("{ctx}mss {e}")),
        }
    }

    fn health(
        &self,
        raw: &RawHealth,
        protocol: Protocol,
        ctx: &str,
    ) -> Result<HealthConfig, ConfigError> {
        let defaults = HealthConfig::default_for(protocol);
        let http = HealthKind::Http(HttpCheck::new("/"));
        let kinds = [
            ("tcp", HealthKind::Tcp),
            ("http", http),
            (
                "udp",
                HealthKind::Udp {
                    send: String::new(),
                    expect: None,
                },
            ),
            ("none", HealthKind::None),
        ];
        let kind = self
            .choice(raw.kind.as_ref(), "kind", ctx, &kinds)?
            .unwrap_or(defaults.kind);
        let text = |v: &Option<Spanned<String>>| v.as_ref().map(|t| t.get_ref().clone());
        // Keys that belong to other kinds than `kind`.
        let (name, own): (&str, &[&str]) = match kind {
            HealthKind::Http(_) => ("http", &["path", "host", "status", "expect"]),
            HealthKind::Udp { .. } => ("udp", &["send", "expect"]),
            HealthKind::Tcp => ("tcp", &[]),
            HealthKind::None => ("none", &[]),
        };
        for (value, key, owner) in [
            (&raw.path, "path", "http"),
            (&raw.host, "host", "http"),
            (&raw.status, "status", "http"),
            (&raw.send, "send", "udp"),
            (&raw.expect, "expect", "http\" or \"udp"),
        ] {
            if let Some(value) = value
                && !own.contains(&key)
            {
                let message =
                    format!("{ctx}{key} is only used with kind = \"{owner}\", not \"{name}\"");
                return self.fail(value.span(), key, message);
            }
        }
        let kind = match kind {
            HealthKind::Http(_) => {
                let mut check = HttpCheck::new(&text(&raw.path).unwrap_or_else(|| "/".into()));
                check.host = text(&raw.host);
                check.expect = text(&raw.expect);
                if let Some(status) = &raw.status {
                    check.status = match parse_http_status(status.get_ref()) {
                        Ok(ranges) => ranges,
                        Err(message) => {
                            return self.fail(status.span(), "status", format!("{ctx}{message}"));
                        }
                    };
                }
                if let Some(problem) = check.problem() {
                    let (key, value) = [
                        ("path", &raw.path),
                        ("host", &raw.host),
                        ("expect", &raw.expect),
                    ]
                    .into_iter()
                    .find(|(key, _)| problem.starts_with(key))
                    .unwrap_or(("path", &raw.path));
                    let span = value.as_ref().map(Spanned::span).unwrap_or_default();
                    return self.fail(span, key, format!("{ctx}{problem}"));
                }
                HealthKind::Http(check)
            }
            HealthKind::Udp { .. } => {
                if protocol != Protocol::Udp {
                    let message = format!("{ctx}kind \"udp\" is for UDP services");
                    let span = raw.kind.as_ref().map(Spanned::span).unwrap_or_default();
                    return self.fail(span, "kind", message);
                }
                if let Some(send) = &raw.send
                    && (send.get_ref().is_empty() || send.get_ref().len() > UDP_PROBE_MAX)
                {
                    let message = format!("{ctx}send must hold 1 to {UDP_PROBE_MAX} bytes");
                    return self.fail(send.span(), "send", message);
                }
                if let Some(expect) = &raw.expect
                    && expect.get_ref().len() > EXPECT_MAX
                {
                    let message = format!("{ctx}expect must hold 1 to {EXPECT_MAX} bytes");
                    return self.fail(expect.span(), "expect", message);
                }
                HealthKind::Udp {
                    send: text(&raw.send).unwrap_or_else(|| DEFAULT_UDP_PROBE.to_owned()),
                    expect: text(&raw.expect).filter(|e| !e.is_empty()),
                }
            }
            kind => kind,
        };
        let interval = self.duration(
            raw.interval.as_ref(),
            "interval",
            ctx,
            HEALTH_INTERVAL_RANGE,
        )?;
        let interval = interval.unwrap_or(defaults.interval);
        let timeout_range = Duration::ZERO..=Duration::MAX;
        let timeout = self.duration(raw.timeout.as_ref(), "timeout", ctx, timeout_range)?;
        // A short interval shortens the default timeout with it rather than making the config
        // invalid.
        let timeout = timeout.unwrap_or(defaults.timeout.min(interval));
        if let Some(value) = &raw.timeout
            && (timeout.is_zero() || timeout > interval)
        {
            let interval = format_duration(interval);
            let message = format!(
                "{ctx}timeout {} must be above 0 and at most the interval, {interval}",
                value.get_ref()
            );
            return self.fail(value.span(), "timeout", message);
        }
        let count = |value: &Option<Spanned<i64>>, key: &str, default: u32| {
            Ok::<_, ConfigError>(
                self.int(value.as_ref(), key, ctx, HEALTH_COUNT_RANGE)?
                    .unwrap_or(default),
            )
        };
        Ok(HealthConfig {
            kind,
            port: self.int(raw.port.as_ref(), "port", ctx, 1..=u16::MAX)?,
            interval,
            timeout,
            rise: count(&raw.rise, "rise", defaults.rise)?,
            fall: count(&raw.fall, "fall", defaults.fall)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the design notes, with `kind = "http"` so that `path` applies.
    const EXAMPLE: &str = r#"interfaces = ["eth0", "eth1"]
maglev_table_size = 65537
[flows]
capacity = 1048576
snat_ports = "10000-32767"
tcp_syn_timeout = "4s"
tcp_idle_timeout = "300s"
tcp_half_closed_timeout = "90s"
tcp_closing_timeout = "10s"
udp_unreplied_timeout = "20s"
udp_idle_timeout = "30s"
[host]
cgroup = "/sys/fs/cgroup/lb-clients"
[[service]]
name = "web"
vip = "198.18.100.1:80"
protocol = "tcp"
snat = "198.18.2.1"
mss = 1360
on_backend_down = "reset"
removal_grace = "30s"
slow_start = "10s"
[service.health]
kind = "http"
path = "/healthz"
port = 8080
interval = "500ms"
timeout = "300ms"
rise = 2
fall = 2
[service.discovery]
dns = "api:8001"
interval = "500ms"
weight = 3
[[service.backend]]
address = "198.18.2.11:8000"
weight = 4
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address is valid")
    }

    /// Parses `text`, which must fail on the line marked `# <- key`, naming `key` and saying
    /// `fragment`.
    #[track_caller]
    fn assert_error(text: &str, fragment: &str) -> ConfigError {
        let (line, key) = text
            .lines()
            .enumerate()
            .find_map(|(i, l)| l.split_once("# <- ").map(|(_, key)| (i + 1, key.trim())))
            .expect("test text marks a line with `# <- key`");
        let err = Config::parse(text, "lb.toml").expect_err("config is invalid");
        let msg = err.to_string();
        assert_eq!(err.line(), Some(line), "{msg}");
        match &err {
            ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{msg}"),
            ConfigError::Syntax { message, .. } => assert!(message.contains(key), "{msg}"),
            ConfigError::Read { .. } => panic!("unexpected {msg}"),
        }
        assert!(
            msg.starts_with(&format!("config lb.toml line {line}: ")),
            "{msg}"
        );
        assert!(
            msg.contains(fragment),
            "\"{msg}\" does not say \"{fragment}\""
        );
        assert!(!msg.contains('\n'), "{msg}");
        err
    }

    /// A valid config with one TCP service "web"; tests append keys to its last table.
    fn web(extra: &str) -> String {
        format!(
            "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n{extra}"
        )
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../packaging/lb.toml");
        let config =
            Config::parse(text, "packaging/lb.toml").expect("the shipped example is valid");
        assert_eq!(config.services[0].backends.len(), 2);
    }

    #[test]
    fn example_parses() {
        let config = Config::parse(EXAMPLE, "lb.toml").expect("example is valid");
        let want = Config {
            interfaces: vec!["eth0".to_owned(), "eth1".to_owned()],
            maglev_table_size: 65537,
            flows: FlowSettings {
                capacity: 1_048_576,
                snat_port_min: 10_000,
                snat_port_max: 32_767,
                timeouts: FlowTimeouts {
                    tcp_syn: Duration::from_secs(4),
                    tcp_established: Duration::from_secs(300),
                    tcp_half_closed: Duration::from_secs(90),
                    tcp_closing: Duration::from_secs(10),
                    udp_unreplied: Duration::from_secs(20),
                    udp_replied: Duration::from_secs(30),
                },
            },
            host: HostCgroup::Dir(PathBuf::from("/sys/fs/cgroup/lb-clients")),
            services: vec![ServiceConfig {
                name: "web".to_owned(),
                vip: addr("198.18.100.1:80"),
                protocol: Protocol::Tcp,
                mode: ForwardingMode::Nat,
                snat: vec![Ipv4Addr::new(198, 18, 2, 1).into()],
                mss: Some(Mss::Fixed(1360)),
                health: HealthConfig {
                    kind: HealthKind::Http(HttpCheck::new("/healthz")),
                    port: Some(8080),
                    interval: Duration::from_millis(500),
                    timeout: Duration::from_millis(300),
                    rise: 2,
                    fall: 2,
                },
                on_backend_down: OnBackendDown::Reset,
                removal_grace: Duration::from_secs(30),
                slow_start: Duration::from_secs(10),
                discovery: Some(DiscoveryConfig {
                    host: "api".to_owned(),
                    port: 8001,
                    interval: Duration::from_millis(500),
                    weight: 3,
                }),
                discovered: Vec::new(),
                backends: vec![BackendConfig {
                    address: addr("198.18.2.11:8000"),
                    weight: 4,
                }],
            }],
        };
        assert_eq!(config, want);
    }

    #[test]
    fn defaults_apply_when_omitted() {
        let text = r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.11:8000"
[[service]]
name = "dns"
vip = "198.18.100.1:53"
protocol = "udp"
"#;
        let config = Config::parse(text, "lb.toml").expect("config is valid");
        assert_eq!(config.maglev_table_size, DEFAULT_MAGLEV_SIZE);
        assert_eq!(config.flows, FlowSettings::default());
        assert_eq!(config.flows.capacity, DEFAULT_FLOW_CAPACITY);
        assert_eq!(
            (config.flows.snat_port_min, config.flows.snat_port_max),
            (10_000, 32_767)
        );
        let [web, dns] = &config.services[..] else {
            panic!("two services: {config:?}")
        };
        assert_eq!(web.protocol, Protocol::Tcp);
        assert!(web.snat.is_empty());
        assert_eq!(web.on_backend_down, OnBackendDown::Keep);
        assert_eq!(web.removal_grace, DEFAULT_REMOVAL_GRACE);
        assert_eq!(web.slow_start, Duration::ZERO);
        assert_eq!(
            web.backends,
            [BackendConfig {
                address: addr("198.18.2.11:8000"),
                weight: 1
            }]
        );
        let tcp_health = HealthConfig {
            kind: HealthKind::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        };
        assert_eq!(web.health, tcp_health);
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(
            dns.health,
            HealthConfig {
                kind: HealthKind::None,
                ..tcp_health
            }
        );
        assert!(dns.backends.is_empty());
    }

    #[test]
    fn an_http_check_takes_host_status_ranges_and_an_expected_body() {
        let text = web(
            "[service.health]\nkind = \"http\"\npath = \"/healthz\"\nhost = \"api.example\"\n\
             status = \"200-299, 503\"\nexpect = \"ok\"\n",
        );
        let config = Config::parse(&text, "lb.toml").expect("config is valid");
        assert_eq!(
            config.services[0].health.kind,
            HealthKind::Http(HttpCheck {
                path: "/healthz".into(),
                host: Some("api.example".into()),
                status: vec![(200, 299), (503, 503)],
                expect: Some("ok".into()),
            })
        );
        let HealthKind::Http(check) = &config.services[0].health.kind else {
            unreachable!()
        };
        assert!(check.accepts(204) && check.accepts(503));
        assert!(!check.accepts(302) && !check.accepts(500));
        for (line, key, message) in [
            (
                "status = \"2xx\"",
                "status",
                "is not a list of statuses or ranges",
            ),
            ("status = \"399-200\"", "status", "within 100-599"),
            ("status = \"200-700\"", "status", "within 100-599"),
            ("host = \"a b\"", "host", "without spaces"),
            ("host = \"\"", "host", "without spaces"),
            (
                "expect = \"\"",
                "expect",
                "expect must hold 1 to 1024 bytes",
            ),
            (
                "send = \"x\"",
                "send",
                "send is only used with kind = \"udp\", not \"http\"",
            ),
        ] {
            assert_error(
                &web(&format!(
                    "[service.health]\nkind = \"http\"\n{line} # <- {key}\n"
                )),
                message,
            );
        }
        assert_error(
            &web("[service.health]\nkind = \"tcp\"\nhost = \"x\" # <- host\n"),
            "host is only used with kind = \"http\", not \"tcp\"",
        );
        // Checks saved before these keys existed still load, with 2xx and 3xx accepted.
        let saved: HealthKind = serde_json::from_str(r#"{"http":{"path":"/"}}"#).expect("old form");
        assert_eq!(saved, HealthKind::Http(HttpCheck::new("/")));
    }

    #[test]
    fn a_udp_service_checks_with_a_datagram() {
        let text = web(
            "protocol = \"udp\"\n[service.health]\nkind = \"udp\"\nsend = \"ping\"\nexpect = \"pong\"\n",
        );
        let config = Config::parse(&text, "lb.toml").expect("config is valid");
        assert_eq!(
            config.services[0].health.kind,
            HealthKind::Udp {
                send: "ping".into(),
                expect: Some("pong".into())
            }
        );
        let text = web("protocol = \"udp\"\n[service.health]\nkind = \"udp\"\n");
        let config = Config::parse(&text, "lb.toml").expect("config is valid");
        assert_eq!(
            config.services[0].health.kind,
            HealthKind::Udp {
                send: DEFAULT_UDP_PROBE.into(),
                expect: None
            }
        );
        assert_error(
            &web("[service.health]\nkind = \"udp\" # <- kind\n"),
            "kind \"udp\" is for UDP services",
        );
        assert_error(
            &web("[service.health]\nkind = \"tcp\"\nexpect = \"ok\" # <- expect\n"),
            "expect is only used with kind = \"http\" or \"udp\", not \"tcp\"",
        );
        assert_error(
            &web("protocol = \"udp\"\n[service.health]\nkind = \"udp\"\nsend = \"\" # <- send\n"),
            "send must hold 1 to 1024 bytes",
        );
    }

    #[test]
    fn health_defaults_fill_a_partial_section() {
        let text = web("[service.health]\nkind = \"http\"\ninterval = \"100ms\"\n");
        let config = Config::parse(&text, "lb.toml").expect("config is valid");
        let health = &config.services[0].health;
        assert_eq!(health.kind, HealthKind::Http(HttpCheck::new("/")));
        // The default timeout (500ms) shrinks to the interval.
        assert_eq!(health.timeout, Duration::from_millis(100));
        // A UDP service can still ask for probes, e.g. of a TCP port next to it.
        let text = web("protocol = \"udp\"\n[service.health]\nkind = \"tcp\"\nport = 9000\n");
        let config = Config::parse(&text, "lb.toml").expect("config is valid");
        assert_eq!(config.services[0].health.kind, HealthKind::Tcp);
        assert_eq!(config.services[0].health.port, Some(9000));
    }

    #[test]
    fn weight_error_reads_as_documented() {
        let text = r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.10:8000"
weight = 1
[[service.backend]]
address = "198.18.2.12:8000"
# The next backend's weight is on line 14.

[[service.backend]]
address = "198.18.2.11:8000"
weight = 70000
"#;
        let err = Config::parse(text, "lb.toml").expect_err("weight is out of range");
        assert_eq!(
            err.to_string(),
            "config lb.toml line 14: key \"weight\": service \"web\" backend 198.18.2.11:8000: \
             weight 70000 is out of range 0..=10000"
        );
    }

    #[test]
    fn connection_settings_are_checked() {
        assert_error(
            &web("on_backend_down = \"drop\" # <- on_backend_down\n"),
            "is not one of \"keep\", \"reset\"",
        );
        assert_error(
            &web("removal_grace = \"2d\" # <- removal_grace\n"),
            "removal_grace",
        );
        assert_error(
            &web("removal_grace = \"25h\" # <- removal_grace\n"),
            "out of range 0s..=24h",
        );
        assert_error(
            &web("slow_start = \"2h\" # <- slow_start\n"),
            "out of range 0s..=1h",
        );
        assert_error(&web("slow_start = 10 # <- slow_start\n"), "slow_start");
    }

    #[test]
    fn mss_is_a_value_or_auto_for_tcp_services() {
        let mss = |text: &str| {
            Config::parse(&web(text), "lb.toml")
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .services[0]
                .mss
        };
        assert_eq!(mss(""), None);
        assert_eq!(mss("mss = 1360\n"), Some(Mss::Fixed(1360)));
        assert_eq!(mss("mss = \"auto\"\n"), Some(Mss::Auto));
        for value in ["535", "65496", "-1", "\"1360\"", "\"max\"", "1360.5"] {
            let err = assert_error(&web(&format!("mss = {value} # <- mss\n")), "mss");
            assert!(err.to_string().contains("mss"), "{value}: {err}");
        }
        assert_error(
            &web("protocol = \"udp\"\nmss = 1360 # <- mss\n"),
            "TCP services only",
        );
    }

    #[test]
    fn mode_is_nat_by_default_and_dnat_takes_no_snat() {
        let mode = |text: &str| {
            Config::parse(&web(text), "lb.toml")
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .services[0]
                .mode
        };
        assert_eq!(mode(""), ForwardingMode::Nat);
        assert_eq!(mode("mode = \"nat\"\n"), ForwardingMode::Nat);
        assert_eq!(mode("mode = \"dnat\"\n"), ForwardingMode::Dnat);
        assert_eq!(mode("mode = \"dsr\"\n"), ForwardingMode::DsrL2);
        assert_eq!(
            mode("mode = \"dsr\"\ndsr = \"l2\"\n"),
            ForwardingMode::DsrL2
        );
        assert_error(
            &web("mode = \"tunnel\" # <- mode\n"),
            "mode \"tunnel\" is not one of \"nat\", \"dnat\", \"dsr\"",
        );
        assert_error(
            &web("mode = \"dsr\"\ndsr = \"gre\" # <- dsr\n"),
            "dsr \"gre\" is not one of \"l2\", \"ipip\", \"gue\"",
        );
        assert_eq!(
            mode("mode = \"dsr\"\ndsr = \"ipip\"\nsnat = \"198.18.1.1\"\n"),
            ForwardingMode::DsrIpip
        );
        assert_eq!(
            mode("mode = \"dsr\"\ndsr = \"gue\"\n"),
            ForwardingMode::DsrGue
        );
        assert_error(
            &web("mode = \"dsr\"\nsnat = \"198.18.1.1\" # <- snat\n"),
            "snat has no use in mode \"dsr-l2\"",
        );
        assert_error(
            &web("dsr = \"l2\" # <- dsr\n"),
            "dsr applies to mode \"dsr\" only",
        );
        assert_error(
            &web(
                "mode = \"dsr\"\n[[service.backend]]\naddress = \"198.18.1.11:8080\" # <- address\n",
            ),
            "listens on the VIP's port 80",
        );
        let dsr = Config::parse(
            &web("mode = \"dsr\"\n[[service.backend]]\naddress = \"198.18.1.11:80\"\n"),
            "lb.toml",
        )
        .expect("a DSR backend on the VIP's port");
        assert_eq!(dsr.services[0].mode.to_string(), "dsr-l2");
        assert_error(
            &web("mode = \"dnat\"\nsnat = \"198.18.1.1\" # <- snat\n"),
            "snat has no use in mode \"dnat\"",
        );
        // Saved services of builds before modes load as NAT; a NAT service saves no mode.
        let service = &Config::parse(&web(""), "lb.toml").expect("valid").services[0];
        let saved = serde_json::to_value(service).expect("serialize");
        assert!(saved.get("mode").is_none(), "{saved}");
        let dnat = ServiceConfig {
            mode: ForwardingMode::Dnat,
            ..service.clone()
        };
        let saved = serde_json::to_string(&dnat).expect("serialize");
        let loaded: ServiceConfig = serde_json::from_str(&saved).expect("load");
        assert_eq!(loaded.mode, ForwardingMode::Dnat);
    }

    #[test]
    fn discovery_is_checked() {
        let text = |d: &str| web(&format!("[service.discovery]\n{d}"));
        let parsed = Config::parse(&text("dns = \"api.internal:8001\"\n"), "lb.toml")
            .expect("valid discovery");
        let d = parsed.services[0].discovery.clone().expect("discovery");
        assert_eq!((d.host.as_str(), d.port), ("api.internal", 8001));
        assert_eq!((d.interval, d.weight), (DEFAULT_DISCOVERY_INTERVAL, 1));
        assert_error(
            &web("[service.discovery] # <- dns\ninterval = \"1s\"\n"),
            "is required",
        );
        for (lines, fragment) in [
            ("dns = \"api\" # <- dns\n", "is not NAME:PORT"),
            ("dns = \"api:0\" # <- dns\n", "is not NAME:PORT"),
            ("dns = \"api:70000\" # <- dns\n", "is not NAME:PORT"),
            ("dns = \"a pi:80\" # <- dns\n", "is not a host name"),
            ("dns = \":80\" # <- dns\n", "is not a host name"),
            (
                "dns = \"api:80\"\ninterval = \"10ms\" # <- interval\n",
                "out of range",
            ),
            (
                "dns = \"api:80\"\nweight = 10001 # <- weight\n",
                "out of range",
            ),
            ("dns = \"api:80\"\nttl = 5 # <- ttl\n", "unknown field"),
        ] {
            let err = assert_error(&text(lines), fragment);
            assert!(err.to_string().contains(fragment), "{lines}: {err}");
        }
    }

    #[test]
    fn host_cgroup_is_a_path_or_off() {
        let host = |text: &str| {
            Config::parse(&format!("interfaces = [\"eth0\"]\n{text}"), "lb.toml")
                .map(|c| c.host)
                .ok()
        };
        assert_eq!(host(""), Some(HostCgroup::Root));
        assert_eq!(host("[host]\ncgroup = \"off\"\n"), Some(HostCgroup::Off));
        assert_error(
            "interfaces = [\"eth0\"]\n[host]\ncgroup = \"lb\" # <- cgroup\n",
            "not an absolute path",
        );
        assert_error(
            "interfaces = [\"eth0\"]\n[host]\nbalance = true # <- balance\n",
            "unknown field",
        );
    }

    #[test]
    fn mss_auto_takes_the_smallest_mtu() {
        assert_eq!(
            Mss::Auto.resolve([1500, 1400, 9000], MSS_HEADROOM),
            Some(1360)
        );
        assert_eq!(Mss::Auto.resolve([1500, 1400], MSS_HEADROOM6), Some(1340));
        assert_eq!(Mss::Auto.resolve([], MSS_HEADROOM), None);
        // A tiny MTU still leaves the floor every host accepts.
        assert_eq!(Mss::Auto.resolve([68], MSS_HEADROOM), Some(536));
        assert_eq!(Mss::Fixed(1200).resolve([1500], MSS_HEADROOM), Some(1200));
    }

    #[test]
    fn mss_round_trips_as_saved() {
        for mss in [Mss::Auto, Mss::Fixed(1360)] {
            let text = serde_json::to_string(&mss).expect("serializes");
            assert_eq!(
                serde_json::from_str::<Mss>(&text).expect("parses back"),
                mss
            );
        }
        assert_eq!(
            serde_json::to_string(&Mss::Fixed(1360)).expect("serializes"),
            "1360"
        );
        assert!(serde_json::from_str::<Mss>("100").is_err());
    }

    #[test]
    fn bad_toml_syntax() {
        assert_error(&web("snat = 198.18.2.1 # <- snat\n"), "snat");
        assert_error(
            &web("snat = \"198.18.2.1 # <- snat\n"),
            "invalid basic string",
        );
        assert_error(&web("name = \"api\" # <- name\n"), "duplicate key");
        // No key to name on a table header: the line alone must do.
        assert_error(&web("[[service.backend] # <- \n"), "unclosed array table");
    }

    #[test]
    fn wrong_type_names_the_key() {
        assert_error(
            &web("[[service.backend]]\naddress = \"198.18.2.11:80\"\nweight = \"4\" # <- weight\n"),
            "invalid type",
        );
    }

    #[test]
    fn unknown_keys() {
        assert_error(
            "interfaces = [\"eth0\"]\ninterface = \"eth1\" # <- interface\n",
            "unknown field",
        );
        assert_error(
            &web("[[service.backend]]\naddress = \"198.18.2.11:80\"\nwieght = 2 # <- wieght\n"),
            "unknown field",
        );
        assert_error(
            &web("[service.health]\nretries = 3 # <- retries\n"),
            "unknown field",
        );
        assert_error(
            "interfaces = [\"eth0\"]\n[flows]\nsize = 3 # <- size\n",
            "unknown field",
        );
    }

    #[test]
    fn missing_vip() {
        let text =
            "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\" # <- vip\nprotocol = \"udp\"\n";
        assert_error(text, "vip is required");
    }

    #[test]
    fn missing_name_and_address() {
        assert_error(
            "interfaces = [\"eth0\"]\n[[service]] # <- name\nvip = \"198.18.100.1:80\"\n",
            "no name",
        );
        assert_error(
            &web("[[service.backend]] # <- address\nweight = 2\n"),
            "no address",
        );
    }

    #[test]
    fn bad_vip() {
        let text = "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1\" # <- vip\n";
        assert_error(text, "is not an address and port");
        let text =
            "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"::1:80\" # <- vip\n";
        assert_error(text, "is not an address and port");
    }

    #[test]
    fn port_zero() {
        let text = "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:0\" # <- vip\n";
        assert_error(text, "port 0");
        assert_error(
            &web("[[service.backend]]\naddress = \"198.18.2.11:0\" # <- address\n"),
            "port 0",
        );
        assert_error(
            &web("[service.health]\nport = 0 # <- port\n"),
            "port 0 is out of range 1..=65535",
        );
    }

    #[test]
    fn bad_protocol() {
        assert_error(
            &web("protocol = \"sctp\" # <- protocol\n"),
            "\"sctp\" is not one of \"tcp\", \"udp\"",
        );
    }

    #[test]
    fn bad_snat() {
        assert_error(
            &web("snat = \"198.18.2\" # <- snat\n"),
            "is not an IP address",
        );
        for (value, fragment) in [
            ("[]", "empty list"),
            ("[\"198.18.2.1\", \"198.18.2.1\"]", "lists 198.18.2.1 twice"),
            (
                "[\"198.18.2.0/31\", \"198.18.2.1\"]",
                "lists 198.18.2.1 twice",
            ),
            (
                "\"198.18.2.0/29\"",
                "holds 8 addresses; a SNAT pool holds at most 4",
            ),
            ("[\"198.18.2.0/30\", \"198.18.3.1\"]", "has 5 addresses"),
            (
                "\"198.18.2.1/30\"",
                "host bits set; the prefix starts at 198.18.2.0",
            ),
            ("\"198.18.2.0/33\"", "prefix length above 32"),
            ("[\"198.18.2.1\", 7]", "snat"),
            ("\"0.0.0.0\"", "cannot be a source address"),
        ] {
            assert_error(&web(&format!("snat = {value} # <- snat\n")), fragment);
        }
    }

    #[test]
    fn snat_pools() {
        let pool = |value: &str| {
            let config = Config::parse(&web(&format!("snat = {value}\n")), "lb.toml")
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            config.services[0].snat.clone()
        };
        let a = |last: u8| Ipv4Addr::new(198, 18, 2, last);
        assert_eq!(pool("\"198.18.2.1\""), [a(1)]);
        assert_eq!(pool("[\"198.18.2.9\", \"198.18.2.1\"]"), [a(9), a(1)]);
        assert_eq!(pool("\"198.18.2.4/30\""), [a(4), a(5), a(6), a(7)]);
        assert_eq!(
            pool("[\"198.18.2.2/31\", \"198.18.2.9/32\"]"),
            [a(2), a(3), a(9)]
        );
    }

    #[test]
    fn ipv6_services_parse_and_keep_to_one_family() {
        // The family checks point at the VIP's line.
        let v6_at = |vip_mark: &str, extra: &str| {
            format!(
                "interfaces = [\"eth0\"]\n[[service]]\nname = \"web6\"\nvip = \"[fd00:100::1]:80\"{vip_mark}\n{extra}"
            )
        };
        let v6 = |extra: &str| v6_at("", extra);
        let v6_vip = |extra: &str| v6_at(" # <- vip", extra);
        let text = v6(
            "snat = \"fd00:2::/127\"\n[[service.backend]]\naddress = \"[fd00:1::11]:8000\"\nweight = 4\n",
        );
        let config = Config::parse(&text, "lb.toml").expect("valid");
        let service = &config.services[0];
        assert_eq!(service.vip, addr("[fd00:100::1]:80"));
        assert_eq!(
            service.snat,
            [
                "fd00:2::".parse::<IpAddr>().expect("an address"),
                "fd00:2::1".parse().expect("an address")
            ]
        );
        assert_eq!(service.backends[0].address, addr("[fd00:1::11]:8000"));
        assert_eq!(crate::layout::check(&config.services), Ok(()));
        assert_error(
            &v6_vip("[[service.backend]]\naddress = \"198.18.2.11:8000\"\n"),
            "backend 198.18.2.11:8000 is IPv4 but vip [fd00:100::1]:80 is IPv6",
        );
        assert_error(
            &v6_vip("snat = \"198.18.2.1\"\n"),
            "snat 198.18.2.1 is IPv4 but vip [fd00:100::1]:80 is IPv6",
        );
        assert_error(
            "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\" # <- vip\n[[service.backend]]\naddress = \"[fd00:1::11]:8000\"\n",
            "is IPv6 but vip 198.18.100.1:80 is IPv4",
        );
        for form in ["ipip", "gue"] {
            let tunnel = v6(&format!(
                "mode = \"dsr\"\ndsr = \"{form}\"\n[[service.backend]]\naddress = \"[fd00:9::11]:80\"\n"
            ));
            let tunnel = Config::parse(&tunnel, "lb.toml").expect("valid");
            assert!(tunnel.services[0].mode.is_tunnel(), "{form}");
        }
        let l2 = v6(
            "mode = \"dsr\"\ndsr = \"l2\"\n[[service.backend]]\naddress = \"[fd00:1::11]:80\"\n",
        );
        let l2 = Config::parse(&l2, "lb.toml").expect("valid");
        assert_eq!(l2.services[0].mode, ForwardingMode::DsrL2);
        let dnat = v6("mode = \"dnat\"\n[[service.backend]]\naddress = \"[fd00:1::11]:8000\"\n");
        let dnat = Config::parse(&dnat, "lb.toml").expect("valid");
        assert_eq!(dnat.services[0].mode, ForwardingMode::Dnat);
        assert_error(
            &v6("snat = \"fd00:2::/64\" # <- snat\n"),
            "holds 2^64 addresses",
        );
        assert_error(
            &v6("snat = \"fd00:2::1/126\" # <- snat\n"),
            "host bits set; the prefix starts at fd00:2::",
        );
    }

    #[test]
    fn saved_services_from_before_pools_load() {
        let config = Config::parse(&web(""), "lb.toml").expect("valid");
        let load = |snat: serde_json::Value| {
            let mut saved = serde_json::to_value(&config.services[0]).expect("serializes");
            saved["snat"] = snat.clone();
            serde_json::from_value::<ServiceConfig>(saved)
                .unwrap_or_else(|e| panic!("{snat}: {e}"))
                .snat
        };
        let a = Ipv4Addr::new(198, 18, 2, 1);
        assert!(load(serde_json::Value::Null).is_empty());
        assert_eq!(load(serde_json::json!("198.18.2.1")), [a]);
        assert_eq!(load(serde_json::json!(["198.18.2.1"])), [a]);
    }

    #[test]
    fn bad_duration() {
        assert_error(
            &web("[service.health]\ninterval = \"5x\" # <- interval\n"),
            "\"5x\" is not a duration",
        );
        assert_error(
            &web("[service.health]\ninterval = \"1d\" # <- interval\n"),
            "is not a duration",
        );
        assert_error(
            &web("[service.health]\ninterval = \"2h\" # <- interval\n"),
            "out of range 10ms..=1h",
        );
        let text = "interfaces = [\"eth0\"]\n[flows]\nudp_idle_timeout = \"500ms\" # <- udp_idle_timeout\n";
        assert_error(text, "out of range 1s..=24h");
    }

    #[test]
    fn timeout_above_interval() {
        let text = web("[service.health]\ninterval = \"1s\"\ntimeout = \"2s\" # <- timeout\n");
        assert_error(&text, "at most the interval, 1s");
        assert_error(
            &web("[service.health]\ntimeout = \"0ms\" # <- timeout\n"),
            "above 0",
        );
    }

    #[test]
    fn rise_zero() {
        assert_error(
            &web("[service.health]\nrise = 0 # <- rise\n"),
            "rise 0 is out of range 1..=100",
        );
        assert_error(
            &web("[service.health]\nfall = 101 # <- fall\n"),
            "fall 101 is out of range 1..=100",
        );
    }

    #[test]
    fn bad_health_kind() {
        assert_error(
            &web("[service.health]\nkind = \"icmp\" # <- kind\n"),
            "\"icmp\" is not",
        );
    }

    #[test]
    fn weight_out_of_range() {
        let backend = "[[service.backend]]\naddress = \"198.18.2.11:8000\"\n";
        assert_error(
            &web(&format!("{backend}weight = 10001 # <- weight\n")),
            "out of range 0..=10000",
        );
        assert_error(
            &web(&format!("{backend}weight = -1 # <- weight\n")),
            "weight -1 is out of range",
        );
    }

    #[test]
    fn duplicate_backend() {
        let text = web("[[service.backend]]\naddress = \"198.18.2.11:8000\"\n\
             [[service.backend]]\naddress = \"198.18.2.11:8000\" # <- address\n");
        assert_error(
            &text,
            "backend 198.18.2.11:8000 is listed twice (first at line 6)",
        );
    }

    #[test]
    fn duplicate_service_name() {
        let text = web("[[service]]\nname = \"web\" # <- name\nvip = \"198.18.100.2:80\"\n");
        assert_error(&text, "service \"web\" is defined twice (first at line 3)");
    }

    #[test]
    fn duplicate_vip_and_protocol() {
        let text = web("[[service]]\nname = \"api\"\nvip = \"198.18.100.1:80\" # <- vip\n");
        assert_error(
            &text,
            "vip 198.18.100.1:80 (tcp) is already used by service \"web\"",
        );
        let text =
            web("[[service]]\nname = \"quic\"\nvip = \"198.18.100.1:80\"\nprotocol = \"udp\"\n");
        let config = Config::parse(&text, "lb.toml").expect("same VIP, other protocol is valid");
        assert_eq!(config.services[1].protocol, Protocol::Udp);
    }

    #[test]
    fn bad_service_name() {
        let text = "interfaces = [\"eth0\"]\n[[service]]\nname = \"web site\" # <- name\n";
        assert_error(text, "is not 1 to 64 of");
    }

    #[test]
    fn maglev_size() {
        let text = "interfaces = [\"eth0\"]\nmaglev_table_size = 65536 # <- maglev_table_size\n";
        assert_error(text, "65536 is not prime");
        let text = "interfaces = [\"eth0\"]\nmaglev_table_size = 97 # <- maglev_table_size\n";
        assert_error(text, "out of range 101..=131071");
    }

    #[test]
    fn flow_capacity() {
        let text = "interfaces = [\"eth0\"]\n[flows]\ncapacity = 1000 # <- capacity\n";
        assert_error(text, "flows: capacity 1000 is out of range 1024..=67108864");
    }

    #[test]
    fn snat_ports() {
        let check = |value: &str, fragment: &str| {
            let text = format!(
                "interfaces = [\"eth0\"]\n[flows]\nsnat_ports = \"{value}\" # <- snat_ports\n"
            );
            assert_error(&text, fragment);
        };
        check("10000", "is not a port range");
        check("10000-", "is not a port range");
        check("a-b", "is not a port range");
        check("+1-5", "is not a port range");
        check("20000-10000", "20000 is above 10000");
        check("80-10000", "starts below 1024");
        check("10000-65536", "ends above 65535");
        check("10000-99999999999999999999", "is not a port range");
        let text = "interfaces = [\"eth0\"]\n[flows]\nsnat_ports = \"1024-65535\"\n";
        let config = Config::parse(text, "lb.toml").expect("full range is valid");
        assert_eq!(
            (config.flows.snat_port_min, config.flows.snat_port_max),
            (1024, 65535)
        );
    }

    #[test]
    fn interfaces() {
        assert_error("interfaces = [] # <- interfaces\n", "is empty");
        assert_error(
            "# <- interfaces\nmaglev_table_size = 65537\n",
            "interfaces is required",
        );
        assert_error(
            "interfaces = [\"eth0\", \"eth0\"] # <- interfaces\n",
            "listed twice",
        );
        assert_error(
            "interfaces = [\"a-very-long-name0\"] # <- interfaces\n",
            "not a network device",
        );
        assert_error(
            "interfaces = [\"eth0:1\"] # <- interfaces\n",
            "not a network device",
        );
    }

    #[test]
    fn path_needs_kind_http() {
        let text = web("[service.health]\nkind = \"tcp\"\npath = \"/healthz\" # <- path\n");
        assert_error(&text, "only used with kind = \"http\"");
        // A UDP service's default kind is none.
        let text = web("protocol = \"udp\"\n[service.health]\npath = \"/\" # <- path\n");
        assert_error(&text, "only used with kind = \"http\"");
        let text = web("[service.health]\nkind = \"http\"\npath = \"healthz\" # <- path\n");
        assert_error(&text, "must start with '/'");
    }

    fn services(count: u32) -> String {
        let mut text = String::from("interfaces = [\"eth0\"]\n");
        for i in 0..count {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"198.18.100.1:{}\"\n",
                1000 + i
            );
        }
        text
    }

    #[test]
    fn too_many_services() {
        let text = services(MAX_SERVICES);
        assert_eq!(
            Config::parse(&text, "lb.toml")
                .expect("64 services fit")
                .services
                .len(),
            64
        );
        let text =
            services(MAX_SERVICES + 1).replace("name = \"s64\"", "name = \"s64\" # <- service");
        assert_error(&text, "more than 64 services");
    }

    #[test]
    fn too_many_backends() {
        let mut text = web("");
        for i in 0..MAX_BACKENDS {
            text += &format!(
                "[[service.backend]]\naddress = \"198.18.{}.{}:80\"\n",
                i / 200,
                i % 200
            );
        }
        assert_eq!(
            Config::parse(&text, "lb.toml").expect("1024 fit").services[0]
                .backends
                .len(),
            1024
        );
        text += "[[service.backend]]\naddress = \"198.18.99.1:80\" # <- backend\n";
        assert_error(&text, "more than 1024 backends");
    }

    #[test]
    fn missing_file() {
        let path = Path::new("/nonexistent/lb.toml");
        let err = Config::load(path).expect_err("file is missing");
        assert!(
            matches!(&err, ConfigError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert_eq!(err.line(), None);
        assert!(
            err.to_string()
                .starts_with("cannot read config /nonexistent/lb.toml: "),
            "{err}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let path = std::env::temp_dir().join(format!("lb-config-test-{}.toml", std::process::id()));
        fs::write(&path, "interfaces = [\"eth0\"]\nmaglev_table_size = 4\n")
            .expect("temp file is writable");
        let err = Config::load(&path).expect_err("size 4 is invalid");
        fs::remove_file(&path).expect("temp file is removable");
        assert!(
            err.to_string()
                .starts_with(&format!("config {} line 2: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "", "5", "s", "1.5s", "-1s", "1 s", " 1s", "1S", "1sec", "1d", "1msx",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} is not a duration");
        }
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
        for d in ["1h", "90m", "61s", "1500ms", "0s"] {
            assert_eq!(format_duration(parse_duration(d).expect("valid")), d);
        }
    }

    #[test]
    fn protocol_numbers_and_names() {
        assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
        assert_eq!(
            (Protocol::Tcp.to_string(), Protocol::Udp.to_string()),
            ("tcp".into(), "udp".into())
        );
    }
}
