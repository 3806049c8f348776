//! CNI configuration files and Flannel's state files.
//!
//! containerd loads the *first* file, in lexical order, with a `.conf`,
//! `.conflist` or `.json` extension from its CNI config directory. k3s points
//! its embedded containerd at `/var/lib/rancher/k3s/agent/etc/cni/net.d` while
//! it runs Flannel, and at `/etc/cni/net.d` once `--flannel-backend=none`
//! is set (where Cilium writes `05-cilium.conflist`), so both are listed.

use std::fs;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

pub const ETC_CNI_DIR: &str = "etc/cni/net.d";
pub const K3S_CNI_DIR: &str = "var/lib/rancher/k3s/agent/etc/cni/net.d";
/// The containerd config k3s *generates* each time it starts, from the flags
/// it runs with: the one place that says which CNI directory the running
/// k3s's containerd reads (agents included, which take the Flannel backend
/// from their server and have no flag of their own).
pub const CONTAINERD_CONFIG: &str = "var/lib/rancher/k3s/agent/etc/containerd/config.toml";

/// Flannel state outside the CNI config dirs: (check name, path).
pub const FLANNEL_STATE: &[(&str, &str)] = &[
    (
        "net-conf.json",
        "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
    ),
    ("subnet.env", "run/flannel/subnet.env"),
    ("cni-networks-cbr0", "var/lib/cni/networks/cbr0"),
    ("cni-flannel", "var/lib/cni/flannel"),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniFile {
    /// Host path, e.g. `/etc/cni/net.d/10-flannel.conflist`.
    pub path: String,
    pub name: String,
    /// Where a symlink points (as written), when the entry is one.
    pub symlink_to: Option<String>,
    /// The `name` field of the network config.
    pub network: Option<String>,
    /// The plugin `type`s, in order.
    pub plugins: Vec<String>,
    /// Why it could not be read as a CNI config.
    pub error: Option<String>,
}

impl CniFile {
    pub fn is_flannel(&self) -> bool {
        self.name.contains("flannel") || self.plugins.iter().any(|p| p == "flannel")
    }
    pub fn is_cilium(&self) -> bool {
        self.name.contains("cilium") || self.plugins.iter().any(|p| p == "cilium-cni")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CniDir {
    pub path: String,
    pub exists: bool,
    pub files: Vec<CniFile>,
    /// The file containerd would load: the first valid config in lexical order.
    pub winner: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlannelState {
    pub name: String,
    pub path: String,
    pub present: bool,
    pub error: Option<String>,
}

/// The CNI section of k3s's generated containerd config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerdCni {
    pub path: String,
    pub present: bool,
    /// e.g. `/etc/cni/net.d` (no Flannel) or k3s's own dir (Flannel).
    pub conf_dir: Option<String>,
    pub bin_dir: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CniFacts {
    pub etc: CniDir,
    pub k3s: CniDir,
    pub flannel_state: Vec<FlannelState>,
    #[serde(default)]
    pub containerd: ContainerdCni,
}

/// Reads `[plugins.<cri>.cni]`'s `conf_dir`/`bin_dir` from a containerd
/// config: version 3 (containerd 2, k3s ≥ 1.31) names the section
/// `'io.containerd.cri.v1.runtime'`, version 2 `"io.containerd.grpc.v1.cri"`.
pub fn parse_containerd(text: &str) -> Result<(Option<String>, Option<String>), String> {
    let v: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML ({})", e.message()))?;
    let plugins = v.get("plugins").and_then(|p| p.as_table());
    for section in ["io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"] {
        if let Some(cni) = plugins
            .and_then(|p| p.get(section))
            .and_then(|s| s.get("cni"))
            .and_then(|c| c.as_table())
        {
            let get = |k: &str| cni.get(k).and_then(|x| x.as_str()).map(String::from);
            return Ok((get("conf_dir"), get("bin_dir")));
        }
    }
    Ok((None, None))
}

fn probe_containerd(host: &HostPaths) -> ContainerdCni {
    let mut c = ContainerdCni {
        path: format!("/{CONTAINERD_CONFIG}"),
        ..Default::default()
    };
    match host.read_string(CONTAINERD_CONFIG) {
        Ok(text) => {
            c.present = true;
            match parse_containerd(&text) {
                Ok((conf, bin)) => {
                    c.conf_dir = conf;
                    c.bin_dir = bin;
                }
                Err(e) => c.error = Some(format!("/{CONTAINERD_CONFIG}: {e}")),
            }
        }
        Err(e) if e.is_missing() => {}
        Err(e) => {
            c.present = true;
            c.error = Some(e.to_string());
        }
    }
    c
}

pub fn probe(host: &HostPaths) -> CniFacts {
    CniFacts {
        containerd: probe_containerd(host),
        etc: probe_dir(host, ETC_CNI_DIR),
        k3s: probe_dir(host, K3S_CNI_DIR),
        flannel_state: FLANNEL_STATE
            .iter()
            .map(|(name, rel)| {
                let mut st = FlannelState {
                    name: name.to_string(),
                    path: format!("/{rel}"),
                    ..Default::default()
                };
                match fs::symlink_metadata(host.path(rel)) {
                    Ok(_) => st.present = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => st.error = Some(format!("/{rel} cannot be examined: {e}")),
                }
                st
            })
            .collect(),
    }
}

fn probe_dir(host: &HostPaths, rel: &str) -> CniDir {
    let mut dir = CniDir {
        path: format!("/{rel}"),
        ..Default::default()
    };
    let real = match host.resolve(rel) {
        Ok(p) => p,
        Err(e) if e.is_missing() => return dir,
        Err(e) => {
            dir.error = Some(e.to_string());
            return dir;
        }
    };
    let entries = match fs::read_dir(&real) {
        Ok(e) => e,
        Err(e) => {
            dir.exists = real.exists();
            dir.error = Some(format!("/{rel} cannot be listed: {e}"));
            return dir;
        }
    };
    dir.exists = true;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let file_rel = format!("{rel}/{name}");
        let symlink_to = fs::read_link(host.path(&file_rel))
            .ok()
            .map(|t| t.display().to_string());
        let mut f = CniFile {
            path: format!("/{file_rel}"),
            name: name.clone(),
            symlink_to,
            network: None,
            plugins: vec![],
            error: None,
        };
        if is_config_name(&name) {
            match host.read_bytes(&file_rel) {
                Ok(bytes) => match parse_config(&bytes) {
                    Ok((network, plugins)) => {
                        f.network = network;
                        f.plugins = plugins;
                    }
                    Err(e) => f.error = Some(format!("{}: {e}", f.path)),
                },
                Err(e) => f.error = Some(e.to_string()),
            }
            if dir.winner.is_none() && f.error.is_none() {
                dir.winner = Some(name.clone());
            }
        }
        dir.files.push(f);
    }
    dir
}

fn is_config_name(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Reads a `.conflist` (`{"name", "plugins": [{"type"}...]}`) or a single
/// `.conf` (`{"name", "type"}`).
pub fn parse_config(bytes: &[u8]) -> Result<(Option<String>, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let network = obj.get("name").and_then(|n| n.as_str()).map(String::from);
    let plugins = if let Some(list) = obj.get("plugins") {
        let list = list.as_array().ok_or("\"plugins\" is not an array")?;
        list.iter()
            .map(|p| {
                p.get("type")
                    .and_then(|t| t.as_str())
                    .map(String::from)
                    .ok_or("a plugin has no \"type\"")
            })
            .collect::<Result<Vec<_>, _>>()?
    } else if let Some(t) = obj.get("type").and_then(|t| t.as_str()) {
        vec![t.to_string()]
    } else {
        return Err("neither \"plugins\" nor \"type\" is present".into());
    };
    Ok((network, plugins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_containerd_config_versions() {
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dir = \"/opt/cni/bin\"\n  conf_dir = \"/etc/cni/net.d\"\n";
        assert_eq!(
            parse_containerd(v3).unwrap(),
            (Some("/etc/cni/net.d".into()), Some("/opt/cni/bin".into()))
        );
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  conf_dir = \"/var/lib/rancher/k3s/agent/etc/cni/net.d\"\n";
        assert_eq!(
            parse_containerd(v2).unwrap().0.as_deref(),
            Some("/var/lib/rancher/k3s/agent/etc/cni/net.d")
        );
        assert_eq!(parse_containerd("version = 3\n").unwrap(), (None, None));
        assert!(parse_containerd("[plugins\n")
            .unwrap_err()
            .starts_with("not valid TOML ("));
    }

    #[test]
    fn reads_conflists_and_single_confs() {
        let (n, p) = parse_config(br#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#).unwrap();
        assert_eq!(n.as_deref(), Some("cbr0"));
        assert_eq!(p, vec!["flannel", "portmap"]);
        assert_eq!(
            parse_config(br#"{"name":"x","type":"bridge"}"#).unwrap().1,
            vec!["bridge"]
        );
        assert!(parse_config(b"{not json")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_config(b"[]")
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(parse_config(br#"{"plugins":[{"x":1}]}"#)
            .unwrap_err()
            .contains("no \"type\""));
    }
}
