//! What the socket hooks for clients on the host itself need from the host: the daemon's
//! network namespace (the only one they act in), the cgroup v2 directory they attach to by
//! default, and which VIPs are host addresses (reached at a loopback address too).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

/// Where the cgroup v2 hierarchy is mounted: alone (unified), or beside v1 (hybrid).
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, Linux 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the option writes at most `len` bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 mount, if there is one where systemd and Docker put it.
pub fn default_cgroup() -> Option<PathBuf> {
    CGROUP2_MOUNTS
        .iter()
        .map(Path::new)
        .find(|p| is_cgroup2(p))
        .map(Path::to_path_buf)
}

/// Whether `dir` is on a cgroup v2 filesystem.
pub fn is_cgroup2(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; the path is NUL-terminated.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Whether `name` is a Linux bridge.
pub fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .is_dir()
}

/// Whether device `name`'s MAC was set for it (`NET_ADDR_SET`). A bridge without one takes
/// the lowest of its ports' MACs, so it changes as containers come and go.
pub fn has_own_mac(name: &str) -> bool {
    const NET_ADDR_SET: &str = "3";
    std::fs::read_to_string(
        Path::new("/sys/class/net")
            .join(name)
            .join("addr_assign_type"),
    )
    .is_ok_and(|t| t.trim() == NET_ADDR_SET)
}

/// The ports of bridge `name`, sorted.
pub fn bridge_ports(name: &str) -> Vec<String> {
    let dir = Path::new("/sys/class/net").join(name).join("brif");
    let mut ports: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    ports
}

/// Whether `addr` is an address of this host (in this namespace): only those can be bound.
pub fn is_host_address(addr: impl Into<IpAddr>) -> bool {
    let addr = addr.into();
    !addr.is_unspecified() && UdpSocket::bind((addr, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn the_namespace_has_a_cookie() {
        assert_ne!(netns_cookie().expect("SO_NETNS_COOKIE"), 0);
    }

    #[test]
    fn host_addresses_are_told_from_others() {
        assert!(is_host_address(Ipv4Addr::LOCALHOST));
        // TEST-NET-3: never an address of a test machine.
        assert!(!is_host_address(Ipv4Addr::new(203, 0, 113, 77)));
        assert!(!is_host_address(Ipv4Addr::UNSPECIFIED));
        assert!(is_host_address(Ipv6Addr::LOCALHOST));
        // The documentation prefix, as above.
        assert!(!is_host_address(
            "2001:db8::77".parse::<Ipv6Addr>().expect("address")
        ));
        assert!(!is_host_address(Ipv6Addr::UNSPECIFIED));
    }

    #[test]
    fn loopback_is_no_bridge() {
        assert!(!is_bridge("lo"));
        assert!(bridge_ports("lo").is_empty());
        assert!(bridge_ports("no-such-device").is_empty());
    }

    #[test]
    fn only_cgroup2_counts() {
        assert!(!is_cgroup2(Path::new("/tmp")));
        assert!(!is_cgroup2(Path::new("/no/such/dir")));
    }
}
