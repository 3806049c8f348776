//! The resource store: every object by (resource, namespace, name), one
//! resourceVersion counter, the history of changes watches resume from, and
//! the names, uids and dates objects are created with.

use super::*;

/// (resource, namespace — empty for cluster-scoped, name)
pub(crate) type Key = (&'static str, String, String);

/// One change, as a watch stream sends it.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: &'static str,
    pub(crate) resource: &'static str,
    pub(crate) object: Value,
}

pub(crate) struct Store {
    pub(crate) rv: u64,
    pub(crate) objects: BTreeMap<Key, Value>,
    /// Every change, for watches that resume from an older resourceVersion.
    pub(crate) history: Vec<Change>,
    /// Suffix counter for replacement pods.
    pub(crate) next_pod: u64,
}

impl Store {
    pub(crate) fn list(&self, resource: &str, ns: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| *r == resource && ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v)
            .collect()
    }
    pub(crate) fn get(&self, resource: &'static str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource, ns.to_string(), name.to_string()))
    }
}

impl ApiServer {
    /// Stores `object` under a fresh resourceVersion and tells watchers.
    pub(crate) fn commit(
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

    pub(crate) fn ensure_namespace(&self, store: &mut Store, ns: &str) {
        if store.get("namespaces", "", ns).is_none() {
            let obj = json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns, "uid": uid(&format!("ns/{ns}")), "creationTimestamp": now_rfc3339()}, "status": {"phase": "Active"}});
            self.commit(store, "ADDED", "namespaces", obj);
        }
    }
}

pub(crate) fn uid(seed: &str) -> String {
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
pub(crate) fn suffix(seed: &str, n: usize) -> String {
    let u = uid(seed).replace('-', "");
    u[u.len() - n..].to_string()
}

pub(crate) fn now_rfc3339() -> String {
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

/// The resources served by the generic list/watch/get handlers, by index
/// (their kinds and apiVersions come from [`type_of`]).
pub(crate) const RESOURCES: [&str; 17] = [
    "nodes",
    "namespaces",
    "pods",
    "poddisruptionbudgets",
    "daemonsets",
    "deployments",
    "replicasets",
    "leases",
    "events",
    "statefulsets",
    "persistentvolumeclaims",
    "persistentvolumes",
    "configmaps",
    "networkpolicies",
    "customresourcedefinitions",
    "volumes.longhorn.io",
    "replicas.longhorn.io",
];
pub(crate) const NODES: usize = 0;
pub(crate) const NAMESPACES: usize = 1;
pub(crate) const PODS: usize = 2;
pub(crate) const PDBS: usize = 3;
pub(crate) const DAEMONSETS: usize = 4;
pub(crate) const DEPLOYMENTS: usize = 5;
pub(crate) const REPLICASETS: usize = 6;
pub(crate) const LEASES: usize = 7;
pub(crate) const EVENTS: usize = 8;
pub(crate) const STATEFULSETS: usize = 9;
pub(crate) const PVCS: usize = 10;
pub(crate) const PVS: usize = 11;
pub(crate) const CONFIGMAPS: usize = 12;
pub(crate) const NETPOLS: usize = 13;
pub(crate) const CRDS: usize = 14;
pub(crate) const LH_VOLUMES: usize = 15;
pub(crate) const LH_REPLICAS: usize = 16;

/// (kind, apiVersion) of a resource's objects.
pub(crate) fn type_of(resource: &str) -> (&'static str, &'static str) {
    match resource {
        "nodes" => ("Node", "v1"),
        "pods" => ("Pod", "v1"),
        "namespaces" => ("Namespace", "v1"),
        "poddisruptionbudgets" => ("PodDisruptionBudget", "policy/v1"),
        "daemonsets" => ("DaemonSet", "apps/v1"),
        "deployments" => ("Deployment", "apps/v1"),
        "replicasets" => ("ReplicaSet", "apps/v1"),
        "statefulsets" => ("StatefulSet", "apps/v1"),
        "persistentvolumeclaims" => ("PersistentVolumeClaim", "v1"),
        "persistentvolumes" => ("PersistentVolume", "v1"),
        "configmaps" => ("ConfigMap", "v1"),
        "networkpolicies" => ("NetworkPolicy", "networking.k8s.io/v1"),
        "customresourcedefinitions" => ("CustomResourceDefinition", "apiextensions.k8s.io/v1"),
        "volumes.longhorn.io" => ("Volume", "longhorn.io/v1beta2"),
        "replicas.longhorn.io" => ("Replica", "longhorn.io/v1beta2"),
        "leases" => ("Lease", "coordination.k8s.io/v1"),
        "events" => ("Event", "events.k8s.io/v1"),
        _ => ("Unknown", "v1"),
    }
}
