//! `cargo xtask install`: the release binary into PREFIX/bin, the README into
//! PREFIX/share/doc/lb, the systemd unit into /etc/systemd/system (with those paths filled in),
//! and the example config into /etc/lb/lb.toml unless one is there. Starts nothing: the README's
//! operations section says what to run.

use std::{fs, path::Path};

use anyhow::Context as _;

use crate::{build::build, require_root, workspace_root};

const UNIT: &str = "/etc/systemd/system/lb.service";
const CONFIG: &str = "/etc/lb/lb.toml";

pub fn install(prefix: &Path) -> anyhow::Result<()> {
    require_root("install")?;
    let lb = build()?;
    let root = workspace_root();
    let bin = prefix.join("bin");
    let doc = prefix.join("share/doc/lb");
    for dir in [&bin, &doc] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Copied to a new file and renamed over the old: a running daemon keeps its binary.
    let target = bin.join("lb");
    let staging = bin.join(".lb.new");
    fs::copy(&lb, &staging).with_context(|| format!("copying {}", lb.display()))?;
    fs::rename(&staging, &target).with_context(|| format!("installing {}", target.display()))?;
    fs::copy(root.join("README.md"), doc.join("README.md")).context("installing the README")?;
    let unit = fs::read_to_string(root.join("packaging/lb.service"))
        .context("reading packaging/lb.service")?
        .replace("@BINDIR@", &bin.display().to_string())
        .replace("@DOCDIR@", &doc.display().to_string());
    fs::write(UNIT, unit).with_context(|| format!("writing {UNIT}"))?;
    println!("installed {}, {UNIT}", target.display());
    if Path::new(CONFIG).exists() {
        println!("kept {CONFIG}");
    } else {
        fs::create_dir_all("/etc/lb").context("creating /etc/lb")?;
        fs::copy(root.join("packaging/lb.toml"), CONFIG)
            .with_context(|| format!("writing {CONFIG}"))?;
        println!("wrote the example {CONFIG}: edit its interfaces and services");
    }
    println!("then: systemctl daemon-reload && systemctl enable --now lb");
    Ok(())
}
