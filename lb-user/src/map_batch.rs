//! Batched reads and writes of a BPF hash map (BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH,
//! kernel 5.6+), which aya 0.16 does not wrap: one syscall moves thousands of entries, where
//! aya's iterator takes two per entry. The daemon sweeps FLOWS every second, so at a million
//! entries this is the difference between milliseconds and most of a CPU.

use std::{io, os::fd::AsRawFd as _, os::fd::BorrowedFd};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries one lookup call asks for.
const LOOKUP_CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// bpf(2) with a batch command.
///
/// # Safety
/// `attr`'s pointers must be valid for `count` keys and values of the map's sizes, and its
/// batch tokens for the map's token size (at most 8 bytes for hash maps).
unsafe fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller's guarantee.
    unsafe { crate::bpf_syscall::bpf(cmd, attr) }.map(drop)
}

/// Every entry of the hash map `fd`, whose keys and values are `K` and `V`.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut all = Vec::new();
    let mut chunk = LOOKUP_CHUNK;
    // Hash maps use a bucket index as their batch token; 8 bytes leaves room.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod (plain bytes, any pattern valid); zeroed buffers are valid.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        // SAFETY: as above.
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: buffers of `chunk` keys and values, and 8-byte tokens.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = (attr.count as usize).min(chunk);
        all.extend(keys.into_iter().zip(values).take(got));
        match result {
            Ok(()) => {}
            // The walk is complete.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(all),
            // One bucket holds more entries than the chunk: ask for more at once.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Inserts or replaces the entries (`flags` as for a single update: BPF_ANY, BPF_NOEXIST...).
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    flags: u64,
) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::other("as many keys as values"));
    }
    for (k, v) in keys.chunks(LOOKUP_CHUNK).zip(values.chunks(LOOKUP_CHUNK)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: flags,
            ..BatchAttr::default()
        };
        // SAFETY: `k` and `v` hold `count` keys and values; the kernel only reads them.
        unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr)? };
    }
    Ok(())
}
