//! Agents on loopback ports, for the socket-level TLS tests and the fan-out
//! benchmark (hundreds of agents without hundreds of namespaces).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnishift::certs;

use crate::cluster::binary;
use crate::netns::is_listening;

/// A CA plus certificates, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, the coordinator's certificate, and one per node in `nodes`.
    pub fn new(nodes: &[&str]) -> Result<Pki> {
        let dir = tempfile::Builder::new().prefix("cnishift-pki-").tempdir()?;
        certs::init_ca(dir.path(), 30, false)?;
        certs::issue_to_dir(
            dir.path(),
            "coordinator",
            &certs::Spec::for_days(vec![certs::DEFAULT_COORDINATOR_IDENTITY.into()], vec![], 30),
            false,
        )?;
        for n in nodes {
            certs::issue_to_dir(
                dir.path(),
                n,
                &certs::Spec::for_days(vec![n.to_string()], vec!["127.0.0.1".parse()?], 30),
                false,
            )?;
        }
        Ok(Pki { dir })
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    _state: tempfile::TempDir,
}

impl Agent {
    /// Starts `cnishift-agent serve` on 127.0.0.1 with `stem`.pem from `pki`,
    /// serving as `node`, and waits until it listens.
    pub fn start(pki: &Path, stem: &str, node: &str, extra: &[&str]) -> Result<Agent> {
        // The free port is found by binding and releasing; another process can
        // take it in between, so a lost race is retried.
        for _ in 0..5 {
            let state = tempfile::Builder::new()
                .prefix("cnishift-state-")
                .tempdir()?;
            let log = state.path().join("agent.log");
            let port = free_port()?;
            let child = Command::new(binary("cnishift-agent", "CNISHIFT_AGENT_BIN")?)
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .arg("--tls-ca")
                .arg(pki.join("ca.pem"))
                .arg("--tls-cert")
                .arg(pki.join(format!("{stem}.pem")))
                .arg("--tls-key")
                .arg(pki.join(format!("{stem}-key.pem")))
                .args(["--node-name", node])
                .arg("--state-dir")
                .arg(state.path().join("state"))
                .args(extra)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("starting cnishift-agent")?;
            let mut agent = Agent {
                child,
                port,
                log,
                _state: state,
            };
            match agent.wait_listening(Duration::from_secs(10)) {
                Ok(()) => return Ok(agent),
                Err(_) if agent.log().contains("Address already in use") => continue,
                Err(e) => return Err(e),
            }
        }
        bail!("no free loopback port after 5 tries")
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            if is_listening(self.child.id(), self.port) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "the agent is not listening after {limit:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Peak and current RSS of the agent process, from /proc (KiB).
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let get = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        Some((get("VmHWM:")?, get("VmRSS:")?))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
