//! One function per migration step, each idempotent. The Kubernetes steps
//! (cordon, drain, uncordon, the waits) record an Event on the node for what
//! they did; `cnishift node …` and the migration driver both call them.

use crate::inventory::Inventory;
use crate::kube::drain::DrainEvent;
use crate::kube::events::{Kind, Step};
use crate::kube::nodes::Uncordoned;
use crate::kube::{Kube, KubeError};

/// One `cnishift node` step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStep {
    Cordon,
    Uncordon,
    Drain,
    WaitReady,
    WaitCilium,
}

impl NodeStep {
    /// As in the command line and the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            NodeStep::Cordon => "cordon",
            NodeStep::Uncordon => "uncordon",
            NodeStep::Drain => "drain",
            NodeStep::WaitReady => "wait-ready",
            NodeStep::WaitCilium => "wait-cilium",
        }
    }

    /// Steps that change the cluster hold the migration lock; waits do not.
    pub fn changes_cluster(self) -> bool {
        matches!(
            self,
            NodeStep::Cordon | NodeStep::Uncordon | NodeStep::Drain
        )
    }
}

/// Records one Event on `node`; a failure to record is logged, never fatal.
pub async fn tell(
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
pub async fn tell_result(
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
/// `progress` sees a drain's evictions and blocked pods as they happen.
pub async fn node_step(
    kube: &Kube,
    inv: &Inventory,
    node: &str,
    step: NodeStep,
    identity: &str,
    progress: &(dyn Fn(DrainEvent) + Send + Sync),
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
            match kube
                .drain(node, &inv.drain, inv.deadlines.drain, progress)
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
