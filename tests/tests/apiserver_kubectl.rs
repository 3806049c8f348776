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
    _rt: tokio::runtime::Runtime,
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
        _rt: rt,
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
