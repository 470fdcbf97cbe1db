//! The flow hash that picks a Maglev slot for a new flow. It lives here so that tests can predict
//! the data path's choice; the data path is its only other user.

/// Hashes a flow's 5-tuple, as the raw network-order fields of the packet, into 32 bits.
/// Murmur3's finalizer over a mix of the fields: cheap in BPF (no loops, no tables) and good
/// enough that consecutive client ports spread evenly over the table.
#[inline(always)]
pub fn flow_hash(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let ports = ((src_port as u32) << 16) | dst_port as u32;
    let mut h = fmix32(src_addr ^ 0x9e37_79b9);
    h = fmix32(h ^ dst_addr.rotate_left(7));
    h = fmix32(h ^ ports.rotate_left(13) ^ ((proto as u32) << 24));
    h
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ports_spread_over_buckets() {
        let mut buckets = [0u32; 10];
        for port in 0..10_000u16 {
            let h = flow_hash(0x0100_12c6, 0x0164_12c6, 30_000 + port, 80, 6);
            buckets[(h % 10) as usize] += 1;
        }
        for count in buckets {
            assert!((900..1100).contains(&count), "uneven buckets: {buckets:?}");
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }
}
