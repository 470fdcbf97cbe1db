//! Where a SNAT port's bit lives in the port bitmaps (lb-ebpf's `snat.rs`): one bitmap per
//! backend id and address of its service's SNAT pool, a bit per port number in SNAT_PORT_WORDS 64-bit words, and a
//! summary bit per word in SNAT_SUMMARY_WORDS words. Shared by the data path and the daemon,
//! which seeds and clears them.

use crate::{MAX_BACKENDS, SNAT_PORT_WORDS, SNAT_SUMMARY_WORDS};

/// The bitmaps of one backend id and SNAT address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap(pub u32);

impl PortMap {
    /// The ports backend `backend_id`'s connections hold on the `snat_index`th address of its
    /// service's SNAT pool (`FlowValue::snat_index`).
    pub const fn of(backend_id: u32, snat_index: u32) -> PortMap {
        PortMap(snat_index * MAX_BACKENDS + backend_id)
    }

    /// Index in SNAT_PORTS of the word holding `port`'s bit.
    pub const fn word_index(self, port: u16) -> u32 {
        self.0 * SNAT_PORT_WORDS + port as u32 / 64
    }

    /// Index in SNAT_FULL of the summary word holding word `word`'s bit.
    pub const fn summary_index(self, word: u32) -> u32 {
        self.0 * SNAT_SUMMARY_WORDS + word / 64
    }
}

/// The address of a service's SNAT pool of `count` that a new flow from `src_addr:src_port`
/// (as the packet has them) tries first: the same for a client reusing its tuple, spread over
/// the pool across clients.
#[inline(always)]
pub const fn pool_start(src_addr: u32, src_port: u16, count: u32) -> u32 {
    let mixed = (src_addr ^ (src_port as u32).rotate_left(16)).wrapping_mul(0x9e37_79b1);
    // Scaled rather than reduced modulo `count`: the verifier keeps a product's bounds, and
    // loses a remainder's.
    let count = if count > crate::SNAT_POOL_MAX {
        crate::SNAT_POOL_MAX
    } else {
        count
    };
    ((mixed >> 16) * count) >> 16
}

/// `port`'s bit in its word.
pub const fn port_bit(port: u16) -> u64 {
    1 << (port % 64)
}

/// The bits of `unit` (a word of ports, or a summary word of words) that lie in
/// `first..=last` (ports, or words).
pub const fn in_range(unit: u32, first: u32, last: u32) -> u64 {
    let (lo, hi) = (unit * 64, unit * 64 + 63);
    if last < lo || first > hi {
        return 0;
    }
    let below = first.saturating_sub(lo);
    let above = hi - if last < hi { last } else { hi };
    (u64::MAX << below) & (u64::MAX >> above)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_of_every_map_has_its_own_bit() {
        let (a, b) = (PortMap::of(3, 0), PortMap::of(3, 1));
        assert_ne!(a.word_index(80), b.word_index(80));
        assert_eq!(PortMap::of(4, 0).word_index(0), a.word_index(65535) + 1);
        assert_eq!(
            PortMap::of(0, crate::SNAT_POOL_MAX).0,
            crate::SNAT_BITMAPS,
            "the last address of the last backend is the last bitmap"
        );
        assert_eq!(a.word_index(127), a.word_index(64));
        assert_ne!(a.word_index(128), a.word_index(127));
        assert_eq!(port_bit(65), 2);
        assert_eq!(a.summary_index(63), a.summary_index(0));
        assert_eq!(
            PortMap::of(4, 0).summary_index(0),
            a.summary_index(1023) + 1
        );
    }

    #[test]
    fn pool_start_spreads_clients_over_the_pool() {
        let mut starts = [0u32; 4];
        for port in 30_000..34_000u16 {
            let start = pool_start(0x0200_12c6, port.to_be(), 4);
            starts[start as usize] += 1;
        }
        for n in starts {
            assert!((800..1200).contains(&n), "uneven starts: {starts:?}");
        }
        assert_eq!(pool_start(0x0200_12c6, 1, 1), 0);
        assert_eq!(pool_start(0x0200_12c6, 1, 0), 0);
    }

    #[test]
    fn in_range_masks_the_ends() {
        // The default range, 10000-32767: its first word (156) starts at 9984.
        assert_eq!(in_range(156, 10000, 32767), u64::MAX << 16);
        assert_eq!(in_range(200, 10000, 32767), u64::MAX);
        // 32767 = 511 * 64 + 63: the last word is whole.
        assert_eq!(in_range(511, 10000, 32767), u64::MAX);
        assert_eq!(in_range(512, 10000, 32767), 0);
        assert_eq!(in_range(155, 10000, 32767), 0);
        // Both ends in one word.
        assert_eq!(in_range(0, 3, 5), 0b111000);
        assert_eq!(in_range(1023, 65535, 65535), 1 << 63);
    }
}
