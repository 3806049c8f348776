//! What Cilium 1.16's Helm chart accepts, as far as the rules need it: its
//! top-level keys (from the chart's own reference, `Documentation/helm-values.rst`
//! at v1.16.9, plus the keys its `values.yaml` documents commented out, such
//! as `kubeProxyReplacement`), and the type and default of every key a rule
//! reads. A known key with the wrong type is an error at its line: the chart's
//! `values.schema.json` makes Helm refuse it too.

use super::parse::{Key, Node, ParseError, Pos, Value};

/// Cilium 1.16's top-level values keys.
pub const TOP_LEVEL: &[&str] = &[
    "MTU",
    "affinity",
    "agent",
    "agentNotReadyTaintKey",
    "aksbyocni",
    "alibabacloud",
    "annotateK8sNode",
    "annotations",
    "apiRateLimit",
    "authentication",
    "autoDirectNodeRoutes",
    "azure",
    "bandwidthManager",
    "bgp",
    "bgpControlPlane",
    "bpf",
    "bpfClockProbe",
    "certgen",
    "cgroup",
    "ciliumEndpointSlice",
    "cleanBpfState",
    "cleanState",
    "cluster",
    "clustermesh",
    "cni",
    "conntrackGCInterval",
    "conntrackGCMaxInterval",
    "crdWaitTimeout",
    "customCalls",
    "daemon",
    "dashboards",
    "debug",
    "devices",
    "directRoutingDevice",
    "directRoutingSkipUnreachable",
    "disableEndpointCRD",
    "dnsPolicy",
    "dnsProxy",
    "egressGateway",
    "enableCiliumEndpointSlice",
    "enableCriticalPriorityClass",
    "enableIPv4BIGTCP",
    "enableIPv4Masquerade",
    "enableIPv6BIGTCP",
    "enableIPv6Masquerade",
    "enableK8sTerminatingEndpoint",
    "enableMasqueradeRouteSource",
    "enableRuntimeDeviceDetection",
    "enableXTSocketFallback",
    "encryption",
    "endpointHealthChecking",
    "endpointRoutes",
    "eni",
    "envoy",
    "envoyConfig",
    "etcd",
    "externalIPs",
    "externalWorkloads",
    "extraArgs",
    "extraConfig",
    "extraContainers",
    "extraEnv",
    "extraHostPathMounts",
    "extraInitContainers",
    "extraVolumeMounts",
    "extraVolumes",
    "forceDeviceDetection",
    "gatewayAPI",
    "gke",
    "healthChecking",
    "healthPort",
    "highScaleIPcache",
    "hostFirewall",
    "hostPort",
    "hubble",
    "identityAllocationMode",
    "identityChangeGracePeriod",
    "image",
    "imagePullSecrets",
    "ingressController",
    "initResources",
    "installNoConntrackIptablesRules",
    "ipMasqAgent",
    "ipam",
    "ipv4",
    "ipv4NativeRoutingCIDR",
    "ipv6",
    "ipv6NativeRoutingCIDR",
    "k8s",
    "k8sClientRateLimit",
    "k8sNetworkPolicy",
    "k8sServiceHost",
    "k8sServicePort",
    "keepDeprecatedLabels",
    "keepDeprecatedProbes",
    "kubeConfigPath",
    "kubeProxyReplacement",
    "kubeProxyReplacementHealthzBindAddr",
    "l2NeighDiscovery",
    "l2announcements",
    "l2podAnnouncements",
    "l7Proxy",
    "livenessProbe",
    "loadBalancer",
    "localRedirectPolicy",
    "logSystemLoad",
    "maglev",
    "monitor",
    "name",
    "nat",
    "nat46x64Gateway",
    "nodeIPAM",
    "nodePort",
    "nodeSelector",
    "nodeSelectorLabels",
    "nodeinit",
    "operator",
    "pmtuDiscovery",
    "podAnnotations",
    "podLabels",
    "podSecurityContext",
    "policyCIDRMatchMode",
    "policyEnforcementMode",
    "pprof",
    "preflight",
    "priorityClassName",
    "prometheus",
    "rbac",
    "readinessProbe",
    "resourceQuotas",
    "resources",
    "rollOutCiliumPods",
    "routingMode",
    "sctp",
    "securityContext",
    "serviceAccounts",
    "serviceNoBackendResponse",
    "sleepAfterInit",
    "socketLB",
    "startupProbe",
    "svcSourceRangeCheck",
    "synchronizeK8sNodes",
    "sysctlfix",
    "terminationGracePeriodSeconds",
    "tls",
    "tolerations",
    "tunnelPort",
    "tunnelProtocol",
    "updateStrategy",
    "upgradeCompatibility",
    "vtep",
    "waitForKubeProxy",
    "wellKnownIdentities",
];

/// The type a key must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Bool,
    Str,
    Int,
    /// A port: an integer, or a string of digits (the chart's type is [string, integer]).
    Port,
    /// A list of strings, or one string (the chart joins either).
    StrList,
    Map,
    /// `kubeProxyReplacement`: true/false, as a boolean or the strings "true"/"false".
    BoolOrBoolString,
}

impl Ty {
    fn expects(self) -> &'static str {
        match self {
            Ty::Bool => "a boolean (true or false)",
            Ty::Str => "a string",
            Ty::Int => "an integer",
            Ty::Port => "a port number (1-65535)",
            Ty::StrList => "a list of strings",
            Ty::Map => "a mapping (key: value lines indented under it)",
            Ty::BoolOrBoolString => "true or false",
        }
    }
}

/// Every key a rule reads: its path, type, and Cilium 1.16's default (as the
/// chart documents it).
pub const TYPED: &[(&str, Ty, &str)] = &[
    ("k8sServiceHost", Ty::Str, "\"\" (the kubernetes Service)"),
    ("k8sServicePort", Ty::Port, "\"\""),
    ("kubeProxyReplacement", Ty::BoolOrBoolString, "\"false\""),
    ("ipam", Ty::Map, "{}"),
    ("ipam.mode", Ty::Str, "cluster-pool"),
    ("ipam.operator", Ty::Map, "{}"),
    (
        "ipam.operator.clusterPoolIPv4PodCIDRList",
        Ty::StrList,
        "[\"10.0.0.0/8\"]",
    ),
    ("routingMode", Ty::Str, "tunnel"),
    ("tunnelProtocol", Ty::Str, "vxlan"),
    ("tunnelPort", Ty::Port, "8472 for VXLAN, 6081 for Geneve"),
    ("autoDirectNodeRoutes", Ty::Bool, "false"),
    ("ipv4NativeRoutingCIDR", Ty::Str, "\"\""),
    ("enableIPv4Masquerade", Ty::Bool, "true"),
    ("bpf", Ty::Map, "{}"),
    ("bpf.masquerade", Ty::Bool, "false"),
    ("nodePort", Ty::Map, "{}"),
    ("nodePort.enabled", Ty::Bool, "false"),
    ("cni", Ty::Map, "{}"),
    ("cni.confPath", Ty::Str, "/etc/cni/net.d"),
    ("cni.binPath", Ty::Str, "/opt/cni/bin"),
    ("cni.exclusive", Ty::Bool, "true"),
    ("nodeSelector", Ty::Map, "{kubernetes.io/os: linux}"),
    ("affinity", Ty::Map, "a podAntiAffinity on k8s-app=cilium"),
    ("MTU", Ty::Int, "0 (detected)"),
    ("encryption", Ty::Map, "{}"),
    ("encryption.enabled", Ty::Bool, "false"),
    ("encryption.type", Ty::Str, "ipsec"),
];

/// The node at a dotted path (`cni.confPath`), and the key entry that set it.
pub fn lookup<'a>(root: &'a Node, path: &str) -> Option<(&'a Key, &'a Node)> {
    let mut node = root;
    let mut found = None;
    for part in path.split('.') {
        let key = node.key(part)?;
        node = node.get(part)?;
        found = Some((key, node));
    }
    found
}

/// Checks the type of every key a rule reads; the first wrong one is an error at its line.
pub fn validate(root: &Node, file: &str) -> Result<(), ParseError> {
    for (path, ty, _) in TYPED {
        let Some((key, node)) = lookup(root, path) else {
            continue;
        };
        if node.value == Value::Null {
            continue;
        }
        let ok = match (ty, &node.value) {
            (Ty::Bool, Value::Bool(_)) => true,
            (Ty::Str, Value::Str(_)) => true,
            (Ty::Int, Value::Int(_)) => true,
            (Ty::Port, Value::Int(p)) => (1..=65535).contains(p),
            (Ty::Port, Value::Str(s)) => s.is_empty() || s.parse::<u16>().is_ok_and(|p| p > 0),
            (Ty::StrList, Value::Str(_)) => true,
            (Ty::StrList, Value::List(items)) => {
                items.iter().all(|i| matches!(i.value, Value::Str(_)))
            }
            (Ty::Map, Value::Map(_)) => true,
            (Ty::BoolOrBoolString, Value::Bool(_)) => true,
            (Ty::BoolOrBoolString, Value::Str(s)) => s == "true" || s == "false",
            _ => false,
        };
        if let (Ty::StrList, Value::List(items)) = (ty, &node.value) {
            if let Some(item) = items.iter().find(|i| !matches!(i.value, Value::Str(_))) {
                return Err(ParseError {
                    file: file.to_string(),
                    line: item.pos.line,
                    col: item.pos.col,
                    message: format!(
                        "{path}: the item {} is {}, and Cilium 1.16 expects a list of strings",
                        item.show(),
                        item.kind()
                    ),
                    hint: Some("quote each CIDR, e.g. - \"10.42.0.0/16\"".into()),
                });
            }
        }
        if !ok {
            let hint = match (ty, &node.value) {
                (Ty::Bool, Value::Str(s)) if s == "true" || s == "false" => {
                    Some(format!("write {s} without quotes"))
                }
                (Ty::BoolOrBoolString, Value::Str(s))
                    if ["strict", "partial", "probe", "disabled"].contains(&s.as_str()) =>
                {
                    Some("strict/partial/probe/disabled were removed in Cilium 1.15: write true or false".to_string())
                }
                (Ty::Map, _) => Some(format!("write the keys under it, e.g.\n    {key}:\n      <key>: <value>", key = key.name)),
                _ => None,
            };
            return Err(ParseError {
                file: file.to_string(),
                line: node.pos.line,
                col: node.pos.col,
                message: format!(
                    "{path}: {} is {}, and Cilium 1.16 expects {}",
                    node.show(),
                    node.kind(),
                    ty.expects()
                ),
                hint,
            });
        }
    }
    Ok(())
}

/// Top-level keys Cilium 1.16 does not know, each with its place and the
/// nearest key it does know.
pub fn unknown_top_level(root: &Node) -> Vec<(String, Pos, Option<&'static str>)> {
    let Value::Map(entries) = &root.value else {
        return vec![];
    };
    entries
        .iter()
        .filter(|(k, _)| !TOP_LEVEL.contains(&k.name.as_str()))
        .map(|(k, _)| (k.name.clone(), k.pos, nearest(&k.name)))
        .collect()
}

/// The known top-level key closest to `key` (case-insensitive edit distance),
/// when it is close enough to be a typo.
pub fn nearest(key: &str) -> Option<&'static str> {
    let lower = key.to_lowercase();
    TOP_LEVEL
        .iter()
        .map(|k| (levenshtein(&lower, &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::parse::parse;
    use std::path::Path;

    fn load(text: &str) -> Result<Node, ParseError> {
        let (n, _) = parse(text, Path::new("v.yaml"))?;
        validate(&n, "v.yaml")?;
        Ok(n)
    }

    #[test]
    fn a_known_key_with_the_wrong_type_is_an_error_at_its_value() {
        let e = |t: &str| load(t).unwrap_err().to_string();
        assert_eq!(
            e("k8sServiceHost: 10.1.0.5\nautoDirectNodeRoutes: \"yes please\"\n"),
            "v.yaml:2:23: autoDirectNodeRoutes: \"yes please\" is a string, and Cilium 1.16 expects a boolean (true or false)"
        );
        assert_eq!(
            e("bpf:\n  masquerade: \"true\"\n"),
            "v.yaml:2:15: bpf.masquerade: \"true\" is a string, and Cilium 1.16 expects a boolean (true or false)\n  hint: write true without quotes"
        );
        assert_eq!(
            e("k8sServicePort: 70000\n"),
            "v.yaml:1:17: k8sServicePort: 70000 is an integer, and Cilium 1.16 expects a port number (1-65535)"
        );
        assert_eq!(
            e("kubeProxyReplacement: strict\n"),
            "v.yaml:1:23: kubeProxyReplacement: \"strict\" is a string, and Cilium 1.16 expects true or false\n  \
             hint: strict/partial/probe/disabled were removed in Cilium 1.15: write true or false"
        );
        assert_eq!(
            e("cni: /etc/cni/net.d\n"),
            "v.yaml:1:6: cni: \"/etc/cni/net.d\" is a string, and Cilium 1.16 expects a mapping (key: value lines indented under it)\n  \
             hint: write the keys under it, e.g.\n    cni:\n      <key>: <value>"
        );
        assert_eq!(
            e("ipam:\n  operator:\n    clusterPoolIPv4PodCIDRList:\n      - 10\n"),
            "v.yaml:4:9: ipam.operator.clusterPoolIPv4PodCIDRList: the item 10 is an integer, and Cilium 1.16 expects a list of strings\n  \
             hint: quote each CIDR, e.g. - \"10.42.0.0/16\""
        );
        // The right types, and "6443" as a string port, pass.
        load("k8sServicePort: \"6443\"\nkubeProxyReplacement: \"false\"\nMTU: 1400\nnodeSelector: {a: b}\n").unwrap();
    }

    #[test]
    fn unknown_top_level_keys_come_with_the_nearest_known_one() {
        let (n, _) = parse(
            "k8sServiceHst: x\nroutingmode: native\nhubble: {}\nzzzzzzzzzz: 1\n",
            Path::new("v"),
        )
        .unwrap();
        assert_eq!(
            unknown_top_level(&n),
            vec![
                (
                    "k8sServiceHst".to_string(),
                    Pos { line: 1, col: 1 },
                    Some("k8sServiceHost")
                ),
                (
                    "routingmode".to_string(),
                    Pos { line: 2, col: 1 },
                    Some("routingMode")
                ),
                ("zzzzzzzzzz".to_string(), Pos { line: 4, col: 1 }, None),
            ]
        );
    }
}
