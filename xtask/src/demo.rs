//! `cargo xtask demo`: builds, then runs the demo (lb-tests' `lb-demo` binary) with the fresh
//! `lb` binary.

use crate::{build::build, cargo, require_root, run};

pub fn demo() -> anyhow::Result<()> {
    require_root("demo")?;
    let lb = build()?;
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "lb-tests",
            "--bin",
            "lb-demo",
            "--",
        ])
        .arg(lb))
}
