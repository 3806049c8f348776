//! A `cnishift-lab up` lab for tests, driven as processes: `up` in a temp
//! dir, the real `cnishift` and the machine's `kubectl` against its
//! cluster.toml and kubeconfig, `down` on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::binary;

pub fn lab_bin() -> PathBuf {
    binary("cnishift-lab", "CNISHIFT_LAB_BIN").unwrap()
}
pub fn cnishift_bin() -> PathBuf {
    binary("cnishift", "CNISHIFT_BIN").unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A lab brought up in a temp dir; `down` on drop.
pub struct Up {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub up_output: String,
}

impl Up {
    pub fn new(inventory: &str, extra: &[&str]) -> Up {
        let tmp = tempfile::Builder::new()
            .prefix("cnishift-labup-")
            .tempdir()
            .unwrap();
        let inv = tmp.path().join("inventory.toml");
        std::fs::write(&inv, inventory).unwrap();
        let dir = tmp.path().join("lab");
        let out = Command::new(lab_bin())
            .arg("up")
            .arg("-i")
            .arg(&inv)
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "up failed: {}", text(&out));
        Up {
            _tmp: tmp,
            dir,
            up_output: text(&out),
        }
    }
    /// `cnishift-lab rehearse -i INVENTORY --dir TMP/lab --keep ARGS`: the
    /// rehearsal's output, and its kept lab (`down` on drop).
    pub fn rehearse(inventory: &str, args: &[&str]) -> (Up, Output) {
        let tmp = tempfile::Builder::new()
            .prefix("cnishift-rehearse-")
            .tempdir()
            .unwrap();
        let inv = tmp.path().join("inventory.toml");
        std::fs::write(&inv, inventory).unwrap();
        let dir = tmp.path().join("lab");
        let out = Command::new(lab_bin())
            .arg("rehearse")
            .arg("-i")
            .arg(&inv)
            .arg("--dir")
            .arg(&dir)
            .arg("--keep")
            .args(args)
            .output()
            .unwrap();
        let up = Up {
            _tmp: tmp,
            dir,
            up_output: String::new(),
        };
        (up, out)
    }
    pub fn seed(extra: &[&str]) -> Up {
        let inv = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/avalanche.toml"),
        )
        .unwrap();
        Up::new(&inv, extra)
    }
    pub fn cluster_toml(&self) -> PathBuf {
        self.dir.join("cluster.toml")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(args)
            .output()
            .expect("kubectl is installed")
    }
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(o.status.success(), "kubectl {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// The real coordinator, from this machine's namespace.
    pub fn cnishift(&self, args: &[&str]) -> Output {
        Command::new(cnishift_bin())
            .args(args)
            .env("CNISHIFT_INVENTORY", self.cluster_toml())
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .unwrap()
    }
    /// `cnishift SUBCOMMAND -i DIR/cluster.toml --kubeconfig DIR/kubeconfig
    /// --state-dir STATE`, as an admin would type it (no environment).
    pub fn cnishift_cmd(&self, subcommand: &str, state: &Path) -> Command {
        let mut c = Command::new(cnishift_bin());
        c.arg(subcommand)
            .arg("-i")
            .arg(self.cluster_toml())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--state-dir")
            .arg(state)
            .env_remove("CNISHIFT_INVENTORY")
            .env_remove("KUBECONFIG")
            .env_remove("CNISHIFT_TEST_KILL_AFTER_RECORDS");
        c
    }
    /// What kubectl says of a node: (cordoned, the value of label `key`).
    pub fn node_state(&self, node: &str, key: &str) -> (bool, Option<String>) {
        let v: Value =
            serde_json::from_str(&self.kubectl_ok(&["get", "node", node, "-o", "json"])).unwrap();
        (
            v["spec"]["unschedulable"].as_bool().unwrap_or(false),
            v["metadata"]["labels"][key].as_str().map(str::to_string),
        )
    }
    /// The inventory's node names, in inventory order.
    pub fn node_names(&self) -> Vec<String> {
        let t: toml::Table =
            toml::from_str(&std::fs::read_to_string(self.cluster_toml()).unwrap()).unwrap();
        t["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    }
    pub fn lab(&self, args: &[&str]) -> Output {
        let mut c = Command::new(lab_bin());
        c.arg(args[0]).arg("--dir").arg(&self.dir).args(&args[1..]);
        c.output().unwrap()
    }
    /// The deploy hook exactly as cluster.toml names it, for `node`.
    pub fn deploy_hook(&self, node: &str) -> Command {
        let t: toml::Table =
            toml::from_str(&std::fs::read_to_string(self.cluster_toml()).unwrap()).unwrap();
        let argv: Vec<String> = t["hooks"]["deploy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().replace("{node}", node))
            .collect();
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    }
    pub fn preflight(&self) -> Value {
        let o = self.cnishift(&["preflight", "-o", "json"]);
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
    }
    /// How many times the lab's hook `verb` ("deploy", "rollback") ran for
    /// each node, from `DIR/logs/hooks.log`.
    pub fn hook_runs(&self, verb: &str) -> std::collections::BTreeMap<String, usize> {
        hook_runs(&self.dir, verb)
    }
    pub fn record(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join("lab.json")).unwrap()).unwrap()
    }
    pub fn node_ready(&self, node: &str) -> (String, String) {
        let o = self.kubectl_ok(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[0].status}|{.status.conditions[0].message}",
        ]);
        let (a, b) = o.split_once('|').unwrap();
        (a.to_string(), b.to_string())
    }
    pub fn wait_node(&self, node: &str, status: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.node_ready(node).0 == status {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{node} not Ready={status} after {limit:?}: {:?}",
                self.node_ready(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    pub fn cilium_pod(&self, ns: &str, node: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            "k8s-app=cilium",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "--no-headers",
        ])
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(lab_bin())
            .arg("down")
            .arg("--dir")
            .arg(&self.dir)
            .output();
    }
}

/// How many times the lab in `dir` ran its hook `verb` for each node
/// (`DIR/logs/hooks.log`: `<unix ms> <verb> <node> <outcome>` per run).
pub fn hook_runs(dir: &Path, verb: &str) -> std::collections::BTreeMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("logs").join(crate::supervisor::HOOK_LOG))
        .unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines() {
        let mut f = l.split_whitespace().skip(1);
        if let (Some(v), Some(node)) = (f.next(), f.next()) {
            if v == verb {
                *out.entry(node.to_string()).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The records of a `cnishift migrate` journal (`STATE/journal.jsonl`), each
/// line's `rec`, in order. A torn last line (no newline) is left out, as
/// `migrate` itself drops it.
pub fn journal(state: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(state.join("journal.jsonl")).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["rec"].clone()
        })
        .collect()
}

/// A journal record as a kill point: `header`, `intent ctl-a deploy`,
/// `done w-1 confirm`, `intent cluster cleanup`.
pub fn boundary(rec: &Value) -> String {
    let kind = rec["type"].as_str().unwrap_or("?");
    if kind == "header" {
        return kind.into();
    }
    format!(
        "{kind} {} {}",
        rec["node"].as_str().unwrap_or("cluster"),
        rec["step"].as_str().unwrap_or("?")
    )
}

/// Every record a clean, uninterrupted `migrate` of this inventory writes,
/// as [`boundary`] names them, from `cnishift plan -o json`: the header, an
/// intent and a done per step per node in plan order (the etcd snapshot
/// after the first controller's Preflight), then the cluster steps.
pub fn planned_boundaries(cluster_toml: &Path) -> Vec<String> {
    let o = Command::new(cnishift_bin())
        .args(["plan", "-o", "json", "-i"])
        .arg(cluster_toml)
        .output()
        .unwrap();
    assert!(o.status.success(), "cnishift plan: {}", text(&o));
    let p: Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps: Vec<&str> = p["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    let mut out = vec!["header".to_string()];
    // migrate's run-wide steps before the first node (cnishift::migrate::prerun):
    // the values gate's record when [cilium] values is set, then the backup.
    let inv: toml::Table = toml::from_str(&std::fs::read_to_string(cluster_toml).unwrap()).unwrap();
    if inv.get("cilium").and_then(|c| c.get("values")).is_some() {
        out.push("done cluster values".into());
    }
    out.push("intent cluster backup".into());
    out.push("done cluster backup".into());
    for (w, wave) in p["waves"].as_array().unwrap().iter().enumerate() {
        let nodes: Vec<&str> = wave["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        let has_controller = wave["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["role"] == "controller");
        for step in &steps {
            // The run's etcd snapshot (migrate/etcd.rs) comes right before
            // the first controller's Cordon.
            if *step == "cordon"
                && has_controller
                && !out.iter().any(|b| b.ends_with("cluster etcd-snapshot"))
            {
                out.push("intent cluster etcd-snapshot".into());
                out.push("done cluster etcd-snapshot".into());
            }
            for kind in ["intent", "done"] {
                for n in &nodes {
                    out.push(format!("{kind} {n} {step}"));
                }
            }
            // The etcd snapshot: a cluster step after the first controller's
            // Preflight, before anything is cordoned (`plan` lists it in `before`).
            if w == 0 && *step == "preflight" && wave["role"] == "controller" {
                out.push("intent cluster etcd-snapshot".into());
                out.push("done cluster etcd-snapshot".into());
            }
        }
    }
    for step in p["after"].as_array().unwrap() {
        for kind in ["intent", "done"] {
            out.push(format!("{kind} cluster {}", step.as_str().unwrap()));
        }
    }
    out
}

pub fn report_node<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {r:#}"))
}

pub fn check<'a>(node: &'a Value, id: &str) -> &'a Value {
    node["report"]["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no report: {node:#}"))
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}"))
}

/// One controller and two workers, none named like the seed's.
pub const RENAMED: &str = r#"
[cluster]
name = "renamed"
pod_cidr = "10.60.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "3s"
drain = "2s"
api = "1s"
node_ready = "1s"
cilium_ready = "1s"

[drain]
retry_interval = "200ms"

[[nodes]]
name = "ctl-a"
role = "controller"
address = "10.9.9.1:7443"

[[nodes]]
name = "w-1"
role = "worker"
address = "10.9.9.2:7443"

[[nodes]]
name = "w-2"
role = "worker"
address = "10.9.9.3:7443"
"#;
