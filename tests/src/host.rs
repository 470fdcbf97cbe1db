//! The balancer's host as the single-host deployment sees it: the cgroup whose processes the
//! socket hooks balance, and the resolver the daemon asks for backends' names. Both are the
//! test's own, removed with it.

use crate::netns::Netns;

/// The balancer namespace's own resolver files: `ip netns exec` mounts /etc/netns/NAME/* over
/// /etc, so the daemon resolves with them as it would with the host's. The resolver points at
/// a port nobody serves, so no query leaves the namespace; removed with the test.
pub struct NetnsResolver {
    dir: std::path::PathBuf,
}

impl NetnsResolver {
    pub fn new(netns: &str) -> NetnsResolver {
        let dir = std::path::PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("write resolv.conf");
        let resolver = NetnsResolver { dir };
        resolver.hosts::<std::net::IpAddr>(&[]);
        resolver
    }

    /// Writes the hosts file in place (the mount follows the file, not its name): `api` has
    /// `addrs` (A records for IPv4 ones, AAAA for IPv6 ones).
    pub fn hosts<A: Into<std::net::IpAddr> + Copy>(&self, addrs: &[A]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for &a in addrs {
            text += &format!("{} api\n", a.into());
        }
        std::fs::write(self.dir.join("hosts"), text).expect("write hosts");
    }
}

impl Drop for NetnsResolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cgroup v2 of the test's own: a cgroup2 mount in a temporary directory (`ip netns exec`
/// hides /sys/fs/cgroup) and a child in it that only the test's client processes join. Socket
/// hooks attach to the child, never to the machine's root. Unmounted with the test.
pub struct ClientCgroup {
    mount: std::path::PathBuf,
    pub child: std::path::PathBuf,
}

impl ClientCgroup {
    pub fn new(name: &str) -> ClientCgroup {
        let mount = std::env::temp_dir().join(format!("{name}-cgroup2"));
        std::fs::create_dir_all(&mount).expect("create the cgroup2 mount point");
        crate::netns::run(&[
            "mount",
            "-t",
            "cgroup2",
            "none",
            &mount.display().to_string(),
        ]);
        let child = mount.join(format!("{name}-clients"));
        std::fs::create_dir_all(&child).expect("create the child cgroup");
        ClientCgroup { mount, child }
    }

    /// `command` run in namespace `ns` by a process in the child cgroup: its output.
    pub fn run_in(&self, ns: &Netns, command: &str) -> String {
        let procs = self.child.join("cgroup.procs");
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} sh -c '{}'",
            procs.display(),
            ns.name,
            command.replace('\'', "'\\''")
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("run a client in the cgroup");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ClientCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.child);
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}
