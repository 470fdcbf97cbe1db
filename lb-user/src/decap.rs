//! `lb decap`: on a DSR backend, strips the IPIP or GUE headers that lb's `dsr = "ipip"` and
//! `"gue"` services put on their packets (IPv4, or IPv6 inside IPv6), for the VIPs it is
//! given, and hands the packets to the stack as the clients sent them (this kernel has no ipip
//! or ip6_tunnel module; Katran ships its decap the same way).
//! The object's `lb_decap` program, at the interface's tc ingress while the command runs.

use std::net::IpAddr;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use lb_common::{Be32, In6, STAT_DECAP_UNKNOWN_VIP, STAT_DECAPSULATED};

use crate::dataplane::EBPF_OBJECT;

const PROGRAM: &str = "lb_decap";

/// The decap program attached to one interface; detached when dropped.
pub struct Decap {
    ebpf: Ebpf,
}

/// What the program did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapCounts {
    /// IPIP packets for a given VIP, stripped.
    pub decapsulated: u64,
    /// IPIP packets for another destination, left to the kernel.
    pub unknown_vip: u64,
}

/// Writes `vips` to the object's map `name` (DECAP_VIPS or DECAP_VIPS6).
fn list_vips<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    vips: impl Iterator<Item = K>,
) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("the object has no {name} map"))?;
    let mut table: HashMap<_, K, u32> = HashMap::try_from(map)?;
    for vip in vips {
        table.insert(&vip, &1, 0)?;
    }
    Ok(())
}

impl Decap {
    /// Loads the program, gives it `vips` and attaches it to `interface`'s ingress.
    pub fn attach(interface: &str, vips: &[IpAddr]) -> anyhow::Result<Self> {
        // The balancer's large maps are created with the object, and the decap uses none.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS", 1)
            .map_max_entries("MAGLEV", 1)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let v4 = vips.iter().filter_map(|v| match v {
            IpAddr::V4(v) => Some(Be32::from_bytes(v.octets())),
            IpAddr::V6(_) => None,
        });
        let v6 = vips.iter().filter_map(|v| match v {
            IpAddr::V6(v) => Some(In6::from_bytes(v.octets())),
            IpAddr::V4(_) => None,
        });
        list_vips(&mut ebpf, "DECAP_VIPS", v4)?;
        list_vips(&mut ebpf, "DECAP_VIPS6", v6)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .context("the object has no lb_decap program")?
            .try_into()?;
        program.load().context("loading lb_decap")?;
        let index = crate::dataplane::ifindex(interface)?;
        program
            .attach(index, TcAttachType::Ingress)
            .with_context(|| format!("attaching lb_decap at {interface}'s ingress"))?;
        Ok(Self { ebpf })
    }

    pub fn counts(&self) -> anyhow::Result<DecapCounts> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("no STATS map")?)?;
        let sum = |slot: u32| -> anyhow::Result<u64> {
            Ok(stats
                .get(&slot, 0)?
                .iter()
                .copied()
                .fold(0, u64::wrapping_add))
        };
        Ok(DecapCounts {
            decapsulated: sum(STAT_DECAPSULATED)?,
            unknown_vip: sum(STAT_DECAP_UNKNOWN_VIP)?,
        })
    }
}
