//! `cnishift migrate` end to end across a `cnishift-lab up` lab with a fault
//! injected: the real coordinator, the real agents (whose dead-man rollback
//! runs `cnishift-lab rollback`), observed the way an admin would — exit code,
//! message, `-o json` events, `cnishift status`, and the machine's `kubectl` —
//! never through lab internals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnishift_lab::harness::{cnishift_bin, text, Up};
use cnishift_lab::require_root;
use serde_json::Value;

const LABEL_KEY: &str = "cnishift.io/cni";

/// One controller and `workers` workers, with deadlines short enough that a
/// dead-man rollback (confirm 3 s) and every wait stay within seconds.
fn inventory(cluster: &str, workers: usize) -> String {
    let mut s = format!(
        r#"
[cluster]
name = "{cluster}"
pod_cidr = "10.62.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "3s"
api = "2s"
drain = "5s"
node_ready = "4s"
cilium_ready = "4s"
deploy = "10s"
confirm = "3s"
rollback = "20s"
verify = "5s"
repod = "5s"

[drain]
retry_interval = "200ms"

[cilium]
node_label = "cnishift.io/cni=cilium"

[[nodes]]
name = "ctl-a"
role = "controller"
address = "10.9.9.1:7443"
"#
    );
    for w in 1..=workers {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"w-{w}\"\nrole = \"worker\"\naddress = \"10.9.9.{}:7443\"\n",
            w + 1
        ));
    }
    s
}

/// The real `cnishift`, with the lab's inventory and kubeconfig given as an
/// admin would give them, and a state dir of the test's.
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
    stderr: String,
    all: String,
}

impl Run {
    fn of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["node"] == node)
    }
    fn halted(&self) -> &Value {
        self.events
            .iter()
            .find(|e| e["phase"] == "halted")
            .unwrap_or_else(|| panic!("no halted event:\n{}", self.all))
    }
}

fn migrate(lab: &Up, state: &Path) -> Run {
    let o = cnishift(lab, state, &["migrate", "-o", "json"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let events = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    Run {
        code: o.status.code(),
        events,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        all: text(&o),
    }
}

/// `cnishift status -o json`: the journal and the live state, per node.
fn status(lab: &Up, state: &Path) -> Value {
    let o = cnishift(lab, state, &["status", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

fn status_node<'a>(s: &'a Value, node: &str) -> &'a Value {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {s:#}"))
}

/// What kubectl says of a node: (cordoned, the migration label's value).
fn kube_node(lab: &Up, node: &str) -> (bool, Option<String>) {
    let v: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "node", node, "-o", "json"])).unwrap();
    (
        v["spec"]["unschedulable"].as_bool().unwrap_or(false),
        v["metadata"]["labels"][LABEL_KEY]
            .as_str()
            .map(str::to_string),
    )
}

fn state_dir(lab: &Up) -> PathBuf {
    lab.dir.with_file_name("migrate-state")
}

fn assert_untouched(lab: &Up, run: &Run, node: &str) {
    assert_eq!(
        run.of_node(node).count(),
        0,
        "{node} was started:\n{}",
        run.all
    );
    assert_eq!(kube_node(lab, node), (false, None), "{node} was touched");
}

fn assert_migrated(lab: &Up, node: &str) {
    assert_eq!(
        kube_node(lab, node),
        (false, Some("cilium".to_string())),
        "{node} not migrated and uncordoned"
    );
}

/// A clean resume with the same state dir finishes the migration.
fn clear_and_resume(lab: &Up, state: &Path, nodes: &[&str]) {
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = migrate(lab, state);
    assert_eq!(run.code, Some(0), "resume:\n{}", run.all);
    assert!(
        run.events
            .iter()
            .any(|e| e["step"] == "verify-cluster" && e["phase"] == "done"),
        "{}",
        run.all
    );
    let s = status(lab, state);
    for n in nodes {
        assert_migrated(lab, n);
        assert_eq!(status_node(&s, n)["journal"], "done", "{n}: {s:#}");
    }
}

#[test]
fn unconfirmed_worker_is_rolled_back_by_its_agent_and_a_resume_finishes() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(
        &inventory("mf-unconfirmed", 2),
        &["--fault", "w-1:unconfirmed"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    eprintln!("{}", run.all);
    eprintln!("{:#}", status(&lab, &state));
    panic!("explore");
}
