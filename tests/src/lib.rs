//! Test support: packet builders with independent checksum arithmetic, network namespaces with
//! cleanup, and (in tests/) packet fixtures through the real XDP program and end-to-end tests.

pub mod bench;
pub mod fixture_net;
pub mod flows;
pub mod harness;
pub mod host;
pub mod netns;
pub mod packet;
pub mod topology;
