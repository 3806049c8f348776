//! `DIR/lab.json`: everything a running lab made, written before each thing
//! is made, so `down` can remove it all even after the supervisor was
//! SIGKILLed half-way. A machine-wide registry (`/run/cnishift-lab/`) lists
//! every lab's directory and hands out the lab subnets, so several labs can
//! run at once.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnishift::inventory::Role;
use serde::{Deserialize, Serialize};

use crate::labnet;

pub const REGISTRY: &str = "/run/cnishift-lab";

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Record {
    pub dir: PathBuf,
    /// Which /24 of 198.18.0.0/15 this lab has.
    pub subnet: u16,
    pub supervisor_pid: Option<u32>,
    /// The host end of the lab's link and its address.
    pub host_link: Option<String>,
    pub host_address: Option<Ipv4Addr>,
    /// Where the simulated API server listens (on the host-side lab address).
    pub api: Option<SocketAddr>,
    pub namespaces: Vec<String>,
    pub mounts: Vec<PathBuf>,
    /// Files and directories in DIR the lab wrote.
    pub files: Vec<PathBuf>,
    pub nodes: Vec<NodeRecord>,
    /// Notes `up` prints (the kernel configs used, ...).
    pub notes: Vec<String>,
    pub ready: bool,
    /// Set when the supervisor failed to bring the lab up.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub netns: String,
    pub address: Ipv4Addr,
    pub pod_cidr: String,
    pub host_root: PathBuf,
    pub agent_pid: Option<u32>,
    /// A controller's etcd member.
    #[serde(default)]
    pub etcd_pid: Option<u32>,
}

impl Record {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> Result<Record> {
        let p = Self::path(dir);
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// Atomic: write a temp file, fsync, rename.
    pub fn save(&self) -> Result<()> {
        let p = Self::path(&self.dir);
        let tmp = self.dir.join(".lab.json.tmp");
        {
            let f = fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&f, self)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// An exclusive lock on the registry (flock), released on drop.
struct RegistryLock(fs::File);

impl RegistryLock {
    fn take() -> Result<RegistryLock> {
        fs::create_dir_all(REGISTRY)?;
        let f = fs::File::create(Path::new(REGISTRY).join(".lock"))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking {REGISTRY}: {}", std::io::Error::last_os_error());
        }
        Ok(RegistryLock(f))
    }
}

impl Drop for RegistryLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn entry(subnet: u16) -> PathBuf {
    Path::new(REGISTRY).join(format!("{subnet}.dir"))
}

/// Every registered lab: (subnet, dir).
pub fn registered() -> Vec<(u16, PathBuf)> {
    let Ok(d) = fs::read_dir(REGISTRY) else {
        return vec![];
    };
    let mut v: Vec<(u16, PathBuf)> = d
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u16 = name.strip_suffix(".dir")?.parse().ok()?;
            Some((n, PathBuf::from(fs::read_to_string(e.path()).ok()?.trim())))
        })
        .collect();
    v.sort();
    v
}

/// Claims the lowest free subnet for `dir` (1..512; 0 is left to the
/// namespace-only test labs). An entry whose lab.json is gone and whose
/// namespaces are gone is free again.
pub fn claim_subnet(dir: &Path) -> Result<u16> {
    let _lock = RegistryLock::take()?;
    let taken: Vec<u16> = registered()
        .into_iter()
        .filter(|(n, d)| {
            Record::path(d).exists() || Path::new("/run/netns").join(labnet::bridge_ns(*n)).exists()
        })
        .map(|(n, _)| n)
        .collect();
    let n = (1..512u16)
        .find(|n| !taken.contains(n))
        .context("all 511 lab subnets are in use; `cnishift-lab down` some labs")?;
    fs::write(entry(n), dir.display().to_string())?;
    Ok(n)
}

pub fn release_subnet(subnet: u16) {
    let _ = fs::remove_file(entry(subnet));
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// SIGKILLs `pid` if its command line contains `what` (never a recycled pid
/// of someone else), and waits until it is gone.
pub fn kill_checked(pid: u32, what: &str) {
    if !cmdline(pid).contains(what) {
        return;
    }
    // SAFETY: sending a signal.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(&[pid], Duration::from_secs(2));
}

fn wait_gone(pids: &[u32], limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let alive = pids.iter().any(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes everything the lab in `dir` made: processes, mounts, namespaces
/// (and with them every link inside), the host link, its files, its
/// registry entry. Works from lab.json alone.
pub fn down(dir: &Path) -> Result<Vec<String>> {
    let mut done = vec![];
    let rec = match Record::load(dir) {
        Ok(r) => r,
        Err(e) => bail!("{e:#}; is there a lab in {}?", dir.display()),
    };
    if let Some(pid) = rec.supervisor_pid {
        kill_checked(pid, "cnishift-lab");
        done.push(format!("supervisor {pid} stopped"));
    }
    // Every process left in a lab namespace (agents, whatever a test started there).
    let mut pids = vec![];
    for ns in &rec.namespaces {
        if let Ok(out) = labnet::ip(&["netns", "pids", ns]) {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    pids.extend(
        rec.nodes
            .iter()
            .filter_map(|n| n.agent_pid)
            .filter(|p| cmdline(*p).contains("cnishift-agent")),
    );
    pids.extend(
        rec.nodes
            .iter()
            .filter_map(|n| n.etcd_pid)
            .filter(|p| cmdline(*p).contains("etcd")),
    );
    pids.sort_unstable();
    pids.dedup();
    for p in &pids {
        // SAFETY: sending a signal.
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    wait_gone(&pids, Duration::from_secs(2));
    if !pids.is_empty() {
        done.push(format!("{} processes killed", pids.len()));
    }
    for m in &rec.mounts {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 on a path string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Some(link) = &rec.host_link {
        let _ = labnet::ip(&["link", "del", link]);
    }
    for ns in rec.namespaces.iter().rev() {
        let _ = labnet::ip(&["netns", "del", ns]);
    }
    done.push(format!("{} namespaces deleted", rec.namespaces.len()));
    for f in rec.files.iter().rev() {
        let p = dir.join(f);
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
    let _ = fs::remove_file(dir.join(".lab.json.tmp"));
    let _ = fs::remove_file(Record::path(dir));
    let _ = fs::remove_dir(dir);
    release_subnet(rec.subnet);
    Ok(done)
}

/// `down` for every registered lab, then anything lab-named left on the
/// machine (namespaces and host links of a lab whose directory is gone).
pub fn down_all() -> Vec<String> {
    let mut out = vec![];
    for (n, dir) in registered() {
        match down(&dir) {
            Ok(_) => out.push(format!("{}: down", dir.display())),
            Err(_) => release_subnet(n),
        }
    }
    let (ns, links) = labnet::owned_names();
    for l in links {
        let _ = labnet::ip(&["link", "del", &l]);
        out.push(format!("link {l} deleted"));
    }
    for n in ns {
        if let Ok(o) = labnet::ip(&["netns", "pids", &n]) {
            for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: sending a signal.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = labnet::ip(&["netns", "del", &n]);
        out.push(format!("namespace {n} deleted"));
    }
    out
}
