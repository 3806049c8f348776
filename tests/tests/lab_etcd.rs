//! `cnishift migrate` and k3s's embedded etcd, end to end in a `cnishift-lab
//! up` lab whose controllers run a real etcd cluster (one member per
//! controller namespace, k3s's addresses and certificate paths): the real
//! coordinator, the real agents (their snapshot command is `etcdctl snapshot
//! save`), observed as an admin would — exit code, `-o json` events, the
//! halt message, `kubectl`, the snapshot file and `etcdctl snapshot status`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnishift_lab::etcd;
use cnishift_lab::harness::{cnishift_bin, text, Up};
use cnishift_lab::require_root;
use serde_json::Value;

fn inventory(cluster: &str, controllers: &[&str]) -> String {
    let mut s = format!(
        r#"
[cluster]
name = "{cluster}"
pod_cidr = "10.63.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "4s"
api = "2s"
drain = "5s"
node_ready = "4s"
cilium_ready = "4s"
deploy = "10s"
confirm = "20s"
rollback = "20s"
verify = "5s"
repod = "5s"

[drain]
retry_interval = "200ms"

[cilium]
node_label = "cnishift.io/cni=cilium"
"#
    );
    for (i, c) in controllers.iter().enumerate() {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{c}\"\nrole = \"controller\"\naddress = \"10.9.8.{}:7443\"\n",
            i + 1
        ));
    }
    s.push_str("\n[[nodes]]\nname = \"w-1\"\nrole = \"worker\"\naddress = \"10.9.8.9:7443\"\n");
    s
}

fn cnishift(lab: &Up, state: &Path, args: &[&str]) -> Output {
    Command::new(cnishift_bin())
        .arg(args[0])
        .arg("-i")
        .arg(lab.cluster_toml())
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .arg("--state-dir")
        .arg(state)
        .args(&args[1..])
        .env_remove("CNISHIFT_INVENTORY")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

struct Run {
    code: Option<i32>,
    events: Vec<Value>,
    all: String,
}

impl Run {
    fn halted(&self) -> &Value {
        self.events
            .iter()
            .find(|e| e["phase"] == "halted")
            .unwrap_or_else(|| panic!("no halted event:\n{}", self.all))
    }
    fn position(&self, step: &str, node: Option<&str>, phase: &str) -> usize {
        self.events
            .iter()
            .position(|e| {
                e["step"] == step
                    && e["phase"] == phase
                    && node.map_or(e["node"].is_null(), |n| e["node"] == n)
            })
            .unwrap_or_else(|| panic!("no {step} {node:?} {phase}:\n{}", self.all))
    }
}

fn migrate(lab: &Up, state: &Path) -> Run {
    let o = cnishift(lab, state, &["migrate", "-o", "json"]);
    let events = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect();
    Run {
        code: o.status.code(),
        events,
        all: text(&o),
    }
}

fn cordoned(lab: &Up, node: &str) -> bool {
    let v: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "node", node, "-o", "json"])).unwrap();
    v["spec"]["unschedulable"].as_bool().unwrap_or(false)
}

fn host_root(lab: &Up, node: &str) -> PathBuf {
    let rec = lab.record();
    let n = rec["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap();
    PathBuf::from(n["host_root"].as_str().unwrap())
}

fn state_dir(lab: &Up) -> PathBuf {
    lab.dir.with_file_name("migrate-state")
}

#[test]
fn a_controller_whose_etcd_member_is_stopped_blocks_the_run_naming_it() {
    if !require_root("cnishift-lab up") || !etcd::require_etcd("the lab's etcd") {
        return;
    }
    let lab = Up::new(
        &inventory("etcd-quorum", &["ctl-a", "ctl-b", "ctl-c"]),
        &["--fault", "ctl-b:etcd-down"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert_eq!(
        (&h["node"], &h["step"]),
        (&Value::from("ctl-a"), &Value::from("preflight")),
        "{h}"
    );
    let cause = h["detail"].as_str().unwrap();
    assert!(
        cause.contains(
            "taking ctl-a down would lose etcd's quorum: 1 other healthy voting member of 3 (quorum 2); ctl-b (member ctl-b "
        ),
        "{cause}"
    );
    assert!(
        cause.contains("is not healthy: https://127.0.0.1:2379:"),
        "{cause}"
    );
    assert!(cause.contains("Connection refused"), "{cause}");
    // Refused before anything was touched: no snapshot, no node cordoned.
    assert!(!cordoned(&lab, "ctl-a"), "ctl-a was cordoned");
    assert!(
        !run.events.iter().any(|e| e["step"] == "etcd-snapshot"),
        "{}",
        run.all
    );
    let snaps = host_root(&lab, "ctl-a").join(etcd::SNAPSHOT_DIR);
    assert_eq!(std::fs::read_dir(snaps).unwrap().count(), 0);
    // What a person sees first: the stopped member, named.
    let o = lab.cnishift(&["etcd", "status"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("✗ ctl-a        taking ctl-a down would lose etcd's quorum"),
        "{}",
        text(&o)
    );
}

#[test]
fn without_a_possible_snapshot_migrate_is_refused_and_with_one_the_file_is_a_real_snapshot() {
    if !require_root("cnishift-lab up") || !etcd::require_etcd("the lab's etcd") {
        return;
    }
    let lab = Up::new(
        &inventory("etcd-snapshot", &["ctl-a"]),
        &["--fault", "ctl-a:etcd-snapshot-fails"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert!(h["node"].is_null() && h["step"] == "etcd-snapshot", "{h}");
    let msg = h["detail"].as_str().unwrap();
    assert!(
        msg.starts_with("halted at step etcd-snapshot: no etcd snapshot could be taken, and migrate does not touch the first controller without one: ctl-a: agent error FailedPrecondition: the etcd snapshot command `sh -c exec etcdctl "),
        "{msg}"
    );
    assert!(
        msg.contains("not a directory"),
        "etcdctl's own words: {msg}"
    );
    assert!(msg.contains("resume with --skip-etcd-snapshot"), "{msg}");
    assert!(!cordoned(&lab, "ctl-a") && !cordoned(&lab, "w-1"));

    // The disk fixed: the resumed run takes the snapshot, then migrates.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(0), "{}", run.all);
    let done = &run.events[run.position("etcd-snapshot", None, "done")];
    assert!(
        run.position("etcd-snapshot", None, "done")
            < run.position("cordon", Some("ctl-a"), "started"),
        "{}",
        run.all
    );
    let detail = done["detail"].as_str().unwrap();
    let path = detail
        .strip_prefix("ctl-a: ")
        .and_then(|d| d.split(' ').next())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!(
        path.starts_with("/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-"),
        "{detail}"
    );
    let file = host_root(&lab, "ctl-a").join(path.trim_start_matches('/'));
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(detail.contains(&format!("({size} bytes, ")), "{detail}");
    let out = Command::new(etcd::tool("etcdctl").unwrap())
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["totalKey"].as_u64().is_some(), "{st}");
    // The journal keeps it.
    let journal = std::fs::read_to_string(state.join("journal.jsonl")).unwrap();
    assert!(journal.contains(path), "{journal}");
}
