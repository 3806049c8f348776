//! The report on this machine's real kernel, checked against sources the
//! agent does not use: uname, stat -f, bpftool, and interfaces and iptables
//! chains created for real in a fresh network namespace.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::*;
use serde_json::Value;

fn live_report() -> (i32, Value) {
    report_json(&[])
}

#[test]
fn live_report_matches_uname_and_has_a_verdict_for_every_check() {
    let (code, r) = live_report();
    assert_eq!(r["facts"]["kernel"]["release"], sh("uname", &["-r"]));
    assert_eq!(r["facts"]["kernel"]["arch"], sh("uname", &["-m"]));
    assert_eq!(r["agent"]["build_arch"], std::env::consts::ARCH);
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.len() > 60, "only {} checks", checks.len());
    let mut ids = HashSet::new();
    for c in checks {
        let id = c["id"].as_str().unwrap();
        assert!(ids.insert(id), "duplicate check id {id}");
        assert!(
            ["pass", "warn", "fail"].contains(&c["verdict"].as_str().unwrap()),
            "{id}"
        );
        assert!(
            !c["message"].as_str().unwrap().is_empty(),
            "{id} has no message"
        );
        if c["verdict"] != "pass" {
            // Every non-pass either says what to do or says what it could not see.
            let msg = c["message"].as_str().unwrap();
            assert!(
                c["remediation"].is_string()
                    || msg.contains("cannot")
                    || msg.contains("not probed"),
                "{id}: {msg}"
            );
        }
    }
    let fails = checks.iter().filter(|c| c["verdict"] == "fail").count();
    assert_eq!(r["ready"], fails == 0);
    assert_eq!(code, if fails == 0 { 0 } else { 1 });
    for id in [
        "kernel.version",
        "kernel.config.BPF_JIT",
        "bpf.jit",
        "bpf.fs",
        "bpf.prog.sched_cls",
        "bpf.map.lpm_trie",
        "module.br_netfilter",
        "sysctl.net.ipv4.ip_forward",
        "flannel.interface.cni0",
        "k3s.flags",
    ] {
        assert!(ids.contains(id), "missing stable id {id}");
    }
}

#[test]
fn live_jit_and_bpffs_match_the_kernel() {
    if !require_root("loading BPF programs") {
        return;
    }
    let (_, r) = live_report();
    let enable = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .unwrap()
        .trim()
        .to_string();
    let jit = &r["facts"]["bpf"]["jit"];
    assert_eq!(jit["bpf_jit_enable"].to_string(), enable);
    assert_eq!(jit["xlated_len"], 16, "two eBPF instructions are 16 bytes");
    if enable == "1" || enable == "2" {
        assert!(jit["jited_len"].as_u64().unwrap() > 0);
        assert_eq!(verdict(&r, "bpf.jit"), "pass");
    } else {
        assert_eq!(verdict(&r, "bpf.jit"), "fail", "the JIT is off");
    }
    // stat(1) reads the filesystem type independently.
    let fstype = sh("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]);
    let mounted = r["facts"]["bpf"]["mounts"]["bpffs_at_sys_fs_bpf"]
        .as_bool()
        .unwrap();
    assert_eq!(mounted, fstype == "bpf_fs", "stat says {fstype}");
    assert_eq!(verdict(&r, "bpf.fs"), if mounted { "pass" } else { "warn" });
    let cgroup2 = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    assert_eq!(
        verdict(&r, "bpf.cgroup2"),
        if cgroup2 { "pass" } else { "warn" }
    );
}

#[test]
fn live_program_and_map_types_agree_with_bpftool() {
    if !require_root("bpftool feature probe") {
        return;
    }
    let Ok(out) = Command::new("bpftool")
        .args(["-j", "feature", "probe", "kernel"])
        .output()
    else {
        assert!(!in_ci(), "CI=true but bpftool is not installed");
        eprintln!("SKIPPED: bpftool is not installed (apt-get install bpftool)");
        return;
    };
    let probe: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let (_, r) = live_report();
    let mut compared = 0;
    for (section, key_fmt, facts) in [
        (
            "program_types",
            "have_{}_prog_type",
            &r["facts"]["bpf"]["programs"],
        ),
        ("map_types", "have_{}_map_type", &r["facts"]["bpf"]["maps"]),
    ] {
        for (name, state) in facts.as_object().unwrap() {
            let key = key_fmt.replace("{}", name);
            let theirs = probe[section][&key]
                .as_bool()
                .unwrap_or_else(|| panic!("bpftool has no {section}.{key}"));
            let ours = state["state"] == "supported";
            assert_eq!(
                ours, theirs,
                "{name}: agent says {state}, bpftool says {theirs}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 16);
}

#[test]
fn bpffs_mounted_in_a_private_mount_namespace_passes() {
    if !require_root("mounting bpffs in a private mount namespace") {
        return;
    }
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && exec {} report --json",
        agent_bin()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(verdict(&r, "bpf.fs"), "pass");
    assert!(r["facts"]["bpf"]["mounts"]["bpffs_mounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "/sys/fs/bpf"));
}

#[test]
fn flannel_leftovers_in_a_real_network_namespace() {
    if !require_root("creating network namespaces") {
        return;
    }
    let ns = Netns::new("flannel");
    for cmd in [
        // This test kernel may lack the dummy and wireguard link types; veth is universal.
        "ip link add eth0 type veth peer name eth0peer",
        "ip link set eth0 up",
        "ip addr add 192.0.2.10/24 dev eth0",
        "ip link set eth0 mtu 1400",
        "ip route add default via 192.0.2.1 dev eth0",
        "ip link add flannel.1 type vxlan id 1 dstport 8472 dev eth0 nolearning",
        "ip link set flannel.1 up",
        "ip addr add 10.42.0.0/32 dev flannel.1",
        // The route Flannel installs for each peer node.
        "ip route add 10.42.1.0/24 via 10.42.1.0 dev flannel.1 onlink",
        "ip link add cni0 type bridge",
        "ip link add vethpod1 type veth peer name eth0pod1",
        "ip link set vethpod1 master cni0",
        "ip link add cni1 type bridge",
        "ip link add flannel-wg type veth peer name flannel-wgp",
    ] {
        ns.run(cmd);
    }
    let iptables = Command::new("iptables").arg("--version").output().is_ok();
    if iptables {
        for cmd in [
            "iptables -t filter -N FLANNEL-FWD",
            "iptables -t filter -A FORWARD -j FLANNEL-FWD",
            "iptables -t nat -N FLANNEL-POSTRTG",
            "iptables -t filter -N FLANNELX",
        ] {
            ns.run(cmd);
        }
    } else {
        assert!(!in_ci(), "CI=true but iptables is not installed");
        eprintln!("SKIPPED part: iptables is not installed");
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, &agent_bin(), "report", "--json"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let net = &r["facts"]["network"];
    assert_eq!(net["flannel_interfaces"]["flannel.1"]["kind"], "vxlan");
    assert_eq!(net["flannel_interfaces"]["cni0"]["kind"], "bridge");
    assert_eq!(net["cni0_members"], serde_json::json!(["vethpod1"]));
    assert!(
        net["flannel_interfaces"].get("cni1").is_none()
            && net["flannel_interfaces"].get("eth0").is_none()
    );
    assert_eq!(verdict(&r, "flannel.interface.flannel.1"), "warn");
    assert!(message(&r, "flannel.interface.cni0").contains("1 attached pod interfaces"));
    assert_eq!(verdict(&r, "flannel.interface.flannel-wg"), "warn");
    assert_eq!(verdict(&r, "flannel.interface.flannel-v6.1"), "pass");
    assert!(
        message(&r, "flannel.routes").contains("10.42.1.0/24 dev flannel.1"),
        "{}",
        message(&r, "flannel.routes")
    );
    assert!(net["cilium_interfaces"].as_object().unwrap().is_empty());
    // Links with MTUs, addresses and the VXLAN port, for `cnishift values check`.
    let link = |name: &str| {
        net["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no link {name}: {net:#}"))
    };
    assert_eq!(link("eth0")["mtu"], 1400);
    assert_eq!(link("eth0")["addresses"][0], "192.0.2.10/24");
    assert_eq!(link("flannel.1")["vxlan_port"], 8472);
    assert_eq!(link("flannel.1")["addresses"][0], "10.42.0.0/32");
    assert!(link("eth0")["vxlan_port"].is_null());
    assert_eq!(net["default_route"], "eth0");
    assert!(
        !net["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "vethpod1"),
        "pod veths on cni0 are not listed again"
    );
    if iptables {
        let msg = message(&r, "iptables.flannel");
        assert!(
            msg.contains("filter/FLANNEL-FWD") && msg.contains("nat/FLANNEL-POSTRTG"),
            "{msg}"
        );
        assert!(
            !msg.contains("FLANNELX"),
            "a look-alike chain is not Flannel's: {msg}"
        );
        assert_eq!(verdict(&r, "iptables.kube-router"), "pass");
    }
}

#[test]
fn a_clean_namespace_has_no_flannel_leftovers() {
    if !require_root("creating network namespaces") {
        return;
    }
    let ns = Netns::new("clean");
    // Cilium's own cilium_host/cilium_net are a veth pair.
    ns.run("ip link add cilium_host type veth peer name cilium_net");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, &agent_bin(), "report", "--json"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["flannel.1", "cni0", "flannel-wg", "kube-ipvs0"] {
        assert_eq!(
            verdict(&r, &format!("flannel.interface.{name}")),
            "pass",
            "{name}"
        );
    }
    assert_eq!(verdict(&r, "flannel.routes"), "pass");
    assert_eq!(
        r["facts"]["network"]["cilium_interfaces"]["cilium_host"]["kind"],
        "veth"
    );
    assert_eq!(
        r["facts"]["network"]["cilium_interfaces"]["cilium_net"]["kind"],
        "veth"
    );
}
