//! k3s on this node: server or agent, and whether the flags that hand the
//! network over to Cilium (`--flannel-backend=none`, `--disable-network-policy`)
//! are in effect now (the running process plus its config files) and will be
//! after the next restart (the systemd unit plus the config files).

use std::fs;

use serde::{Deserialize, Serialize};
use yaml_rust2::{Yaml, YamlLoader};

use crate::host::HostPaths;

pub const CONFIG_FILE: &str = "etc/rancher/k3s/config.yaml";
pub const CONFIG_DROPIN_DIR: &str = "etc/rancher/k3s/config.yaml.d";
pub const UNITS: &[&str] = &[
    "etc/systemd/system/k3s.service",
    "etc/systemd/system/k3s-agent.service",
    "lib/systemd/system/k3s.service",
    "usr/lib/systemd/system/k3s.service",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

/// The two settings we care about, as one source states them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkFlags {
    pub flannel_backend: Option<String>,
    pub disable_network_policy: Option<bool>,
}

impl NetworkFlags {
    /// `other` wins where it says something (command-line flags over config).
    fn overlay(&self, other: &NetworkFlags) -> NetworkFlags {
        NetworkFlags {
            flannel_backend: other
                .flannel_backend
                .clone()
                .or_else(|| self.flannel_backend.clone()),
            disable_network_policy: other.disable_network_policy.or(self.disable_network_policy),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    pub role: Option<Role>,
    pub flags: NetworkFlags,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct K3sFacts {
    pub role: Option<Role>,
    /// The running k3s process (`/proc/<pid>/cmdline`).
    pub process: Option<Source>,
    /// `config.yaml` and its drop-ins merged, in k3s's order.
    pub config: Option<Source>,
    pub unit: Option<Source>,
    /// What is in force now (process + config; defaults where silent).
    pub effective: Option<EffectiveFlags>,
    /// What will be in force after `systemctl restart` (unit + config).
    pub after_restart: Option<EffectiveFlags>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveFlags {
    /// k3s's default is `vxlan`.
    pub flannel_backend: String,
    pub disable_network_policy: bool,
}

impl EffectiveFlags {
    pub fn cilium_ready(&self) -> bool {
        self.flannel_backend == "none" && self.disable_network_policy
    }
    fn from(flags: &NetworkFlags) -> Self {
        EffectiveFlags {
            flannel_backend: flags
                .flannel_backend
                .clone()
                .unwrap_or_else(|| "vxlan".into()),
            disable_network_policy: flags.disable_network_policy.unwrap_or(false),
        }
    }
}

pub fn probe(host: &HostPaths) -> K3sFacts {
    let mut facts = K3sFacts::default();
    facts.process = find_process(host, &mut facts.errors);
    facts.config = read_config(host, &mut facts.errors);
    facts.unit = read_unit(host, &mut facts.errors);
    facts.role = [&facts.process, &facts.unit, &facts.config]
        .iter()
        .find_map(|s| s.as_ref().and_then(|s| s.role));
    let config_flags = facts
        .config
        .as_ref()
        .map(|c| c.flags.clone())
        .unwrap_or_default();
    if let Some(p) = &facts.process {
        facts.effective = Some(EffectiveFlags::from(&config_flags.overlay(&p.flags)));
    }
    if let Some(u) = &facts.unit {
        facts.after_restart = Some(EffectiveFlags::from(&config_flags.overlay(&u.flags)));
    }
    if facts.effective.is_none() && facts.process.is_none() && facts.config.is_some() {
        // k3s is configured but not running: the config is all we know.
        facts
            .after_restart
            .get_or_insert_with(|| EffectiveFlags::from(&config_flags));
    }
    facts
}

/// Reads the role and network flags from a k3s argument list
/// (`k3s server --flannel-backend=none ...`).
pub fn parse_args(args: &[String]) -> (Option<Role>, NetworkFlags) {
    let mut role = None;
    let mut flags = NetworkFlags::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "server" if role.is_none() => role = Some(Role::Server),
            "agent" if role.is_none() => role = Some(Role::Agent),
            "--flannel-backend" => flags.flannel_backend = it.next().cloned(),
            "--disable-network-policy" => flags.disable_network_policy = Some(true),
            _ => {
                if let Some(v) = a.strip_prefix("--flannel-backend=") {
                    flags.flannel_backend = Some(v.to_string());
                } else if let Some(v) = a.strip_prefix("--disable-network-policy=") {
                    flags.disable_network_policy = Some(v == "true");
                }
            }
        }
    }
    (role, flags)
}

fn find_process(host: &HostPaths, errors: &mut Vec<String>) -> Option<Source> {
    let proc_dir = host.path("proc");
    let entries = match fs::read_dir(&proc_dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("/proc cannot be listed: {e}"));
            return None;
        }
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        // Processes come and go while we look; a vanished one is not an error.
        let Ok(raw) = fs::read(proc_dir.join(format!("{pid}/cmdline"))) else {
            continue;
        };
        let mut args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // k3s rewrites its process title to one string ("/usr/local/bin/k3s server").
        if args.len() == 1 && args[0].contains(' ') {
            args = args[0].split_whitespace().map(String::from).collect();
        }
        let Some(argv0) = args.first() else { continue };
        if argv0.rsplit('/').next() != Some("k3s") {
            continue;
        }
        let (role, flags) = parse_args(&args[1..]);
        if role.is_some() {
            return Some(Source {
                path: format!("/proc/{pid}/cmdline"),
                role,
                flags,
            });
        }
    }
    None
}

fn read_config(host: &HostPaths, errors: &mut Vec<String>) -> Option<Source> {
    let mut files = vec![CONFIG_FILE.to_string()];
    if let Ok(dir) = host.resolve(CONFIG_DROPIN_DIR) {
        if let Ok(entries) = fs::read_dir(dir) {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
                .collect();
            names.sort();
            files.extend(
                names
                    .into_iter()
                    .map(|n| format!("{CONFIG_DROPIN_DIR}/{n}")),
            );
        }
    }
    let mut merged: Option<Source> = None;
    for rel in files {
        let text = match host.read_string(&rel) {
            Ok(t) => t,
            Err(e) if e.is_missing() => continue,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        match parse_config(&text) {
            Ok(flags) => {
                let src = merged.get_or_insert(Source {
                    path: format!("/{rel}"),
                    role: None,
                    flags: NetworkFlags::default(),
                });
                src.flags = src.flags.overlay(&flags);
            }
            Err(e) => errors.push(format!("/{rel}: {e}")),
        }
    }
    merged
}

/// Reads the two keys from a k3s config file (YAML, keys named like the flags).
pub fn parse_config(text: &str) -> Result<NetworkFlags, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let Some(doc) = docs.first() else {
        return Ok(NetworkFlags::default());
    };
    if doc.as_hash().is_none() && !doc.is_null() {
        return Err("not a YAML mapping of flag names to values".into());
    }
    let backend = match &doc["flannel-backend"] {
        Yaml::String(s) => Some(s.clone()),
        Yaml::BadValue | Yaml::Null => None,
        other => return Err(format!("flannel-backend must be a string, found {other:?}")),
    };
    let netpol = match &doc["disable-network-policy"] {
        Yaml::Boolean(b) => Some(*b),
        Yaml::String(s) if s == "true" || s == "false" => Some(s == "true"),
        Yaml::BadValue | Yaml::Null => None,
        other => {
            return Err(format!(
                "disable-network-policy must be true or false, found {other:?}"
            ))
        }
    };
    Ok(NetworkFlags {
        flannel_backend: backend,
        disable_network_policy: netpol,
    })
}

fn read_unit(host: &HostPaths, errors: &mut Vec<String>) -> Option<Source> {
    for rel in UNITS {
        let text = match host.read_string(rel) {
            Ok(t) => t,
            Err(e) if e.is_missing() => continue,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let joined = text.replace("\\\n", " ");
        let Some(exec) = joined
            .lines()
            .find_map(|l| l.trim().strip_prefix("ExecStart="))
        else {
            errors.push(format!("/{rel} has no ExecStart= line"));
            continue;
        };
        let args: Vec<String> = exec
            .split_whitespace()
            .map(|a| a.trim_matches(|c| c == '"' || c == '\'').to_string())
            .collect();
        let (mut role, flags) = parse_args(args.get(1..).unwrap_or(&[]));
        if role.is_none() {
            role = Some(if rel.contains("k3s-agent") {
                Role::Agent
            } else {
                Role::Server
            });
        }
        return Some(Source {
            path: format!("/{rel}"),
            role,
            flags,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_in_both_spellings() {
        let (r, f) = parse_args(&s(&[
            "server",
            "--flannel-backend",
            "none",
            "--disable-network-policy",
        ]));
        assert_eq!(r, Some(Role::Server));
        assert_eq!(f.flannel_backend.as_deref(), Some("none"));
        assert_eq!(f.disable_network_policy, Some(true));
        let (r, f) = parse_args(&s(&[
            "agent",
            "--flannel-backend=wireguard-native",
            "--disable-network-policy=false",
        ]));
        assert_eq!(r, Some(Role::Agent));
        assert_eq!(f.flannel_backend.as_deref(), Some("wireguard-native"));
        assert_eq!(f.disable_network_policy, Some(false));
    }

    #[test]
    fn config_yaml_keys_and_errors() {
        let f = parse_config(
            "flannel-backend: none\ndisable-network-policy: true\nnode-label: [a=b]\n",
        )
        .unwrap();
        assert_eq!(f.flannel_backend.as_deref(), Some("none"));
        assert_eq!(f.disable_network_policy, Some(true));
        assert_eq!(parse_config("").unwrap(), NetworkFlags::default());
        assert!(parse_config("flannel-backend: [\n")
            .unwrap_err()
            .contains("line"));
        assert!(parse_config("- a\n- b\n").unwrap_err().contains("mapping"));
        assert!(parse_config("disable-network-policy: 7\n")
            .unwrap_err()
            .contains("true or false"));
    }
}
