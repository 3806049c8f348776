//! Lab hosts as network namespaces, joined by a bridge that lives in a
//! namespace of its own. Nothing is attached to this machine's network, so no
//! packet can leave; addresses come from 198.18.0.0/15 (RFC 2544, reserved
//! for benchmarking) so they cannot be confused with anything real.

use std::fs;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// Namespace names start with this, then the owning process id, so a later
/// run can sweep namespaces left by a process that was killed.
pub const PREFIX: &str = "cnslab";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<Output> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A lab network; dropping it deletes every namespace (and so every link).
pub struct Network {
    /// Unique per lab: `<pid>x<n>`.
    pub id: String,
    /// Short tag for interface names (≤ 15 bytes with suffixes).
    tag: String,
    pub bridge_ns: String,
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub address: std::net::Ipv4Addr,
    /// The bridge-side end of this host's cable; down = link cut.
    pub bridge_port: String,
}

/// Deletes lab namespaces whose creating process is gone.
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: Option<u32> = rest.split('x').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
}

impl Network {
    /// Creates the bridge namespace; add hosts with [`Network::add_host`].
    pub fn new() -> Result<Self> {
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = format!("{pid}x{n}");
        // 4 hex digits of pid+n keep interface names short and distinct per lab.
        let tag = format!("{:04x}", (pid.wrapping_mul(31).wrapping_add(n)) & 0xffff);
        let bridge_ns = format!("{PREFIX}{id}-br");
        let net = Network {
            id,
            tag,
            bridge_ns: bridge_ns.clone(),
            hosts: vec![],
        };
        ip(&["netns", "add", &bridge_ns])?;
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// The address of host number `i` (0-based): 198.18.x.y/15.
    fn address(i: usize) -> std::net::Ipv4Addr {
        let i = i + 1;
        std::net::Ipv4Addr::new(
            198,
            18 + (i / 65_000) as u8,
            ((i / 250) % 256) as u8,
            (i % 250 + 1) as u8,
        )
    }

    /// Adds a host: its own namespace, `eth0` cabled to the bridge, `lo` up.
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        let i = self.hosts.len();
        let netns = format!("{PREFIX}{}-h{i}", self.id);
        let (inside, outside) = (format!("l{}h{i}a", self.tag), format!("l{}h{i}b", self.tag));
        if outside.len() > 15 {
            bail!("too many lab hosts for interface names ({outside})");
        }
        let address = Self::address(i);
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "add",
            &outside,
            "type",
            "veth",
            "peer",
            "name",
            &inside,
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &outside,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", &inside, "name", "eth0"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/15"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let host = Host {
            name: name.to_string(),
            netns,
            address,
            bridge_port: outside,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Cuts (or restores) a host's cable at the bridge.
    pub fn set_link(&self, host: &str, up: bool) -> Result<()> {
        let h = self
            .host(host)
            .with_context(|| format!("no lab host {host}"))?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &h.bridge_port,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// A command that runs inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Result<Command> {
        let h = self
            .host(host)
            .with_context(|| format!("no lab host {host}"))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &h.netns, program]);
        Ok(c)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge_ns])
            .output();
    }
}

/// True when `pid` (in its own namespace) has a TCP socket listening on `port`.
pub fn is_listening(pid: u32, port: u16) -> bool {
    let Ok(tcp) = fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let want = format!(":{port:04X}");
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}
