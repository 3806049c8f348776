//! Objects as the real controllers shape them: Nodes as k3s registers them,
//! pods, and the status fields the disruption and DaemonSet controllers compute.

use super::*;

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

pub(crate) fn ready_condition(ready: bool) -> Value {
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
    /// A StatefulSet's pod, with its PersistentVolumeClaim `data-<pod>`.
    StatefulSet(&'a str),
    /// A mirror (static) pod of the kubelet.
    Mirror,
    None,
}

pub(crate) fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

pub(crate) fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| &labels[k] == v))
}

pub(crate) fn node_ready(n: &Value) -> bool {
    n["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

pub(crate) fn pod_object(p: &Pod) -> Value {
    let (ns, name) = (p.ns, p.name);
    let mut meta = json!({"name": name, "namespace": ns, "uid": uid(&format!("pod/{ns}/{name}/{}", now_rfc3339())), "creationTimestamp": now_rfc3339(), "labels": p.labels});
    match p.owner {
        Owner::ReplicaSet(rs) => {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": uid(&format!("rs/{ns}/{rs}")), "controller": true, "blockOwnerDeletion": true}])
        }
        Owner::DaemonSet(ds) => {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": ds, "uid": uid(&format!("ds/{ns}/{ds}")), "controller": true, "blockOwnerDeletion": true}])
        }
        Owner::StatefulSet(sts) => {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts, "uid": uid(&format!("sts/{ns}/{sts}")), "controller": true, "blockOwnerDeletion": true}])
        }
        Owner::Mirror => {
            meta["annotations"] = json!({"kubernetes.io/config.mirror": "0123456789abcdef", "kubernetes.io/config.source": "file"})
        }
        Owner::None => {}
    }
    let volumes = if p.empty_dir {
        json!([{"name": "scratch", "emptyDir": {}}])
    } else if matches!(p.owner, Owner::StatefulSet(_)) {
        json!([{"name": "data", "persistentVolumeClaim": {"claimName": format!("data-{name}")}}])
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
pub(crate) fn pdb_status(store: &Store, pdb: &Value) -> (i64, i64, i64, i64) {
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

pub(crate) fn with_pdb_status(store: &Store, mut pdb: Value) -> Value {
    let (allowed, healthy, desired, expected) = pdb_status(store, &pdb);
    pdb["status"] = json!({"disruptionsAllowed": allowed, "currentHealthy": healthy, "desiredHealthy": desired, "expectedPods": expected, "observedGeneration": 1});
    pdb
}

/// Status fields the real controllers keep up to date, computed on read.
pub(crate) fn decorate(store: &Store, resource: &str, obj: Value) -> Value {
    match resource {
        "poddisruptionbudgets" => with_pdb_status(store, obj),
        "daemonsets" => with_ds_status(store, obj),
        _ => obj,
    }
}

/// DaemonSet status as its controller reports it: one pod wanted per node.
pub(crate) fn with_ds_status(store: &Store, mut ds: Value) -> Value {
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
    let selector = &ds["spec"]["template"]["spec"]["nodeSelector"];
    let desired = store
        .list("nodes", None)
        .into_iter()
        .filter(|n| {
            selector
                .as_object()
                .is_none_or(|m| m.iter().all(|(k, v)| &n["metadata"]["labels"][k] == v))
        })
        .count();
    let ready = pods.iter().filter(|p| pod_ready(p)).count();
    ds["status"] = json!({"desiredNumberScheduled": desired, "currentNumberScheduled": pods.len(), "numberReady": ready,
                          "numberAvailable": ready, "updatedNumberScheduled": pods.len(), "numberMisscheduled": 0, "observedGeneration": 1});
    ds
}
