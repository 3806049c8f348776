//! iptables chains Flannel and k3s's network-policy controller (kube-router)
//! leave behind, read with `iptables-save`/`ip6tables-save`.

use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FamilyChains {
    /// Why the chains are unknown (tool missing, failed), when they are.
    pub unknown: Option<String>,
    /// `FLANNEL-*` chains, as `table/chain`.
    pub flannel: Vec<String>,
    /// `KUBE-ROUTER-*` chains, as `table/chain`.
    pub kube_router: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IptablesFacts {
    pub ipv4: FamilyChains,
    pub ipv6: FamilyChains,
}

pub fn probe(live: bool) -> IptablesFacts {
    if !live {
        let skipped = FamilyChains {
            unknown: Some("live probes disabled (--no-live-probes)".into()),
            ..Default::default()
        };
        return IptablesFacts {
            ipv4: skipped.clone(),
            ipv6: skipped,
        };
    }
    // The two dumps are independent; run them side by side.
    std::thread::scope(|s| {
        let v6 = s.spawn(|| family("ip6tables-save"));
        let ipv4 = family("iptables-save");
        let ipv6 = v6.join().unwrap_or_else(|_| FamilyChains {
            unknown: Some("ip6tables-save probe panicked".into()),
            ..Default::default()
        });
        IptablesFacts { ipv4, ipv6 }
    })
}

fn family(tool: &str) -> FamilyChains {
    match Command::new(tool).output() {
        Ok(out) if out.status.success() => parse_save(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => FamilyChains {
            unknown: Some(format!(
                "{tool} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            ..Default::default()
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FamilyChains {
            unknown: Some(format!("{tool} is not installed")),
            ..Default::default()
        },
        Err(e) => FamilyChains {
            unknown: Some(format!("{tool} could not run: {e}")),
            ..Default::default()
        },
    }
}

/// Parses `*table` and `:CHAIN policy [p:b]` lines of iptables-save output.
pub fn parse_save(text: &str) -> FamilyChains {
    let mut out = FamilyChains::default();
    let mut table = "?";
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        } else if let Some(rest) = line.strip_prefix(':') {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if chain.starts_with("FLANNEL-") {
                out.flannel.push(format!("{table}/{chain}"));
            } else if chain.starts_with("KUBE-ROUTER-") {
                out.kube_router.push(format!("{table}/{chain}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_flannel_and_kube_router_chains_only() {
        let dump = "*filter\n:INPUT ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n:FLANNELX - [0:0]\n\
                    :KUBE-ROUTER-INPUT - [0:0]\n-A FORWARD -j FLANNEL-FWD\nCOMMIT\n*nat\n:FLANNEL-POSTRTG - [0:0]\nCOMMIT\n";
        let c = parse_save(dump);
        assert_eq!(c.flannel, vec!["filter/FLANNEL-FWD", "nat/FLANNEL-POSTRTG"]);
        assert_eq!(c.kube_router, vec!["filter/KUBE-ROUTER-INPUT"]);
    }
}
