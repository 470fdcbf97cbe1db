//! Stage 3c, SNAT ports: which ports each backend's connections hold, so that a new connection
//! finds a free one whenever the range has one, in bounded steps. Reads and writes SNAT_PORTS,
//! SNAT_FULL and SNAT_NEXT (layout: lb-common's `snat_ports`).
//!
//! Per backend and address of its service's SNAT pool, SNAT_PORTS holds a bit per port (set: a
//! reply entry holds it) and SNAT_FULL a bit per word of those (set: all of the word's ports in
//! the range are held). A search reads at most SNAT_SUMMARY_WORDS + 1 summary words and one port
//! word per address of the pool. Each CPU sweeps
//! the range from the word it last took a port from (SNAT_NEXT), so a freed port comes round
//! again only after the rest of the range: the backend's TIME_WAIT of its previous connection
//! is then as old as it can be. CPUs start apart, and rarely share a word.
//!
//! The bits follow FLOWS' reply entries: set when one is inserted (`mark`), cleared when one is
//! removed (`release`). FLOWS stays the arbiter: a port is taken by inserting its reply entry
//! with BPF_NOEXIST, so a wrong bit costs a retry, never a shared port.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use lb_common::{
    FLOW_DNAT, FLOW_PORT_RELEASED, FlowKeyOf, FlowValueOf, SNAT_POOL_MAX, SNAT_PORT_WORDS,
    SNAT_SUMMARY_WORDS,
    snat_ports::{PortMap, in_range, port_bit},
};

use crate::{
    family::Family,
    maps::{SNAT_FULL, SNAT_NEXT, SNAT_PORTS, cpu_count, snat_port_count, snat_port_min},
};

/// The bitmap the port of `flow` (either entry) is marked in.
#[inline(always)]
pub fn ports_of<A: Family>(flow: &FlowValueOf<A>) -> PortMap {
    PortMap::of(flow.backend_id, u32::from(flow.snat_index))
}

/// Claims a free port of the range for `backend_id` on one of the first `count` addresses of
/// its service's SNAT pool, trying them from the `start`th on: the address's index and the
/// port, if one is free.
#[inline(always)]
pub fn claim(backend_id: u32, count: u32, start: u32, cpu: u32) -> Option<(u32, u16)> {
    // A loop around a call the verifier checks once: each step costs it a few instructions.
    let mut claimed = None;
    for i in 0..SNAT_POOL_MAX {
        if i < count && claimed.is_none() {
            let index = if start + i >= count {
                start + i - count
            } else {
                start + i
            };
            let port = lb_snat_claim(PortMap::of(backend_id, index).0, cpu);
            if let Ok(port) = u16::try_from(port) {
                claimed = Some((index, port));
            }
        }
    }
    claimed
}

/// `claim`'s search in one bitmap, a BPF function of its own: the verifier checks it once,
/// apart from the paths that reach it, and its loop state stays off the caller's stack.
/// Returns the port, or u32::MAX.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_snat_claim(ports: u32, cpu: u32) -> u32 {
    search(PortMap(ports), cpu).map_or(u32::MAX, u32::from)
}

#[inline(always)]
fn search(ports: PortMap, cpu: u32) -> Option<u16> {
    let (first, last) = range();
    let next = SNAT_NEXT.get_ptr_mut(ports.0)?;
    // SAFETY: a per-CPU array slot, only this CPU writes it.
    let mut start = unsafe { *next };
    if !(first / 64..=last / 64).contains(&start) {
        // This CPU's first search: CPUs start apart.
        let words = last / 64 - first / 64 + 1;
        start = first / 64 + (cpu * words).checked_div(cpu_count()).unwrap_or(0) % words;
    }
    // Every summary word from the start word's on, round to it again: first from the start
    // word up, last (after the rest of the range) below it. Words out of the range have none
    // of their bits in it.
    for i in 0..=SNAT_SUMMARY_WORDS {
        let s = (start / 64 + i) % SNAT_SUMMARY_WORDS;
        let full = *SNAT_FULL.get(ports.summary_index(s * 64))?;
        let mut candidates = !full & in_range(s, first / 64, last / 64);
        if i == 0 {
            candidates &= u64::MAX << (start % 64);
        } else if i == SNAT_SUMMARY_WORDS {
            candidates &= !(u64::MAX << (start % 64));
        }
        if candidates == 0 {
            continue;
        }
        let word = s * 64 + candidates.trailing_zeros();
        if let Some(port) = claim_in_word(ports, word, first, last) {
            // SAFETY: as above.
            unsafe { *next = word };
            return Some(port);
        }
    }
    None
}

/// Claims the lowest free port of `word` in the range, unless another CPU takes it first.
#[inline(always)]
fn claim_in_word(ports: PortMap, word: u32, first: u32, last: u32) -> Option<u16> {
    let bits = SNAT_PORTS.get_ptr_mut(ports.0 * SNAT_PORT_WORDS + word)?;
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let free = !unsafe { core::ptr::read_volatile(bits) } & in_range(word, first, last);
    let port = (word * 64 + free.trailing_zeros()) as u16;
    let claimed = free != 0 && fetch_or(bits, port_bit(port)) & port_bit(port) == 0;
    note_if_full(ports, word, bits, first, last);
    claimed.then_some(port)
}

/// Claims `port` in `ports` if its bit is clear: true if this call set it.
#[inline(always)]
pub fn claim_port(ports: PortMap, port: u16) -> bool {
    lb_snat_mark(ports.0, u32::from(port)) != 0
}

/// Sets `port`'s bit: a reply entry now holds it.
#[inline(always)]
pub fn mark(ports: PortMap, port: u16) {
    let _ = lb_snat_mark(ports.0, u32::from(port));
}

/// Clears the bit of the port the removed reply entry `reply_key` of `flow` (either entry)
/// held, unless the expiry gave it back already (FLOW_PORT_RELEASED: the bit is another's now)
/// or it held none (FLOW_DNAT).
#[inline(always)]
pub fn release_held<A: Family>(reply_key: &FlowKeyOf<A>, flow: &FlowValueOf<A>) {
    if flow.flags & (FLOW_PORT_RELEASED | FLOW_DNAT) == 0 {
        release(reply_key, ports_of(flow));
    }
}

/// Clears the bit of the port the removed reply entry `reply_key` held in `ports`.
#[inline(always)]
pub fn release<A: Family>(reply_key: &FlowKeyOf<A>, ports: PortMap) {
    let _ = lb_snat_release(ports.0, u32::from(reply_key.dst_port.to_host()));
}

/// `claim_port` and `mark`, a BPF function of its own (as `lb_snat_claim`): 1 if this call set
/// the bit.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_snat_mark(ports: u32, port: u32) -> u32 {
    let (ports, port) = (PortMap(ports), port as u16);
    let Some(bits) = SNAT_PORTS.get_ptr_mut(ports.word_index(port)) else {
        return 0;
    };
    let claimed = fetch_or(bits, port_bit(port)) & port_bit(port) == 0;
    let (first, last) = range();
    note_if_full(ports, u32::from(port) / 64, bits, first, last);
    u32::from(claimed)
}

/// `release`, a BPF function of its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_snat_release(ports: u32, port: u32) -> u32 {
    let (ports, port) = (PortMap(ports), port as u16);
    if let Some(bits) = SNAT_PORTS.get_ptr_mut(ports.word_index(port)) {
        fetch_and(bits, !port_bit(port));
    }
    let word = u32::from(port) / 64;
    if let Some(summary) = SNAT_FULL.get_ptr_mut(ports.summary_index(word)) {
        let bit = 1u64 << (word % 64);
        // SAFETY: a value pointer from a map lookup is valid for this program run. Read first:
        // most releases find the word's bit clear already.
        if unsafe { core::ptr::read_volatile(summary) } & bit != 0 {
            fetch_and(summary, !bit);
        }
    }
    0
}

/// The range as port numbers, first and last.
#[inline(always)]
fn range() -> (u32, u32) {
    let first = snat_port_min();
    (first, first + snat_port_count().max(1) - 1)
}

/// Sets `word`'s summary bit if all its ports in the range are held. A port released meanwhile
/// clears the summary bit after its own: reading the word again once the summary bit is set
/// leaves no free port hidden behind it.
#[inline(always)]
fn note_if_full(ports: PortMap, word: u32, bits: *mut u64, first: u32, last: u32) {
    let valid = in_range(word, first, last);
    // SAFETY: a value pointer from a map lookup is valid for this program run.
    let held = |bits: *mut u64| unsafe { core::ptr::read_volatile(bits) } & valid == valid;
    if !held(bits) {
        return;
    }
    let Some(summary) = SNAT_FULL.get_ptr_mut(ports.summary_index(word)) else {
        return;
    };
    let bit = 1u64 << (word % 64);
    fetch_or(summary, bit);
    if !held(bits) {
        fetch_and(summary, !bit);
    }
}

#[inline(always)]
fn fetch_or(word: *mut u64, bits: u64) -> u64 {
    // SAFETY: callers pass a map value pointer, valid for this program run and 8-aligned.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) }
}

#[inline(always)]
fn fetch_and(word: *mut u64, bits: u64) -> u64 {
    // SAFETY: as above.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) }
}
