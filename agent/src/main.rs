//! `cnishift-agent`: the command line. Everything it does lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cnishift_agent::host::HostPaths;
use cnishift_agent::{render, report};

/// Exit codes (also in the README).
const EXIT_READY: u8 = 0;
const EXIT_NOT_READY: u8 = 1;
const EXIT_AGENT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "cnishift-agent",
    version,
    about = "Per-node agent for moving a k3s cluster from Flannel to Cilium",
    long_about = "Checks, on this node's real kernel, everything Cilium needs and everything Flannel \
                  left behind, and reports it.\n\nLogs go to stderr; set RUST_LOG=debug for more.",
    after_help = "Exit codes: 0 ready (no check failed), 1 not ready, 2 the agent itself could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is this node ready for Cilium, and what of Flannel is left on it?
    #[command(
        after_help = "Examples:\n  cnishift-agent report                 # grouped table\n  \
                      cnishift-agent report --all           # include passing checks\n  \
                      cnishift-agent report -o json | jq '.checks[] | select(.verdict==\"fail\")'\n  \
                      cnishift-agent report --host-root /srv/lab/node1 --no-live-probes\n\n\
                      Exit codes: 0 ready, 1 not ready (a check failed), 2 the agent could not run."
    )]
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Output format: a grouped table for people, JSON for automation.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Shorthand for `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    /// List passing checks too (the table shows only counts for them by default).
    #[arg(long)]
    all: bool,
    /// Read every file from under DIR instead of `/` (a lab node, a fixture tree).
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
    /// Skip the syscall, netlink and iptables probes (for pure fixture trees);
    /// the report lists what was skipped, and those checks are warnings.
    #[arg(long)]
    no_live_probes: bool,
    /// The node name to report (default: the host root's /etc/hostname).
    #[arg(long)]
    node_name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Report(args) => run_report(args),
    }
}

fn run_report(args: ReportArgs) -> ExitCode {
    let host = match HostPaths::new(&args.host_root) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cnishift-agent: {e}");
            return ExitCode::from(EXIT_AGENT_ERROR);
        }
    };
    let node_name = args
        .node_name
        .clone()
        .unwrap_or_else(|| report::default_node_name(&host));
    let r = report::build(&report::Options {
        host,
        live: !args.no_live_probes,
        node_name,
    });
    let text = match (args.json, args.output) {
        (true, _) | (_, Output::Json) => match serde_json::to_string_pretty(&r) {
            Ok(j) => j + "\n",
            Err(e) => {
                eprintln!("cnishift-agent: cannot encode the report as JSON: {e}");
                return ExitCode::from(EXIT_AGENT_ERROR);
            }
        },
        (false, Output::Table) => render::table(&r, render::Style::detect(args.all)),
    };
    use std::io::Write;
    if let Err(e) = std::io::stdout().write_all(text.as_bytes()) {
        // A closed pipe (`| head`) is not worth a panic, but it is an error.
        eprintln!("cnishift-agent: cannot write the report: {e}");
        return ExitCode::from(EXIT_AGENT_ERROR);
    }
    ExitCode::from(if r.ready { EXIT_READY } else { EXIT_NOT_READY })
}
