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
//! them), and Status errors with the reasons a real server sends.
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

/// (resource, namespace — empty for cluster-scoped, name)
type Key = (&'static str, String, String);

/// One change, as a watch stream sends it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    resource: &'static str,
    object: Value,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, for watches that resume from an older resourceVersion.
    history: Vec<Change>,
    /// Suffix counter for replacement pods.
    next_pod: u64,
}

impl Store {
    fn list(&self, resource: &str, ns: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| *r == resource && ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v)
            .collect()
    }
    fn get(&self, resource: &'static str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource, ns.to_string(), name.to_string()))
    }
}

/// The server's state; cheap to clone (shared).
#[derive(Clone)]
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
    faults: Arc<Faults>,
}

/// Faults the tests inject: every answer delayed, the next matching requests
/// answered with an error status, open watch streams cut.
#[derive(Default)]
pub struct Faults {
    delay: Mutex<Duration>,
    rules: Mutex<Vec<FailRule>>,
    cut: Mutex<Option<broadcast::Sender<()>>>,
    requests: std::sync::atomic::AtomicU64,
    /// (method, path?query) of every request, in order.
    log: Mutex<Vec<(String, String)>>,
}

struct FailRule {
    method: String,
    path_contains: String,
    status: StatusCode,
    remaining: u32,
}

impl Faults {
    /// Every answer from now on waits `d` first (zero: back to normal).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("faults") = d;
    }
    /// The next `times` requests with `method` (or any, with "*") whose path
    /// contains `path_contains` are answered with `status` and a Status body.
    pub fn fail_next(&self, method: &str, path_contains: &str, status: u16, times: u32) {
        self.rules.lock().expect("faults").push(FailRule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            status: StatusCode::from_u16(status).expect("valid status"),
            remaining: times,
        });
    }
    /// Ends every open watch stream now, as a dropped connection or an API
    /// server restart would; the client sees the stream end.
    pub fn cut_watches(&self) {
        if let Some(tx) = self.cut.lock().expect("faults").as_ref() {
            let _ = tx.send(());
        }
    }
    /// Requests served so far (to count a client's calls).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// How many requests had `method` and a path containing `path_contains`.
    pub fn requests_matching(&self, method: &str, path_contains: &str) -> usize {
        self.log
            .lock()
            .expect("faults")
            .iter()
            .filter(|(m, p)| {
                m == method && p.split('?').next().unwrap_or("").contains(path_contains)
            })
            .count()
    }
    /// Every request so far as (method, path?query), in order.
    pub fn request_log(&self) -> Vec<(String, String)> {
        self.log.lock().expect("faults").clone()
    }
    /// The next `times` matching requests get `200 OK` with a body that is not JSON.
    pub fn garbage_next(&self, method: &str, path_contains: &str, times: u32) {
        self.fail_next(method, path_contains, 200, times);
    }
    fn take_failure(&self, method: &str, path: &str) -> Option<StatusCode> {
        let mut rules = self.rules.lock().expect("faults");
        let i = rules.iter().position(|r| {
            r.remaining > 0
                && (r.method == "*" || r.method.eq_ignore_ascii_case(method))
                && path.contains(&r.path_contains)
        })?;
        rules[i].remaining -= 1;
        let status = rules[i].status;
        rules.retain(|r| r.remaining > 0);
        Some(status)
    }
    fn cut_receiver(&self) -> broadcast::Receiver<()> {
        self.cut
            .lock()
            .expect("faults")
            .get_or_insert_with(|| broadcast::channel(4).0)
            .subscribe()
    }
}

/// The fault middleware: counts, delays, and answers injected errors.
async fn inject_faults(
    State(api): State<ApiServer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let faults = &api.faults;
    faults
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    faults
        .log
        .lock()
        .expect("faults")
        .push((req.method().to_string(), req.uri().to_string()));
    let delay = *faults.delay.lock().expect("faults");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_string();
    if let Some(code) = faults.take_failure(req.method().as_str(), &path) {
        if code == StatusCode::OK {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "<html><body>captive portal</body></html>\n{\"kind\": \"Nod",
            )
                .into_response();
        }
        let reason = match code.as_u16() {
            409 => "Conflict",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        return status(
            code,
            reason,
            format!("injected by the lab: {} {path}", req.method()),
            json!({}),
        );
    }
    next.run(req).await
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

fn uid(seed: &str) -> String {
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
        (a ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 20) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

/// `n` lowercase hex characters derived from `seed`, like a controller's name suffix.
fn suffix(seed: &str, n: usize) -> String {
    let u = uid(seed).replace('-', "");
    u[u.len() - n..].to_string()
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A Node as k3s registers it.
pub fn node_object(name: &str, controller: bool, ready: bool) -> Value {
    let mut labels = json!({
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "arm64",
        "node.kubernetes.io/instance-type": "k3s",
    });
    if controller {
        labels["node-role.kubernetes.io/control-plane"] = json!("true");
        labels["node-role.kubernetes.io/etcd"] = json!("true");
        labels["node-role.kubernetes.io/master"] = json!("true");
    }
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": uid(&format!("node/{name}")),
            "creationTimestamp": now_rfc3339(),
            "labels": labels,
        },
        "spec": { "podCIDR": "10.42.0.0/24", "providerID": format!("k3s://{name}") },
        "status": {
            "capacity": {"cpu": if controller { "8" } else { "4" }, "memory": if controller { "16Gi" } else { "4Gi" }, "pods": "110", "ephemeral-storage": "60Gi"},
            "allocatable": {"cpu": if controller { "8" } else { "4" }, "memory": if controller { "16Gi" } else { "4Gi" }, "pods": "110", "ephemeral-storage": "58Gi"},
            "conditions": [ready_condition(ready)],
            "nodeInfo": {
                "kubeletVersion": "v1.33.5+k3s1",
                "architecture": "arm64",
                "operatingSystem": "linux",
                "kernelVersion": "6.6.64-current-bcm2711",
                "osImage": "NixOS 25.05",
                "containerRuntimeVersion": "containerd://2.0.5-k3s1",
            },
        },
    })
}

fn ready_condition(ready: bool) -> Value {
    let now = now_rfc3339();
    json!({
        "type": "Ready",
        "status": if ready { "True" } else { "False" },
        "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
        "message": if ready { "kubelet is posting ready status" } else { "container runtime network not ready: NetworkReady=false" },
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    })
}

/// A Status error body, as the real server sends it.
fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
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

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        json!({"name": name, "kind": resource}),
    )
}

fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A pod as the lab creates it.
pub struct Pod<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub owner: Owner<'a>,
    pub labels: Value,
    pub ready: bool,
    /// An emptyDir volume: local storage that `kubectl drain` asks about.
    pub empty_dir: bool,
}

/// A pod's owner, as the lab creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    ReplicaSet(&'a str),
    DaemonSet(&'a str),
    /// A mirror (static) pod of the kubelet.
    Mirror,
    None,
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| &labels[k] == v))
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

    /// Stores `object` under a fresh resourceVersion and tells watchers.
    fn commit(
        &self,
        store: &mut Store,
        kind: &'static str,
        resource: &'static str,
        mut object: Value,
    ) -> Value {
        store.rv += 1;
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let key = (
            resource,
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        if kind == "DELETED" {
            store.objects.remove(&key);
        } else {
            store.objects.insert(key, object.clone());
        }
        let change = Change {
            rv: store.rv,
            kind,
            resource,
            object: object.clone(),
        };
        store.history.push(change.clone());
        let _ = self.changes.send(change);
        object
    }

    /// Adds a node (as k3s does when its agent registers).
    pub fn add_node(&self, name: &str, controller: bool, ready: bool) {
        let mut store = self.store.lock().expect("store");
        self.commit(
            &mut store,
            "ADDED",
            "nodes",
            node_object(name, controller, ready),
        );
        // The kubelet's heartbeat Lease, which `kubectl describe node` shows.
        self.ensure_namespace(&mut store, "kube-node-lease");
        let lease = json!({"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": name, "namespace": "kube-node-lease", "uid": uid(&format!("lease/node/{name}")), "creationTimestamp": now_rfc3339()},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_rfc3339().replace('Z', ".000000Z")}});
        self.commit(&mut store, "ADDED", "leases", lease);
    }

    /// The lab's hand on the kubelet: flips the node's Ready condition.
    pub fn set_node_ready(&self, name: &str, ready: bool) -> bool {
        let mut store = self.store.lock().expect("store");
        let Some(mut node) = store.get("nodes", "", name).cloned() else {
            return false;
        };
        node["status"]["conditions"] = json!([ready_condition(ready)]);
        self.commit(&mut store, "MODIFIED", "nodes", node);
        true
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.store
            .lock()
            .expect("store")
            .get("nodes", "", name)
            .cloned()
    }

    fn ensure_namespace(&self, store: &mut Store, ns: &str) {
        if store.get("namespaces", "", ns).is_none() {
            let obj = json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns, "uid": uid(&format!("ns/{ns}")), "creationTimestamp": now_rfc3339()}, "status": {"phase": "Active"}});
            self.commit(store, "ADDED", "namespaces", obj);
        }
    }

    /// A ReplicaSet (what a Deployment's pods are owned by).
    pub fn add_replicaset(&self, ns: &str, name: &str, labels: Value) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, ns);
        let obj = json!({"kind": "ReplicaSet", "apiVersion": "apps/v1", "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("rs/{ns}/{name}")), "creationTimestamp": now_rfc3339(), "labels": labels},
                         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}}}});
        self.commit(&mut store, "ADDED", "replicasets", obj);
    }

    pub fn add_daemonset(&self, ns: &str, name: &str, labels: Value) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, ns);
        let obj = json!({"kind": "DaemonSet", "apiVersion": "apps/v1", "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("ds/{ns}/{name}")), "creationTimestamp": now_rfc3339(), "labels": labels},
                         "spec": {"selector": {"matchLabels": labels}}});
        self.commit(&mut store, "ADDED", "daemonsets", obj);
    }

    /// A PodDisruptionBudget with `minAvailable` or `maxUnavailable` (ints).
    pub fn add_pdb(
        &self,
        ns: &str,
        name: &str,
        selector: Value,
        min_available: Option<i64>,
        max_unavailable: Option<i64>,
    ) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, ns);
        let mut spec = json!({"selector": {"matchLabels": selector}});
        if let Some(m) = min_available {
            spec["minAvailable"] = json!(m);
        }
        if let Some(m) = max_unavailable {
            spec["maxUnavailable"] = json!(m);
        }
        let obj = json!({"kind": "PodDisruptionBudget", "apiVersion": "policy/v1", "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("pdb/{ns}/{name}")), "creationTimestamp": now_rfc3339()}, "spec": spec});
        self.commit(&mut store, "ADDED", "poddisruptionbudgets", obj);
    }

    /// Adds a running pod (and its namespace if new).
    pub fn add_pod(&self, pod: Pod) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, pod.ns);
        self.commit(&mut store, "ADDED", "pods", pod_object(&pod));
    }

    pub fn set_pod_ready(&self, ns: &str, name: &str, ready: bool) -> bool {
        let mut store = self.store.lock().expect("store");
        let Some(mut pod) = store.get("pods", ns, name).cloned() else {
            return false;
        };
        pod["status"]["conditions"] =
            json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
        self.commit(&mut store, "MODIFIED", "pods", pod);
        true
    }

    pub fn pods_on(&self, node: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store
            .list("pods", None)
            .into_iter()
            .filter(|p| p["spec"]["nodeName"] == node)
            .cloned()
            .collect()
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .expect("store")
            .get("pods", ns, name)
            .cloned()
    }

    /// A Deployment with its ReplicaSet and `replicas` Ready pods spread over
    /// `nodes` in turn; returns the pod names.
    pub fn add_deployment(
        &self,
        ns: &str,
        name: &str,
        labels: Value,
        replicas: usize,
        nodes: &[&str],
    ) -> Vec<String> {
        let rs = format!("{name}-{}", suffix(&format!("tpl/{ns}/{name}"), 10));
        {
            let mut store = self.store.lock().expect("store");
            self.ensure_namespace(&mut store, ns);
            let obj = json!({"kind": "Deployment", "apiVersion": "apps/v1",
                "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("deploy/{ns}/{name}")), "creationTimestamp": now_rfc3339(), "labels": labels, "generation": 1},
                "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}}},
                "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas, "observedGeneration": 1}});
            self.commit(&mut store, "ADDED", "deployments", obj);
        }
        self.add_replicaset(ns, &rs, labels.clone());
        {
            let mut store = self.store.lock().expect("store");
            if let Some(mut r) = store.get("replicasets", ns, &rs).cloned() {
                r["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid(&format!("deploy/{ns}/{name}")), "controller": true, "blockOwnerDeletion": true}]);
                r["spec"]["replicas"] = json!(replicas);
                self.commit(&mut store, "MODIFIED", "replicasets", r);
            }
        }
        // Spread each Deployment from a different node, as the scheduler would.
        let offset = self.store.lock().expect("store").list("pods", None).len();
        (0..replicas)
            .map(|i| {
                let pod = format!("{rs}-{}", suffix(&format!("pod/{ns}/{rs}/{i}"), 5));
                self.add_pod(Pod {
                    ns,
                    name: &pod,
                    node: nodes[(i + offset) % nodes.len().max(1)],
                    owner: Owner::ReplicaSet(&rs),
                    labels: labels.clone(),
                    ready: true,
                    empty_dir: false,
                });
                pod
            })
            .collect()
    }

    /// The seed cluster's workload before the migration, spread over `nodes`:
    /// Longhorn and node-exporter DaemonSets, CoreDNS, Traefik, ArgoCD, the
    /// Longhorn UI and a web app as Deployments, three of them behind PDBs.
    pub fn add_homelab_workload(&self, nodes: &[&str]) {
        let l = |app: &str| json!({ "app.kubernetes.io/name": app });
        self.add_daemonset_with_pods(
            "longhorn-system",
            "longhorn-manager",
            l("longhorn-manager"),
            nodes,
            true,
        );
        self.add_daemonset_with_pods(
            "monitoring",
            "node-exporter",
            l("node-exporter"),
            nodes,
            true,
        );
        for (ns, name, replicas) in [
            ("kube-system", "coredns", 1),
            ("kube-system", "traefik", 1),
            ("kube-system", "metrics-server", 1),
            ("argocd", "argocd-server", 2),
            ("argocd", "argocd-repo-server", 2),
            ("longhorn-system", "longhorn-ui", 2),
            ("default", "web", 3),
        ] {
            self.add_deployment(ns, name, l(name), replicas, nodes);
        }
        self.add_pdb("argocd", "argocd-server", l("argocd-server"), Some(1), None);
        self.add_pdb(
            "argocd",
            "argocd-repo-server",
            l("argocd-repo-server"),
            None,
            Some(1),
        );
        self.add_pdb("default", "web", l("web"), None, Some(1));
    }

    /// A DaemonSet and one Ready (or not) pod of it on each of `nodes`.
    pub fn add_daemonset_with_pods(
        &self,
        ns: &str,
        name: &str,
        labels: Value,
        nodes: &[&str],
        ready: bool,
    ) {
        self.add_daemonset(ns, name, labels.clone());
        for node in nodes {
            self.add_pod(Pod {
                ns,
                name: &format!("{name}-{}", suffix(&format!("ds/{ns}/{name}/{node}"), 5)),
                node,
                owner: Owner::DaemonSet(name),
                labels: labels.clone(),
                ready,
                empty_dir: false,
            });
        }
    }

    /// The pod of DaemonSet `ds` on `node`, if there is one.
    pub fn daemon_pod_on(&self, ns: &str, ds: &str, node: &str) -> Option<String> {
        self.pods_on(node)
            .into_iter()
            .find(|p| {
                p["metadata"]["namespace"] == ns
                    && p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
                    && p["metadata"]["ownerReferences"][0]["name"] == ds
            })
            .and_then(|p| p["metadata"]["name"].as_str().map(String::from))
    }

    /// Sets a pod's phase (e.g. "Succeeded", "Pending").
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) -> bool {
        let mut store = self.store.lock().expect("store");
        let Some(mut pod) = store.get("pods", ns, name).cloned() else {
            return false;
        };
        pod["status"]["phase"] = json!(phase);
        self.commit(&mut store, "MODIFIED", "pods", pod);
        true
    }

    /// A Lease as stored now.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .expect("store")
            .get("leases", ns, name)
            .cloned()
    }

    /// Stores a Lease as another holder would have written it.
    pub fn put_lease(&self, ns: &str, name: &str, spec: Value) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, ns);
        let obj = json!({"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("lease/{ns}/{name}")), "creationTimestamp": now_rfc3339()},
            "spec": spec});
        self.commit(&mut store, "ADDED", "leases", obj);
    }

    /// Every Event (events.k8s.io/v1 form) about `kind`/`name`, oldest first.
    pub fn events_about(&self, kind: &str, name: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store
            .list("events", None)
            .into_iter()
            .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
            .cloned()
            .collect()
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

fn pod_object(p: &Pod) -> Value {
    let (ns, name) = (p.ns, p.name);
    let mut meta = json!({"name": name, "namespace": ns, "uid": uid(&format!("pod/{ns}/{name}/{}", now_rfc3339())), "creationTimestamp": now_rfc3339(), "labels": p.labels});
    match p.owner {
        Owner::ReplicaSet(rs) => {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": uid(&format!("rs/{ns}/{rs}")), "controller": true, "blockOwnerDeletion": true}])
        }
        Owner::DaemonSet(ds) => {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": ds, "uid": uid(&format!("ds/{ns}/{ds}")), "controller": true, "blockOwnerDeletion": true}])
        }
        Owner::Mirror => {
            meta["annotations"] = json!({"kubernetes.io/config.mirror": "0123456789abcdef", "kubernetes.io/config.source": "file"})
        }
        Owner::None => {}
    }
    let volumes = if p.empty_dir {
        json!([{"name": "scratch", "emptyDir": {}}])
    } else {
        json!([])
    };
    json!({
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"nodeName": p.node, "containers": [{"name": "main", "image": "registry.local/app:1"}], "volumes": volumes},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if p.ready { "True" } else { "False" }}]},
    })
}

/// PDB status as the disruption controller computes it, for `pdb`'s pods now.
fn pdb_status(store: &Store, pdb: &Value) -> (i64, i64, i64, i64) {
    let ns = pdb["metadata"]["namespace"].as_str().unwrap_or("");
    let pods: Vec<&Value> = store
        .list("pods", Some(ns))
        .into_iter()
        .filter(|p| labels_match(&pdb["spec"]["selector"], &p["metadata"]["labels"]))
        .collect();
    let expected = pods.len() as i64;
    let healthy = pods.iter().filter(|p| pod_ready(p)).count() as i64;
    let desired = match (
        pdb["spec"]["minAvailable"].as_i64(),
        pdb["spec"]["maxUnavailable"].as_i64(),
    ) {
        (Some(min), _) => min,
        (None, Some(max)) => (expected - max).max(0),
        _ => expected,
    };
    ((healthy - desired).max(0), healthy, desired, expected)
}

fn with_pdb_status(store: &Store, mut pdb: Value) -> Value {
    let (allowed, healthy, desired, expected) = pdb_status(store, &pdb);
    pdb["status"] = json!({"disruptionsAllowed": allowed, "currentHealthy": healthy, "desiredHealthy": desired, "expectedPods": expected, "observedGeneration": 1});
    pdb
}

/// A kubeconfig for `server` (`http://ADDR`), written for kubectl and kube-rs.
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cnishift-lab\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: cnishift-lab\n  user:\n    token: lab\ncontexts:\n- name: cnishift-lab\n  context:\n    cluster: cnishift-lab\n    user: cnishift-lab\n\
         current-context: cnishift-lab\n"
    )
}

async fn version() -> Response {
    json_response(&json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.5+k3s1-cnishift-lab", "gitCommit": "0000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/arm64",
    }))
}

async fn api_versions() -> Response {
    // Legacy discovery (kubectl falls back to it from aggregated discovery).
    json_response(
        &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
    )
}

async fn api_groups() -> Response {
    let group = |name: &str| json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}});
    json_response(
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group("apps"), group("policy"), group("coordination.k8s.io"), group("events.k8s.io")]}),
    )
}

fn resource(
    name: &str,
    singular: &str,
    namespaced: bool,
    kind: &str,
    verbs: &[&str],
    short: &[&str],
) -> Value {
    json!({"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind, "verbs": verbs, "shortNames": short})
}

async fn core_resources() -> Response {
    json_response(&json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("nodes", "node", false, "Node", &["get", "list", "patch", "watch"], &["no"]),
            resource("namespaces", "namespace", false, "Namespace", &["get", "list"], &["ns"]),
            resource("events", "event", true, "Event", &["list", "watch"], &["ev"]),
            resource("pods", "pod", true, "Pod", &["delete", "get", "list", "watch"], &["po"]),
            // kubectl drain finds the Eviction API here.
            {"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]},
        ],
    }))
}

async fn apps_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
            resource("daemonsets", "daemonset", true, "DaemonSet", &["get", "list", "watch"], &["ds"]),
            resource("deployments", "deployment", true, "Deployment", &["get", "list", "watch"], &["deploy"]),
            resource("replicasets", "replicaset", true, "ReplicaSet", &["get", "list"], &["rs"]),
        ]}),
    )
}

async fn coordination_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "coordination.k8s.io/v1", "resources": [
            resource("leases", "lease", true, "Lease", &["create", "delete", "get", "list", "update", "watch"], &[]),
        ]}),
    )
}

async fn events_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "events.k8s.io/v1", "resources": [
            resource("events", "event", true, "Event", &["create", "get", "list", "watch"], &["ev"]),
        ]}),
    )
}

async fn policy_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "policy/v1", "resources": [
            resource("poddisruptionbudgets", "poddisruptionbudget", true, "PodDisruptionBudget", &["get", "list"], &["pdb"]),
        ]}),
    )
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    watch: Option<String>,
    field_selector: Option<String>,
    label_selector: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<u64>,
    allow_watch_bookmarks: Option<bool>,
}

/// Field selectors kubectl and kube-rs use: `metadata.name`, `metadata.namespace`,
/// `spec.nodeName`, `spec.unschedulable`, `status.phase` (with `=`, `==`, `!=`).
fn matches(obj: &Value, p: &ListParams) -> bool {
    if let Some(fs) = &p.field_selector {
        for term in fs.split(',').filter(|t| !t.is_empty()) {
            let (neg, (k, v)) = match term.split_once("!=") {
                Some(kv) => (true, kv),
                None => (
                    false,
                    term.split_once('=')
                        .map(|(k, v)| (k, v.trim_start_matches('=')))
                        .unwrap_or((term, "")),
                ),
            };
            let actual = match k {
                "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
                "metadata.namespace" => obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                "spec.nodeName" => obj["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                "status.phase" => obj["status"]["phase"].as_str().unwrap_or("").to_string(),
                "spec.unschedulable" => (obj["spec"]["unschedulable"] == json!(true)).to_string(),
                // Any other field by its path (events: involvedObject.name, regarding.kind, ...).
                path => match obj.pointer(&format!("/{}", path.replace('.', "/"))) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                },
            };
            if (actual == v) == neg {
                return false;
            }
        }
    }
    if let Some(ls) = &p.label_selector {
        for term in ls.split(',').filter(|t| !t.is_empty()) {
            let ok = match term.split_once("!=") {
                Some((k, v)) => obj["metadata"]["labels"][k] != json!(v),
                None => match term.split_once('=') {
                    Some((k, v)) => {
                        obj["metadata"]["labels"][k.trim_end_matches('=')]
                            == json!(v.trim_start_matches('='))
                    }
                    None => obj["metadata"]["labels"].get(term).is_some(),
                },
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn age(created: &str) -> String {
    // Good enough for a lab: the server lives minutes.
    let _ = created;
    "1m".into()
}

/// Server-side printing, as `kubectl get nodes` asks for it.
fn node_table(nodes: &[&Value], rv: u64) -> Value {
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let ready = n["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"] == "True")
                .unwrap_or(false);
            let mut st = if ready {
                "Ready".to_string()
            } else {
                "NotReady".to_string()
            };
            if n["spec"]["unschedulable"] == json!(true) {
                st.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<&str> = n["metadata"]["labels"]
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            let roles = if roles.is_empty() {
                "<none>".to_string()
            } else {
                roles.join(",")
            };
            row(
                json!([
                    n["metadata"]["name"],
                    st,
                    roles,
                    age(n["metadata"]["creationTimestamp"].as_str().unwrap_or("")),
                    n["status"]["nodeInfo"]["kubeletVersion"]
                ]),
                n,
            )
        })
        .collect();
    table(
        &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
        ],
        rows,
        rv,
    )
}

/// One row of a server-side Table: its cells and the object's metadata.
fn row(cells: Value, obj: &Value) -> Value {
    json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
}

/// A meta.k8s.io/v1 Table: columns as (name, type, priority; 1 = only with `-o wide`).
fn table(columns: &[(&str, &str, u8)], rows: Vec<Value>, rv: u64) -> Value {
    let columns: Vec<Value> = columns
        .iter()
        .map(|(name, ty, prio)| json!({"name": name, "type": ty, "format": if *name == "Name" { "name" } else { "" }, "description": name, "priority": prio}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// Server-side printing of pods, with the columns `kubectl get pods [-o wide]` shows.
fn pod_table(pods: &[Value], rv: u64) -> Value {
    let rows: Vec<Value> = pods
        .iter()
        .map(|p| {
            let ready = usize::from(pod_ready(p));
            let containers = p["spec"]["containers"].as_array().map_or(1, Vec::len);
            row(
                json!([
                    p["metadata"]["name"],
                    format!("{ready}/{containers}"),
                    p["status"]["phase"],
                    0,
                    age(p["metadata"]["creationTimestamp"].as_str().unwrap_or("")),
                    p["status"]["podIP"].as_str().unwrap_or("<none>"),
                    p["spec"]["nodeName"]
                ]),
                p,
            )
        })
        .collect();
    table(
        &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "integer", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        rows,
        rv,
    )
}

fn is_watch(p: &ListParams) -> bool {
    p.watch.as_deref().is_some_and(|w| w == "true" || w == "1")
}

/// A list (or a watch, with `watch=true`) of `resource`, optionally in `ns`.
async fn list_or_watch(
    api: ApiServer,
    resource: &'static str,
    ns: Option<String>,
    p: ListParams,
    headers: &HeaderMap,
) -> Response {
    if is_watch(&p) {
        return watch(api, resource, ns, p).await;
    }
    let store = api.store.lock().expect("store");
    let items: Vec<Value> = store
        .list(resource, ns.as_deref())
        .into_iter()
        .filter(|o| matches(o, &p))
        .map(|o| decorate(&store, resource, o.clone()))
        .collect();
    if resource == "nodes" && wants_table(headers) {
        return json_response(&node_table(&items.iter().collect::<Vec<_>>(), store.rv));
    }
    if resource == "pods" && wants_table(headers) {
        return json_response(&pod_table(&items, store.rv));
    }
    let (kind, api_version) = type_of(resource);
    json_response(
        &json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

async fn get_node(
    State(api): State<ApiServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let store = api.store.lock().expect("store");
    match store.get("nodes", "", &name) {
        Some(n) if wants_table(&headers) => json_response(&node_table(&[n], store.rv)),
        Some(n) => json_response(n),
        None => not_found("nodes", &name),
    }
}

fn get_namespaced(api: &ApiServer, resource: &'static str, ns: &str, name: &str) -> Response {
    let store = api.store.lock().expect("store");
    match store.get(resource, ns, name) {
        Some(o) => json_response(&decorate(&store, resource, o.clone())),
        None => not_found(resource, name),
    }
}

/// Status fields the real controllers keep up to date, computed on read.
fn decorate(store: &Store, resource: &str, obj: Value) -> Value {
    match resource {
        "poddisruptionbudgets" => with_pdb_status(store, obj),
        "daemonsets" => with_ds_status(store, obj),
        _ => obj,
    }
}

/// DaemonSet status as its controller reports it: one pod wanted per node.
fn with_ds_status(store: &Store, mut ds: Value) -> Value {
    let ns = ds["metadata"]["namespace"].as_str().unwrap_or("");
    let name = ds["metadata"]["name"].as_str().unwrap_or("");
    let pods: Vec<&Value> = store
        .list("pods", Some(ns))
        .into_iter()
        .filter(|p| {
            p["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|o| {
                    o.iter()
                        .any(|o| o["kind"] == "DaemonSet" && o["name"] == name)
                })
        })
        .collect();
    let desired = store.list("nodes", None).len();
    let ready = pods.iter().filter(|p| pod_ready(p)).count();
    ds["status"] = json!({"desiredNumberScheduled": desired, "currentNumberScheduled": pods.len(), "numberReady": ready,
                          "numberAvailable": ready, "updatedNumberScheduled": pods.len(), "numberMisscheduled": 0, "observedGeneration": 1});
    ds
}

/// The resources served by the generic list/watch/get handlers, by index
/// (their kinds and apiVersions come from [`type_of`]).
const RESOURCES: [&str; 9] = [
    "nodes",
    "namespaces",
    "pods",
    "poddisruptionbudgets",
    "daemonsets",
    "deployments",
    "replicasets",
    "leases",
    "events",
];
const NODES: usize = 0;
const NAMESPACES: usize = 1;
const PODS: usize = 2;
const PDBS: usize = 3;
const DAEMONSETS: usize = 4;
const DEPLOYMENTS: usize = 5;
const REPLICASETS: usize = 6;
const LEASES: usize = 7;
const EVENTS: usize = 8;

async fn list_all<const R: usize>(
    State(api): State<ApiServer>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    list_or_watch(api, RESOURCES[R], None, p, &headers).await
}

async fn list_in<const R: usize>(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    Query(p): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    list_or_watch(api, RESOURCES[R], Some(ns), p, &headers).await
}

async fn get_in<const R: usize>(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    get_namespaced(&api, RESOURCES[R], &ns, &name)
}

fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, json!({}))
}

/// Parses a create/replace body and checks its kind and namespace.
fn parse_object(body: &Bytes, kind: &str, ns: &str) -> Result<Value, Box<Response>> {
    let obj: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        )))
    })?;
    if obj["kind"] != kind {
        return Err(Box::new(bad_request(format!(
            "the kind in the body ({}) is not {kind}",
            obj["kind"]
        ))));
    }
    if obj["metadata"]["namespace"]
        .as_str()
        .is_some_and(|n| n != ns)
    {
        return Err(Box::new(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )));
    }
    Ok(obj)
}

fn conflict(resource: &str, name: &str) -> Response {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
    )
}

async fn create_lease(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Lease", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(String::from) else {
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "Lease.coordination.k8s.io \"\" is invalid: metadata.name: Required value: name or generateName is required".into(), json!({}));
    };
    let mut store = api.store.lock().expect("store");
    if store.get("leases", &ns, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
            json!({"name": name, "group": "coordination.k8s.io", "kind": "leases"}),
        );
    }
    api.ensure_namespace(&mut store, &ns);
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(uid(&format!("lease/{ns}/{name}/{}", store.rv)));
    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    let stored = api.commit(&mut store, "ADDED", "leases", obj);
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        stored.to_string(),
    )
        .into_response()
}

/// PUT: optimistic concurrency on `metadata.resourceVersion` (409 when stale).
async fn replace_lease(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Lease", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    if obj["metadata"]["name"] != name.as_str() {
        return bad_request("the name of the object does not match the name on the URL".into());
    }
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("leases", &ns, &name).cloned() else {
        return not_found("leases.coordination.k8s.io", &name);
    };
    if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return conflict("leases.coordination.k8s.io", &name);
        }
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
    obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    json_response(&api.commit(&mut store, "MODIFIED", "leases", obj))
}

/// DELETE with an optional `preconditions.resourceVersion` (409 when stale).
async fn delete_lease(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return bad_request(format!("DeleteOptions: {e}")),
        }
    };
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("leases", &ns, &name).cloned() else {
        return not_found("leases.coordination.k8s.io", &name);
    };
    if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return conflict("leases.coordination.k8s.io", &name);
        }
    }
    api.commit(&mut store, "DELETED", "leases", current);
    json_response(
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"}}),
    )
}

/// events.k8s.io/v1 create: the fields `kubectl describe` needs are required,
/// as the real validation requires them.
async fn create_event(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    body: Bytes,
) -> Response {
    let mut obj = match parse_object(&body, "Event", &ns) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let mut missing = vec![];
    for field in [
        "reason",
        "action",
        "reportingController",
        "reportingInstance",
        "eventTime",
        "type",
    ] {
        if obj[field].as_str().is_none_or(str::is_empty) {
            missing.push(field);
        }
    }
    if obj["type"]
        .as_str()
        .is_some_and(|t| t != "Normal" && t != "Warning")
    {
        missing.push("type (Normal|Warning)");
    }
    if obj["regarding"]["kind"].as_str().is_none() || obj["regarding"]["name"].as_str().is_none() {
        missing.push("regarding");
    }
    let name = match (
        obj["metadata"]["name"].as_str(),
        obj["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) => n.to_string(),
        (None, Some(g)) => {
            let store = api.store.lock().expect("store");
            format!("{g}{:x}", store.rv)
        }
        _ => {
            missing.push("metadata.name");
            String::new()
        }
    };
    if !missing.is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "Event.events.k8s.io {name:?} is invalid: required: {}",
                missing.join(", ")
            ),
            json!({"kind": "Event", "group": "events.k8s.io"}),
        );
    }
    let mut store = api.store.lock().expect("store");
    if store.get("events", &ns, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("events.events.k8s.io \"{name}\" already exists"),
            json!({}),
        );
    }
    api.ensure_namespace(&mut store, &ns);
    obj["metadata"]["name"] = json!(name);
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(uid(&format!("event/{ns}/{name}")));
    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
    let stored = api.commit(&mut store, "ADDED", "events", obj);
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        stored.to_string(),
    )
        .into_response()
}

/// An events.k8s.io/v1 Event as the core/v1 API shows the same object.
fn core_event(e: &Value) -> Value {
    let time = e["eventTime"].clone();
    json!({
        "kind": "Event", "apiVersion": "v1", "metadata": e["metadata"],
        "involvedObject": e["regarding"], "reason": e["reason"], "message": e["note"], "type": e["type"],
        "source": {"component": e["reportingController"]}, "reportingComponent": e["reportingController"],
        "reportingInstance": e["reportingInstance"], "action": e["action"], "eventTime": time,
        "firstTimestamp": e["metadata"]["creationTimestamp"], "lastTimestamp": e["metadata"]["creationTimestamp"],
        "count": e["series"]["count"].as_i64().unwrap_or(1),
    })
}

async fn core_events(api: ApiServer, ns: Option<String>, p: ListParams) -> Response {
    let store = api.store.lock().expect("store");
    let items: Vec<Value> = store
        .list("events", ns.as_deref())
        .into_iter()
        .map(core_event)
        .filter(|e| matches(e, &p))
        .collect();
    json_response(
        &json!({"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

async fn list_core_events(State(api): State<ApiServer>, Query(p): Query<ListParams>) -> Response {
    core_events(api, None, p).await
}

async fn list_core_events_in(
    State(api): State<ApiServer>,
    Path(ns): Path<String>,
    Query(p): Query<ListParams>,
) -> Response {
    core_events(api, Some(ns), p).await
}

/// Deletes a pod and, for a ReplicaSet's pod, starts its replacement (not yet
/// Ready: the lab decides when) on a schedulable, Ready node.
fn remove_pod(api: &ApiServer, store: &mut Store, pod: Value) -> Value {
    let deleted = api.commit(store, "DELETED", "pods", pod.clone());
    let owner = pod["metadata"]["ownerReferences"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["kind"] == "ReplicaSet"))
        .and_then(|o| o["name"].as_str())
        .map(String::from);
    if let Some(rs) = owner {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let from = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
        let target = store
            .list("nodes", None)
            .into_iter()
            .find(|n| {
                n["metadata"]["name"] != from.as_str()
                    && n["spec"]["unschedulable"] != json!(true)
                    && node_ready(n)
            })
            .and_then(|n| n["metadata"]["name"].as_str())
            .map(String::from);
        if let Some(node) = target {
            store.next_pod += 1;
            let name = format!("{rs}-r{:05}", store.next_pod);
            let replacement = pod_object(&Pod {
                ns: &ns,
                name: &name,
                node: &node,
                owner: Owner::ReplicaSet(&rs),
                labels: pod["metadata"]["labels"].clone(),
                ready: false,
                empty_dir: false,
            });
            api.commit(store, "ADDED", "pods", replacement);
        }
    }
    deleted
}

fn node_ready(n: &Value) -> bool {
    n["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn delete_pod(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let mut store = api.store.lock().expect("store");
    let Some(pod) = store.get("pods", &ns, &name).cloned() else {
        return not_found("pods", &name);
    };
    let deleted = remove_pod(&api, &mut store, pod);
    json_response(&deleted)
}

/// policy/v1 Eviction: refused with 429 (and the body a real server sends)
/// when a PodDisruptionBudget covering the pod allows no disruption.
async fn evict_pod(
    State(api): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let eviction: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body of the request was in an unknown format: {e}"),
                json!({}),
            )
        }
    };
    if eviction["kind"] != "Eviction" || eviction["metadata"]["name"] != name.as_str() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "name in URL does not match name in Eviction object".into(),
            json!({"name": name, "group": "policy", "kind": "Eviction"}),
        );
    }
    let mut store = api.store.lock().expect("store");
    let Some(pod) = store.get("pods", &ns, &name).cloned() else {
        return not_found("pods", &name);
    };
    let pdbs: Vec<Value> = store
        .list("poddisruptionbudgets", Some(&ns))
        .into_iter()
        .filter(|b| labels_match(&b["spec"]["selector"], &pod["metadata"]["labels"]))
        .cloned()
        .collect();
    if pdbs.len() > 1 {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.".into(), json!({}));
    }
    if let Some(pdb) = pdbs.first() {
        let (allowed, healthy, desired, _) = pdb_status(&store, pdb);
        // A pod that is not Ready does not count against the budget.
        if allowed < 1 && pod_ready(&pod) {
            let pdb_name = pdb["metadata"]["name"].as_str().unwrap_or("");
            return status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                json!({"causes": [{"reason": "DisruptionBudget", "message": format!("The disruption budget {pdb_name} needs {desired} healthy pods and has {healthy} currently")}]}),
            );
        }
    }
    remove_pod(&api, &mut store, pod);
    (StatusCode::CREATED, [("content-type", "application/json")], json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}).to_string()).into_response()
}

/// (kind, apiVersion) of a resource's objects.
fn type_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "nodes" => ("Node", "v1"),
        "pods" => ("Pod", "v1"),
        "namespaces" => ("Namespace", "v1"),
        "poddisruptionbudgets" => ("PodDisruptionBudget", "policy/v1"),
        "daemonsets" => ("DaemonSet", "apps/v1"),
        "deployments" => ("Deployment", "apps/v1"),
        "replicasets" => ("ReplicaSet", "apps/v1"),
        "leases" => ("Lease", "coordination.k8s.io/v1"),
        "events" => ("Event", "events.k8s.io/v1"),
        _ => ("Unknown", "v1"),
    }
}

fn in_scope(c: &Change, resource: &str, ns: Option<&str>, p: &ListParams) -> bool {
    c.resource == resource
        && ns.is_none_or(|ns| c.object["metadata"]["namespace"] == ns)
        && matches(&c.object, p)
}

/// A watch: the changes after `resourceVersion` (or every object, as ADDED,
/// when it is empty or "0"), then live changes, one JSON object per line,
/// until `timeoutSeconds`.
async fn watch(
    api: ApiServer,
    resource: &'static str,
    ns: Option<String>,
    p: ListParams,
) -> Response {
    let (initial, rx, rv_now) = {
        let store = api.store.lock().expect("store");
        let rx = api.changes.subscribe();
        let from: Option<u64> = p
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty() && *v != "0")
            .and_then(|v| v.parse().ok());
        let oldest = store.history.first().map(|c| c.rv).unwrap_or(0);
        if let Some(from) = from {
            if from + 1 < oldest {
                // The real server's answer when history is gone: 410 Gone.
                return status(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {from} ({oldest})"),
                    json!({}),
                );
            }
        }
        let initial: Vec<Change> = match from {
            Some(from) => store
                .history
                .iter()
                .filter(|c| c.rv > from)
                .cloned()
                .collect(),
            None => store
                .objects
                .iter()
                .filter(|((r, _, _), _)| *r == resource)
                .map(|(_, o)| Change {
                    rv: store.rv,
                    kind: "ADDED",
                    resource,
                    object: o.clone(),
                })
                .collect(),
        };
        (initial, rx, store.rv)
    };
    let p = Arc::new(p);
    let line = |kind: &str, object: &Value| {
        Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
    };
    let mut head: Vec<Result<Bytes, Infallible>> = initial
        .iter()
        .filter(|c| in_scope(c, resource, ns.as_deref(), &p))
        .map(|c| Ok(line(c.kind, &c.object)))
        .collect();
    if p.allow_watch_bookmarks == Some(true) {
        // A real server's bookmark carries the kind and apiVersion (clients need them).
        let (kind, api_version) = type_of(resource);
        head.push(Ok(line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv_now.to_string()}}),
        )));
    }
    let last_sent = initial.last().map(|c| c.rv).unwrap_or(rv_now);
    let filter = p.clone();
    let live = futures::stream::unfold(
        (rx, filter, last_sent, ns),
        move |(mut rx, filter, last, ns)| async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.rv > last && in_scope(&c, resource, ns.as_deref(), &filter) => {
                        let bytes = Bytes::from(format!(
                            "{}\n",
                            json!({"type": c.kind, "object": c.object})
                        ));
                        return Some((Ok::<_, Infallible>(bytes), (rx, filter, c.rv, ns)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1800).min(3600));
    use futures::StreamExt;
    let mut cut = api.faults.cut_receiver();
    let stream = futures::stream::iter(head)
        .chain(live)
        .take_until(tokio::time::sleep(timeout))
        .take_until(async move {
            let _ = cut.recv().await;
        });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// Lists merged by key in a strategic-merge patch of a Node.
const MERGE_KEYS: &[(&str, &str)] = &[
    ("conditions", "type"),
    ("taints", "key"),
    ("addresses", "type"),
];

/// RFC 7386 merge patch; with `strategic`, the keyed lists above merge by key.
fn merge_patch(target: &mut Value, patch: &Value, strategic: bool) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k.starts_with('$') {
            continue; // strategic-merge directives ($retainKeys, $setElementOrder) need nothing here
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let key = MERGE_KEYS
            .iter()
            .find(|(list, _)| list == k)
            .map(|(_, key)| *key);
        match (
            strategic,
            key,
            v.as_array(),
            t.get_mut(k).and_then(|x| x.as_array_mut()),
        ) {
            (true, Some(key), Some(items), Some(existing)) => {
                for item in items {
                    match existing.iter_mut().find(|e| e[key] == item[key]) {
                        Some(e) => merge_patch(e, item, true),
                        None => existing.push(item.clone()),
                    }
                }
            }
            _ => merge_patch(t.entry(k.clone()).or_insert(Value::Null), v, strategic),
        }
    }
}

/// RFC 6902 JSON patch: add, remove, replace, test.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("every operation needs a \"path\"")?;
        let (parent, last) = match path.rfind('/') {
            Some(i) => (
                &path[..i],
                path[i + 1..].replace("~1", "/").replace("~0", "~"),
            ),
            None => return Err(format!("invalid path {path:?}")),
        };
        match op["op"].as_str() {
            Some("test") => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            Some(kind @ ("add" | "replace")) => {
                let value = op
                    .get("value")
                    .ok_or("add/replace need a \"value\"")?
                    .clone();
                let parent_v = target
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{parent:?} does not exist"))?;
                match parent_v {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(format!("replace: {path} does not exist"));
                        }
                        m.insert(last, value);
                    }
                    Value::Array(a) if last == "-" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last
                            .parse()
                            .map_err(|_| format!("bad array index in {path}"))?;
                        if kind == "replace" && i < a.len() {
                            a[i] = value;
                        } else if i <= a.len() {
                            a.insert(i, value);
                        } else {
                            return Err(format!("index out of range in {path}"));
                        }
                    }
                    _ => return Err(format!("{parent:?} is not an object or array")),
                }
            }
            Some("remove") => {
                let parent_v = target
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{parent:?} does not exist"))?;
                let removed = match parent_v {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => last
                        .parse::<usize>()
                        .ok()
                        .filter(|i| *i < a.len())
                        .map(|i| a.remove(i))
                        .is_some(),
                    _ => false,
                };
                if !removed {
                    return Err(format!("remove: {path} does not exist"));
                }
            }
            other => return Err(format!("unsupported operation {other:?}")),
        }
    }
    Ok(())
}

async fn patch_node(
    State(api): State<ApiServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ctype = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body of the request was in an unknown format: {e}"),
                json!({}),
            )
        }
    };
    let mut store = api.store.lock().expect("store");
    let Some(current) = store.get("nodes", "", &name).cloned() else {
        return not_found("nodes", &name);
    };
    let mut next = current.clone();
    let result = match ctype.as_str() {
        "application/merge-patch+json" => {
            merge_patch(&mut next, &patch, false);
            Ok(())
        }
        "application/strategic-merge-patch+json" => {
            merge_patch(&mut next, &patch, true);
            Ok(())
        }
        "application/json-patch+json" => json_patch(&mut next, &patch),
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"),
                json!({}),
            )
        }
    };
    if let Err(e) = result {
        // kubectl prints an Invalid status through its causes.
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("nodes \"{name}\" is invalid: {e}"),
            json!({"name": name, "kind": "nodes", "causes": [{"reason": "FieldValueInvalid", "message": e, "field": "patch"}]}),
        );
    }
    // Optimistic concurrency: a patch that names a resourceVersion must name the current one.
    let sent_rv = patch
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(|r| r.as_str());
    if let Some(rv) = sent_rv {
        if Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                json!({"name": name, "kind": "nodes"}),
            );
        }
    }
    if next["metadata"]["name"] != current["metadata"]["name"] {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name cannot be changed".into(),
            json!({"name": name, "kind": "nodes"}),
        );
    }
    if next == current {
        return json_response(&current);
    }
    let stored = api.commit(&mut store, "MODIFIED", "nodes", next);
    json_response(&stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patches_delete_with_null_and_strategic_ones_merge_conditions_by_type() {
        let mut n = node_object("a", false, false);
        merge_patch(&mut n, &json!({"spec": {"unschedulable": true}}), true);
        assert_eq!(n["spec"]["unschedulable"], true);
        merge_patch(&mut n, &json!({"spec": {"unschedulable": null}}), true);
        assert!(n["spec"].get("unschedulable").is_none());
        merge_patch(
            &mut n,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "False"}]}}),
            true,
        );
        let conds = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2, "merged by type, not replaced");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(
            conds[0]["reason"], "KubeletNotReady",
            "fields not in the patch stay"
        );
        merge_patch(
            &mut n,
            &json!({"status": {"conditions": [{"type": "Ready"}]}}),
            false,
        );
        assert_eq!(
            n["status"]["conditions"].as_array().unwrap().len(),
            1,
            "a plain merge patch replaces lists"
        );
    }

    #[test]
    fn json_patches_follow_rfc_6902() {
        let mut n = node_object("a", false, true);
        json_patch(
            &mut n,
            &json!([{"op": "add", "path": "/metadata/labels/x~1y", "value": "1"}]),
        )
        .unwrap();
        assert_eq!(n["metadata"]["labels"]["x/y"], "1");
        json_patch(&mut n, &json!([{"op": "test", "path": "/metadata/name", "value": "a"}, {"op": "remove", "path": "/metadata/labels/x~1y"}])).unwrap();
        assert!(n["metadata"]["labels"].get("x/y").is_none());
        assert!(json_patch(
            &mut n,
            &json!([{"op": "test", "path": "/metadata/name", "value": "b"}])
        )
        .unwrap_err()
        .contains("test operation failed"));
        assert!(json_patch(
            &mut n,
            &json!([{"op": "replace", "path": "/spec/nope", "value": 1}])
        )
        .unwrap_err()
        .contains("does not exist"));
        assert!(json_patch(&mut n, &json!({"op": "add"}))
            .unwrap_err()
            .contains("array"));
        assert!(
            json_patch(&mut n, &json!([{"op": "move", "path": "/a", "from": "/b"}]))
                .unwrap_err()
                .contains("unsupported")
        );
    }

    #[test]
    fn dates_are_rfc3339() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20, "{d}");
        assert!(
            d.starts_with("20") && d.ends_with('Z') && d.as_bytes()[10] == b'T',
            "{d}"
        );
    }
}
