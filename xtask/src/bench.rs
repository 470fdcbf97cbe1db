//! `cargo xtask bench [--quick]`: builds, then runs the benchmark (lb-tests' `lb-bench`) with
//! the fresh `lb` binary; the report goes to results/<date-time>/ (or --out).

use std::path::PathBuf;

use crate::{build::build, cargo, require_root, run, workspace_root};

pub fn bench(quick: bool, out: Option<PathBuf>, contenders: &[String]) -> anyhow::Result<()> {
    require_root("bench")?;
    let lb = build()?;
    let out = out.unwrap_or_else(|| {
        let stamp = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d-%H%M"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "latest".into());
        workspace_root().join("results").join(if quick {
            format!("{stamp}-quick")
        } else {
            stamp
        })
    });
    let command = if quick {
        "./dev.sh bench --quick"
    } else {
        "./dev.sh bench"
    };
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "lb-tests",
        "--bin",
        "lb-bench",
        "--",
        "run",
        "--lb",
    ])
    .arg(lb)
    .arg("--out")
    .arg(out)
    .args(["--command", command]);
    if quick {
        cmd.arg("--quick");
    }
    for c in contenders {
        cmd.args(["--contender", c]);
    }
    run(&mut cmd)
}
