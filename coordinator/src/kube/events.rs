//! Events on the Node for each migration step, so `kubectl describe node`
//! (and `kubectl get events`) tell the story of the migration next to the
//! kubelet's own events.

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use super::{Kube, KubeError};

/// Shown as the Event's "From".
pub const CONTROLLER: &str = "cnishift.io/coordinator";
/// Node events live in `default`, where the kubelet puts its own.
pub const NAMESPACE: &str = "default";

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

/// One step's Event, before it is sent.
#[derive(Debug, Clone)]
pub struct Step<'a> {
    /// CamelCase, e.g. `Cordoned`, `DrainBlocked`.
    pub reason: &'a str,
    /// What cnishift did, e.g. `Cordon`, `Drain`.
    pub action: &'a str,
    pub note: String,
    pub kind: Kind,
}

/// The Event for `step` on `node`, reported by `instance` (the lock holder).
pub fn event_for(node: &Node, step: &Step, instance: &str) -> Event {
    let name = node.metadata.name.clone().unwrap_or_default();
    let now = Timestamp::now();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name),
            uid: node.metadata.uid.clone(),
            ..ObjectReference::default()
        }),
        reason: Some(step.reason.into()),
        action: Some(step.action.into()),
        // The API limits a note to 1 kB.
        note: Some(step.note.chars().take(1000).collect()),
        type_: Some(
            match step.kind {
                Kind::Normal => "Normal",
                Kind::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(now)),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Event::default()
    }
}

impl Kube {
    /// Records `step` on `node`. The caller decides whether a failure to
    /// record matters (it never should stop a migration).
    pub async fn record(
        &self,
        node: &str,
        step: Step<'_>,
        instance: &str,
    ) -> Result<(), KubeError> {
        // An Event is about the Node object, by name and uid. A Node's uid
        // never changes while it exists, so it is read once per node (a
        // migration records two Events per step: one GET each would double
        // the API calls between every two steps).
        let cached = self.node_uids.lock().expect("uids").get(node).cloned();
        let n = match cached {
            Some(uid) => Node {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    uid: Some(uid),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            },
            None => {
                let nodes: Api<Node> = Api::all(self.client.clone());
                let n = self
                    .call(format!("get node {node}"), nodes.get(node))
                    .await?;
                if let Some(uid) = &n.metadata.uid {
                    self.node_uids
                        .lock()
                        .expect("uids")
                        .insert(node.to_string(), uid.clone());
                }
                n
            }
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        self.call(
            format!("record event {} on node {node}", step.reason),
            api.create(&PostParams::default(), &event_for(&n, &step, instance)),
        )
        .await
        .map(|_| ())
    }

    /// [`Kube::record`], logging instead of failing.
    pub async fn record_or_warn(&self, node: &str, step: Step<'_>, instance: &str) {
        let reason = step.reason.to_string();
        if let Err(e) = self.record(node, step, instance).await {
            tracing::warn!(node, reason, "could not record the event: {e}");
        }
    }
}
