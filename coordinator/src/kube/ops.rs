//! The migration's own API operations: the node label that admits Cilium's
//! DaemonSet, recreating a node's pods on the new CNI (Repod), and the pause
//! annotation on the migration Lease (`cnishift pause` / `resume`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{ns_name, Kube, KubeError};

/// On the migration Lease while the run is paused: who paused it and when.
pub const PAUSE_ANNOTATION: &str = "cnishift.io/paused";

/// A pod Repod recreates: not hostNetwork (those keep the host's network),
/// not a mirror pod, not finished, and owned by a controller that recreates it.
pub fn repod_candidate(p: &Pod) -> bool {
    let spec = p.spec.clone().unwrap_or_default();
    let mirror = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let finished = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let controlled = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true));
    !spec.host_network.unwrap_or(false) && !mirror && !finished && controlled
}

impl Kube {
    /// Sets `key=value` on the node (a no-op when it is already there).
    pub async fn label_node(&self, node: &str, key: &str, value: &str) -> Result<bool, KubeError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let n = self.call(format!("get node {node}"), api.get(node)).await?;
        if n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
            == Some(value)
        {
            return Ok(false);
        }
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.call(
            format!("label node {node} {key}={value}"),
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        Ok(true)
    }

    /// Removes the label `key` from the node.
    pub async fn unlabel_node(&self, node: &str, key: &str) -> Result<(), KubeError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"metadata": {"labels": {key: null}}});
        self.call(
            format!("remove label {key} from node {node}"),
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    /// Deletes the node's pods that [`repod_candidate`] selects and waits
    /// until every pod of theirs is gone and the non-hostNetwork pods on the
    /// node are Ready again; returns how many were recreated.
    pub async fn repod(
        &self,
        node: &str,
        deadline: Duration,
        poll: Duration,
    ) -> Result<usize, KubeError> {
        let until = Instant::now() + deadline;
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = self
            .call(format!("list pods on {node}"), api.list(&lp))
            .await?;
        let mut deleted = BTreeSet::new();
        for p in pods.items.iter().filter(|p| repod_candidate(p)) {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            let nsapi: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match self
                .call(
                    format!("delete pod {ns}/{name}"),
                    nsapi.delete(&name, &DeleteParams::default()),
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Some(404) => {}
                Err(e) => return Err(e),
            }
            deleted.insert(p.metadata.uid.clone().unwrap_or_default());
        }
        let count = deleted.len();
        loop {
            let pods = self
                .call(format!("list pods on {node}"), api.list(&lp))
                .await?;
            let old: Vec<String> = pods
                .items
                .iter()
                .filter(|p| deleted.contains(p.metadata.uid.as_deref().unwrap_or("")))
                .map(|p| ns_name(&p.metadata))
                .collect();
            let unready: Vec<String> = pods
                .items
                .iter()
                .filter(|p| repod_candidate(p) && !super::cilium::pod_ready(p))
                .map(|p| ns_name(&p.metadata))
                .collect();
            if old.is_empty() && unready.is_empty() {
                return Ok(count);
            }
            if Instant::now() >= until {
                let mut last = vec![];
                if !old.is_empty() {
                    last.push(format!("still there: {}", old.join(", ")));
                }
                if !unready.is_empty() {
                    last.push(format!("not Ready: {}", unready.join(", ")));
                }
                return Err(KubeError::WaitTimedOut {
                    what: format!("recreate the pods on {node}"),
                    after: deadline,
                    last: last.join("; "),
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Whether the migration Lease carries the pause annotation; None when there is no Lease.
    pub async fn paused(&self, ns: &str, name: &str) -> Result<Option<Option<String>>, KubeError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let l = self
            .call(format!("get Lease {ns}/{name}"), api.get_opt(name))
            .await?;
        Ok(l.map(|l| {
            l.metadata
                .annotations
                .and_then(|a| a.get(PAUSE_ANNOTATION).cloned())
        }))
    }

    /// Sets (`Some(who)`) or removes (`None`) the pause annotation; the
    /// update carries the resourceVersion it read and retries on a conflict
    /// with the holder's renewal. Err when there is no Lease (no run).
    pub async fn set_paused(
        &self,
        ns: &str,
        name: &str,
        by: Option<String>,
    ) -> Result<(), KubeError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        for _ in 0..10 {
            let Some(mut l) = self
                .call(format!("get Lease {ns}/{name}"), api.get_opt(name))
                .await?
            else {
                return Err(KubeError::Api {
                    what: format!("get Lease {ns}/{name}"),
                    code: 404,
                    reason: "NotFound".into(),
                    message: "no migration is running (the migration Lease does not exist)".into(),
                });
            };
            let ann = l.metadata.annotations.get_or_insert_with(Default::default);
            match &by {
                Some(who) => {
                    ann.insert(PAUSE_ANNOTATION.into(), who.clone());
                }
                None => {
                    ann.remove(PAUSE_ANNOTATION);
                }
            }
            match self
                .call(
                    format!("update Lease {ns}/{name}"),
                    api.replace(name, &PostParams::default(), &l),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Some(409) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KubeError::Api {
            what: format!("update Lease {ns}/{name}"),
            code: 409,
            reason: "Conflict".into(),
            message: "the Lease kept changing under ten attempts".into(),
        })
    }
}
