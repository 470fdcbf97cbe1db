//! Cutting connections on purpose: a removed backend's at the end of its grace period or with
//! `--now`, and a backend's marked down under `on_backend_down = "reset"`. Each end gets an RST
//! it accepts at once (`lb_common::reset::connection_resets`), sent by the host through a raw
//! socket of the connection's family, so neither the client nor the backend waits for a
//! timeout; then both FLOWS (FLOWS6) entries go. A half-open connection gets no RST: the
//! client's retransmitted SYN finds another backend.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    Address, FLOW_REVERSE, FlowKeyOf, FlowValueOf, conntrack,
    reset::{self, ResetOf},
};
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
    let v4 = dataplane.flow_entries()?;
    if !v4.is_empty() {
        let sender = raw_sender(Domain::IPV4);
        cut_family(&mut cut, ids, v4, &sender, |key| dataplane.remove_flow(key));
    }
    let v6 = dataplane.flow_entries6()?;
    if !v6.is_empty() {
        let sender = raw_sender(Domain::IPV6);
        cut_family(&mut cut, ids, v6, &sender, |key| {
            dataplane.remove_flow6(key)
        });
    }
    // No entry of theirs is left for the data path to count the end or release of, nor a
    // port held.
    for &id in ids {
        dataplane.reset_flow_counts(id)?;
        dataplane.clear_snat_ports(id)?;
    }
    Ok(cut)
}

/// The connections of one family's `entries` to the backends `ids`: their RSTs sent by
/// `sender`, their entries gone by `remove`.
fn cut_family<A: Address + Hash>(
    cut: &mut Cut,
    ids: &HashSet<u32>,
    entries: Vec<(FlowKeyOf<A>, FlowValueOf<A>)>,
    sender: &Option<Socket>,
    mut remove: impl FnMut(&FlowKeyOf<A>) -> Result<(), DataplaneError>,
) where
    A::Bytes: Into<IpAddr>,
    FlowKeyOf<A>: Eq + Hash,
    ResetOf<A::Bytes>: Packet,
{
    let by_key: HashMap<_, _> = entries.iter().copied().collect();
    for (key, forward) in entries {
        if forward.flags & FLOW_REVERSE != 0 || !ids.contains(&forward.backend_id) {
            continue;
        }
        let reverse_key = forward.peer_key(key.proto);
        if let Some(reverse) = by_key.get(&reverse_key)
            && let Some(resets) = reset::connection_resets(&key, &forward, reverse)
        {
            for r in resets {
                let to: IpAddr = r.dst_addr.into();
                match send(sender.as_ref(), to, &r.packet()) {
                    Ok(()) => cut.resets += 1,
                    Err(e) => {
                        cut.unsent += 1;
                        log::warn!("sending an RST to {to}: {e}");
                    }
                }
            }
        }
        // The reply entry first: a packet meeting the forward entry alone is forgotten too.
        let _ = remove(&reverse_key);
        let _ = remove(&key);
        if !conntrack::ended(forward.state) {
            cut.connections += 1;
        }
    }
}

/// An RST as the raw socket of its family sends it: the whole IP packet.
trait Packet {
    fn packet(&self) -> Vec<u8>;
}

impl Packet for reset::Reset {
    fn packet(&self) -> Vec<u8> {
        reset::reset_packet(self).to_vec()
    }
}

impl Packet for reset::Reset6 {
    fn packet(&self) -> Vec<u8> {
        reset::reset_packet6(self).to_vec()
    }
}

/// A raw socket of `domain` whose packets carry their own header (IPPROTO_RAW implies
/// IP_HDRINCL, and for IPv6 its header too), or none (logged: the cut goes on without RSTs).
fn raw_sender(domain: Domain) -> Option<Socket> {
    Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        .map_err(|e| log::warn!("no raw socket to send RSTs with: {e}"))
        .ok()
}

fn send(sender: Option<&Socket>, to: IpAddr, packet: &[u8]) -> std::io::Result<()> {
    let sender = sender.ok_or_else(|| std::io::Error::other("no raw socket"))?;
    sender.send_to(packet, &SockAddr::from(SocketAddr::new(to, 0)))?;
    Ok(())
}
