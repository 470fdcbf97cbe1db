//! Where a SNAT port's bit lives in the port bitmaps (lb-ebpf's `snat.rs`): one bitmap per
//! backend id and protocol, a bit per port number in SNAT_PORT_WORDS 64-bit words, and a
//! summary bit per word in SNAT_SUMMARY_WORDS words. Shared by the data path and the daemon,
//! which seeds and clears them.

use crate::{SNAT_PORT_WORDS, SNAT_SUMMARY_WORDS};

/// The bitmaps of one backend id and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap(pub u32);

impl PortMap {
    pub const fn of(backend_id: u32, udp: bool) -> PortMap {
        PortMap(backend_id * 2 + udp as u32)
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
        let (a, b) = (PortMap::of(3, false), PortMap::of(3, true));
        assert_ne!(a.word_index(80), b.word_index(80));
        assert_eq!(PortMap::of(4, false).word_index(0), b.word_index(65535) + 1);
        assert_eq!(a.word_index(127), a.word_index(64));
        assert_ne!(a.word_index(128), a.word_index(127));
        assert_eq!(port_bit(65), 2);
        assert_eq!(a.summary_index(63), a.summary_index(0));
        assert_eq!(
            PortMap::of(4, false).summary_index(0),
            b.summary_index(1023) + 1
        );
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
