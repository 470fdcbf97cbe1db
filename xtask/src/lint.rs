//! `cargo xtask lint`: rustfmt check, then clippy twice: user-space crates, then lb-ebpf for the
//! bpf target with the nightly its rust-toolchain.toml names.

use std::process::Command;

use anyhow::anyhow;

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
    let ebpf = workspace_root().join("lb-ebpf");
    let toolchain = std::fs::read_to_string(ebpf.join("rust-toolchain.toml"))?;
    let nightly = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow!("no channel in lb-ebpf/rust-toolchain.toml"))?;
    // `rustup run` gives cargo and clippy the eBPF crate's nightly (build-std needs it); the
    // variables cargo set for xtask would point back at the stable toolchain.
    let path = cargo()
        .get_envs()
        .find(|(k, _)| *k == "PATH")
        .and_then(|(_, v)| v.map(ToOwned::to_owned))
        .unwrap_or_default();
    run(Command::new("rustup")
        .current_dir(&ebpf)
        .env("PATH", path)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["run", &nightly, "cargo", "clippy", "--release", "--"])
        .args(["-D", "warnings", "-C", "panic=abort"]))
}
