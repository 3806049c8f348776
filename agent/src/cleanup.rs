//! Cleanup: remove exactly what Flannel left on this node, and lose nothing.
//!
//! plan → interlocks → apply (each item backed up before it goes) → result.
//! What may be removed is a fixed allow-list in this file; a request can only
//! say "plan", "apply" or "force". Files are never followed through symlinks:
//! a link is removed as a link, and its target stays where it is.
//!
//! An apply writes `<state>/cleanup-pending` with its backup id first, so an
//! apply that is killed half-way is finished by the next one into the same
//! backup, and `restore <id>` brings every file back.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;
use crate::probe::k3s::Role;
use crate::report::Report;

/// Flannel's interfaces, in removal order (cni0's veths come before these).
pub const INTERFACES: &[&str] = &[
    "cni0",
    "flannel.1",
    "flannel-v6.1",
    "flannel-wg",
    "flannel-wg-v6",
];

/// Flannel's files and directories (relative to the host root).
pub const PATHS: &[&str] = &[
    "etc/cni/net.d/10-flannel.conflist",
    "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
    "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
    "run/flannel",
    "var/lib/cni/networks/cbr0",
    "var/lib/cni/flannel",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Target {
    /// A network interface, by name (its routes go with it).
    Interface { name: String },
    /// A file, symlink or directory tree under the host root.
    Path { rel: String },
    /// Flannel's (and maybe kube-router's) chains in one iptables family, as `table/CHAIN`.
    Iptables { family: Family, chains: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn tools(self) -> (&'static str, &'static str) {
        match self {
            Family::Ipv4 => ("iptables-save", "iptables-restore"),
            Family::Ipv6 => ("ip6tables-save", "ip6tables-restore"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Stable id: `interface:cni0`, `path:/run/flannel`, `iptables:ipv4`.
    pub id: String,
    pub target: Target,
    /// Why it is on the list.
    pub why: String,
}

/// A reason not to clean up yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// `k3s-flannel-backend`, `flannel-conflist-wins`, `pods-on-cni0`, `cilium-absent`.
    pub interlock: String,
    pub reason: String,
    /// What would make it safe.
    pub fix: String,
    /// `--force` overrides it.
    pub overridable: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub items: Vec<Item>,
    /// Interlocks that hold (including overridden ones, marked by `forced`).
    pub refusals: Vec<Refusal>,
    pub forced: bool,
    /// Things the plan could not examine (it lists everything else regardless).
    pub errors: Vec<String>,
    /// What the plan could not consider (e.g. interfaces without live probes).
    pub notes: Vec<String>,
}

impl Plan {
    /// Apply may go ahead: no refusal, or only overridable ones with --force.
    pub fn allowed(&self) -> bool {
        self.refusals.iter().all(|r| r.overridable && self.forced)
    }
    pub fn blocking(&self) -> Vec<&Refusal> {
        self.refusals
            .iter()
            .filter(|r| !(r.overridable && self.forced))
            .collect()
    }
}

/// Builds the plan from a fresh report of this node.
pub fn plan(report: &Report, host: &HostPaths, force: bool, live: bool) -> Plan {
    let f = &report.facts;
    let mut p = Plan {
        forced: force,
        ..Default::default()
    };

    // --- interlocks ---
    let role = f.k3s.role;
    let flags = f.k3s.effective.as_ref().or(f.k3s.after_restart.as_ref());
    match (role, flags) {
        (Some(Role::Server), Some(fl)) if fl.flannel_backend != "none" => {
            p.refusals.push(Refusal {
                interlock: "k3s-flannel-backend".into(),
                reason: format!(
                    "k3s still runs Flannel (flannel-backend={})",
                    fl.flannel_backend
                ),
                fix: "deploy --flannel-backend=none --disable-network-policy and restart k3s first"
                    .into(),
                overridable: false,
            })
        }
        (Some(Role::Server), None) => p.refusals.push(Refusal {
            interlock: "k3s-flannel-backend".into(),
            reason: "cannot tell which flannel backend k3s runs with".into(),
            fix: "make sure k3s runs (or its unit/config is readable) with --flannel-backend=none"
                .into(),
            overridable: false,
        }),
        _ => {}
    }
    // The directory containerd reads: the policy's one rule.
    let (active, _) = crate::policy::active_cni_dir(f);
    if let Some(w) = &active.winner {
        let file = active.files.iter().find(|x| &x.name == w);
        if file.is_some_and(|x| x.is_flannel()) {
            p.refusals.push(Refusal {
                interlock: "flannel-conflist-wins".into(),
                reason: format!("containerd still loads Flannel's {}/{w}", active.path),
                fix: "let Cilium install its config (05-cilium.conflist sorts first) before cleaning up".into(),
                overridable: false,
            });
        }
    }
    let net = &f.network;
    if let Some(why) = &net.not_probed {
        p.refusals.push(Refusal {
            interlock: "pods-on-cni0".into(),
            reason: format!("cannot tell whether pods are still attached to cni0 ({why})"),
            fix: "run with live probes, or --force if the node is drained".into(),
            overridable: true,
        });
    } else if !net.cni0_members.is_empty() {
        p.refusals.push(Refusal {
            interlock: "pods-on-cni0".into(),
            reason: format!(
                "{} pod interfaces are still attached to cni0 ({})",
                net.cni0_members.len(),
                net.cni0_members
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: "drain the node (their pods move to Cilium when rescheduled), or --force".into(),
            overridable: true,
        });
    }
    let cilium_conf = f
        .cni
        .etc
        .files
        .iter()
        .any(|x| x.is_cilium() && x.error.is_none());
    if !net.cilium_interfaces.contains_key("cilium_host") && !cilium_conf {
        p.refusals.push(Refusal {
            interlock: "cilium-absent".into(),
            reason: "Cilium is not present yet (no cilium_host interface, no Cilium CNI config)"
                .into(),
            fix: "wait until the Cilium agent runs on this node, or --force".into(),
            overridable: true,
        });
    }

    // --- items ---
    if let Some(why) = &net.not_probed {
        p.notes.push(format!("interfaces not considered: {why}"));
    } else {
        for veth in &net.cni0_members {
            p.items.push(Item {
                id: format!("interface:{veth}"),
                target: Target::Interface { name: veth.clone() },
                why: "pod interface on Flannel's cni0 bridge".into(),
            });
        }
        for name in INTERFACES {
            if net.flannel_interfaces.contains_key(*name) {
                p.items.push(Item {
                    id: format!("interface:{name}"),
                    target: Target::Interface {
                        name: name.to_string(),
                    },
                    why: "Flannel's interface (its routes go with it)".into(),
                });
            }
        }
    }
    for rel in PATHS {
        match fs::symlink_metadata(host.path(rel)) {
            Ok(_) => match check_inside(host, rel) {
                Ok(()) => p.items.push(Item {
                    id: format!("path:/{rel}"),
                    target: Target::Path {
                        rel: rel.to_string(),
                    },
                    why: "Flannel's state".into(),
                }),
                Err(e) => p.errors.push(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => p.errors.push(format!("/{rel} cannot be examined: {e}")),
        }
    }
    let kube_router = f
        .k3s
        .effective
        .as_ref()
        .is_some_and(|e| e.disable_network_policy);
    if live {
        for (family, facts) in [
            (Family::Ipv4, &f.iptables.ipv4),
            (Family::Ipv6, &f.iptables.ipv6),
        ] {
            if let Some(why) = &facts.unknown {
                p.notes
                    .push(format!("{family:?} chains not considered: {why}"));
                continue;
            }
            let mut chains: Vec<String> = facts.flannel.clone();
            if kube_router {
                chains.extend(facts.kube_router.iter().cloned());
            }
            if !chains.is_empty() {
                p.items.push(Item {
                    id: format!("iptables:{}", format!("{family:?}").to_lowercase()),
                    target: Target::Iptables {
                        family,
                        chains: chains.clone(),
                    },
                    why: format!("{} chains: {}", chains.len(), chains.join(", ")),
                });
            }
        }
        if !kube_router
            && (!f.iptables.ipv4.kube_router.is_empty() || !f.iptables.ipv6.kube_router.is_empty())
        {
            p.notes.push(
                "KUBE-ROUTER-* chains kept: k3s's network-policy controller is not disabled".into(),
            );
        }
    } else {
        p.notes
            .push("iptables not considered: live probes disabled".into());
    }
    p
}

/// Refuses a path with a symlink among its *parent directories*: removing
/// through it could reach outside the allowed tree. (The last component may be
/// a symlink: it is removed as a link.)
fn check_inside(host: &HostPaths, rel: &str) -> Result<(), String> {
    let mut prefix = PathBuf::new();
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        prefix.push(part);
        let p = host.root().join(&prefix);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&p)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "/{rel}: its parent /{} is a symlink (-> {target}); not touching it",
                    prefix.display()
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "/{rel}: /{} cannot be examined: {e}",
                    prefix.display()
                ))
            }
        }
    }
    Ok(())
}

// --- backups and the journal ------------------------------------------------------

/// One thing saved before removal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Saved {
    File {
        rel: String,
        backup: String,
        mode: u32,
        uid: u32,
        gid: u32,
        len: u64,
    },
    Symlink {
        rel: String,
        target: String,
    },
    Dir {
        rel: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `ip -details -json link show` output for a removed interface (recorded, not restorable).
    Interface {
        name: String,
        details: String,
    },
    /// The family's whole `iptables-save` before the change (recorded).
    Iptables {
        family: Family,
        save: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub host_root: String,
    pub saved: Vec<Saved>,
    pub complete: bool,
}

/// One line of `<state>/cleanup-journal.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub backup_id: String,
    pub item: String,
    /// `removed`, `already-gone`, `failed`, `refused`, `done`.
    pub status: String,
    pub message: String,
}

pub struct Store {
    pub state_dir: PathBuf,
}

impl Store {
    fn backup_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("backup").join(id)
    }
    fn pending(&self) -> PathBuf {
        self.state_dir.join("cleanup-pending")
    }
    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("cleanup-journal.jsonl")
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), String> {
        let dir = self.backup_dir(&m.id);
        let tmp = dir.join("manifest.json.tmp");
        let body = serde_json::to_vec_pretty(m).map_err(|e| e.to_string())?;
        let mut f = fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::rename(&tmp, dir.join("manifest.json")).map_err(|e| format!("manifest: {e}"))
    }

    pub fn read_manifest(&self, id: &str) -> Result<Manifest, String> {
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(format!("{id:?} is not a backup id"));
        }
        let p = self.backup_dir(id).join("manifest.json");
        let text =
            fs::read_to_string(&p).map_err(|e| format!("backup {id}: {} ({e})", p.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("backup {id}: the manifest is damaged ({e})"))
    }

    fn journal_event(&self, e: &Event) {
        let line = serde_json::to_string(e).unwrap_or_default();
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.journal())
        {
            // No fsync per line: a killed agent's writes are in the page
            // cache and survive; only a power cut may lose the last lines.
            let _ = writeln!(f, "{line}");
        }
    }

    /// The id of an apply that did not finish, or a new one.
    fn begin(&self, host: &HostPaths) -> Result<Manifest, String> {
        fs::create_dir_all(self.state_dir.join("backup"))
            .map_err(|e| format!("state dir {}: {e}", self.state_dir.display()))?;
        if let Ok(id) = fs::read_to_string(self.pending()) {
            let id = id.trim().to_string();
            if let Ok(m) = self.read_manifest(&id) {
                return Ok(m);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = format!("{}-{:09}", now.as_secs(), now.subsec_nanos());
        fs::create_dir_all(self.backup_dir(&id).join("files"))
            .map_err(|e| format!("backup dir: {e}"))?;
        let m = Manifest {
            id: id.clone(),
            host_root: host.root().display().to_string(),
            saved: vec![],
            complete: false,
        };
        self.write_manifest(&m)?;
        fs::write(self.pending(), &id).map_err(|e| format!("{}: {e}", self.pending().display()))?;
        Ok(m)
    }
}

/// What happened to one item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub item: String,
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResult {
    pub backup_id: Option<String>,
    pub outcomes: Vec<Outcome>,
    pub refused: Vec<Refusal>,
}

/// Applies the plan: refuses when an interlock holds; otherwise backs up and
/// removes item by item, reporting each through `on_item` as it goes.
pub fn apply(
    plan: &Plan,
    host: &HostPaths,
    store: &Store,
    mut on_item: impl FnMut(&Outcome),
) -> ApplyResult {
    if !plan.allowed() {
        let refused: Vec<Refusal> = plan.blocking().into_iter().cloned().collect();
        for r in &refused {
            store.journal_event(&Event {
                backup_id: String::new(),
                item: r.interlock.clone(),
                status: "refused".into(),
                message: r.reason.clone(),
            });
        }
        return ApplyResult {
            backup_id: None,
            outcomes: vec![],
            refused,
        };
    }
    let mut manifest = match store.begin(host) {
        Ok(m) => m,
        Err(e) => {
            let o = Outcome {
                item: "backup".into(),
                ok: false,
                message: format!("cannot start a backup, nothing removed: {e}"),
            };
            on_item(&o);
            return ApplyResult {
                backup_id: None,
                outcomes: vec![o],
                refused: vec![],
            };
        }
    };
    // Fault hook for the kill tests: abort after N items, as `kill -9` would.
    // Only in test builds (feature `test-hooks`); the shipped agent has none.
    #[cfg(feature = "test-hooks")]
    let crash_after: Option<usize> = std::env::var("CNISHIFT_TEST_CRASH_AFTER_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok());
    #[cfg(not(feature = "test-hooks"))]
    let crash_after: Option<usize> = None;
    let has_interfaces = plan
        .items
        .iter()
        .any(|i| matches!(i.target, Target::Interface { .. }));
    let mut links = if has_interfaces {
        Some(Links::open())
    } else {
        None
    };
    // Pod veths go first and all at once: the kernel batches the unregister
    // work of overlapping deletions (100 veths: ~1.7 s one by one, ~0.2 s
    // concurrently). cni0 and Flannel's own devices follow one by one.
    let pod_veths: Vec<&str> = plan
        .items
        .iter()
        .filter_map(|i| match &i.target {
            Target::Interface { name } if !INTERFACES.contains(&name.as_str()) => {
                Some(name.as_str())
            }
            _ => None,
        })
        .collect();
    let mut veth_results = match links.as_mut() {
        Some(Ok(l)) if !pod_veths.is_empty() => l.remove_concurrently(&pod_veths, &mut manifest),
        _ => Default::default(),
    };
    let mut outcomes = Vec::new();
    for (n, item) in plan.items.iter().enumerate() {
        let result = match &item.target {
            Target::Interface { name } if veth_results.contains_key(name) => {
                veth_results.remove(name).expect("checked")
            }
            Target::Interface { name } => {
                match links.as_mut().expect("opened when there are interfaces") {
                    Ok(l) => l.remove(name, &mut manifest),
                    Err(e) => Err(e.clone()),
                }
            }
            // remove_path makes the backup durable and writes the manifest
            // before it removes anything.
            Target::Path { rel } => remove_path(host, store, rel, &mut manifest),
            Target::Iptables { family, chains } => remove_chains(*family, chains, &mut manifest),
        };
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(e) => (false, e),
        };
        let o = Outcome {
            item: item.id.clone(),
            ok,
            message,
        };
        store.journal_event(&Event {
            backup_id: manifest.id.clone(),
            item: o.item.clone(),
            status: if ok {
                "removed".into()
            } else {
                "failed".into()
            },
            message: o.message.clone(),
        });
        on_item(&o);
        outcomes.push(o);
        if crash_after == Some(n + 1) {
            // Test hook (see above): die mid-apply.
            std::process::abort();
        }
    }
    let all_ok = outcomes.iter().all(|o| o.ok);
    manifest.complete = all_ok;
    let _ = store.write_manifest(&manifest);
    if all_ok {
        let _ = fs::remove_file(store.pending());
    }
    store.journal_event(&Event {
        backup_id: manifest.id.clone(),
        item: "*".into(),
        status: "done".into(),
        message: format!(
            "{} items, {} failed",
            outcomes.len(),
            outcomes.iter().filter(|o| !o.ok).count()
        ),
    });
    ApplyResult {
        backup_id: Some(manifest.id),
        outcomes,
        refused: vec![],
    }
}

/// One netlink connection (and one `ip -details -json link show` for the
/// records) for all the interfaces of an apply: a socket and a process per
/// interface cost seconds on a node with a hundred pod veths.
struct Links {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
    /// `ip -details -json link show`, per interface name, for the manifest.
    details: std::collections::HashMap<String, String>,
}

impl Links {
    fn open() -> Result<Links, String> {
        let (rt, handle) = Links::connect()?;
        let mut details = std::collections::HashMap::new();
        if let Ok(o) = std::process::Command::new("ip")
            .args(["-details", "-json", "link", "show"])
            .output()
        {
            if let Ok(serde_json::Value::Array(list)) =
                serde_json::from_slice::<serde_json::Value>(&o.stdout)
            {
                for l in list {
                    if let Some(name) = l["ifname"].as_str() {
                        details.insert(name.to_string(), l.to_string());
                    }
                }
            }
        }
        Ok(Links {
            rt,
            handle,
            details,
        })
    }

    /// Deletes `names` from up to 16 threads, each with its own netlink socket
    /// (one socket serialises the kernel's work).
    fn remove_concurrently(
        &mut self,
        names: &[&str],
        manifest: &mut Manifest,
    ) -> std::collections::HashMap<String, Result<String, String>> {
        for n in names {
            if let Some(d) = self.details.get(*n) {
                manifest.saved.push(Saved::Interface {
                    name: n.to_string(),
                    details: d.clone(),
                });
            }
        }
        let threads = names.len().clamp(1, 16);
        let chunks: Vec<Vec<&str>> = (0..threads)
            .map(|t| names.iter().skip(t).step_by(threads).copied().collect())
            .collect();
        std::thread::scope(|s| {
            let workers: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        match Links::connect() {
                            Ok((rt, handle)) => {
                                for name in chunk {
                                    out.push((
                                        name.to_string(),
                                        rt.block_on(delete_link(handle.clone(), name)),
                                    ));
                                }
                            }
                            Err(e) => {
                                out.extend(chunk.iter().map(|n| (n.to_string(), Err(e.clone()))))
                            }
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        })
    }

    fn connect() -> Result<(tokio::runtime::Runtime, rtnetlink::Handle), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| e.to_string())?;
        let handle = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
            tokio::spawn(conn);
            Ok::<_, String>(handle)
        })?;
        Ok((rt, handle))
    }

    fn remove(&mut self, name: &str, manifest: &mut Manifest) -> Result<String, String> {
        if let Some(d) = self.details.get(name) {
            manifest.saved.push(Saved::Interface {
                name: name.into(),
                details: d.clone(),
            });
        }
        self.rt.block_on(delete_link(self.handle.clone(), name))
    }
}

async fn delete_link(handle: rtnetlink::Handle, name: &str) -> Result<String, String> {
    use futures::TryStreamExt;
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(Some(l)) => handle
            .link()
            .del(l.header.index)
            .execute()
            .await
            .map(|_| format!("removed interface {name}"))
            .map_err(|e| format!("cannot remove {name}: {e}")),
        Ok(None) => Ok(format!("{name} is already gone")),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Ok(format!("{name} is already gone"))
        }
        Err(e) => Err(format!("cannot look up {name}: {e}")),
    }
}

/// Backs up then removes a file, symlink or directory tree, never following links.
fn remove_path(
    host: &HostPaths,
    store: &Store,
    rel: &str,
    manifest: &mut Manifest,
) -> Result<String, String> {
    let path = host.path(rel);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!("/{rel} is already gone"))
        }
        Err(e) => return Err(format!("/{rel} cannot be examined: {e}")),
    };
    let files_dir = store.backup_dir(&manifest.id).join("files");
    let mut saved = Vec::new();
    backup_tree(&path, rel, &meta, &files_dir, &mut saved)?;
    // The copies must be on disk before the originals go: one syncfs for the
    // whole tree instead of an fsync per file.
    let dir = fs::File::open(&files_dir).map_err(|e| format!("backup dir: {e}"))?;
    nix::unistd::syncfs(&dir).map_err(|e| format!("cannot flush the backup of /{rel}: {e}"))?;
    manifest.saved.extend(saved);
    store.write_manifest(manifest)?;
    let removed = if meta.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    removed.map_err(|e| format!("/{rel} backed up but not removed: {e}"))?;
    Ok(format!("removed /{rel}"))
}

fn backup_tree(
    path: &Path,
    rel: &str,
    meta: &fs::Metadata,
    files_dir: &Path,
    saved: &mut Vec<Saved>,
) -> Result<(), String> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| format!("/{rel}: {e}"))?;
        saved.push(Saved::Symlink {
            rel: rel.into(),
            target: target.display().to_string(),
        });
    } else if ft.is_dir() {
        saved.push(Saved::Dir {
            rel: rel.into(),
            mode: meta.permissions().mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        });
        let mut entries: Vec<_> = fs::read_dir(path)
            .map_err(|e| format!("/{rel} cannot be listed: {e}"))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let child_rel = format!("{rel}/{}", e.file_name().to_string_lossy());
            let child_meta =
                fs::symlink_metadata(e.path()).map_err(|err| format!("/{child_rel}: {err}"))?;
            backup_tree(&e.path(), &child_rel, &child_meta, files_dir, saved)?;
        }
    } else if ft.is_file() {
        let dest = files_dir.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("backup of /{rel}: {e}"))?;
        }
        fs::copy(path, &dest).map_err(|e| format!("/{rel} cannot be backed up: {e}"))?;
        saved.push(Saved::File {
            rel: rel.into(),
            backup: format!("files/{rel}"),
            mode: meta.permissions().mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            len: meta.len(),
        });
    } else {
        return Err(format!("/{rel} is a special file; not touching it"));
    }
    Ok(())
}

/// Builds the `iptables-restore --noflush` input that deletes the jumps into
/// `chains`, then flushes and deletes the chains themselves; other rules and
/// chains (e.g. `FLANNELX`) are not mentioned and so not touched.
pub fn chain_removal_script(save: &str, chains: &[String]) -> (String, usize) {
    // chains are `table/CHAIN`
    let mut out = String::new();
    let mut jumps = 0;
    let mut tables: Vec<&str> = chains
        .iter()
        .filter_map(|c| c.split_once('/').map(|(t, _)| t))
        .collect();
    tables.dedup();
    tables.sort();
    tables.dedup();
    for table in tables {
        let names: Vec<&str> = chains
            .iter()
            .filter_map(|c| c.split_once('/'))
            .filter(|(t, _)| *t == table)
            .map(|(_, n)| n)
            .collect();
        out.push_str(&format!("*{table}\n"));
        let mut in_table = false;
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                in_table = t.trim() == table;
                continue;
            }
            if !in_table {
                continue;
            }
            if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or("");
                let target = rule
                    .split_whitespace()
                    .skip_while(|w| *w != "-j" && *w != "-g")
                    .nth(1)
                    .unwrap_or("");
                // Rules inside our chains go with -F; rules elsewhere that jump
                // into them must be deleted first.
                if !names.contains(&chain) && names.contains(&target) {
                    out.push_str(&format!("-D {rule}\n"));
                    jumps += 1;
                }
            }
        }
        for n in &names {
            out.push_str(&format!("-F {n}\n"));
        }
        for n in &names {
            out.push_str(&format!("-X {n}\n"));
        }
        out.push_str("COMMIT\n");
    }
    (out, jumps)
}

fn remove_chains(
    family: Family,
    chains: &[String],
    manifest: &mut Manifest,
) -> Result<String, String> {
    let (save_tool, restore_tool) = family.tools();
    let save = std::process::Command::new(save_tool)
        .output()
        .map_err(|e| format!("{save_tool}: {e}"))?;
    if !save.status.success() {
        return Err(format!(
            "{save_tool} failed: {}",
            String::from_utf8_lossy(&save.stderr).trim()
        ));
    }
    let save = String::from_utf8_lossy(&save.stdout).into_owned();
    // Only the chains that still exist (a rerun after a crash may find some gone).
    let now = crate::probe::iptables::parse_save(&save);
    let present: Vec<String> = chains
        .iter()
        .filter(|c| now.flannel.contains(c) || now.kube_router.contains(c))
        .cloned()
        .collect();
    if present.is_empty() {
        return Ok(format!("{family:?} chains are already gone"));
    }
    manifest.saved.push(Saved::Iptables {
        family,
        save: save.clone(),
    });
    let (script, jumps) = chain_removal_script(&save, &present);
    let mut child = std::process::Command::new(restore_tool)
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{restore_tool}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| format!("{restore_tool}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{restore_tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{restore_tool} refused the change (nothing was applied): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(format!(
        "removed {} {family:?} chains ({}) and {jumps} jumps into them",
        present.len(),
        present.join(", ")
    ))
}

/// Puts back every file, symlink and directory of backup `id`. Existing files
/// are not overwritten unless identical; interfaces and iptables were only recorded.
pub fn restore(host: &HostPaths, store: &Store, id: &str) -> Result<Vec<String>, String> {
    let m = store.read_manifest(id)?;
    let base = store.backup_dir(id);
    let mut done = Vec::new();
    for s in &m.saved {
        match s {
            Saved::Dir { rel, mode, .. } => {
                let p = host.path(rel);
                fs::create_dir_all(&p).map_err(|e| format!("/{rel}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                    .map_err(|e| format!("/{rel}: {e}"))?;
                done.push(format!("dir /{rel}"));
            }
            Saved::File {
                rel, backup, mode, ..
            } => {
                let p = host.path(rel);
                let bytes =
                    fs::read(base.join(backup)).map_err(|e| format!("backup of /{rel}: {e}"))?;
                if let Ok(existing) = fs::read(&p) {
                    if existing != bytes {
                        return Err(format!(
                            "/{rel} exists with other content; move it away to restore"
                        ));
                    }
                }
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(|e| format!("/{rel}: {e}"))?;
                }
                fs::write(&p, &bytes).map_err(|e| format!("/{rel}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                    .map_err(|e| format!("/{rel}: {e}"))?;
                done.push(format!("file /{rel}"));
            }
            Saved::Symlink { rel, target } => {
                let p = host.path(rel);
                if fs::symlink_metadata(&p).is_err() {
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent).map_err(|e| format!("/{rel}: {e}"))?;
                    }
                    std::os::unix::fs::symlink(target, &p).map_err(|e| format!("/{rel}: {e}"))?;
                }
                done.push(format!("symlink /{rel} -> {target}"));
            }
            Saved::Interface { .. } | Saved::Iptables { .. } => {}
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_script_touches_only_flannels_chains() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n:FLANNELX - [0:0]\n\
                    -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-A FORWARD -j FLANNELX\n\
                    -A FLANNEL-FWD -s 10.42.0.0/16 -j ACCEPT\nCOMMIT\n*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
                    -A POSTROUTING -j FLANNEL-POSTRTG\nCOMMIT\n";
        let (script, jumps) = chain_removal_script(
            save,
            &["filter/FLANNEL-FWD".into(), "nat/FLANNEL-POSTRTG".into()],
        );
        assert_eq!(jumps, 2);
        assert_eq!(
            script,
            "*filter\n-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-F FLANNEL-FWD\n-X FLANNEL-FWD\nCOMMIT\n\
             *nat\n-D POSTROUTING -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n"
        );
        assert!(!script.contains("FLANNELX"));
    }
}
