//! The report: facts plus verdicts, the one document the CLI prints and the
//! gRPC server ships.

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;
use crate::policy::{self, Check, Verdict};
use crate::probe::{self, Facts};

/// The JSON contract (see README "The report's JSON"): `ready`, `checks` and
/// `facts` are stable; other top-level keys may be added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// True when no check failed.
    pub ready: bool,
    pub node: String,
    pub agent: AgentInfo,
    /// The directory every file was read under (`/` on a real node).
    pub host_root: String,
    /// Probe families not run, with why (e.g. `--no-live-probes`).
    pub skipped_probes: Vec<String>,
    /// What the verdicts were judged against: `unspecified` (readiness),
    /// `flannel` (not migrated yet) or `cilium` (migrated).
    #[serde(default)]
    pub expect: policy::Expect,
    /// The families a narrowed report covers; empty for a full report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<policy::Family>,
    pub summary: Summary,
    pub checks: Vec<Check>,
    pub facts: Facts,
}

impl Report {
    /// The facts as the wire's `facts_json`: all of them, or for a narrowed
    /// report only the families it probed (the others were never read, so
    /// shipping their empty values would only mislead).
    pub fn facts_json(&self) -> String {
        let error =
            |e: serde_json::Error| serde_json::json!({ "error": e.to_string() }).to_string();
        if self.families.is_empty() {
            return serde_json::to_string(&self.facts).unwrap_or_else(error);
        }
        let all = match serde_json::to_value(&self.facts) {
            Ok(v) => v,
            Err(e) => return error(e),
        };
        let mut out = serde_json::Map::new();
        for f in &self.families {
            let keys: &[&str] = match f {
                policy::Family::K3s => &["k3s", "cni"],
                policy::Family::PodNetwork => &["network"],
            };
            for k in keys {
                if let Some(v) = all.get(*k) {
                    out.insert(k.to_string(), v.clone());
                }
            }
        }
        serde_json::Value::Object(out).to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    /// The architecture this agent binary was built for (it may differ from
    /// `facts.kernel.arch` when run under emulation).
    pub build_arch: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

pub struct Options {
    pub host: HostPaths,
    pub live: bool,
    pub node_name: String,
}

pub fn build(opts: &Options) -> Report {
    build_expecting(opts, policy::Expect::Unspecified)
}

pub fn build_expecting(opts: &Options, expect: policy::Expect) -> Report {
    build_narrowed(opts, expect, &[])
}

/// The report of `families` alone (every family when empty): only the
/// probes those checks read run, so the coordinator's frequent questions
/// (does k3s still run Flannel here? any pod left on cni0?) cost a few file
/// reads or one netlink dump, not the whole kernel, BPF and iptables survey.
pub fn build_narrowed(
    opts: &Options,
    expect: policy::Expect,
    families: &[policy::Family],
) -> Report {
    let mut families = families.to_vec();
    families.sort();
    families.dedup();
    let (facts, checks) = if families.is_empty() {
        let options = policy::wanted_options();
        let modules = policy::wanted_modules();
        let wanted = probe::Wanted {
            config_options: &options,
            modules: &modules,
        };
        let facts = probe::collect(&opts.host, opts.live, &wanted);
        let checks = policy::evaluate_expecting(&facts, expect);
        (facts, checks)
    } else {
        let only = probe::Only {
            k3s: families.contains(&policy::Family::K3s),
            network: families.contains(&policy::Family::PodNetwork),
        };
        let facts = probe::collect_only(&opts.host, opts.live, only);
        let checks = policy::evaluate_families(&facts, expect, &families);
        (facts, checks)
    };
    let mut summary = Summary::default();
    for c in &checks {
        match c.verdict {
            Verdict::Pass => summary.pass += 1,
            Verdict::Warn => summary.warn += 1,
            Verdict::Fail => summary.fail += 1,
        }
    }
    let mut skipped_probes = Vec::new();
    if !families.is_empty() {
        skipped_probes.push(format!(
            "every probe but {}'s: not asked for (a narrowed report)",
            families
                .iter()
                .map(|f| match f {
                    policy::Family::K3s => "k3s and cni",
                    policy::Family::PodNetwork => "network",
                })
                .collect::<Vec<_>>()
                .join(" and ")
        ));
    }
    if !opts.live {
        skipped_probes.extend(
            [
                "bpf (syscalls)",
                "network (netlink)",
                "iptables (iptables-save)",
            ]
            .iter()
            .map(|p| format!("{p}: live probes disabled (--no-live-probes)")),
        );
    } else if !opts.host.is_system_root() {
        tracing::warn!(
            "live probes read this machine's kernel and network namespace, files come from {}",
            opts.host.root().display()
        );
    }
    Report {
        ready: summary.fail == 0,
        node: opts.node_name.clone(),
        agent: AgentInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            build_arch: std::env::consts::ARCH.into(),
        },
        host_root: opts.host.root().display().to_string(),
        skipped_probes,
        expect,
        families,
        summary,
        checks,
        facts,
    }
}

/// The node name to report: the host root's `/etc/hostname`, else the
/// kernel's hostname.
pub fn default_node_name(host: &HostPaths) -> String {
    if let Ok(h) = host.read_trimmed("etc/hostname") {
        if !h.is_empty() {
            return h;
        }
    }
    if host.is_system_root() {
        if let Ok(h) = nix::unistd::gethostname() {
            return h.to_string_lossy().into_owned();
        }
    }
    "unknown".into()
}
