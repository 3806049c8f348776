//! The real world behind [`Cluster`] and [`NodeAgents`]: the Kubernetes API
//! through [`crate::kube`], and the agents through [`crate::agents`].
//! Preflight, Verify, the early-restart watch and Repod's "no pod on cni0"
//! read the agent's report judged against an expectation (none, Cilium,
//! Flannel); the dead-man rollback is ArmRollback/Confirm/Disarm/GetArmState.

use std::time::Duration;

use crate::agents::{self, ClientTls};
use cnishift_proto::v1 as pb;

use crate::inventory::{Inventory, Node};
use crate::kube::events::{Kind, Step as EventStep};
use crate::kube::gates::Verdict;
use crate::kube::lease::{self, LockGuard};
use crate::kube::Kube;

use super::steps::{
    node_step, ArmState, Cause, Cluster, Control, K3sNetwork, NodeAgents, NodeStep,
};

/// The Kubernetes API, with the migration Lease held.
pub struct KubeCluster<'a> {
    pub kube: &'a Kube,
    pub inv: &'a Inventory,
    pub guard: Option<&'a LockGuard>,
    pub identity: String,
}

impl KubeCluster<'_> {
    async fn node_step(&self, node: &str, step: NodeStep) -> Result<String, Cause> {
        node_step(self.kube, self.inv, node, step, &self.identity, &|_| {})
            .await
            .map(|v| v["message"].as_str().unwrap_or("done").to_string())
            .map_err(|e| e.to_string())
    }
}

/// `wait-cilium-ready` → `WaitCiliumReady`.
fn camel(step: &str) -> String {
    step.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

impl Cluster for KubeCluster<'_> {
    async fn gates(&self, unfinished: &[String]) -> Result<(), Cause> {
        let gates = self
            .kube
            .cluster_gates_except(
                &self.inv.cluster.cilium_namespace,
                self.inv.cluster.api_vip,
                unfinished,
            )
            .await;
        let failed: Vec<String> = gates
            .iter()
            .filter(|g| g.verdict == Verdict::Fail)
            .map(|g| format!("gate {}: {}", g.id, g.message))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    // Cordon, drain, uncordon and the waits are the very step functions of
    // `cnishift node …`, with their Events.
    async fn cordon(&self, node: &str) -> Result<String, Cause> {
        self.node_step(node, NodeStep::Cordon).await
    }

    async fn drain(&self, node: &str, _deadline: Duration) -> Result<String, Cause> {
        self.node_step(node, NodeStep::Drain).await
    }

    async fn cilium_present(&self) -> Result<bool, Cause> {
        self.kube
            .cilium_daemonset(&self.inv.cluster.cilium_namespace)
            .await
            .map(|d| d.is_some())
            .map_err(|e| e.to_string())
    }

    async fn label(&self, node: &str, key: &str, value: &str) -> Result<String, Cause> {
        let changed = self
            .kube
            .label_node(node, key, value)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "{} {key}={value}",
            if changed {
                "labelled"
            } else {
                "already labelled"
            }
        ))
    }

    async fn unlabel(&self, node: &str, key: &str) -> Result<String, Cause> {
        self.kube
            .unlabel_node(node, key)
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("label {key} removed"))
    }

    async fn wait_cilium_and_ready(
        &self,
        node: &str,
        _deadline: Duration,
    ) -> Result<String, Cause> {
        let (c, r) = tokio::join!(
            self.node_step(node, NodeStep::WaitCilium),
            self.node_step(node, NodeStep::WaitReady),
        );
        Ok(format!("{}; {}", c?, r?))
    }

    async fn wait_ready(&self, node: &str, _deadline: Duration) -> Result<String, Cause> {
        self.node_step(node, NodeStep::WaitReady).await
    }

    async fn repod(&self, node: &str, deadline: Duration) -> Result<String, Cause> {
        let n = self
            .kube
            // A list of one node's pods (from the API server's watch
            // cache) ten times a second, for the second or so Repod
            // takes: cheap, and the step ends within 0.1 s of the pods
            // being Ready rather than up to 0.5 s after.
            .repod(node, deadline, Duration::from_millis(100))
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!("{n} pods recreated and Ready"))
    }

    async fn uncordon(&self, node: &str) -> Result<String, Cause> {
        self.node_step(node, NodeStep::Uncordon).await
    }

    async fn record(&self, node: &str, step: &str, ok: bool, note: &str) {
        // The node steps record their own Events (MigrationCordoned, ...).
        let own = ["cordon-", "drain-", "uncordon-", "wait-cilium-ready-"];
        if own.iter().any(|p| step.starts_with(p)) {
            return;
        }
        let reason = format!("Migration{}", camel(step));
        self.kube
            .record_or_warn(
                node,
                EventStep {
                    reason: &reason,
                    action: &camel(step),
                    note: format!("cnishift: {note}"),
                    kind: if ok { Kind::Normal } else { Kind::Warning },
                },
                &self.identity,
            )
            .await;
    }

    async fn control(&self) -> Result<Control, Cause> {
        if let Some(g) = self.guard {
            if let Err(e) = g.check() {
                return Ok(Control::Lost(e.to_string()));
            }
        }
        match self
            .kube
            .paused(lease::NAMESPACE, lease::NAME)
            .await
            .map_err(|e| e.to_string())?
        {
            None if self.guard.is_some() => Ok(Control::Lost("the Lease was deleted".into())),
            Some(Some(_)) => Ok(Control::Paused),
            _ => Ok(Control::Run),
        }
    }
}

/// The agents, over mutual TLS: every read-only question over the node's
/// pooled connection (asked between every two steps, it must be cheap),
/// every changing call — ArmRollback, Confirm, Disarm, DialFromNode,
/// cleanup — over a connection of its own.
pub struct AgentClients<'a> {
    pub tls: &'a ClientTls,
    pub inv: &'a Inventory,
    pub pool: agents::Pool,
}

impl<'a> AgentClients<'a> {
    pub fn new(tls: &'a ClientTls, inv: &'a Inventory) -> Self {
        AgentClients {
            tls,
            inv,
            pool: agents::Pool::default(),
        }
    }
}

/// The failing checks of a report, in the agent's words.
fn failing(r: &pb::NodeReport) -> String {
    r.checks
        .iter()
        .filter(|c| c.verdict == pb::Verdict::Fail as i32)
        .map(|c| format!("{}: {}", c.id, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What k3s runs, from a report judged against the Flannel expectation:
/// its `k3s.network` check passes on Flannel, fails without it, warns when
/// the agent cannot tell. (The agent judges; this only reads the verdict.)
pub fn k3s_network_of(r: &pb::NodeReport) -> K3sNetwork {
    match r.checks.iter().find(|c| c.id == "k3s.network") {
        None => K3sNetwork::Unknown("the agent's report has no k3s.network check".into()),
        Some(c) if r.expect != pb::Expectation::Flannel as i32 => K3sNetwork::Unknown(format!(
            "the agent judged k3s.network against another expectation: {}",
            c.message
        )),
        Some(c) if c.verdict == pb::Verdict::Pass as i32 => K3sNetwork::Flannel,
        Some(c) if c.verdict == pb::Verdict::Fail as i32 => K3sNetwork::NoFlannel,
        Some(c) => K3sNetwork::Unknown(c.message.clone()),
    }
}

/// The agent's dead-man state as the driver reads it.
pub fn arm_state_of(s: &pb::ArmState) -> ArmState {
    // The agent says "rolled back: X" / "the rollback FAILED: X"; the
    // outcome is already the variant, so only X is kept.
    let said = ["rolled back: ", "the rollback FAILED: "]
        .iter()
        .find_map(|p| s.message.strip_prefix(p))
        .unwrap_or(&s.message);
    let message = if s.output_tail.is_empty() {
        said.to_string()
    } else {
        format!("{said} ({})", s.output_tail.trim())
    };
    match s.outcome.as_str() {
        "succeeded" => ArmState::RolledBack { ok: true, message },
        "failed" | "interrupted" => ArmState::RolledBack { ok: false, message },
        "running" => ArmState::RollingBack,
        "confirmed" => ArmState::Confirmed,
        _ if s.armed => ArmState::Armed {
            remaining: Duration::from_millis(s.remaining_ms),
        },
        _ => ArmState::Disarmed,
    }
}

impl AgentClients<'_> {
    /// A full report: every probe, every verdict (Preflight, Verify).
    async fn report(&self, node: &Node, expect: pb::Expectation) -> Result<pb::NodeReport, Cause> {
        self.narrowed(node, expect, &[]).await
    }

    /// A report of `families` alone: only the probes they read run.
    async fn narrowed(
        &self,
        node: &Node,
        expect: pb::Expectation,
        families: &[pb::CheckFamily],
    ) -> Result<pb::NodeReport, Cause> {
        agents::get_report_via(
            node,
            self.tls,
            &self.inv.deadlines,
            expect,
            families,
            agents::Via::Reuse(&self.pool),
        )
        .await
        .map_err(|e| e.to_string())
    }
}

impl NodeAgents for AgentClients<'_> {
    async fn preflight(&self, node: &Node) -> Result<(), Cause> {
        let r = self.report(node, pb::Expectation::Unspecified).await?;
        if r.ready {
            return Ok(());
        }
        Err(format!(
            "the agent says the node is not ready: {}",
            failing(&r)
        ))
    }

    async fn arm(&self, node: &Node, run: &str, deadline: Duration) -> Result<(), Cause> {
        agents::arm_rollback(node, self.tls, &self.inv.deadlines, run, deadline)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn confirm(&self, node: &Node, run: &str) -> Result<(), Cause> {
        let s = agents::confirm(node, self.tls, &self.inv.deadlines, run)
            .await
            .map_err(|e| e.to_string())?;
        match s.outcome.as_str() {
            "confirmed" => Ok(()),
            _ => Err(format!("the agent did not confirm: {}", s.message)),
        }
    }

    async fn disarm(&self, node: &Node, run: &str) -> Result<(), Cause> {
        agents::disarm(node, self.tls, &self.inv.deadlines, run)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn arm_state(&self, node: &Node) -> Result<ArmState, Cause> {
        agents::arm_state_via(
            node,
            self.tls,
            &self.inv.deadlines,
            agents::Via::Reuse(&self.pool),
        )
        .await
        .map(|s| arm_state_of(&s))
        .map_err(|e| e.to_string())
    }

    async fn migrated(&self, node: &Node) -> Result<(), Cause> {
        let r = self.report(node, pb::Expectation::Cilium).await?;
        if r.ready {
            Ok(())
        } else {
            Err(format!(
                "the agent says the node is not migrated: {}",
                failing(&r)
            ))
        }
    }

    async fn pods_on_cni0(&self, node: &Node) -> Result<u32, Cause> {
        let r = self
            .narrowed(
                node,
                pb::Expectation::Cilium,
                &[pb::CheckFamily::PodNetwork],
            )
            .await?;
        match r.checks.iter().find(|c| c.id == "cilium.pods") {
            None => Err("the agent's report has no cilium.pods check".into()),
            Some(c) if c.verdict != pb::Verdict::Fail as i32 => Ok(0),
            // "N pod interfaces are still on Flannel's cni0 (...)".
            Some(c) => Ok(c
                .message
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)),
        }
    }

    async fn dial(&self, node: &Node, target: std::net::SocketAddr) -> Result<(), Cause> {
        let req = pb::DialRequest {
            address: target.to_string(),
            ..Default::default()
        };
        let r = agents::dial_from_node(node, self.tls, &self.inv.deadlines, req)
            .await
            .map_err(|e| e.to_string())?;
        if r.ok {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    async fn k3s_network(&self, node: &Node) -> Result<K3sNetwork, Cause> {
        let r = self
            .narrowed(node, pb::Expectation::Flannel, &[pb::CheckFamily::K3s])
            .await?;
        Ok(k3s_network_of(&r))
    }

    async fn leftovers(&self, node: &Node) -> Result<Vec<String>, Cause> {
        let plan = agents::plan_cleanup(node, self.tls, &self.inv.deadlines, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(plan.items.iter().map(|i| i.id.clone()).collect())
    }

    async fn etcd_status(&self, node: &Node) -> Result<pb::EtcdStatus, Cause> {
        agents::etcd_status(node, self.tls, &self.inv.deadlines)
            .await
            .map_err(|e| e.to_string())
    }

    async fn etcd_snapshot(
        &self,
        node: &Node,
        run: &str,
        timeout: Duration,
    ) -> Result<pb::EtcdSnapshotResult, Cause> {
        agents::etcd_snapshot(node, self.tls, &self.inv.deadlines, run, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn cleanup(&self, node: &Node) -> Result<String, Cause> {
        let d = &self.inv.deadlines;
        let plan = agents::plan_cleanup(node, self.tls, d, false)
            .await
            .map_err(|e| e.to_string())?;
        if !plan.allowed {
            let why: Vec<String> = plan
                .refusals
                .iter()
                .map(|r| format!("{}: {} ({})", r.interlock, r.reason, r.fix))
                .collect();
            return Err(format!("the agent refuses cleanup: {}", why.join("; ")));
        }
        let events = agents::apply_cleanup(node, self.tls, d, false, |_| {})
            .await
            .map_err(|e| e.to_string())?;
        match events.into_iter().find(|e| e.item == "*") {
            Some(e) if e.ok => Ok(format!("{} (backup {})", e.message, e.backup_id)),
            Some(e) => Err(e.message),
            None => Err("the agent ended its cleanup without a summary".into()),
        }
    }
}

/// The pause annotation's value: who paused, and when.
pub fn pause_value() -> String {
    format!("{} at {}", lease::default_identity(), super::journal::now())
}

/// One line of `cnishift verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckVerdict {
    Pass,
    Warn,
    Fail,
}

impl CheckVerdict {
    pub fn mark(&self) -> &'static str {
        match self {
            CheckVerdict::Pass => "✓",
            CheckVerdict::Warn => "!",
            CheckVerdict::Fail => "✗",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub id: String,
    pub verdict: CheckVerdict,
    pub message: String,
}

/// The runbook's validation checklist where software can see it.
pub async fn verify_cluster<A: NodeAgents>(
    inv: &Inventory,
    kube: &Kube,
    agents: &A,
    after_cleanup: bool,
) -> Vec<Check> {
    let mut out = vec![];
    let mut push = |id: String, ok: Result<String, String>, fail: CheckVerdict| {
        out.push(match ok {
            Ok(m) => Check {
                id,
                verdict: CheckVerdict::Pass,
                message: m,
            },
            Err(m) => Check {
                id,
                verdict: fail,
                message: m,
            },
        })
    };
    let gates = kube
        .cluster_gates(&inv.cluster.cilium_namespace, inv.cluster.api_vip)
        .await;
    for g in gates
        .iter()
        .filter(|g| g.id == "nodes.ready" || g.id == "cilium.daemonset")
    {
        let v = match g.verdict {
            Verdict::Pass => Ok(g.message.clone()),
            _ => Err(g.message.clone()),
        };
        push(g.id.to_string(), v, CheckVerdict::Fail);
    }
    let ns = &inv.cluster.cilium_namespace;
    for n in &inv.nodes {
        let c = kube
            .wait_cilium_ready(&n.name, ns, inv.deadlines.api)
            .await
            .map(|()| "a Ready Cilium pod".to_string())
            .map_err(|e| e.to_string());
        push(format!("{}.cilium-pod", n.name), c, CheckVerdict::Fail);
        let m = agents
            .migrated(n)
            .await
            .map(|()| "the agent judges it migrated".to_string());
        push(format!("{}.migrated", n.name), m, CheckVerdict::Fail);
        if let Some(vip) = inv.cluster.api_vip {
            let d = agents
                .dial(n, vip)
                .await
                .map(|()| format!("{vip} reachable from the node"));
            push(format!("{}.vip", n.name), d, CheckVerdict::Fail);
        }
        let leftovers = match agents.leftovers(n).await {
            Ok(items) if items.is_empty() => Ok("nothing of Flannel left".to_string()),
            Ok(items) => Err(format!("Flannel left: {}", items.join(", "))),
            Err(e) => Err(e),
        };
        push(
            format!("{}.flannel-leftovers", n.name),
            leftovers,
            if after_cleanup {
                CheckVerdict::Fail
            } else {
                CheckVerdict::Warn
            },
        );
    }
    for (name, required) in [("cilium-operator", true), ("hubble-relay", false)] {
        let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
            kube::Api::namespaced(kube.client.clone(), ns);
        let r = match kube
            .call(format!("get Deployment {ns}/{name}"), api.get_opt(name))
            .await
        {
            Err(e) => Err(e.to_string()),
            Ok(None) if required => Err(format!("no Deployment {ns}/{name}")),
            Ok(None) => Ok(format!(
                "not deployed ({name} is optional: Hubble is not enabled)"
            )),
            Ok(Some(d)) => {
                let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
                if available > 0 {
                    Ok(format!("{available} available"))
                } else {
                    Err(format!("Deployment {ns}/{name} has no available replica"))
                }
            }
        };
        push(name.to_string(), r, CheckVerdict::Fail);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agents_arm_state_as_the_driver_reads_it() {
        use super::{arm_state_of, pb, ArmState};
        let s = |armed: bool, outcome: &str| pb::ArmState {
            armed,
            outcome: outcome.into(),
            remaining_ms: 1500,
            message: "rolled back to NixOS generation 41".into(),
            output_tail: "switching to configuration\n".into(),
            ..Default::default()
        };
        assert_eq!(
            arm_state_of(&s(false, "succeeded")),
            ArmState::RolledBack {
                ok: true,
                message: "rolled back to NixOS generation 41 (switching to configuration)".into()
            }
        );
        assert!(matches!(
            arm_state_of(&s(false, "interrupted")),
            ArmState::RolledBack { ok: false, .. }
        ));
        // The agent's own "rolled back: " is not said twice.
        let said = pb::ArmState {
            outcome: "succeeded".into(),
            message: "rolled back: `nixos-rollback` exited 0".into(),
            ..Default::default()
        };
        let read = arm_state_of(&said);
        assert_eq!(read.to_string(), "rolled back: `nixos-rollback` exited 0");
        assert_eq!(arm_state_of(&s(true, "running")), ArmState::RollingBack);
        assert_eq!(arm_state_of(&s(false, "confirmed")), ArmState::Confirmed);
        assert_eq!(
            arm_state_of(&s(true, "")),
            ArmState::Armed {
                remaining: std::time::Duration::from_millis(1500)
            }
        );
        assert_eq!(arm_state_of(&s(false, "disarmed")), ArmState::Disarmed);
    }

    #[test]
    fn what_k3s_runs_is_read_from_the_agents_verdict_under_the_flannel_expectation() {
        use super::{k3s_network_of, pb, K3sNetwork};
        let r = |expect: pb::Expectation, verdict: pb::Verdict| pb::NodeReport {
            expect: expect as i32,
            checks: vec![pb::Check {
                id: "k3s.network".into(),
                verdict: verdict as i32,
                message: "k3s's containerd reads /etc/cni/net.d".into(),
                remediation: None,
            }],
            ..Default::default()
        };
        use pb::{Expectation as E, Verdict as V};
        assert_eq!(k3s_network_of(&r(E::Flannel, V::Pass)), K3sNetwork::Flannel);
        assert_eq!(
            k3s_network_of(&r(E::Flannel, V::Fail)),
            K3sNetwork::NoFlannel
        );
        assert_eq!(
            k3s_network_of(&r(E::Flannel, V::Warn)),
            K3sNetwork::Unknown("k3s's containerd reads /etc/cni/net.d".into())
        );
        // A verdict judged against another expectation is not read as one.
        assert!(matches!(
            k3s_network_of(&r(E::Cilium, V::Pass)),
            K3sNetwork::Unknown(_)
        ));
        assert!(matches!(
            k3s_network_of(&pb::NodeReport::default()),
            K3sNetwork::Unknown(_)
        ));
    }

    #[test]
    fn event_reasons_are_camel_case() {
        assert_eq!(super::camel("wait-cilium-ready"), "WaitCiliumReady");
        assert_eq!(super::camel("cordon"), "Cordon");
        assert_eq!(super::camel("deploy-failed"), "DeployFailed");
        assert_eq!(crate::kube::ops::PAUSE_ANNOTATION, "cnishift.io/paused");
    }
}
