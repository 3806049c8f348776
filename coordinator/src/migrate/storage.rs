//! The storage gate before a node is drained: draining moves pods, and
//! switching a node's CNI takes it off the network for a while, so nothing
//! whose only good copy lives on the node may depend on it.
//!
//! - **Longhorn** (when its CRDs are served, `longhorn.io/v1beta2`): every
//!   volume with a replica on the node must have a healthy replica on another
//!   schedulable node. "Healthy" is Longhorn's own test (its manager's
//!   `IsAvailableHealthyReplica`: `spec.healthyAt` set, `spec.failedAt`
//!   empty, not being deleted), and, as in Longhorn's own drain protection, a
//!   replica on a cordoned node does not count: that node is going away too.
//! - **Pinned volumes**: a pod the drain would move whose claim is bound to a
//!   PersistentVolume that node affinity ties to this node alone (rancher's
//!   local-path provisioner writes exactly that) cannot run anywhere else; it
//!   would stay Pending until the node is back. Refused unless
//!   `[drain] allow_pinned_volumes`.
//!
//! `cnishift node drain` and `cnishift migrate` run it through the same Drain
//! step function, before anything is evicted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume, PersistentVolumeClaim, Pod,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};

use crate::inventory::DrainPolicy;
use crate::kube::drain::{classify, Disposition, DrainError};
use crate::kube::{Kube, KubeError};

/// A Longhorn replica as the gate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub name: String,
    pub volume: String,
    pub node: String,
    /// Longhorn's `IsAvailableHealthyReplica`.
    pub healthy: bool,
    pub state: String,
}

/// A Longhorn volume as the gate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub namespace: String,
    pub name: String,
    pub robustness: String,
    /// `namespace/name` of the claim it backs, from `status.kubernetesStatus`.
    pub claim: Option<String>,
}

fn replica_of(o: &DynamicObject) -> Replica {
    let d = &o.data;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    Replica {
        name: o.metadata.name.clone().unwrap_or_default(),
        volume: s(&d["spec"]["volumeName"]),
        node: s(&d["spec"]["nodeID"]),
        healthy: o.metadata.deletion_timestamp.is_none()
            && !s(&d["spec"]["healthyAt"]).is_empty()
            && s(&d["spec"]["failedAt"]).is_empty(),
        state: s(&d["status"]["currentState"]),
    }
}

fn volume_of(o: &DynamicObject) -> Volume {
    let d = &o.data;
    let k = &d["status"]["kubernetesStatus"];
    let claim = match (k["namespace"].as_str(), k["pvcName"].as_str()) {
        (Some(ns), Some(c)) if !c.is_empty() => Some(format!("{ns}/{c}")),
        _ => None,
    };
    Volume {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone().unwrap_or_default(),
        robustness: d["status"]["robustness"].as_str().unwrap_or("").to_string(),
        claim,
    }
}

/// The Longhorn volumes with a replica on `node` and no healthy replica on
/// another schedulable node: one refusal each (pure, for tests).
pub fn longhorn_refusals(
    node: &str,
    volumes: &[Volume],
    replicas: &[Replica],
    schedulable: &dyn Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>) {
    let mut refusals = vec![];
    let mut fine = vec![];
    for v in volumes {
        let mine: Vec<&Replica> = replicas.iter().filter(|r| r.volume == v.name).collect();
        let here: Vec<&&Replica> = mine.iter().filter(|r| r.node == node).collect();
        if here.is_empty() {
            continue;
        }
        let elsewhere: Vec<&&Replica> = mine
            .iter()
            .filter(|r| r.node != node && r.healthy && schedulable(&r.node))
            .collect();
        let what = match &v.claim {
            Some(c) => format!(
                "Longhorn volume {}/{} (claim {c}, {})",
                v.namespace, v.name, v.robustness
            ),
            None => format!(
                "Longhorn volume {}/{} ({})",
                v.namespace, v.name, v.robustness
            ),
        };
        if elsewhere.is_empty() {
            let healthy_here: Vec<&str> = here
                .iter()
                .filter(|r| r.healthy)
                .map(|r| r.name.as_str())
                .collect();
            let others: Vec<String> = mine
                .iter()
                .filter(|r| r.node != node)
                .map(|r| {
                    let why = if !r.healthy {
                        format!(
                            "failed, {}",
                            if r.state.is_empty() {
                                "no state"
                            } else {
                                &r.state
                            }
                        )
                    } else {
                        "its node is cordoned".into()
                    };
                    format!("{} on {} ({why})", r.name, r.node)
                })
                .collect();
            let on_node = if healthy_here.is_empty() {
                format!("no healthy replica at all (the one on {node} is failed too)")
            } else {
                format!(
                    "its only healthy replica on {node} ({})",
                    healthy_here.join(", ")
                )
            };
            refusals.push(format!(
                "{what} has {on_node}{}: draining {node} would take its data offline — wait until Longhorn has rebuilt a replica on another node (kubectl -n {} get replicas.longhorn.io -l longhornvolume={})",
                if others.is_empty() { String::new() } else { format!("; the others: {}", others.join(", ")) },
                v.namespace,
                v.name
            ));
        } else {
            fine.push(format!(
                "{} (healthy on {})",
                v.name,
                elsewhere
                    .iter()
                    .map(|r| r.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    (refusals, fine)
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(x)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|x| x.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > x
            } else {
                v < x
            }
        }
        _ => false,
    }
}

/// A node selector term as the scheduler evaluates it (expressions ANDed).
pub fn term_matches(t: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let exprs = t.match_expressions.as_deref().unwrap_or_default();
    let fields = t.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let v = if r.key == "metadata.name" {
                node.metadata.name.as_deref()
            } else {
                None
            };
            requirement_matches(r, v)
        })
}

/// The nodes a PersistentVolume's required node affinity admits (None when it has none).
pub fn admitted<'a>(pv: &PersistentVolume, nodes: &'a [Node]) -> Option<Vec<&'a Node>> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    Some(
        nodes
            .iter()
            .filter(|n| terms.iter().any(|t| term_matches(t, n)))
            .collect(),
    )
}

fn schedulable(n: &Node) -> bool {
    !n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// Runs the gate for `node`: Ok with what was checked, or the drain's
/// refusal naming every volume that holds it.
pub async fn check(kube: &Kube, node: &str, policy: &DrainPolicy) -> Result<String, KubeError> {
    let nodes_api: Api<Node> = Api::all(kube.client.clone());
    let lp = ListParams::default();
    let nodes = kube.call("list nodes", nodes_api.list(&lp)).await?.items;
    let by_name: BTreeMap<String, &Node> = nodes
        .iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
        .collect();
    let mut refusals = vec![];
    let mut notes = vec![];

    // Pinned volumes of the pods the drain would move.
    let pods_api: Api<Pod> = Api::all(kube.client.clone());
    let plp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = kube
        .call(format!("list pods on {node}"), pods_api.list(&plp))
        .await?
        .items;
    let mut pinned_checked = 0;
    for pod in &pods {
        if classify(pod, policy) != Disposition::Evict {
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pname = pod.metadata.name.clone().unwrap_or_default();
        let claims: Vec<String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .map(|c| c.claim_name.clone())
            })
            .collect();
        for claim in claims {
            pinned_checked += 1;
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(kube.client.clone(), &ns);
            let Some(pvc) = kube
                .call(
                    format!("get PersistentVolumeClaim {ns}/{claim}"),
                    pvcs.get_opt(&claim),
                )
                .await?
            else {
                continue;
            };
            let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
                continue;
            };
            let pvs: Api<PersistentVolume> = Api::all(kube.client.clone());
            let Some(pv) = kube
                .call(
                    format!("get PersistentVolume {pv_name}"),
                    pvs.get_opt(&pv_name),
                )
                .await?
            else {
                continue;
            };
            let Some(ok) = admitted(&pv, &nodes) else {
                continue;
            };
            let elsewhere: Vec<&str> = ok
                .iter()
                .filter(|n| n.metadata.name.as_deref() != Some(node) && schedulable(n))
                .filter_map(|n| n.metadata.name.as_deref())
                .collect();
            if elsewhere.is_empty() {
                let class = pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.storage_class_name.clone())
                    .unwrap_or_default();
                let msg = format!(
                    "pod {ns}/{pname} uses claim {ns}/{claim}, bound to PersistentVolume {pv_name} ({class}) whose node affinity pins it to {node}: the pod cannot run on another node and stays Pending until {node} is back"
                );
                if policy.allow_pinned_volumes {
                    notes.push(format!("{msg} (allowed by [drain] allow_pinned_volumes)"));
                } else {
                    refusals.push(format!("{msg} (allow with [drain] allow_pinned_volumes = true, or move its data first)"));
                }
            }
        }
    }

    // Longhorn.
    let gvk = |kind: &str| GroupVersionKind::gvk("longhorn.io", "v1beta2", kind);
    let vol_ar = ApiResource::from_gvk_with_plural(&gvk("Volume"), "volumes");
    let rep_ar = ApiResource::from_gvk_with_plural(&gvk("Replica"), "replicas");
    let vols_api: Api<DynamicObject> = Api::all_with(kube.client.clone(), &vol_ar);
    let longhorn = match kube
        .call("list volumes.longhorn.io", vols_api.list(&lp))
        .await
    {
        Ok(v) => Some(v.items),
        Err(e) if e.code() == Some(404) => None,
        Err(e) => return Err(e),
    };
    let longhorn_msg = match longhorn {
        None => "Longhorn's CRDs are not served (no volumes.longhorn.io)".to_string(),
        Some(vols) => {
            let reps_api: Api<DynamicObject> = Api::all_with(kube.client.clone(), &rep_ar);
            let reps = kube
                .call("list replicas.longhorn.io", reps_api.list(&lp))
                .await?
                .items;
            let volumes: Vec<Volume> = vols.iter().map(volume_of).collect();
            let replicas: Vec<Replica> = reps.iter().map(replica_of).collect();
            let ok_node = |n: &str| by_name.get(n).is_some_and(|n| schedulable(n));
            let (bad, fine) = longhorn_refusals(node, &volumes, &replicas, &ok_node);
            refusals.extend(bad);
            if fine.is_empty() {
                format!("no Longhorn volume has a replica on {node}")
            } else {
                format!(
                    "{} Longhorn volume(s) with a replica on {node} have a healthy one elsewhere: {}",
                    fine.len(),
                    fine.join(", ")
                )
            }
        }
    };
    if !refusals.is_empty() {
        return Err(DrainError::Storage {
            node: node.to_string(),
            reasons: refusals,
        }
        .into());
    }
    let mut msg = format!(
        "storage: {longhorn_msg}; {}",
        if pinned_checked == 0 {
            format!("no pod to move from {node} uses a PersistentVolumeClaim")
        } else {
            format!("no pod to move from {node} uses a PersistentVolume pinned to it ({pinned_checked} claims checked)")
        }
    );
    for n in notes {
        msg.push_str("; ");
        msg.push_str(&n);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, node: &str, healthy: bool) -> Replica {
        Replica {
            name: name.into(),
            volume: "pvc-1".into(),
            node: node.into(),
            healthy,
            state: if healthy {
                "running".into()
            } else {
                "error".into()
            },
        }
    }

    fn vol() -> Vec<Volume> {
        vec![Volume {
            namespace: "longhorn-system".into(),
            name: "pvc-1".into(),
            robustness: "degraded".into(),
            claim: Some("database/data-postgres-0".into()),
        }]
    }

    #[test]
    fn a_volume_is_refused_only_when_no_healthy_replica_is_on_another_schedulable_node() {
        let all = |_: &str| true;
        let (bad, fine) = longhorn_refusals(
            "w-1",
            &vol(),
            &[
                r("a", "w-1", true),
                r("b", "w-2", false),
                r("c", "w-3", false),
            ],
            &all,
        );
        assert_eq!(fine, Vec::<String>::new());
        assert_eq!(
            bad,
            ["Longhorn volume longhorn-system/pvc-1 (claim database/data-postgres-0, degraded) has its only healthy replica on w-1 (a); \
              the others: b on w-2 (failed, error), c on w-3 (failed, error): draining w-1 would take its data offline — wait until \
              Longhorn has rebuilt a replica on another node (kubectl -n longhorn-system get replicas.longhorn.io -l longhornvolume=pvc-1)"]
        );
        let (bad, fine) = longhorn_refusals(
            "w-1",
            &vol(),
            &[r("a", "w-1", true), r("b", "w-2", true)],
            &all,
        );
        assert!(bad.is_empty());
        assert_eq!(fine, ["pvc-1 (healthy on w-2)"]);
        // A replica on a cordoned node does not count.
        let (bad, _) = longhorn_refusals(
            "w-1",
            &vol(),
            &[r("a", "w-1", true), r("b", "w-2", true)],
            &|n| n != "w-2",
        );
        assert!(
            bad[0].contains("b on w-2 (its node is cordoned)"),
            "{bad:?}"
        );
        // No replica on the node: nothing to check.
        let (bad, fine) = longhorn_refusals("w-9", &vol(), &[r("a", "w-1", true)], &all);
        assert!(bad.is_empty() && fine.is_empty());
    }

    #[test]
    fn node_affinity_terms_match_as_the_scheduler_matches() {
        let node = |name: &str, zone: &str| Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [
                        ("kubernetes.io/hostname".to_string(), name.to_string()),
                        ("zone".to_string(), zone.to_string()),
                    ]
                    .into_iter()
                    .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let term = |key: &str, op: &str, values: &[&str]| NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            match_fields: None,
        };
        let (a, b) = (node("w-1", "x"), node("w-2", "y"));
        assert!(term_matches(
            &term("kubernetes.io/hostname", "In", &["w-1"]),
            &a
        ));
        assert!(!term_matches(
            &term("kubernetes.io/hostname", "In", &["w-1"]),
            &b
        ));
        assert!(
            term_matches(&term("zone", "NotIn", &["x"]), &b)
                && !term_matches(&term("zone", "NotIn", &["x"]), &a)
        );
        assert!(term_matches(&term("zone", "Exists", &[]), &a));
        assert!(
            !term_matches(&term("rack", "Exists", &[]), &a)
                && term_matches(&term("rack", "DoesNotExist", &[]), &a)
        );
        let f = NodeSelectorTerm {
            match_expressions: None,
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec!["w-2".into()]),
            }]),
        };
        assert!(term_matches(&f, &b) && !term_matches(&f, &a));
        assert!(
            !term_matches(&NodeSelectorTerm::default(), &a),
            "an empty term matches nothing"
        );
    }
}
