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
    /// Run the simulated Kubernetes API server alone (for kubectl and kube-rs), until Ctrl-C.
    #[command(
        after_help = "Example:\n  cnishift-lab apiserver --listen 127.0.0.1:16443 --kubeconfig-out /tmp/lab.kubeconfig --nodes 9 &\n  \
                            KUBECONFIG=/tmp/lab.kubeconfig kubectl get nodes\n\n\
                            Serves discovery, /version, Nodes, Pods with evictions and PodDisruptionBudgets, DaemonSets,\n\
                            Deployments/ReplicaSets, Leases and Events over plain HTTP on the given address, with the\n\
                            seed cluster's workload: Longhorn and node-exporter DaemonSets, CoreDNS, Traefik, ArgoCD,\n\
                            a web app (ArgoCD and web behind PodDisruptionBudgets)."
    )]
    Apiserver {
        #[arg(long, default_value = "127.0.0.1:16443")]
        listen: std::net::SocketAddr,
        /// Where to write a kubeconfig pointing at it.
        #[arg(long, value_name = "FILE")]
        kubeconfig_out: std::path::PathBuf,
        /// Ready nodes to start with (the seed cluster's names first).
        #[arg(long, default_value_t = 9)]
        nodes: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Apiserver {
        listen,
        kubeconfig_out,
        nodes,
    } = &cli.command
    {
        return run_apiserver(*listen, kubeconfig_out, *nodes);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cnishift-lab: needs root to create network namespaces");
        return ExitCode::from(2);
    }
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
        Cmd::Apiserver { .. } => unreachable!("handled above"),
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

fn run_apiserver(
    listen: std::net::SocketAddr,
    kubeconfig_out: &std::path::Path,
    nodes: usize,
) -> ExitCode {
    let api = cnishift_lab::apiserver::ApiServer::new();
    for (name, role) in seed_nodes()
        .into_iter()
        .chain(many_nodes(nodes).into_iter().skip(9))
        .take(nodes)
    {
        api.add_node(&name, role == cnishift::inventory::Role::Controller, true);
    }
    let names: Vec<String> = seed_nodes()
        .into_iter()
        .chain(many_nodes(nodes).into_iter().skip(9))
        .take(nodes)
        .map(|(n, _)| n)
        .collect();
    if !names.is_empty() {
        api.add_homelab_workload(&names.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cnishift-lab: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        std::fs::write(kubeconfig_out, cnishift_lab::apiserver::kubeconfig(addr))
            .map_err(|e| format!("{}: {e}", kubeconfig_out.display()))?;
        eprintln!(
            "simulated API server on http://{addr}; kubeconfig in {}",
            kubeconfig_out.display()
        );
        tokio::select! {
            r = api.serve(listener) => r.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cnishift-lab apiserver: {e}");
            ExitCode::from(2)
        }
    }
}
