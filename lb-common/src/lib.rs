//! Types shared by the XDP program (lb-ebpf) and the daemon (lb-user): map keys and values,
//! counter reasons and sizes. Everything here is `#[repr(C)]` with explicit padding, because the
//! kernel copies these structs byte for byte between the two sides.
#![no_std]

pub mod conntrack;
pub mod consts;
pub mod hash;
pub mod icmp;
pub mod reason;
pub mod reset;
pub mod snat_ports;
pub mod timestamps;
pub mod tunnel;
pub mod types;

pub use consts::*;
pub use hash::flow_hash;
pub use reason::*;
pub use types::*;
