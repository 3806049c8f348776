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
