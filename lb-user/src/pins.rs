//! The daemon's pins on a bpf filesystem: one file per map (by its name), one XDP link per
//! interface (`link_<name>`) and one link per socket hook (`host_<hook>`). Pinned, the maps and the attachment outlive the daemon: stopping
//! it leaves forwarding running, and the next daemon adopts them. `remove` ends all of it.

use std::{
    io,
    path::{Path, PathBuf},
};

pub const DEFAULT_DIR: &str = "/sys/fs/bpf/lb";
/// Every map of the program, pinned under its own name.
pub const MAP_NAMES: [&str; 28] = [
    // The layout version of the maps pinned beside it: checked before any is adopted.
    "LAYOUT",
    "SERVICES",
    "BACKENDS",
    "MAGLEV",
    "FLOWS",
    "BACKEND_STATS",
    "FLOW_COUNTS",
    "SUSPECT",
    "STATS",
    "SNAT_PORTS",
    "SNAT_FULL",
    "SNAT_NEXT",
    // The highest TCP timestamp sent: a new daemon's SYNs must not go back behind it.
    "TS_HIGH",
    "RESET_BUDGET",
    "ICMP_BUDGET",
    "VIPS",
    // The expiry timer lives in it: pinned, it keeps expiring flows while no daemon runs.
    "EXPIRY",
    "IFACES",
    "TX_PORTS",
    "BRIDGE_PORTS",
    // A host connection made before a restart still shows its VIP.
    "SOCK_REVERSE",
    "HOST_PORTS",
    "SERVICES6",
    "BACKENDS6",
    "FLOWS6",
    "SOCK_REVERSE6",
    "VIPS6",
    "HOST_PORTS6",
];
/// Maps earlier builds pinned and this one no longer has: `remove` takes them too.
const RETIRED_MAP_NAMES: [&str; 1] = ["SNAT_CURSOR"];

const LINK_PREFIX: &str = "link_";
const HOST_LINK_PREFIX: &str = "host_";
const TC_LINK_PREFIX: &str = "tc_";
/// statfs(2)'s f_type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a bpf filesystem, so nothing pinned there would outlive the daemon; mount one (mount -t bpf bpf {dir}) or give --bpffs a directory on one"
    )]
    NotBpffs { dir: String },
    #[error(
        "{dir} is held by another lb process (a daemon, perhaps one that hangs, or lb remove): stop it first"
    )]
    Locked { dir: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The pin directory, held by one lb process at a time: a daemon for its whole life, `lb
/// remove` while it removes. Two daemons given different sockets would otherwise write the
/// same maps. An advisory lock (flock) on the directory itself, released when the process
/// ends however it ends.
pub struct PinLock {
    _dir: std::fs::File,
}

/// Takes the lock on `dir`, or says who may hold it.
pub fn lock(dir: &Path) -> Result<PinLock, PinError> {
    let file = std::fs::File::open(dir).map_err(io_error(dir))?;
    match file.try_lock() {
        Ok(()) => Ok(PinLock { _dir: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(PinError::Locked {
            dir: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error(dir)(e)),
    }
}

/// Creates `dir` (its parent must be on a bpf filesystem, or `dir` itself a mount of one).
pub fn prepare(dir: &Path) -> Result<(), PinError> {
    std::fs::create_dir_all(dir).map_err(|source| match on_bpffs(dir.parent().unwrap_or(dir)) {
        Ok(false) => PinError::NotBpffs {
            dir: dir.display().to_string(),
        },
        _ => io_error(dir)(source),
    })?;
    if !on_bpffs(dir).map_err(io_error(dir))? {
        let _ = std::fs::remove_dir(dir);
        return Err(PinError::NotBpffs {
            dir: dir.display().to_string(),
        });
    }
    Ok(())
}

fn on_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statfs is valid, and statfs only writes it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fs.f_type as i64 == BPF_FS_MAGIC)
}

pub fn link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{interface}"))
}

/// The pin of the tc link on bridge port `port`.
pub fn tc_link_path(dir: &Path, port: &str) -> PathBuf {
    dir.join(format!("{TC_LINK_PREFIX}{port}"))
}

/// The pin of socket hook `program`'s link.
pub fn host_link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{HOST_LINK_PREFIX}{program}"))
}

/// Unpins the socket hooks' links (detaching them once no process holds them). Returns how
/// many there were.
pub fn remove_host_links(dir: &Path) -> Result<usize, PinError> {
    remove_prefixed(dir, HOST_LINK_PREFIX)
}

/// Unpins the tc links of bridge ports. Returns how many there were.
pub fn remove_tc_links(dir: &Path) -> Result<usize, PinError> {
    remove_prefixed(dir, TC_LINK_PREFIX)
}

fn remove_prefixed(dir: &Path, prefix: &str) -> Result<usize, PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix))
        {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Interfaces with a pinned link in `dir`.
pub fn pinned_interfaces(dir: &Path) -> Result<Vec<String>, PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(LINK_PREFIX))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Unpins the links of interfaces not in `keep` (detaching the program there, once no process
/// holds the link). Returns the interfaces let go.
pub fn remove_links_except(dir: &Path, keep: &[String]) -> Result<Vec<String>, PinError> {
    let mut gone = Vec::new();
    for name in pinned_interfaces(dir)? {
        if !keep.contains(&name) {
            let path = link_path(dir, &name);
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            gone.push(name);
        }
    }
    Ok(gone)
}

/// Unpins everything lb pinned in `dir`, and removes `dir` if nothing else is in it: the links
/// go (the program detaches once no daemon holds it) and the maps with them. Returns the
/// interfaces detached.
pub fn remove(dir: &Path) -> Result<Vec<String>, PinError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let _held = lock(dir)?;
    let detached = remove_links_except(dir, &[])?;
    remove_host_links(dir)?;
    remove_tc_links(dir)?;
    for name in MAP_NAMES.iter().chain(&RETIRED_MAP_NAMES) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&path)(e)),
            _ => {}
        }
    }
    // Not empty (someone else's pins) or a mount point: it stays.
    let _ = std::fs::remove_dir(dir);
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_off_bpffs_is_refused_with_the_mount_command() {
        let dir = std::env::temp_dir().join(format!("lb-pins-test-{}", std::process::id()));
        let err = prepare(&dir).expect_err("tmp is not bpffs");
        assert!(matches!(err, PinError::NotBpffs { .. }), "{err}");
        assert!(err.to_string().contains("mount -t bpf bpf"), "{err}");
        assert!(!dir.exists(), "the refused directory is not left behind");
    }

    #[test]
    fn links_are_found_by_interface_and_others_removed() {
        let dir = std::env::temp_dir().join(format!("lb-pins-links-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for f in [
            "link_eth0",
            "link_eth1",
            "host_lb_connect4",
            "FLOWS",
            "STATS",
        ] {
            std::fs::write(dir.join(f), b"").expect("file");
        }
        assert_eq!(pinned_interfaces(&dir).expect("list"), ["eth0", "eth1"]);
        let gone = remove_links_except(&dir, &["eth0".into()]).expect("remove");
        assert_eq!(gone, ["eth1"]);
        assert_eq!(remove(&dir).expect("remove all"), ["eth0"]);
        assert!(!dir.exists(), "host links and maps went too");
        // Files lb did not pin stay, and so does their directory.
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("progs.debug"), b"").expect("file");
        std::fs::write(dir.join("FLOWS"), b"").expect("file");
        assert!(remove(&dir).expect("remove").is_empty());
        assert!(dir.join("progs.debug").exists() && !dir.join("FLOWS").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(pinned_interfaces(&dir).expect("missing dir").is_empty());
    }
}
