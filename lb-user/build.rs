//! Builds the XDP object (lb-ebpf) with the dated nightly its rust-toolchain.toml names, through
//! aya-build; `AYA_BUILD_SKIP=1` skips it for `cargo check`, clippy and docs.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .join("../lb-ebpf")
        .canonicalize()
        .context("finding lb-ebpf")?;
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let toolchain = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = toolchain
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("channel = ")
                .map(|c| c.trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("no channel in {}", toolchain_file.display()))?;
    println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // An empty object keeps include_bytes! compiling for check, clippy and docs; loading it
        // fails with a message that names the cause.
        let out = PathBuf::from(env::var("OUT_DIR")?).join("lb");
        fs::write(&out, b"").with_context(|| format!("writing {}", out.display()))?;
        return Ok(());
    }
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("lb-ebpf path is not UTF-8"))?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&channel),
    )
}
