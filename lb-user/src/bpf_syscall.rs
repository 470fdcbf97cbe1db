//! bpf(2) itself, for the commands aya 0.16 does not wrap (batched map operations; the
//! benchmark's raw programs and links).

use std::io;

/// Issues bpf(2) command `cmd` with `attr`, its `union bpf_attr` member (zero past its fields,
/// as the kernel requires): the syscall's non-negative result (a file descriptor, for the
/// commands that make one).
///
/// # Safety
/// Every pointer inside `attr` must be valid for what the command reads or writes through it,
/// for the call's duration.
pub unsafe fn bpf<T: ?Sized>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    let size = size_of_val(attr) as libc::c_uint;
    // SAFETY: the caller guarantees the pointers inside `attr`; the kernel reads and writes
    // only `attr`'s `size` bytes and the buffers it names.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<u8>(), size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}
