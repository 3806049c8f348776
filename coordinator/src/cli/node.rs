//! `cnishift node cordon|uncordon|drain|wait-ready|wait-cilium`: one step on
//! one node, the same step function `cnishift migrate` calls.

use std::process::ExitCode;

use clap::Subcommand;

use cnishift::kube::drain::DrainEvent;
use cnishift::kube::lease::{self, LockOptions};
use cnishift::kube::KubeError;
use cnishift::migrate::steps::{node_step, NodeStep};

use super::{
    connect, error, exit_for, interrupted, kube_setup, InventoryArg, KubeArgs, Output, EXIT_ERROR,
    EXIT_OK,
};

#[derive(clap::Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The node, as named in the inventory.
    #[arg(value_name = "NODE")]
    pub node: String,
    /// Take over the migration lock when its holder stopped renewing it (be sure that coordinator is gone).
    #[arg(long)]
    pub take_over_stale_lock: bool,
    /// Output format for the result.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Subcommand)]
pub enum NodeCommand {
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
    /// Arm the node's dead-man rollback: unless confirmed within --timeout, its agent rolls it back.
    #[command(
        after_help = "What the rollback runs is fixed on the node (the agent's --rollback-command, or on NixOS the\n\
                            generation current now via the module's cnishift-rollback@ unit); nothing is sent from here.\n\
                            Needs no kubeconfig. Exit codes: 0 armed, 1 refused by the agent (another run holds it),\n\
                            2 the agent unreachable or a usage error."
    )]
    Arm(super::arm::ArmArgs),
    /// Confirm the switch (over a new connection, as the agent requires): nothing will be rolled back.
    Confirm(super::arm::RunArgs),
    /// Disarm the countdown (or acknowledge a failed rollback) without confirming.
    Disarm(super::arm::RunArgs),
    /// The node's dead-man state: armed, remaining, fired, outcome, the action's output.
    #[command(
        after_help = "Exit codes: 0 shown, 1 the last rollback failed or was interrupted, 2 the agent unreachable."
    )]
    ArmState(super::arm::AgentNodeArgs),
}

pub fn run(cmd: NodeCommand) -> ExitCode {
    use super::arm::{self, ArmCommand};
    let (args, step) = match cmd {
        NodeCommand::Arm(a) => return arm::run(ArmCommand::Arm(a)),
        NodeCommand::Confirm(a) => return arm::run(ArmCommand::Confirm(a)),
        NodeCommand::Disarm(a) => return arm::run(ArmCommand::Disarm(a)),
        NodeCommand::ArmState(a) => return arm::run(ArmCommand::State(a)),
        NodeCommand::Cordon(a) => (a, NodeStep::Cordon),
        NodeCommand::Uncordon(a) => (a, NodeStep::Uncordon),
        NodeCommand::Drain(a) => (a, NodeStep::Drain),
        NodeCommand::WaitReady(a) => (a, NodeStep::WaitReady),
        NodeCommand::WaitCilium(a) => (a, NodeStep::WaitCilium),
    };
    let (inv, rt) = match kube_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if inv.node(&args.node).is_none() {
        return error(format!(
            "{:?} is not in {}; only nodes of the inventory are touched",
            args.node,
            inv.path.display()
        ));
    }
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        let identity = lease::default_identity();
        let guard = if step.changes_cluster() {
            let mut opts = LockOptions::new(identity.clone());
            opts.take_over_stale = args.take_over_stale_lock;
            opts.ttl = inv.deadlines.lock_ttl;
            match kube.acquire_lock(&opts).await {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!("cnishift: {e}");
                    return ExitCode::from(exit_for(&e));
                }
            }
        } else {
            None
        };
        // The step stops where it is when the lock is lost or on Ctrl-C/SIGTERM.
        // Each blocked pod is reported once, not at every retry.
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        let progress = |e: DrainEvent| match e {
            DrainEvent::Evicting(p) => eprintln!("  evicting {p}"),
            DrainEvent::Gone(p) => eprintln!("  gone     {p}"),
            DrainEvent::Blocked(b) => {
                if seen.lock().expect("set").insert(b.pod.clone()) {
                    eprintln!(
                        "  waiting  {} — PodDisruptionBudget {} says no: {} (asking again every {})",
                        b.pod,
                        b.pdb.as_deref().unwrap_or("?"),
                        b.reason,
                        humantime::format_duration(inv.drain.retry_interval)
                    );
                }
            }
        };
        let work = node_step(&kube, &inv, &args.node, step, &identity, &progress);
        let lost = async {
            match &guard {
                Some(g) => KubeError::Lock(g.lost().await),
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = work => r,
            e = lost => Err(e),
            _ = interrupted() => Err(KubeError::Interrupted),
        };
        let released = match guard {
            Some(g) => g.release().await,
            None => Ok(()),
        };
        let code = match &result {
            Ok(summary) => {
                match args.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"node": args.node, "step": step.name(), "ok": true, "result": summary})
                    ),
                    Output::Table => println!("{}: {}", args.node, summary["message"].as_str().unwrap_or("done")),
                }
                EXIT_OK
            }
            Err(e) => {
                match args.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"node": args.node, "step": step.name(), "ok": false, "error": e.to_string()})
                    ),
                    Output::Table => eprintln!("cnishift: {e}"),
                }
                exit_for(e)
            }
        };
        if let Err(e) = released {
            eprintln!("cnishift: releasing the migration lock: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
        ExitCode::from(code)
    })
}
