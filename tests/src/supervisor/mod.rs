//! The supervisor behind `cnishift-lab up`: it builds the lab from an
//! inventory, records everything in `DIR/lab.json`, then runs the cluster:
//! the simulated API server (on the host-side lab address), one real
//! `cnishift-agent` per node namespace, and a loop that plays k3s, the
//! kubelet, the DaemonSet controller and Cilium for every node, so that the
//! namespaces and the API tell the same story. `deploy`, `rollback`, `fault`
//! and `status` reach it over `DIR/control.sock`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnishift::inventory::Role;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::apiserver::{kubeconfig, ApiServer, LabNode};
use crate::cluster::{binary, AGENT_PORT};
use crate::hostroot::{self, NodeFiles};
use crate::k3s::{self, Backend};
use crate::labnet;
use crate::record::{self, NodeRecord, Record};

mod agents;
mod build;
mod control;
mod etcd;
mod faults;
mod node;

use build::build;
use control::serve_control;
pub use control::{request, Reply, Request, StatusRow};
use node::pod_ready;

pub const CILIUM_DS: &str = "cilium";
/// `DIR/logs/hooks.log`: every deploy and rollback the lab's hooks asked for.
pub const HOOK_LOG: &str = "hooks.log";
pub const API_PORT: u16 = 6443;
/// How long a k3s restart keeps the node NotReady (and its Lease unrenewed).
pub const RESTART: Duration = Duration::from_millis(300);
/// How long Cilium's agent takes to turn Ready once k3s runs without Flannel
/// (the node is NotReady, "cni config uninitialized", meanwhile).
pub const CILIUM_START: Duration = Duration::from_millis(150);
const TICK: Duration = Duration::from_millis(50);
const LEASE_EVERY: Duration = Duration::from_secs(2);

/// Faults a lab node can be given (`up --fault NODE:KIND`, `fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The deploy hook exits 1 with a message.
    HookFails,
    /// The deploy hook never returns.
    HookHangs,
    /// After its deploy the node never turns Ready.
    NeverReady,
    /// The node's Cilium pod restarts, never Ready; its health API says Failure.
    CiliumCrashloop,
    /// The node's agent is not running.
    AgentDown,
    /// The node cannot be reached from the admin box (the API still sees it).
    Partition,
    /// A PodDisruptionBudget on a pod of the node never allows an eviction.
    PdbBlocks,
    /// Every API answer comes after the client's deadline ([deadlines] api + 1 s).
    SlowApi,
    /// Right after its deploy the node cannot be reached from the admin box.
    Unconfirmed,
    /// The worker's k3s restarts as soon as a server switches backend.
    WorkerRestartsEarly,
    /// The controller's etcd member is stopped (as `systemctl stop k3s` stops it).
    EtcdDown,
    /// The controller's etcd snapshots cannot be written (its snapshot
    /// directory is a file): `etcdctl snapshot save` fails.
    EtcdSnapshotFails,
    /// A Longhorn volume's only healthy replica is the one on the node (the
    /// postgres volume's, else vaultwarden's): the others failed.
    SoleReplica,
    /// The node registers with an InternalIP on another subnet (192.0.2.0/24,
    /// a second address on its eth0), as a node behind a router would.
    OtherSubnet,
}

pub const FAULT_KINDS: &str = "hook-fails, hook-hangs, never-ready, cilium-crashloop, agent-down, partition, pdb-blocks, slow-api, unconfirmed, worker-restarts-early, etcd-down, etcd-snapshot-fails, sole-replica, other-subnet";

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(json!(s))
            .map_err(|_| format!("unknown fault kind {s:?}; kinds: {FAULT_KINDS}"))
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).expect("serialisable");
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// `NODE:VALUE`, as `--fault` and `--kernel-config` take it.
pub fn node_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n.to_string(), v.to_string())),
        _ => Err(format!("expected NODE:VALUE, got {s:?}")),
    }
}

/// What `up` hands the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpSpec {
    pub inventory: PathBuf,
    pub dir: PathBuf,
    pub faults: Vec<(String, Fault)>,
    pub kernel_configs: Vec<(String, PathBuf)>,
}

/// The inventory as the lab reads it (from the TOML itself, so keys this
/// crate does not know yet pass through to the lab's cluster.toml).
#[derive(Debug)]
pub struct InventoryIn {
    pub path: PathBuf,
    pub table: toml::Table,
    pub nodes: Vec<(String, Role)>,
    pub pod_cidr: String,
    pub cilium_ns: String,
    pub cilium_selector: Value,
    pub api_deadline: Duration,
}

pub fn read_inventory(path: &Path) -> Result<InventoryIn> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut nodes = vec![];
    for n in table
        .get("nodes")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
    {
        let name = n
            .get("name")
            .and_then(|v| v.as_str())
            .context("a [[nodes]] entry without name")?;
        let role = match n.get("role").and_then(|v| v.as_str()) {
            Some("controller") => Role::Controller,
            Some("worker") => Role::Worker,
            other => bail!("node {name}: role {other:?} is not controller or worker"),
        };
        nodes.push((name.to_string(), role));
    }
    if nodes.is_empty() {
        bail!("{} has no [[nodes]]", path.display());
    }
    if nodes.len() > 200 {
        bail!("a lab holds at most 200 nodes");
    }
    let cluster = table.get("cluster").and_then(|c| c.as_table());
    let get = |k: &str| {
        cluster
            .and_then(|c| c.get(k))
            .and_then(|v| v.as_str())
            .map(String::from)
    };
    let cilium_selector = match table
        .get("cilium")
        .and_then(|c| c.get("node_label"))
        .and_then(|v| v.as_str())
        .and_then(|l| l.split_once('='))
    {
        Some((k, v)) => json!({ k: v }),
        None => json!({"kubernetes.io/os": "linux"}),
    };
    let api_deadline = table
        .get("deadlines")
        .and_then(|d| d.get("api"))
        .and_then(|v| v.as_str())
        .and_then(|s| humantime::parse_duration(s).ok())
        .unwrap_or(Duration::from_secs(10));
    Ok(InventoryIn {
        path: path.to_path_buf(),
        pod_cidr: get("pod_cidr").unwrap_or_else(|| "10.42.0.0/16".into()),
        cilium_ns: get("cilium_namespace").unwrap_or_else(|| "kube-system".into()),
        table,
        nodes,
        cilium_selector,
        api_deadline,
    })
}

/// The /24 of node `i` inside `cidr` (a /23 or larger).
pub fn node_subnet(cidr: &str, i: usize) -> Result<Ipv4Addr> {
    let (base, prefix) = cidr
        .split_once('/')
        .context("pod_cidr is not ADDR/PREFIX")?;
    let base: Ipv4Addr = base.parse().context("pod_cidr address")?;
    let prefix: u32 = prefix.parse().context("pod_cidr prefix")?;
    if prefix > 23 || (i as u64) >= (1u64 << (24 - prefix)) {
        bail!("pod_cidr {cidr} has no /24 for node {i}");
    }
    Ok(Ipv4Addr::from(u32::from(base) + ((i as u32) << 8)))
}

struct Node {
    rec: NodeRecord,
    /// k3s's configured flags say `--flannel-backend=none` (servers only).
    flags_none: bool,
    /// What its running k3s uses.
    backend: Backend,
    restart_until: Option<Instant>,
    /// When its k3s last (re)started.
    started_at: Instant,
    cilium_up: bool,
    health: Option<tokio::task::AbortHandle>,
    health_state: Arc<Mutex<(String, String)>>,
    /// Pods with a veth on cni0 (uid → veth) and pods with a Cilium endpoint.
    veths: BTreeMap<String, String>,
    endpoints: BTreeSet<String>,
    faults: BTreeSet<Fault>,
    agent: Option<Child>,
    /// The controller's etcd member.
    etcd: Option<Child>,
    last_crash: Instant,
    lease_at: Instant,
    /// The admin box is cut off from this node (partition / unconfirmed).
    cut: bool,
}

struct Lab {
    rec: Record,
    api: ApiServer,
    nodes: Vec<Node>,
    cilium_ns: String,
    rt: tokio::runtime::Handle,
    agent_bin: PathBuf,
    lab_bin: PathBuf,
    api_deadline: Duration,
    /// `--initial-cluster` of the controllers' etcd, and its token.
    etcd_cluster: String,
    etcd_token: String,
}

fn now_s() -> Instant {
    Instant::now()
}

/// Runs the lab until killed. Called as `cnishift-lab supervise`.
pub fn supervise(spec: UpSpec) -> Result<()> {
    let dir = spec.dir.clone();
    let rec = Record {
        dir: dir.clone(),
        supervisor_pid: Some(std::process::id()),
        files: [
            "logs",
            "pki",
            "hosts",
            "state",
            "cluster.toml",
            "kubeconfig",
            "control.sock",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
        ..Default::default()
    };
    rec.save()?;
    match build(spec, rec) {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Ok(mut r) = Record::load(&dir) {
                r.error = Some(format!("{e:#}"));
                let _ = r.save();
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_subnets_are_24s_inside_the_pod_cidr() {
        assert_eq!(
            node_subnet("10.42.0.0/16", 0).unwrap(),
            Ipv4Addr::new(10, 42, 0, 0)
        );
        assert_eq!(
            node_subnet("10.42.0.0/16", 7).unwrap(),
            Ipv4Addr::new(10, 42, 7, 0)
        );
        assert_eq!(
            node_subnet("10.60.4.0/22", 3).unwrap(),
            Ipv4Addr::new(10, 60, 7, 0)
        );
        assert!(node_subnet("10.60.4.0/22", 4).is_err());
        assert!(node_subnet("10.42.0.0/24", 0).is_err());
        assert!(node_subnet("nonsense", 0).is_err());
    }

    #[test]
    fn fault_kinds_parse_by_their_names_and_unknown_ones_list_the_kinds() {
        for k in FAULT_KINDS.split(", ") {
            let f: Fault = k.parse().unwrap();
            assert_eq!(f.to_string(), k);
        }
        let e = "wobbly".parse::<Fault>().unwrap_err();
        assert!(
            e.contains("hook-fails") && e.contains("etcd-snapshot-fails"),
            "{e}"
        );
        assert_eq!(node_pair("a:b").unwrap(), ("a".into(), "b".into()));
        assert!(node_pair("ab").is_err() && node_pair(":b").is_err());
    }

    #[test]
    fn the_inventory_gives_names_roles_cidr_namespace_and_the_cilium_selector() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.toml");
        fs::write(
            &p,
            "[cluster]\npod_cidr = \"10.50.0.0/16\"\n[cilium]\nnode_label = \"cnishift.io/cni=cilium\"\n\
             [tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[nodes]]\nname = \"x\"\nrole = \"controller\"\naddress = \"1.2.3.4:1\"\n\
             [[nodes]]\nname = \"y\"\nrole = \"worker\"\naddress = \"1.2.3.5:1\"\n",
        )
        .unwrap();
        let inv = read_inventory(&p).unwrap();
        assert_eq!(
            inv.nodes,
            vec![("x".into(), Role::Controller), ("y".into(), Role::Worker)]
        );
        assert_eq!(inv.pod_cidr, "10.50.0.0/16");
        assert_eq!(inv.cilium_ns, "kube-system");
        assert_eq!(inv.cilium_selector, json!({"cnishift.io/cni": "cilium"}));
        fs::write(&p, "[[nodes]]\nname = \"x\"\nrole = \"boss\"\n").unwrap();
        assert!(read_inventory(&p).unwrap_err().to_string().contains("boss"));
    }
}
