//! Every rule against crafted values and facts: a good base passes every
//! rule, and each crafted bad value (or fact) gives exactly one finding that
//! is not a pass, naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use super::facts::{AgentFacts, ApiServer, Dial, Facts, Flannel, Link, NodeFacts};
use super::{rules, Finding, Values};
use crate::kube::gates::Verdict;

const BASE: &str = r#"# a good values file for the crafted cluster below
k8sServiceHost: "198.18.2.254"
k8sServicePort: 6443
ipam:
  mode: kubernetes
kubeProxyReplacement: false
routingMode: native
autoDirectNodeRoutes: true
ipv4NativeRoutingCIDR: "10.64.0.0/16"
nodeSelector:
  cnishift.io/cni: cilium
"#;

fn link(name: &str, mtu: u32, addrs: &[&str]) -> Link {
    Link {
        name: name.into(),
        kind: None,
        mtu: Some(mtu),
        up: true,
        addresses: addrs.iter().map(|a| a.to_string()).collect(),
        vxlan_port: None,
    }
}

fn pass_checks() -> BTreeMap<String, (Verdict, String)> {
    [
        "kernel.version",
        "bpf.prog.sched_cls",
        "bpf.map.lru_hash",
        "bpf.jit",
    ]
    .iter()
    .map(|id| (id.to_string(), (Verdict::Pass, "ok".to_string())))
    .collect()
}

fn node(i: u8, name: &str) -> NodeFacts {
    let ip = format!("198.18.2.{i}");
    let mut flannel = link("flannel.1", 1450, &[&format!("10.64.{}.0/32", i - 1)]);
    flannel.kind = Some("vxlan".into());
    flannel.vxlan_port = Some(8472);
    NodeFacts {
        name: name.into(),
        in_api: true,
        internal_ip: Some(ip.parse().unwrap()),
        pod_cidrs: vec![format!("10.64.{}.0/24", i - 1)],
        agent: Ok(AgentFacts {
            links: vec![
                link("lo", 65536, &["127.0.0.1/8"]),
                link("eth0", 1500, &[&format!("{ip}/24")]),
                flannel,
                link("cni0", 1450, &[&format!("10.64.{}.1/24", i - 1)]),
            ],
            default_route: None,
            flannel: Some(Flannel::Running(
                "k3s's containerd reads /var/lib/rancher/k3s/agent/etc/cni/net.d, Flannel's".into(),
            )),
            containerd_conf_dir: Some("/var/lib/rancher/k3s/agent/etc/cni/net.d".into()),
            containerd_bin_dir: Some("/var/lib/rancher/k3s/data/current/bin".into()),
            k3s_cni_dir: Some("/var/lib/rancher/k3s/agent/etc/cni/net.d".into()),
            checks: pass_checks(),
        }),
        dial: Some(Ok(Dial {
            ok: true,
            address: "198.18.2.254:6443".into(),
            elapsed_us: 420,
            ..Default::default()
        })),
    }
}

fn facts() -> Facts {
    Facts {
        nodes: vec![node(1, "ctl-a"), node(2, "w-1"), node(3, "w-2")],
        pod_cidr: Some("10.64.0.0/16".into()),
        service_cidr: Some("10.65.0.0/16".into()),
        node_label: Some(("cnishift.io/cni".into(), "cilium".into())),
        api_vip: None,
        api: ApiServer {
            url: "http://198.18.2.254:6443/".into(),
            https: false,
            host: "198.18.2.254".into(),
            port: 6443,
            ca: vec![],
            insecure: false,
        },
        cluster_info: None,
        api_error: None,
    }
}

fn values(text: &str) -> Values {
    Values::parse(text, Path::new("values.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn run(text: &str, f: &Facts) -> Vec<Finding> {
    rules::check(&values(text), f)
}

fn not_pass(fs: &[Finding]) -> Vec<&Finding> {
    fs.iter().filter(|f| f.verdict != Verdict::Pass).collect()
}

/// Exactly one finding is not a pass; it names `key` with `verdict`; returns it.
fn one(text: &str, f: &Facts, key: &str, verdict: Verdict) -> Finding {
    let fs = run(text, f);
    let bad = not_pass(&fs);
    assert_eq!(
        bad.len(),
        1,
        "expected one finding about {key}, got: {bad:#?}"
    );
    assert_eq!(
        (bad[0].key.as_str(), bad[0].verdict),
        (key, verdict),
        "{:#?}",
        bad[0]
    );
    if verdict != Verdict::Pass {
        assert!(
            bad[0].fix.is_some(),
            "a {verdict:?} comes with a fix: {:#?}",
            bad[0]
        );
    }
    bad[0].clone()
}

/// BASE with `from` replaced by `to` (which must occur).
fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn the_good_base_passes_every_rule_and_says_what_it_saw() {
    let fs = run(BASE, &facts());
    assert!(not_pass(&fs).is_empty(), "{:#?}", not_pass(&fs));
    let keys: Vec<&str> = fs.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "k8sServiceHost",
            "kubeProxyReplacement",
            "ipam.mode",
            "ipv4NativeRoutingCIDR",
            "autoDirectNodeRoutes",
            "cni.confPath",
            "cni.binPath",
            "nodeSelector",
            "MTU"
        ]
    );
    let host = &fs[0];
    assert_eq!(
        (host.line, host.value.as_str()),
        (Some(2), "\"198.18.2.254\"")
    );
    assert!(
        host.observed.starts_with(
            "198.18.2.254:6443 reachable from all 3 nodes (ctl-a 0.4 ms, w-1 0.4 ms, w-2 0.4 ms)"
        ) && host.observed.contains("identity is by address"),
        "{}",
        host.observed
    );
    let mtu = fs.iter().find(|f| f.key == "MTU").unwrap();
    assert_eq!(mtu.value, "(default) 0 (detected)");
    assert!(
        mtu.observed
            .starts_with("Cilium will use 1500 on every node"),
        "{}",
        mtu.observed
    );
    // The same values as --set lines judge the same.
    let set = "k8sServiceHost=198.18.2.254\nk8sServicePort=6443\nipam.mode=kubernetes\nkubeProxyReplacement=false\n\
               routingMode=native,autoDirectNodeRoutes=true\nipv4NativeRoutingCIDR=10.64.0.0/16\nnodeSelector.cnishift\\.io/cni=cilium\n";
    let fs2 = run(set, &facts());
    assert!(not_pass(&fs2).is_empty(), "{:#?}", not_pass(&fs2));
    assert_eq!(fs2.len(), fs.len());
}

#[test]
fn an_unreachable_service_host_fails_naming_the_node_and_its_error() {
    let mut f = facts();
    if let Some(Ok(d)) = &mut f.nodes[2].dial {
        d.ok = false;
        d.error = "TCP connect to 198.18.2.200:6443: no answer within 1s".into();
    }
    let x = one(
        &with("198.18.2.254", "198.18.2.200"),
        &f,
        "k8sServiceHost",
        Verdict::Fail,
    );
    assert!(
        x.observed.starts_with("198.18.2.200:6443 is not reachable from w-2: TCP connect to 198.18.2.200:6443: no answer within 1s (reached from ctl-a 0.4 ms and w-1 0.4 ms)"),
        "{}",
        x.observed
    );
    assert_eq!(x.line, Some(2));
    // An agent that cannot be asked is no evidence of reachability.
    let mut f = facts();
    f.nodes[0].dial = Some(Err("unreachable: connection refused".into()));
    let x = one(BASE, &f, "k8sServiceHost", Verdict::Fail);
    assert!(
        x.observed
            .contains("ctl-a's agent could not be asked to dial (unreachable: connection refused)"),
        "{}",
        x.observed
    );
}

#[test]
fn over_https_the_peer_must_verify_against_the_kubeconfig_ca() {
    let mut f = facts();
    f.api.https = true;
    f.api.url = "https://198.18.2.254:6443/".into();
    f.api.ca = vec![vec![1, 2, 3]];
    for n in &mut f.nodes {
        if let Some(Ok(d)) = &mut n.dial {
            d.verified = Some(Ok(()));
        }
    }
    let fs = run(BASE, &f);
    assert!(not_pass(&fs).is_empty(), "{:#?}", not_pass(&fs));
    assert!(
        fs[0]
            .observed
            .contains("verifies against the kubeconfig's CA for 198.18.2.254"),
        "{}",
        fs[0].observed
    );
    if let Some(Ok(d)) = &mut f.nodes[1].dial {
        d.verified = Some(Err("invalid peer certificate: UnknownIssuer".into()));
        d.peer_subject = "CN=k3s".into();
        d.peer_sans = vec!["10.1.0.11".into()];
    }
    let x = one(BASE, &f, "k8sServiceHost", Verdict::Fail);
    assert!(
        x.observed.contains("from w-1: invalid peer certificate: UnknownIssuer (it presents \"CN=k3s\" for 10.1.0.11)"),
        "{}",
        x.observed
    );
    assert!(x.fix.unwrap().contains("--tls-san 198.18.2.254"));
    f.api.ca.clear();
    one(BASE, &f, "k8sServiceHost", Verdict::Warn);
}

#[test]
fn a_service_host_without_a_port_or_auto_without_cluster_info_fails() {
    let x = one(
        &with("k8sServicePort: 6443\n", ""),
        &facts(),
        "k8sServicePort",
        Verdict::Fail,
    );
    assert_eq!(x.value, "(default) \"\"");
    let mut f = facts();
    f.cluster_info = Some(Ok(false));
    let x = one(
        &with("\"198.18.2.254\"", "auto"),
        &f,
        "k8sServiceHost",
        Verdict::Fail,
    );
    assert!(
        x.observed.contains("kube-public/cluster-info"),
        "{}",
        x.observed
    );
    f.cluster_info = Some(Ok(true));
    assert!(not_pass(&run(&with("\"198.18.2.254\"", "auto"), &f)).is_empty());
}

#[test]
fn kube_proxy_replacement_without_a_service_host_fails() {
    let text = with(
        "k8sServiceHost: \"198.18.2.254\"\nk8sServicePort: 6443\n",
        "",
    )
    .replace("kubeProxyReplacement: false", "kubeProxyReplacement: true");
    let x = one(&text, &facts(), "kubeProxyReplacement", Verdict::Fail);
    assert_eq!((x.line, x.value.as_str()), (Some(4), "true"));
    assert_eq!(
        x.fix.as_deref(),
        Some("k8sServiceHost: \"198.18.2.254\"\nk8sServicePort: 6443")
    );
    // The string form counts the same.
    one(
        &text.replace(
            "kubeProxyReplacement: true",
            "kubeProxyReplacement: \"true\"",
        ),
        &facts(),
        "kubeProxyReplacement",
        Verdict::Fail,
    );
}

#[test]
fn ipam_kubernetes_needs_every_node_podcidr_inside_the_pod_cidr() {
    let mut f = facts();
    f.nodes[1].pod_cidrs = vec!["10.99.1.0/24".into()];
    let x = one(BASE, &f, "ipam.mode", Verdict::Fail);
    assert!(
        x.observed.contains(
            "Node/w-1's podCIDR 10.99.1.0/24 is outside the inventory's pod CIDR 10.64.0.0/16"
        ),
        "{}",
        x.observed
    );
    f.nodes[1].pod_cidrs.clear();
    let x = one(BASE, &f, "ipam.mode", Verdict::Fail);
    assert!(
        x.observed.contains("Node/w-1 has no spec.podCIDR"),
        "{}",
        x.observed
    );
    one(
        &with("mode: kubernetes", "mode: kubernete"),
        &facts(),
        "ipam.mode",
        Verdict::Fail,
    );
}

#[test]
fn a_cluster_pool_overlapping_what_the_cluster_uses_fails() {
    // The chart's default pool, 10.0.0.0/8, holds the pod and service CIDRs.
    let text = with("mode: kubernetes", "mode: cluster-pool").replace("10.64.0.0/16", "10.0.0.0/8");
    let x = one(
        &text,
        &facts(),
        "ipam.operator.clusterPoolIPv4PodCIDRList",
        Verdict::Fail,
    );
    assert_eq!(x.value, "(default) [\"10.0.0.0/8\"]");
    assert!(
        x.observed.contains("10.0.0.0/8 overlaps the service CIDR (inventory [cluster] service_cidr) 10.65.0.0/16")
            && x.observed.contains("10.0.0.0/8 overlaps the pod CIDR k3s allocates from now (inventory [cluster] pod_cidr) 10.64.0.0/16"),
        "{}",
        x.observed
    );
    // A pool on the node network.
    let text = with(
        "mode: kubernetes",
        "mode: cluster-pool\n  operator:\n    clusterPoolIPv4PodCIDRList: [\"198.18.0.0/16\"]",
    )
    .replace("10.64.0.0/16", "198.18.0.0/16");
    let x = one(
        &text,
        &facts(),
        "ipam.operator.clusterPoolIPv4PodCIDRList",
        Verdict::Fail,
    );
    assert!(
        x.observed
            .contains("overlaps ctl-a's node network 198.18.2.0/24"),
        "{}",
        x.observed
    );
    assert_eq!(x.line, Some(7));
    // A fresh range passes.
    let text = with(
        "mode: kubernetes",
        "mode: cluster-pool\n  operator:\n    clusterPoolIPv4PodCIDRList: [\"10.52.0.0/16\"]",
    )
    .replace("10.64.0.0/16", "10.52.0.0/16");
    assert!(not_pass(&run(&text, &facts())).is_empty());
}

#[test]
fn a_native_routing_cidr_that_does_not_cover_the_pod_cidr_fails() {
    let x = one(
        &with("\"10.64.0.0/16\"", "\"10.64.0.0/17\""),
        &facts(),
        "ipv4NativeRoutingCIDR",
        Verdict::Fail,
    );
    assert!(
        x.observed
            .starts_with("10.64.0.0/17 does not cover the pod CIDR 10.64.0.0/16"),
        "{}",
        x.observed
    );
    assert_eq!(
        (x.line, x.fix.as_deref()),
        (Some(9), Some("ipv4NativeRoutingCIDR: \"10.64.0.0/16\""))
    );
    let x = one(
        &with("ipv4NativeRoutingCIDR: \"10.64.0.0/16\"\n", ""),
        &facts(),
        "ipv4NativeRoutingCIDR",
        Verdict::Fail,
    );
    assert!(x.observed.contains("refuses to start"), "{}", x.observed);
    one(
        &with("routingMode: native", "routingMode: natve"),
        &facts(),
        "routingMode",
        Verdict::Fail,
    );
}

#[test]
fn direct_node_routes_need_one_shared_subnet() {
    let mut f = facts();
    // w-2 registers with an InternalIP on another subnet (a second address on its eth0).
    f.nodes[2].internal_ip = Some("192.0.2.3".parse().unwrap());
    if let Ok(a) = &mut f.nodes[2].agent {
        a.links[1].addresses.push("192.0.2.3/24".into());
    }
    let x = one(BASE, &f, "autoDirectNodeRoutes", Verdict::Fail);
    assert!(
        x.observed.contains("w-2's InternalIP 192.0.2.3 is on no subnet of ctl-a (198.18.2.0/24 on eth0) and w-1 (198.18.2.0/24 on eth0)"),
        "{}",
        x.observed
    );
    assert_eq!(x.line, Some(8));
    // With tunnelling it is refused outright (tunnelPort kept off Flannel's).
    let text = with(
        "routingMode: native",
        "routingMode: tunnel\ntunnelPort: 8473",
    );
    let x = one(&text, &facts(), "autoDirectNodeRoutes", Verdict::Fail);
    assert!(
        x.observed.contains("cannot be used with tunneling"),
        "{}",
        x.observed
    );
}

#[test]
fn a_tunnel_on_flannels_vxlan_port_fails_while_flannel_runs() {
    let text = with(
        "routingMode: native\nautoDirectNodeRoutes: true\n",
        "routingMode: tunnel\n",
    );
    let x = one(&text, &facts(), "tunnelPort", Verdict::Fail);
    assert_eq!(x.value, "(default) 8472");
    assert!(
        x.observed
            .contains("ctl-a, w-1 and w-2, which still run Flannel"),
        "{}",
        x.observed
    );
    assert!(not_pass(&run(&format!("{text}tunnelPort: 8473\n"), &facts())).is_empty());
    // Once no node runs Flannel, the default is fine.
    let mut f = facts();
    for n in &mut f.nodes {
        if let Ok(a) = &mut n.agent {
            a.flannel = Some(Flannel::NotRunning(
                "k3s's containerd reads /etc/cni/net.d".into(),
            ));
            a.containerd_conf_dir = Some("/etc/cni/net.d".into());
            a.containerd_bin_dir = Some("/opt/cni/bin".into());
        }
    }
    assert!(
        not_pass(&run(&text, &f)).is_empty(),
        "{:#?}",
        not_pass(&run(&text, &f))
    );
}

#[test]
fn bpf_masquerade_needs_nodeport_and_the_kernel_facts() {
    let text = format!("{BASE}bpf:\n  masquerade: true\n");
    let x = one(&text, &facts(), "bpf.masquerade", Verdict::Fail);
    assert!(
        x.observed.contains("kubeProxyReplacement: false at line 6")
            && x.observed.contains("BPF masquerade requires NodePort"),
        "{}",
        x.observed
    );
    assert_eq!(x.line, Some(13));
    let text = format!("{text}nodePort:\n  enabled: true\n");
    assert!(not_pass(&run(&text, &facts())).is_empty());
    let mut f = facts();
    if let Ok(a) = &mut f.nodes[1].agent {
        a.checks.insert(
            "bpf.map.lru_hash".into(),
            (
                Verdict::Fail,
                "lru_hash maps: not supported by this kernel".into(),
            ),
        );
    }
    let x = one(&text, &f, "bpf.masquerade", Verdict::Fail);
    assert!(
        x.observed
            .contains("w-1: bpf.map.lru_hash: lru_hash maps: not supported by this kernel"),
        "{}",
        x.observed
    );
}

#[test]
fn cni_paths_must_be_where_containerd_reads_without_flannel() {
    let k3s = "cni:\n  confPath: /var/lib/rancher/k3s/agent/etc/cni/net.d\n";
    let x = one(
        &format!("{BASE}{k3s}"),
        &facts(),
        "cni.confPath",
        Verdict::Fail,
    );
    assert!(
        x.observed
            .contains("renames every other CNI config there to *.cilium_bak")
            && x.observed.contains("(the default, true)"),
        "{}",
        x.observed
    );
    assert_eq!(x.line, Some(13));
    let x = one(
        &format!("{BASE}{k3s}  exclusive: false\n"),
        &facts(),
        "cni.confPath",
        Verdict::Fail,
    );
    assert!(x.observed.contains("never loaded"), "{}", x.observed);
    let x = one(
        &format!("{BASE}cni:\n  binPath: /usr/lib/cni\n"),
        &facts(),
        "cni.binPath",
        Verdict::Fail,
    );
    assert!(
        x.observed.contains("runs CNI plugins from /opt/cni/bin"),
        "{}",
        x.observed
    );
}

#[test]
fn an_unrestricted_daemonset_warns_with_the_lines_that_restrict_it() {
    let text = with("nodeSelector:\n  cnishift.io/cni: cilium\n", "");
    let x = one(&text, &facts(), "nodeSelector", Verdict::Warn);
    assert_eq!(
        x.fix.as_deref(),
        Some("nodeSelector:\n  kubernetes.io/os: linux\n  cnishift.io/cni: cilium")
    );
    // Node affinity on the label restricts it too.
    let aff = "affinity:\n  nodeAffinity:\n    requiredDuringSchedulingIgnoredDuringExecution:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - key: cnishift.io/cni\n          operator: In\n          values: [cilium]\n";
    assert!(not_pass(&run(&format!("{text}{aff}"), &facts())).is_empty());
    // The runbook's `affinity: {}` does not.
    one(
        &format!("{text}affinity: {{}}\n"),
        &facts(),
        "nodeSelector",
        Verdict::Warn,
    );
}

#[test]
fn mtu_larger_than_an_uplink_fails_and_a_tailscale_path_warns() {
    let x = one(
        &format!("{BASE}MTU: 9000\n"),
        &facts(),
        "MTU",
        Verdict::Fail,
    );
    assert!(
        x.observed
            .contains("9000 is larger than ctl-a's eth0 (MTU 1500)"),
        "{}",
        x.observed
    );
    let mut f = facts();
    // w-1 is reached over Tailscale: its InternalIP is its tailscale0 address.
    f.nodes[1].internal_ip = Some("100.64.0.2".parse().unwrap());
    for n in &mut f.nodes {
        if let Ok(a) = &mut n.agent {
            let mut ts = link("tailscale0", 1280, &[]);
            ts.kind = Some("tun".into());
            ts.addresses = vec![if n.name == "w-1" {
                "100.64.0.2/32".into()
            } else {
                "100.64.0.9/32".into()
            }];
            a.links.push(ts);
            a.default_route = Some("eth0".into());
        }
    }
    // Direct routes need the shared subnet, so this cluster uses the tunnel.
    let text = with(
        "routingMode: native\nautoDirectNodeRoutes: true\n",
        "routingMode: tunnel\ntunnelPort: 8473\n",
    );
    let x = one(&text, &f, "MTU", Verdict::Warn);
    assert!(
        x.observed.contains("w-1's InternalIP is on tailscale0 (MTU 1280, a Tailscale interface)")
            && x.observed.contains("the nodes' MTUs differ (ctl-a 1500 on eth0, w-1 1280 on tailscale0, w-2 1500 on eth0)"),
        "{}",
        x.observed
    );
    assert!(x.fix.unwrap().starts_with("MTU: 1280"));
}

#[test]
fn unknown_top_level_keys_warn_with_the_nearest_known_key() {
    let x = one(
        &format!("{BASE}autoDirectNodeRoute: true\n"),
        &facts(),
        "autoDirectNodeRoute",
        Verdict::Warn,
    );
    assert_eq!(x.line, Some(12));
    assert!(
        x.observed
            .ends_with("the nearest key it has is autoDirectNodeRoutes"),
        "{}",
        x.observed
    );
}

#[test]
fn a_node_whose_agent_cannot_be_asked_fails_the_rules_that_need_it() {
    let mut f = facts();
    f.nodes[1].agent = Err("timed out: no report from 198.18.2.2:7443 within 3s".into());
    let fs = run(BASE, &f);
    let bad: Vec<(&str, Verdict)> = not_pass(&fs)
        .iter()
        .map(|x| (x.key.as_str(), x.verdict))
        .collect();
    assert_eq!(
        bad,
        [
            ("autoDirectNodeRoutes", Verdict::Fail),
            ("MTU", Verdict::Fail)
        ]
    );
    assert!(fs.iter().any(|x| x
        .observed
        .contains("w-1's agent could not be asked (timed out")));
}

#[test]
fn the_runbooks_own_values_fail_only_on_bpf_masquerade_and_warn_on_the_daemonset() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/cilium/helm-values.yaml"),
    )
    .or_else(|_| std::fs::read_to_string("/work/shared/fixtures/cilium/helm-values.yaml"));
    let Ok(text) = text else {
        eprintln!("SKIPPED: the runbook's helm-values.yaml is not beside the repository");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the runbook's values are missing"
        );
        return;
    };
    let text = text
        .replace("\"10.1.0.5\"", "\"198.18.2.254\"")
        .replace("10.42.0.0/16", "10.64.0.0/16");
    let fs = run(&text, &facts());
    let bad: Vec<(&str, Verdict, Option<usize>)> = not_pass(&fs)
        .iter()
        .map(|x| (x.key.as_str(), x.verdict, x.line))
        .collect();
    assert_eq!(
        bad,
        [
            ("bpf.masquerade", Verdict::Fail, Some(66)),
            ("nodeSelector", Verdict::Warn, None)
        ]
    );
}
