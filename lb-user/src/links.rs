//! Word from the kernel that a network device changed: a route netlink socket in the link
//! group. A container that starts, stops or restarts adds or removes a veth and enslaves it to
//! its bridge, and the daemon follows the bridge's ports as soon as that happens rather than
//! at its next look. The messages are not parsed: any of them means "look again", and the
//! look reads the bridges' ports from sysfs, so a message lost to a full socket buffer costs
//! nothing but the wait for the next one.

use std::{io, mem::MaybeUninit};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

/// rtnetlink's multicast group of link changes (RTMGRP_LINK).
const RTMGRP_LINK: u32 = 1;

pub struct LinkEvents {
    socket: AsyncFd<Socket>,
}

impl LinkEvents {
    /// A socket subscribed to link changes in this network namespace.
    pub fn open() -> io::Result<LinkEvents> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        socket.set_nonblocking(true)?;
        // SAFETY: the closure initialises a sockaddr_nl within the storage it is given and
        // returns its length, as try_init asks.
        let ((), address) = unsafe {
            SockAddr::try_init(|storage, len| {
                let nl = storage.cast::<libc::sockaddr_nl>();
                std::ptr::write_bytes(nl, 0, 1);
                (*nl).nl_family = libc::AF_NETLINK as libc::sa_family_t;
                (*nl).nl_groups = RTMGRP_LINK;
                *len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                Ok(())
            })
        }?;
        socket.bind(&address)?;
        // SAFETY: the socket is owned by the AsyncFd from here on: its descriptor stays open,
        // and the same, for as long as it is registered.
        let socket =
            unsafe { AsyncFd::register(socket) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(LinkEvents { socket })
    }

    /// Waits until at least one link changed, and takes every message waiting.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let mut got = false;
            let mut buf = [MaybeUninit::<u8>::uninit(); 8192];
            loop {
                match ready.get_inner().recv(&mut buf) {
                    Ok(_) => got = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The buffer overflowed: messages were lost, which a look makes up for.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    Err(e) => return Err(e),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A veth pair added in a network namespace of the test's own (gone with its thread)
    /// must be announced. Needs root, as every kernel-facing test here.
    #[test]
    fn a_new_device_is_announced() {
        let ours = std::thread::spawn(|| {
            // SAFETY: unshare moves this thread only, which the test owns and ends with.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut events = LinkEvents::open()?;
                let added = std::process::Command::new("ip")
                    .args([
                        "link",
                        "add",
                        "lbt-links0",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "lbt-links1",
                    ])
                    .status()?;
                assert!(added.success(), "ip link add");
                tokio::time::timeout(std::time::Duration::from_secs(5), events.changed())
                    .await
                    .map_err(|_| io::Error::other("no link event within 5 s"))?
            })
        })
        .join()
        .expect("the test's thread");
        match ours {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                panic!("needs root (unshare CLONE_NEWNET): {e}")
            }
            other => other.expect("a link event"),
        }
    }
}
