//! Cluster gates for preflight: what must hold in the cluster before a
//! migration starts, each with a verdict and a message a person can act on.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use serde::Serialize;

use super::{cilium, nodes::node_ready, ns_name, Kube};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub id: &'static str,
    pub verdict: Verdict,
    pub message: String,
}

fn gate(id: &'static str, verdict: Verdict, message: impl Into<String>) -> Gate {
    Gate {
        id,
        verdict,
        message: message.into(),
    }
}

/// At most `n` names, then "and N more".
fn some(names: &[String], n: usize) -> String {
    let mut s = names.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > n {
        s.push_str(&format!(" and {} more", names.len() - n));
    }
    s
}

impl Kube {
    /// Every gate, in a fixed order. An API error fails the gate it hit.
    pub async fn cluster_gates(&self, cilium_ns: &str, vip: Option<SocketAddr>) -> Vec<Gate> {
        self.cluster_gates_except(cilium_ns, vip, &[]).await
    }

    /// The same, except that a node named in `unfinished` being NotReady
    /// does not fail `nodes.ready` (it is still named in its message): a
    /// resumed migration's own halted node — rolled back by its agent onto a
    /// k3s without Flannel, say — is NotReady *because* its migration is not
    /// finished, and must not block the run that is about to finish it.
    /// Every other NotReady node still fails the gate.
    pub async fn cluster_gates_except(
        &self,
        cilium_ns: &str,
        vip: Option<SocketAddr>,
        unfinished: &[String],
    ) -> Vec<Gate> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let g1 = async {
            match self
                .call("list nodes", nodes.list(&ListParams::default()))
                .await
            {
                Err(e) => gate("nodes.ready", Verdict::Fail, e.to_string()),
                Ok(list) => {
                    let ours = |n: &Node| {
                        n.metadata
                            .name
                            .as_ref()
                            .is_some_and(|name| unfinished.contains(name))
                    };
                    let bad: Vec<String> = list
                        .items
                        .iter()
                        .filter(|n| !ours(n))
                        .filter_map(|n| node_ready(n).err())
                        .collect();
                    let excused: Vec<String> = list
                        .items
                        .iter()
                        .filter(|n| ours(n))
                        .filter_map(|n| node_ready(n).err())
                        .collect();
                    if bad.is_empty() && excused.is_empty() {
                        gate(
                            "nodes.ready",
                            Verdict::Pass,
                            format!("all {} nodes Ready", list.items.len()),
                        )
                    } else if bad.is_empty() {
                        gate(
                            "nodes.ready",
                            Verdict::Pass,
                            format!(
                                "every node Ready but this run's own unfinished {}, which it is about to migrate: {}",
                                if excused.len() == 1 { "node" } else { "nodes" },
                                some(&excused, 5)
                            ),
                        )
                    } else {
                        gate(
                            "nodes.ready",
                            Verdict::Fail,
                            format!(
                                "{} of {} not Ready: {}",
                                bad.len(),
                                list.items.len(),
                                some(&bad, 5)
                            ),
                        )
                    }
                }
            }
        };

        let pdbs: Api<PodDisruptionBudget> = Api::all(self.client.clone());
        let g2 = async {
            match self
                .call(
                    "list PodDisruptionBudgets",
                    pdbs.list(&ListParams::default()),
                )
                .await
            {
                Err(e) => gate("pdbs.blocking", Verdict::Fail, e.to_string()),
                Ok(list) => {
                    let blocking: Vec<String> = list
                        .items
                        .iter()
                        .filter(|b| {
                            b.status
                                .as_ref()
                                .is_some_and(|s| s.disruptions_allowed == 0 && s.expected_pods > 0)
                        })
                        .map(|b| {
                            let s = b.status.as_ref().expect("filtered on status");
                            format!(
                                "{} (healthy {}/{} wanted)",
                                ns_name(&b.metadata),
                                s.current_healthy,
                                s.desired_healthy
                            )
                        })
                        .collect();
                    if blocking.is_empty() {
                        gate(
                            "pdbs.blocking",
                            Verdict::Pass,
                            format!(
                                "{} PodDisruptionBudgets, each allows a disruption",
                                list.items.len()
                            ),
                        )
                    } else {
                        gate("pdbs.blocking", Verdict::Fail, format!("allow no disruption, so a drain would wait on them: {} — scale the workload up or relax the budget first", some(&blocking, 5)))
                    }
                }
            }
        };

        let pods: Api<Pod> = Api::all(self.client.clone());
        let g3 = async {
            match self
                .call("list pods", pods.list(&ListParams::default()))
                .await
            {
                Err(e) => gate("pods.healthy", Verdict::Fail, e.to_string()),
                Ok(list) => {
                    let bad: Vec<String> = list
                        .items
                        .iter()
                        .filter_map(|p| {
                            let phase = p
                                .status
                                .as_ref()
                                .and_then(|s| s.phase.clone())
                                .unwrap_or_else(|| "Unknown".into());
                            (phase != "Running" && phase != "Succeeded")
                                .then(|| format!("{} {phase}", ns_name(&p.metadata)))
                        })
                        .collect();
                    if bad.is_empty() {
                        gate(
                            "pods.healthy",
                            Verdict::Pass,
                            format!("all {} pods Running or Succeeded", list.items.len()),
                        )
                    } else {
                        gate(
                            "pods.healthy",
                            Verdict::Fail,
                            format!(
                                "{} pods are neither Running nor Succeeded: {}",
                                bad.len(),
                                some(&bad, 5)
                            ),
                        )
                    }
                }
            }
        };

        let g4 = async {
            match self.cilium_daemonset(cilium_ns).await {
            Err(e) => gate("cilium.daemonset", Verdict::Fail, e.to_string()),
            Ok(None) => gate(
                "cilium.daemonset",
                Verdict::Warn,
                format!("DaemonSet {cilium_ns}/{} does not exist yet: install Cilium (restricted to migrated nodes) before the first node is switched", cilium::DAEMONSET),
            ),
            Ok(Some(ds)) => {
                let s = ds.status.unwrap_or_default();
                let msg = format!("DaemonSet {cilium_ns}/{}: {} desired, {} ready", cilium::DAEMONSET, s.desired_number_scheduled, s.number_ready);
                if s.number_ready == s.desired_number_scheduled {
                    gate("cilium.daemonset", Verdict::Pass, msg)
                } else {
                    gate("cilium.daemonset", Verdict::Warn, msg)
                }
            }
        }
        };

        let g5 = async {
            match vip {
            None => gate(
                "api.vip",
                Verdict::Warn,
                "cluster.api_vip is not set in the inventory: the API server's VIP was not checked",
            ),
            Some(vip) => self.check_vip(vip).await,
        }
        };
        // The five questions are independent: asked at once, a slow API
        // costs one [deadlines] api, not five, and a Preflight's gates fit
        // its deadline.
        let (a, b, c, d, e) = tokio::join!(g1, g2, g3, g4, g5);
        vec![a, b, c, d, e]
    }

    /// GET /version through the VIP, with the same credentials and TLS
    /// settings: the VIP must answer and be named in the server certificate.
    async fn check_vip(&self, vip: SocketAddr) -> Gate {
        let mut config = self.config.clone();
        let scheme = config
            .cluster_url
            .scheme_str()
            .unwrap_or("https")
            .to_string();
        let url = format!("{scheme}://{vip}");
        config.cluster_url = match url.parse() {
            Ok(u) => u,
            Err(e) => return gate("api.vip", Verdict::Fail, format!("{url}: {e}")),
        };
        config.connect_timeout = Some(self.api_timeout);
        let through_vip = match Kube::from_config(config, self.api_timeout) {
            Ok(k) => k,
            Err(e) => return gate("api.vip", Verdict::Fail, e.to_string()),
        };
        match through_vip
            .call(
                format!("GET {url}/version"),
                through_vip.client.apiserver_version(),
            )
            .await
        {
            Ok(v) => gate(
                "api.vip",
                Verdict::Pass,
                format!("{url} answers (Kubernetes {})", v.git_version),
            ),
            Err(e) => gate("api.vip", Verdict::Fail, e.to_string()),
        }
    }
}
