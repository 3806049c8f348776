//! The controllers' etcd: one real member per controller namespace (see
//! `crate::etcd`), started together so they elect a leader at once, owned
//! by the supervisor (their pids in lab.json; `down` kills every process in
//! the lab's namespaces, so they go with a SIGKILLed supervisor too), and
//! stopped and started again by the `etcd-down` fault.

use super::*;
use crate::etcd::{self as lab_etcd, Member};

/// How long `up` waits for a healthy etcd (a leader with a quorum).
pub(super) const ETCD_READY: Duration = Duration::from_secs(20);

impl Lab {
    fn etcd_log(&self, i: usize) -> PathBuf {
        self.rec
            .dir
            .join("logs")
            .join(format!("{}.etcd.log", self.nodes[i].rec.name))
    }

    /// Starts node `i`'s member (a controller's); returns at once.
    pub(super) fn start_etcd(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].etcd.is_some() {
            return Ok(());
        }
        let root = self.nodes[i].rec.host_root.clone();
        let (tls, data) = (root.join(lab_etcd::TLS_DIR), root.join(lab_etcd::DATA_DIR));
        let log = self.etcd_log(i);
        let n = &self.nodes[i].rec;
        let child = lab_etcd::spawn(&Member {
            name: &n.name,
            netns: Some(&n.netns),
            peer_ip: IpAddr::V4(n.address),
            tls_dir: &tls,
            data_dir: &data,
            cluster: &self.etcd_cluster,
            token: &self.etcd_token,
            log: &log,
        })?;
        self.nodes[i].rec.etcd_pid = Some(child.id());
        self.rec.nodes[i].etcd_pid = Some(child.id());
        self.nodes[i].etcd = Some(child);
        self.rec.save()?;
        Ok(())
    }

    /// Stops node `i`'s member as `systemctl stop k3s` would (SIGTERM; etcd
    /// shuts down cleanly), SIGKILL if it has not within 2 s.
    pub(super) fn stop_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].etcd.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(2) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.nodes[i].rec.etcd_pid = None;
        self.rec.nodes[i].etcd_pid = None;
        let _ = self.rec.save();
    }

    /// Waits until every running member is healthy (a leader, a quorum).
    pub(super) fn wait_etcd(&mut self, limit: Duration) -> Result<()> {
        let logs: Vec<PathBuf> = (0..self.nodes.len()).map(|i| self.etcd_log(i)).collect();
        let tls: Vec<PathBuf> = self
            .nodes
            .iter()
            .map(|n| n.rec.host_root.join(lab_etcd::TLS_DIR))
            .collect();
        let mut members: Vec<(&str, Option<&str>, &Path, &mut Child, &Path)> = self
            .nodes
            .iter_mut()
            .zip(tls.iter().zip(logs.iter()))
            .filter_map(|(n, (t, l))| {
                let name = n.rec.name.as_str();
                let ns = n.rec.netns.as_str();
                n.etcd
                    .as_mut()
                    .map(|c| (name, Some(ns), t.as_path(), c, l.as_path()))
            })
            .collect();
        lab_etcd::wait_healthy(&mut members, limit)
    }

    pub(super) fn etcd_state(&mut self, i: usize) -> String {
        if self.nodes[i].rec.role != Role::Controller {
            return "-".into();
        }
        match self.nodes[i].etcd.as_mut() {
            None => "stopped".into(),
            Some(c) => match c.try_wait() {
                Ok(Some(st)) => format!("exited ({st})"),
                _ if crate::netns::is_listening(c.id(), lab_etcd::CLIENT_PORT) => "running".into(),
                _ => "starting".into(),
            },
        }
    }

    /// The `etcd-snapshot-fails` fault: the snapshot directory is a file,
    /// so `etcdctl snapshot save` fails as it would on a full or broken disk.
    pub(super) fn spoil_snapshots(&mut self, i: usize, on: bool) -> Result<()> {
        let dir = self.nodes[i].rec.host_root.join(lab_etcd::SNAPSHOT_DIR);
        if on {
            if dir.is_dir() {
                fs::remove_dir_all(&dir)?;
            }
            fs::write(
                &dir,
                "not a directory (the lab's etcd-snapshot-fails fault)\n",
            )?;
        } else {
            if dir.is_file() {
                fs::remove_file(&dir)?;
            }
            fs::create_dir_all(&dir)?;
        }
        Ok(())
    }
}

/// Writes every controller's etcd certificates (one PKI for the cluster)
/// and its snapshot directory; returns `--initial-cluster`.
pub(super) fn prepare(nodes: &[NodeRecord]) -> Result<String> {
    let controllers: Vec<&NodeRecord> = nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .collect();
    if controllers.is_empty() {
        return Ok(String::new());
    }
    let pki = lab_etcd::Pki::new()?;
    for n in &controllers {
        pki.write_member(
            &n.host_root.join(lab_etcd::TLS_DIR),
            &n.name,
            IpAddr::V4(n.address),
        )?;
        fs::create_dir_all(n.host_root.join(lab_etcd::SNAPSHOT_DIR))?;
    }
    Ok(lab_etcd::initial_cluster(
        &controllers
            .iter()
            .map(|n| (n.name.clone(), IpAddr::V4(n.address)))
            .collect::<Vec<_>>(),
    ))
}
