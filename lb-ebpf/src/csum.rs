//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//! Fields are taken as the packet holds them; a one's-complement sum does not depend on byte
//! order as long as every word is read the same way.

use crate::{
    family::Family,
    parse::{IPPROTO_TCP, Packet},
};

/// The sum of changes to apply to one checksum.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    #[inline(always)]
    pub fn replace32(&mut self, old: u32, new: u32) {
        self.replace16(old as u16, new as u16);
        self.replace16((old >> 16) as u16, (new >> 16) as u16);
    }

    /// These changes as they count for bytes one position further (at odd offsets from the
    /// checksummed data's start): a one's-complement sum of byte-swapped words is the
    /// byte-swapped sum.
    #[inline(always)]
    pub fn swapped(self) -> Delta {
        let folded = !self.apply(0xffff);
        Delta(u32::from(folded.swap_bytes()))
    }

    /// Both sets of changes.
    #[inline(always)]
    pub fn and(self, other: Delta) -> Delta {
        Delta(self.0 + other.0)
    }

    /// Changes given as a checksum difference (`sum`'s own form).
    #[inline(always)]
    pub fn from_sum(sum: u32) -> Delta {
        Delta(sum)
    }

    /// The changes as a checksum difference (a 32-bit one's-complement sum), as the kernel's
    /// checksum helpers take it.
    #[inline(always)]
    pub fn sum(self) -> u32 {
        self.0
    }

    /// The checksum `check` becomes after the changes.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut sum = (!check) as u32 + self.0;
        // Two folds suffice: the first leaves at most 0x1fffe.
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// Whether `pkt`, a TCP segment that is its header alone (a SYN without data), carries a
/// correct checksum. A backend drops a segment whose checksum is wrong, so only a SYN that
/// passes this says anything about a backend that leaves it unanswered (`flow.rs`).
#[inline(always)]
pub fn tcp_header_only_ok<A: Family>(pkt: &Packet<A>) -> bool {
    if pkt.tcp_payload_len != 0 || !(20..=60).contains(&pkt.tcp_header_len) {
        return false;
    }
    let words = (pkt.tcp_header_len / 4) as usize;
    let length = (pkt.tcp_header_len as u16).to_be_bytes();
    // The pseudo header, read as the packet's words are (native order; see the module doc).
    // IPv6's has the length in 32 bits and the protocol after 3 zero bytes: the same sum.
    let mut sum = pkt.key.src_addr.sum()
        + pkt.key.dst_addr.sum()
        + word(0, IPPROTO_TCP)
        + word(length[0], length[1]);
    let tcp = pkt.ports as usize;
    let mut i = 0;
    while i < 15 {
        if i >= words {
            break;
        }
        let at = tcp + i * 4;
        if at + 4 > pkt.data_end {
            return false;
        }
        // SAFETY: bounds-checked against the frame's end just above.
        let w = unsafe { *(at as *const [u8; 4]) };
        sum += word(w[0], w[1]) + word(w[2], w[3]);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

#[inline(always)]
fn word(a: u8, b: u8) -> u32 {
    u32::from(u16::from_ne_bytes([a, b]))
}
