//! `cnishift`: the command line. Everything it does lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cnishift::inventory::{Inventory, Load};
use cnishift::{agents, certs, render};

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
                  over mutual-TLS gRPC, and checks, then migrates, the cluster.\n\n\
                  Logs go to stderr; set RUST_LOG=debug for more.",
    after_help = "Exit codes: 0 success (every node ready), 1 some node not ready or unreachable, 2 usage, inventory or TLS error.\n\n\
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
                            slow or impostor agent is reported as such and the others still report.\n\n\
                            Exit codes: 0 every node ready, 1 some node not ready or not reachable, 2 bad inventory or TLS files."
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
    let outcomes = rt.block_on(agents::fan_out_reports(&inv.nodes, &tls, &inv.deadlines));
    let text = match args.output {
        Output::Json => render::preflight_json(&outcomes),
        Output::Table => render::preflight_table(&outcomes),
    };
    print!("{text}");
    let all_ready = outcomes
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
