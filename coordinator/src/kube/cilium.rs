//! The Cilium agent: its DaemonSet `cilium` (pods labelled `k8s-app=cilium`)
//! in the namespace the inventory names.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use super::wait::{self, Selectors};
use super::{Kube, KubeError};

pub const DAEMONSET: &str = "cilium";
pub const LABEL: &str = "k8s-app=cilium";

/// Whether `pod` is Ready (condition Ready=True, not being deleted).
pub fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn owned_by_cilium(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet" && o.name == DAEMONSET)
}

impl Kube {
    /// Waits (watching) until the Cilium agent pod on `node` is Ready.
    pub async fn wait_cilium_ready(
        &self,
        node: &str,
        namespace: &str,
        deadline: Duration,
    ) -> Result<(), KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let sel = Selectors {
            fields: Some(format!("spec.nodeName={node}")),
            labels: Some(LABEL.into()),
        };
        wait::until(
            self,
            &api,
            &sel,
            &format!("wait for the Cilium agent on {node} to be Ready"),
            deadline,
            |pods| {
                let ours: Vec<&Pod> = pods.values().filter(|p| owned_by_cilium(p)).collect();
                if ours.iter().any(|p| pod_ready(p)) {
                    return Ok(());
                }
                match ours.first() {
                    None => Err(format!(
                        "no pod of DaemonSet {namespace}/{DAEMONSET} ({LABEL}) on {node} yet"
                    )),
                    Some(p) => Err(format!(
                        "pod {namespace}/{} is {} and not Ready",
                        p.metadata.name.as_deref().unwrap_or("?"),
                        p.status
                            .as_ref()
                            .and_then(|s| s.phase.as_deref())
                            .unwrap_or("Unknown")
                    )),
                }
            },
        )
        .await
    }

    /// The Cilium DaemonSet, if it exists.
    pub async fn cilium_daemonset(&self, namespace: &str) -> Result<Option<DaemonSet>, KubeError> {
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), namespace);
        self.call(
            format!("get DaemonSet {namespace}/{DAEMONSET}"),
            api.get_opt(DAEMONSET),
        )
        .await
    }
}
