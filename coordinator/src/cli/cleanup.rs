//! `cnishift cleanup`: what Flannel left, node by node.

use std::process::ExitCode;

use cnishift::{agents, render};

use super::{connect_setup, error, InventoryArg, EXIT_NOT_READY, EXIT_OK};

#[derive(clap::Args)]
pub struct CleanupArgs {
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

pub fn run(args: CleanupArgs) -> ExitCode {
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
