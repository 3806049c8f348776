//! Remediation: set the sysctls the report flags and load missing loadable
//! modules. The agent decides what may be touched (a fixed allow-list here);
//! a request can only say "plan" or "apply".

use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;
use crate::policy::{Verdict, RUNBOOK_MODULES};
use crate::probe::modules::ModuleState;
use crate::probe::sysctl::{path_of, SysctlValue};
use crate::report::Report;

/// The sysctls remediation may set, and the value each must have.
pub const SYSCTL_TARGETS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.forwarding", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.core.bpf_jit_enable", "1"),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Sysctl,
    Module,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub check_id: String,
    pub kind: Kind,
    /// The sysctl key or module name.
    pub target: String,
    /// Human description: `net.ipv4.ip_forward: 0 -> 1`, `modprobe br_netfilter`.
    pub action: String,
    /// The NixOS line that makes it survive a reboot.
    pub permanent: String,
    /// `None` on a dry run; once applied, whether the step worked...
    pub ok: Option<bool>,
    /// ...and what happened, or why not.
    pub outcome: Option<String>,
}

/// What would be done for this report. Modules come first, because loading
/// `br_netfilter` is what makes `bridge-nf-call-iptables` exist.
pub fn plan(report: &Report) -> Vec<Step> {
    let mut steps = Vec::new();
    let failing = |id: &str| {
        report
            .checks
            .iter()
            .any(|c| c.id == id && c.verdict != Verdict::Pass)
    };
    for (module, _) in RUNBOOK_MODULES {
        if let Some(ModuleState::Loadable(_)) = report.facts.modules.modules.get(*module) {
            steps.push(Step {
                check_id: format!("module.{module}"),
                kind: Kind::Module,
                target: module.to_string(),
                action: format!("modprobe {module}"),
                permanent: format!("boot.kernelModules = [ \"{module}\" ];"),
                ok: None,
                outcome: None,
            });
        }
    }
    for (key, want) in SYSCTL_TARGETS {
        let id = format!("sysctl.{key}");
        if !failing(&id) {
            continue;
        }
        let now = match report.facts.sysctls.get(*key) {
            Some(SysctlValue::Value(v)) => v.clone(),
            Some(SysctlValue::Absent) => "absent".into(),
            _ => "unreadable".into(),
        };
        steps.push(Step {
            check_id: id,
            kind: Kind::Sysctl,
            target: key.to_string(),
            action: format!("{key}: {now} -> {want}"),
            permanent: format!("boot.kernel.sysctl.\"{key}\" = {want};"),
            ok: None,
            outcome: None,
        });
    }
    steps
}

/// Performs the steps. Each step's outcome is recorded; one failure does not
/// stop the others.
pub fn apply(host: &HostPaths, steps: &mut [Step]) {
    for step in steps.iter_mut() {
        let result = match step.kind {
            Kind::Module => load_module(host, &step.target),
            Kind::Sysctl => set_sysctl(host, &step.target),
        };
        step.ok = Some(result.is_ok());
        step.outcome = Some(result.unwrap_or_else(|e| e));
    }
}

fn load_module(host: &HostPaths, module: &str) -> Result<String, String> {
    if !host.is_system_root() {
        return Err(format!(
            "not loading {module}: modules load only into the running kernel (host root is {})",
            host.root().display()
        ));
    }
    // The name comes from RUNBOOK_MODULES, never from a request.
    debug_assert!(RUNBOOK_MODULES.iter().any(|(m, _)| *m == module));
    match Command::new("modprobe").arg(module).output() {
        Ok(o) if o.status.success() => Ok(format!("loaded {module}")),
        Ok(o) => Err(format!(
            "modprobe {module} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run modprobe: {e} (install kmod)")),
    }
}

fn set_sysctl(host: &HostPaths, key: &str) -> Result<String, String> {
    let want = SYSCTL_TARGETS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("{key} is not on the allow-list"))?;
    let rel = path_of(key);
    let path = host.resolve(&rel).map_err(|e| match e {
        e if e.is_missing() => format!("{key} does not exist (load its module first)"),
        e => e.to_string(),
    })?;
    std::fs::write(&path, format!("{want}\n")).map_err(|e| format!("cannot write /{rel}: {e}"))?;
    match host.read_trimmed(&rel) {
        Ok(v) if v == want => Ok(format!("{key} = {want}")),
        Ok(v) => Err(format!("wrote {want} to {key} but it reads back as {v}")),
        Err(e) => Err(e.to_string()),
    }
}
