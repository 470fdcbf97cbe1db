//! The lb daemon and CLI as a library, so that tests drive the same code the binary runs.

pub mod bpf_syscall;
pub mod config;
pub mod control;
pub mod cut;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod discovery;
pub mod dsr_probe;
pub mod explain;
pub mod health;
pub mod host;
pub mod layout;
pub mod links;
pub mod maglev;
pub mod map_batch;
pub mod metrics;
pub mod persist;
pub mod pins;
pub mod ports;
pub mod return_path;
pub mod slow_start;
pub mod state;
pub mod stats;
pub mod steering;
pub mod sysctls;
