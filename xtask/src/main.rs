//! Project tasks: `cargo xtask build|test|bench|demo|install|package|lint`. Run `./dev.sh TASK` on a fresh machine:
//! it installs the toolchains and tools first (scripts/bootstrap.sh), then runs the task.

mod bench;
mod build;
mod demo;
mod install;
mod lint;
mod package;
mod test;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks of the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the XDP program and the `lb` binary (release).
    Build,
    /// Run every test: unit, packet fixtures and end-to-end (needs root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmark lb against the direct path, nftables, HAProxy and nginx (needs root).
    Bench {
        /// At most 2 minutes (shorter runs, smaller tables): a smoke test.
        #[arg(long)]
        quick: bool,
        /// Where the report goes (default: results/<date-time>/).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Only this contender (direct, xdp, xdp-dsr, xdp-ipv6, nftables, haproxy, nginx; repeatable).
        #[arg(long = "contender")]
        contenders: Vec<String>,
    },
    /// Run the self-contained demo in network namespaces (needs root).
    Demo,
    /// Install lb, its systemd unit and an example config (needs root; starts nothing).
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
    },
    /// A Debian package of lb in target/debian (cargo-deb, installed on first use): binary,
    /// man page, completions, systemd unit, example config.
    Package,
    /// rustfmt check and clippy over user space and the eBPF crate.
    Lint,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Build => build::build().map(|_| ()),
        Task::Test { filter } => test::test(filter.as_deref()),
        Task::Bench {
            quick,
            out,
            contenders,
        } => bench::bench(quick, out, &contenders),
        Task::Demo => demo::demo(),
        Task::Install { prefix } => install::install(&prefix),
        Task::Package => package::package().map(|_| ()),
        Task::Lint => lint::lint(),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where scripts/bootstrap.sh puts bpf-linker (and `package` cargo-deb).
pub fn tools_dir() -> PathBuf {
    env::var("LB_TOOLS_DIR")
        .unwrap_or_else(|_| "/opt/lb-tools".into())
        .into()
}

/// A cargo command in the workspace, with the tools directory's programs on PATH.
pub fn cargo() -> Command {
    let path = format!(
        "{}/bin:{}",
        tools_dir().display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", path);
    cmd
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn require_root(task: &str) -> anyhow::Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!(
            "`cargo xtask {task}` creates network namespaces and loads XDP programs: run it as root"
        );
    }
    Ok(())
}
