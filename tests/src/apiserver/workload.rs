//! The lab's hands on the cluster: nodes, workloads (the seed cluster's
//! homelab among them), readiness, Leases and Events, as controllers and
//! kubelets would write them.

use super::*;

impl ApiServer {
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
}

/// A node of `cnishift-lab up` as its k3s registers it.
pub struct LabNode<'a> {
    pub name: &'a str,
    pub controller: bool,
    /// `spec.podCIDR`, inside the inventory's pod CIDR.
    pub pod_cidr: &'a str,
    /// The InternalIP: the node's lab address.
    pub address: std::net::Ipv4Addr,
    pub kernel: &'a str,
}

impl ApiServer {
    /// Registers a lab node (Ready, with its podCIDR and InternalIP) and its heartbeat Lease.
    pub fn add_lab_node(&self, n: &LabNode) {
        self.add_node(n.name, n.controller, true);
        let mut store = self.store.lock().expect("store");
        let Some(mut node) = store.get("nodes", "", n.name).cloned() else {
            return;
        };
        node["spec"]["podCIDR"] = json!(n.pod_cidr);
        node["spec"]["podCIDRs"] = json!([n.pod_cidr]);
        node["status"]["addresses"] = json!([{"type": "InternalIP", "address": n.address.to_string()}, {"type": "Hostname", "address": n.name}]);
        node["status"]["nodeInfo"]["kernelVersion"] = json!(n.kernel);
        self.commit(&mut store, "MODIFIED", "nodes", node);
    }

    /// The node's InternalIP as the kubelet reports it.
    pub fn set_node_internal_ip(&self, name: &str, ip: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut node) = store.get("nodes", "", name).cloned() else {
            return;
        };
        node["status"]["addresses"] =
            json!([{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]);
        self.commit(&mut store, "MODIFIED", "nodes", node);
    }

    /// The kubelet's Ready condition with its reason and message; nothing is
    /// written when it already says so (a real kubelet only heartbeats).
    pub fn set_node_condition(&self, name: &str, ready: bool, reason: &str, message: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut node) = store.get("nodes", "", name).cloned() else {
            return;
        };
        let cond = &node["status"]["conditions"][0];
        let want = if ready { "True" } else { "False" };
        if cond["status"] == want && cond["reason"] == reason && cond["message"] == message {
            return;
        }
        let mut c = ready_condition(ready);
        c["reason"] = json!(reason);
        c["message"] = json!(message);
        node["status"]["conditions"] = json!([c]);
        self.commit(&mut store, "MODIFIED", "nodes", node);
    }

    /// The kubelet renews its node Lease.
    pub fn renew_node_lease(&self, name: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut lease) = store.get("leases", "kube-node-lease", name).cloned() else {
            return;
        };
        lease["spec"]["renewTime"] = json!(now_rfc3339().replace('Z', ".000000Z"));
        self.commit(&mut store, "MODIFIED", "leases", lease);
    }

    /// Every object of `resource` ("nodes", "pods", "daemonsets", ...) as stored now.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store.list(resource, None).into_iter().cloned().collect()
    }

    /// A DaemonSet whose pods go only to nodes matching `node_selector`
    /// (`spec.template.spec.nodeSelector`); the lab's DaemonSet controller
    /// places them.
    pub fn add_daemonset_selecting(
        &self,
        ns: &str,
        name: &str,
        labels: Value,
        node_selector: Value,
    ) {
        let mut store = self.store.lock().expect("store");
        self.ensure_namespace(&mut store, ns);
        let obj = json!({"kind": "DaemonSet", "apiVersion": "apps/v1", "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("ds/{ns}/{name}")), "creationTimestamp": now_rfc3339(), "labels": labels, "generation": 1},
                         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {"nodeSelector": node_selector}}}});
        self.commit(&mut store, "ADDED", "daemonsets", obj);
    }

    /// Records a container restart of a pod (CrashLoopBackOff, not Ready), as the kubelet does.
    pub fn crashloop_pod(&self, ns: &str, name: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut pod) = store.get("pods", ns, name).cloned() else {
            return;
        };
        let restarts = pod["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0)
            + 1;
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
        pod["status"]["containerStatuses"] = json!([{"name": "main", "ready": false, "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}}]);
        self.commit(&mut store, "MODIFIED", "pods", pod);
    }

    /// Clears a pod's container restarts state (it runs again).
    pub fn clear_pod_waiting(&self, ns: &str, name: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut pod) = store.get("pods", ns, name).cloned() else {
            return;
        };
        if pod["status"].get("containerStatuses").is_none() {
            return;
        }
        let restarts = pod["status"]["containerStatuses"][0]["restartCount"].clone();
        pod["status"]["containerStatuses"] = json!([{"name": "main", "ready": false, "restartCount": restarts, "state": {"running": {}}}]);
        self.commit(&mut store, "MODIFIED", "pods", pod);
    }

    /// The seed cluster's workload, shaped like the homelab the runbook
    /// migrates: Deployments behind PodDisruptionBudgets (argocd-server,
    /// ingress-nginx, vaultwarden with `minAvailable: 1`, longhorn-ui),
    /// DaemonSets (longhorn-manager everywhere, kube-vip on controllers), and
    /// the Cilium DaemonSet (`k8s-app=cilium` in `cilium_ns`, limited to
    /// `cilium_selector`) whose pods the lab places itself.
    pub fn add_seed_workload(
        &self,
        nodes: &[(&str, bool)],
        cilium_ns: &str,
        cilium_selector: Value,
    ) {
        let all: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
        let controllers: Vec<&str> = nodes.iter().filter(|(_, c)| *c).map(|(n, _)| *n).collect();
        let workers: Vec<&str> = nodes.iter().filter(|(_, c)| !*c).map(|(n, _)| *n).collect();
        let spread = if workers.is_empty() { &all } else { &workers };
        let l = |app: &str| json!({ "app.kubernetes.io/name": app });
        self.add_daemonset_selecting(
            "longhorn-system",
            "longhorn-manager",
            l("longhorn-manager"),
            json!({"kubernetes.io/os": "linux"}),
        );
        self.add_daemonset_selecting(
            "kube-system",
            "kube-vip",
            l("kube-vip"),
            json!({"node-role.kubernetes.io/control-plane": "true"}),
        );
        self.add_daemonset_selecting(
            cilium_ns,
            crate::supervisor::CILIUM_DS,
            json!({"k8s-app": "cilium"}),
            cilium_selector,
        );
        let mut vaultwarden_pods = vec![];
        for (ns, name, replicas) in [
            ("kube-system", "coredns", 1),
            ("argocd", "argocd-server", 2),
            ("ingress-nginx", "ingress-nginx-controller", 2),
            ("vaultwarden", "vaultwarden", 2),
            ("longhorn-system", "longhorn-ui", 2),
        ] {
            let pods = self.add_deployment(ns, name, l(name), replicas, spread);
            if name == "vaultwarden" {
                vaultwarden_pods = pods;
            }
        }
        // Installed with Cilium's Helm chart before the first node moves; a
        // Deployment, so it is not limited to migrated nodes.
        self.add_deployment(
            cilium_ns,
            "cilium-operator",
            json!({"io.cilium/app": "operator", "name": "cilium-operator"}),
            1,
            spread,
        );
        self.add_statefulset("database", "postgres", l("postgres"), 1, spread);
        self.add_seed_storage(&all, &workers, spread, &vaultwarden_pods);
        self.add_seed_config(cilium_ns);
        self.add_pdb("argocd", "argocd-server", l("argocd-server"), Some(1), None);
        self.add_pdb(
            "ingress-nginx",
            "ingress-nginx-controller",
            l("ingress-nginx-controller"),
            Some(1),
            None,
        );
        self.add_pdb(
            "vaultwarden",
            "vaultwarden",
            l("vaultwarden"),
            Some(1),
            None,
        );
        self.add_pdb(
            "longhorn-system",
            "longhorn-ui",
            l("longhorn-ui"),
            None,
            Some(1),
        );
        let _ = controllers;
    }

    /// Creates the pod DaemonSet `ds` (in `ns`) wants on `node`, as its controller would.
    pub fn add_daemon_pod(
        &self,
        ns: &str,
        ds: &str,
        node: &str,
        labels: Value,
        ready: bool,
    ) -> String {
        let mut store = self.store.lock().expect("store");
        store.next_pod += 1;
        let name = format!(
            "{ds}-{}",
            suffix(&format!("ds/{ns}/{ds}/{node}/{}", store.next_pod), 5)
        );
        let pod = pod_object(&Pod {
            ns,
            name: &name,
            node,
            owner: Owner::DaemonSet(ds),
            labels,
            ready,
            empty_dir: false,
        });
        self.commit(&mut store, "ADDED", "pods", pod);
        name
    }
}

impl ApiServer {
    /// Stores `object` (of a resource the server serves) as its controller
    /// or an admin would have created it; its namespace is created if new.
    pub fn add_object(&self, resource: &'static str, mut object: Value) {
        let mut store = self.store.lock().expect("store");
        if let Some(ns) = object["metadata"]["namespace"].as_str().map(String::from) {
            self.ensure_namespace(&mut store, &ns);
        }
        let (kind, api_version) = type_of(resource);
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if object["metadata"].get("uid").is_none() {
            object["metadata"]["uid"] = json!(uid(&format!("{resource}/{name}")));
        }
        if object["metadata"].get("creationTimestamp").is_none() {
            object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        }
        self.commit(&mut store, "ADDED", resource, object);
    }

    /// The seed's Longhorn: postgres's claim and vaultwarden's (RWX, for its two
    /// pods), each a Longhorn volume with up to three healthy replicas spread
    /// over the nodes, workers first, as Longhorn's scheduler places them.
    fn add_seed_storage(
        &self,
        all: &[&str],
        workers: &[&str],
        spread: &[&str],
        vaultwarden_pods: &[String],
    ) {
        let mut order: Vec<&str> = workers.to_vec();
        order.extend(all.iter().filter(|n| !workers.contains(n)));
        let n = order.len().min(3);
        let pick = |offset: usize| -> Vec<&str> {
            (0..n).map(|i| order[(i + offset) % order.len()]).collect()
        };
        let pg_claim = "data-postgres-0";
        let pg_pv = format!("pvc-{}", uid(&format!("pv/database/{pg_claim}")));
        self.add_longhorn_volume(
            &pg_pv,
            ("database", pg_claim),
            ("postgres-0", "postgres", "StatefulSet"),
            spread[0],
            &pick(0),
        );
        let vw_claim = "vaultwarden-data";
        let vw_pv = format!("pvc-{}", uid(&format!("pv/vaultwarden/{vw_claim}")));
        {
            let mut store = self.store.lock().expect("store");
            let labels = json!({"app.kubernetes.io/name": "vaultwarden"});
            let pvc = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                "metadata": {"name": vw_claim, "namespace": "vaultwarden", "uid": uid(&format!("pvc/vaultwarden/{vw_claim}")), "creationTimestamp": now_rfc3339(), "labels": labels},
                "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "longhorn", "resources": {"requests": {"storage": "10Gi"}}, "volumeName": vw_pv},
                "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"], "capacity": {"storage": "10Gi"}}});
            self.commit(&mut store, "ADDED", "persistentvolumeclaims", pvc);
            self.commit(
                &mut store,
                "ADDED",
                "persistentvolumes",
                super::longhorn::longhorn_pv(&vw_pv, "vaultwarden", vw_claim, true),
            );
        }
        let vw_pod = vaultwarden_pods
            .first()
            .map(String::as_str)
            .unwrap_or("vaultwarden");
        let vw_node = self
            .pod("vaultwarden", vw_pod)
            .and_then(|p| p["spec"]["nodeName"].as_str().map(String::from))
            .unwrap_or_else(|| spread[0].to_string());
        let rs = vw_pod
            .rsplit_once('-')
            .map(|(rs, _)| rs.to_string())
            .unwrap_or_default();
        self.add_longhorn_volume(
            &vw_pv,
            ("vaultwarden", vw_claim),
            (vw_pod, &rs, "ReplicaSet"),
            &vw_node,
            &pick(1),
        );
    }

    /// The ConfigMaps and NetworkPolicies of the seed: Cilium's Helm-made
    /// cilium-config, CoreDNS's, and the runbook's two NetworkPolicies.
    fn add_seed_config(&self, cilium_ns: &str) {
        let helm = json!({"meta.helm.sh/release-name": "cilium", "meta.helm.sh/release-namespace": cilium_ns});
        self.add_object("configmaps", json!({
            "metadata": {"name": "cilium-config", "namespace": cilium_ns, "labels": {"app.kubernetes.io/managed-by": "Helm"}, "annotations": helm},
            "data": {"routing-mode": "native", "ipam": "kubernetes", "auto-direct-node-routes": "true",
                     "ipv4-native-routing-cidr": "10.0.0.0/8", "kube-proxy-replacement": "false", "enable-bpf-masquerade": "true",
                     "cni-exclusive": "true", "enable-hubble": "true", "cluster-name": "default", "tunnel-protocol": "vxlan"}}));
        self.add_object("configmaps", json!({
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"objectset.rio.cattle.io/hash": "bce283298811743a0386ab510f2f67ef74240c57"}},
            "data": {"Corefile": ".:53 {\n    errors\n    health\n    ready\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n      pods insecure\n      fallthrough in-addr.arpa ip6.arpa\n    }\n    forward . /etc/resolv.conf\n    cache 30\n}\n", "NodeHosts": "10.1.0.11 opi01\n"}}));
        self.add_object("networkpolicies", json!({
            "metadata": {"name": "marmithon-egress", "namespace": "irc", "labels": {"app.kubernetes.io/name": "marmithon"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}, "generation": 1},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "marmithon"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}]},
                                {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                                 "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}}));
        self.add_object("networkpolicies", json!({
            "metadata": {"name": "vaultwarden", "namespace": "vaultwarden", "labels": {"app.kubernetes.io/name": "vaultwarden"}},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vaultwarden"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
                                  "ports": [{"protocol": "TCP", "port": 80}]}]}}));
    }

    /// Deletes an object as its owner's controller (or an admin) would; a
    /// ReplicaSet's pod gets its replacement as with any deletion.
    pub fn remove_object(&self, resource: &'static str, ns: &str, name: &str) -> bool {
        let mut store = self.store.lock().expect("store");
        let Some(obj) = store.get(resource, ns, name).cloned() else {
            return false;
        };
        if resource == "pods" {
            remove_pod(self, &mut store, obj);
        } else {
            self.commit(&mut store, "DELETED", resource, obj);
        }
        true
    }
}

impl ApiServer {
    /// A StatefulSet with `replicas` Ready pods `NAME-0`, `NAME-1`, ... spread
    /// over `nodes`, each with its bound PersistentVolumeClaim `data-NAME-i`
    /// (Longhorn's storage class, as on the seed).
    pub fn add_statefulset(
        &self,
        ns: &str,
        name: &str,
        labels: Value,
        replicas: usize,
        nodes: &[&str],
    ) {
        {
            let mut store = self.store.lock().expect("store");
            self.ensure_namespace(&mut store, ns);
            let obj = json!({"kind": "StatefulSet", "apiVersion": "apps/v1",
                "metadata": {"name": name, "namespace": ns, "uid": uid(&format!("sts/{ns}/{name}")), "creationTimestamp": now_rfc3339(), "labels": labels, "generation": 1},
                "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}},
                         "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "longhorn", "resources": {"requests": {"storage": "10Gi"}}}}]},
                "status": {"replicas": replicas, "readyReplicas": replicas, "currentReplicas": replicas, "updatedReplicas": replicas, "observedGeneration": 1}});
            self.commit(&mut store, "ADDED", "statefulsets", obj);
            for i in 0..replicas {
                let claim = format!("data-{name}-{i}");
                let pvc = json!({"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                    "metadata": {"name": claim, "namespace": ns, "uid": uid(&format!("pvc/{ns}/{claim}")), "creationTimestamp": now_rfc3339(), "labels": labels},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "longhorn", "resources": {"requests": {"storage": "10Gi"}}, "volumeName": format!("pvc-{}", uid(&format!("pv/{ns}/{claim}")))},
                    "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "10Gi"}}});
                self.commit(&mut store, "ADDED", "persistentvolumeclaims", pvc);
                let pv = format!("pvc-{}", uid(&format!("pv/{ns}/{claim}")));
                self.commit(
                    &mut store,
                    "ADDED",
                    "persistentvolumes",
                    super::longhorn::longhorn_pv(&pv, ns, &claim, false),
                );
            }
        }
        for i in 0..replicas {
            self.add_pod(Pod {
                ns,
                name: &format!("{name}-{i}"),
                node: nodes[i % nodes.len().max(1)],
                owner: Owner::StatefulSet(name),
                labels: labels.clone(),
                ready: true,
                empty_dir: false,
            });
        }
    }
}
