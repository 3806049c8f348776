//! The rules: each reads one part of the values and the facts, and gives one
//! finding (or none, when the key plays no part, e.g. `tunnelPort` in native
//! routing). Facts that could not be gathered make the rule that needs them
//! fail with the reason: a gate must not pass on what it did not see.
//!
//! Cilium's behaviour the rules rely on is Cilium 1.16's: its chart defaults
//! (see [`super::schema::TYPED`]) and what its agent refuses at start (BPF
//! masquerading without NodePort, native routing without a native-routing
//! CIDR, direct node routes with tunnelling), with k3s's CNI directories.

use std::net::IpAddr;

use super::cidr::Cidr;
use super::facts::{AgentFacts, Facts, Flannel, Link, NodeFacts};
use super::parse::Value;
use super::schema;
use super::{Finding, Values};
use crate::kube::gates::Verdict;

/// Where containerd looks once k3s runs with `--flannel-backend=none`.
pub const NO_FLANNEL_CONF_DIR: &str = "/etc/cni/net.d";
pub const NO_FLANNEL_BIN_DIR: &str = "/opt/cni/bin";
/// k3s's own CNI directory (under the default data dir), where Flannel's conflist is.
pub const K3S_CNI_DIR: &str = "/var/lib/rancher/k3s/agent/etc/cni/net.d";
/// Flannel's VXLAN port unless its net-conf sets another.
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// What VXLAN and Geneve add to a packet (Cilium's tunnel overhead).
pub const TUNNEL_OVERHEAD: u32 = 50;
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// A Tailscale interface's MTU.
pub const TAILSCALE_MTU: u32 = 1280;

/// Every rule, in the order a person reads them.
pub fn check(v: &Values, f: &Facts) -> Vec<Finding> {
    let mut r = Rules { v, f, out: vec![] };
    r.unknown_keys();
    r.api_endpoint();
    r.kube_proxy_replacement();
    r.ipam();
    r.routing();
    r.bpf_masquerade();
    r.cni();
    r.daemonset();
    r.mtu();
    r.out
}

struct Rules<'a> {
    v: &'a Values,
    f: &'a Facts,
    out: Vec<Finding>,
}

/// "a, b and c".
fn and(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn agent(n: &NodeFacts) -> Result<&AgentFacts, String> {
    n.agent
        .as_ref()
        .map_err(|e| format!("{}'s agent could not be asked ({e})", n.name))
}

/// Links that carry the node's own network (not Flannel's, Cilium's, pods' or loopback).
fn uplinks(a: &AgentFacts) -> impl Iterator<Item = &Link> {
    a.links.iter().filter(|l| {
        !(l.name == "lo"
            || l.name == "cni0"
            || l.name == "kube-ipvs0"
            || l.name.starts_with("flannel")
            || l.name.starts_with("cilium_")
            || l.name.starts_with("lxc")
            || l.name.starts_with("veth"))
    })
}

/// The subnets of a link (its addresses with their prefixes, host bits cleared).
fn subnets(l: &Link) -> Vec<Cidr> {
    l.addresses
        .iter()
        .filter_map(|a| Cidr::parse(a))
        .filter(|c| c.len < if c.addr.is_ipv4() { 32 } else { 128 })
        .map(|c| c.network())
        .collect()
}

/// The link holding `ip`, else the default route's: where Cilium takes its MTU.
fn device(a: &AgentFacts, ip: Option<IpAddr>) -> Option<&Link> {
    ip.and_then(|ip| {
        a.links.iter().find(|l| {
            l.addresses
                .iter()
                .any(|s| Cidr::parse(s).is_some_and(|c| c.addr == ip))
        })
    })
    .or_else(|| {
        a.default_route
            .as_ref()
            .and_then(|d| a.links.iter().find(|l| &l.name == d))
    })
}

/// The link a packet from this node to `ip` leaves through: one with a
/// subnet holding it, else the default route's (the kernel's choice for a
/// node with one routing table and no more specific route).
fn route_to(a: &AgentFacts, ip: IpAddr) -> Option<&Link> {
    uplinks(a)
        .filter_map(|l| {
            subnets(l)
                .into_iter()
                .filter(|c| c.contains_ip(ip))
                .map(|c| c.len)
                .max()
                .map(|len| (len, l))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, l)| l)
        .or_else(|| {
            a.default_route
                .as_ref()
                .and_then(|d| a.links.iter().find(|l| &l.name == d))
        })
}

fn is_tailscale(l: &Link) -> bool {
    l.name.starts_with("tailscale")
        || (l.kind.as_deref() == Some("tun") && l.mtu == Some(TAILSCALE_MTU))
}

fn link_desc(l: &Link) -> String {
    let mtu = l.mtu.map(|m| m.to_string()).unwrap_or_else(|| "?".into());
    if is_tailscale(l) {
        format!("{} (MTU {mtu}, a Tailscale interface)", l.name)
    } else {
        format!("{} (MTU {mtu})", l.name)
    }
}

impl Rules<'_> {
    fn push(
        &mut self,
        rule: &'static str,
        key: &str,
        default: &str,
        verdict: Verdict,
        observed: String,
        fix: Option<String>,
    ) {
        self.out.push(Finding {
            rule,
            key: key.to_string(),
            line: self.v.line(key),
            value: self.v.shown(key, default),
            verdict,
            observed,
            fix: if verdict == Verdict::Pass { None } else { fix },
        });
    }

    fn flannel_nodes(&self) -> Vec<&NodeFacts> {
        self.f
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.agent.as_ref().ok().and_then(|a| a.flannel.as_ref()),
                    Some(Flannel::Running(_))
                )
            })
            .collect()
    }

    /// Nodes whose agent could not say whether Flannel runs.
    fn flannel_unknown(&self) -> Vec<String> {
        self.f
            .nodes
            .iter()
            .filter_map(|n| match &n.agent {
                Err(e) => Some(format!("{} (agent: {e})", n.name)),
                Ok(a) => match &a.flannel {
                    None => Some(format!("{} (no k3s.network check in its report)", n.name)),
                    Some(Flannel::Unknown(m)) => Some(format!("{} ({m})", n.name)),
                    _ => None,
                },
            })
            .collect()
    }

    fn kpr(&self) -> bool {
        self.v.boolean("kubeProxyReplacement").unwrap_or(false)
    }

    fn host(&self) -> Option<&str> {
        self.v.string("k8sServiceHost").filter(|h| !h.is_empty())
    }

    /// What to write as k8sServiceHost/Port: the inventory's VIP, else the kubeconfig's server.
    fn suggested_endpoint(&self) -> (String, u16) {
        match self.f.api_vip {
            Some(vip) => (vip.ip().to_string(), vip.port()),
            None => (self.f.api.host.clone(), self.f.api.port),
        }
    }

    // --- the rules ----------------------------------------------------------------

    fn unknown_keys(&mut self) {
        for (name, pos, near) in schema::unknown_top_level(&self.v.root) {
            self.out.push(Finding {
                rule: "values.unknown-key",
                key: name.clone(),
                line: Some(pos.line),
                value: self.v.root.get(&name).map(|n| n.show()).unwrap_or_default(),
                verdict: Verdict::Warn,
                observed: match near {
                    Some(k) => format!("{name} is not a key of Cilium 1.16's chart (Helm ignores it); the nearest key it has is {k}"),
                    None => format!("{name} is not a key of Cilium 1.16's chart (Helm ignores it)"),
                },
                fix: Some(match near {
                    Some(k) => format!("rename it to {k}, or remove it"),
                    None => "remove it, or move it under the key it belongs to".into(),
                }),
            });
        }
    }

    fn api_endpoint(&mut self) {
        const RULE: &str = "api.endpoint";
        let Some(host) = self.host().map(String::from) else {
            if !self.kpr() {
                self.push(RULE, "k8sServiceHost", "\"\"", Verdict::Pass,
                    "not set: Cilium reaches the API server through the kubernetes Service's ClusterIP, which kube-proxy serves (kubeProxyReplacement is false)".into(), None);
            }
            return;
        };
        let (shost, sport) = self.suggested_endpoint();
        if host == "auto" {
            let (verdict, observed) = match &self.f.cluster_info {
                Some(Ok(true)) => (Verdict::Pass, "auto: the ConfigMap kube-public/cluster-info exists; Cilium reads the API server's address from it".to_string()),
                Some(Ok(false)) | None => (Verdict::Fail, "auto reads kubeadm's ConfigMap kube-public/cluster-info, and this cluster has none (k3s does not create it): Cilium's agents would not find the API server".to_string()),
                Some(Err(e)) => (Verdict::Fail, format!("auto: the ConfigMap kube-public/cluster-info could not be read: {e}")),
            };
            self.push(
                RULE,
                "k8sServiceHost",
                "",
                verdict,
                observed,
                Some(format!(
                    "k8sServiceHost: \"{shost}\"\nk8sServicePort: {sport}"
                )),
            );
            return;
        }
        if self.v.port("k8sServicePort").is_none() {
            self.push(RULE, "k8sServicePort", "\"\"", Verdict::Fail,
                format!("not set, while k8sServiceHost is {host:?}: Cilium would dial the host on the in-cluster port, not the API server's"),
                Some(format!("k8sServicePort: {sport}")));
            return;
        }
        let port = self.v.port("k8sServicePort").unwrap_or(0);
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut reached = vec![];
        let mut problems = vec![];
        let mut unverified = vec![];
        for n in &self.f.nodes {
            match &n.dial {
                None => problems.push(format!("{} was not asked to dial", n.name)),
                Some(Err(e)) => problems.push(format!(
                    "{}'s agent could not be asked to dial ({e})",
                    n.name
                )),
                Some(Ok(d)) if !d.ok => problems.push(format!("from {}: {}", n.name, d.error)),
                Some(Ok(d)) => {
                    reached.push(format!("{} {:.1} ms", n.name, d.elapsed_us as f64 / 1000.0));
                    if let Some(Err(e)) = &d.verified {
                        unverified.push(format!(
                            "from {}: {e} (it presents {:?} for {})",
                            n.name,
                            d.peer_subject,
                            if d.peer_sans.is_empty() {
                                "no names".to_string()
                            } else {
                                d.peer_sans.join(", ")
                            }
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            let ok = if reached.is_empty() {
                String::new()
            } else {
                format!(" (reached from {})", and(&reached))
            };
            self.push(RULE, "k8sServiceHost", "", Verdict::Fail,
                format!("{target} is not reachable {}{ok}: Cilium's agent there could not reach the API server and would never turn Ready", and(&problems)),
                Some(format!(
                    "make {target} reachable from every node (if it is kube-vip's VIP: is kube-vip running and announcing it?), or set the address every node reaches, e.g.\nk8sServiceHost: \"{shost}\"\nk8sServicePort: {sport}"
                )));
            return;
        }
        let reach = format!(
            "{target} reachable from all {} nodes ({})",
            reached.len(),
            reached.join(", ")
        );
        let api = &self.f.api;
        let (verdict, observed) = if api.https {
            if api.insecure {
                (Verdict::Warn, format!("{reach}; the kubeconfig skips TLS verification (insecure-skip-tls-verify), so the server answering there was not verified as this cluster's API server"))
            } else if api.ca.is_empty() {
                (Verdict::Warn, format!("{reach}; the kubeconfig names no CA, so the server answering there was not verified as this cluster's API server"))
            } else if !unverified.is_empty() {
                (Verdict::Fail, format!("{reach}, but what answers is not this cluster's API server as the kubeconfig's CA knows it: {}", and(&unverified)))
            } else {
                (Verdict::Pass, format!("{reach}; its certificate verifies against the kubeconfig's CA for {host} from every node: it is this cluster's API server"))
            }
        } else {
            let same = (host == api.host && port == api.port)
                || self
                    .f
                    .api_vip
                    .is_some_and(|v| v.ip().to_string() == host && v.port() == port);
            if same {
                (Verdict::Pass, format!("{reach}; the kubeconfig's server ({}) is plain HTTP, so the identity is by address: it is the kubeconfig's server", api.url))
            } else {
                (Verdict::Warn, format!("{reach}; the kubeconfig's server ({}) is plain HTTP, so no certificate proves {target} is this cluster's API server, and it is not the kubeconfig's address", api.url))
            }
        };
        let fix = Some(format!(
            "if it is the API server, put {host} in its certificate (k3s: --tls-san {host} on every server, then restart k3s); else point k8sServiceHost at the API server, e.g. \"{shost}\""
        ));
        self.push(RULE, "k8sServiceHost", "", verdict, observed, fix);
    }

    fn kube_proxy_replacement(&mut self) {
        let (shost, sport) = self.suggested_endpoint();
        if self.kpr() && self.host().is_none() {
            self.push("kpr.service-host", "kubeProxyReplacement", "false", Verdict::Fail,
                "true, and k8sServiceHost is not set: with kube-proxy replaced nothing serves the kubernetes Service's ClusterIP that Cilium would reach the API server through, so its agents cannot start".into(),
                Some(format!("k8sServiceHost: \"{shost}\"\nk8sServicePort: {sport}")));
        } else if self.kpr() {
            self.push(
                "kpr.service-host",
                "kubeProxyReplacement",
                "false",
                Verdict::Pass,
                "true, with k8sServiceHost set: Cilium reaches the API server directly".into(),
                None,
            );
        } else {
            self.push(
                "kpr.service-host",
                "kubeProxyReplacement",
                "false",
                Verdict::Pass,
                "false: kube-proxy keeps serving Services during and after the migration".into(),
                None,
            );
        }
    }

    /// The pod CIDRs pods will get addresses from (for the routing rules):
    /// cluster-pool's pool, else the nodes' (what k3s allocates).
    fn pod_cidrs(&self) -> Vec<Cidr> {
        match self.v.string("ipam.mode").unwrap_or("cluster-pool") {
            "cluster-pool" => self
                .v
                .strings("ipam.operator.clusterPoolIPv4PodCIDRList")
                .unwrap_or_else(|| vec!["10.0.0.0/8".into()])
                .iter()
                .filter_map(|c| Cidr::parse(c))
                .collect(),
            _ => match self.f.pod_cidr.as_deref().and_then(Cidr::parse) {
                Some(c) => vec![c],
                None => self
                    .f
                    .nodes
                    .iter()
                    .flat_map(|n| n.pod_cidrs.iter().filter_map(|c| Cidr::parse(c)))
                    .collect(),
            },
        }
    }

    fn ipam(&mut self) {
        const RULE: &str = "ipam";
        let mode = self
            .v
            .string("ipam.mode")
            .unwrap_or("cluster-pool")
            .to_string();
        match mode.as_str() {
            "kubernetes" => {
                if let Some(e) = &self.f.api_error {
                    self.push(
                        RULE,
                        "ipam.mode",
                        "cluster-pool",
                        Verdict::Fail,
                        format!("the nodes' podCIDRs could not be read: {e}"),
                        None,
                    );
                    return;
                }
                let pool = self.f.pod_cidr.as_deref().and_then(Cidr::parse);
                let mut bad = vec![];
                let mut seen = vec![];
                for n in &self.f.nodes {
                    if !n.in_api {
                        bad.push(format!("{} is not registered in the API", n.name));
                    } else if n.pod_cidrs.is_empty() {
                        bad.push(format!(
                            "Node/{} has no spec.podCIDR (Cilium in kubernetes mode waits for one)",
                            n.name
                        ));
                    }
                    for c in &n.pod_cidrs {
                        seen.push(format!("{} {c}", n.name));
                        match (Cidr::parse(c), pool) {
                            (None, _) => {
                                bad.push(format!("Node/{}'s podCIDR {c:?} is not a CIDR", n.name))
                            }
                            (Some(c), Some(p)) if !p.contains(&c) => bad.push(format!(
                                "Node/{}'s podCIDR {c} is outside the inventory's pod CIDR {p}",
                                n.name
                            )),
                            _ => {}
                        }
                    }
                }
                if !bad.is_empty() {
                    self.push(RULE, "ipam.mode", "cluster-pool", Verdict::Fail,
                        format!("kubernetes: Cilium uses each node's spec.podCIDR, and {}", and(&bad)),
                        Some("fix the nodes' podCIDRs (k3s: --cluster-cidr on the servers), or [cluster] pod_cidr in the inventory if it is the wrong one".into()));
                } else if pool.is_none() {
                    self.push(RULE, "ipam.mode", "cluster-pool", Verdict::Warn,
                        format!("kubernetes: every node has a podCIDR ({}), but the inventory sets no [cluster] pod_cidr to check them against", seen.join(", ")),
                        Some("[cluster]\npod_cidr = \"10.42.0.0/16\"   # k3s's --cluster-cidr".into()));
                } else {
                    self.push(RULE, "ipam.mode", "cluster-pool", Verdict::Pass,
                        format!("kubernetes: every node's spec.podCIDR lies in the inventory's pod CIDR {} ({}): pods keep the ranges k3s allocated",
                            pool.map(|p| p.to_string()).unwrap_or_default(), seen.join(", ")),
                        None);
                }
            }
            "cluster-pool" => self.cluster_pool(),
            "multi-pool" | "crd" | "eni" | "azure" | "alibabacloud" | "delegated-plugin" => {
                self.push(RULE, "ipam.mode", "cluster-pool", Verdict::Warn,
                    format!("{mode}: not checked (cnishift checks kubernetes and cluster-pool against the cluster)"),
                    Some("for an in-place migration of k3s, `ipam.mode: kubernetes` keeps each node's podCIDR".into()));
            }
            other => {
                let known = "kubernetes, cluster-pool, multi-pool, crd, eni, azure, alibabacloud, delegated-plugin";
                self.push(
                    RULE,
                    "ipam.mode",
                    "cluster-pool",
                    Verdict::Fail,
                    format!("{other:?} is not an IPAM mode of Cilium 1.16 ({known})"),
                    Some("ipam:\n  mode: kubernetes".into()),
                );
            }
        }
    }

    fn cluster_pool(&mut self) {
        const KEY: &str = "ipam.operator.clusterPoolIPv4PodCIDRList";
        let list = self
            .v
            .strings(KEY)
            .unwrap_or_else(|| vec!["10.0.0.0/8".into()]);
        let mut pools = vec![];
        for s in &list {
            match Cidr::parse(s) {
                Some(c) => pools.push(c),
                None => {
                    self.push(
                        "ipam",
                        KEY,
                        "[\"10.0.0.0/8\"]",
                        Verdict::Fail,
                        format!("{s:?} is not a CIDR"),
                        Some(format!("{KEY}: [\"10.52.0.0/16\"]")),
                    );
                    return;
                }
            }
        }
        let mut others: Vec<(String, Cidr)> = vec![];
        if let Some(c) = self.f.service_cidr.as_deref().and_then(Cidr::parse) {
            others.push((
                "the service CIDR (inventory [cluster] service_cidr)".into(),
                c,
            ));
        }
        let current = self.f.pod_cidr.as_deref().and_then(Cidr::parse);
        if let Some(c) = current {
            others.push((
                "the pod CIDR k3s allocates from now (inventory [cluster] pod_cidr)".into(),
                c,
            ));
        }
        for n in &self.f.nodes {
            if current.is_none() {
                for c in n.pod_cidrs.iter().filter_map(|c| Cidr::parse(c)) {
                    others.push((format!("Node/{}'s podCIDR", n.name), c));
                }
            }
            if let Some(ip) = n.internal_ip {
                let net = n
                    .agent
                    .as_ref()
                    .ok()
                    .and_then(|a| device(a, Some(ip)))
                    .and_then(|l| subnets(l).into_iter().find(|c| c.contains_ip(ip)))
                    .unwrap_or(Cidr {
                        addr: ip,
                        len: if ip.is_ipv4() { 32 } else { 128 },
                    });
                others.push((format!("{}'s node network", n.name), net));
            }
        }
        let hits: Vec<String> = pools
            .iter()
            .flat_map(|p| {
                others
                    .iter()
                    .filter(move |(_, c)| p.overlaps(c))
                    .map(move |(what, c)| format!("{p} overlaps {what} {c}"))
            })
            .collect();
        let shown = pools
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if hits.is_empty() {
            self.push("ipam", KEY, "[\"10.0.0.0/8\"]", Verdict::Pass,
                format!("cluster-pool from {shown}: it overlaps neither the service CIDR, the node network, nor the pod CIDR in use"), None);
        } else {
            self.push("ipam", KEY, "[\"10.0.0.0/8\"]", Verdict::Fail,
                format!("cluster-pool: {}. Pods on migrated nodes would get addresses from a range the cluster already uses: Services, nodes or the pods still on Flannel would answer for them, and the routes between the two halves of the cluster would be ambiguous", and(&hits)),
                Some("ipam:\n  mode: kubernetes   # Cilium uses each node's podCIDR, as k3s allocated it\nor give the pool a range nothing else uses, e.g.\nipam:\n  operator:\n    clusterPoolIPv4PodCIDRList: [\"10.52.0.0/16\"]".into()));
        }
    }

    fn routing(&mut self) {
        let mode = self.v.string("routingMode").unwrap_or("");
        match mode {
            "" | "tunnel" => {
                self.direct_routes(false);
                self.tunnel_port();
            }
            "native" => {
                self.native_cidr();
                self.direct_routes(true);
            }
            other => {
                let other = other.to_string();
                self.push(
                    "routing.mode",
                    "routingMode",
                    "tunnel",
                    Verdict::Fail,
                    format!("{other:?} is not a routing mode of Cilium 1.16 (native or tunnel)"),
                    Some("routingMode: native".into()),
                );
            }
        }
    }

    fn native_cidr(&mut self) {
        const KEY: &str = "ipv4NativeRoutingCIDR";
        let pods = self.pod_cidrs();
        let pods_s = pods
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let fix = Some(format!(
            "{KEY}: \"{}\"",
            pods.first()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "10.42.0.0/16".into())
        ));
        let masq = self.v.boolean("enableIPv4Masquerade").unwrap_or(true);
        let Some(s) = self
            .v
            .string(KEY)
            .filter(|s| !s.is_empty())
            .map(String::from)
        else {
            if masq {
                self.push("routing.native-cidr", KEY, "\"\"", Verdict::Fail,
                    format!("not set, with routingMode native and masquerading on: Cilium 1.16's agent refuses to start (\"native routing cidr must be configured with option --ipv4-native-routing-cidr\"); the pods' range is {pods_s}"),
                    fix);
            }
            return;
        };
        let Some(c) = Cidr::parse(&s) else {
            self.push(
                "routing.native-cidr",
                KEY,
                "\"\"",
                Verdict::Fail,
                format!("{s:?} is not a CIDR"),
                fix,
            );
            return;
        };
        let uncovered: Vec<String> = pods
            .iter()
            .filter(|p| !c.contains(p))
            .map(|p| p.to_string())
            .collect();
        if pods.is_empty() {
            self.push("routing.native-cidr", KEY, "\"\"", Verdict::Warn,
                format!("{c}: the pod CIDR is not known (the inventory sets no [cluster] pod_cidr and no node has a podCIDR), so its coverage was not checked"), fix);
        } else if uncovered.is_empty() {
            self.push("routing.native-cidr", KEY, "\"\"", Verdict::Pass,
                format!("{c} covers the pod CIDR {pods_s}: pod-to-pod traffic is routed, not masqueraded"), None);
        } else {
            self.push("routing.native-cidr", KEY, "\"\"", Verdict::Fail,
                format!("{c} does not cover the pod CIDR {}: Cilium would masquerade traffic to pods outside it and hand it to the node's default route instead of routing it to the node that holds them", and(&uncovered)),
                fix);
        }
    }

    fn direct_routes(&mut self, native: bool) {
        const KEY: &str = "autoDirectNodeRoutes";
        let on = self.v.boolean(KEY).unwrap_or(false);
        if !on {
            if native {
                self.push("routing.direct-routes", KEY, "false", Verdict::Warn,
                    "false in native routing: nothing installs the routes to the other nodes' podCIDRs, so the network itself must route them (a router or BGP)".into(),
                    Some(format!("{KEY}: true   # when the nodes share one L2 subnet")));
            }
            return;
        }
        if !native {
            self.push("routing.direct-routes", KEY, "false", Verdict::Fail,
                "true in tunnel mode: Cilium 1.16's agent refuses to start (\"auto-direct-node-routes cannot be used with tunneling\")".into(),
                Some("routingMode: native\nor\nautoDirectNodeRoutes: false".into()));
            return;
        }
        let mut problems = vec![];
        let mut shared: Vec<String> = vec![];
        for b in &self.f.nodes {
            let Some(ip) = b.internal_ip else {
                problems.push(format!("Node/{} has no InternalIP in the API", b.name));
                continue;
            };
            let mut missing = vec![];
            for a in self.f.nodes.iter().filter(|a| a.name != b.name) {
                match agent(a) {
                    Err(e) => {
                        if !problems.contains(&e) {
                            problems.push(e)
                        }
                    }
                    Ok(af) if af.links.is_empty() => {
                        let e = format!(
                            "{}'s agent reports no links (an agent older than this coordinator?)",
                            a.name
                        );
                        if !problems.contains(&e) {
                            problems.push(e)
                        }
                    }
                    Ok(af) => {
                        let on_link =
                            uplinks(af).any(|l| subnets(l).iter().any(|c| c.contains_ip(ip)));
                        if !on_link {
                            let have: Vec<String> = uplinks(af)
                                .flat_map(|l| {
                                    subnets(l)
                                        .into_iter()
                                        .map(move |c| format!("{c} on {}", l.name))
                                })
                                .collect();
                            missing.push(format!(
                                "{} ({})",
                                a.name,
                                if have.is_empty() {
                                    "no subnet".into()
                                } else {
                                    have.join(", ")
                                }
                            ));
                        } else if let Some(c) =
                            uplinks(af).flat_map(subnets).find(|c| c.contains_ip(ip))
                        {
                            let s = c.to_string();
                            if !shared.contains(&s) {
                                shared.push(s);
                            }
                        }
                    }
                }
            }
            if !missing.is_empty() {
                problems.push(format!(
                    "{}'s InternalIP {ip} is on no subnet of {}",
                    b.name,
                    and(&missing)
                ));
            }
        }
        if problems.is_empty() {
            self.push("routing.direct-routes", KEY, "false", Verdict::Pass,
                format!("every node's InternalIP is on a subnet every other node has ({}): each node can route the others' podCIDRs straight to them", shared.join(", ")),
                None);
        } else {
            self.push("routing.direct-routes", KEY, "false", Verdict::Fail,
                format!("true, but {}: Cilium installs \"podCIDR via InternalIP\" routes, which only work to a neighbour on a shared L2 subnet, so pods on those nodes would not reach each other", and(&problems)),
                Some("put every node on one L2 subnet, or\nautoDirectNodeRoutes: false   # and route the podCIDRs in the network (a router or BGP)\nor routingMode: tunnel (with a tunnelPort Flannel does not use)".into()));
        }
    }

    fn tunnel_port(&mut self) {
        const KEY: &str = "tunnelPort";
        let proto = self
            .v
            .string("tunnelProtocol")
            .filter(|p| !p.is_empty())
            .unwrap_or("vxlan")
            .to_string();
        let default = match proto.as_str() {
            "vxlan" => 8472,
            "geneve" => 6081,
            other => {
                let other = other.to_string();
                self.push(
                    "routing.tunnel-port",
                    "tunnelProtocol",
                    "vxlan",
                    Verdict::Fail,
                    format!("{other:?} is not a tunnel protocol of Cilium 1.16 (vxlan or geneve)"),
                    Some("tunnelProtocol: vxlan".into()),
                );
                return;
            }
        };
        let port = self.v.port(KEY).unwrap_or(default);
        let shown_default = default.to_string();
        let clashes: Vec<String> = self
            .flannel_nodes()
            .iter()
            .filter_map(|n| {
                let a = n.agent.as_ref().ok()?;
                let fp = a
                    .links
                    .iter()
                    .find(|l| l.name == "flannel.1")
                    .and_then(|l| l.vxlan_port)
                    .unwrap_or(FLANNEL_VXLAN_PORT);
                (fp == port).then(|| n.name.clone())
            })
            .collect();
        let unknown = self.flannel_unknown();
        if !clashes.is_empty() {
            self.push("routing.tunnel-port", KEY, &shown_default, Verdict::Fail,
                format!("Cilium's {proto} tunnel would use UDP {port}, the port Flannel's VXLAN (flannel.1) uses on {}, which still run Flannel: while both run, each would receive the other's packets and drop them", and(&clashes)),
                Some(format!("{KEY}: 8473   # a UDP port Flannel does not use (open it between the nodes)")));
        } else if !unknown.is_empty() {
            self.push(
                "routing.tunnel-port",
                KEY,
                &shown_default,
                Verdict::Fail,
                format!(
                    "UDP {port}: whether Flannel still runs could not be seen on {}",
                    and(&unknown)
                ),
                None,
            );
        } else {
            self.push(
                "routing.tunnel-port",
                KEY,
                &shown_default,
                Verdict::Pass,
                format!(
                    "Cilium's {proto} tunnel on UDP {port}: no node running Flannel uses that port"
                ),
                None,
            );
        }
    }

    fn bpf_masquerade(&mut self) {
        const KEY: &str = "bpf.masquerade";
        if !self.v.boolean(KEY).unwrap_or(false) {
            return;
        }
        if !self.v.boolean("enableIPv4Masquerade").unwrap_or(true) {
            self.push("bpf.masquerade", KEY, "false", Verdict::Fail,
                format!("true with enableIPv4Masquerade false (line {}): Cilium 1.16 refuses to start (\"BPF masquerade requires --enable-ipv4-masquerade or --enable-ipv6-masquerade\")",
                    self.v.line("enableIPv4Masquerade").map(|l| l.to_string()).unwrap_or_else(|| "?".into())),
                Some("bpf:\n  masquerade: false".into()));
            return;
        }
        let node_port = self.kpr() || self.v.boolean("nodePort.enabled").unwrap_or(false);
        if !node_port {
            let kpr_at = match self.v.line("kubeProxyReplacement") {
                Some(l) => format!("kubeProxyReplacement: false at line {l}"),
                None => "kubeProxyReplacement false (the default)".into(),
            };
            self.push("bpf.masquerade", KEY, "false", Verdict::Fail,
                format!("true, with {kpr_at} and nodePort.enabled unset: BPF masquerading depends on Cilium's BPF NodePort, which both leave off, and Cilium 1.16's agent refuses to start (\"BPF masquerade requires NodePort (--enable-node-port=\\\"true\\\")\")"),
                Some("keep the kernel's iptables masquerading until kube-proxy is replaced:\nbpf:\n  masquerade: false\nor turn on Cilium's NodePort beside kube-proxy:\nnodePort:\n  enabled: true".into()));
            return;
        }
        let needed = [
            "kernel.version",
            "bpf.prog.sched_cls",
            "bpf.map.lru_hash",
            "bpf.jit",
        ];
        let mut problems = vec![];
        for n in &self.f.nodes {
            match agent(n) {
                Err(e) => problems.push(e),
                Ok(a) => {
                    for id in needed {
                        match a.checks.get(id) {
                            None => problems.push(format!("{}'s agent reports no {id}", n.name)),
                            Some((Verdict::Fail, m)) => {
                                problems.push(format!("{}: {id}: {m}", n.name))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            self.push(
                "bpf.masquerade",
                KEY,
                "false",
                Verdict::Pass,
                format!(
                    "true, with NodePort on ({}); every node's agent passes {}",
                    if self.kpr() {
                        "kubeProxyReplacement: true"
                    } else {
                        "nodePort.enabled: true"
                    },
                    needed.join(", ")
                ),
                None,
            );
        } else {
            self.push("bpf.masquerade", KEY, "false", Verdict::Fail,
                format!("true, but the kernel facts do not support it: {}", and(&problems)),
                Some("fix the node's kernel (see `cnishift preflight`), or\nbpf:\n  masquerade: false".into()));
        }
    }

    fn cni(&mut self) {
        let k3s_dir = self
            .f
            .nodes
            .iter()
            .find_map(|n| n.agent.as_ref().ok().and_then(|a| a.k3s_cni_dir.clone()))
            .unwrap_or_else(|| K3S_CNI_DIR.into());
        // What a node without Flannel reads: seen on a migrated node, else k3s's rule.
        let seen = self.f.nodes.iter().find_map(|n| {
            let a = n.agent.as_ref().ok()?;
            matches!(a.flannel, Some(Flannel::NotRunning(_))).then(|| {
                (
                    n.name.clone(),
                    a.containerd_conf_dir.clone(),
                    a.containerd_bin_dir.clone(),
                )
            })
        });
        let (conf_want, bin_want, evidence) = match &seen {
            Some((n, c, b)) => (
                c.clone().unwrap_or_else(|| NO_FLANNEL_CONF_DIR.into()),
                b.clone().unwrap_or_else(|| NO_FLANNEL_BIN_DIR.into()),
                format!("as on {n}, which runs without Flannel (its agent reads k3s's containerd config)"),
            ),
            None => (
                NO_FLANNEL_CONF_DIR.to_string(),
                NO_FLANNEL_BIN_DIR.to_string(),
                "k3s's containerd reads them once k3s runs with --flannel-backend=none".to_string(),
            ),
        };
        let conf = self
            .v
            .string("cni.confPath")
            .unwrap_or(NO_FLANNEL_CONF_DIR)
            .trim_end_matches('/')
            .to_string();
        let exclusive = self.v.boolean("cni.exclusive").unwrap_or(true);
        let flannel: Vec<String> = self
            .flannel_nodes()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let conf_fix = Some(format!(
            "cni:\n  confPath: {NO_FLANNEL_CONF_DIR}   # the chart's default"
        ));
        if conf == k3s_dir.trim_end_matches('/') {
            if exclusive && !flannel.is_empty() {
                self.push("cni.conf-path", "cni.confPath", NO_FLANNEL_CONF_DIR, Verdict::Fail,
                    format!("{conf} is k3s's own CNI directory, where Flannel's 10-flannel.conflist is what containerd loads on {}; with cni.exclusive {} a Cilium agent renames every other CNI config there to *.cilium_bak, so on a node still running Flannel new pods get no network; and once a node is switched its containerd reads {conf_want}, not {conf}",
                        and(&flannel),
                        if self.v.line("cni.exclusive").is_some() { "true" } else { "(the default, true)" }),
                    conf_fix);
            } else {
                self.push("cni.conf-path", "cni.confPath", NO_FLANNEL_CONF_DIR, Verdict::Fail,
                    format!("{conf} is k3s's own CNI directory; a node without Flannel reads {conf_want} ({evidence}), so Cilium's config there is never loaded and the node stays NotReady"),
                    conf_fix);
            }
        } else if conf == conf_want.trim_end_matches('/') {
            self.push("cni.conf-path", "cni.confPath", NO_FLANNEL_CONF_DIR, Verdict::Pass,
                format!("{conf}: where containerd reads CNI configs on a node without Flannel ({evidence})"), None);
        } else {
            self.push("cni.conf-path", "cni.confPath", NO_FLANNEL_CONF_DIR, Verdict::Fail,
                format!("{conf}: a node without Flannel reads {conf_want} ({evidence}), so Cilium's config there is never loaded and the node stays NotReady"),
                conf_fix);
        }
        let bin = self
            .v
            .string("cni.binPath")
            .unwrap_or(NO_FLANNEL_BIN_DIR)
            .trim_end_matches('/')
            .to_string();
        if bin == bin_want.trim_end_matches('/') {
            self.push("cni.bin-path", "cni.binPath", NO_FLANNEL_BIN_DIR, Verdict::Pass,
                format!("{bin}: where containerd runs CNI plugins from on a node without Flannel ({evidence})"), None);
        } else {
            self.push("cni.bin-path", "cni.binPath", NO_FLANNEL_BIN_DIR, Verdict::Fail,
                format!("{bin}: a node without Flannel runs CNI plugins from {bin_want} ({evidence}), so containerd would not find Cilium's plugin"),
                Some(format!("cni:\n  binPath: {NO_FLANNEL_BIN_DIR}   # the chart's default")));
        }
    }

    /// Is Cilium's DaemonSet limited to nodes with `k=v`?
    fn restricted(&self, k: &str, v: &str) -> bool {
        // The chart's default nodeSelector, merged with the values' (null removes it).
        let mut selector: Vec<(String, String)> = vec![("kubernetes.io/os".into(), "linux".into())];
        if let Some((_, n)) = schema::lookup(&self.v.root, "nodeSelector") {
            match &n.value {
                Value::Null => selector.clear(),
                Value::Map(entries) => {
                    for (key, val) in entries {
                        selector.retain(|(k2, _)| k2 != &key.name);
                        match &val.value {
                            Value::Null => {}
                            Value::Str(s) => selector.push((key.name.clone(), s.clone())),
                            _ => selector.push((key.name.clone(), val.show())),
                        }
                    }
                }
                _ => {}
            }
        }
        if selector.iter().any(|(a, b)| a == k && b == v) {
            return true;
        }
        let terms = self
            .v
            .at("affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms")
            .map(|(_, n)| n);
        let Some(Value::List(terms)) = terms.map(|n| &n.value) else {
            return false;
        };
        !terms.is_empty()
            && terms.iter().all(|t| {
                let Some(Value::List(exprs)) = t.get("matchExpressions").map(|e| &e.value) else {
                    return false;
                };
                exprs.iter().any(|e| {
                    let s = |f: &str| match e.get(f).map(|x| &x.value) {
                        Some(Value::Str(s)) => Some(s.as_str()),
                        _ => None,
                    };
                    let values: Vec<&str> = match e.get("values").map(|x| &x.value) {
                        Some(Value::List(l)) => l
                            .iter()
                            .filter_map(|x| match &x.value {
                                Value::Str(s) => Some(s.as_str()),
                                _ => None,
                            })
                            .collect(),
                        _ => vec![],
                    };
                    s("key") == Some(k)
                        && match s("operator") {
                            Some("In") => values.contains(&v),
                            Some("Exists") => true,
                            _ => false,
                        }
                })
            })
    }

    fn daemonset(&mut self) {
        const RULE: &str = "daemonset.restricted";
        let Some((k, v)) = self.f.node_label.clone() else {
            self.push(RULE, "nodeSelector", "{kubernetes.io/os: linux}", Verdict::Warn,
                "the inventory sets no [cilium] node_label, so nothing keeps Cilium's DaemonSet off the nodes still running Flannel: it would start on every node at once".into(),
                Some("in the inventory:\n[cilium]\nnode_label = \"cnishift.io/cni=cilium\"\nand in the values:\nnodeSelector:\n  kubernetes.io/os: linux\n  cnishift.io/cni: cilium".into()));
            return;
        };
        let lines = format!("nodeSelector:\n  kubernetes.io/os: linux\n  {k}: {v}");
        if self.restricted(&k, &v) {
            self.push(RULE, "nodeSelector", "{kubernetes.io/os: linux}", Verdict::Pass,
                format!("Cilium's DaemonSet is limited to nodes labelled {k}={v} (the inventory's [cilium] node_label, which cnishift sets at each node's Label step): no Cilium agent starts beside Flannel"),
                None);
        } else {
            self.push(RULE, "nodeSelector", "{kubernetes.io/os: linux}", Verdict::Warn,
                format!("neither nodeSelector nor affinity limits Cilium's DaemonSet to {k}={v} (the inventory's [cilium] node_label): it would start on every node at once, beside Flannel on the nodes not switched yet"),
                Some(lines));
        }
    }

    fn mtu(&mut self) {
        const KEY: &str = "MTU";
        let set = self.v.int(KEY).filter(|m| *m > 0).map(|m| m as u32);
        let native = self.v.string("routingMode") == Some("native");
        let wireguard = self.v.boolean("encryption.enabled").unwrap_or(false)
            && self.v.string("encryption.type") == Some("wireguard");
        let overhead = if native { 0 } else { TUNNEL_OVERHEAD }
            + if wireguard { WIREGUARD_OVERHEAD } else { 0 };
        let mut problems = vec![];
        let mut warnings = vec![];
        let mut picked: Vec<(String, u32, String)> = vec![];
        for n in &self.f.nodes {
            let a = match agent(n) {
                Ok(a) => a,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if a.links.is_empty() {
                problems.push(format!(
                    "{}'s agent reports no links (an agent older than this coordinator?)",
                    n.name
                ));
                continue;
            }
            let Some(dev) = device(a, n.internal_ip) else {
                problems.push(format!(
                    "{}: no link holds its InternalIP {} and it has no default route",
                    n.name,
                    n.internal_ip
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "(none in the API)".into())
                ));
                continue;
            };
            let Some(dev_mtu) = dev.mtu else {
                problems.push(format!("{}: {} reports no MTU", n.name, dev.name));
                continue;
            };
            if let Some(m) = set {
                if m > dev_mtu {
                    problems.push(format!(
                        "{m} is larger than {}'s {}",
                        n.name,
                        link_desc(dev)
                    ));
                }
            }
            let mtu = set.unwrap_or(dev_mtu);
            if is_tailscale(dev) {
                warnings.push(format!("{}'s InternalIP is on {}", n.name, link_desc(dev)));
            }
            for b in self.f.nodes.iter().filter(|b| b.name != n.name) {
                let Some(ip) = b.internal_ip else { continue };
                if let Some(out) = route_to(a, ip) {
                    if out.mtu.is_some_and(|m| m < mtu) {
                        warnings.push(format!(
                            "from {} to {} ({ip}) packets leave through {}, smaller than the {mtu} Cilium uses on {}",
                            n.name, b.name, link_desc(out), n.name
                        ));
                    }
                }
            }
            picked.push((n.name.clone(), mtu, dev.name.clone()));
        }
        let mut distinct: Vec<u32> = picked.iter().map(|(_, m, _)| *m).collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > 1 {
            warnings.push(format!(
                "the nodes' MTUs differ ({})",
                picked
                    .iter()
                    .map(|(n, m, d)| format!("{n} {m} on {d}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let how = if native {
            "native routing adds no overhead".to_string()
        } else {
            format!(
                "the tunnel takes {overhead} bytes, so pods get {}",
                distinct
                    .first()
                    .map(|m| m.saturating_sub(overhead))
                    .unwrap_or(0)
            )
        };
        let smallest = distinct.first().copied().unwrap_or(1500);
        if !problems.is_empty() {
            self.push("mtu", KEY, "0 (detected)", Verdict::Fail, and(&problems),
                Some(format!("MTU: {}   # the smallest uplink MTU (or leave MTU unset: Cilium detects it per node)", smallest)));
        } else if !warnings.is_empty() {
            let tailscale = warnings.iter().any(|w| w.contains("Tailscale"));
            let want = if tailscale {
                smallest.min(TAILSCALE_MTU)
            } else {
                smallest
            };
            let want = if native { want } else { want.saturating_sub(0) };
            self.push("mtu", KEY, "0 (detected)", Verdict::Warn,
                format!("{}: large packets are dropped on such a path unless path-MTU discovery gets through", and(&warnings)),
                Some(format!("MTU: {want}   # the smallest MTU on any node's path, or route the nodes over their LAN")));
        } else {
            let shown = picked
                .iter()
                .map(|(n, _, d)| format!("{n} {d}"))
                .collect::<Vec<_>>()
                .join(", ");
            self.push("mtu", KEY, "0 (detected)", Verdict::Pass,
                format!("Cilium will use {} on every node ({}{shown}; {how}), and no node's path to another goes through a smaller MTU",
                    smallest, if set.is_some() { "as set; uplinks " } else { "the MTU of the link holding the InternalIP: " }),
                None);
        }
    }
}
