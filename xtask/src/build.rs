//! `cargo xtask build`: the XDP object (through lb-user's build.rs) and the `lb` binary.

use std::path::PathBuf;

use crate::{cargo, run, workspace_root};

/// Builds in release mode and returns the path of the `lb` binary.
pub fn build() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-user",
        "--package",
        "lb-tests",
        "--bins",
    ]))?;
    Ok(workspace_root().join("target/release/lb"))
}
