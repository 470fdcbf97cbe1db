//! Forwarded packets per second per core through the real program, attached in native mode
//! (issue 13).
//!
//! The issue asks for the kernel's live-frames test run (BPF_F_TEST_XDP_LIVE_FRAMES, as
//! xdp-trafficgen uses it). This machine's kernel refuses it: BPF_PROG_TEST_RUN with that flag
//! fails with EPERM for any XDP program, even one that only drops, while capability checks pass
//! and the same run without the flag works. So the frames come from a loop instead, with no
//! generator to pay for:
//!
//! - lb is attached to lb0 as the daemon attaches it, and forwards the established flow out of
//!   lb1;
//! - a reflector on peer1 (lb1's other end) writes the flow's client packet whole over each
//!   frame it gets and redirects it out of peer0, into lb0 again;
//! - a few hundred frames, sent once into peer0 through a packet socket, go round until the
//!   reflector is detached.
//!
//! Every frame takes the established path every time round, and all of it runs in softirq on
//! the CPU that sent the frames (a redirect schedules the receiving device's NAPI where it
//! runs): one core, whole. The ceiling is the same loop with lb0's program replaced by one that
//! only redirects to lb1. The rate is the reflector's redirects per second (veth's per-queue
//! counter); each measurement also reports the share of CPU 0 spent in softirq, to show the
//! loop had the core.
//!
//! The reflector and the redirect-only program are raw instructions loaded through bpf(2): a
//! bench needs no second object file, and aya loads programs only from one.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{cost::MachineCpu, summary::Summary};

/// bpf(2) commands and constants (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_FUNC_REDIRECT: i32 = 23;
const XDP_DROP: i32 = 1;

/// Frames sent into the loop: enough to fill NAPI's batches, fewer than a veth ring holds (256).
const FRAMES_IN_FLIGHT: usize = 128;

#[derive(Clone, Debug, Serialize)]
pub struct ForwardingResults {
    /// Frame length without the FCS (64 bytes on the wire).
    pub frame_len: usize,
    pub frames_in_flight: usize,
    pub seconds_per_round: f64,
    /// The loop with a redirect-only program in lb's place: the machine's ceiling (Mpps).
    pub ceiling_mpps: Summary,
    /// The loop through lb, established flow, full NAT (Mpps).
    pub lb_mpps: Summary,
    /// The smallest share of CPU 0's time spent in softirq during a measurement.
    pub min_softirq_share: f64,
}

/// One BPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const JGT_X: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// `return bpf_redirect(ifindex, 0)`.
fn redirect_tail(ifindex: u32) -> [[u8; 8]; 4] {
    [
        insn(MOV64_K, 1, 0, 0, ifindex as i32),
        insn(MOV64_K, 2, 0, 0, 0),
        insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Redirects every frame to `ifindex`.
fn redirect_program(ifindex: u32) -> Vec<[u8; 8]> {
    redirect_tail(ifindex).to_vec()
}

/// Writes `frame` (a multiple of 4 bytes) over the frame it is given and redirects it to
/// `ifindex`; drops a frame too short to hold it.
fn reflector_program(frame: &[u8], ifindex: u32) -> Vec<[u8; 8]> {
    let words: Vec<i32> = frame
        .as_chunks::<4>()
        .0
        .iter()
        .map(|w| i32::from_le_bytes(*w))
        .collect();
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0), // r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(MOV64_X, 4, 2, 0, 0),
        insn(ADD64_K, 4, 0, 0, frame.len() as i32),
        insn(MOV64_K, 0, 0, 0, XDP_DROP),
    ];
    let tail = redirect_tail(ifindex);
    // Past the stores and the redirect, onto its exit.
    let skip = (words.len() + tail.len() - 1) as i16;
    p.push(insn(JGT_X, 4, 3, skip, 0));
    for (i, w) in words.iter().enumerate() {
        p.push(insn(ST_W, 2, 0, (i * 4) as i16, *w));
    }
    p.extend(tail);
    p
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i32> {
    // SAFETY: `attr` is a bpf_attr of the command's layout, zero past its fields; pointers
    // inside it point to buffers the caller keeps alive.
    unsafe { lb_user::bpf_syscall::bpf(cmd, attr) }
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Loads an XDP program; the verifier's log in the error if it refuses.
fn load_xdp(insns: &[[u8; 8]]) -> Result<OwnedFd, String> {
    let code: Vec<u8> = insns.concat();
    let license = b"GPL\0";
    let mut log = vec![0u8; 65_536];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, code.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1);
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    put_u32(&mut attr, 68, BPF_XDP);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(format!(
                "loading a {}-instruction XDP program: {e}\n{}",
                insns.len(),
                String::from_utf8_lossy(&log[..end])
            ))
        }
    }
}

/// Attaches `prog` to `ifindex` in native mode; detached when the link is dropped.
fn attach_native(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd, String> {
    let mut attr = [0u8; 64];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, BPF_XDP);
    put_u32(&mut attr, 12, XDP_FLAGS_DRV_MODE);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)
        .map_err(|e| format!("attaching an XDP program natively to ifindex {ifindex}: {e}"))?;
    // SAFETY: as in `load_xdp`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `frame` `count` times out of `ifindex` through a packet socket.
fn send_frames(ifindex: u32, frame: &[u8], count: usize) -> Result<(), String> {
    let error = |what: &str| format!("{what} (packet socket): {}", io::Error::last_os_error());
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(error("socket"));
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are plain integers.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    for _ in 0..count {
        // SAFETY: `frame` and `to` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(error("sendto"));
        }
    }
    Ok(())
}

/// The frames `dev`'s XDP program redirected (veth's per-queue counters, all queues).
fn xdp_redirects(dev: &str) -> Result<u64, String> {
    let out = Command::new("ethtool")
        .args(["-S", dev])
        .output()
        .map_err(|e| format!("ethtool -S {dev}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u64> = super::cost::ethtool_counters(&text)
        .filter(|(name, _)| name.starts_with("rx_queue_") && name.ends_with("_xdp_redirect"))
        .map(|(_, v)| v)
        .collect();
    if counts.is_empty() {
        return Err(format!(
            "ethtool -S {dev} shows no rx_queue_N_xdp_redirect: {text}"
        ));
    }
    Ok(counts.iter().sum())
}

/// The devices of the loop, by name and index.
pub struct Loop<'a> {
    /// Where the frames enter lb's device: lb0's other end.
    pub into_lb: (&'a str, u32),
    /// lb's device, and the device it forwards the flow out of.
    pub lb_in: u32,
    pub lb_out: u32,
    /// lb_out's other end, where the reflector runs.
    pub reflector_at: (&'a str, u32),
}

/// Runs the loop for `seconds` with whatever program lb0 holds: (Mpps, softirq share of CPU 0).
fn one_round(
    devices: &Loop<'_>,
    reflector: &OwnedFd,
    frame: &[u8],
    seconds: f64,
) -> Result<(f64, f64), String> {
    let link = attach_native(reflector, devices.reflector_at.1)?;
    send_frames(devices.into_lb.1, frame, FRAMES_IN_FLIGHT)?;
    thread::sleep(Duration::from_millis(100));
    let (count0, cpu0, t0) = (
        xdp_redirects(devices.reflector_at.0)?,
        MachineCpu::read_cpu(0),
        Instant::now(),
    );
    thread::sleep(Duration::from_secs_f64(seconds));
    let (count1, cpu1, elapsed) = (
        xdp_redirects(devices.reflector_at.0)?,
        MachineCpu::read_cpu(0),
        t0.elapsed().as_secs_f64(),
    );
    drop(link);
    if !cpu0.advanced_to(&cpu1) {
        return Err("no time for cpu0 in /proc/stat".into());
    }
    let mpps = count1.saturating_sub(count0) as f64 / elapsed / 1e6;
    let (_, share) = cpu0.shares_until(&cpu1);
    if mpps == 0.0 {
        return Err("no frame went round the forwarding loop".into());
    }
    // Frames still in flight die at the reflector's device without it.
    thread::sleep(Duration::from_millis(50));
    Ok((mpps, share))
}

/// Rounds of the ceiling and of lb, interleaved. `set_lb_attached(true)` attaches lb to lb0,
/// `(false)` detaches it. `frame` is the established flow's client packet, a multiple of 4
/// bytes.
pub fn measure(
    devices: &Loop<'_>,
    frame: &[u8],
    seconds: f64,
    rounds: usize,
    mut set_lb_attached: impl FnMut(bool) -> Result<(), String>,
) -> Result<ForwardingResults, String> {
    let reflector = load_xdp(&reflector_program(frame, devices.into_lb.1))?;
    let redirect_only = load_xdp(&redirect_program(devices.lb_out))?;
    let (mut ceiling, mut lb, mut min_share) = (Vec::new(), Vec::new(), 1.0f64);
    for _ in 0..rounds {
        let link = attach_native(&redirect_only, devices.lb_in)?;
        let (mpps, share) = one_round(devices, &reflector, frame, seconds)?;
        drop(link);
        ceiling.push(mpps);
        min_share = min_share.min(share);
        set_lb_attached(true)?;
        let round = one_round(devices, &reflector, frame, seconds);
        set_lb_attached(false)?;
        let (mpps, share) = round?;
        lb.push(mpps);
        min_share = min_share.min(share);
    }
    Ok(ForwardingResults {
        frame_len: frame.len(),
        frames_in_flight: FRAMES_IN_FLIGHT,
        seconds_per_round: seconds,
        ceiling_mpps: Summary::of(&ceiling).ok_or("no forwarding rounds")?,
        lb_mpps: Summary::of(&lb).ok_or("no forwarding rounds")?,
        min_softirq_share: min_share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reflector_stores_the_frame_word_by_word_then_redirects() {
        let frame: Vec<u8> = (0u8..8).collect();
        let p = reflector_program(&frame, 7);
        assert_eq!(p.len(), 6 + 2 + 4);
        // The bounds check jumps past both stores and the redirect, onto the exit.
        assert_eq!(p[5][0], JGT_X);
        let skip = i16::from_le_bytes([p[5][2], p[5][3]]);
        assert_eq!(p[6 + skip as usize][0], EXIT);
        assert_eq!(p[6], insn(ST_W, 2, 0, 0, i32::from_le_bytes([0, 1, 2, 3])));
        assert_eq!(p[7], insn(ST_W, 2, 0, 4, i32::from_le_bytes([4, 5, 6, 7])));
        assert_eq!(p[8], insn(MOV64_K, 1, 0, 0, 7));
        assert_eq!(p[10], insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT));
    }
}
