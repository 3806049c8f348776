//! Kernel modules: for each module Cilium or the runbook needs, is it loaded,
//! built in, loadable, or missing?
//!
//! "Loadable" means `modules.dep` for the running release lists it, which is
//! what `modprobe` consults. A kernel without module support has no
//! `/proc/modules` at all (this is normal, e.g. on many VM kernels): then a
//! module is either built in or missing, and that is not an error.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::kconfig::{KernelConfigFacts, OptionValue};
use crate::host::HostPaths;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum ModuleState {
    Loaded,
    BuiltIn(String),
    Loadable(String),
    Missing(String),
    /// We could not read what would tell us (e.g. `modules.dep` unreadable).
    Unknown(String),
}

impl ModuleState {
    /// Present now or on demand.
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Loaded | Self::BuiltIn(_) | Self::Loadable(_))
    }
}

/// One module to look for, and the config option that builds it (if any).
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub module: &'a str,
    pub option: Option<&'a str>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModuleFacts {
    /// False when the kernel cannot load modules at all.
    pub module_support: bool,
    pub modules: BTreeMap<String, ModuleState>,
    /// Malformed `/proc/modules` lines: (line number, content).
    pub malformed_lines: Vec<(usize, String)>,
    pub errors: Vec<String>,
}

/// `xt_TPROXY.ko.zst` and `xt-TPROXY` both mean module `xt_TPROXY`.
pub fn normalise(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn probe(
    host: &HostPaths,
    release: Option<&str>,
    config: &KernelConfigFacts,
    wanted: &[Wanted],
) -> ModuleFacts {
    let mut facts = ModuleFacts::default();

    // Loaded modules.
    let mut loaded = HashSet::new();
    let proc_modules = host.read_string("proc/modules");
    match &proc_modules {
        Ok(text) => {
            for (i, line) in text.lines().enumerate() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() >= 3
                    && valid_module_name(fields[0])
                    && fields[1].parse::<u64>().is_ok()
                {
                    loaded.insert(normalise(fields[0]));
                } else if !line.trim().is_empty() {
                    facts
                        .malformed_lines
                        .push((i + 1, line.chars().take(80).collect()));
                }
            }
        }
        Err(e) if e.is_missing() => {}
        Err(e) => facts.errors.push(e.to_string()),
    }

    // What the kernel could load on demand, and what is compiled in.
    let (mut builtin, mut dep) = (HashSet::new(), HashMap::new());
    let mut dep_error: Option<String> = None;
    match release {
        Some(rel) => {
            match host.read_string(&format!("lib/modules/{rel}/modules.builtin")) {
                Ok(t) => builtin.extend(t.lines().filter(|l| !l.trim().is_empty()).map(normalise)),
                Err(e) if e.is_missing() => {}
                Err(e) => facts.errors.push(e.to_string()),
            }
            match host.read_string(&format!("lib/modules/{rel}/modules.dep")) {
                Ok(t) => {
                    for line in t.lines() {
                        if let Some((path, _deps)) = line.split_once(':') {
                            dep.insert(normalise(path.trim()), path.trim().to_string());
                        }
                    }
                }
                Err(e) => dep_error = Some(e.to_string()),
            }
        }
        None => {
            dep_error = Some(
                "the kernel release is unknown, so /lib/modules/<release> cannot be found".into(),
            )
        }
    }

    let config_modules = config.value("MODULES");
    facts.module_support = match config_modules {
        Some(OptionValue::Y) => true,
        Some(_) => false,
        // No config: trust /proc/modules' existence, as the kernel does.
        None => proc_modules.is_ok(),
    };

    for w in wanted {
        let name = normalise(w.module);
        let opt = w.option.and_then(|o| config.value(o).map(|v| (o, v)));
        let state = if loaded.contains(&name) {
            ModuleState::Loaded
        } else if let Some((o, OptionValue::Y)) = &opt {
            ModuleState::BuiltIn(format!("CONFIG_{o}=y"))
        } else if builtin.contains(&name) {
            ModuleState::BuiltIn("listed in modules.builtin".into())
        } else if let Some((o, OptionValue::Unset)) = &opt {
            ModuleState::Missing(format!("CONFIG_{o} is not set in this kernel"))
        } else if !facts.module_support && config_modules.is_some() {
            ModuleState::Missing(
                "the kernel has no loadable-module support and it is not built in".into(),
            )
        } else if let Some(path) = dep.get(&name) {
            ModuleState::Loadable(format!("/lib/modules/{}/{path}", release.unwrap_or("?")))
        } else if let Some(err) = &dep_error {
            ModuleState::Unknown(format!("cannot tell whether it is loadable: {err}"))
        } else {
            ModuleState::Missing(format!(
                "not in /lib/modules/{}/modules.dep",
                release.unwrap_or("?")
            ))
        };
        facts.modules.insert(name, state);
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_like_modprobe() {
        assert_eq!(
            normalise("kernel/net/netfilter/xt_TPROXY.ko.zst"),
            "xt_TPROXY"
        );
        assert_eq!(
            normalise("kernel/net/bridge/br_netfilter.ko"),
            "br_netfilter"
        );
        assert_eq!(normalise("ip-set"), "ip_set");
    }
}
