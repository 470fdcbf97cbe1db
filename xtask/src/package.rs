//! `cargo xtask package`: a Debian package of lb, made by cargo-deb from lb-user's
//! `[package.metadata.deb]`: the binary, its man page and shell completions, the systemd unit
//! (installed, not enabled: the example config needs its interfaces and services first), the
//! example config as a conffile (/etc/lb/lb.toml), and the README. Generated files are staged in
//! target/release/deb-assets (where cargo-deb finds them); the package lands in target/debian. cargo-deb is installed into the tools
//! directory the first time.

use std::{fs, path::PathBuf};

use anyhow::Context as _;

use crate::{
    build::build,
    cargo,
    install::{BASH, FISH, MANPAGE, ZSH, generate, unit},
    run, tools_dir, workspace_root,
};

const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn package() -> anyhow::Result<PathBuf> {
    let lb = build()?;
    let root = workspace_root();
    let assets = root.join("target/release/deb-assets");
    for (args, name) in [
        (MANPAGE, "lb.1"),
        (BASH, "lb.bash"),
        (ZSH, "_lb"),
        (FISH, "lb.fish"),
    ] {
        generate(&lb, args, &assets.join(name))?;
    }
    let unit = unit("/usr/bin".as_ref(), "/usr/share/doc/lb".as_ref())?;
    fs::write(assets.join("lb.service"), unit).context("staging the systemd unit")?;
    let cargo_deb = tools_dir().join("bin/cargo-deb");
    if !cargo_deb.exists() {
        println!(
            "installing cargo-deb {CARGO_DEB_VERSION} into {}",
            tools_dir().display()
        );
        run(cargo()
            .current_dir("/")
            .args(["install", "cargo-deb", "--locked", "--quiet", "--version"])
            .arg(CARGO_DEB_VERSION)
            .arg("--root")
            .arg(tools_dir()))?;
    }
    let out_dir = root.join("target/debian");
    fs::create_dir_all(&out_dir).context("creating target/debian")?;
    run(cargo()
        .args(["deb", "-p", "lb-user", "--no-build", "--output"])
        .arg(&out_dir))?;
    let deb = fs::read_dir(&out_dir)
        .context("reading target/debian")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .context("cargo deb made no package")?;
    Ok(deb)
}
