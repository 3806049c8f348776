//! Reports on fixture host roots built from the real aarch64 kernel configs in
//! ../shared/fixtures/kernel-configs (Armbian's, written by nobody here).

mod common;

use common::*;

const BASE: &[&str] = &[
    "BPF",
    "BPF_SYSCALL",
    "NET_CLS_BPF",
    "BPF_JIT",
    "NET_CLS_ACT",
    "NET_SCH_INGRESS",
    "CRYPTO_SHA1",
    "CRYPTO_USER_API_HASH",
    "CGROUPS",
    "CGROUP_BPF",
    "PERF_EVENTS",
    "SCHEDSTATS",
];

#[test]
fn rk3588_config_fails_schedstats() {
    let Some(cfg) = real_config("opi5plus-rk3588-armbian-6.12.config") else {
        return;
    };
    let f = Fixture::new();
    f.kernel(RK3588_RELEASE, "aarch64")
        .config_gz(&cfg)
        .modules_dep(RK3588_RELEASE, PI4_MODULES);
    f.meminfo(16_000_000, 15_000_000).good_sysctls();
    let (code, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.config.SCHEDSTATS"), "fail");
    assert!(message(&r, "kernel.config.SCHEDSTATS").contains("is not set"));
    assert_eq!(r["ready"], false);
    assert_eq!(code, 1, "not ready exits 1");
    // The value and its source are recorded as facts.
    assert_eq!(
        r["facts"]["kernel_config"]["options"]["SCHEDSTATS"],
        "unset"
    );
    assert_eq!(r["facts"]["kernel_config"]["source"], "/proc/config.gz");
    // Everything else on the base list is there (some as modules).
    for o in BASE.iter().filter(|o| **o != "SCHEDSTATS") {
        assert_eq!(verdict(&r, &format!("kernel.config.{o}")), "pass", "{o}");
    }
    assert_eq!(r["facts"]["kernel_config"]["options"]["NET_CLS_BPF"], "m");
    // Every line of a real config is understood (it has lower-case symbols).
    assert_eq!(
        verdict(&r, "kernel.config.file"),
        "pass",
        "{}",
        message(&r, "kernel.config.file")
    );
    assert_eq!(r["facts"]["kernel_config"]["malformed_count"], 0);
}

#[test]
fn pi4_config_passes_the_base_list() {
    let Some(cfg) = real_config("rpi4-bcm2711-armbian-6.6.64.config") else {
        return;
    };
    let (_, r) = fixture_report(&pi4_fixture(&cfg));
    for o in BASE {
        assert_eq!(
            verdict(&r, &format!("kernel.config.{o}")),
            "pass",
            "{o}: {}",
            message(&r, &format!("kernel.config.{o}"))
        );
    }
    // NET_SCH_INGRESS is =m on the Pi: it passes because the module is loadable.
    assert!(message(&r, "kernel.config.NET_SCH_INGRESS").contains("module sch_ingress is loadable"));
    assert_eq!(
        r["facts"]["modules"]["modules"]["sch_ingress"]["state"],
        "loadable"
    );
    assert_eq!(verdict(&r, "kernel.version"), "pass");
    assert_eq!(
        verdict(&r, "kernel.config.file"),
        "pass",
        "{}",
        message(&r, "kernel.config.file")
    );
    assert_eq!(r["facts"]["kernel"]["arch"], "aarch64");
    assert_eq!(r["node"], "raccoon00");
    // No failures at all: the live probes were skipped (warn), not failed.
    let fails: Vec<_> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .collect();
    assert!(fails.is_empty(), "{fails:#?}");
    assert_eq!(verdict(&r, "bpf.syscall"), "warn");
    assert_eq!(r["skipped_probes"].as_array().unwrap().len(), 3);
}

#[test]
fn pi4_config_with_bpf_jit_unset_fails_bpf_jit() {
    let Some(cfg) = real_config("rpi4-bcm2711-armbian-6.6.64.config") else {
        return;
    };
    assert!(cfg.contains("\nCONFIG_BPF_JIT=y\n"));
    let cfg = cfg.replace("\nCONFIG_BPF_JIT=y\n", "\n# CONFIG_BPF_JIT is not set\n");
    let (code, r) = fixture_report(&pi4_fixture(&cfg));
    assert_eq!(verdict(&r, "kernel.config.BPF_JIT"), "fail");
    assert!(check(&r, "kernel.config.BPF_JIT")["remediation"]
        .as_str()
        .unwrap()
        .contains("BPF_JIT"));
    assert_eq!(code, 1);
}

#[test]
fn a_module_option_without_its_module_is_not_a_pass() {
    let Some(cfg) = real_config("rpi4-bcm2711-armbian-6.6.64.config") else {
        return;
    };
    // The modules package is not installed: =m options cannot be verified.
    let f = Fixture::new();
    f.kernel(PI4_RELEASE, "aarch64")
        .config_gz(&cfg)
        .meminfo(3_884_000, 3_200_000);
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.config.NET_SCH_INGRESS"), "warn");
    assert!(message(&r, "kernel.config.NET_SCH_INGRESS").contains("cannot verify"));
    assert_eq!(
        verdict(&r, "kernel.config.BPF"),
        "pass",
        "=y options need no module"
    );

    // modules.dep exists but lacks sch_ingress: a base option is really missing.
    let without: Vec<&str> = PI4_MODULES
        .iter()
        .copied()
        .filter(|m| *m != "sch_ingress")
        .collect();
    f.modules_dep(PI4_RELEASE, &without);
    let (code, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.config.NET_SCH_INGRESS"), "fail");
    assert_eq!(verdict(&r, "module.sch_ingress"), "fail");
    assert_eq!(code, 1);

    // ...but a loaded module counts even when modules.dep is silent.
    f.write(
        "proc/modules",
        "sch_ingress 16384 0 - Live 0x0000000000000000\n",
    );
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.config.NET_SCH_INGRESS"), "pass");
    assert_eq!(
        r["facts"]["modules"]["modules"]["sch_ingress"]["state"],
        "loaded"
    );
}

#[test]
fn config_sources_are_tried_in_order() {
    let f = Fixture::new();
    f.kernel("6.6.1", "aarch64");
    f.write("lib/modules/6.6.1/config", "CONFIG_BPF=y\n");
    let (_, r) = fixture_report(&f);
    assert_eq!(
        r["facts"]["kernel_config"]["source"],
        "/lib/modules/6.6.1/config"
    );
    f.write("boot/config-6.6.1", "# CONFIG_BPF is not set\n");
    let (_, r) = fixture_report(&f);
    assert_eq!(r["facts"]["kernel_config"]["source"], "/boot/config-6.6.1");
    assert_eq!(verdict(&r, "kernel.config.BPF"), "fail");
    f.config_gz("CONFIG_BPF=y\n");
    let (_, r) = fixture_report(&f);
    assert_eq!(r["facts"]["kernel_config"]["source"], "/proc/config.gz");
    assert_eq!(verdict(&r, "kernel.config.BPF"), "pass");
}

#[test]
fn kernel_version_limits() {
    let f = Fixture::new();
    f.kernel("5.4.0-1", "aarch64");
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.version"), "fail");
    f.kernel("5.15.0", "aarch64");
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.version"), "warn");
    assert!(message(&r, "kernel.version").contains("multicast"));
    f.kernel("5.15.0", "x86_64");
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.version"), "pass");
}

#[test]
fn k3s_server_flags_from_process_config_and_nixos_unit() {
    let f = Fixture::new();
    f.kernel("6.18.0", "aarch64");
    // A running k3s server with Flannel (default backend).
    f.write(
        "proc/4242/cmdline",
        b"/usr/local/bin/k3s\0server\0--cluster-init\0",
    );
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "k3s.flags"), "warn");
    assert!(
        message(&r, "k3s.flags").contains("flannel-backend=vxlan"),
        "{}",
        message(&r, "k3s.flags")
    );
    assert_eq!(r["facts"]["k3s"]["role"], "server");

    // The flags set in config.yaml are in effect for the running process.
    f.write(
        "etc/rancher/k3s/config.yaml",
        "flannel-backend: none\ndisable-network-policy: true\n",
    );
    let (_, r) = fixture_report(&f);
    assert_eq!(
        verdict(&r, "k3s.flags"),
        "pass",
        "{}",
        message(&r, "k3s.flags")
    );

    // A NixOS unit (a symlink into the store, re-rooted under the host root)
    // whose ExecStart would bring Flannel back with a command-line override.
    f.write(
        "nix/store/abc-unit-k3s.service/k3s.service",
        "[Service]\nExecStart=/nix/store/xyz-k3s/bin/k3s server \\\n  --flannel-backend=vxlan\n",
    );
    f.mkdir("etc/systemd/system");
    std::os::unix::fs::symlink(
        "/nix/store/abc-unit-k3s.service/k3s.service",
        f.root().join("etc/systemd/system/k3s.service"),
    )
    .unwrap();
    let (_, r) = fixture_report(&f);
    assert_eq!(
        r["facts"]["k3s"]["unit"]["path"],
        "/etc/systemd/system/k3s.service"
    );
    assert_eq!(verdict(&r, "k3s.flags"), "warn");
    assert!(
        message(&r, "k3s.flags").contains("restart"),
        "{}",
        message(&r, "k3s.flags")
    );
}

#[test]
fn k3s_agent_nodes_follow_their_server() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    f.write("proc/77/cmdline", "/usr/local/bin/k3s agent");
    let (_, r) = fixture_report(&f);
    assert_eq!(r["facts"]["k3s"]["role"], "agent");
    assert_eq!(verdict(&r, "k3s.flags"), "pass");
}

#[test]
fn flannel_cni_files_and_which_config_wins() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    let k3s_dir = "var/lib/rancher/k3s/agent/etc/cni/net.d";
    f.write(&format!("{k3s_dir}/10-flannel.conflist"), r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel","delegate":{"hairpinMode":true}},{"type":"portmap"}]}"#);
    f.write(
        "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
        r#"{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    f.write("run/flannel/subnet.env", "FLANNEL_NETWORK=10.42.0.0/16\n");
    f.mkdir("var/lib/cni/networks/cbr0");
    f.write(
        "etc/cni/net.d/05-cilium.conflist",
        r#"{"name":"cilium","plugins":[{"type":"cilium-cni"}]}"#,
    );
    f.write("etc/cni/net.d/99-other.conflist", "{ this is not json");
    f.write("proc/1/cmdline", b"/usr/local/bin/k3s\0server\0");
    let (_, r) = fixture_report(&f);
    // Flannel's backend is in effect, so containerd reads k3s's own dir.
    assert!(
        message(&r, "cni.active").contains("10-flannel.conflist (Flannel"),
        "{}",
        message(&r, "cni.active")
    );
    assert_eq!(verdict(&r, "flannel.file.10-flannel.conflist"), "warn");
    assert_eq!(verdict(&r, "flannel.file.net-conf.json"), "warn");
    assert_eq!(verdict(&r, "flannel.file.subnet.env"), "warn");
    assert_eq!(verdict(&r, "flannel.file.cni-networks-cbr0"), "warn");
    assert_eq!(verdict(&r, "flannel.file.cni-flannel"), "pass");
    assert_eq!(verdict(&r, "cni.file.99-other.conflist"), "warn");
    assert!(message(&r, "cni.file.99-other.conflist").contains("not valid JSON"));

    // With Flannel off, /etc/cni/net.d is read and Cilium's config wins.
    f.write(
        "etc/rancher/k3s/config.yaml",
        "flannel-backend: none\ndisable-network-policy: true\n",
    );
    let (_, r) = fixture_report(&f);
    assert!(
        message(&r, "cni.active").contains("05-cilium.conflist (Cilium"),
        "{}",
        message(&r, "cni.active")
    );
}
