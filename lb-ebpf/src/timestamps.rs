//! Stage 4b, rewrite: TCP timestamps. The backend side of a connection sees the balancer's
//! timestamp clock, so that a SNAT port reused for another client never meets PAWS in the
//! backend's TIME_WAIT (lb-common's `timestamps` says why and how). A forward segment's TSval
//! and a reply's TSecr move by the flow's `ts_add`; the L4 checksum follows. Reads and raises
//! TS_HIGH.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    FLOW_REVERSE, FLOW_TS, FlowValueOf, STAT_TS_CLAMPED,
    timestamps::{after, forward_add, forward_tsval, syn_tsval},
};

use crate::{
    csum::Delta,
    family::Family,
    frame::Frame,
    maps::{TS_HIGH, ts_clock_offset_ms},
    parse::Packet,
    stats,
    tcp_options::{
        self, TCP_HEADER_MIN, TCPOPT_MSS, TCPOPT_NOP, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP,
    },
};

const TIMESTAMP_LEN: u8 = 10;
/// Offsets of TSval and TSecr in the option.
const TSVAL_AT: usize = 2;
const TSECR_AT: usize = 6;

/// The translation a new connection's flow entries carry, from its SYN: what the forward
/// entry adds to TSval, if the SYN offers timestamps.
#[inline(always)]
pub fn syn_add<A: Family>(ctx: &impl Frame, pkt: &Packet<A>) -> Option<u32> {
    let option = find(ctx, pkt)?;
    let client_tsval = read_u32(pkt, option + TSVAL_AT)?;
    let highest = TS_HIGH.get(0).map_or(0, |h| *h as u32);
    Some(forward_add(client_tsval, syn_tsval(clock_ms(), highest)))
}

/// Translates the segment's timestamp if its flow translates them, returning the change to
/// fold into the L4 checksum.
#[inline(always)]
pub fn translate<A: Family>(ctx: &impl Frame, pkt: &Packet<A>, nat: &FlowValueOf<A>) -> Delta {
    let mut delta = Delta::default();
    if nat.flags & FLOW_TS == 0 {
        return delta;
    }
    let Some(option) = find(ctx, pkt) else {
        return delta;
    };
    let reply = nat.flags & FLOW_REVERSE != 0;
    let at = option + if reply { TSECR_AT } else { TSVAL_AT };
    let field = pkt.ports as usize + at;
    if field + 4 > pkt.data_end {
        return delta;
    }
    let field = field as *mut [u8; 4];
    // SAFETY: bounds-checked against the frame's end just above.
    let old = unsafe { *field };
    let value = if reply {
        u32::from_be_bytes(old).wrapping_add(nat.ts_add)
    } else {
        let (value, held) = forward_tsval(u32::from_be_bytes(old), nat.ts_add, clock_ms());
        if held {
            stats::count_slot(STAT_TS_CLAMPED);
        }
        raise_highest(value);
        value
    };
    let new = value.to_be_bytes();
    // SAFETY: as above.
    unsafe { *field = new };
    delta.replace32(u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    // The checksum sums 16-bit words from the header's start: a field at an odd offset
    // straddles them, and its change counts byte-swapped.
    if at & 1 != 0 { delta.swapped() } else { delta }
}

/// The timestamp clock: milliseconds of the realtime clock (mod 2^32), read from the coarse
/// monotonic one plus the offset the daemon measured at load.
#[inline(always)]
fn clock_ms() -> u32 {
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    ((now / 1_000_000) as u32).wrapping_add(ts_clock_offset_ms())
}

/// Makes TS_HIGH at least `sent`. Raised rarely (a connection's TSval passes it once per clock
/// tick at most), so the shared word is mostly read; a compare-and-swap keeps a racing CPU's
/// higher value.
#[inline(always)]
fn raise_highest(sent: u32) {
    let Some(highest) = TS_HIGH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: an array slot, valid for this program run.
    let mut seen = unsafe { *highest };
    for _ in 0..2 {
        if !after(sent, seen as u32) {
            return;
        }
        // SAFETY: as above; the slot is 8-aligned.
        let (previous, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                highest,
                seen,
                u64::from(sent),
            )
        };
        if swapped {
            return;
        }
        seen = previous;
    }
}

/// The offset of the timestamp option from the TCP header's start, if the segment has one.
/// Linux's layouts are recognised at once; any other is walked option by option.
#[inline(always)]
fn find<A: Family>(ctx: &impl Frame, pkt: &Packet<A>) -> Option<usize> {
    let header_len = pkt.tcp_header_len as usize;
    if header_len <= TCP_HEADER_MIN {
        return None;
    }
    let ts = [TCPOPT_TIMESTAMP, TIMESTAMP_LEN];
    // Linux's segments after the handshake: NOP, NOP, timestamp (then SACK blocks, if any).
    if header_len >= TCP_HEADER_MIN + 12
        && read::<A, 4>(pkt, TCP_HEADER_MIN)? == [TCPOPT_NOP, TCPOPT_NOP, ts[0], ts[1]]
    {
        return Some(TCP_HEADER_MIN + 2);
    }
    // Linux's SYN and SYN-ACK: MSS, SACK permitted, timestamp, NOP, window scale.
    if header_len == TCP_HEADER_MIN + 20 {
        let [kind, len, _, _, sack_kind, sack_len, ts_kind, ts_len] =
            read::<A, 8>(pkt, TCP_HEADER_MIN)?;
        if [kind, len, sack_kind, sack_len, ts_kind, ts_len]
            == [TCPOPT_MSS, 4, TCPOPT_SACK_PERM, 2, ts[0], ts[1]]
        {
            return Some(TCP_HEADER_MIN + 6);
        }
    }
    let tcp_offset = pkt.ports as usize - ctx.data();
    tcp_options::find(ctx, tcp_offset, header_len, TCPOPT_TIMESTAMP, TIMESTAMP_LEN)
}

/// `N` bytes at `offset` from the TCP header's start, if the frame holds them.
#[inline(always)]
fn read<A: Family, const N: usize>(pkt: &Packet<A>, offset: usize) -> Option<[u8; N]> {
    let at = pkt.ports as usize + offset;
    if at + N > pkt.data_end {
        return None;
    }
    // SAFETY: bounds-checked against the frame's end just above.
    Some(unsafe { *(at as *const [u8; N]) })
}

#[inline(always)]
fn read_u32<A: Family>(pkt: &Packet<A>, offset: usize) -> Option<u32> {
    read::<A, 4>(pkt, offset).map(u32::from_be_bytes)
}
