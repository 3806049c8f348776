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
use std::net::{Ipv4Addr, SocketAddr};
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

pub const CILIUM_DS: &str = "cilium";
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
}

pub const FAULT_KINDS: &str = "hook-fails, hook-hangs, never-ready, cilium-crashloop, agent-down, partition, pdb-blocks, slow-api, unconfirmed, worker-restarts-early";

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

fn build(spec: UpSpec, mut rec: Record) -> Result<()> {
    let dir = spec.dir.clone();
    let inv = read_inventory(&spec.inventory)?;
    for (n, _) in spec.faults.iter().map(|(n, f)| (n, f)).chain(
        spec.kernel_configs
            .iter()
            .map(|(n, _)| (n, &Fault::HookFails)),
    ) {
        if !inv.nodes.iter().any(|(m, _)| m == n) {
            bail!("{n} is not a node of {}", spec.inventory.display());
        }
    }
    let lab_bin = std::env::current_exe()?;
    let agent_bin = binary("cnishift-agent", "CNISHIFT_AGENT_BIN")?;
    let cnishift_bin = binary("cnishift", "CNISHIFT_BIN")?;
    let subnet = record::claim_subnet(&dir)?;
    rec.subnet = subnet;
    rec.host_link = Some(labnet::host_link(subnet));
    rec.host_address = Some(labnet::address(subnet, labnet::HOST_SUFFIX));
    rec.namespaces.push(labnet::bridge_ns(subnet));
    for i in 0..inv.nodes.len() {
        rec.namespaces.push(labnet::node_ns(subnet, i));
    }
    let host_addr = labnet::address(subnet, labnet::HOST_SUFFIX);
    let api_addr = SocketAddr::from((host_addr, API_PORT));
    rec.api = Some(api_addr);
    rec.save()?;
    fs::create_dir_all(dir.join("logs"))?;

    // Network: bridge, host link, one namespace per node.
    labnet::create_bridge(subnet)?;
    let mut nodes_rec = vec![];
    for (i, (name, role)) in inv.nodes.iter().enumerate() {
        let address = labnet::create_node(subnet, i)?;
        let net = node_subnet(&inv.pod_cidr, i)?;
        nodes_rec.push(NodeRecord {
            name: name.clone(),
            role: *role,
            netns: labnet::node_ns(subnet, i),
            address,
            pod_cidr: format!("{net}/24"),
            host_root: dir.join("hosts").join(name),
            agent_pid: None,
        });
    }
    rec.nodes = nodes_rec.clone();
    rec.save()?;

    // PKI with the real `cnishift certs`.
    let pki = dir.join("pki");
    let certs = |args: &[&str]| -> Result<()> {
        let out = Command::new(&cnishift_bin)
            .arg("certs")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "cnishift certs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let pki_s = pki.to_str().context("utf-8 dir")?;
    certs(&["init", "--dir", pki_s, "--days", "30"])?;
    certs(&[
        "issue",
        "--dir",
        pki_s,
        "--coordinator",
        "--ip",
        &host_addr.to_string(),
        "--days",
        "30",
    ])?;

    // Host roots, kernel configs, Flannel devices: per node, in parallel.
    let mut notes = vec![];
    let mut configs: BTreeMap<String, (Vec<u8>, String)> = BTreeMap::new();
    for (name, role) in &inv.nodes {
        let over = spec.kernel_configs.iter().find(|(n, _)| n == name);
        let (cfg, note) = match over {
            Some((_, file)) => (
                fs::read(file)
                    .with_context(|| format!("--kernel-config {name}:{}", file.display()))?,
                format!("{} (--kernel-config)", file.display()),
            ),
            None => {
                let (cfg, changed) = hostroot::fixed_fixture(*role)?;
                let n = if changed.is_empty() {
                    format!("{} fixture", hostroot::fixture_name(*role))
                } else {
                    format!(
                        "{} fixture with {} (the fix preflight suggests)",
                        hostroot::fixture_name(*role),
                        changed.join(", ")
                    )
                };
                (cfg, n)
            }
        };
        configs.insert(name.clone(), (cfg, note));
    }
    {
        let mut by_note: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (n, (_, note)) in &configs {
            by_note.entry(note.clone()).or_default().push(n.clone());
        }
        for (note, ns) in by_note {
            notes.push(format!("kernel config of {}: {note}", ns.join(", ")));
        }
        notes.push("--kernel-config NODE:FILE puts another config on a node".into());
    }
    let peers: Vec<(Ipv4Addr, Ipv4Addr)> = nodes_rec
        .iter()
        .map(|n| {
            (
                n.pod_cidr
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .parse()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
                n.address,
            )
        })
        .collect();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes_rec
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let configs = &configs;
                let inv = &inv;
                let peers = &peers;
                let cnishift_bin = &cnishift_bin;
                s.spawn(move || -> Result<()> {
                    let out = Command::new(cnishift_bin)
                        .args([
                            "certs",
                            "issue",
                            "--dir",
                            pki_s,
                            "--node",
                            &n.name,
                            "--ip",
                            &n.address.to_string(),
                            "--days",
                            "30",
                        ])
                        .output()?;
                    if !out.status.success() {
                        bail!(
                            "cnishift certs issue --node {}: {}",
                            n.name,
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    let subnet = peers[i].0;
                    hostroot::build_node(
                        &n.host_root,
                        &n.name,
                        n.role,
                        &NodeFiles {
                            pod_cidr: inv.pod_cidr.clone(),
                            pod_subnet: format!("{}/24", Ipv4Addr::from(u32::from(subnet) | 1)),
                            kernel_config: Some(configs[&n.name].0.clone()),
                        },
                    )?;
                    k3s::write_flags(&n.host_root, n.role, false)?;
                    k3s::write_containerd_config(&n.host_root, Backend::Flannel)?;
                    labnet::create_flannel(&labnet::Flannel {
                        netns: &n.netns,
                        address: n.address,
                        subnet,
                        prefix: 24,
                        pod_cidr: &inv.pod_cidr,
                        peers: peers
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, p)| *p)
                            .collect(),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("setup thread"))
            .collect()
    });
    for r in results {
        r?;
    }
    // bpffs where a real node has it, so the agent's bpf checks see one.
    for n in &nodes_rec {
        let target = n.host_root.join("sys/fs/bpf");
        rec.mounts.push(target.clone());
        rec.save()?;
        let t = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
        // SAFETY: mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                t.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting bpffs on {}: {}",
                target.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    rec.notes = notes;
    rec.save()?;

    // The API server with the same nodes and a seed-like workload.
    let api = ApiServer::new();
    for n in &nodes_rec {
        api.add_lab_node(&LabNode {
            name: &n.name,
            controller: n.role == Role::Controller,
            pod_cidr: &n.pod_cidr,
            address: n.address,
            kernel: hostroot::release(n.role),
        });
    }
    let pairs: Vec<(&str, bool)> = nodes_rec
        .iter()
        .map(|n| (n.name.as_str(), n.role == Role::Controller))
        .collect();
    api.add_seed_workload(&pairs, &inv.cilium_ns, inv.cilium_selector.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(api_addr))
        .with_context(|| format!("listening on {api_addr}"))?;
    rt.spawn(api.clone().serve(listener));
    fs::write(dir.join("kubeconfig"), kubeconfig(api_addr))?;
    write_cluster_toml(&dir, &inv, &nodes_rec, &lab_bin, api_addr)?;

    let mut lab = Lab {
        rec,
        api,
        nodes: nodes_rec
            .iter()
            .map(|r| Node {
                rec: r.clone(),
                flags_none: false,
                backend: Backend::Flannel,
                restart_until: None,
                started_at: now_s(),
                cilium_up: false,
                health: None,
                health_state: Arc::new(Mutex::new(("Ok".into(), String::new()))),
                veths: BTreeMap::new(),
                endpoints: BTreeSet::new(),
                faults: BTreeSet::new(),
                agent: None,
                last_crash: now_s(),
                lease_at: now_s(),
                cut: false,
            })
            .collect(),
        cilium_ns: inv.cilium_ns.clone(),
        rt: rt.handle().clone(),
        agent_bin,
        lab_bin,
        api_deadline: inv.api_deadline,
    };
    for (node, fault) in &spec.faults {
        lab.set_fault(node, *fault, true)?;
    }
    for i in 0..lab.nodes.len() {
        if !lab.nodes[i].faults.contains(&Fault::AgentDown) {
            lab.start_agent(i)?;
        }
    }
    lab.wait_agents(Duration::from_secs(20))?;
    // Pods get their veths, DaemonSets their pods, before `up` returns.
    lab.tick();
    lab.rec.ready = true;
    lab.rec.save()?;

    let lab = Arc::new(Mutex::new(lab));
    let sock = dir.join("control.sock");
    let _ = fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    {
        let lab = lab.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            lab.lock().expect("lab").tick();
        });
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let lab = lab.clone();
        std::thread::spawn(move || {
            let _ = serve_control(&lab, conn);
        });
    }
    drop(rt);
    Ok(())
}

fn write_cluster_toml(
    dir: &Path,
    inv: &InventoryIn,
    nodes: &[NodeRecord],
    lab_bin: &Path,
    api: SocketAddr,
) -> Result<()> {
    let mut t = inv.table.clone();
    let abs = |p: &str| dir.join(p).display().to_string();
    let mut tls = toml::Table::new();
    tls.insert("ca".into(), abs("pki/ca.pem").into());
    tls.insert("cert".into(), abs("pki/coordinator.pem").into());
    tls.insert("key".into(), abs("pki/coordinator-key.pem").into());
    t.insert("tls".into(), tls.into());
    let cluster = t
        .entry("cluster")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .context("[cluster] is not a table")?;
    cluster.insert("api_vip".into(), api.to_string().into());
    cluster
        .entry("cilium_namespace")
        .or_insert_with(|| inv.cilium_ns.clone().into());
    let hooks = t
        .entry("hooks")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .context("[hooks] is not a table")?;
    let deploy: Vec<toml::Value> = [
        lab_bin.display().to_string(),
        "deploy".into(),
        "--dir".into(),
        dir.display().to_string(),
        "{node}".into(),
    ]
    .into_iter()
    .map(toml::Value::from)
    .collect();
    hooks.insert("deploy".into(), deploy.into());
    if let Some(arr) = t.get_mut("nodes").and_then(|n| n.as_array_mut()) {
        for (entry, n) in arr.iter_mut().zip(nodes) {
            if let Some(e) = entry.as_table_mut() {
                e.insert(
                    "address".into(),
                    format!("{}:{AGENT_PORT}", n.address).into(),
                );
            }
        }
    }
    let text = format!(
        "# Written by cnishift-lab up from {}: the lab's addresses, TLS files and deploy hook.\n{}",
        inv_path_note(dir),
        toml::to_string(&t)?
    );
    fs::write(dir.join("cluster.toml"), text)?;
    Ok(())
}

fn inv_path_note(dir: &Path) -> String {
    format!("the inventory given to `up` (lab in {})", dir.display())
}

impl Lab {
    fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.rec.name == name)
            .with_context(|| format!("{name} is not a node of this lab"))
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        let dir = self.rec.dir.clone();
        let n = &self.nodes[i];
        let pki = dir.join("pki");
        let name = n.rec.name.clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("logs").join(format!("{name}.log")))?;
        let netns = fs::File::open(Path::new("/run/netns").join(&n.rec.netns))?;
        let rollback = format!(
            "{} rollback --dir {} {{node}}",
            self.lab_bin.display(),
            dir.display()
        );
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{}:{AGENT_PORT}", n.rec.address))
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join(format!("{name}.pem")))
            .arg("--tls-key")
            .arg(pki.join(format!("{name}-key.pem")))
            .arg("--node-name")
            .arg(&name)
            .arg("--state-dir")
            .arg(dir.join("state").join(&name))
            .arg("--host-root")
            .arg(&n.rec.host_root)
            .env("RUST_LOG", "info")
            .env("CNISHIFT_ROLLBACK_COMMAND", rollback)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let fd = netns.as_raw_fd();
        // The agent lives in the node's namespace; `down` kills what is left
        // there (no parent-death signal: it is per thread, and agents are
        // restarted from short-lived control threads).
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent for {name}"))?;
        drop(netns);
        self.nodes[i].rec.agent_pid = Some(child.id());
        self.rec.nodes[i].agent_pid = Some(child.id());
        self.nodes[i].agent = Some(child);
        self.rec.save()?;
        Ok(())
    }

    fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].rec.agent_pid = None;
        self.rec.nodes[i].agent_pid = None;
        let _ = self.rec.save();
    }

    fn wait_agents(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        for i in 0..self.nodes.len() {
            let Some(pid) = self.nodes[i].agent.as_ref().map(Child::id) else {
                continue;
            };
            loop {
                if let Some(st) = self.nodes[i]
                    .agent
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    let name = &self.nodes[i].rec.name;
                    let log =
                        fs::read_to_string(self.rec.dir.join("logs").join(format!("{name}.log")))
                            .unwrap_or_default();
                    bail!("the agent of {name} exited ({st}) before listening:\n{log}");
                }
                if crate::netns::is_listening(pid, AGENT_PORT) {
                    break;
                }
                if start.elapsed() > limit {
                    bail!(
                        "the agent of {} is not listening after {limit:?}",
                        self.nodes[i].rec.name
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn agent_state(&mut self, i: usize) -> String {
        match self.nodes[i].agent.as_mut() {
            None => "down".into(),
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => format!("exited ({st})"),
                _ if crate::netns::is_listening(c.id(), AGENT_PORT) => "listening".into(),
                _ => "not listening".into(),
            },
        }
    }

    /// Cuts (or restores) the path between the admin box and node `i`: the
    /// node drops what it would send to the host-side address.
    fn set_cut(&mut self, i: usize, cut: bool) -> Result<()> {
        if self.nodes[i].cut == cut {
            return Ok(());
        }
        let host = format!("{}/32", self.rec.host_address.context("no host address")?);
        let ns = self.nodes[i].rec.netns.clone();
        labnet::ip(&[
            "-n",
            &ns,
            "route",
            if cut { "add" } else { "del" },
            "blackhole",
            &host,
        ])?;
        self.nodes[i].cut = cut;
        Ok(())
    }

    fn set_fault(&mut self, node: &str, fault: Fault, on: bool) -> Result<()> {
        let i = self.node_index(node)?;
        if fault == Fault::WorkerRestartsEarly && self.nodes[i].rec.role != Role::Worker {
            bail!("worker-restarts-early is for workers; {node} is a controller");
        }
        if on {
            self.nodes[i].faults.insert(fault);
        } else {
            self.nodes[i].faults.remove(&fault);
        }
        match fault {
            Fault::AgentDown if on => self.stop_agent(i),
            Fault::AgentDown if self.nodes[i].agent.is_none() => {
                self.start_agent(i)?;
                self.wait_agents(Duration::from_secs(10))?;
            }
            Fault::Partition => self.set_cut(i, on)?,
            Fault::Unconfirmed if !on => self.set_cut(i, false)?,
            Fault::SlowApi => self.api.faults().set_delay(if on {
                self.api_deadline + Duration::from_secs(1)
            } else {
                Duration::ZERO
            }),
            Fault::PdbBlocks => {
                let ns = "lab-faults";
                let name = format!("blocked-on-{node}");
                if on {
                    let labels = json!({"app.kubernetes.io/name": name});
                    self.api
                        .add_deployment(ns, &name, labels.clone(), 1, &[node]);
                    self.api.add_pdb(ns, &name, labels, Some(1), None);
                } else {
                    self.api.remove_object("poddisruptionbudgets", ns, &name);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn restart_k3s(&mut self, i: usize) {
        self.nodes[i].restart_until = Some(Instant::now() + RESTART);
        let name = self.nodes[i].rec.name.clone();
        self.api.set_node_condition(
            &name,
            false,
            "KubeletNotReady",
            "container runtime is down: k3s is restarting",
        );
    }

    /// The backend a k3s starting now on node `i` takes.
    fn backend_at_start(&self, i: usize) -> Backend {
        match self.nodes[i].rec.role {
            Role::Controller => {
                if self.nodes[i].flags_none {
                    Backend::None
                } else {
                    Backend::Flannel
                }
            }
            // A k3s agent takes the backend from the servers: without Flannel
            // as soon as one server it may join runs without it.
            Role::Worker => {
                if self
                    .nodes
                    .iter()
                    .any(|n| n.rec.role == Role::Controller && n.backend == Backend::None)
                {
                    Backend::None
                } else {
                    Backend::Flannel
                }
            }
        }
    }

    /// What `just nix deploy` + the k3s restart do to a node.
    fn deploy(&mut self, node: &str) -> Result<Reply> {
        let i = self.node_index(node)?;
        if self.nodes[i].faults.contains(&Fault::HookFails) {
            return Ok(Reply::fail(format!(
                "deploy {node}: switch-to-configuration failed (injected by the lab: hook-fails)"
            )));
        }
        if self.nodes[i].faults.contains(&Fault::HookHangs) {
            return Ok(Reply {
                hang: true,
                ..Reply::ok(String::new())
            });
        }
        self.nodes[i].flags_none = true;
        let root = self.nodes[i].rec.host_root.clone();
        k3s::write_flags(&root, self.nodes[i].rec.role, true)?;
        self.restart_k3s(i);
        if self.nodes[i].faults.contains(&Fault::Unconfirmed) {
            self.set_cut(i, true)?;
        }
        Ok(Reply::ok(format!("{node}: k3s flags switched to --flannel-backend=none --disable-network-policy; k3s restarting")))
    }

    fn rollback(&mut self, node: &str) -> Result<Reply> {
        let i = self.node_index(node)?;
        self.nodes[i].flags_none = false;
        let root = self.nodes[i].rec.host_root.clone();
        k3s::write_flags(&root, self.nodes[i].rec.role, false)?;
        if self.nodes[i].rec.role == Role::Worker {
            // The worker's previous generation: Flannel, whatever the servers say.
            self.nodes[i].backend = Backend::Flannel;
        }
        self.restart_k3s(i);
        // The generation that cut the node off is gone: reachable again
        // (a partition, which is not the deploy's doing, stays).
        if !self.nodes[i].faults.contains(&Fault::Partition) {
            self.set_cut(i, false)?;
        }
        Ok(Reply::ok(format!(
            "{node}: k3s flags back to Flannel; k3s restarting"
        )))
    }

    fn start_health(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].health.is_some() {
            return Ok(());
        }
        let path = self.nodes[i].rec.host_root.join(k3s::CILIUM_SOCKET);
        fs::create_dir_all(path.parent().expect("parent"))?;
        let _ = fs::remove_file(&path);
        let state = self.nodes[i].health_state.clone();
        let listener = {
            let _g = self.rt.enter();
            tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?
        };
        let app = axum::Router::new().route(
            "/v1/healthz",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    let (s, msg) = state.lock().expect("health").clone();
                    (
                        [("content-type", "application/json")],
                        json!({
                            "cilium": {"state": s, "msg": msg},
                            "cluster": {"ciliumHealth": {"state": s}},
                            "kubernetes": {"state": "Ok", "msg": "1.33"},
                        })
                        .to_string(),
                    )
                }
            }),
        );
        let task = self.rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.nodes[i].health = Some(task.abort_handle());
        Ok(())
    }

    fn stop_health(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].health.take() {
            h.abort();
        }
        let _ = fs::remove_file(self.nodes[i].rec.host_root.join(k3s::CILIUM_SOCKET));
    }

    /// One round of k3s, kubelet, DaemonSet controller and Cilium, for every node.
    fn tick(&mut self) {
        let now = Instant::now();
        let pods = self.api.list("pods");
        let dss = self.api.list("daemonsets");
        let api_nodes = self.api.list("nodes");
        for i in 0..self.nodes.len() {
            let _ = self.tick_node(i, now, &pods, &dss, &api_nodes);
        }
    }

    fn tick_node(
        &mut self,
        i: usize,
        now: Instant,
        pods: &[Value],
        dss: &[Value],
        api_nodes: &[Value],
    ) -> Result<()> {
        let name = self.nodes[i].rec.name.clone();
        let root = self.nodes[i].rec.host_root.clone();
        let netns = self.nodes[i].rec.netns.clone();
        // k3s restart completes: the backend it starts with, its containerd config.
        if self.nodes[i].restart_until.is_some_and(|t| now >= t) {
            self.nodes[i].restart_until = None;
            self.nodes[i].started_at = now;
            let backend = self.backend_at_start(i);
            let was = self.nodes[i].backend;
            self.nodes[i].backend = backend;
            k3s::write_containerd_config(&root, backend)?;
            if backend == Backend::Flannel && was == Backend::None {
                self.tear_down_cilium(i);
            }
            // A worker whose k3s restarts as soon as a server leaves Flannel.
            if self.nodes[i].rec.role == Role::Controller && backend == Backend::None {
                for j in 0..self.nodes.len() {
                    if self.nodes[j].faults.contains(&Fault::WorkerRestartsEarly)
                        && self.nodes[j].restart_until.is_none()
                        && self.nodes[j].backend == Backend::Flannel
                    {
                        self.restart_k3s(j);
                    }
                }
            }
        }
        let restarting = self.nodes[i].restart_until.is_some();
        if !restarting && now.duration_since(self.nodes[i].lease_at) >= LEASE_EVERY {
            self.nodes[i].lease_at = now;
            self.api.renew_node_lease(&name);
        }
        let Some(api_node) = api_nodes
            .iter()
            .find(|n| n["metadata"]["name"] == name.as_str())
        else {
            return Ok(());
        };
        let labels = &api_node["metadata"]["labels"];
        let selects = |ds: &Value| {
            ds["spec"]["template"]["spec"]["nodeSelector"]
                .as_object()
                .is_none_or(|m| m.iter().all(|(k, v)| &labels[k] == v))
        };
        let on_node: Vec<&Value> = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == name.as_str())
            .collect();
        // The DaemonSet controller: one pod per selected node; none elsewhere.
        for ds in dss {
            let ns = ds["metadata"]["namespace"].as_str().unwrap_or("");
            let ds_name = ds["metadata"]["name"].as_str().unwrap_or("");
            let mine: Vec<&&Value> = on_node
                .iter()
                .filter(|p| {
                    p["metadata"]["namespace"] == ns
                        && p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
                        && p["metadata"]["ownerReferences"][0]["name"] == ds_name
                })
                .collect();
            if selects(ds) && mine.is_empty() {
                let labels = ds["spec"]["selector"]["matchLabels"].clone();
                self.api.add_daemon_pod(ns, ds_name, &name, labels, false);
            } else if !selects(ds) {
                for p in mine {
                    self.api.remove_object(
                        "pods",
                        ns,
                        p["metadata"]["name"].as_str().unwrap_or(""),
                    );
                }
            }
        }
        // Cilium's agent pod on this node.
        let backend = self.nodes[i].backend;
        let crash = self.nodes[i].faults.contains(&Fault::CiliumCrashloop);
        let cilium_pod = on_node.iter().find(|p| {
            p["metadata"]["namespace"] == self.cilium_ns.as_str()
                && p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS
                && p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        });
        let cilium_runs = backend == Backend::None
            && !restarting
            && now.duration_since(self.nodes[i].started_at) >= CILIUM_START;
        if let Some(p) = cilium_pod {
            let pname = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ready = pod_ready(p);
            if cilium_runs && crash {
                *self.nodes[i].health_state.lock().expect("health") =
                    ("Failure".into(), "cilium-agent is restarting: failed to start: daemon creation failed (injected by the lab: cilium-crashloop)".into());
                self.start_health(i)?;
                if now.duration_since(self.nodes[i].last_crash) >= Duration::from_secs(1) || ready {
                    self.nodes[i].last_crash = now;
                    self.api.crashloop_pod(&self.cilium_ns.clone(), &pname);
                }
            } else if cilium_runs {
                if !ready {
                    self.api.clear_pod_waiting(&self.cilium_ns.clone(), &pname);
                    self.api
                        .set_pod_ready(&self.cilium_ns.clone(), &pname, true);
                }
                if !self.nodes[i].cilium_up {
                    *self.nodes[i].health_state.lock().expect("health") =
                        ("Ok".into(), String::new());
                    k3s::write_cilium_conflist(&root)?;
                    labnet::create_cilium_devices(&netns)?;
                    self.start_health(i)?;
                    self.nodes[i].cilium_up = true;
                } else if self.nodes[i].health_state.lock().expect("health").0 != "Ok" {
                    *self.nodes[i].health_state.lock().expect("health") =
                        ("Ok".into(), String::new());
                }
            } else if ready {
                self.api
                    .set_pod_ready(&self.cilium_ns.clone(), &pname, false);
            }
        }
        // The kubelet's Ready condition.
        let never = self.nodes[i].faults.contains(&Fault::NeverReady) && self.nodes[i].flags_none;
        if !restarting {
            if backend == Backend::Flannel || (k3s::has_cilium_conflist(&root) && !never) {
                self.api.set_node_condition(
                    &name,
                    true,
                    "KubeletReady",
                    "kubelet is posting ready status",
                );
            } else {
                self.api.set_node_condition(
                    &name,
                    false,
                    "KubeletNotReady",
                    "container runtime network not ready: cni config uninitialized",
                );
            }
        }
        let node_ready = !restarting
            && (backend == Backend::Flannel || (k3s::has_cilium_conflist(&root) && !never));
        // Pods: a veth on cni0 for each pod started under Flannel, a Cilium
        // endpoint for each started under Cilium; the kubelet readies them.
        let mut add = vec![];
        let mut seen = BTreeSet::new();
        for p in &on_node {
            if p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS {
                continue;
            }
            let uid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
            seen.insert(uid.clone());
            if !self.nodes[i].veths.contains_key(&uid) && !self.nodes[i].endpoints.contains(&uid) {
                if backend == Backend::Flannel {
                    let v = labnet::veth_name(&uid);
                    self.nodes[i].veths.insert(uid.clone(), v.clone());
                    add.push(v);
                } else if node_ready {
                    self.nodes[i].endpoints.insert(uid.clone());
                }
            }
            let started =
                self.nodes[i].veths.contains_key(&uid) || self.nodes[i].endpoints.contains(&uid);
            if node_ready
                && started
                && !pod_ready(p)
                && p["status"].get("containerStatuses").is_none()
            {
                let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
                let pn = p["metadata"]["name"].as_str().unwrap_or("");
                self.api.set_pod_ready(ns, pn, true);
            }
        }
        let gone: Vec<String> = self.nodes[i]
            .veths
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        let mut del = vec![];
        for u in gone {
            if let Some(v) = self.nodes[i].veths.remove(&u) {
                del.push(v);
            }
        }
        self.nodes[i].endpoints.retain(|u| seen.contains(u));
        let mut lines = labnet::add_pod_veths_lines(&add);
        lines.extend(labnet::del_pod_veths_lines(&del));
        labnet::batch("ip", Some(&netns), &lines)?;
        Ok(())
    }

    fn tear_down_cilium(&mut self, i: usize) {
        k3s::remove_cilium_files(&self.nodes[i].rec.host_root);
        labnet::delete_cilium_devices(&self.nodes[i].rec.netns);
        self.stop_health(i);
        self.nodes[i].cilium_up = false;
    }

    fn status(&mut self) -> Vec<StatusRow> {
        let api_nodes = self.api.list("nodes");
        let pods = self.api.list("pods");
        (0..self.nodes.len())
            .map(|i| {
                let n = &self.nodes[i];
                let api = api_nodes
                    .iter()
                    .find(|a| a["metadata"]["name"] == n.rec.name.as_str());
                let ready = api
                    .map(|a| a["status"]["conditions"][0]["status"] == "True")
                    .unwrap_or(false);
                let cordoned = api.is_some_and(|a| a["spec"]["unschedulable"] == json!(true));
                let cilium = pods
                    .iter()
                    .find(|p| {
                        p["spec"]["nodeName"] == n.rec.name.as_str()
                            && p["metadata"]["ownerReferences"][0]["name"] == CILIUM_DS
                    })
                    .map(|p| {
                        if let Some(w) = p["status"]["containerStatuses"][0]["state"]["waiting"]
                            ["reason"]
                            .as_str()
                        {
                            format!(
                                "{w} ({} restarts)",
                                p["status"]["containerStatuses"][0]["restartCount"]
                            )
                        } else if pod_ready(p) {
                            "Ready".into()
                        } else {
                            "NotReady".into()
                        }
                    })
                    .unwrap_or_else(|| "none".into());
                let backend = if n.restart_until.is_some() {
                    "restarting".to_string()
                } else {
                    n.backend.to_string()
                };
                let faults: Vec<String> = n.faults.iter().map(Fault::to_string).collect();
                let row = StatusRow {
                    node: n.rec.name.clone(),
                    role: n.rec.role.to_string(),
                    backend,
                    ready,
                    cordoned,
                    cilium,
                    agent: String::new(),
                    faults,
                };
                (i, row)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(i, mut row)| {
                row.agent = self.agent_state(i);
                row
            })
            .collect()
    }
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRow {
    pub node: String,
    pub role: String,
    pub backend: String,
    pub ready: bool,
    pub cordoned: bool,
    pub cilium: String,
    pub agent: String,
    pub faults: Vec<String>,
}

/// One request on the control socket (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Deploy { node: String },
    Rollback { node: String },
    Fault { node: String, kind: Fault },
    Clear { node: Option<String> },
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
    /// The hook must never return (hook-hangs).
    pub hang: bool,
    pub rows: Vec<StatusRow>,
}

impl Reply {
    fn ok(message: String) -> Reply {
        Reply {
            ok: true,
            message,
            ..Default::default()
        }
    }
    fn fail(message: String) -> Reply {
        Reply {
            ok: false,
            message,
            ..Default::default()
        }
    }
}

fn serve_control(lab: &Arc<Mutex<Lab>>, conn: UnixStream) -> Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::fail(format!("bad request: {e}")),
        Ok(req) => {
            let mut lab = lab.lock().expect("lab");
            let r = match req {
                Request::Deploy { node } => lab.deploy(&node),
                Request::Rollback { node } => lab.rollback(&node),
                Request::Fault { node, kind } => lab
                    .set_fault(&node, kind, true)
                    .map(|()| Reply::ok(format!("{node}: {kind} on"))),
                Request::Clear { node } => (|| {
                    let names: Vec<String> = lab
                        .nodes
                        .iter()
                        .filter(|n| node.as_deref().is_none_or(|m| m == n.rec.name))
                        .map(|n| n.rec.name.clone())
                        .collect();
                    if names.is_empty() {
                        bail!("{} is not a node of this lab", node.unwrap_or_default());
                    }
                    for n in &names {
                        let i = lab.node_index(n)?;
                        let fs: Vec<Fault> = lab.nodes[i].faults.iter().copied().collect();
                        for f in fs {
                            lab.set_fault(n, f, false)?;
                        }
                    }
                    Ok(Reply::ok(format!("faults cleared on {}", names.join(", "))))
                })(),
                Request::Status => Ok(Reply {
                    ok: true,
                    rows: lab.status(),
                    ..Default::default()
                }),
            };
            r.unwrap_or_else(|e| Reply::fail(format!("{e:#}")))
        }
    };
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(&reply)?)?;
    Ok(())
}

/// Sends `req` to the lab in `dir` and returns its reply.
pub fn request(dir: &Path, req: &Request) -> Result<Reply> {
    let sock = dir.join("control.sock");
    let conn = UnixStream::connect(&sock).with_context(|| {
        format!(
            "no lab supervisor answers on {} (is a lab up there? `cnishift-lab up -i INVENTORY --dir {}`)",
            sock.display(),
            dir.display()
        )
    })?;
    let mut w = &conn;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    serde_json::from_str(&line).context("the supervisor's reply")
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
            e.contains("hook-fails") && e.contains("worker-restarts-early"),
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
