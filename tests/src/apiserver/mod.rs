//! A simulated Kubernetes API server for the lab (never linked into the
//! shipped binaries). It speaks the real HTTP/JSON API closely enough that the
//! machine's own `kubectl` works against it: legacy discovery, `/version`,
//! Nodes (get, list, watch with resourceVersions and bookmarks, patch in merge,
//! strategic-merge and JSON-patch forms, server-side tables for `kubectl get`),
//! Pods with the policy/v1 eviction subresource and real PodDisruptionBudget
//! arithmetic (429 with the body a real server sends), DaemonSets and
//! ReplicaSets (an evicted ReplicaSet pod is replaced on a schedulable node),
//! Deployments (a ReplicaSet and its pods), coordination.k8s.io Leases with
//! resourceVersion conflicts (409), events.k8s.io/v1 Events (also served as
//! core/v1 Events, as a real server does, so `kubectl describe node` shows
//! them), PersistentVolumes and PersistentVolumeClaims, ConfigMaps,
//! networking.k8s.io/v1 NetworkPolicies, CustomResourceDefinitions and the
//! custom resources of the installed ones (Longhorn's volumes and replicas,
//! with their CRDs' printer columns), and Status errors with the reasons a
//! real server sends.
//!
//! The lab drives node and pod readiness through [`ApiServer::set_node_ready`]
//! and [`ApiServer::set_pod_ready`]; the server itself has no timers. Faults
//! (slow answers, 5xx/409 answers, watch streams cut mid-way) are injected
//! through [`ApiServer::faults`].
//!
//! Not simulated: authentication/authorisation (any token is accepted), TLS
//! (plain HTTP), protobuf, server-side apply, and controllers other than the
//! ReplicaSet replacement of an evicted pod.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

mod custom;
mod discovery;
mod faults;
mod longhorn;
mod objects;
mod patch;
mod read;
mod store;
mod tables;
mod watch;
mod workload;
mod write;

use custom::*;
use discovery::*;
pub use faults::Faults;
use faults::*;
pub use longhorn::LONGHORN_NS;
use objects::*;
pub use objects::{node_object, Owner, Pod};
use patch::*;
use read::*;
use store::*;
use tables::*;
use watch::*;
pub use workload::LabNode;
use write::*;

/// The server's state; cheap to clone (shared).
#[derive(Clone)]
pub struct ApiServer {
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) changes: broadcast::Sender<Change>,
    pub(crate) faults: Arc<Faults>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    pub fn new() -> Self {
        let (changes, _) = broadcast::channel(4096);
        ApiServer {
            store: Arc::new(Mutex::new(Store {
                rv: 100,
                objects: BTreeMap::new(),
                history: vec![],
                next_pod: 0,
            })),
            changes,
            faults: Arc::new(Faults::default()),
        }
    }

    /// The fault switches for this server.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/version", get(version))
            .route("/api", get(api_versions))
            .route("/apis", get(api_groups))
            .route("/api/v1", get(core_resources))
            .route("/apis/apps/v1", get(apps_resources))
            .route("/apis/policy/v1", get(policy_resources))
            .route("/apis/coordination.k8s.io/v1", get(coordination_resources))
            .route("/apis/events.k8s.io/v1", get(events_resources))
            .route("/apis/networking.k8s.io/v1", get(networking_resources))
            .route(
                "/apis/apiextensions.k8s.io/v1",
                get(apiextensions_resources),
            )
            .route(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                get(list_all::<CRDS>),
            )
            .route(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}",
                get(get_cluster::<CRDS>),
            )
            .route(
                "/apis/networking.k8s.io/v1/networkpolicies",
                get(list_all::<NETPOLS>),
            )
            .route(
                "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
                get(list_in::<NETPOLS>),
            )
            .route(
                "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}",
                get(get_in::<NETPOLS>),
            )
            .route("/api/v1/persistentvolumes", get(list_all::<PVS>))
            .route("/api/v1/persistentvolumes/{name}", get(get_cluster::<PVS>))
            .route("/api/v1/configmaps", get(list_all::<CONFIGMAPS>))
            .route(
                "/api/v1/namespaces/{ns}/configmaps",
                get(list_in::<CONFIGMAPS>),
            )
            .route(
                "/api/v1/namespaces/{ns}/configmaps/{name}",
                get(get_in::<CONFIGMAPS>),
            )
            .route("/apis/{group}/{version}", get(custom_resources))
            .route(
                "/apis/longhorn.io/v1beta2/volumes",
                get(custom_list_all::<LH_VOLUMES>),
            )
            .route(
                "/apis/longhorn.io/v1beta2/namespaces/{ns}/volumes",
                get(custom_list_in::<LH_VOLUMES>),
            )
            .route(
                "/apis/longhorn.io/v1beta2/namespaces/{ns}/volumes/{name}",
                get(custom_get::<LH_VOLUMES>),
            )
            .route(
                "/apis/longhorn.io/v1beta2/replicas",
                get(custom_list_all::<LH_REPLICAS>),
            )
            .route(
                "/apis/longhorn.io/v1beta2/namespaces/{ns}/replicas",
                get(custom_list_in::<LH_REPLICAS>),
            )
            .route(
                "/apis/longhorn.io/v1beta2/namespaces/{ns}/replicas/{name}",
                get(custom_get::<LH_REPLICAS>),
            )
            .route("/apis/apps/v1/daemonsets", get(list_all::<DAEMONSETS>))
            .route(
                "/apis/apps/v1/namespaces/{ns}/daemonsets",
                get(list_in::<DAEMONSETS>),
            )
            .route("/apis/apps/v1/deployments", get(list_all::<DEPLOYMENTS>))
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments",
                get(list_in::<DEPLOYMENTS>),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
                get(get_in::<DEPLOYMENTS>),
            )
            .route("/apis/apps/v1/statefulsets", get(list_all::<STATEFULSETS>))
            .route(
                "/apis/apps/v1/namespaces/{ns}/statefulsets",
                get(list_in::<STATEFULSETS>),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}",
                get(get_in::<STATEFULSETS>),
            )
            .route("/api/v1/persistentvolumeclaims", get(list_all::<PVCS>))
            .route(
                "/api/v1/namespaces/{ns}/persistentvolumeclaims",
                get(list_in::<PVCS>),
            )
            .route(
                "/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}",
                get(get_in::<PVCS>),
            )
            .route("/apis/apps/v1/replicasets", get(list_all::<REPLICASETS>))
            .route(
                "/apis/apps/v1/namespaces/{ns}/replicasets",
                get(list_in::<REPLICASETS>),
            )
            .route(
                "/apis/coordination.k8s.io/v1/leases",
                get(list_all::<LEASES>),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                get(list_in::<LEASES>).post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                get(get_in::<LEASES>)
                    .put(replace_lease)
                    .delete(delete_lease),
            )
            .route("/apis/events.k8s.io/v1/events", get(list_all::<EVENTS>))
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events",
                get(list_in::<EVENTS>).post(create_event),
            )
            .route("/api/v1/events", get(list_core_events))
            .route("/api/v1/namespaces/{ns}/events", get(list_core_events_in))
            .route("/api/v1/nodes", get(list_all::<NODES>))
            .route("/api/v1/nodes/{name}", get(get_node).patch(patch_node))
            .route("/api/v1/namespaces", get(list_all::<NAMESPACES>))
            .route("/api/v1/namespaces/{name}", get(get_cluster::<NAMESPACES>))
            .route("/api/v1/pods", get(list_all::<PODS>))
            .route("/api/v1/namespaces/{ns}/pods", get(list_in::<PODS>))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_in::<PODS>).delete(delete_pod),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/eviction",
                post(evict_pod),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/daemonsets/{name}",
                get(get_in::<DAEMONSETS>),
            )
            .route(
                "/apis/apps/v1/namespaces/{ns}/replicasets/{name}",
                get(get_in::<REPLICASETS>),
            )
            .route(
                "/apis/policy/v1/poddisruptionbudgets",
                get(list_all::<PDBS>),
            )
            .route(
                "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
                get(list_in::<PDBS>),
            )
            .route(
                "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}",
                get(get_in::<PDBS>),
            )
            .fallback(|| async {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource".into(),
                    json!({}),
                )
            })
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                inject_faults,
            ))
            .with_state(self)
    }

    /// Serves on a fresh loopback port in the current runtime; returns the address.
    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let me = self.clone();
        tokio::spawn(async move { me.serve(listener).await });
        addr
    }

    /// Serves on `listener` until the runtime stops.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        // Go's net package sets TCP_NODELAY on every connection, so a real API
        // server sends each watch event at once; so does this one.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, self.router()).await
    }
}

/// A Status error body, as the real server sends it.
pub(crate) fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub(crate) fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        json!({"name": name, "kind": resource}),
    )
}

pub(crate) fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

pub(crate) fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, json!({}))
}

pub(crate) fn conflict(resource: &str, name: &str) -> Response {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
    )
}

/// A kubeconfig for `server` (`http://ADDR`), written for kubectl and kube-rs.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cnishift-lab\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: cnishift-lab\n  user:\n    token: lab\ncontexts:\n- name: cnishift-lab\n  context:\n    cluster: cnishift-lab\n    user: cnishift-lab\n\
         current-context: cnishift-lab\n"
    )
}
