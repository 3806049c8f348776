//! One function per migration step, each idempotent. The Kubernetes steps
//! (cordon, drain, uncordon, the waits) record an Event on the node for what
//! they did; `cnishift node …` and the migration driver both call them.

use crate::inventory::{Inventory, Node};
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
            // The storage gate, before anything is evicted.
            let storage = match super::storage::check(kube, node, &inv.drain).await {
                Ok(m) => m,
                Err(e) => {
                    let note = e.to_string();
                    tell(
                        kube,
                        node,
                        identity,
                        "MigrationDrainFailed",
                        "Drain",
                        note,
                        Kind::Warning,
                    )
                    .await;
                    return Err(e);
                }
            };
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
                        "drained: {} pods evicted, {} left in place, in {} ms; {storage}",
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

// --- the migration's view of the world -----------------------------------------

/// A step's cause of failure, in the agent's or the API's own words.
pub type Cause = String;

/// What the migration lease says between two steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Run,
    /// `cnishift pause` set the pause annotation on the migration Lease.
    Paused,
    /// The Lease is no longer ours.
    Lost(String),
}

/// What an agent's dead-man rollback is doing. `Display` says it for a
/// person (`cnishift status`); `Serialize` is its `-o json` shape:
/// `{"state": "armed", "remaining_ms": 7000}`, `{"state": "rolled-back",
/// "ok": true, "message": "..."}`, ...
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ArmState {
    Disarmed,
    Armed {
        #[serde(rename = "remaining_ms", serialize_with = "millis")]
        remaining: std::time::Duration,
    },
    RollingBack,
    RolledBack {
        ok: bool,
        message: String,
    },
    Confirmed,
}

fn millis<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl std::fmt::Display for ArmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArmState::Disarmed => f.write_str("disarmed: nothing will roll the node back"),
            ArmState::Armed { remaining } => write!(
                f,
                "armed: rolls the node back in {} unless confirmed",
                // Whole seconds: the countdown moves while one reads it.
                humantime::format_duration(std::time::Duration::from_secs(remaining.as_secs()))
            ),
            ArmState::RollingBack => f.write_str("rolling the node back now"),
            ArmState::RolledBack { ok: true, message } => write!(f, "rolled back: {message}"),
            ArmState::RolledBack { ok: false, message } => {
                write!(f, "rollback FAILED: {message}")
            }
            ArmState::Confirmed => f.write_str("confirmed: the node stays switched"),
        }
    }
}

/// What the k3s on a node runs, in its agent's words (its `k3s.network`
/// check): the one question asked between every two steps, and after a
/// rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K3sNetwork {
    Flannel,
    /// k3s runs with no Flannel: the node has a pod network only where
    /// Cilium runs.
    NoFlannel,
    /// The agent cannot tell; why, in its words.
    Unknown(String),
}

/// The Kubernetes side of the migration steps.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// The cluster gates (`cnishift cluster check`): Err names the failing
    /// ones. A NotReady node among `unfinished` (the run's own nodes it has
    /// started and not finished) does not fail `nodes.ready`.
    async fn gates(&self, unfinished: &[String]) -> Result<(), Cause>;
    async fn cordon(&self, node: &str) -> Result<String, Cause>;
    async fn drain(&self, node: &str, deadline: std::time::Duration) -> Result<String, Cause>;
    /// Whether Cilium's DaemonSet exists.
    async fn cilium_present(&self) -> Result<bool, Cause>;
    async fn label(&self, node: &str, key: &str, value: &str) -> Result<String, Cause>;
    async fn unlabel(&self, node: &str, key: &str) -> Result<String, Cause>;
    /// The node's Cilium pod Ready and the node Ready, both by watch.
    async fn wait_cilium_and_ready(
        &self,
        node: &str,
        deadline: std::time::Duration,
    ) -> Result<String, Cause>;
    async fn wait_ready(&self, node: &str, deadline: std::time::Duration) -> Result<String, Cause>;
    /// Deletes the node's pods that are not hostNetwork and waits until the
    /// recreated ones are Ready.
    async fn repod(&self, node: &str, deadline: std::time::Duration) -> Result<String, Cause>;
    async fn uncordon(&self, node: &str) -> Result<String, Cause>;
    /// Records an Event on the node (never fails the step).
    async fn record(&self, node: &str, step: &str, ok: bool, note: &str);
    /// The migration Lease: still ours, paused?
    async fn control(&self) -> Result<Control, Cause>;
}

/// The agents' side of the migration steps.
#[allow(async_fn_in_trait)]
pub trait NodeAgents {
    /// The agent's report is ready for Cilium: Err names the failing checks.
    async fn preflight(&self, node: &Node) -> Result<(), Cause>;
    async fn arm(&self, node: &Node, run: &str, deadline: std::time::Duration)
        -> Result<(), Cause>;
    async fn confirm(&self, node: &Node, run: &str) -> Result<(), Cause>;
    async fn disarm(&self, node: &Node, run: &str) -> Result<(), Cause>;
    async fn arm_state(&self, node: &Node) -> Result<ArmState, Cause>;
    /// A fresh report judged "migrated": Err names the failing verdicts.
    async fn migrated(&self, node: &Node) -> Result<(), Cause>;
    /// Pods still wired to Flannel's `cni0` on the node.
    async fn pods_on_cni0(&self, node: &Node) -> Result<u32, Cause>;
    /// A TCP dial from the node to `target`.
    async fn dial(&self, node: &Node, target: std::net::SocketAddr) -> Result<(), Cause>;
    /// What the node's k3s runs now (the early-restart watch asks it of every
    /// worker not yet migrated, between every two steps; the aftermath of a
    /// rollback asks it of the node rolled back): a cheap question.
    async fn k3s_network(&self, node: &Node) -> Result<K3sNetwork, Cause>;
    /// What of Flannel is left on the node (its cleanup plan's items).
    async fn leftovers(&self, node: &Node) -> Result<Vec<String>, Cause>;
    /// Plans and applies the node's cleanup of Flannel's leftovers.
    async fn cleanup(&self, node: &Node) -> Result<String, Cause>;
    /// A controller's etcd member, as its agent sees it (the quorum gate,
    /// migrate/etcd.rs). By default nothing answers, so the gate refuses.
    async fn etcd_status(&self, _node: &Node) -> Result<cnishift_proto::v1::EtcdStatus, Cause> {
        Err("this agent set does not ask etcd".into())
    }
    /// A named etcd snapshot by the controller's agent (migrate/etcd.rs).
    async fn etcd_snapshot(
        &self,
        _node: &Node,
        _run: &str,
        _timeout: std::time::Duration,
    ) -> Result<cnishift_proto::v1::EtcdSnapshotResult, Cause> {
        Err("this agent set takes no etcd snapshot".into())
    }
}

#[cfg(test)]
mod tests {
    use super::ArmState;
    use std::time::Duration;

    /// `cnishift status` shows the arm state to a person, and its fields
    /// under `-o json` (never a Rust Debug string).
    #[test]
    fn the_arm_state_reads_as_a_sentence_and_as_json() {
        let cases = [
            (
                ArmState::Armed {
                    remaining: Duration::from_millis(7_450),
                },
                "armed: rolls the node back in 7s unless confirmed",
                serde_json::json!({"state": "armed", "remaining_ms": 7450}),
            ),
            (
                ArmState::RolledBack {
                    ok: true,
                    message: "rolled back to NixOS generation 41".into(),
                },
                "rolled back: rolled back to NixOS generation 41",
                serde_json::json!({"state": "rolled-back", "ok": true, "message": "rolled back to NixOS generation 41"}),
            ),
            (
                ArmState::RolledBack {
                    ok: false,
                    message: "exit 1".into(),
                },
                "rollback FAILED: exit 1",
                serde_json::json!({"state": "rolled-back", "ok": false, "message": "exit 1"}),
            ),
            (
                ArmState::RollingBack,
                "rolling the node back now",
                serde_json::json!({"state": "rolling-back"}),
            ),
            (
                ArmState::Confirmed,
                "confirmed: the node stays switched",
                serde_json::json!({"state": "confirmed"}),
            ),
            (
                ArmState::Disarmed,
                "disarmed: nothing will roll the node back",
                serde_json::json!({"state": "disarmed"}),
            ),
        ];
        for (s, text, json) in cases {
            assert_eq!(s.to_string(), text);
            assert_eq!(serde_json::to_value(&s).unwrap(), json);
        }
    }
}
