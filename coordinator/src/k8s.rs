//! The Kubernetes commands of the CLI: `cluster check`, `node ...`, `lock ...`.
//! Only argument handling and printing live here; the work is in
//! [`cnishift::kube`].

use std::process::ExitCode;

use cnishift::inventory::{Inventory, Load};
use cnishift::kube::drain::DrainEvent;
use cnishift::kube::events::{Kind, Step};
use cnishift::kube::gates::Gate;
use cnishift::kube::lease::{self, LockOptions};
use cnishift::kube::nodes::Uncordoned;
use cnishift::kube::{Kube, KubeError, KubeOptions};
use cnishift::render;

use crate::{
    error, ClusterArgs, KubeArgs, LockCommand, NodeCommand, Output, EXIT_ERROR, EXIT_NOT_READY,
    EXIT_OK,
};

fn setup(inventory: &std::path::Path) -> Result<(Inventory, tokio::runtime::Runtime), ExitCode> {
    let inv = Inventory::load(
        inventory,
        Load {
            require_tls_files: false,
        },
    )
    .map_err(error)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| error(format!("cannot start the async runtime: {e}")))?;
    Ok((inv, rt))
}

async fn connect(args: &KubeArgs, inv: &Inventory) -> Result<Kube, ExitCode> {
    Kube::connect(&KubeOptions {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
        api_timeout: inv.deadlines.api,
    })
    .await
    .map_err(error)
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// 1 for "not done" (refused, blocked, timed out, lock held, interrupted), 2 for errors.
fn exit_for(e: &KubeError) -> u8 {
    match e {
        KubeError::Drain(_)
        | KubeError::Lock(_)
        | KubeError::WaitTimedOut { .. }
        | KubeError::Interrupted => EXIT_NOT_READY,
        _ => EXIT_ERROR,
    }
}

/// The cluster gates, for `preflight --cluster`.
pub async fn gates(args: &KubeArgs, inv: &Inventory) -> Result<Vec<Gate>, ExitCode> {
    let kube = connect(args, inv).await?;
    Ok(kube
        .cluster_gates(&inv.cluster.cilium_namespace, inv.cluster.api_vip)
        .await)
}

pub fn run_cluster(args: ClusterArgs) -> ExitCode {
    let (inv, rt) = match setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        let gates = kube
            .cluster_gates(&inv.cluster.cilium_namespace, inv.cluster.api_vip)
            .await;
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&gates).expect("gates serialize")
            ),
            Output::Table => print!("{}", render::gates_table(&gates)),
        }
        let failed = gates
            .iter()
            .any(|g| g.verdict == cnishift::kube::gates::Verdict::Fail);
        ExitCode::from(if failed { EXIT_NOT_READY } else { EXIT_OK })
    })
}

/// One `cnishift node` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeStep {
    Cordon,
    Uncordon,
    Drain,
    WaitReady,
    WaitCilium,
}

impl NodeStep {
    /// As in the command line and the JSON output.
    fn name(self) -> &'static str {
        match self {
            NodeStep::Cordon => "cordon",
            NodeStep::Uncordon => "uncordon",
            NodeStep::Drain => "drain",
            NodeStep::WaitReady => "wait-ready",
            NodeStep::WaitCilium => "wait-cilium",
        }
    }

    /// Steps that change the cluster hold the migration lock; waits do not.
    fn changes_cluster(self) -> bool {
        matches!(
            self,
            NodeStep::Cordon | NodeStep::Uncordon | NodeStep::Drain
        )
    }
}

pub fn run_node(cmd: NodeCommand) -> ExitCode {
    let (args, step) = match cmd {
        NodeCommand::Cordon(a) => (a, NodeStep::Cordon),
        NodeCommand::Uncordon(a) => (a, NodeStep::Uncordon),
        NodeCommand::Drain(a) => (a, NodeStep::Drain),
        NodeCommand::WaitReady(a) => (a, NodeStep::WaitReady),
        NodeCommand::WaitCilium(a) => (a, NodeStep::WaitCilium),
    };
    let (inv, rt) = match setup(&args.inventory.path) {
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
        let work = node_step(&kube, &inv, &args.node, step, &identity);
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

/// Records one Event on `node`; a failure to record is logged, never fatal.
async fn tell(
    kube: &Kube,
    node: &str,
    identity: &str,
    reason: &str,
    action: &str,
    note: String,
    kind: Kind,
) {
    kube.record_or_warn(
        node,
        Step {
            reason,
            action,
            note,
            kind,
        },
        identity,
    )
    .await;
}

/// Records a wait's outcome: `reasons.0` (Normal, `note`) or `reasons.1` (Warning, the error).
async fn tell_result(
    kube: &Kube,
    node: &str,
    identity: &str,
    action: &str,
    reasons: (&str, &str),
    note: &str,
    result: &Result<(), KubeError>,
) {
    match result {
        Ok(()) => {
            tell(
                kube,
                node,
                identity,
                reasons.0,
                action,
                note.to_string(),
                Kind::Normal,
            )
            .await
        }
        Err(e) => {
            tell(
                kube,
                node,
                identity,
                reasons.1,
                action,
                e.to_string(),
                Kind::Warning,
            )
            .await
        }
    }
}

/// One step, with its Events on the node; Ok carries a JSON summary with a "message".
async fn node_step(
    kube: &Kube,
    inv: &Inventory,
    node: &str,
    step: NodeStep,
    identity: &str,
) -> Result<serde_json::Value, KubeError> {
    match step {
        NodeStep::Cordon => {
            let c = kube.cordon(node).await?;
            let msg = if c.was_cordoned {
                "cordoned (it already was before the migration; it will stay cordoned afterwards)"
            } else {
                "cordoned for the Cilium migration"
            };
            if c.changed {
                tell(
                    kube,
                    node,
                    identity,
                    "MigrationCordoned",
                    "Cordon",
                    format!("cnishift {msg}"),
                    Kind::Normal,
                )
                .await;
            }
            Ok(
                serde_json::json!({"message": msg, "was_cordoned": c.was_cordoned, "changed": c.changed}),
            )
        }
        NodeStep::Uncordon => {
            let msg = match kube.uncordon(node).await? {
                Uncordoned::Uncordoned => "uncordoned",
                Uncordoned::LeftCordonedByAdmin => {
                    "left cordoned: it was cordoned before the migration"
                }
                Uncordoned::NotOurs => "not cordoned by cnishift; left as it is",
            };
            tell(
                kube,
                node,
                identity,
                "MigrationUncordoned",
                "Uncordon",
                format!("cnishift: {msg}"),
                Kind::Normal,
            )
            .await;
            Ok(serde_json::json!({"message": msg}))
        }
        NodeStep::Drain => {
            let c = kube.cordon(node).await?;
            if c.changed {
                tell(
                    kube,
                    node,
                    identity,
                    "MigrationCordoned",
                    "Cordon",
                    "cnishift cordoned the node to drain it".into(),
                    Kind::Normal,
                )
                .await;
            }
            tell(
                kube,
                node,
                identity,
                "MigrationDrainStarted",
                "Drain",
                "cnishift is evicting the node's pods (PodDisruptionBudgets honoured)".into(),
                Kind::Normal,
            )
            .await;
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
            match kube
                .drain(node, &inv.drain, inv.deadlines.drain, &progress)
                .await
            {
                Ok(r) => {
                    let msg = format!(
                        "drained: {} pods evicted, {} left in place, in {} ms",
                        r.evicted.len(),
                        r.skipped.len(),
                        r.elapsed_ms
                    );
                    tell(
                        kube,
                        node,
                        identity,
                        "MigrationDrained",
                        "Drain",
                        format!("cnishift {msg}"),
                        Kind::Normal,
                    )
                    .await;
                    Ok(serde_json::json!({"message": msg, "report": r}))
                }
                Err(e) => {
                    tell(
                        kube,
                        node,
                        identity,
                        "MigrationDrainFailed",
                        "Drain",
                        e.to_string(),
                        Kind::Warning,
                    )
                    .await;
                    Err(e)
                }
            }
        }
        NodeStep::WaitReady => {
            let r = kube.wait_node_ready(node, inv.deadlines.node_ready).await;
            let note = "cnishift saw the node Ready".to_string();
            let reasons = ("MigrationNodeReady", "MigrationNodeNotReady");
            tell_result(kube, node, identity, "WaitReady", reasons, &note, &r).await;
            r.map(|()| serde_json::json!({ "message": note }))
        }
        NodeStep::WaitCilium => {
            let ns = &inv.cluster.cilium_namespace;
            let r = kube
                .wait_cilium_ready(node, ns, inv.deadlines.cilium_ready)
                .await;
            let note = format!("cnishift saw the Cilium agent ({ns}) Ready on the node");
            let reasons = ("MigrationCiliumReady", "MigrationCiliumNotReady");
            tell_result(kube, node, identity, "WaitCilium", reasons, &note, &r).await;
            r.map(|()| serde_json::json!({ "message": note }))
        }
    }
}

pub fn run_lock(cmd: LockCommand) -> ExitCode {
    let (inventory, kube_args) = match &cmd {
        LockCommand::Status {
            inventory, kube, ..
        }
        | LockCommand::Release {
            inventory, kube, ..
        } => (inventory, kube),
    };
    let (inv, rt) = match setup(&inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    rt.block_on(async {
        let kube = match connect(kube_args, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        match cmd {
            LockCommand::Status { output, .. } => {
                match kube.lock_status(lease::NAMESPACE, lease::NAME).await {
                    Err(e) => error(e),
                    Ok(info) => {
                        match output {
                            Output::Json => println!(
                                "{}",
                                serde_json::to_string_pretty(&info).expect("serializes")
                            ),
                            Output::Table => match &info {
                                None => println!(
                                    "the migration lock ({}/{}) is free",
                                    lease::NAMESPACE,
                                    lease::NAME
                                ),
                                Some(i) => println!(
                                    "held by {} since {}, last renewed {} (TTL {}s){}",
                                    i.holder,
                                    i.since.as_deref().unwrap_or("?"),
                                    i.renewed.as_deref().unwrap_or("never"),
                                    i.ttl_seconds,
                                    if i.stale {
                                        " — STALE: its holder stopped renewing it"
                                    } else {
                                        ""
                                    }
                                ),
                            },
                        }
                        ExitCode::from(EXIT_OK)
                    }
                }
            }
            LockCommand::Release { .. } => {
                match kube.force_release_lock(lease::NAMESPACE, lease::NAME).await {
                    Ok(Some(holder)) => {
                        println!("released the migration lock held by {holder}");
                        ExitCode::from(EXIT_OK)
                    }
                    Ok(None) => {
                        println!("the migration lock was free");
                        ExitCode::from(EXIT_OK)
                    }
                    Err(e) => error(e),
                }
            }
        }
    })
}
