//! The storage gate before a drain (`cnishift::migrate::storage`) against the
//! simulated API server over real HTTP: Longhorn's volumes and replicas as
//! custom resources (served only with their CRDs, as the machine's kubectl
//! sees them), and PersistentVolumes pinned to a node by local-path's node
//! affinity.

use std::process::Command;
use std::time::Duration;

use cnishift::inventory::DrainPolicy;
use cnishift::kube::drain::DrainError;
use cnishift::kube::{Kube, KubeError};
use cnishift::migrate::storage;
use cnishift_lab::apiserver::{kubeconfig, ApiServer};
use serde_json::json;

async fn sim(with_longhorn: bool) -> (ApiServer, std::net::SocketAddr, Kube, String) {
    let api = ApiServer::new();
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
        api.add_node(n, i == 0, true);
    }
    let l = json!({"app.kubernetes.io/name": "postgres"});
    api.add_statefulset("database", "postgres", l, 1, &["n1"]);
    let pvc = api.pod("database", "postgres-0").unwrap()["spec"]["volumes"][0]
        ["persistentVolumeClaim"]["claimName"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(pvc, "data-postgres-0");
    let pv = bound_pv(&api);
    if with_longhorn {
        api.add_longhorn_volume(
            &pv,
            ("database", "data-postgres-0"),
            ("postgres-0", "postgres", "StatefulSet"),
            "n1",
            &["n1", "n2", "n3"],
        );
    }
    let addr = api.start().await;
    let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_secs(2)).unwrap();
    (api, addr, kube, pv)
}

/// The PV the StatefulSet's claim is bound to.
fn bound_pv(api: &ApiServer) -> String {
    api.list("persistentvolumeclaims")
        .iter()
        .find(|c| c["metadata"]["name"] == "data-postgres-0")
        .and_then(|c| c["spec"]["volumeName"].as_str().map(String::from))
        .unwrap()
}

fn reasons(e: KubeError) -> Vec<String> {
    match e {
        KubeError::Drain(DrainError::Storage { node, reasons }) => {
            assert_eq!(node, "n1");
            reasons
        }
        other => panic!("not a storage refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_only_healthy_replica_is_on_the_node_refuses_its_drain() {
    let (api, _, kube, pv) = sim(true).await;
    let p = DrainPolicy::default();
    let ok = storage::check(&kube, "n1", &p).await.unwrap();
    assert!(
        ok.contains(&format!("1 Longhorn volume(s) with a replica on n1 have a healthy one elsewhere: {pv} (healthy on n2, n3)")),
        "{ok}"
    );
    api.longhorn_sole_replica(&pv, "n1").unwrap();
    let r = reasons(storage::check(&kube, "n1", &p).await.unwrap_err());
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(
        r[0].starts_with(&format!("Longhorn volume longhorn-system/{pv} (claim database/data-postgres-0, degraded) has its only healthy replica on n1 ("))
            && r[0].contains("on n2 (failed, error)"),
        "{}",
        r[0]
    );
    // Another node's drain is fine: the healthy replica stays on n1.
    storage::check(&kube, "n2", &p).await.unwrap();
    // Rebuilt, but the other replicas' nodes cordoned: they do not count.
    api.longhorn_rebuilt(&pv);
    storage::check(&kube, "n1", &p).await.unwrap();
    for n in ["n2", "n3"] {
        kube.cordon(n).await.unwrap();
    }
    let r = reasons(storage::check(&kube, "n1", &p).await.unwrap_err());
    assert!(r[0].contains("(its node is cordoned)"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_longhorn_crds_only_pinned_volumes_are_checked() {
    let (api, _, kube, pv) = sim(false).await;
    let p = DrainPolicy::default();
    let ok = storage::check(&kube, "n1", &p).await.unwrap();
    assert!(ok.starts_with("storage: Longhorn's CRDs are not served (no volumes.longhorn.io); no pod to move from n1 uses a PersistentVolume pinned to it (1 claims checked)"), "{ok}");
    // local-path: the PV's node affinity pins it to n1.
    assert_eq!(
        api.pin_claim_to_node("database", "data-postgres-0", "n1")
            .as_deref(),
        Some(pv.as_str())
    );
    let r = reasons(storage::check(&kube, "n1", &p).await.unwrap_err());
    assert_eq!(
        r,
        [format!("pod database/postgres-0 uses claim database/data-postgres-0, bound to PersistentVolume {pv} (local-path) whose node affinity pins it to n1: the pod cannot run on another node and stays Pending until n1 is back (allow with [drain] allow_pinned_volumes = true, or move its data first)")]
    );
    let allow = DrainPolicy {
        allow_pinned_volumes: true,
        ..DrainPolicy::default()
    };
    let ok = storage::check(&kube, "n1", &allow).await.unwrap();
    assert!(
        ok.contains("(allowed by [drain] allow_pinned_volumes)"),
        "{ok}"
    );
    // The pin is about n1 only.
    storage::check(&kube, "n2", &p).await.unwrap();
}

#[test]
fn kubectl_reads_longhorn_volumes_and_replicas_with_their_printer_columns() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (api, addr, _kube, pv) = rt.block_on(sim(false));
    let kc = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kc.path(), kubeconfig(addr)).unwrap();
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .env("KUBECONFIG", kc.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(args)
            .output()
            .expect("kubectl is installed")
    };
    // Before the CRDs are installed the resource type does not exist.
    let o = kubectl(&["get", "volumes.longhorn.io", "-n", "longhorn-system"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("the server doesn't have a resource type \"volumes\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    api.add_longhorn_volume(
        &pv,
        ("database", "data-postgres-0"),
        ("postgres-0", "postgres", "StatefulSet"),
        "n1",
        &["n1", "n2"],
    );
    let o = kubectl(&["get", "volumes.longhorn.io", "-n", "longhorn-system"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].split_whitespace().eq([
            "NAME",
            "DATA",
            "ENGINE",
            "STATE",
            "ROBUSTNESS",
            "SCHEDULED",
            "SIZE",
            "NODE",
            "AGE"
        ]),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&pv)
            && lines[1].contains("attached")
            && lines[1].contains("healthy")
            && lines[1].contains("n1"),
        "{out}"
    );
    let o = kubectl(&["get", "lhr", "-n", "longhorn-system", "-o", "jsonpath={range .items[*]}{.spec.nodeID} {.spec.volumeName} {.status.currentState}{\"\\n\"}{end}"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("n1 {pv} running\nn2 {pv} running\n")
    );
    let o = kubectl(&[
        "get",
        "volumes.longhorn.io",
        "nosuch",
        "-n",
        "longhorn-system",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("Error from server (NotFound): volumes.longhorn.io \"nosuch\" not found"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = kubectl(&[
        "get",
        "pv",
        &pv,
        "-o",
        "jsonpath={.spec.csi.driver} {.spec.claimRef.name}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "driver.longhorn.io data-postgres-0"
    );
}
