//! `cargo xtask install`: the release binary into PREFIX/bin, the README into
//! PREFIX/share/doc/lb, its man page and bash/zsh/fish completions under PREFIX/share, the
//! systemd unit into /etc/systemd/system (with those paths filled in),
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
    // The man page and completions come from the installed binary's own CLI definitions.
    for (args, path) in [
        (MANPAGE, prefix.join("share/man/man1/lb.1")),
        (BASH, prefix.join("share/bash-completion/completions/lb")),
        (ZSH, prefix.join("share/zsh/site-functions/_lb")),
        (FISH, prefix.join("share/fish/vendor_completions.d/lb.fish")),
    ] {
        generate(&target, args, &path)?;
        println!("installed {}", path.display());
    }
    fs::write(UNIT, unit(&bin, &doc)?).with_context(|| format!("writing {UNIT}"))?;
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

pub const MANPAGE: &[&str] = &["manpage"];
pub const BASH: &[&str] = &["completions", "bash"];
pub const ZSH: &[&str] = &["completions", "zsh"];
pub const FISH: &[&str] = &["completions", "fish"];

/// Writes what `lb ARGS` prints (its man page, a shell's completions) to `path`.
pub fn generate(lb: &Path, args: &[&str], path: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(lb)
        .args(args)
        .output()
        .with_context(|| format!("running lb {}", args.join(" ")))?;
    anyhow::ensure!(out.status.success(), "lb {} failed", args.join(" "));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, &out.stdout).with_context(|| format!("writing {}", path.display()))
}

/// The systemd unit, for a binary in `bin` and the README in `doc`.
pub fn unit(bin: &Path, doc: &Path) -> anyhow::Result<String> {
    Ok(
        fs::read_to_string(workspace_root().join("packaging/lb.service"))
            .context("reading packaging/lb.service")?
            .replace("@BINDIR@", &bin.display().to_string())
            .replace("@DOCDIR@", &doc.display().to_string()),
    )
}
