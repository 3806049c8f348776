//! `cnishift backup`: what an in-place CNI migration can lose, saved before
//! the first node is touched, as YAML a person can `kubectl apply -f DIR`:
//!
//! - `nodes.yaml`: every Node's labels, annotations, taints and podCIDRs
//!   (its whole spec), for the labels and taints a failed switch can leave
//!   wrong;
//! - `networkpolicies.yaml`: every networking.k8s.io/v1 NetworkPolicy (Cilium
//!   enforces them, Flannel did not);
//! - `poddisruptionbudgets.yaml`: every PodDisruptionBudget (a drain relaxes
//!   none, but a person under pressure might);
//! - `configmaps.yaml`: the Cilium/Flannel-related ConfigMaps — every one
//!   whose name has `cilium`, `hubble` or `flannel` in it, in any namespace
//!   (`cilium-config`, `kube-flannel-cfg`, ...), but not the
//!   `kube-root-ca.crt` Kubernetes writes into every namespace.
//!
//! Server-set fields are stripped so the objects apply to this cluster or a
//! rebuilt one: `status`, and from `metadata` the uid, resourceVersion,
//! creationTimestamp, generation, managedFields, selfLink, deletion fields,
//! ownerReferences (their UIDs would not match a rebuilt cluster, whose
//! garbage collector would then delete the object) and kubectl's
//! last-applied-configuration annotation.
//!
//! The directory (`cnishift-backup-<UTC time>`) is written under a
//! `.partial` name and renamed when complete, so it is whole or absent; an
//! existing one is never overwritten.

pub mod yaml;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde::Serialize;
use serde_json::Value;

use crate::kube::{Kube, KubeError};

/// One file of a backup.
#[derive(Debug, Clone, Serialize)]
pub struct File {
    pub file: String,
    pub kind: String,
    pub count: usize,
    /// `namespace/name` (or `name`) of every object in it.
    pub objects: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backup {
    pub dir: PathBuf,
    pub files: Vec<File>,
    pub objects: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Api(#[from] KubeError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What is backed up, per file: (file, group, version, kind, plural, keep?).
type Keep = fn(&Value) -> bool;
const KINDS: &[(&str, &str, &str, &str, &str, Keep)] = &[
    ("nodes.yaml", "", "v1", "Node", "nodes", |_| true),
    (
        "networkpolicies.yaml",
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        |_| true,
    ),
    (
        "poddisruptionbudgets.yaml",
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        |_| true,
    ),
    (
        "configmaps.yaml",
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        cni_config_map,
    ),
];

/// A ConfigMap of Cilium's or Flannel's (see the module doc).
pub fn cni_config_map(cm: &Value) -> bool {
    let name = cm["metadata"]["name"].as_str().unwrap_or("").to_lowercase();
    name != "kube-root-ca.crt"
        && ["cilium", "hubble", "flannel"]
            .iter()
            .any(|w| name.contains(w))
}

/// The object without what the API server sets (see the module doc).
pub fn strip(mut o: Value) -> Value {
    if let Some(obj) = o.as_object_mut() {
        obj.remove("status");
    }
    if let Some(meta) = o["metadata"].as_object_mut() {
        for f in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "ownerReferences",
        ] {
            meta.remove(f);
        }
        let empty = match meta.get_mut("annotations").and_then(Value::as_object_mut) {
            Some(a) => {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
                a.is_empty()
            }
            None => false,
        };
        if empty {
            meta.remove("annotations");
        }
    }
    o
}

fn name_of(o: &Value) -> String {
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", o["metadata"]["name"].as_str().unwrap_or("")),
        None => o["metadata"]["name"].as_str().unwrap_or("").to_string(),
    }
}

/// The directory name for `now` (UTC, to the second).
pub fn dir_name(now: time::OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!(
        "cnishift-backup-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Reads every object to back up (nothing is written yet).
pub async fn collect(
    kube: &Kube,
) -> Result<Vec<(&'static str, &'static str, Vec<Value>)>, KubeError> {
    let mut out = vec![];
    for (file, group, version, kind, plural, keep) in KINDS {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(kube.client.clone(), &ar);
        let lp = ListParams::default();
        let list = kube.call(format!("list {plural}"), api.list(&lp)).await?;
        let mut items: Vec<Value> = list
            .items
            .into_iter()
            .map(|mut o| {
                o.types = Some(kube::api::TypeMeta {
                    api_version: ar.api_version.clone(),
                    kind: ar.kind.clone(),
                });
                serde_json::to_value(o).unwrap_or_default()
            })
            .filter(keep)
            .map(strip)
            .collect();
        items.sort_by_key(name_of);
        out.push((*file, *kind, items));
    }
    Ok(out)
}

/// Backs the cluster up into a new `cnishift-backup-<time>` under `parent`.
pub async fn backup(kube: &Kube, parent: &Path, cluster: &str) -> Result<Backup, BackupError> {
    let kinds = collect(kube).await?;
    let now = time::OffsetDateTime::now_utc();
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let base = dir_name(now);
    let mut name = base.clone();
    let mut n = 1;
    while parent.join(&name).exists() || parent.join(format!(".{name}.partial")).exists() {
        n += 1;
        name = format!("{base}-{n}");
    }
    let partial = parent.join(format!(".{name}.partial"));
    let dir = parent.join(&name);
    std::fs::create_dir(&partial).map_err(io(&partial))?;
    let stamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut files = vec![];
    let mut total = 0;
    for (file, kind, items) in kinds {
        if items.is_empty() {
            files.push(File {
                file: file.into(),
                kind: kind.into(),
                count: 0,
                objects: vec![],
            });
            continue;
        }
        let mut text = format!(
            "# {kind} of cluster {cluster:?}, saved by cnishift backup at {stamp} before the CNI migration.\n\
             # Server-set fields are stripped; restore with: kubectl apply -f {name}/\n"
        );
        for o in &items {
            text.push_str(&yaml::document(o));
        }
        let path = partial.join(file);
        let mut f = std::fs::File::create(&path).map_err(io(&path))?;
        f.write_all(text.as_bytes()).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        total += items.len();
        files.push(File {
            file: file.into(),
            kind: kind.into(),
            count: items.len(),
            objects: items.iter().map(name_of).collect(),
        });
    }
    std::fs::rename(&partial, &dir).map_err(io(&dir))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(Backup {
        dir,
        files,
        objects: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_set_fields_are_stripped_and_the_rest_kept() {
        let o = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "opi01", "uid": "u", "resourceVersion": "7", "creationTimestamp": "t", "managedFields": [], "generation": 2,
                         "ownerReferences": [{"uid": "x"}], "labels": {"a": "b"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "flannel.alpha.coreos.com/backend-type": "vxlan"}},
            "spec": {"podCIDR": "10.42.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"conditions": []}});
        assert_eq!(
            strip(o),
            json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "opi01", "labels": {"a": "b"}, "annotations": {"flannel.alpha.coreos.com/backend-type": "vxlan"}},
                "spec": {"podCIDR": "10.42.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]}})
        );
        let only_last = strip(
            json!({"metadata": {"name": "x", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}}),
        );
        assert_eq!(only_last, json!({"metadata": {"name": "x"}}));
    }

    #[test]
    fn only_ciliums_and_flannels_config_maps_are_kept() {
        let cm = |n: &str| json!({"metadata": {"name": n}});
        for n in [
            "cilium-config",
            "hubble-relay-config",
            "kube-flannel-cfg",
            "Cilium-Envoy",
        ] {
            assert!(cni_config_map(&cm(n)), "{n}");
        }
        for n in ["coredns", "kube-root-ca.crt", "local-path-config"] {
            assert!(!cni_config_map(&cm(n)), "{n}");
        }
    }

    #[test]
    fn the_directory_is_named_by_the_utc_second() {
        let t = time::macros::datetime!(2026-01-02 03:04:05 +02:00);
        assert_eq!(dir_name(t), "cnishift-backup-20260102T010405Z");
    }
}
