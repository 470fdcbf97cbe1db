//! TCP options, for the stages that rewrite one (`timestamps.rs`, `mss.rs`): where an option
//! sits in a segment whose layout is not one the caller recognises at once.

use lb_common::TCP_OPTIONS_MAX as OPTIONS_MAX;

use crate::{frame::Frame, maps::TCP_OPTIONS};

pub const TCPOPT_EOL: u8 = 0;
pub const TCPOPT_NOP: u8 = 1;
pub const TCPOPT_MSS: u8 = 2;
pub const TCPOPT_SACK_PERM: u8 = 4;
pub const TCPOPT_TIMESTAMP: u8 = 8;
/// The fixed TCP header; options follow it.
pub const TCP_HEADER_MIN: usize = 20;

/// The offset from the TCP header's start (at `tcp_offset` in the frame, `header_len` long) of
/// the option `kind` of `kind_len` bytes, if the segment has one.
///
/// Walks the options on a copy: reads at offsets taken from the packet would give the verifier
/// a state per path through the options, each to follow through the rest of the program.
/// Positions are visited in order, each checked against where the next option starts, so every
/// path through the walk stays within a handful of states.
#[inline(always)]
pub fn find(
    ctx: &impl Frame,
    tcp_offset: usize,
    header_len: usize,
    kind: u8,
    kind_len: u8,
) -> Option<usize> {
    // Masked first: the compiler may check a length derived from the header on one register
    // and use a copy from another, which the verifier then sees unbounded. A header shorter
    // than TCP_HEADER_MIN leaves more than OPTIONS_MAX here.
    let len = header_len.wrapping_sub(TCP_HEADER_MIN) & 0x3f;
    if len == 0 || len > OPTIONS_MAX || header_len > TCP_HEADER_MIN + OPTIONS_MAX {
        return None;
    }
    // Off the stack, which the rest of the program fills.
    let options = TCP_OPTIONS.get_ptr_mut(0)?;
    let offset = tcp_offset + TCP_HEADER_MIN;
    // The buffer holds OPTIONS_MAX >= len bytes.
    let copied = ctx.load_bytes(offset as u32, options.cast(), len as u32);
    if copied != 0 {
        return None;
    }
    // SAFETY: a per-CPU array slot, valid for this program run and only this CPU's.
    let options = unsafe { &*options };
    let mut next = 0;
    for at in 0..OPTIONS_MAX {
        if at >= len {
            return None;
        }
        if at != next {
            continue;
        }
        let this = options[at];
        if this == TCPOPT_EOL {
            return None;
        }
        if this == TCPOPT_NOP {
            next = at + 1;
            continue;
        }
        let option_len = *options.get(at + 1)? as usize;
        if this == kind && option_len == kind_len as usize {
            return (at + option_len <= len).then_some(TCP_HEADER_MIN + at);
        }
        if option_len < 2 || at + option_len > len {
            return None;
        }
        next = at + option_len;
    }
    None
}
