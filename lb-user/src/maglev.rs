//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), computed here and written to MAGLEV by `dataplane.rs`.
//! The data path picks a new flow's backend as `table[flow_hash % size]`.
//!
//! Every backend walks its own permutation of the slots, derived from a hash of its address, and
//! takes turns claiming its next free preferred slot until the table is full. Because each
//! backend's preferences depend only on its own address, adding or removing one backend moves
//! few slots between the others, so few established clients of other backends would be re-hashed
//! if their flow entries were lost.

use std::net::{IpAddr, SocketAddr};

use lb_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// The value written into the slots this backend owns (its BACKENDS index).
    pub id: u32,
    /// What the backend's permutation is derived from, so that its slots do not depend on `id`
    /// or on the other backends.
    pub addr: SocketAddr,
    /// Relative share of the slots; 0 takes no slots (drained).
    pub weight: u32,
}

/// Builds a table of `size` slots, each a backend id, or [`NO_BACKEND`] in every slot when no
/// backend has weight > 0.
///
/// `size` should be prime (callers validate it; debug builds assert it): only then is every
/// backend's permutation a full cycle for any skip, as Maglev requires. A non-prime size still
/// yields a full, deterministic table (skips are bumped to be coprime with it), only with worse
/// spreading.
///
/// Weights are honoured by turns: over each round of `max_weight` passes, a backend of weight
/// `w` takes exactly `w` turns, spread evenly over the passes rather than back to back. Taking
/// them back to back would let the last, cut-off round favour the first backends by up to
/// `sum(weights)` slots, which exceeds the whole table for large weights.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
    let mut table = vec![NO_BACKEND; size as usize];
    if size == 0 {
        return table;
    }

    let mut walkers: Vec<Walker> = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| {
            debug_assert!(b.id != NO_BACKEND, "backend id {} is reserved", b.id);
            Walker::new(b, size)
        })
        .collect();
    let Some(max_weight) = walkers.iter().map(|w| u64::from(w.weight)).max() else {
        return table;
    };

    let size = u64::from(size);
    let mut filled = 0u64;
    // Every pass gives the heaviest backend a turn, so each pass fills at least one slot and the
    // loop ends after at most `size` passes.
    loop {
        for walker in &mut walkers {
            walker.credit += u64::from(walker.weight);
            if walker.credit < max_weight {
                continue;
            }
            walker.credit -= max_weight;
            let slot = walker.claim_next_free(&table, size);
            table[slot] = walker.id;
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

/// Whether `n` is prime, by trial division: at most ~11k divisions for a u32, run once per
/// configuration load.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// A backend's position in its permutation `offset, offset + skip, offset + 2 skip, ... (mod
/// size)`, and its accumulated share of turns.
struct Walker {
    id: u32,
    weight: u32,
    next_slot: u64,
    skip: u64,
    credit: u64,
}

impl Walker {
    fn new(backend: &MaglevBackend, size: u32) -> Self {
        let (h1, h2) = hash_addr(backend.addr);
        let size = u64::from(size);
        let mut skip = if size > 1 { h2 % (size - 1) + 1 } else { 1 };
        // A no-op for prime sizes; for others it keeps the permutation a full cycle so that a
        // free slot is always found (size - 1 is coprime with size, so this ends).
        while gcd(skip, size) != 1 {
            skip += 1;
        }
        Self {
            id: backend.id,
            weight: backend.weight,
            next_slot: h1 % size,
            skip,
            credit: 0,
        }
    }

    /// Advances to the backend's next preferred slot that is still free and returns it. Only
    /// called while the table has a free slot, which the full-cycle permutation then reaches.
    fn claim_next_free(&mut self, table: &[u32], size: u64) -> usize {
        loop {
            let slot = self.next_slot;
            self.next_slot = (self.next_slot + self.skip) % size;
            // `slot < size <= u32::MAX`, so it fits in usize on every target lb runs on.
            let slot = slot as usize;
            if table[slot] == NO_BACKEND {
                return slot;
            }
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The two independent hashes Maglev derives offset and skip from. Spelled out (FNV-1a 64 then
/// the SplitMix64 finalizer) rather than std's hasher, whose output may change between Rust
/// releases: tables must be identical across daemon restarts and upgrades, or a restart would
/// send new flows of a service to different backends. Changing this function reshuffles every
/// table; the `table_is_pinned` test guards it.
/// An IPv4 backend hashes its 4 address bytes and port, an IPv6 one its 16 and port.
fn hash_addr(addr: SocketAddr) -> (u64, u64) {
    let mut bytes = [0u8; 18];
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    bytes[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    let bytes = &bytes[..len + 2];
    (mix64(fnv1a64(b'o', bytes)), mix64(fnv1a64(b's', bytes)))
}

fn fnv1a64(tag: u8, bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = (OFFSET_BASIS ^ u64::from(tag)).wrapping_mul(PRIME);
    for &byte in bytes {
        h = (h ^ u64::from(byte)).wrapping_mul(PRIME);
    }
    h
}

/// FNV-1a's low bits are weak for short inputs; the finalizer spreads every input bit over
/// the whole word before the `% size`.
fn mix64(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The slots of `new` to write over a table half that holds `old` (its content when this
/// daemon last wrote it): those that differ, or every one when the half's content is unknown
/// (adopted, or a write that failed half-way).
pub fn changed_slots(old: Option<&[u32]>, new: &[u32]) -> Vec<u32> {
    match old {
        Some(old) if old.len() == new.len() => (0..new.len() as u32)
            .filter(|&i| old[i as usize] != new[i as usize])
            .collect(),
        _ => (0..new.len() as u32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::DEFAULT_MAGLEV_SIZE;

    use super::*;

    const SIZE: u32 = DEFAULT_MAGLEV_SIZE;

    fn backend(id: u32, weight: u32) -> MaglevBackend {
        // 198.18.0.10, 198.18.0.11, ...
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 10)) + id);
        MaglevBackend {
            id,
            addr: SocketAddr::new(addr.into(), 8000),
            weight,
        }
    }

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        (0u32..)
            .zip(weights)
            .map(|(id, &w)| backend(id, w))
            .collect()
    }

    fn count(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&slot| slot == id).count()
    }

    /// Share of `table` in percentage points.
    fn share(table: &[u32], id: u32) -> f64 {
        100.0 * count(table, id) as f64 / table.len() as f64
    }

    fn assert_shares_follow_weights(weights: &[u32]) {
        let list = backends(weights);
        let table = build_table(&list, SIZE);
        assert_eq!(table.len(), SIZE as usize);
        assert_eq!(count(&table, NO_BACKEND), 0, "table has empty slots");
        let total: u32 = weights.iter().sum();
        for b in &list {
            let want = 100.0 * f64::from(b.weight) / f64::from(total);
            let got = share(&table, b.id);
            assert!(
                (got - want).abs() <= 1.0,
                "weights {weights:?}: backend {} has {got:.3}% of the table, want {want:.3}%",
                b.id
            );
        }
    }

    /// Slots that pointed to a backend present in both tables and now point elsewhere, as a
    /// fraction of the table.
    fn moved_among_survivors(old: &[u32], new: &[u32], survivors: &[u32]) -> f64 {
        let moved = old
            .iter()
            .zip(new)
            .filter(|(o, n)| survivors.contains(o) && o != n)
            .count();
        moved as f64 / old.len() as f64
    }

    #[test]
    fn shares_follow_weights() {
        assert_shares_follow_weights(&[4, 6]);
        assert_shares_follow_weights(&[1, 2, 3, 4]);
        assert_shares_follow_weights(&[1, 1, 1]);
        assert_shares_follow_weights(&[1, 5, 10, 100, 3, 7, 10_000, 250, 42, 1]);
    }

    #[test]
    fn shares_are_exact_to_a_slot_per_backend() {
        // The turn scheme gives each backend its weighted share within one turn, whatever the
        // weights; only the final, partial pass is uneven.
        let list = backends(&[3, 10_000, 9_999, 1]);
        let table = build_table(&list, SIZE);
        let total = 3.0 + 10_000.0 + 9_999.0 + 1.0;
        for b in &list {
            let want = f64::from(SIZE) * f64::from(b.weight) / total;
            let got = count(&table, b.id) as f64;
            assert!(
                (got - want).abs() <= 1.5,
                "backend {}: {got} slots, want {want:.1}",
                b.id
            );
        }
    }

    #[test]
    fn removing_one_backend_keeps_the_others_slots() {
        // Ideal consistent hashing moves only the removed backend's 1/N of the slots. Maglev
        // trades a little of that for balance: a few of the survivors' slots move too, as the
        // removed backend's slots are refilled in a different order. Measured at this size:
        // at most 0.12% of the table for N = 5 and 0.27% for N = 10. The bound, 1% of the
        // table, is ~4x the worst measured case and far tighter than 0.3/N (6% and 3%).
        for n in [5u32, 10] {
            let list = backends(&vec![1; n as usize]);
            let old = build_table(&list, SIZE);
            for removed in 0..n {
                let rest: Vec<MaglevBackend> =
                    list.iter().copied().filter(|b| b.id != removed).collect();
                let survivors: Vec<u32> = rest.iter().map(|b| b.id).collect();
                let new = build_table(&rest, SIZE);
                assert_eq!(count(&new, removed), 0);
                let moved = moved_among_survivors(&old, &new, &survivors);
                let bound = 0.01;
                assert!(
                    moved <= bound,
                    "n={n}, removed {removed}: {:.2}% of the table moved between survivors, \
                     bound {:.2}%",
                    moved * 100.0,
                    bound * 100.0
                );
            }
        }
    }

    #[test]
    fn changing_one_weight_moves_a_bounded_share() {
        // 10 equal backends, one doubled: its share grows from 10% to 18.2%, so at least 8.2% of
        // the slots must move to it. Maglev moves more than the minimum since the fill order
        // changes; measured: 8.4% of all slots. Bound: 1.25 times the minimum (10.2%).
        let old_list = backends(&[1; 10]);
        let mut new_list = old_list.clone();
        new_list[3].weight = 2;
        let old = build_table(&old_list, SIZE);
        let new = build_table(&new_list, SIZE);
        let moved = old.iter().zip(&new).filter(|(o, n)| o != n).count() as f64 / f64::from(SIZE);
        let minimum = 2.0 / 11.0 - 1.0 / 10.0;
        assert!(moved >= minimum, "only {moved} moved");
        assert!(
            moved <= 1.25 * minimum,
            "{:.2}% of the table moved",
            moved * 100.0
        );
    }

    #[test]
    fn weight_zero_takes_no_slots() {
        let table = build_table(&backends(&[1, 0, 2]), SIZE);
        assert_eq!(count(&table, 1), 0);
        assert_eq!(count(&table, 0) + count(&table, 2), SIZE as usize);
    }

    #[test]
    fn no_weight_gives_an_empty_table() {
        for list in [backends(&[0, 0, 0]), Vec::new()] {
            let table = build_table(&list, 101);
            assert_eq!(table, vec![NO_BACKEND; 101], "backends {list:?}");
        }
    }

    #[test]
    fn same_input_gives_the_same_table() {
        let list = backends(&[3, 1, 4, 1, 5]);
        assert_eq!(build_table(&list, SIZE), build_table(&list, SIZE));
    }

    #[test]
    fn table_is_pinned() {
        // Guards the hash and the fill order: a change here reshuffles every deployed table on
        // upgrade, which must be a deliberate decision.
        let table = build_table(&backends(&[1, 2, 1]), 13);
        assert_eq!(table, [1, 2, 1, 1, 1, 2, 0, 1, 0, 2, 1, 0, 1]);
        let h = hash_addr("198.18.2.11:8000".parse().expect("valid address"));
        assert_eq!(h, (0xbdd5_5fac_d6eb_243c, 0x5473_a0a9_ce6b_0bfe));
    }

    #[test]
    fn slots_follow_the_address_not_the_id() {
        let list = backends(&[1, 1, 1]);
        let renumbered: Vec<MaglevBackend> = list
            .iter()
            .map(|b| MaglevBackend {
                id: b.id + 100,
                ..*b
            })
            .collect();
        let a = build_table(&list, 101);
        let b = build_table(&renumbered, 101);
        assert!(a.iter().zip(&b).all(|(x, y)| x + 100 == *y));
    }

    #[test]
    fn ipv6_backends_share_by_weight_and_hash_apart_from_ipv4_ones() {
        let v6 = |id: u32, weight: u32| MaglevBackend {
            id,
            addr: SocketAddr::new(
                std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10 + id as u16).into(),
                8000,
            ),
            weight,
        };
        let table = build_table(&[v6(1, 4), v6(2, 6)], 65_537);
        assert!(
            (share(&table, 1) - 40.0).abs() < 1.0,
            "{}",
            share(&table, 1)
        );
        assert!(
            (share(&table, 2) - 60.0).abs() < 1.0,
            "{}",
            share(&table, 2)
        );
        // ::ffff:198.18.0.11 is not 198.18.0.11: each family hashes its own bytes.
        let mapped = SocketAddr::new(Ipv4Addr::new(198, 18, 0, 11).to_ipv6_mapped().into(), 8000);
        let plain = SocketAddr::new(Ipv4Addr::new(198, 18, 0, 11).into(), 8000);
        assert_ne!(hash_addr(mapped), hash_addr(plain));
    }

    #[test]
    fn a_single_backend_takes_every_slot() {
        let table = build_table(&backends(&[7]), 101);
        assert!(table.iter().all(|&slot| slot == 0));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        for p in [
            101,
            65_537,
            131_071,
            1_000_003,
            2_147_483_647,
            4_294_967_291,
        ] {
            assert!(is_prime(p), "{p} is prime");
        }
        // Composites: squares of primes (the loop's `d * d <= n` edge), numbers with small
        // factors, and 65521 * 65537 and 65521^2, whose smallest factor is the last one tried.
        for c in [
            0,
            1,
            4,
            9,
            25,
            49,
            65_535,
            4_294_967_295,
            65_521 * 65_537,
            65_521 * 65_521,
        ] {
            assert!(!is_prime(c), "{c} is not prime");
        }
    }

    #[test]
    fn only_changed_slots_are_written_over_a_known_half() {
        let old = build_table(&backends(&[40, 60, 50]), SIZE);
        let new = build_table(&backends(&[41, 60, 50]), SIZE);
        let changed = changed_slots(Some(&old), &new);
        assert!(
            !changed.is_empty() && changed.len() < new.len() / 4,
            "{}",
            changed.len()
        );
        assert!(changed.iter().all(|&i| old[i as usize] != new[i as usize]));
        assert!(changed_slots(Some(&new), &new).is_empty());
        assert_eq!(changed_slots(None, &new).len(), new.len());
        assert_eq!(changed_slots(Some(&old[..10]), &new).len(), new.len());
    }
}
