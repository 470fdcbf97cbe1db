//! The connection model: the states a balanced TCP or UDP connection moves through, which
//! segments move it, and how long each state lives without traffic. Pure logic, shared by the
//! data path (which applies it to every packet and expires flows lazily) and the daemon (which
//! sweeps by the same rules), and unit-tested here without a kernel.
//!
//! Both FLOWS entries of a connection carry its state (`FlowValue::state`); each entry tracks
//! only its own direction's sequence space (`seq_next`, `ack_seen`), so the established path
//! reads and writes one entry. The other entry is read only for segments that may change the
//! state (SYN, FIN, RST, the handshake's last ACK), as conntrack does.

/// `FlowValue::state` of a TCP connection: the client's SYN went to the backend.
pub const TCP_SYN_SENT: u32 = 1;
/// The backend answered with a SYN-ACK that acknowledges the client's SYN.
pub const TCP_SYN_RECV: u32 = 2;
/// The client acknowledged the backend's SYN-ACK.
pub const TCP_ESTABLISHED: u32 = 3;
/// One direction sent a FIN (its entry has `FLOW_FIN_SENT`); the other may still send.
pub const TCP_FIN_WAIT: u32 = 4;
/// Both directions sent a FIN; the last one is not acknowledged yet.
pub const TCP_LAST_ACK: u32 = 5;
/// Both FINs were sent and acknowledged.
pub const TCP_TIME_WAIT: u32 = 6;
/// An in-window RST ended the connection.
pub const TCP_CLOSED: u32 = 7;
/// A UDP flow whose backend has not answered yet.
pub const UDP_UNREPLIED: u32 = 8;
/// A UDP flow whose backend answered.
pub const UDP_REPLIED: u32 = 9;
/// Slots of a per-state table (`STATE_TIMEOUT_NS`); slot 0 (no state) is never live.
pub const STATE_SLOTS: usize = 10;

/// Each state and its name in status, metrics and the README.
pub const STATES: [(u32, &str); 9] = [
    (TCP_SYN_SENT, "syn_sent"),
    (TCP_SYN_RECV, "syn_recv"),
    (TCP_ESTABLISHED, "established"),
    (TCP_FIN_WAIT, "fin_wait"),
    (TCP_LAST_ACK, "last_ack"),
    (TCP_TIME_WAIT, "time_wait"),
    (TCP_CLOSED, "closed"),
    (UDP_UNREPLIED, "udp_unreplied"),
    (UDP_REPLIED, "udp_replied"),
];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// How far a segment may lie from what its direction has sent and still count: a FIN or RST
/// outside it moves no state, and a segment ending beyond it does not advance the tracking.
/// Loose, as conntrack's window check is: it keeps blind guesses to about 1 in 2,000 while
/// leaving room for a megabyte in flight.
pub const TCP_SEQ_WINDOW: u32 = 1 << 20;

/// Whether the flags are a combination a TCP stack sends (conntrack's list, PSH, ECE and CWR
/// aside). SYN+FIN, SYN+RST, a FIN without ACK or no flags at all are scans or attacks: they
/// are dropped before they can open or move a connection.
#[inline(always)]
pub const fn tcp_flags_valid(flags: u8) -> bool {
    const SYN_URG: u8 = TCP_SYN | TCP_URG;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const RST_ACK: u8 = TCP_RST | TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const FIN_ACK_URG: u8 = TCP_FIN | TCP_ACK | TCP_URG;
    const ACK_URG: u8 = TCP_ACK | TCP_URG;
    matches!(
        flags & !(TCP_PSH | TCP_ECE | TCP_CWR),
        TCP_SYN | SYN_URG | SYN_ACK | TCP_RST | RST_ACK | FIN_ACK | FIN_ACK_URG | TCP_ACK | ACK_URG
    )
}

/// Whether sequence number `a` comes after `b` (RFC 1982 arithmetic).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Whether `seq` lies within TCP_SEQ_WINDOW of `next`, the sequence number after the last byte
/// its direction sent: where a genuine FIN or RST of that direction falls.
#[inline(always)]
pub const fn seq_in_window(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next).wrapping_add(TCP_SEQ_WINDOW) <= 2 * TCP_SEQ_WINDOW
}

/// Bytes a SYN may carry (TCP Fast Open): its answer acknowledges them or only the SYN.
pub const TCP_SYN_DATA_MAX: u32 = 1460;

/// Whether `ack` acknowledges the SYN of a direction whose tracking ends at `next` (its SYN,
/// and data a Fast Open SYN carried): what a genuine SYN-ACK, handshake ACK or refusal shows,
/// and a blind one does not.
#[inline(always)]
pub const fn acks_syn(ack: u32, next: u32) -> bool {
    next.wrapping_sub(ack) <= TCP_SYN_DATA_MAX
}

/// What a segment needs to show before it may move its connection's state; the caller checks
/// it only when asked, since it may cost a lookup of the other direction's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Its sequence number lies in the sender's window (`seq_in_window`).
    InWindow,
    /// Its ACK number acknowledges the other direction's SYN (`acks_syn` with the other
    /// entry's `seq_next`).
    AcksSyn,
}

/// What a TCP segment does to its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The state stays.
    Stay,
    /// The connection moves to this state.
    Move(u32),
    /// A client's SYN on a tuple whose connection ended: the old flow goes, a new one is made.
    Reopen,
    /// The backend refused the connection: an RST that acknowledges the client's SYN.
    Refused,
}

/// The step a segment with `flags` takes from `state`. `reply`: it comes from the backend.
/// `fin_sent`: its direction already sent a FIN. `evidence` answers whether the segment shows
/// what the step needs; segments without it leave the state alone (and are still forwarded:
/// the endpoints judge them too).
#[inline(always)]
pub fn tcp_step(
    state: u32,
    flags: u8,
    reply: bool,
    fin_sent: bool,
    evidence: impl Fn(Evidence) -> bool,
) -> Step {
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    if flags & TCP_RST != 0 {
        return match state {
            TCP_SYN_SENT if reply && ack && evidence(Evidence::AcksSyn) => Step::Refused,
            TCP_SYN_SENT | TCP_CLOSED => Step::Stay,
            _ if evidence(Evidence::InWindow) => Step::Move(TCP_CLOSED),
            _ => Step::Stay,
        };
    }
    if syn {
        return match (state, reply, ack) {
            (TCP_TIME_WAIT | TCP_CLOSED, false, false) => Step::Reopen,
            (TCP_SYN_SENT, true, true) if evidence(Evidence::AcksSyn) => Step::Move(TCP_SYN_RECV),
            _ => Step::Stay,
        };
    }
    if !ack {
        return Step::Stay;
    }
    let fin = flags & TCP_FIN != 0;
    match state {
        TCP_SYN_RECV if !reply && evidence(Evidence::AcksSyn) => {
            Step::Move(if fin { TCP_FIN_WAIT } else { TCP_ESTABLISHED })
        }
        TCP_ESTABLISHED if fin && evidence(Evidence::InWindow) => Step::Move(TCP_FIN_WAIT),
        TCP_FIN_WAIT if fin && !fin_sent && evidence(Evidence::InWindow) => {
            Step::Move(TCP_LAST_ACK)
        }
        TCP_LAST_ACK if !fin => Step::Move(TCP_TIME_WAIT),
        _ => Step::Stay,
    }
}

/// Whether a connection in `state` is still opening: it holds a port only for the short
/// half-open timeout, counted from its SYN (its handshake's packets do not extend it), and is
/// the first to give its port up under pressure.
#[inline(always)]
pub const fn half_open(state: u32) -> bool {
    matches!(state, TCP_SYN_SENT | TCP_SYN_RECV)
}

/// Whether a connection in `state` has ended: after FLOW_RECLAIM_NS of silence its SNAT port
/// may go to a new connection before its timeout.
#[inline(always)]
pub const fn ended(state: u32) -> bool {
    matches!(state, TCP_LAST_ACK | TCP_TIME_WAIT | TCP_CLOSED)
}

/// The timeout of `state` from a per-state table; a state the table does not know has none
/// left (an entry written by something else is not trusted to live).
#[inline(always)]
pub fn state_timeout(timeouts: &[u64; STATE_SLOTS], state: u32) -> u64 {
    timeouts.get(state as usize).copied().unwrap_or(0)
}

/// Whether a connection last heard from at `last_seen_ns` (the later of its two directions)
/// has outlived `timeout_ns`, its state's timeout, at `now_ns`.
#[inline(always)]
pub const fn expired(timeout_ns: u64, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= timeout_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;
    const RST_ACK: u8 = TCP_RST | TCP_ACK;

    fn step(state: u32, flags: u8, reply: bool, fin_sent: bool, ok: bool) -> Step {
        tcp_step(state, flags, reply, fin_sent, |_| ok)
    }

    #[test]
    fn valid_flags_are_what_stacks_send() {
        for flags in [
            SYN,
            SYN_ACK,
            ACK,
            FIN_ACK,
            RST,
            RST_ACK,
            ACK | TCP_PSH,
            SYN | TCP_ECE | TCP_CWR,
        ] {
            assert!(tcp_flags_valid(flags), "{flags:#04x}");
        }
        for flags in [
            0,
            TCP_FIN,
            SYN | TCP_FIN,
            SYN | RST,
            TCP_FIN | RST,
            SYN_ACK | TCP_FIN,
            0xff,
        ] {
            assert!(!tcp_flags_valid(flags), "{flags:#04x}");
        }
    }

    #[test]
    fn handshake_needs_the_syn_acknowledged() {
        assert_eq!(
            step(TCP_SYN_SENT, SYN_ACK, true, false, true),
            Step::Move(TCP_SYN_RECV)
        );
        assert_eq!(step(TCP_SYN_SENT, SYN_ACK, true, false, false), Step::Stay);
        assert_eq!(step(TCP_SYN_SENT, SYN_ACK, false, false, true), Step::Stay);
        assert_eq!(
            step(TCP_SYN_RECV, ACK, false, false, true),
            Step::Move(TCP_ESTABLISHED)
        );
        // A blind ACK after a spoofed SYN does not make the flow established.
        assert_eq!(step(TCP_SYN_RECV, ACK, false, false, false), Step::Stay);
        assert_eq!(step(TCP_SYN_SENT, ACK, false, false, true), Step::Stay);
        assert_eq!(
            step(TCP_SYN_RECV, FIN_ACK, false, false, true),
            Step::Move(TCP_FIN_WAIT)
        );
    }

    #[test]
    fn close_moves_one_direction_at_a_time() {
        assert_eq!(
            step(TCP_ESTABLISHED, FIN_ACK, false, false, true),
            Step::Move(TCP_FIN_WAIT)
        );
        // Half-closed: the other side's data and the FIN's retransmission change nothing.
        assert_eq!(step(TCP_FIN_WAIT, ACK, true, false, true), Step::Stay);
        assert_eq!(step(TCP_FIN_WAIT, FIN_ACK, false, true, true), Step::Stay);
        assert_eq!(
            step(TCP_FIN_WAIT, FIN_ACK, true, false, true),
            Step::Move(TCP_LAST_ACK)
        );
        assert_eq!(
            step(TCP_LAST_ACK, ACK, false, true, true),
            Step::Move(TCP_TIME_WAIT)
        );
        assert_eq!(
            step(TCP_ESTABLISHED, FIN_ACK, false, false, false),
            Step::Stay
        );
    }

    #[test]
    fn rst_needs_the_window_and_refusal_needs_the_syn() {
        assert_eq!(
            step(TCP_ESTABLISHED, RST, true, false, true),
            Step::Move(TCP_CLOSED)
        );
        assert_eq!(
            step(TCP_FIN_WAIT, RST_ACK, false, false, true),
            Step::Move(TCP_CLOSED)
        );
        assert_eq!(step(TCP_ESTABLISHED, RST, false, false, false), Step::Stay);
        assert_eq!(
            step(TCP_SYN_SENT, RST_ACK, true, false, true),
            Step::Refused
        );
        assert_eq!(step(TCP_SYN_SENT, RST_ACK, true, false, false), Step::Stay);
        assert_eq!(step(TCP_SYN_SENT, RST, true, false, true), Step::Stay);
        assert_eq!(step(TCP_SYN_SENT, RST_ACK, false, false, true), Step::Stay);
    }

    #[test]
    fn syn_reopens_only_an_ended_connection() {
        assert_eq!(step(TCP_TIME_WAIT, SYN, false, true, true), Step::Reopen);
        assert_eq!(step(TCP_CLOSED, SYN, false, false, true), Step::Reopen);
        for state in [
            TCP_SYN_SENT,
            TCP_SYN_RECV,
            TCP_ESTABLISHED,
            TCP_FIN_WAIT,
            TCP_LAST_ACK,
        ] {
            assert_eq!(
                step(state, SYN, false, false, true),
                Step::Stay,
                "state {state}"
            );
        }
        assert_eq!(step(TCP_TIME_WAIT, SYN, true, false, true), Step::Stay);
    }

    #[test]
    fn windows_wrap() {
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
        assert!(seq_in_window(100, 100));
        assert!(seq_in_window(3, u32::MAX - 3));
        assert!(seq_in_window(100u32.wrapping_sub(TCP_SEQ_WINDOW), 100));
        assert!(seq_in_window(100 + TCP_SEQ_WINDOW, 100));
        assert!(!seq_in_window(101 + TCP_SEQ_WINDOW, 100));
        assert!(!seq_in_window(99u32.wrapping_sub(TCP_SEQ_WINDOW), 100));
        assert!(!seq_in_window(0x8000_0000, 0));
    }

    #[test]
    fn expiry_follows_the_state_timeout() {
        let mut timeouts = [0u64; STATE_SLOTS];
        timeouts[TCP_SYN_SENT as usize] = 5;
        timeouts[TCP_ESTABLISHED as usize] = 300;
        let expired_at = |state, now| expired(state_timeout(&timeouts, state), 100, now);
        assert!(!expired_at(TCP_ESTABLISHED, 399));
        assert!(expired_at(TCP_ESTABLISHED, 400));
        assert!(expired_at(TCP_SYN_SENT, 105));
        assert!(expired_at(0, 100));
        assert!(expired_at(99, 100));
        // A clock a jiffy behind the stamp is not an expiry.
        assert!(!expired_at(TCP_ESTABLISHED, 90));
    }

    #[test]
    fn a_syn_is_acknowledged_with_or_without_its_data() {
        assert!(acks_syn(1001, 1001));
        assert!(acks_syn(1001, 1101));
        assert!(acks_syn(u32::MAX, 5));
        assert!(!acks_syn(1002, 1001));
        assert!(!acks_syn(1001u32.wrapping_sub(TCP_SYN_DATA_MAX + 1), 1001));
        assert!(!acks_syn(0x1234_5678, 1001));
    }
}
