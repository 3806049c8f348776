//! `cnishift`: the command line. Everything it does lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cnishift::inventory::{Inventory, Load};
use cnishift::{agents, certs, render};

mod k8s;

/// Exit codes (also in the README).
const EXIT_OK: u8 = 0;
const EXIT_NOT_READY: u8 = 1;
const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "cnishift",
    version,
    about = "Move a k3s cluster from Flannel to Cilium, node by node",
    long_about = "The coordinator: reads the inventory (cluster.toml), talks to every node's cnishift-agent \
                  over mutual-TLS gRPC and to the Kubernetes API (standard kubeconfig resolution), and checks, \
                  then migrates, the cluster.\n\n\
                  Logs go to stderr; set RUST_LOG=debug for more.",
    after_help = "Exit codes: 0 success, 1 not ready or not done (a node not ready or unreachable, a gate failed, a drain\n\
                  blocked, a wait timed out, the lock held), 2 usage, inventory, TLS or kubeconfig error; each command's --help has its own.\n\n\
                  Getting started:\n  cnishift certs init --dir pki\n  cnishift certs issue --dir pki --coordinator\n  \
                  cnishift certs issue --dir pki --node opi01 --ip 10.1.0.11\n  cnishift preflight -i cluster.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the cluster CA and issue agent and coordinator certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Ask every agent at once whether its node is ready for Cilium.
    #[command(
        after_help = "Each agent has its own deadline ([deadlines] connect/report in the inventory): a dead,\n\
                            slow or impostor agent is reported as such and the others still report. With --cluster,\n\
                            the cluster gates (`cnishift cluster check`) are checked too and count towards the exit code.\n\n\
                            Exit codes: 0 every node ready, 1 some node not ready or not reachable (or a gate failed),\n\
                            2 bad inventory, TLS files or kubeconfig."
    )]
    Preflight(PreflightArgs),
    /// Remove what Flannel left, node by node: each node's plan first, then (with --apply) the cleanup.
    #[command(
        after_help = "Nodes are done one at a time, controllers first. The run halts at the first node whose\n\
                            agent refuses (an interlock holds) or whose cleanup fails; the nodes after it are not touched.\n\
                            Every agent backs up what it removes (cnishift-agent restore ID on the node).\n\n\
                            Exit codes: 0 every plan allowed (dry run) / every node cleaned, 1 refused or failed, 2 usage error."
    )]
    Cleanup(CleanupArgs),
    /// The cluster as the Kubernetes API sees it.
    #[command(
        after_help = "Uses the standard kubeconfig resolution: --kubeconfig, else KUBECONFIG, else ~/.kube/config,\n\
                            else the in-cluster service account; --context picks a context."
    )]
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// One migration step on one node through the Kubernetes API: cordon, drain, uncordon, wait.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The migration lock (a Lease in kube-system): who holds it; release it.
    #[command(subcommand)]
    Lock(LockCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The cluster gates: nodes Ready, blocking PodDisruptionBudgets, unhealthy pods, Cilium's DaemonSet, the VIP.
    #[command(
        after_help = "Exit codes: 0 no gate failed, 1 a gate failed, 2 usage, inventory or kubeconfig error."
    )]
    Check(ClusterArgs),
}

/// How to reach the Kubernetes API.
#[derive(clap::Args, Clone)]
struct KubeArgs {
    /// A kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE", global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, value_name = "NAME", global = true)]
    context: Option<String>,
}

#[derive(clap::Args)]
struct ClusterArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    #[command(flatten)]
    kube: KubeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
struct NodeArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    #[command(flatten)]
    kube: KubeArgs,
    /// The node, as named in the inventory.
    #[arg(value_name = "NODE")]
    node: String,
    /// Take over the migration lock when its holder stopped renewing it (be sure that coordinator is gone).
    #[arg(long)]
    take_over_stale_lock: bool,
    /// Output format for the result.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Mark the node unschedulable, remembering (on the node) whether an admin had already cordoned it.
    Cordon(NodeArgs),
    /// Make the node schedulable again, unless an admin had cordoned it before cnishift did.
    Uncordon(NodeArgs),
    /// Cordon, then evict every pod that must leave through the Eviction API (PodDisruptionBudgets honoured).
    #[command(
        after_help = "DaemonSet, mirror and finished pods stay. Pods without a controller, and pods with emptyDir\n\
                            data, are refused before anything is evicted unless [drain] allow_unmanaged /\n\
                            allow_local_storage say otherwise. A PodDisruptionBudget that says no is asked again every\n\
                            [drain] retry_interval until [deadlines] drain; then the pods still there and their budgets\n\
                            are named. Exit codes: 0 drained, 1 refused or not finished, 2 usage or API error."
    )]
    Drain(NodeArgs),
    /// Wait (by watching) until the node is Ready, at most [deadlines] node_ready.
    WaitReady(NodeArgs),
    /// Wait (by watching) until the Cilium agent pod on the node is Ready, at most [deadlines] cilium_ready.
    WaitCilium(NodeArgs),
}

#[derive(Subcommand)]
enum LockCommand {
    /// Who holds the migration lock, since when, and whether it is stale.
    Status {
        #[command(flatten)]
        inventory: InventoryArg,
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete the migration lock whoever holds it (only when its coordinator is gone for good).
    Release {
        #[command(flatten)]
        inventory: InventoryArg,
        #[command(flatten)]
        kube: KubeArgs,
        /// Required: this does not check that the holder is gone.
        #[arg(long, required = true)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct CleanupArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    /// Every node in the inventory.
    #[arg(long, conflicts_with = "nodes")]
    all: bool,
    /// The nodes to clean up, by name.
    #[arg(value_name = "NODE", required_unless_present = "all")]
    nodes: Vec<String>,
    /// Perform the cleanup (default: show each node's plan).
    #[arg(long)]
    apply: bool,
    /// Pass --force to the agents (overrides only 'pods still on cni0' and 'Cilium not present yet').
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create ca.pem and ca-key.pem (0600) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue NAME.pem/NAME-key.pem for an agent, or coordinator.pem/coordinator-key.pem.
    #[command(group = clap::ArgGroup::new("who").required(true).args(["node", "coordinator"]))]
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node name (the certificate's SAN; must match the inventory).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Issue the coordinator's certificate instead.
        #[arg(long)]
        coordinator: bool,
        /// The coordinator identity to put in its certificate.
        #[arg(long, default_value = certs::DEFAULT_COORDINATOR_IDENTITY, requires = "coordinator")]
        identity: String,
        /// An IP address to add as a SAN (repeatable).
        #[arg(long, value_name = "IP")]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `-i/--inventory`, shared by every command that talks to agents.
#[derive(clap::Args)]
struct InventoryArg {
    /// The inventory.
    #[arg(
        short = 'i',
        long = "inventory",
        value_name = "FILE",
        default_value = "cluster.toml",
        env = "CNISHIFT_INVENTORY"
    )]
    path: PathBuf,
}

#[derive(clap::Args)]
struct PreflightArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    /// Also check the cluster through the Kubernetes API (the gates of `cnishift cluster check`).
    #[arg(long)]
    cluster: bool,
    #[command(flatten)]
    kube: KubeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
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
    match Cli::parse().command {
        Command::Certs(c) => run_certs(c),
        Command::Preflight(a) => run_preflight(a),
        Command::Cleanup(a) => run_cleanup(a),
        Command::Cluster(ClusterCommand::Check(a)) => k8s::run_cluster(a),
        Command::Node(c) => k8s::run_node(c),
        Command::Lock(c) => k8s::run_lock(c),
    }
}

fn error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cnishift: {e}");
    ExitCode::from(EXIT_ERROR)
}

fn run_certs(cmd: CertsCommand) -> ExitCode {
    let written = match cmd {
        CertsCommand::Init { dir, days, force } => certs::init_ca(&dir, days, force),
        CertsCommand::Issue {
            dir,
            node,
            coordinator,
            identity,
            ip,
            days,
            force,
        } => {
            let (stem, name) = if coordinator {
                ("coordinator".to_string(), identity)
            } else {
                let n = node.expect("clap requires one");
                (n.clone(), n)
            };
            certs::issue_to_dir(
                &dir,
                &stem,
                &certs::Spec::for_days(vec![name], ip, days),
                force,
            )
        }
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::from(EXIT_OK)
        }
        Err(e) => error(e),
    }
}

/// What every command that talks to agents needs: the inventory (with its
/// TLS files), the client TLS material, and a runtime.
fn connect_setup(
    inventory: &std::path::Path,
) -> Result<(Inventory, agents::ClientTls, tokio::runtime::Runtime), ExitCode> {
    let inv = Inventory::load(
        inventory,
        Load {
            require_tls_files: true,
        },
    )
    .map_err(error)?;
    let tls = agents::ClientTls::load(&inv.tls).map_err(error)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| error(format!("cannot start the async runtime: {e}")))?;
    Ok((inv, tls, rt))
}

fn run_preflight(args: PreflightArgs) -> ExitCode {
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (outcomes, gates) = match rt.block_on(async {
        let gates = match args.cluster {
            false => None,
            true => Some(k8s::gates(&args.kube, &inv).await?),
        };
        let outcomes = agents::fan_out_reports(&inv.nodes, &tls, &inv.deadlines).await;
        Ok::<_, ExitCode>((outcomes, gates))
    }) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let text = match args.output {
        Output::Json => render::preflight_json(&outcomes, gates.as_deref()),
        Output::Table => {
            let mut t = render::preflight_table(&outcomes);
            if let Some(g) = &gates {
                t.push('\n');
                t.push_str(&render::gates_table(g));
            }
            t
        }
    };
    print!("{text}");
    let gates_ok = gates.as_deref().is_none_or(|g| {
        g.iter()
            .all(|g| g.verdict != cnishift::kube::gates::Verdict::Fail)
    });
    let all_ready = gates_ok
        && outcomes
            .iter()
            .all(|o| render::status_of(o) == render::NodeStatus::Ready);
    ExitCode::from(if all_ready { EXIT_OK } else { EXIT_NOT_READY })
}

fn run_cleanup(args: CleanupArgs) -> ExitCode {
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut nodes: Vec<cnishift::inventory::Node> = if args.all {
        inv.nodes.clone()
    } else {
        let mut v = Vec::new();
        for name in &args.nodes {
            match inv.node(name) {
                Some(n) => v.push(n.clone()),
                None => return error(format!("{name:?} is not in {}", inv.path.display())),
            }
        }
        v
    };
    // Controllers first, in inventory order otherwise.
    nodes.sort_by_key(|n| n.role);
    let mut all_allowed = true;
    for (i, node) in nodes.iter().enumerate() {
        let plan = match rt.block_on(agents::plan_cleanup(node, &tls, &inv.deadlines, args.force)) {
            Ok(p) => p,
            Err(e) => {
                println!("{}: {e}", node.name);
                println!(
                    "halting: {} could not be asked; {} nodes not touched",
                    node.name,
                    nodes.len() - i - 1
                );
                return ExitCode::from(EXIT_NOT_READY);
            }
        };
        print!("{}", render::cleanup_plan(&plan));
        if !plan.allowed {
            all_allowed = false;
            if args.apply {
                println!(
                    "halting: {} refuses cleanup; {} nodes not touched",
                    node.name,
                    nodes.len() - i - 1
                );
                return ExitCode::from(EXIT_NOT_READY);
            }
            continue;
        }
        if !args.apply {
            continue;
        }
        let events = rt.block_on(agents::apply_cleanup(
            node,
            &tls,
            &inv.deadlines,
            args.force,
            |ev| {
                if ev.item != "*" {
                    println!(
                        "  {} {:<46} {}",
                        if ev.ok { "✓" } else { "✗" },
                        ev.item,
                        ev.message
                    );
                }
            },
        ));
        let done = match events {
            Ok(evs) => evs.into_iter().find(|e| e.item == "*"),
            Err(e) => {
                println!("halting: cleanup on {} failed: {e}", node.name);
                return ExitCode::from(EXIT_NOT_READY);
            }
        };
        match done {
            Some(d) if d.ok => println!(
                "  {}: {} (backup {} on the node)",
                node.name, d.message, d.backup_id
            ),
            Some(d) => {
                println!(
                    "halting: {} — {}; {} nodes not touched",
                    node.name,
                    d.message,
                    nodes.len() - i - 1
                );
                return ExitCode::from(EXIT_NOT_READY);
            }
            None => {
                println!("halting: {} ended its cleanup without a summary", node.name);
                return ExitCode::from(EXIT_NOT_READY);
            }
        }
    }
    ExitCode::from(if args.apply || all_allowed {
        EXIT_OK
    } else {
        EXIT_NOT_READY
    })
}
