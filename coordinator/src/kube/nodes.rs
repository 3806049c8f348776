//! Cordon and uncordon that remember an admin's cordon, and the wait for a
//! node to be Ready.
//!
//! Whether the node was already unschedulable before cnishift touched it is
//! written on the Node itself (annotation [`PRIOR_ANNOTATION`]) in the same
//! patch that cordons it, so the memory survives a coordinator crash: a
//! resumed run does not mistake its own cordon for the admin's.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::wait::{self, Selectors};
use super::{Kube, KubeError};

/// `"true"` when the node was cordoned before cnishift cordoned it.
pub const PRIOR_ANNOTATION: &str = "cnishift.io/unschedulable-before-migration";

/// What cordon found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cordoned {
    /// The node was unschedulable before cnishift's first cordon.
    pub was_cordoned: bool,
    /// This call changed the node (false when resuming).
    pub changed: bool,
}

/// What uncordon did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncordoned {
    /// Made schedulable again.
    Uncordoned,
    /// Left cordoned: an admin had cordoned it before the migration.
    LeftCordonedByAdmin,
    /// cnishift had not cordoned it; nothing done.
    NotOurs,
}

/// Whether a node is Ready, with the reason when it is not.
pub fn node_ready(node: &Node) -> Result<(), String> {
    let name = node.metadata.name.as_deref().unwrap_or("?");
    let cond = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match cond {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "node {name} is {}: {} {}",
            if c.status == "False" {
                "NotReady"
            } else {
                "Unknown"
            },
            c.reason.as_deref().unwrap_or(""),
            c.message.as_deref().unwrap_or("")
        )
        .trim_end()
        .to_string()),
        None => Err(format!("node {name} reports no Ready condition yet")),
    }
}

fn unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn prior(node: &Node) -> Option<&str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PRIOR_ANNOTATION))
        .map(String::as_str)
}

impl Kube {
    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Marks `node` unschedulable, recording whether it already was. The patch
    /// carries the resourceVersion it was computed from; on a conflict (409)
    /// it reads again and retries, a bounded number of times.
    pub async fn cordon(&self, node: &str) -> Result<Cordoned, KubeError> {
        let api = self.nodes();
        let mut attempts = 0;
        loop {
            let current = self.call(format!("get node {node}"), api.get(node)).await?;
            let was = match prior(&current) {
                Some(v) => v == "true",
                None => unschedulable(&current),
            };
            if prior(&current).is_some() && unschedulable(&current) {
                return Ok(Cordoned {
                    was_cordoned: was,
                    changed: false,
                });
            }
            let patch = json!({
                "metadata": {
                    "resourceVersion": current.metadata.resource_version,
                    "annotations": { PRIOR_ANNOTATION: was.to_string() },
                },
                "spec": { "unschedulable": true },
            });
            match self
                .call(
                    format!("cordon node {node}"),
                    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
            {
                Ok(_) => {
                    return Ok(Cordoned {
                        was_cordoned: was,
                        changed: true,
                    })
                }
                Err(e) if e.code() == Some(409) && attempts < 5 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Undoes [`Kube::cordon`]: schedulable again unless an admin had
    /// cordoned the node before, in which case it stays cordoned. The memory
    /// annotation is removed either way.
    pub async fn uncordon(&self, node: &str) -> Result<Uncordoned, KubeError> {
        let api = self.nodes();
        let mut attempts = 0;
        loop {
            let current = self.call(format!("get node {node}"), api.get(node)).await?;
            let outcome = match prior(&current) {
                None => return Ok(Uncordoned::NotOurs),
                Some("true") => Uncordoned::LeftCordonedByAdmin,
                Some(_) => Uncordoned::Uncordoned,
            };
            let spec = if outcome == Uncordoned::Uncordoned {
                json!({ "unschedulable": null })
            } else {
                json!({})
            };
            let patch = json!({
                "metadata": {
                    "resourceVersion": current.metadata.resource_version,
                    "annotations": { PRIOR_ANNOTATION: null },
                },
                "spec": spec,
            });
            match self
                .call(
                    format!("uncordon node {node}"),
                    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
            {
                Ok(_) => return Ok(outcome),
                Err(e) if e.code() == Some(409) && attempts < 5 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits (watching) until `node` is Ready, at most `deadline`.
    pub async fn wait_node_ready(&self, node: &str, deadline: Duration) -> Result<(), KubeError> {
        let sel = Selectors {
            fields: Some(format!("metadata.name={node}")),
            labels: None,
        };
        wait::until(
            self,
            &self.nodes(),
            &sel,
            &format!("wait for node {node} to be Ready"),
            deadline,
            |nodes| match nodes.values().next() {
                Some(n) => node_ready(n),
                None => Err(format!("node {node} does not exist")),
            },
        )
        .await
    }
}
