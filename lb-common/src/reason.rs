//! Why a packet was passed to the kernel or dropped. Each reason has its own counter slot in
//! STATS; numbers are never reused (a retired reason keeps its slot).

/// A packet handed to the kernel's stack. Most are simply not ours.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// Not IP (ARP, VLAN-tagged, ...), or IPv6 where only IPv4 is served (the tc hook).
    NotIpv4 = 1,
    /// Shorter than an Ethernet header.
    ShortEthernet = 2,
    /// Shorter than its IPv4 header, a header length below 20 bytes, or a version other than 4.
    MalformedIpv4 = 3,
    /// A fragment the balancer does not forward: a later fragment of no datagram whose first
    /// fragment it balanced (or after FRAGMENT_FOLLOW_NS), or a fragment of TCP or another
    /// protocol. The kernel reassembles what is its own.
    Fragment = 4,
    /// Neither TCP nor UDP, nor ICMP the balancer answers or translates.
    NotTcpUdp = 5,
    /// Shorter than its TCP or UDP header.
    ShortL4 = 6,
    /// No flow and no service for this destination.
    NotService = 7,
    /// TTL would expire; the kernel sends the ICMP error.
    TtlExpired = 8,
    /// The next hop's MAC is not resolved yet: the rewritten packet goes up so that the kernel
    /// forwards it and resolves the neighbour.
    NeighbourUnresolved = 9,
    /// The egress interface is not one the balancer forwards through: the kernel forwards the
    /// rewritten packet.
    EgressNotManaged = 10,
    /// The rewritten destination is an address of this host: the kernel delivers it.
    LocalDestination = 11,
    /// An ICMP error whose quoted packet is no flow's (or too short to tell): the kernel's.
    IcmpNoFlow = 12,
    /// Larger than the egress MTU without DF: the kernel fragments the rewritten packet.
    NeedsFragmenting = 13,
    /// The egress is a bridge of containers: the kernel forwards the rewritten packet into it.
    EgressBridge = 14,
    /// Shorter than an IPv6 header, or a version other than 6.
    MalformedIpv6 = 15,
    /// IPv6 with extension headers (hop-by-hop options, routing, a fragment header behind
    /// another, ...) before its TCP or UDP header: not balanced, the kernel's.
    Ipv6ExtensionHeaders = 16,
}

/// A packet the balancer consumed without forwarding.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The service has no backend that takes new flows (all weights 0, or none healthy).
    NoBackend = 1,
    /// A TCP segment without SYN for a service, with no flow, that gets no RST in answer: an RST
    /// itself, or one past the CPU's budget of answers (RESETS_PER_SEC_PER_CPU).
    TcpNoFlow = 2,
    /// No free SNAT port for this backend after SNAT_PORT_TRIES tries.
    SnatPortsExhausted = 3,
    /// FLOWS is full.
    FlowTableFull = 4,
    /// The kernel's forwarding is off on the ingress interface (bpf_fib_lookup needs it).
    FibForwardingDisabled = 5,
    /// No route to the rewritten destination (unreachable, blackhole, prohibit).
    FibNoRoute = 6,
    /// Larger than the egress MTU with DF set, and no "fragmentation needed" could be sent
    /// (the packet has IP options, or it is a forwarded ICMP error itself); an IPv6 fragment
    /// too big (no "packet too big" for a fragment); at the tc hook, any packet too big.
    FibFragNeeded = 7,
    /// Any other bpf_fib_lookup failure.
    FibOther = 8,
    /// A map held an id out of range: a daemon bug, counted rather than trusted.
    Inconsistent = 9,
    /// The redirect to the egress device failed.
    RedirectFailed = 10,
    /// A backend answered a new connection's SYN with RST (it is up, nothing listens): the RST
    /// is kept from the client, whose retransmitted SYN goes to another backend.
    BackendRefused = 11,
    /// A TCP segment to a VIP or of a flow with flags no stack sends (SYN+FIN, SYN+RST, a FIN
    /// without ACK, none at all): dropped before it can open or move a connection.
    TcpInvalidFlags = 12,
    /// An echo request to a VIP past the CPU's budget of answers (ECHO_REPLIES_PER_SEC_PER_CPU):
    /// the balancer must not be a ping flood's amplifier.
    IcmpEchoLimited = 13,
    /// An ICMP error to forward for a flow, or a "fragmentation needed" to send, past the CPU's
    /// budget (ICMP_ERRORS_PER_SEC_PER_CPU).
    IcmpErrorLimited = 14,
    /// A DNAT service's new flow whose tuple towards its backend (the client's address and
    /// port) a live connection already holds: the same client tuple, sent to another VIP
    /// whose flow went to the same backend.
    DnatTupleTaken = 15,
    /// A DSR flow's packet that a MAC rewrite cannot deliver: the backend's neighbour entry is
    /// not resolved (health checks keep it resolved), or the way to it is a bridge of
    /// containers or another hook than XDP. Passed up, the VIP would be the kernel's.
    DsrCannotForward = 16,
}

/// Slots of STATS: pass reasons, then drop reasons, then forwarding actions.
pub const STATS_SLOTS: u32 = 192;
pub const STAT_PASS_BASE: u32 = 0;
pub const STAT_DROP_BASE: u32 = 64;
/// Packets sent back out of their ingress device with XDP_TX.
pub const STAT_TX: u32 = 128;
/// Packets redirected to an egress device.
pub const STAT_REDIRECT: u32 = 129;
/// Events, counted besides a packet's verdict: backends marked suspect because they refused a
/// new connection (RST to its SYN) ...
pub const STAT_SUSPECT_REFUSED: u32 = 130;
/// ... or left its SYN unanswered until the client sent it again;
pub const STAT_SUSPECT_UNANSWERED: u32 = 131;
/// new flows steered off a suspect backend to another.
pub const STAT_STEERED_OFF_SUSPECT: u32 = 132;
/// half-open connections whose SNAT port went to a new connection when its tries were taken;
pub const STAT_HALF_OPEN_EVICTED: u32 = 133;
/// flows the data path found past their state's timeout and removed itself.
pub const STAT_EXPIRED_IN_DATA_PATH: u32 = 134;
/// segments to a VIP with no flow answered with an RST (sent by XDP_TX or redirect, and counted
/// there too).
pub const STAT_RESET_NO_FLOW: u32 = 135;
/// connections the in-kernel expiry found past their state's timeout and removed (both
/// entries), and reply entries it removed for having no forward entry.
pub const STAT_EXPIRED_IN_KERNEL: u32 = 136;
/// Passes of the in-kernel expiry over the flow table, and the nanoseconds they took in all
/// (their ratio is a pass's cost, paid in softirq once a second).
pub const STAT_EXPIRY_PASSES: u32 = 137;
pub const STAT_EXPIRY_PASS_NS: u32 = 138;
/// Forward segments whose translated TCP timestamp ran more than `timestamps::AHEAD_MAX` ahead
/// of the balancer's clock, and was held there (a client clock far too fast, or forged).
pub const STAT_TS_CLAMPED: u32 = 139;
/// Echo requests to a VIP answered by the balancer (`icmp.rs`).
pub const STAT_ICMP_ECHO_REPLIED: u32 = 140;
/// ICMP errors about a balanced flow, translated and forwarded (`icmp_error.rs`): to its
/// backend (addressed to the VIP, quoting a reply) ...
pub const STAT_ICMP_ERROR_TO_BACKEND: u32 = 141;
/// ... and to its client (addressed to the SNAT address, quoting a forwarded packet).
pub const STAT_ICMP_ERROR_TO_CLIENT: u32 = 142;
/// "Fragmentation needed" sent by the balancer for a packet too big for its next hop
/// (`too_big.rs`).
pub const STAT_FRAG_NEEDED_SENT: u32 = 143;
/// UDP first fragments of a balanced flow, recorded so that the later ones follow
/// (`fragments.rs`) ...
pub const STAT_FIRST_FRAGMENTS: u32 = 144;
/// ... and later fragments forwarded with their first fragment's rewrite.
pub const STAT_FRAGMENTS_FOLLOWED: u32 = 145;
/// SYNs and SYN-ACKs whose announced MSS was lowered to their service's `mss` (`mss.rs`).
pub const STAT_MSS_CLAMPED: u32 = 146;
/// Connects and datagrams of host clients to a VIP sent to a backend by the socket hooks
/// (`sock.rs`) ...
pub const STAT_HOST_BALANCED: u32 = 147;
/// ... and those left to the VIP for want of a backend.
pub const STAT_HOST_NO_BACKEND: u32 = 148;
/// `lb decap` (`decap.rs`, on a backend): IPIP packets for a VIP it was given, stripped ...
pub const STAT_DECAPSULATED: u32 = 149;
/// ... and IPIP packets for another inner destination, left to the kernel.
pub const STAT_DECAP_UNKNOWN_VIP: u32 = 150;
/// ICMPv6 "packet too big" sent by the balancer for an IPv6 packet too big for its next hop
/// (`too_big.rs`).
pub const STAT_PACKET_TOO_BIG_SENT: u32 = 151;
/// Event slots and their names in status and metrics.
pub const EVENTS: [(u32, &str); 22] = [
    (STAT_SUSPECT_REFUSED, "suspect_refused"),
    (STAT_SUSPECT_UNANSWERED, "suspect_unanswered"),
    (STAT_STEERED_OFF_SUSPECT, "steered_off_suspect"),
    (STAT_HALF_OPEN_EVICTED, "half_open_evicted"),
    (STAT_EXPIRED_IN_DATA_PATH, "expired_in_data_path"),
    (STAT_RESET_NO_FLOW, "reset_no_flow"),
    (STAT_EXPIRED_IN_KERNEL, "expired_in_kernel"),
    (STAT_EXPIRY_PASSES, "expiry_passes"),
    (STAT_EXPIRY_PASS_NS, "expiry_pass_ns"),
    (STAT_TS_CLAMPED, "ts_clamped"),
    (STAT_ICMP_ECHO_REPLIED, "icmp_echo_replied"),
    (STAT_ICMP_ERROR_TO_BACKEND, "icmp_error_to_backend"),
    (STAT_ICMP_ERROR_TO_CLIENT, "icmp_error_to_client"),
    (STAT_FRAG_NEEDED_SENT, "frag_needed_sent"),
    (STAT_FIRST_FRAGMENTS, "first_fragments"),
    (STAT_FRAGMENTS_FOLLOWED, "fragments_followed"),
    (STAT_MSS_CLAMPED, "mss_clamped"),
    (STAT_HOST_BALANCED, "host_balanced"),
    (STAT_HOST_NO_BACKEND, "host_no_backend"),
    (STAT_DECAPSULATED, "decapsulated"),
    (STAT_DECAP_UNKNOWN_VIP, "decap_unknown_vip"),
    (STAT_PACKET_TOO_BIG_SENT, "packet_too_big_sent"),
];

impl PassReason {
    pub const ALL: [PassReason; 16] = [
        Self::NotIpv4,
        Self::ShortEthernet,
        Self::MalformedIpv4,
        Self::Fragment,
        Self::NotTcpUdp,
        Self::ShortL4,
        Self::NotService,
        Self::TtlExpired,
        Self::NeighbourUnresolved,
        Self::EgressNotManaged,
        Self::LocalDestination,
        Self::IcmpNoFlow,
        Self::NeedsFragmenting,
        Self::EgressBridge,
        Self::MalformedIpv6,
        Self::Ipv6ExtensionHeaders,
    ];

    pub const fn stat_slot(self) -> u32 {
        STAT_PASS_BASE + self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::NotIpv4 => "not_ipv4",
            Self::ShortEthernet => "short_ethernet",
            Self::MalformedIpv4 => "malformed_ipv4",
            Self::Fragment => "fragment",
            Self::NotTcpUdp => "not_tcp_udp",
            Self::ShortL4 => "short_l4",
            Self::NotService => "not_service",
            Self::TtlExpired => "ttl_expired",
            Self::NeighbourUnresolved => "neighbour_unresolved",
            Self::EgressNotManaged => "egress_not_managed",
            Self::LocalDestination => "local_destination",
            Self::IcmpNoFlow => "icmp_no_flow",
            Self::NeedsFragmenting => "needs_fragmenting",
            Self::EgressBridge => "egress_bridge",
            Self::MalformedIpv6 => "malformed_ipv6",
            Self::Ipv6ExtensionHeaders => "ipv6_extension_headers",
        }
    }
}

impl DropReason {
    /// The reason numbered `number` (its `as u32`), if there is one. A match, not an index
    /// into ALL: the data path calls it, and the verifier follows a match's bounds.
    pub const fn from_number(number: u32) -> Option<Self> {
        match number {
            1 => Some(Self::NoBackend),
            2 => Some(Self::TcpNoFlow),
            3 => Some(Self::SnatPortsExhausted),
            4 => Some(Self::FlowTableFull),
            5 => Some(Self::FibForwardingDisabled),
            6 => Some(Self::FibNoRoute),
            7 => Some(Self::FibFragNeeded),
            8 => Some(Self::FibOther),
            9 => Some(Self::Inconsistent),
            10 => Some(Self::RedirectFailed),
            11 => Some(Self::BackendRefused),
            12 => Some(Self::TcpInvalidFlags),
            13 => Some(Self::IcmpEchoLimited),
            14 => Some(Self::IcmpErrorLimited),
            15 => Some(Self::DnatTupleTaken),
            16 => Some(Self::DsrCannotForward),
            _ => None,
        }
    }

    pub const ALL: [DropReason; 16] = [
        Self::NoBackend,
        Self::TcpNoFlow,
        Self::SnatPortsExhausted,
        Self::FlowTableFull,
        Self::FibForwardingDisabled,
        Self::FibNoRoute,
        Self::FibFragNeeded,
        Self::FibOther,
        Self::Inconsistent,
        Self::RedirectFailed,
        Self::BackendRefused,
        Self::TcpInvalidFlags,
        Self::IcmpEchoLimited,
        Self::IcmpErrorLimited,
        Self::DnatTupleTaken,
        Self::DsrCannotForward,
    ];

    pub const fn stat_slot(self) -> u32 {
        STAT_DROP_BASE + self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::NoBackend => "no_backend",
            Self::TcpNoFlow => "tcp_no_flow",
            Self::SnatPortsExhausted => "snat_ports_exhausted",
            Self::FlowTableFull => "flow_table_full",
            Self::FibForwardingDisabled => "fib_forwarding_disabled",
            Self::FibNoRoute => "fib_no_route",
            Self::FibFragNeeded => "fib_frag_needed",
            Self::FibOther => "fib_other",
            Self::Inconsistent => "inconsistent",
            Self::RedirectFailed => "redirect_failed",
            Self::BackendRefused => "backend_refused",
            Self::TcpInvalidFlags => "tcp_invalid_flags",
            Self::IcmpEchoLimited => "icmp_echo_limited",
            Self::IcmpErrorLimited => "icmp_error_limited",
            Self::DnatTupleTaken => "dnat_tuple_taken",
            Self::DsrCannotForward => "dsr_cannot_forward",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_are_found_by_their_numbers() {
        for reason in DropReason::ALL {
            assert_eq!(DropReason::from_number(reason as u32), Some(reason));
        }
        assert_eq!(DropReason::from_number(0), None);
        assert_eq!(
            DropReason::from_number(DropReason::ALL.len() as u32 + 1),
            None
        );
    }

    #[test]
    fn slots_are_distinct_and_in_range() {
        let mut seen = [false; STATS_SLOTS as usize];
        let slots = PassReason::ALL
            .iter()
            .map(|r| r.stat_slot())
            .chain(DropReason::ALL.iter().map(|r| r.stat_slot()))
            .chain([STAT_TX, STAT_REDIRECT])
            .chain(EVENTS.iter().map(|e| e.0));
        for slot in slots {
            assert!(slot < STATS_SLOTS);
            assert!(!seen[slot as usize], "slot {slot} used twice");
            seen[slot as usize] = true;
        }
        assert!(
            PassReason::ALL
                .iter()
                .all(|r| r.stat_slot() < STAT_DROP_BASE)
        );
        assert!(DropReason::ALL.iter().all(|r| r.stat_slot() < STAT_TX));
    }
}
