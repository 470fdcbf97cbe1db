//! `cargo xtask lint`: rustfmt check, then clippy twice: user-space crates, then lb-ebpf for the
//! bpf target (with the nightly its rust-toolchain.toml names).

use crate::{cargo, run, workspace_root};

pub fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().current_dir(workspace_root().join("lb-ebpf")).args([
        "clippy",
        "--release",
        "--",
        "-D",
        "warnings",
        "-C",
        "panic=abort",
    ]))
}
