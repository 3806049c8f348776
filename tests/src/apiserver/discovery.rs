//! Discovery: /version, legacy /api and /apis, and each group's resource list.

use super::*;

pub(crate) async fn version() -> Response {
    json_response(&json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.5+k3s1-cnishift-lab", "gitCommit": "0000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
        "platform": "linux/arm64",
    }))
}

pub(crate) async fn api_versions() -> Response {
    // Legacy discovery (kubectl falls back to it from aggregated discovery).
    json_response(
        &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
    )
}

/// The API groups: the built-in ones served, and the group of every
/// installed CustomResourceDefinition.
pub(crate) async fn api_groups(State(api): State<ApiServer>) -> Response {
    let group = |name: &str, v: &str| json!({"name": name, "versions": [{"groupVersion": format!("{name}/{v}"), "version": v}], "preferredVersion": {"groupVersion": format!("{name}/{v}"), "version": v}});
    let mut groups: Vec<Value> = [
        "apps",
        "policy",
        "coordination.k8s.io",
        "events.k8s.io",
        "networking.k8s.io",
        "apiextensions.k8s.io",
    ]
    .iter()
    .map(|g| group(g, "v1"))
    .collect();
    let store = api.store.lock().expect("store");
    for (g, v) in super::custom::custom_groups(&store) {
        groups.push(group(&g, &v));
    }
    json_response(&json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

pub(crate) async fn networking_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1", "resources": [
            resource("networkpolicies", "networkpolicy", true, "NetworkPolicy", &["get", "list", "watch"], &["netpol"]),
        ]}),
    )
}

pub(crate) async fn apiextensions_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apiextensions.k8s.io/v1", "resources": [
            resource("customresourcedefinitions", "customresourcedefinition", false, "CustomResourceDefinition", &["get", "list", "watch"], &["crd", "crds"]),
        ]}),
    )
}

pub(crate) fn resource(
    name: &str,
    singular: &str,
    namespaced: bool,
    kind: &str,
    verbs: &[&str],
    short: &[&str],
) -> Value {
    json!({"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind, "verbs": verbs, "shortNames": short})
}

pub(crate) async fn core_resources() -> Response {
    json_response(&json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("nodes", "node", false, "Node", &["get", "list", "patch", "watch"], &["no"]),
            resource("namespaces", "namespace", false, "Namespace", &["get", "list"], &["ns"]),
            resource("events", "event", true, "Event", &["list", "watch"], &["ev"]),
            resource("pods", "pod", true, "Pod", &["delete", "get", "list", "watch"], &["po"]),
            resource("persistentvolumeclaims", "persistentvolumeclaim", true, "PersistentVolumeClaim", &["get", "list", "watch"], &["pvc"]),
            resource("persistentvolumes", "persistentvolume", false, "PersistentVolume", &["get", "list", "watch"], &["pv"]),
            resource("configmaps", "configmap", true, "ConfigMap", &["get", "list", "watch"], &["cm"]),
            // kubectl drain finds the Eviction API here.
            {"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]},
        ],
    }))
}

pub(crate) async fn apps_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
            resource("daemonsets", "daemonset", true, "DaemonSet", &["get", "list", "watch"], &["ds"]),
            resource("deployments", "deployment", true, "Deployment", &["get", "list", "watch"], &["deploy"]),
            resource("replicasets", "replicaset", true, "ReplicaSet", &["get", "list"], &["rs"]),
            resource("statefulsets", "statefulset", true, "StatefulSet", &["get", "list", "watch"], &["sts"]),
        ]}),
    )
}

pub(crate) async fn coordination_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "coordination.k8s.io/v1", "resources": [
            resource("leases", "lease", true, "Lease", &["create", "delete", "get", "list", "update", "watch"], &[]),
        ]}),
    )
}

pub(crate) async fn events_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "events.k8s.io/v1", "resources": [
            resource("events", "event", true, "Event", &["create", "get", "list", "watch"], &["ev"]),
        ]}),
    )
}

pub(crate) async fn policy_resources() -> Response {
    json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "policy/v1", "resources": [
            resource("poddisruptionbudgets", "poddisruptionbudget", true, "PodDisruptionBudget", &["get", "list"], &["pdb"]),
        ]}),
    )
}
