//! Network namespaces for tests, named `lbt-<pid>-<n>`: created by the test, removed by `Drop`
//! (processes inside are killed first), and swept at start when a crashed run left them.
//! Follows ENGINEERING.md's rules: nothing is added to the root namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

pub const PREFIX: &str = "lbt-";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command on the host, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Panics unless the tests can create namespaces and load BPF (root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and load XDP programs: run them as root (cargo xtask test does)"
    );
}

/// Removes namespaces of this prefix whose creating process is gone.
pub fn sweep_stale() {
    let out = run(&["ip", "netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        if !alive {
            kill_all_in(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn kill_all_in(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A network namespace that lives as long as this value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace with loopback up; `role` makes names readable in `ip netns list`.
    pub fn new(role: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs a command inside, panicking with its output if it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a shell script inside, panicking with its output if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self.run(&["sh", "-ec", script]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell script inside and returns its output whatever its exit status.
    pub fn try_sh(&self, script: &str) -> Output {
        self.command(&["sh", "-c", script])
            .output()
            .unwrap_or_else(|e| panic!("cannot run in {}: {e}", self.name))
    }

    /// Starts a long-running process inside; it is killed when the namespace is dropped.
    pub fn spawn(&self, args: &[&str], stderr: Stdio) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", self.name))
    }

    /// Runs `f` on a new thread inside this namespace: sockets it opens live there, and so do
    /// BPF_PROG_TEST_RUN's FIB lookups and DEVMAP writes. The namespace stays this guard's.
    pub fn spawn_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
    }
}

fn enter(name: &str) {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Stops a server started with `Netns::spawn`: SIGTERM first, so that a master process (nginx)
/// stops and reaps its workers, SIGKILL if it has not exited within 3 s.
pub fn stop_child(child: &mut Child) {
    terminate(child, std::time::Duration::from_secs(3));
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace`. Its exit status, if it
/// exited on its own.
pub fn terminate(
    child: &mut Child,
    grace: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Pins the calling thread to CPU 0: the data path's per-CPU state (SNAT port cursor, counters)
/// is then predictable, and timings do not move between CPUs.
pub fn pin_current_thread_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
