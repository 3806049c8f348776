//! The inventory, `cluster.toml`: the nodes (name, role, agent address), the
//! TLS files, per-step deadlines and the deploy hook. Relative paths are
//! relative to the inventory file. Every error names the file, line and
//! column, and says what to write instead.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::migrate::hooks::Template;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Controller,
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Controller => "controller",
            Role::Worker => "worker",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub name: String,
    pub role: Role,
    /// `HOST:PORT` of the node's agent.
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Per-step deadlines; each is enforced by the step that uses it.
#[derive(Debug, Clone, Serialize)]
pub struct Deadlines {
    /// TCP connect plus TLS handshake to an agent.
    #[serde(with = "humantime_str")]
    pub connect: Duration,
    /// One agent's report, from the start of the call.
    #[serde(with = "humantime_str")]
    pub report: Duration,
    /// One node's whole cleanup apply.
    #[serde(with = "humantime_str")]
    pub cleanup: Duration,
    /// One node's whole drain, PodDisruptionBudget retries included.
    #[serde(with = "humantime_str")]
    pub drain: Duration,
    /// A node turning Ready again after its CNI was switched.
    #[serde(with = "humantime_str")]
    pub node_ready: Duration,
    /// The Cilium agent pod on a node turning Ready.
    #[serde(with = "humantime_str")]
    pub cilium_ready: Duration,
    /// One Kubernetes API request (not a watch).
    #[serde(with = "humantime_str")]
    pub api: Duration,
    /// The migration lock's lease: gone this long without renewal, it is stale.
    #[serde(with = "humantime_str")]
    pub lock_ttl: Duration,
    /// One run of `[hooks] deploy` (and of `cilium_install`).
    #[serde(with = "humantime_str")]
    pub deploy: Duration,
    /// The dead-man timeout an agent is armed with: unconfirmed this long
    /// after ArmRollback, the agent rolls its node back by itself.
    #[serde(with = "humantime_str")]
    pub confirm: Duration,
    /// How long `migrate` waits for an agent's rollback outcome (and one run
    /// of `[hooks] rollback`).
    #[serde(with = "humantime_str")]
    pub rollback: Duration,
    /// The Verify step: the agent's verdicts, the dial, `[hooks] verify`.
    #[serde(with = "humantime_str")]
    pub verify: Duration,
    /// The Repod step: the node's pods recreated on Cilium and Ready again.
    #[serde(with = "humantime_str")]
    pub repod: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(3),
            report: Duration::from_secs(10),
            cleanup: Duration::from_secs(120),
            drain: Duration::from_secs(600),
            node_ready: Duration::from_secs(300),
            cilium_ready: Duration::from_secs(300),
            api: Duration::from_secs(10),
            lock_ttl: Duration::from_secs(30),
            deploy: Duration::from_secs(600),
            confirm: Duration::from_secs(2700),
            rollback: Duration::from_secs(600),
            verify: Duration::from_secs(300),
            repod: Duration::from_secs(300),
        }
    }
}

mod humantime_str {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    /// The API server's VIP (kube-vip), e.g. 10.1.0.5:6443.
    pub api_vip: Option<SocketAddr>,
    pub pod_cidr: Option<String>,
    pub service_cidr: Option<String>,
    /// Where the Cilium DaemonSet runs.
    pub cilium_namespace: String,
}

/// What a drain may do beyond the safe default (`[drain]`).
#[derive(Debug, Clone, Serialize)]
pub struct DrainPolicy {
    /// Evict pods no controller will recreate (like `kubectl drain --force`).
    pub allow_unmanaged: bool,
    /// Evict pods with emptyDir volumes, whose data is lost (like
    /// `kubectl drain --delete-emptydir-data`).
    pub allow_local_storage: bool,
    /// Drain a node although a pod on it uses a PersistentVolume pinned to
    /// it by node affinity (local-path): the pod cannot run elsewhere and
    /// stays Pending until the node is back.
    pub allow_pinned_volumes: bool,
    /// Evictions in flight at once.
    pub parallel_evictions: usize,
    /// Pause before asking again after a PodDisruptionBudget said no.
    #[serde(with = "humantime_str")]
    pub retry_interval: Duration,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            allow_unmanaged: false,
            allow_local_storage: false,
            allow_pinned_volumes: false,
            parallel_evictions: 8,
            retry_interval: Duration::from_secs(5),
        }
    }
}

/// The inventory's `[hooks]`: command templates, each checked at load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Hooks {
    /// Switches one node to Cilium (`just nix deploy {node}`).
    pub deploy: Option<Template>,
    /// Switches one node back to Flannel (`cnishift rollback NODE`).
    pub rollback: Option<Template>,
    /// An extra check after a node is migrated; its failure fails Verify.
    pub verify: Option<Template>,
    /// Installs Cilium, run once when its DaemonSet is absent at the first Label step.
    pub cilium_install: Option<Template>,
}

/// `[cilium]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CiliumConfig {
    /// `(key, value)`: set on a node at its Label step, so a Cilium DaemonSet
    /// restricted to it never starts on a node still running Flannel.
    pub node_label: Option<(String, String)>,
    /// The Helm values Cilium will be installed with (`cnishift values
    /// check`, also a Preflight gate), relative to the inventory.
    pub values: Option<PathBuf>,
}

/// `[migrate]`.
#[derive(Debug, Clone, Serialize)]
pub struct MigratePolicy {
    /// Workers migrated at once (controllers are always one at a time).
    pub max_unavailable: usize,
}

impl Default for MigratePolicy {
    fn default() -> Self {
        MigratePolicy { max_unavailable: 1 }
    }
}

/// No deadline may be longer than this: a longer one is a typo.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub path: PathBuf,
    pub cluster: Cluster,
    pub tls: Tls,
    pub deadlines: Deadlines,
    pub drain: DrainPolicy,
    pub hooks: Hooks,
    pub cilium: CiliumConfig,
    pub migrate: MigratePolicy,
    pub nodes: Vec<Node>,
}

/// An inventory error with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for InventoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )?;
        } else {
            write!(f, "{}: {}", self.file, self.message)?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InventoryError {}

// --- the raw file ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    cluster: RawCluster,
    tls: Spanned<RawTls>,
    #[serde(default)]
    deadlines: RawDeadlines,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    cilium: RawCilium,
    #[serde(default)]
    migrate: RawMigrate,
    #[serde(default)]
    nodes: Vec<Spanned<RawNode>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    api_vip: Option<Spanned<String>>,
    pod_cidr: Option<Spanned<String>>,
    service_cidr: Option<Spanned<String>>,
    cilium_namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeadlines {
    connect: Option<Spanned<String>>,
    report: Option<Spanned<String>>,
    cleanup: Option<Spanned<String>>,
    drain: Option<Spanned<String>>,
    node_ready: Option<Spanned<String>>,
    cilium_ready: Option<Spanned<String>>,
    api: Option<Spanned<String>>,
    lock_ttl: Option<Spanned<String>>,
    deploy: Option<Spanned<String>>,
    confirm: Option<Spanned<String>>,
    rollback: Option<Spanned<String>>,
    verify: Option<Spanned<String>>,
    repod: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    allow_unmanaged: Option<bool>,
    allow_local_storage: Option<bool>,
    allow_pinned_volumes: Option<bool>,
    parallel_evictions: Option<Spanned<i64>>,
    retry_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    deploy: Option<RawHook>,
    rollback: Option<RawHook>,
    verify: Option<RawHook>,
    cilium_install: Option<RawHook>,
}

type RawHook = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCilium {
    node_label: Option<Spanned<String>>,
    values: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMigrate {
    max_unavailable: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    role: Spanned<Role>,
    address: Spanned<String>,
}

/// Options for loading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Require the TLS files to exist (every command that talks to agents).
    pub require_tls_files: bool,
}

impl Inventory {
    pub fn load(path: &Path, opts: Load) -> Result<Inventory, InventoryError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| InventoryError {
            file: file.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read the inventory: {e}"),
            hint: Some("pass -i PATH, or see examples/avalanche.toml for the format".into()),
        })?;
        Self::parse(&text, path, opts)
    }

    pub fn parse(text: &str, path: &Path, opts: Load) -> Result<Inventory, InventoryError> {
        let file = path.display().to_string();
        let at = |span: Range<usize>, message: String, hint: Option<String>| {
            let (line, column) = line_col(text, span.start);
            InventoryError {
                file: file.clone(),
                line,
                column,
                message,
                hint,
            }
        };
        let raw: RawInventory = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            let hint = hint_for_parse_error(&msg);
            at(span, msg, hint)
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |v: &Spanned<String>, key: &str| -> Result<PathBuf, InventoryError> {
            let p = Path::new(v.get_ref());
            let full = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            };
            if opts.require_tls_files && !full.is_file() {
                return Err(at(
                    v.span(),
                    format!("tls.{key}: {} does not exist", full.display()),
                    Some("create it with `cnishift certs init/issue --dir DIR`; relative paths are relative to the inventory file".into()),
                ));
            }
            Ok(full)
        };
        let tls_raw = raw.tls.get_ref();
        let tls = Tls {
            ca: resolve(&tls_raw.ca, "ca")?,
            cert: resolve(&tls_raw.cert, "cert")?,
            key: resolve(&tls_raw.key, "key")?,
        };

        let duration = |v: &Option<Spanned<String>>,
                        key: &str,
                        default: Duration|
         -> Result<Duration, InventoryError> {
            match v {
                None => Ok(default),
                Some(s) => match humantime::parse_duration(s.get_ref()) {
                    Ok(d) if d.is_zero() => Err(at(
                        s.span(),
                        format!("deadlines.{key} must be longer than zero"),
                        None,
                    )),
                    Ok(d) if d > MAX_DEADLINE => Err(at(
                        s.span(),
                        format!(
                            "deadlines.{key}: {} is longer than 24h",
                            humantime::format_duration(d)
                        ),
                        Some(
                            "a deadline is how long one step may take; write it like \"10m\""
                                .into(),
                        ),
                    )),
                    Ok(d) => Ok(d),
                    Err(e) => Err(at(
                        s.span(),
                        format!("deadlines.{key}: {:?} is not a duration ({e})", s.get_ref()),
                        Some("write it like \"5s\", \"2m\" or \"1h 30m\"".into()),
                    )),
                },
            }
        };
        let defaults = Deadlines::default();
        let deadlines = Deadlines {
            connect: duration(&raw.deadlines.connect, "connect", defaults.connect)?,
            report: duration(&raw.deadlines.report, "report", defaults.report)?,
            cleanup: duration(&raw.deadlines.cleanup, "cleanup", defaults.cleanup)?,
            drain: duration(&raw.deadlines.drain, "drain", defaults.drain)?,
            node_ready: duration(&raw.deadlines.node_ready, "node_ready", defaults.node_ready)?,
            cilium_ready: duration(
                &raw.deadlines.cilium_ready,
                "cilium_ready",
                defaults.cilium_ready,
            )?,
            api: duration(&raw.deadlines.api, "api", defaults.api)?,
            lock_ttl: duration(&raw.deadlines.lock_ttl, "lock_ttl", defaults.lock_ttl)?,
            deploy: duration(&raw.deadlines.deploy, "deploy", defaults.deploy)?,
            confirm: duration(&raw.deadlines.confirm, "confirm", defaults.confirm)?,
            rollback: duration(&raw.deadlines.rollback, "rollback", defaults.rollback)?,
            verify: duration(&raw.deadlines.verify, "verify", defaults.verify)?,
            repod: duration(&raw.deadlines.repod, "repod", defaults.repod)?,
        };
        let drain_defaults = DrainPolicy::default();
        let drain = DrainPolicy {
            allow_unmanaged: raw.drain.allow_unmanaged.unwrap_or(false),
            allow_local_storage: raw.drain.allow_local_storage.unwrap_or(false),
            allow_pinned_volumes: raw.drain.allow_pinned_volumes.unwrap_or(false),
            parallel_evictions: match &raw.drain.parallel_evictions {
                None => drain_defaults.parallel_evictions,
                Some(n) if (1..=256).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    return Err(at(
                        n.span(),
                        format!(
                            "drain.parallel_evictions: {} is not between 1 and 256",
                            n.get_ref()
                        ),
                        None,
                    ))
                }
            },
            retry_interval: duration(
                &raw.drain.retry_interval,
                "retry_interval",
                drain_defaults.retry_interval,
            )
            .map_err(|mut e| {
                e.message = e.message.replacen("deadlines.", "drain.", 1);
                e
            })?,
        };

        let cluster = Cluster {
            name: raw.cluster.name.clone().unwrap_or_else(|| "cluster".into()),
            api_vip: match &raw.cluster.api_vip {
                None => None,
                Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|_| {
                    at(
                        v.span(),
                        format!("cluster.api_vip: {:?} is not IP:PORT", v.get_ref()),
                        Some("e.g. api_vip = \"10.1.0.5:6443\"".into()),
                    )
                })?),
            },
            pod_cidr: cidr(&raw.cluster.pod_cidr, "pod_cidr", &at)?,
            service_cidr: cidr(&raw.cluster.service_cidr, "service_cidr", &at)?,
            cilium_namespace: raw
                .cluster
                .cilium_namespace
                .clone()
                .unwrap_or_else(|| "kube-system".into()),
        };

        let hook = |h: &Option<RawHook>, key: &str| -> Result<Option<Template>, InventoryError> {
            let Some(h) = h else { return Ok(None) };
            if h.get_ref().is_empty() {
                return Err(at(
                    h.span(),
                    format!("hooks.{key} is empty"),
                    Some(format!("e.g. {key} = [\"./switch-node.sh\", \"{{node}}\"]")),
                ));
            }
            let argv: Vec<String> = h.get_ref().iter().map(|a| a.get_ref().clone()).collect();
            Template::parse(&argv).map(Some).map_err(|(i, e)| {
                let span = h.get_ref()[i].span();
                // The span starts at the opening quote.
                at(
                    span.start + 1 + e.offset..span.end,
                    format!("hooks.{key}: {}", e.message),
                    Some("write {{ and }} for literal braces".into()),
                )
            })
        };
        let hooks = Hooks {
            deploy: hook(&raw.hooks.deploy, "deploy")?,
            rollback: hook(&raw.hooks.rollback, "rollback")?,
            verify: hook(&raw.hooks.verify, "verify")?,
            cilium_install: hook(&raw.hooks.cilium_install, "cilium_install")?,
        };
        let cilium = CiliumConfig {
            node_label: match &raw.cilium.node_label {
                None => None,
                Some(l) => Some(parse_label(l.get_ref()).map_err(|why| {
                    at(
                        l.span(),
                        format!("cilium.node_label: {:?} {why}", l.get_ref()),
                        Some(
                            "write key=value, e.g. node_label = \"cnishift.io/cni=cilium\"".into(),
                        ),
                    )
                })?),
            },
            values: match &raw.cilium.values {
                None => None,
                Some(v) if v.get_ref().trim().is_empty() => {
                    return Err(at(
                        v.span(),
                        "cilium.values is empty".into(),
                        Some(
                            "name the Helm values file, e.g. values = \"cilium/helm-values.yaml\""
                                .into(),
                        ),
                    ))
                }
                Some(v) => {
                    let p = Path::new(v.get_ref());
                    Some(if p.is_absolute() {
                        p.to_path_buf()
                    } else {
                        base.join(p)
                    })
                }
            },
        };

        let mut nodes = Vec::new();
        let mut seen_names: HashMap<String, usize> = HashMap::new();
        let mut seen_addrs: HashMap<String, String> = HashMap::new();
        for n in &raw.nodes {
            let n = n.get_ref();
            let name = n.name.get_ref().clone();
            if let Err(e) = crate::certs::validate_name(&name) {
                return Err(at(n.name.span(), e.to_string(), None));
            }
            if let Some(first) = seen_names.get(&name) {
                return Err(at(
                    n.name.span(),
                    format!("duplicate node name {name:?} (first defined at line {first})"),
                    Some("every [[nodes]] entry needs its own name".into()),
                ));
            }
            seen_names.insert(name.clone(), line_col(text, n.name.span().start).0);
            let address = n.address.get_ref().clone();
            if let Err(why) = validate_address(&address) {
                return Err(at(
                    n.address.span(),
                    format!("node {name:?}: address {address:?} {why}"),
                    Some("write HOST:PORT, e.g. address = \"10.1.0.11:7443\"".into()),
                ));
            }
            if let Some(other) = seen_addrs.insert(address.clone(), name.clone()) {
                return Err(at(
                    n.address.span(),
                    format!("node {name:?} has the same address as {other:?}"),
                    None,
                ));
            }
            nodes.push(Node {
                name,
                role: *n.role.get_ref(),
                address,
            });
        }
        if nodes.is_empty() {
            return Err(InventoryError {
                file,
                line: 0,
                column: 0,
                message: "no [[nodes]] defined".into(),
                hint: Some(
                    "add one [[nodes]] table per node: name, role (controller|worker), address"
                        .into(),
                ),
            });
        }
        let workers = nodes.iter().filter(|n| n.role == Role::Worker).count();
        let migrate = MigratePolicy {
            max_unavailable: match &raw.migrate.max_unavailable {
                None => 1,
                Some(n) if *n.get_ref() < 1 => {
                    return Err(at(
                        n.span(),
                        format!("migrate.max_unavailable: {} is less than 1", n.get_ref()),
                        Some("1 migrates one worker at a time".into()),
                    ))
                }
                Some(n) if *n.get_ref() as u64 > workers as u64 => {
                    return Err(at(
                        n.span(),
                        format!(
                            "migrate.max_unavailable: {} is more than the {workers} workers in the inventory",
                            n.get_ref()
                        ),
                        Some("it counts workers only; controllers are migrated one at a time".into()),
                    ))
                }
                Some(n) => *n.get_ref() as usize,
            },
        };
        Ok(Inventory {
            path: path.to_path_buf(),
            cluster,
            tls,
            deadlines,
            drain,
            hooks,
            cilium,
            migrate,
            nodes,
        })
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// `key=value` as a Kubernetes label: an optional DNS-subdomain prefix and
/// `/`, a name of at most 63 characters, and a value of at most 63.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err("has no '='".into());
    };
    let segment = |x: &str| {
        !x.is_empty()
            && x.len() <= 63
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && x.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && x.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            let dns = prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !dns {
                return Err(format!("has an invalid key prefix {prefix:?}"));
            }
            name
        }
        None => key,
    };
    if !segment(name) {
        return Err(format!("has an invalid key name {name:?}"));
    }
    if !value.is_empty() && !segment(value) {
        return Err(format!("has an invalid value {value:?}"));
    }
    if value.is_empty() {
        return Err("has an empty value".into());
    }
    Ok((key.to_string(), value.to_string()))
}

fn cidr(
    v: &Option<Spanned<String>>,
    key: &str,
    at: &dyn Fn(Range<usize>, String, Option<String>) -> InventoryError,
) -> Result<Option<String>, InventoryError> {
    let Some(v) = v else { return Ok(None) };
    let s = v.get_ref();
    let ok = s.split_once('/').is_some_and(|(ip, len)| {
        ip.parse::<IpAddr>().is_ok_and(|ip| {
            len.parse::<u8>()
                .is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 })
        })
    });
    if ok {
        Ok(Some(s.clone()))
    } else {
        Err(at(
            v.span(),
            format!("cluster.{key}: {s:?} is not a CIDR"),
            Some("e.g. \"10.42.0.0/16\"".into()),
        ))
    }
}

/// `IP:PORT`, `[IPv6]:PORT` or `hostname:PORT`.
fn validate_address(a: &str) -> Result<(), String> {
    if a.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err("has no port".into());
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(format!("has an invalid port {port:?}")),
        Ok(_) => {}
    }
    if host.is_empty() {
        return Err("has no host".into());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("has an invalid IPv4 address {host:?}"));
    }
    if host.contains(':') {
        return Err("is an IPv6 address without brackets (write [addr]:port)".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("has an invalid host name {host:?}"));
    }
    Ok(())
}

fn hint_for_parse_error(msg: &str) -> Option<String> {
    if msg.contains("unknown field") {
        Some("remove or rename the key; the accepted keys are listed after \"expected\"".into())
    } else if msg.contains("unknown variant") {
        Some("role is \"controller\" or \"worker\"".into())
    } else if msg.contains("missing field") {
        Some("see examples/avalanche.toml for a complete inventory".into())
    } else {
        None
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "avalanche"
api_vip = "10.1.0.5:6443"
pod_cidr = "10.42.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "2s"

[[nodes]]
name = "opi01"
role = "controller"
address = "10.1.0.11:7443"

[[nodes]]
name = "raccoon00"
role = "worker"
address = "raccoon00.lan:7443"
"#;

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(
            text,
            Path::new("/etc/cnishift/cluster.toml"),
            Load::default(),
        )
    }

    #[test]
    fn a_good_inventory_resolves_relative_paths() {
        let inv = parse(GOOD).unwrap();
        assert_eq!(inv.tls.ca, Path::new("/etc/cnishift/pki/ca.pem"));
        assert_eq!(inv.nodes.len(), 2);
        assert_eq!(inv.nodes[0].role, Role::Controller);
        assert_eq!(inv.deadlines.connect, Duration::from_secs(2));
        assert_eq!(inv.deadlines.report, Duration::from_secs(10));
    }

    fn err(text: &str) -> InventoryError {
        parse(text).unwrap_err()
    }

    #[test]
    fn drain_policy_and_kubernetes_deadlines() {
        let inv = parse(GOOD).unwrap();
        assert!(
            !inv.drain.allow_unmanaged && !inv.drain.allow_local_storage,
            "safe by default"
        );
        assert_eq!(inv.drain.parallel_evictions, 8);
        assert_eq!(inv.deadlines.drain, Duration::from_secs(600));
        let text = GOOD.replace(
            "connect = \"2s\"",
            "connect = \"2s\"\ndrain = \"15m\"\nnode_ready = \"4m\"\napi = \"5s\"\n\n[drain]\nallow_local_storage = true\nparallel_evictions = 4\nretry_interval = \"2s\"",
        );
        let inv = parse(&text).unwrap();
        assert_eq!(inv.deadlines.drain, Duration::from_secs(900));
        assert_eq!(inv.deadlines.node_ready, Duration::from_secs(240));
        assert_eq!(inv.deadlines.api, Duration::from_secs(5));
        assert!(inv.drain.allow_local_storage && !inv.drain.allow_unmanaged);
        assert_eq!(inv.drain.parallel_evictions, 4);
        assert_eq!(inv.drain.retry_interval, Duration::from_secs(2));

        let bad =
            |section: &str| err(&GOOD.replace("[deadlines]", &format!("{section}\n\n[deadlines]")));
        expect(
            &bad("[drain]\nparallel_evictions = 0"),
            (13, 22),
            "drain.parallel_evictions: 0 is not between 1 and 256",
            None,
        );
        expect(
            &bad("[drain]\nretry_interval = \"soon\""),
            (13, 18),
            "drain.retry_interval: \"soon\" is not a duration (expected number at 0)",
            Some(DURATION_HINT),
        );
        expect(
            &bad("[drain]\nallow_unmanged = true"),
            (13, 1),
            "unknown field `allow_unmanged`, expected one of `allow_unmanaged`, \
             `allow_local_storage`, `allow_pinned_volumes`, `parallel_evictions`, `retry_interval`",
            Some(UNKNOWN_KEY_HINT),
        );
        expect(
            &bad("[drain]\nallow_unmanaged = \"yes\""),
            (13, 19),
            "invalid type: string \"yes\", expected a boolean",
            None,
        );
    }

    const DURATION_HINT: &str = "write it like \"5s\", \"2m\" or \"1h 30m\"";
    const UNKNOWN_KEY_HINT: &str =
        "remove or rename the key; the accepted keys are listed after \"expected\"";
    const ADDRESS_HINT: &str = "write HOST:PORT, e.g. address = \"10.1.0.11:7443\"";

    /// The whole error: where it points, what it says, and its hint.
    fn expect(e: &InventoryError, at: (usize, usize), message: &str, hint: Option<&str>) {
        assert_eq!(
            (e.line, e.column, e.message.as_str(), e.hint.as_deref()),
            (at.0, at.1, message, hint),
            "{e}"
        );
    }

    #[test]
    fn errors_name_line_column_and_a_fix() {
        let e = err(&GOOD.replace("role = \"worker\"", "role = \"wrker\""));
        expect(
            &e,
            (22, 8),
            "unknown variant `wrker`, expected `controller` or `worker`",
            Some("role is \"controller\" or \"worker\""),
        );
        assert_eq!(
            e.to_string(),
            "/etc/cnishift/cluster.toml:22:8: unknown variant `wrker`, expected `controller` \
             or `worker`\n  hint: role is \"controller\" or \"worker\""
        );
        expect(
            &err(&GOOD.replace("name = \"raccoon00\"", "name = \"opi01\"")),
            (21, 8),
            "duplicate node name \"opi01\" (first defined at line 16)",
            Some("every [[nodes]] entry needs its own name"),
        );
        expect(
            &err(&GOOD.replace("10.1.0.11:7443", "10.1.0.11")),
            (18, 11),
            "node \"opi01\": address \"10.1.0.11\" has no port",
            Some(ADDRESS_HINT),
        );
        expect(
            &err(&GOOD.replace("10.1.0.11:7443", "10.1.0.300:7443")),
            (18, 11),
            "node \"opi01\": address \"10.1.0.300:7443\" has an invalid IPv4 address \"10.1.0.300\"",
            Some(ADDRESS_HINT),
        );
        expect(
            &err(&GOOD.replace("10.1.0.11:7443", "10.1.0.11:99999")),
            (18, 11),
            "node \"opi01\": address \"10.1.0.11:99999\" has an invalid port \"99999\"",
            Some(ADDRESS_HINT),
        );
        expect(
            &err(&GOOD.replace("[deadlines]", "[deadlines]\nrepor = \"1s\"")),
            (13, 1),
            "unknown field `repor`, expected one of `connect`, `report`, `cleanup`, `drain`, \
             `node_ready`, `cilium_ready`, `api`, `lock_ttl`, `deploy`, `confirm`, `rollback`, `verify`, `repod`",
            Some(UNKNOWN_KEY_HINT),
        );
        expect(
            &err(&GOOD.replace("connect = \"2s\"", "connect = \"soon\"")),
            (13, 11),
            "deadlines.connect: \"soon\" is not a duration (expected number at 0)",
            Some(DURATION_HINT),
        );
        expect(
            &err(&GOOD.replace("name = \"opi01\"", "name = \"../opi01\"")),
            (16, 8),
            "\"../opi01\" is not a usable node name: use letters, digits, '-' and '.' \
             (a DNS name, as in the inventory)",
            None,
        );
        expect(
            &err(&GOOD.replace("10.42.0.0/16", "10.42.0.0/33")),
            (5, 12),
            "cluster.pod_cidr: \"10.42.0.0/33\" is not a CIDR",
            Some("e.g. \"10.42.0.0/16\""),
        );
        // TOML syntax errors keep the parser's message and position.
        expect(
            &err("garbage = ["),
            (1, 12),
            "unclosed array, expected `]`",
            None,
        );
        // No position: the error is about what is missing from the whole file.
        expect(
            &err("[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n"),
            (0, 0),
            "no [[nodes]] defined",
            Some("add one [[nodes]] table per node: name, role (controller|worker), address"),
        );
    }

    #[test]
    fn missing_tls_files_are_reported_when_required() {
        let e = Inventory::parse(
            GOOD,
            Path::new("/nonexistent/cluster.toml"),
            Load {
                require_tls_files: true,
            },
        )
        .unwrap_err();
        expect(
            &e,
            (8, 6),
            "tls.ca: /nonexistent/pki/ca.pem does not exist",
            Some(
                "create it with `cnishift certs init/issue --dir DIR`; relative paths are \
                 relative to the inventory file",
            ),
        );
    }

    /// GOOD with `extra` inserted before its `[deadlines]` table.
    fn with(extra: &str) -> String {
        GOOD.replace("[deadlines]", &format!("{extra}\n\n[deadlines]"))
    }

    #[test]
    fn hooks_cilium_and_migrate_sections() {
        let inv = parse(GOOD).unwrap();
        assert!(inv.hooks.deploy.is_none() && inv.cilium.node_label.is_none());
        assert_eq!(inv.migrate.max_unavailable, 1);
        assert_eq!(inv.deadlines.confirm, Duration::from_secs(2700));
        let inv = parse(&with(
            "[hooks]\ndeploy = [\"just\", \"nix\", \"deploy\", \"{node}\"]\n\
             rollback = [\"./back.sh\", \"{address}\", \"{role}\"]\n\
             verify = [\"cilium\", \"connectivity\", \"test\", \"--node\", \"{node}\"]\n\
             cilium_install = [\"helm\", \"install\", \"cilium\"]\n\n\
             [cilium]\nnode_label = \"cnishift.io/cni=cilium\"\n\n[migrate]\nmax_unavailable = 1",
        ))
        .unwrap();
        assert_eq!(
            inv.hooks.deploy.unwrap().argv(),
            ["just", "nix", "deploy", "{node}"]
        );
        assert!(inv.hooks.rollback.is_some() && inv.hooks.verify.is_some());
        assert!(inv.hooks.cilium_install.is_some());
        assert_eq!(
            inv.cilium.node_label,
            Some(("cnishift.io/cni".to_string(), "cilium".to_string()))
        );
        assert_eq!(inv.cilium.values, None);
        let inv = parse(&with("[cilium]\nvalues = \"cilium/helm-values.yaml\"\n\n[drain]\nallow_pinned_volumes = true")).unwrap();
        assert_eq!(
            inv.cilium.values.as_deref(),
            Some(Path::new("/etc/cnishift/cilium/helm-values.yaml"))
        );
        assert!(inv.drain.allow_pinned_volumes && !parse(GOOD).unwrap().drain.allow_pinned_volumes);
        let e = err(&with("[cilium]\nvalues = \"\""));
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (13, 10, "cilium.values is empty")
        );
        let e = err(&with("[cilium]\nvalues = 3"));
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (13, 10, "invalid type: integer `3`, expected a string")
        );
    }

    #[test]
    fn an_unknown_placeholder_is_an_error_at_its_place() {
        let e = err(&with("[hooks]\nverify = [\"check\", \"--on={nodename}\"]"));
        assert_eq!(
            e.to_string(),
            "/etc/cnishift/cluster.toml:13:26: hooks.verify: \"--on={nodename}\": unknown placeholder \
             {nodename}; a hook may use {node}, {address}, {role}, {run}\n  hint: write {{ and }} for literal braces"
        );
        let e = err(&with("[hooks]\ndeploy = []"));
        assert_eq!((e.line, e.message.as_str()), (13, "hooks.deploy is empty"));
        let e = err(&with("[hooks]\nrollback = [\"x{node\"]"));
        assert_eq!(
            e.message,
            "hooks.rollback: \"x{node\": '{' without a closing '}'"
        );
        let e = err(&with("[hooks]\npostdeploy = [\"x\"]"));
        assert!(e.message.starts_with("unknown field `postdeploy`"), "{e}");
    }

    #[test]
    fn node_label_must_be_a_label() {
        for (label, why) in [
            ("cilium", "has no '='"),
            ("cnishift.io/cni=", "has an empty value"),
            (
                "Bad_Prefix/cni=cilium",
                "has an invalid key prefix \"Bad_Prefix\"",
            ),
            (
                "cnishift.io/-cni=cilium",
                "has an invalid key name \"-cni\"",
            ),
            ("cni=ci lium", "has an invalid value \"ci lium\""),
        ] {
            let e = err(&with(&format!("[cilium]\nnode_label = \"{label}\"")));
            assert_eq!(e.message, format!("cilium.node_label: {label:?} {why}"));
            assert_eq!((e.line, e.column), (13, 14), "{e}");
        }
        let inv = parse(&with("[cilium]\nnode_label = \"cni=cilium\"")).unwrap();
        assert_eq!(inv.cilium.node_label.unwrap().0, "cni");
    }

    #[test]
    fn max_unavailable_counts_workers() {
        let e = err(&with("[migrate]\nmax_unavailable = 0"));
        assert_eq!(
            e.to_string(),
            "/etc/cnishift/cluster.toml:13:19: migrate.max_unavailable: 0 is less than 1\n  \
             hint: 1 migrates one worker at a time"
        );
        let e = err(&with("[migrate]\nmax_unavailable = 2"));
        assert_eq!(
            e.message,
            "migrate.max_unavailable: 2 is more than the 1 workers in the inventory"
        );
        assert_eq!((e.line, e.column), (13, 19));
        assert_eq!(
            parse(&with("[migrate]\nmax_unavailable = 1"))
                .unwrap()
                .migrate
                .max_unavailable,
            1
        );
    }

    #[test]
    fn zero_and_absurd_deadlines_are_errors() {
        for key in ["deploy", "confirm", "rollback", "verify", "repod", "drain"] {
            let e = err(&GOOD.replace("connect = \"2s\"", &format!("{key} = \"0s\"")));
            assert_eq!(
                e.message,
                format!("deadlines.{key} must be longer than zero")
            );
            assert_eq!((e.line, e.column), (13, key.len() + 4), "{e}");
            let e = err(&GOOD.replace("connect = \"2s\"", &format!("{key} = \"25h\"")));
            assert_eq!(
                e.message,
                format!("deadlines.{key}: 1day 1h is longer than 24h")
            );
            assert_eq!(e.line, 13);
        }
        let inv = parse(&GOOD.replace(
            "connect = \"2s\"",
            "deploy = \"20m\"\nconfirm = \"24h\"\nrollback = \"3m\"\nverify = \"90s\"\nrepod = \"4m\"",
        ))
        .unwrap();
        let d = &inv.deadlines;
        assert_eq!(
            [d.deploy, d.confirm, d.rollback, d.verify, d.repod].map(|d| d.as_secs()),
            [1200, 86400, 180, 90, 240]
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
