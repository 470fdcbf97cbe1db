//! `cargo xtask test`: unit tests of every crate, then the packet fixtures and end-to-end tests
//! (lb-tests), one at a time: they share the machine's two cores and time-sensitive traffic.

use crate::{build::build, cargo, require_root, run};

pub fn test(filter: Option<&str>) -> anyhow::Result<()> {
    require_root("test")?;
    let lb = build()?;
    let filter: Vec<&str> = filter.into_iter().collect();
    run(cargo()
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "lb-tests",
            "--exclude",
            "lb-ebpf",
        ])
        .args(&filter))?;
    run(cargo()
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "--package",
            "lb-tests",
        ])
        .args(&filter)
        .args(["--", "--test-threads=1"])
        .env("LB_BIN", lb))
}
