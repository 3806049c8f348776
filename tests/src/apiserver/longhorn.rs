//! Longhorn as its manager keeps it in the API: its CRDs
//! (`volumes.longhorn.io`, `replicas.longhorn.io`, v1beta2, with the
//! printer columns of Longhorn's own crds.yaml), a Volume per PersistentVolume
//! it provisioned (named like the PV, its `status.kubernetesStatus` naming
//! the claim and the pods), and its Replicas spread over the nodes
//! (`spec.nodeID`, `spec.volumeName`, `spec.healthyAt`/`failedAt`,
//! `status.currentState`). The lab's hands on them make a volume's only
//! healthy replica sit on one node, as a failed disk or a rebuild would.

use super::*;

const ENGINE_IMAGE: &str = "longhornio/longhorn-engine:v1.7.2";
pub const LONGHORN_NS: &str = "longhorn-system";

fn crd_object(plural: &str, singular: &str, kind: &str, short: &str, columns: Value) -> Value {
    json!({
        "kind": "CustomResourceDefinition", "apiVersion": "apiextensions.k8s.io/v1",
        "metadata": {"name": format!("{plural}.longhorn.io"), "uid": uid(&format!("crd/{plural}.longhorn.io")),
                     "creationTimestamp": now_rfc3339(), "labels": {"app.kubernetes.io/name": "longhorn", "longhorn-manager": ""}},
        "spec": {"group": "longhorn.io", "scope": "Namespaced",
                 "names": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": singular, "shortNames": [short]},
                 "versions": [{"name": "v1beta2", "served": true, "storage": true, "additionalPrinterColumns": columns,
                               "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
        "status": {"storedVersions": ["v1beta2"], "conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}],
                   "acceptedNames": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": singular, "shortNames": [short]}},
    })
}

fn col(name: &str, path: &str, ty: &str) -> Value {
    json!({"name": name, "jsonPath": path, "type": ty})
}

/// A time in the form Longhorn writes (RFC 3339, UTC).
fn stamp() -> String {
    now_rfc3339()
}

/// One replica of `volume` on `node`, healthy (or failed).
fn replica_object(volume: &str, node: &str, i: usize, healthy: bool, attached: bool) -> Value {
    let name = format!("{volume}-r-{}", suffix(&format!("replica/{volume}/{i}"), 8));
    json!({
        "kind": "Replica", "apiVersion": "longhorn.io/v1beta2",
        "metadata": {"name": name, "namespace": LONGHORN_NS, "uid": uid(&format!("replica/{volume}/{i}")), "creationTimestamp": now_rfc3339(),
                     "labels": {"longhornnode": node, "longhornvolume": volume, "longhorndiskuuid": uid(&format!("disk/{node}"))},
                     "finalizers": ["longhorn.io"], "generation": 1},
        "spec": {"volumeName": volume, "nodeID": node, "diskID": uid(&format!("disk/{node}")), "diskPath": "/var/lib/longhorn/",
                 "dataDirectoryName": format!("{volume}-{}", suffix(&format!("dir/{volume}/{i}"), 8)), "engineName": format!("{volume}-e-0"),
                 "image": ENGINE_IMAGE, "dataEngine": "v1", "desireState": if attached { "running" } else { "stopped" },
                 "active": true, "volumeSize": "10737418240",
                 "healthyAt": if healthy { json!(stamp()) } else { json!("") },
                 "lastHealthyAt": stamp(),
                 "failedAt": if healthy { json!("") } else { json!(stamp()) },
                 "lastFailedAt": if healthy { json!("") } else { json!(stamp()) },
                 "rebuildRetryCount": 0, "evictionRequested": false},
        "status": {"currentState": match (healthy, attached) { (false, _) => "error", (true, true) => "running", (true, false) => "stopped" },
                   "currentImage": ENGINE_IMAGE, "instanceManagerName": format!("instance-manager-{}", suffix(&format!("im/{node}"), 32)),
                   "ip": "", "storageIP": "", "port": 0, "started": attached, "ownerID": node, "conditions": []},
    })
}

impl ApiServer {
    /// Installs Longhorn's CRDs for volumes and replicas (discovery then lists longhorn.io).
    pub fn install_longhorn_crds(&self) {
        let mut store = self.store.lock().expect("store");
        if store
            .get("customresourcedefinitions", "", "volumes.longhorn.io")
            .is_some()
        {
            return;
        }
        self.ensure_namespace(&mut store, LONGHORN_NS);
        let volumes = crd_object(
            "volumes",
            "volume",
            "Volume",
            "lhv",
            json!([
                col("Data Engine", ".spec.dataEngine", "string"),
                col("State", ".status.state", "string"),
                col("Robustness", ".status.robustness", "string"),
                col(
                    "Scheduled",
                    ".status.conditions[?(@.type=='Schedulable')].status",
                    "string"
                ),
                col("Size", ".spec.size", "string"),
                col("Node", ".status.currentNodeID", "string"),
                col("Age", ".metadata.creationTimestamp", "date")
            ]),
        );
        let replicas = crd_object(
            "replicas",
            "replica",
            "Replica",
            "lhr",
            json!([
                col("Data Engine", ".spec.dataEngine", "string"),
                col("State", ".status.currentState", "string"),
                col("Node", ".spec.nodeID", "string"),
                col("Disk", ".spec.diskID", "string"),
                col("InstanceManager", ".status.instanceManagerName", "string"),
                col("Image", ".status.currentImage", "string"),
                col("Age", ".metadata.creationTimestamp", "date")
            ]),
        );
        self.commit(&mut store, "ADDED", "customresourcedefinitions", volumes);
        self.commit(&mut store, "ADDED", "customresourcedefinitions", replicas);
    }

    /// A Longhorn volume for the claim `ns/claim` (bound to PV `pv`), attached
    /// to `attached` for `pod`, with one healthy replica on each of `replicas`.
    pub fn add_longhorn_volume(
        &self,
        pv: &str,
        (ns, claim): (&str, &str),
        (pod, workload, kind): (&str, &str, &str),
        attached: &str,
        replicas: &[&str],
    ) {
        self.install_longhorn_crds();
        let mut store = self.store.lock().expect("store");
        let vol = json!({
            "kind": "Volume", "apiVersion": "longhorn.io/v1beta2",
            "metadata": {"name": pv, "namespace": LONGHORN_NS, "uid": uid(&format!("lhv/{pv}")), "creationTimestamp": now_rfc3339(),
                         "labels": {"longhornvolume": pv, "recurring-job-group.longhorn.io/default": "enabled"},
                         "finalizers": ["longhorn.io"], "generation": 1},
            "spec": {"numberOfReplicas": replicas.len(), "size": "10737418240", "dataEngine": "v1", "frontend": "blockdev",
                     "accessMode": if kind == "StatefulSet" { "rwo" } else { "rwx" }, "dataLocality": "disabled",
                     "replicaAutoBalance": "ignored", "staleReplicaTimeout": 30, "migratable": false, "encrypted": false,
                     "image": ENGINE_IMAGE, "nodeID": attached},
            "status": {"state": "attached", "robustness": "healthy", "currentNodeID": attached, "currentImage": ENGINE_IMAGE,
                       "frontendDisabled": false, "shareState": "", "ownerID": attached, "actualSize": 1073741824,
                       "lastBackup": "", "restoreRequired": false,
                       "conditions": [{"type": "Scheduled", "status": "True", "reason": "", "message": "", "lastTransitionTime": now_rfc3339()},
                                      {"type": "TooManySnapshots", "status": "False", "reason": "", "message": "", "lastTransitionTime": now_rfc3339()}],
                       "kubernetesStatus": {"pvName": pv, "pvStatus": "Bound", "namespace": ns, "pvcName": claim,
                                            "lastPVCRefAt": "", "lastPodRefAt": "",
                                            "workloadsStatus": [{"podName": pod, "podStatus": "Running", "workloadName": workload, "workloadType": kind}]}},
        });
        self.commit(&mut store, "ADDED", "volumes.longhorn.io", vol);
        for (i, node) in replicas.iter().enumerate() {
            self.commit(
                &mut store,
                "ADDED",
                "replicas.longhorn.io",
                replica_object(pv, node, i, true, true),
            );
        }
    }

    /// The volume of claim `ns/claim`, by its kubernetesStatus.
    pub fn longhorn_volume_of(&self, ns: &str, claim: &str) -> Option<Value> {
        let store = self.store.lock().expect("store");
        store
            .list("volumes.longhorn.io", None)
            .into_iter()
            .find(|v| {
                v["status"]["kubernetesStatus"]["namespace"] == ns
                    && v["status"]["kubernetesStatus"]["pvcName"] == claim
            })
            .cloned()
    }

    /// Makes `volume`'s only healthy replica the one on `node` (there must be
    /// one there): every other replica failed, the volume degraded, as Longhorn
    /// shows a volume whose other disks failed. Returns the replicas it failed.
    pub fn longhorn_sole_replica(&self, volume: &str, node: &str) -> Result<Vec<String>, String> {
        let mut store = self.store.lock().expect("store");
        let reps: Vec<Value> = store
            .list("replicas.longhorn.io", None)
            .into_iter()
            .filter(|r| r["spec"]["volumeName"] == volume)
            .cloned()
            .collect();
        if !reps.iter().any(|r| r["spec"]["nodeID"] == node) {
            return Err(format!("volume {volume} has no replica on {node}"));
        }
        let mut failed = vec![];
        for mut r in reps {
            let on_node = r["spec"]["nodeID"] == node;
            // As Longhorn marks a failure: failedAt set, healthyAt kept (it is
            // cleared only when a rebuild starts).
            if on_node {
                r["spec"]["healthyAt"] = json!(stamp());
                r["spec"]["failedAt"] = json!("");
            } else {
                r["spec"]["failedAt"] = json!(stamp());
                r["spec"]["lastFailedAt"] = json!(stamp());
            }
            r["status"]["currentState"] = json!(if on_node { "running" } else { "error" });
            if !on_node {
                failed.push(r["metadata"]["name"].as_str().unwrap_or("").to_string());
            }
            self.commit(&mut store, "MODIFIED", "replicas.longhorn.io", r);
        }
        if let Some(mut v) = store
            .get("volumes.longhorn.io", LONGHORN_NS, volume)
            .cloned()
        {
            v["status"]["robustness"] = json!("degraded");
            self.commit(&mut store, "MODIFIED", "volumes.longhorn.io", v);
        }
        Ok(failed)
    }

    /// Every replica of `volume` healthy again, the volume healthy (the rebuild done).
    pub fn longhorn_rebuilt(&self, volume: &str) {
        let mut store = self.store.lock().expect("store");
        let reps: Vec<Value> = store
            .list("replicas.longhorn.io", None)
            .into_iter()
            .filter(|r| r["spec"]["volumeName"] == volume)
            .cloned()
            .collect();
        for mut r in reps {
            r["spec"]["healthyAt"] = json!(stamp());
            r["spec"]["failedAt"] = json!("");
            r["status"]["currentState"] = json!("running");
            self.commit(&mut store, "MODIFIED", "replicas.longhorn.io", r);
        }
        if let Some(mut v) = store
            .get("volumes.longhorn.io", LONGHORN_NS, volume)
            .cloned()
        {
            v["status"]["robustness"] = json!("healthy");
            self.commit(&mut store, "MODIFIED", "volumes.longhorn.io", v);
        }
    }

    /// Makes the PersistentVolume of claim `ns/claim` a local-path one pinned
    /// to `node` by node affinity, as rancher's local-path provisioner writes it.
    pub fn pin_claim_to_node(&self, ns: &str, claim: &str, node: &str) -> Option<String> {
        let mut store = self.store.lock().expect("store");
        let pvc = store.get("persistentvolumeclaims", ns, claim)?.clone();
        let pv_name = pvc["spec"]["volumeName"].as_str()?.to_string();
        let mut pv = store.get("persistentvolumes", "", &pv_name).cloned()?;
        pv["spec"]["storageClassName"] = json!("local-path");
        pv["spec"].as_object_mut()?.remove("csi");
        pv["spec"]["hostPath"] = json!({"path": format!("/var/lib/rancher/k3s/storage/{pv_name}_{ns}_{claim}"), "type": "DirectoryOrCreate"});
        pv["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}});
        pv["metadata"]["annotations"] = json!({"pv.kubernetes.io/provisioned-by": "rancher.io/local-path", "local.path.provisioner/selected-node": node});
        self.commit(&mut store, "MODIFIED", "persistentvolumes", pv);
        let mut pvc = pvc;
        pvc["spec"]["storageClassName"] = json!("local-path");
        self.commit(&mut store, "MODIFIED", "persistentvolumeclaims", pvc);
        Some(pv_name)
    }
}

/// A Longhorn CSI PersistentVolume bound to `ns/claim`.
pub(crate) fn longhorn_pv(pv: &str, ns: &str, claim: &str, rwx: bool) -> Value {
    json!({
        "kind": "PersistentVolume", "apiVersion": "v1",
        "metadata": {"name": pv, "uid": uid(&format!("pvobj/{pv}")), "creationTimestamp": now_rfc3339(),
                     "annotations": {"pv.kubernetes.io/provisioned-by": "driver.longhorn.io", "longhorn.io/volume-scheduling-error": ""},
                     "finalizers": ["kubernetes.io/pv-protection", "external-attacher/driver-longhorn-io"]},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": [if rwx { "ReadWriteMany" } else { "ReadWriteOnce" }],
                 "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "longhorn", "volumeMode": "Filesystem",
                 "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": claim, "namespace": ns, "uid": uid(&format!("pvc/{ns}/{claim}"))},
                 "csi": {"driver": "driver.longhorn.io", "fsType": "ext4", "volumeHandle": pv,
                         "volumeAttributes": {"numberOfReplicas": "3", "staleReplicaTimeout": "30", "dataEngine": "v1"}}},
        "status": {"phase": "Bound"},
    })
}
