//! Drain: every pod that must leave a node goes through the policy/v1
//! Eviction subresource, so PodDisruptionBudgets are honoured.
//!
//! DaemonSet pods, mirror (static) pods and finished pods stay. Pods nothing
//! would recreate, and pods with emptyDir data, are refused unless the
//! inventory's `[drain]` allows them — before anything is evicted, like
//! `kubectl drain`. Evictions run a bounded number at a time; a 429 (a budget
//! says no) is asked again every `retry_interval` until the drain deadline,
//! by this loop and not by a hidden retry layer, and on the deadline the error
//! names each pod still there and the budget that kept it. An evicted pod
//! counts as gone when it is deleted or replaced (same name, new UID).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{Eviction, PodDisruptionBudget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams};
use serde::Serialize;

use super::wait::{self, Selectors};
use super::{ns_name, selector, Kube, KubeError};
use crate::inventory::DrainPolicy;

/// What the drain does with one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "why", rename_all = "snake_case")]
pub enum Disposition {
    Evict,
    Skip(String),
    Refuse(String),
}

/// A pod the drain could not move before its deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    /// `namespace/name`
    pub pod: String,
    /// `namespace/name` of the PodDisruptionBudget that refused, if one did.
    pub pdb: Option<String>,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("drain of {node} refused before evicting anything: {}", list_refused(.pods))]
    Refused {
        node: String,
        /// (`namespace/name`, why)
        pods: Vec<(String, String)>,
    },
    #[error("drain of {node} not finished after {}: {}", humantime::format_duration(*after), list_blocked(.blocked))]
    TimedOut {
        node: String,
        after: Duration,
        blocked: Vec<Blocked>,
    },
    /// The storage gate ([`crate::migrate::storage`]): a Longhorn volume
    /// with no healthy replica off the node, or a volume pinned to it.
    #[error("drain of {node} refused before evicting anything: {}", .reasons.join("; "))]
    Storage { node: String, reasons: Vec<String> },
    #[error("drain of {node}: evicting {pod} failed: {error}")]
    Failed {
        node: String,
        pod: String,
        error: String,
    },
}

fn list_refused(pods: &[(String, String)]) -> String {
    pods.iter()
        .map(|(p, why)| format!("pod {p} {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn list_blocked(blocked: &[Blocked]) -> String {
    blocked
        .iter()
        .map(|b| match &b.pdb {
            Some(pdb) => format!(
                "pod {} is kept by PodDisruptionBudget {pdb} ({})",
                b.pod, b.reason
            ),
            None => format!("pod {}: {}", b.pod, b.reason),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Progress of a drain, for the caller's display and Events.
#[derive(Debug, Clone)]
pub enum DrainEvent {
    Evicting(String),
    /// A budget said no; asking again after the retry interval.
    Blocked(Blocked),
    Gone(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub node: String,
    pub evicted: Vec<String>,
    /// (`namespace/name`, why it stays)
    pub skipped: Vec<(String, String)>,
    pub elapsed_ms: u128,
}

/// Decides what happens to `pod` under `policy` (pure, for tests and dry runs).
pub fn classify(pod: &Pod, policy: &DrainPolicy) -> Disposition {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return Disposition::Skip("mirror pod of the kubelet (static pod)".into());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Disposition::Skip(format!("finished ({})", phase.unwrap_or("")));
    }
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if controller.is_some_and(|o| o.kind == "DaemonSet") {
        return Disposition::Skip("DaemonSet pod (it would come straight back)".into());
    }
    if controller.is_none() && !policy.allow_unmanaged {
        return Disposition::Refuse(
            "has no controller: nothing would recreate it (allow with [drain] allow_unmanaged = true)"
                .into(),
        );
    }
    let local: Vec<&str> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter(|v| v.empty_dir.is_some())
        .map(|v| v.name.as_str())
        .collect();
    if !local.is_empty() && !policy.allow_local_storage {
        return Disposition::Refuse(format!(
            "has emptyDir volume(s) {} whose data would be lost (allow with [drain] allow_local_storage = true)",
            local.join(", ")
        ));
    }
    Disposition::Evict
}

/// The Eviction request, built here rather than by `Api::evict`: kube's
/// helper sends neither `kind` nor `apiVersion` in the body.
pub fn eviction_request(namespace: &str, name: &str) -> http::Request<Vec<u8>> {
    let eviction = Eviction {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        delete_options: None,
    };
    let body = serde_json::to_vec(&eviction).expect("an Eviction serializes");
    http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/{name}/eviction"
    ))
    .header(http::header::CONTENT_TYPE, "application/json")
    .header(http::header::ACCEPT, "application/json")
    .body(body)
    .expect("a valid request")
}

/// The budget's name from the 429's cause ("The disruption budget X needs ...").
fn pdb_from_status(status: &kube::core::Status) -> Option<String> {
    status
        .details
        .as_ref()?
        .causes
        .iter()
        .find(|c| c.reason == "DisruptionBudget")
        .and_then(|c| c.message.strip_prefix("The disruption budget "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(String::from)
}

enum Failure {
    Blocked(Blocked),
    Fatal(String),
}

impl Kube {
    /// The PodDisruptionBudget in the pod's namespace whose selector covers it.
    async fn pdb_for(&self, pod: &Pod) -> Option<PodDisruptionBudget> {
        let ns = pod.metadata.namespace.as_deref()?;
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), ns);
        let pdbs = self
            .call(
                "list PodDisruptionBudgets",
                api.list(&ListParams::default()),
            )
            .await
            .ok()?;
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        pdbs.items.into_iter().find(|b| {
            b.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|s| selector::matches(s, &labels))
        })
    }

    /// Evicts one pod, asking again on 429 until `until`, then waits for it
    /// to be gone or replaced.
    async fn evict_one(
        &self,
        pod: &Pod,
        policy: &DrainPolicy,
        until: Instant,
        progress: &(dyn Fn(DrainEvent) + Send + Sync),
    ) -> Result<(), Failure> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let full = format!("{ns}/{name}");
        let uid = pod.metadata.uid.clone();
        progress(DrainEvent::Evicting(full.clone()));
        let mut pdb: Option<String> = None;
        let mut last: Option<Blocked> = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Blocked(last.unwrap_or(Blocked {
                    pod: full,
                    pdb,
                    reason: "the drain deadline passed before the eviction was asked".into(),
                })));
            }
            let timeout = self.api_timeout.min(left);
            let answer = tokio::time::timeout(
                timeout,
                self.client
                    .request::<serde_json::Value>(eviction_request(&ns, &name)),
            )
            .await;
            let reason = match answer {
                Ok(Ok(_)) => break,
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                    progress(DrainEvent::Gone(full.clone()));
                    return Ok(());
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 429 => {
                    if pdb.is_none() {
                        pdb = match pdb_from_status(&s) {
                            Some(n) => Some(format!("{ns}/{n}")),
                            None => self.pdb_for(pod).await.map(|b| ns_name(&b.metadata)),
                        };
                    }
                    let cause = s
                        .details
                        .as_ref()
                        .and_then(|d| d.causes.first())
                        .map(|c| c.message.clone())
                        .unwrap_or_else(|| s.message.clone());
                    let b = Blocked {
                        pod: full.clone(),
                        pdb: pdb.clone(),
                        reason: cause,
                    };
                    progress(DrainEvent::Blocked(b.clone()));
                    b
                }
                // A server-side hiccup or a slow answer: ask again until the deadline.
                Ok(Err(kube::Error::Api(s))) if s.code >= 500 => Blocked {
                    pod: full.clone(),
                    pdb: pdb.clone(),
                    reason: format!(
                        "the API server answered {} {}: {}",
                        s.code, s.reason, s.message
                    ),
                },
                Ok(Err(kube::Error::Api(s))) => {
                    return Err(Failure::Fatal(format!(
                        "{} {}: {}",
                        s.code, s.reason, s.message
                    )))
                }
                Ok(Err(e)) => Blocked {
                    pod: full.clone(),
                    pdb: pdb.clone(),
                    reason: self.error(format!("evict {full}"), e).to_string(),
                },
                Err(_) => Blocked {
                    pod: full.clone(),
                    pdb: pdb.clone(),
                    reason: format!("no answer to the eviction within {timeout:?}"),
                },
            };
            let left = until.saturating_duration_since(Instant::now());
            last = Some(reason);
            tokio::time::sleep(policy.retry_interval.min(left)).await;
        }
        // Accepted: wait until it is deleted or replaced by a pod with a new UID.
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let sel = Selectors {
            fields: Some(format!("metadata.name={name}")),
            labels: None,
        };
        let left = until.saturating_duration_since(Instant::now());
        let gone = wait::until(
            self,
            &api,
            &sel,
            &format!("wait for {full} to go"),
            left.max(Duration::from_millis(1)),
            |pods: &BTreeMap<String, Pod>| match pods.values().next() {
                None => Ok(()),
                Some(p) if p.metadata.uid != uid => Ok(()),
                Some(_) => Err("evicted, still terminating".into()),
            },
        )
        .await;
        match gone {
            Ok(()) => {
                progress(DrainEvent::Gone(full));
                Ok(())
            }
            Err(e) => Err(Failure::Blocked(Blocked {
                pod: full,
                pdb: None,
                reason: match e {
                    KubeError::WaitTimedOut { last, .. } => last,
                    other => other.to_string(),
                },
            })),
        }
    }

    /// Drains `node`; see the module documentation.
    pub async fn drain(
        &self,
        node: &str,
        policy: &DrainPolicy,
        deadline: Duration,
        progress: &(dyn Fn(DrainEvent) + Send + Sync),
    ) -> Result<DrainReport, KubeError> {
        let started = Instant::now();
        let until = started + deadline;
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = self
            .call(format!("list pods on {node}"), api.list(&lp))
            .await?;
        let mut evict = vec![];
        let mut skipped = vec![];
        let mut refused = vec![];
        for pod in pods.items {
            let id = ns_name(&pod.metadata);
            match classify(&pod, policy) {
                Disposition::Evict => evict.push(pod),
                Disposition::Skip(why) => skipped.push((id, why)),
                Disposition::Refuse(why) => refused.push((id, why)),
            }
        }
        if !refused.is_empty() {
            return Err(DrainError::Refused {
                node: node.to_string(),
                pods: refused,
            }
            .into());
        }
        let names: Vec<String> = evict.iter().map(|p| ns_name(&p.metadata)).collect();
        let results: Vec<(String, Result<(), Failure>)> = futures::stream::iter(evict.iter())
            .map(|pod| async move {
                (
                    ns_name(&pod.metadata),
                    self.evict_one(pod, policy, until, progress).await,
                )
            })
            .buffer_unordered(policy.parallel_evictions.max(1))
            .collect()
            .await;
        let mut blocked = vec![];
        for (pod, r) in &results {
            match r {
                Ok(()) => {}
                Err(Failure::Fatal(error)) => {
                    return Err(DrainError::Failed {
                        node: node.to_string(),
                        pod: pod.clone(),
                        error: error.clone(),
                    }
                    .into())
                }
                Err(Failure::Blocked(b)) => blocked.push(b.clone()),
            }
        }
        if !blocked.is_empty() {
            blocked.sort_by(|a, b| a.pod.cmp(&b.pod));
            return Err(DrainError::TimedOut {
                node: node.to_string(),
                after: deadline,
                blocked,
            }
            .into());
        }
        Ok(DrainReport {
            node: node.to_string(),
            evicted: names,
            skipped,
            elapsed_ms: started.elapsed().as_millis(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra_meta: serde_json::Value, volumes: serde_json::Value, phase: &str) -> Pod {
        let mut meta = json!({"name": "p", "namespace": "ns"});
        meta.as_object_mut()
            .unwrap()
            .extend(extra_meta.as_object().unwrap().clone());
        serde_json::from_value(json!({"metadata": meta, "spec": {"containers": [], "volumes": volumes}, "status": {"phase": phase}}))
            .unwrap()
    }

    fn owned_by(kind: &str) -> serde_json::Value {
        json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": "o", "uid": "u", "controller": true}]})
    }

    #[test]
    fn what_stays_what_goes_and_what_is_refused() {
        let safe = DrainPolicy::default();
        let p = |m, v, ph| classify(&pod(m, v, ph), &safe);
        assert_eq!(
            p(owned_by("ReplicaSet"), json!([]), "Running"),
            Disposition::Evict
        );
        assert_eq!(
            p(owned_by("StatefulSet"), json!([]), "Running"),
            Disposition::Evict
        );
        assert!(
            matches!(p(owned_by("DaemonSet"), json!([]), "Running"), Disposition::Skip(w) if w.contains("DaemonSet"))
        );
        let mirror = json!({"annotations": {"kubernetes.io/config.mirror": "abc"}});
        assert!(
            matches!(p(mirror, json!([]), "Running"), Disposition::Skip(w) if w.contains("mirror"))
        );
        // Finished pods stay even without a controller.
        assert!(
            matches!(p(json!({}), json!([]), "Succeeded"), Disposition::Skip(w) if w.contains("Succeeded"))
        );
        assert!(
            matches!(p(json!({}), json!([]), "Running"), Disposition::Refuse(w) if w.contains("allow_unmanaged"))
        );
        let scratch = json!([{"name": "scratch", "emptyDir": {}}]);
        assert!(
            matches!(p(owned_by("ReplicaSet"), scratch.clone(), "Running"), Disposition::Refuse(w) if w.contains("scratch") && w.contains("allow_local_storage"))
        );
        // A non-controller owner reference does not make a pod managed.
        let weak = json!({"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u"}]});
        assert!(matches!(
            p(weak, json!([]), "Running"),
            Disposition::Refuse(_)
        ));

        let permissive = DrainPolicy {
            allow_unmanaged: true,
            allow_local_storage: true,
            ..DrainPolicy::default()
        };
        assert_eq!(
            classify(&pod(json!({}), scratch, "Running"), &permissive),
            Disposition::Evict
        );
    }

    #[test]
    fn the_budget_is_read_from_the_429_cause() {
        let status: kube::core::Status = serde_json::from_value(json!({"status": "Failure", "code": 429, "reason": "TooManyRequests", "message": "Cannot evict pod as it would violate the pod's disruption budget.",
            "details": {"causes": [{"reason": "DisruptionBudget", "message": "The disruption budget web-pdb needs 2 healthy pods and has 2 currently"}]}})).unwrap();
        assert_eq!(pdb_from_status(&status).as_deref(), Some("web-pdb"));
        let bare: kube::core::Status = serde_json::from_value(json!({"status": "Failure", "code": 429, "reason": "TooManyRequests", "message": "slow down"})).unwrap();
        assert_eq!(pdb_from_status(&bare), None);
    }
}
