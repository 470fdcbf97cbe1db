//! `lb-bench`: the benchmark (`cargo xtask bench` runs `lb-bench run`), and the UDP helpers it
//! starts inside the namespaces.
//!
//!   lb-bench run --lb PATH --out DIR [--quick]
//!   lb-bench udp-echo PORT
//!   lb-bench udp-load --targets ADDR:PORT[,...] --flows N --window N --seconds S

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_tests::{
    bench::{self, Options, report},
    netns::{require_root, sweep_stale},
};

#[derive(Parser)]
#[command(about = "lb's benchmark against the direct path, nftables, HAProxy and nginx")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole benchmark and write report.md, chart.svg and results.json to --out.
    Run {
        #[arg(long)]
        lb: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// At most 2 minutes: shorter runs, smaller tables.
        #[arg(long)]
        quick: bool,
        /// Only this contender (repeatable; default: all).
        #[arg(long = "contender", value_enum)]
        only: Vec<bench::contenders::Contender>,
        /// The command the report names to reproduce it.
        #[arg(long, default_value = "./dev.sh bench")]
        command: String,
    },
    /// Only the XDP program alone (BPF_PROG_TEST_RUN), printed as JSON.
    Micro {
        #[arg(long)]
        quick: bool,
    },
    /// Echo UDP datagrams (a benchmark backend).
    UdpEcho { port: u16 },
    /// Closed-loop UDP request/response load; prints one JSON line.
    UdpLoad {
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long)]
        flows: usize,
        #[arg(long)]
        window: u32,
        #[arg(long)]
        seconds: f64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Micro { quick } => {
            require_root();
            sweep_stale();
            let result = bench::micro::run(bench::micro_options(quick));
            println!(
                "{}",
                serde_json::to_string_pretty(&result).expect("results serialise")
            );
            if result.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::UdpEcho { port } => match bench::udp::echo(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-bench udp-echo: {e}");
                ExitCode::from(1)
            }
        },
        Command::UdpLoad {
            targets,
            flows,
            window,
            seconds,
        } => match bench::udp::load(&targets, flows, window, seconds.clamp(0.1, 600.0)) {
            Ok(r) => {
                println!(
                    "{}",
                    serde_json::to_string(&r).expect("plain numbers serialise")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lb-bench udp-load: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run {
            lb,
            out,
            quick,
            only,
            command,
        } => {
            require_root();
            let opts = Options {
                quick,
                lb,
                bench: std::env::current_exe().expect("the benchmark's own path"),
                only,
            };
            let results = bench::run(&opts);
            let written = std::fs::create_dir_all(&out)
                .and_then(|()| {
                    std::fs::write(out.join("report.md"), report::markdown(&results, &command))
                })
                .and_then(|()| std::fs::write(out.join("chart.svg"), report::chart_svg(&results)))
                .and_then(|()| {
                    std::fs::write(
                        out.join("results.json"),
                        serde_json::to_string_pretty(&results).expect("results serialise"),
                    )
                });
            if let Err(e) = written {
                eprintln!(
                    "lb-bench: cannot write the report to {}: {e}",
                    out.display()
                );
                return ExitCode::from(1);
            }
            println!("{}", report::summary_table(&results));
            // Goals are reported, not enforced: they do not change the exit status.
            println!("goals:\n{}", report::goals_text(&results));
            println!("report: {}", out.join("report.md").display());
            let failures = results.failures(&opts);
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "lb-bench: {} figures could not be measured:",
                    failures.len()
                );
                for f in failures {
                    eprintln!("  {f}");
                }
                ExitCode::from(1)
            }
        }
    }
}
