//! The machine's own kubectl against the simulated API server: it must accept
//! it, and leave the state a real cluster would.

use std::process::{Command, Output};
use std::time::Duration;

use cnishift_lab::apiserver::{kubeconfig, ApiServer};
use serde_json::Value;

struct Sim {
    api: ApiServer,
    kubeconfig: tempfile::NamedTempFile,
    addr: std::net::SocketAddr,
    rt: tokio::runtime::Runtime,
}

fn sim() -> Sim {
    let api = ApiServer::new();
    api.add_node("opi01", true, true);
    api.add_node("raccoon00", false, true);
    api.add_node("raccoon01", false, false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(api.clone().serve(listener));
    let kc = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kc.path(), kubeconfig(addr)).unwrap();
    Sim {
        api,
        kubeconfig: kc,
        addr,
        rt,
    }
}

impl Sim {
    fn kubectl(&self, args: &[&str]) -> Output {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(args)
            .output()
            .expect("kubectl is installed");
        out
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            o.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

#[test]
fn kubectl_gets_nodes_as_a_table_and_as_json() {
    let s = sim();
    let table = s.ok(&["get", "nodes"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["NAME", "STATUS", "ROLES", "AGE", "VERSION"]),
        "{table}"
    );
    assert!(
        table.contains("opi01") && table.contains("control-plane,etcd,master"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("raccoon01") && l.contains("NotReady")),
        "{table}"
    );
    let json: Value = serde_json::from_str(&s.ok(&["get", "nodes", "-o", "json"])).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 3);
    assert_eq!(
        s.ok(&[
            "get",
            "node",
            "raccoon00",
            "-o",
            "jsonpath={.metadata.name}"
        ]),
        "raccoon00"
    );
    let missing = s.kubectl(&["get", "node", "nosuch"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("Error from server (NotFound): nodes \"nosuch\" not found"));
    assert!(s
        .ok(&["version", "-o", "json"])
        .contains("v1.33.5+k3s1-cnishift-lab"));
}

#[test]
fn kubectl_cordon_and_uncordon_leave_the_state_a_real_cluster_would() {
    let s = sim();
    assert!(s
        .ok(&["cordon", "raccoon00"])
        .contains("node/raccoon00 cordoned"));
    assert_eq!(
        s.api.node("raccoon00").unwrap()["spec"]["unschedulable"],
        true
    );
    assert!(s
        .ok(&["get", "nodes"])
        .lines()
        .any(|l| l.starts_with("raccoon00") && l.contains("Ready,SchedulingDisabled")));
    assert!(
        s.ok(&["cordon", "raccoon00"]).contains("already cordoned"),
        "a second cordon changes nothing"
    );
    assert!(s
        .ok(&["uncordon", "raccoon00"])
        .contains("node/raccoon00 uncordoned"));
    assert!(s.api.node("raccoon00").unwrap()["spec"]
        .get("unschedulable")
        .is_none_or(|u| u == false));
}

#[test]
fn kubectl_patch_in_all_three_forms_and_bad_patches() {
    let s = sim();
    s.ok(&[
        "patch",
        "node",
        "opi01",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/cnishift~1phase","value":"cilium"}]"#,
    ]);
    s.ok(&[
        "patch",
        "node",
        "opi01",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"a":"b"}}}"#,
    ]);
    s.ok(&[
        "patch",
        "node",
        "opi01",
        "--type=strategic",
        "-p",
        r#"{"metadata":{"labels":{"a":null}}}"#,
    ]);
    let n = s.api.node("opi01").unwrap();
    assert_eq!(n["metadata"]["labels"]["cnishift/phase"], "cilium");
    assert!(n["metadata"]["labels"].get("a").is_none());
    let bad = s.kubectl(&[
        "patch",
        "node",
        "opi01",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/labels/nope"}]"#,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn kubectl_wait_sees_ready_as_the_lab_sets_it() {
    let s = sim();
    let api = s.api.clone();
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        api.set_node_ready("raccoon01", true);
    });
    let start = std::time::Instant::now();
    let out = s.ok(&[
        "wait",
        "--for=condition=Ready",
        "node/raccoon01",
        "--timeout=20s",
    ]);
    flip.join().unwrap();
    assert!(out.contains("node/raccoon01 condition met"), "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "seen by watch, not by timeout: {:?}",
        start.elapsed()
    );

    // A node that never becomes Ready: kubectl gives up at its timeout.
    s.api.set_node_ready("raccoon00", false);
    let o = s.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "node/raccoon00",
        "--timeout=1s",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_watch_resumes_from_a_resource_version() {
    let s = sim();
    let list: Value = serde_json::from_str(&s.ok(&["get", "--raw", "/api/v1/nodes"])).unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    s.api.set_node_ready("raccoon01", true);
    s.api.set_node_ready("raccoon01", false);
    // Watch from the list's version: exactly the two changes after it, then the stream ends at its timeout.
    let raw = s.ok(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
    ]);
    let events: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{raw}");
    assert!(events
        .iter()
        .all(|e| e["type"] == "MODIFIED" && e["object"]["metadata"]["name"] == "raccoon01"));
    let rvs: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(rvs[0] < rvs[1] && rvs[0] > rv.parse().unwrap());
    let _ = s.addr;
}

use cnishift_lab::apiserver::{Owner, Pod};
use serde_json::json;

/// raccoon00 runs a Deployment's pod and a DaemonSet's pod.
fn with_workload(s: &Sim) {
    s.api
        .add_replicaset("default", "web-5d9c", json!({"app": "web"}));
    s.api
        .add_daemonset("cilium", "cilium", json!({"k8s-app": "cilium"}));
    s.api.add_pod(Pod {
        ns: "default",
        name: "web-5d9c-a",
        node: "raccoon00",
        owner: Owner::ReplicaSet("web-5d9c"),
        labels: json!({"app": "web"}),
        ready: true,
        empty_dir: false,
    });
    s.api.add_pod(Pod {
        ns: "cilium",
        name: "cilium-x1",
        node: "raccoon00",
        owner: Owner::DaemonSet("cilium"),
        labels: json!({"k8s-app": "cilium"}),
        ready: true,
        empty_dir: false,
    });
    s.api.add_pod(Pod {
        ns: "kube-system",
        name: "kube-vip-raccoon00",
        node: "raccoon00",
        owner: Owner::Mirror,
        labels: json!({"app": "kube-vip"}),
        ready: true,
        empty_dir: false,
    });
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn kubectl_drain_evicts_reschedules_and_leaves_daemonset_and_mirror_pods() {
    let s = sim();
    with_workload(&s);
    let refused = s.kubectl(&["drain", "raccoon00", "--timeout=10s"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("cannot delete DaemonSet-managed Pods"),
        "{}",
        text(&refused)
    );

    let o = s.kubectl(&["drain", "raccoon00", "--ignore-daemonsets", "--timeout=20s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("evicting pod default/web-5d9c-a")
            && text(&o).contains("node/raccoon00 drained"),
        "{}",
        text(&o)
    );
    assert_eq!(
        s.api.node("raccoon00").unwrap()["spec"]["unschedulable"],
        true
    );
    assert!(s.api.pod("default", "web-5d9c-a").is_none(), "evicted");
    let left: Vec<String> = s
        .api
        .pods_on("raccoon00")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        left,
        ["cilium-x1", "kube-vip-raccoon00"],
        "DaemonSet and mirror pods stay"
    );
    // The Deployment's pod came back on a schedulable node (not the cordoned one, not the NotReady one).
    let replacement = s.api.pods_on("opi01");
    assert_eq!(replacement.len(), 1, "{replacement:#?}");
    assert_eq!(
        replacement[0]["metadata"]["ownerReferences"][0]["name"],
        "web-5d9c"
    );
}

#[test]
fn kubectl_drain_refuses_unmanaged_and_local_storage_pods_without_the_flags() {
    let s = sim();
    s.api.add_pod(Pod {
        ns: "default",
        name: "bare",
        node: "raccoon00",
        owner: Owner::None,
        labels: json!({"app": "bare"}),
        ready: true,
        empty_dir: false,
    });
    s.api
        .add_replicaset("default", "cache-1", json!({"app": "cache"}));
    s.api.add_pod(Pod {
        ns: "default",
        name: "cache-1-a",
        node: "raccoon00",
        owner: Owner::ReplicaSet("cache-1"),
        labels: json!({"app": "cache"}),
        ready: true,
        empty_dir: true,
    });
    let o = s.kubectl(&["drain", "raccoon00", "--ignore-daemonsets", "--timeout=10s"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("cannot delete Pods that declare no controller")
            && t.contains("cannot delete Pods with local storage"),
        "{t}"
    );
    assert!(
        s.api.pod("default", "bare").is_some(),
        "nothing evicted on a refusal"
    );
    let o = s.kubectl(&[
        "drain",
        "raccoon00",
        "--ignore-daemonsets",
        "--force",
        "--delete-emptydir-data",
        "--timeout=20s",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(s.api.pods_on("raccoon00").is_empty());
}

#[test]
fn kubectl_drain_retries_on_a_pdb_and_goes_on_once_it_allows() {
    let s = sim();
    s.api
        .add_replicaset("default", "db-7f", json!({"app": "db"}));
    s.api.add_pod(Pod {
        ns: "default",
        name: "db-7f-0",
        node: "raccoon00",
        owner: Owner::ReplicaSet("db-7f"),
        labels: json!({"app": "db"}),
        ready: true,
        empty_dir: false,
    });
    s.api.add_pod(Pod {
        ns: "default",
        name: "db-7f-1",
        node: "opi01",
        owner: Owner::ReplicaSet("db-7f"),
        labels: json!({"app": "db"}),
        ready: true,
        empty_dir: false,
    });
    s.api
        .add_pdb("default", "db", json!({"app": "db"}), Some(2), None);
    let pdb: Value = serde_json::from_str(&s.ok(&[
        "get",
        "--raw",
        "/apis/policy/v1/namespaces/default/poddisruptionbudgets",
    ]))
    .unwrap();
    assert_eq!(pdb["items"][0]["status"]["disruptionsAllowed"], 0);
    // A third healthy replica appears after kubectl's first refusal.
    let api = s.api.clone();
    let scale = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        api.add_pod(Pod {
            ns: "default",
            name: "db-7f-2",
            node: "opi01",
            owner: Owner::ReplicaSet("db-7f"),
            labels: json!({"app": "db"}),
            ready: true,
            empty_dir: false,
        });
    });
    let start = std::time::Instant::now();
    let o = s.kubectl(&["drain", "raccoon00", "--ignore-daemonsets", "--timeout=30s"]);
    scale.join().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("Cannot evict pod as it would violate the pod's disruption budget")
            && t.contains("will retry after 5s"),
        "{t}"
    );
    assert!(t.contains("node/raccoon00 drained"), "{t}");
    assert!(
        start.elapsed() >= Duration::from_secs(4),
        "kubectl retried on its interval"
    );
    assert!(s.api.pod("default", "db-7f-0").is_none());
}

#[test]
fn a_pdb_that_never_allows_stops_kubectl_drain_at_its_timeout() {
    let s = sim();
    s.api
        .add_replicaset("default", "pg-1", json!({"app": "pg"}));
    s.api.add_pod(Pod {
        ns: "default",
        name: "pg-1-0",
        node: "raccoon00",
        owner: Owner::ReplicaSet("pg-1"),
        labels: json!({"app": "pg"}),
        ready: true,
        empty_dir: false,
    });
    s.api
        .add_pdb("default", "pg", json!({"app": "pg"}), None, Some(0));
    let o = s.kubectl(&["drain", "raccoon00", "--ignore-daemonsets", "--timeout=3s"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("disruption budget"), "{t}");
    assert!(
        s.api.pod("default", "pg-1-0").is_some(),
        "the protected pod is still there"
    );
    // The eviction API itself says 429 with the budget named, for clients other than kubectl.
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), r#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"pg-1-0","namespace":"default"}}"#).unwrap();
    let raw = s.kubectl(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/pods/pg-1-0/eviction",
        "-f",
        body.path().to_str().unwrap(),
    ]);
    assert!(!raw.status.success());
    let t = text(&raw);
    assert!(
        t.contains("TooManyRequests")
            && t.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "{t}"
    );
}

#[test]
fn kubectl_shows_what_the_coordinator_did_events_lease_and_workload() {
    use cnishift::kube::events::{Kind, Step};
    let s = sim();
    s.api.add_homelab_workload(&["opi01", "raccoon00"]);
    let _in_runtime = s.rt.enter(); // kube's client spawns its buffer task
    let kube = cnishift::kube::Kube::for_url(&format!("http://{}", s.addr), Duration::from_secs(5))
        .unwrap();
    let guard = s.rt.block_on(async {
        let guard = kube
            .acquire_lock(&cnishift::kube::lease::LockOptions::new(
                "alice@admin pid 7".into(),
            ))
            .await
            .unwrap();
        kube.cordon("raccoon00").await.unwrap();
        kube.record(
            "raccoon00",
            Step {
                reason: "MigrationCordoned",
                action: "Cordon",
                note: "cnishift cordoned the node".into(),
                kind: Kind::Normal,
            },
            guard.holder(),
        )
        .await
        .unwrap();
        kube.record(
            "raccoon00",
            Step {
                reason: "MigrationDrainFailed",
                action: "Drain",
                note: "pod shop/db is kept by PodDisruptionBudget shop/db-pdb".into(),
                kind: Kind::Warning,
            },
            guard.holder(),
        )
        .await
        .unwrap();
        guard
    });
    let describe = s.ok(&["describe", "node", "raccoon00"]);
    let events: Vec<&str> = describe
        .lines()
        .skip_while(|l| !l.starts_with("Events:"))
        .collect();
    assert!(events.len() >= 4, "{describe}");
    assert!(
        events.iter().any(|l| l.contains("Normal")
            && l.contains("MigrationCordoned")
            && l.contains("cnishift.io/coordinator")),
        "{describe}"
    );
    assert!(
        events.iter().any(|l| l.contains("Warning")
            && l.contains("MigrationDrainFailed")
            && l.contains("shop/db-pdb")),
        "{describe}"
    );
    assert!(
        describe
            .lines()
            .any(|l| l.split_whitespace().eq(["Unschedulable:", "true"])),
        "{describe}"
    );
    assert!(
        !describe.contains("Failed to get lease"),
        "the kubelet's node Lease exists: {describe}"
    );
    // Another node's describe does not show them.
    assert!(!s
        .ok(&["describe", "node", "opi01"])
        .contains("MigrationCordoned"));

    let holder = s.ok(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        "cnishift-migration",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "alice@admin pid 7");
    let events = s.ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        "involvedObject.name=raccoon00",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&events).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{events}");
    let pods = s.ok(&["get", "pods", "-n", "argocd", "-o", "wide"]);
    let header: Vec<&str> = pods.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"],
        "{pods}"
    );
    assert_eq!(pods.lines().count(), 5, "4 ArgoCD pods: {pods}");
    assert!(
        pods.lines()
            .skip(1)
            .all(|l| l.contains(" 1/1 ") && l.contains("Running")),
        "{pods}"
    );
    let deploys = s.ok(&["get", "deployments", "-n", "argocd", "-o", "name"]);
    assert_eq!(
        deploys.lines().collect::<Vec<_>>(),
        [
            "deployment.apps/argocd-repo-server",
            "deployment.apps/argocd-server"
        ]
    );
    let pdb = s.ok(&[
        "get",
        "pdb",
        "-n",
        "argocd",
        "argocd-server",
        "-o",
        "jsonpath={.status.disruptionsAllowed}",
    ]);
    assert_eq!(pdb, "1");
    s.rt.block_on(guard.release()).unwrap();
    let gone = s.kubectl(&["get", "lease", "-n", "kube-system", "cnishift-migration"]);
    assert!(!gone.status.success());
    // A 404 from the server, not a kubectl or connection error.
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.starts_with("Error from server (NotFound): "),
        "{stderr}"
    );
}
