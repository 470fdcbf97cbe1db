//! Cutting connections on purpose: a removed backend's at the end of its grace period or with
//! `--now`, and a backend's marked down under `on_backend_down = "reset"`. Each end gets an RST
//! it accepts at once (`lb_common::reset::connection_resets`), sent by the host through a raw
//! socket, so neither the client nor the backend waits for a timeout; then both FLOWS entries
//! go (an IPv6 connection's FLOWS6 entries go without RSTs, for now). A half-open connection
//! gets no RST: the client's retransmitted SYN finds another backend.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{FLOW_REVERSE, conntrack, reset};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::dataplane::{Dataplane, DataplaneError};

/// What a cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Connections that had not ended (ended ones' entries go too, uncounted).
    pub connections: u64,
    /// RSTs sent (two per connection that had both ends).
    pub resets: u64,
    /// RSTs the kernel refused to send (logged).
    pub unsent: u64,
}

/// Cuts every connection to the backends `ids`.
pub fn backends(dataplane: &mut Dataplane, ids: &HashSet<u32>) -> Result<Cut, DataplaneError> {
    let mut cut = Cut::default();
    if ids.is_empty() {
        return Ok(cut);
    }
    let entries = dataplane.flow_entries()?;
    let by_key: std::collections::HashMap<_, _> = entries.iter().copied().collect();
    let sender = raw_sender()
        .map_err(|e| log::warn!("no raw socket to send RSTs with: {e}"))
        .ok();
    for (key, forward) in entries {
        if forward.flags & FLOW_REVERSE != 0 || !ids.contains(&forward.backend_id) {
            continue;
        }
        let reverse_key = forward.peer_key(key.proto);
        if let Some(reverse) = by_key.get(&reverse_key)
            && let Some(resets) = reset::connection_resets(&key, &forward, reverse)
        {
            for r in resets {
                match send(sender.as_ref(), &r) {
                    Ok(()) => cut.resets += 1,
                    Err(e) => {
                        cut.unsent += 1;
                        log::warn!("sending an RST to {}: {e}", Ipv4Addr::from(r.dst_addr));
                    }
                }
            }
        }
        // The reply entry first: a packet meeting the forward entry alone is forgotten too.
        let _ = dataplane.remove_flow(&reverse_key);
        let _ = dataplane.remove_flow(&key);
        if !conntrack::ended(forward.state) {
            cut.connections += 1;
        }
    }
    // IPv6 connections lose their entries without RSTs (lb sends none over IPv6 yet): their
    // next packet finds no flow, and the data path drops it (tcp_no_flow) as any stray one.
    for (key, forward) in dataplane.flow_entries6()? {
        if forward.flags & FLOW_REVERSE != 0 || !ids.contains(&forward.backend_id) {
            continue;
        }
        let _ = dataplane.remove_flow6(&forward.peer_key(key.proto));
        let _ = dataplane.remove_flow6(&key);
        if !conntrack::ended(forward.state) {
            cut.connections += 1;
        }
    }
    // No entry of theirs is left for the data path to count the end or release of, nor a
    // port held.
    for &id in ids {
        dataplane.reset_flow_counts(id)?;
        dataplane.clear_snat_ports(id)?;
    }
    Ok(cut)
}

/// A raw IPv4 socket whose packets carry their own header (IPPROTO_RAW implies IP_HDRINCL).
fn raw_sender() -> std::io::Result<Socket> {
    Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
}

fn send(sender: Option<&Socket>, r: &reset::Reset) -> std::io::Result<()> {
    let sender = sender.ok_or_else(|| std::io::Error::other("no raw socket"))?;
    let to = SocketAddrV4::new(Ipv4Addr::from(r.dst_addr), 0);
    sender.send_to(&reset::reset_packet(r), &SockAddr::from(to))?;
    Ok(())
}
