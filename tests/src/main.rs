//! `cnishift-lab`: a cluster on this machine, for rehearsing against.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cnishift_lab::cluster::{many_nodes, seed_nodes, Lab, LabOptions};

#[derive(Parser)]
#[command(
    name = "cnishift-lab",
    version,
    about = "A k3s-shaped cluster on one machine: network namespaces running the real cnishift-agent",
    after_help = "Needs root (network namespaces). Nothing is attached to this machine's network;\n\
                  lab addresses are in 198.18.0.0/15. Everything is torn down on exit."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up the lab, run the real `cnishift preflight` against it from the coordinator's namespace, tear down.
    Preflight {
        /// Number of nodes (default: the 9-node seed cluster opi01–03, raccoon00–05).
        #[arg(long)]
        nodes: Option<usize>,
        /// Passed to `cnishift preflight -o`.
        #[arg(short, long, default_value = "table")]
        output: String,
    },
    /// Bring up the lab and keep it until Ctrl-C; prints how to reach it.
    Up {
        #[arg(long)]
        nodes: Option<usize>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cnishift-lab: needs root to create network namespaces");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let nodes = |n: Option<usize>| n.map_or_else(seed_nodes, many_nodes);
    let result = match cli.command {
        Cmd::Preflight { nodes: n, output } => (|| -> anyhow::Result<u8> {
            let lab = Lab::up(&nodes(n), &LabOptions::default())?;
            eprintln!("lab up: {} agents; running `cnishift preflight -o {output}` in the coordinator namespace", lab.agents.len());
            let status = lab
                .coordinator()
                .args(["preflight", "-o", &output])
                .status()?;
            Ok(status.code().unwrap_or(2) as u8)
        })(),
        Cmd::Up { nodes: n } => (|| -> anyhow::Result<u8> {
            let mut lab = Lab::up(&nodes(n), &LabOptions::default())?;
            let dir = lab.keep_dir().to_path_buf();
            let coord = &lab.net.host("coordinator").expect("coordinator").netns;
            println!(
                "lab up: {} agents, files in {}",
                lab.agents.len(),
                dir.display()
            );
            let coordinator = cnishift_lab::cluster::binary("cnishift", "CNISHIFT_BIN")?;
            println!(
                "  ip netns exec {coord} {} preflight -i {}/cluster.toml",
                coordinator.display(),
                dir.display()
            );
            println!("Ctrl-C tears it down.");
            let (tx, rx) = std::sync::mpsc::channel();
            ctrlc_wait(tx);
            let _ = rx.recv();
            Ok(0)
        })(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cnishift-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Blocks SIGINT/SIGTERM and signals `tx` when one arrives.
fn ctrlc_wait(tx: std::sync::mpsc::Sender<()>) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    std::thread::spawn(move || {
        let _ = set.wait();
        let _ = tx.send(());
    });
}
