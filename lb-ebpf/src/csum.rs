//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//! Fields are taken as the packet holds them; a one's-complement sum does not depend on byte
//! order as long as every word is read the same way.

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
