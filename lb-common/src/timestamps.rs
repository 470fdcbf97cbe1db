//! TCP timestamps (RFC 7323) across full NAT: what the data path (lb-ebpf's `timestamps.rs`)
//! writes, as pure arithmetic.
//!
//! A backend keeps a closed connection in TIME_WAIT for a minute, and accepts a new SYN on
//! the same four-tuple only if its TSval is newer than the last one it saw there (PAWS). Full
//! NAT reuses a SNAT port for another client, whose timestamps follow another clock (Linux
//! offsets them per address pair), so about half of those SYNs would be refused. The balancer
//! therefore gives the backend side of every connection timestamps of its own clock: a SYN's
//! TSval becomes the clock's value, or the highest value sent yet if that is later (a client
//! whose clock runs fast), and the connection's later TSvals keep that offset. A reused tuple
//! then always carries a newer TSval than its previous connection's. Replies' TSecr are
//! translated back, so the client measures its round trips on its own clock.
//!
//! All comparisons are serial (modulo 2^32), as TCP's.

/// How far ahead of the clock a translated TSval may run (about 12 days of milliseconds). An
/// honest client's clock, at most 1 kHz by RFC 7323, never gets there; a forged or runaway one
/// is held at the limit, so that no client can push the values the backend compares by half
/// the number space and make later connections look older.
pub const AHEAD_MAX: u32 = 1 << 30;

/// Whether timestamp `a` is later than `b`.
pub const fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The TSval the backend sees on a new connection's SYN: the clock, or the highest TSval sent
/// so far if a client ran it ahead.
pub const fn syn_tsval(clock: u32, highest_sent: u32) -> u32 {
    if after(highest_sent, clock) {
        highest_sent
    } else {
        clock
    }
}

/// What a connection adds to its forward TSvals (its reply entry adds the negation to TSecr),
/// given its SYN's TSval as the client sent it and as the backend must see it.
pub const fn forward_add(client_tsval: u32, backend_tsval: u32) -> u32 {
    backend_tsval.wrapping_sub(client_tsval)
}

/// A forward segment's TSval as the backend sees it, and whether it was held at
/// `clock + AHEAD_MAX`.
pub const fn forward_tsval(client_tsval: u32, add: u32, clock: u32) -> (u32, bool) {
    let translated = client_tsval.wrapping_add(add);
    let ceiling = clock.wrapping_add(AHEAD_MAX);
    if after(translated, ceiling) {
        (ceiling, true)
    } else {
        (translated, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_is_serial() {
        assert!(after(1, 0));
        assert!(!after(0, 0));
        assert!(after(3, u32::MAX - 3));
        assert!(!after(u32::MAX - 3, 3));
    }

    #[test]
    fn a_syn_gets_the_clock_or_the_highest_value_sent() {
        assert_eq!(syn_tsval(1000, 990), 1000);
        assert_eq!(syn_tsval(1000, 1500), 1500);
        // Across the wrap.
        assert_eq!(syn_tsval(5, u32::MAX - 5), 5);
        assert_eq!(syn_tsval(u32::MAX - 5, 5), 5);
    }

    #[test]
    fn a_connection_keeps_its_offset_and_translates_back() {
        let add = forward_add(7_000_000, 1000);
        let (backend, held) = forward_tsval(7_000_250, add, 1250);
        assert_eq!((backend, held), (1250, false));
        // The reply's TSecr echoes the backend-side value; the reply entry adds the negation.
        assert_eq!(backend.wrapping_add(add.wrapping_neg()), 7_000_250);
    }

    /// The property the translation exists for: however the clients' clocks are offset, the
    /// backend sees every later SYN on a tuple newer than anything the tuple's earlier
    /// connection sent, as long as the highest value sent is kept up to date.
    #[test]
    fn a_reused_tuple_always_looks_newer() {
        let mut highest = 0u32;
        let mut clock = 10_000u32;
        // (client SYN TSval, client ms the connection lasts, how fast its clock runs x1000).
        let clients = [
            (u32::MAX - 20, 30, 1000),
            (5, 2, 1000),
            (3_000_000_000, 500, 1000),
            (42, 40, 10_000),
            (0x8000_0000, 1, 1000),
        ];
        let mut last_sent: Option<u32> = None;
        for (syn, lasts, rate) in clients {
            let backend_syn = syn_tsval(clock, highest);
            if let Some(previous) = last_sent {
                assert!(
                    after(backend_syn, previous) || backend_syn == previous,
                    "{backend_syn} is older than {previous}"
                );
            }
            let add = forward_add(syn, backend_syn);
            let mut sent = backend_syn;
            for ms in 0..=lasts {
                let (t, held) = forward_tsval(syn.wrapping_add(ms * rate / 1000), add, clock + ms);
                assert!(!held);
                assert!(!after(sent, t), "a connection's own TSvals never go back");
                sent = t;
                if after(t, highest) {
                    highest = t;
                }
            }
            last_sent = Some(sent);
            clock += lasts + 1;
        }
    }

    #[test]
    fn a_runaway_tsval_is_held_ahead_of_the_clock() {
        let add = forward_add(0, 1000);
        let (t, held) = forward_tsval(0x7000_0000, add, 1000);
        assert_eq!((t, held), (1000 + AHEAD_MAX, true));
        // Far behind the clock is not held: the backend's PAWS judges the connection's own
        // order, and nothing older can make a later SYN look old.
        assert_eq!(
            forward_tsval(0xf000_0000, add, 1000),
            (0xf000_0000 + 1000, false)
        );
    }
}
