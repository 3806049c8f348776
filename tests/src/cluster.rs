//! A cluster on one machine: one network namespace per node running the real
//! `cnishift-agent serve`, one for the coordinator, real certificates, and an
//! inventory that points at it all.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnishift::certs;
use cnishift::inventory::Role;

use crate::hostroot;
use crate::netns::{self, Network};

pub const AGENT_PORT: u16 = 7443;
pub const COORDINATOR_HOST: &str = "coordinator";

/// The seed cluster: opi01–03 controllers, raccoon00–05 workers.
pub fn seed_nodes() -> Vec<(String, Role)> {
    let mut v: Vec<(String, Role)> = (1..=3)
        .map(|i| (format!("opi0{i}"), Role::Controller))
        .collect();
    v.extend((0..6).map(|i| (format!("raccoon0{i}"), Role::Worker)));
    v
}

/// `n` workers named `node000`... for scale runs.
pub fn many_nodes(n: usize) -> Vec<(String, Role)> {
    (0..n)
        .map(|i| {
            (
                format!("node{i:03}"),
                if i < 3 {
                    Role::Controller
                } else {
                    Role::Worker
                },
            )
        })
        .collect()
}

/// Where the built binaries are: beside this executable (or one level up, for
/// test binaries in target/*/deps), unless CNISHIFT_AGENT_BIN / CNISHIFT_BIN say.
pub fn binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found beside {}; run `cargo build --workspace` first or set {env}",
        exe.display()
    )
}

pub struct LabOptions {
    pub connect_deadline: &'static str,
    pub report_deadline: &'static str,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            connect_deadline: "2s",
            report_deadline: "5s",
            agent_args: vec![],
        }
    }
}

pub struct Lab {
    /// Everything on disk: pki/, hosts/<node>/, state/<node>/, logs/, cluster.toml.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub net: Network,
    pub agents: BTreeMap<String, Child>,
    pub inventory: PathBuf,
    pub nodes: Vec<(String, Role)>,
    agent_bin: PathBuf,
    coordinator_bin: PathBuf,
}

impl Lab {
    /// Builds the network, the PKI and the host trees, starts every agent and
    /// waits until each listens.
    pub fn up(nodes: &[(String, Role)], opts: &LabOptions) -> Result<Lab> {
        let tmp = tempfile::Builder::new().prefix("cnishift-lab-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut net = Network::new()?;
        let coord = net.add_host(COORDINATOR_HOST)?;
        let pki = dir.join("pki");
        certs::init_ca(&pki, 30, false)?;
        certs::issue_to_dir(
            &pki,
            "coordinator",
            &certs::Spec::for_days(
                vec![certs::DEFAULT_COORDINATOR_IDENTITY.into()],
                vec![coord.address.into()],
                30,
            ),
            false,
        )?;
        let mut inventory = format!(
            "# written by cnishift-lab\n[cluster]\nname = \"lab\"\ncilium_namespace = \"cilium\"\npod_cidr = \"10.42.0.0/16\"\n\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator-key.pem\"\n\n\
             [deadlines]\nconnect = \"{}\"\nreport = \"{}\"\n",
            opts.connect_deadline, opts.report_deadline
        );
        let mut lab = Lab {
            dir: dir.clone(),
            _tmp: Some(tmp),
            net,
            agents: BTreeMap::new(),
            inventory: dir.join("cluster.toml"),
            nodes: nodes.to_vec(),
            agent_bin: binary("cnishift-agent", "CNISHIFT_AGENT_BIN")?,
            coordinator_bin: binary("cnishift", "CNISHIFT_BIN")?,
        };
        fs::create_dir_all(dir.join("logs"))?;
        for (name, role) in nodes {
            let host = lab.net.add_host(name)?;
            certs::issue_to_dir(
                &pki,
                name,
                &certs::Spec::for_days(vec![name.clone()], vec![host.address.into()], 30),
                false,
            )?;
            hostroot::build(&dir.join("hosts").join(name), name, *role)?;
            inventory.push_str(&format!("\n[[nodes]]\nname = \"{name}\"\nrole = \"{role}\"\naddress = \"{}:{AGENT_PORT}\"\n", host.address));
        }
        fs::write(&lab.inventory, inventory)?;
        for (name, _) in nodes {
            lab.start_agent(name, &opts.agent_args)?;
        }
        for (name, _) in nodes {
            lab.wait_listening(name, Duration::from_secs(20))?;
        }
        Ok(lab)
    }

    pub fn address(&self, node: &str) -> Ipv4Addr {
        self.net.host(node).expect("lab host").address
    }

    /// Starts (or restarts) `node`'s agent inside its namespace.
    pub fn start_agent(&mut self, node: &str, extra: &[String]) -> Result<()> {
        let addr = self.address(node);
        let pki = self.dir.join("pki");
        let log = fs::File::create(self.dir.join("logs").join(format!("{node}.log")))?;
        let child = self
            .net
            .command(node, self.agent_bin.to_str().context("agent path")?)?
            .arg("serve")
            .arg("--listen")
            .arg(format!("{addr}:{AGENT_PORT}"))
            .arg("--tls-ca")
            .arg(pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(pki.join(format!("{node}.pem")))
            .arg("--tls-key")
            .arg(pki.join(format!("{node}-key.pem")))
            .arg("--node-name")
            .arg(node)
            .arg("--state-dir")
            .arg(self.dir.join("state").join(node))
            .arg("--host-root")
            .arg(self.dir.join("hosts").join(node))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the agent for {node}"))?;
        self.agents.insert(node.to_string(), child);
        Ok(())
    }

    fn wait_listening(&mut self, node: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let child = self.agents.get_mut(node).context("no such agent")?;
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(self.dir.join("logs").join(format!("{node}.log")))
                    .unwrap_or_default();
                bail!("the agent for {node} exited ({status}) before listening:\n{log}");
            }
            if netns::is_listening(child.id(), AGENT_PORT) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("the agent for {node} is not listening after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs `node`'s agent (a crashed or powered-off node).
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        let mut child = self.agents.remove(node).context("no such agent")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The real coordinator binary, run inside the coordinator's namespace.
    pub fn coordinator(&self) -> Command {
        let mut c = self
            .net
            .command(
                COORDINATOR_HOST,
                self.coordinator_bin.to_str().expect("utf-8 path"),
            )
            .expect("coordinator host");
        c.env("CNISHIFT_INVENTORY", &self.inventory);
        c
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    pub fn log(&self, node: &str) -> String {
        fs::read_to_string(self.dir.join("logs").join(format!("{node}.log"))).unwrap_or_default()
    }

    /// Keeps the lab directory after the lab is dropped (for `cnishift-lab up`).
    pub fn keep_dir(&mut self) -> &Path {
        if let Some(t) = self._tmp.take() {
            let _ = t.keep();
        }
        &self.dir
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.agents) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `net` drops next and deletes every namespace.
    }
}
