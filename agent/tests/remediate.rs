//! `cnishift-agent remediate`: the sysctls the report flags and the modules it
//! could load, dry run by default, and for real inside a network namespace.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn remediate(root: &std::path::Path, extra: &[&str]) -> (Option<i32>, Value) {
    let out = agent_command()
        .args(["remediate", "-o", "json", "--no-live-probes", "--host-root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout))),
    )
}

fn step<'a>(steps: &'a Value, id: &str) -> &'a Value {
    steps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["check_id"] == id)
        .unwrap_or_else(|| panic!("no step {id}: {steps:#}"))
}

#[test]
fn sysctls_are_planned_then_set_and_the_report_agrees() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64").good_sysctls();
    f.write("proc/sys/net/ipv4/ip_forward", "0\n");
    f.write("proc/sys/net/ipv4/conf/all/rp_filter", "2\n");
    let (code, steps) = remediate(f.root(), &[]);
    assert_eq!(code, Some(0));
    let s = step(&steps, "sysctl.net.ipv4.ip_forward");
    assert_eq!(s["action"], "net.ipv4.ip_forward: 0 -> 1");
    assert_eq!(
        s["permanent"],
        "boot.kernel.sysctl.\"net.ipv4.ip_forward\" = 1;"
    );
    assert!(s["outcome"].is_null(), "a dry run does nothing");
    assert_eq!(
        step(&steps, "sysctl.net.ipv4.conf.all.rp_filter")["action"],
        "net.ipv4.conf.all.rp_filter: 2 -> 0"
    );
    assert_eq!(
        steps.as_array().unwrap().len(),
        2,
        "only what the report flags: {steps:#}"
    );
    assert_eq!(
        std::fs::read_to_string(f.root().join("proc/sys/net/ipv4/ip_forward")).unwrap(),
        "0\n"
    );

    let (code, steps) = remediate(f.root(), &["--apply"]);
    assert_eq!(code, Some(0), "{steps:#}");
    assert!(
        step(&steps, "sysctl.net.ipv4.ip_forward")["ok"] == true,
        "{steps:#}"
    );
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "sysctl.net.ipv4.ip_forward"), "pass");
    assert_eq!(verdict(&r, "sysctl.net.ipv4.conf.all.rp_filter"), "pass");
    let (_, steps) = remediate(f.root(), &[]);
    assert!(
        steps.as_array().unwrap().is_empty(),
        "nothing left to do: {steps:#}"
    );
}

#[test]
fn modules_load_only_into_the_running_kernel() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64")
        .config_gz("CONFIG_MODULES=y\nCONFIG_BRIDGE_NETFILTER=m\n")
        .modules_dep("6.6.64", &["br_netfilter"])
        .good_sysctls();
    let (_, steps) = remediate(f.root(), &[]);
    assert_eq!(
        step(&steps, "module.br_netfilter")["action"],
        "modprobe br_netfilter"
    );
    let (code, steps) = remediate(f.root(), &["--apply"]);
    assert_eq!(code, Some(1), "a failed step exits 1");
    let err = step(&steps, "module.br_netfilter")["outcome"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("modules load only into the running kernel"),
        "{err}"
    );
}

#[test]
fn a_sysctl_that_does_not_exist_is_a_step_error_not_a_created_file() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64").good_sysctls();
    std::fs::remove_file(f.root().join("proc/sys/net/bridge/bridge-nf-call-iptables")).unwrap();
    let (code, steps) = remediate(f.root(), &["--apply"]);
    assert_eq!(code, Some(1));
    let err = step(&steps, "sysctl.net.bridge.bridge-nf-call-iptables")["outcome"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("does not exist (load its module first)"),
        "{err}"
    );
    assert!(
        !f.root()
            .join("proc/sys/net/bridge/bridge-nf-call-iptables")
            .exists(),
        "remediation never invents a sysctl"
    );
}

#[test]
fn live_sysctls_in_a_network_namespace() {
    if !require_root("network namespaces") {
        return;
    }
    // net.ipv4 sysctls are per network namespace: this changes nothing outside it.
    let ns = Netns::new("remediate");
    let host_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                &agent_bin(),
                "remediate",
                "-o",
                "json",
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        )
    };
    let read = |key: &str| ns.run(&format!("cat /proc/sys/{}", key.replace('.', "/")));
    assert_eq!(
        read("net.ipv4.ip_forward"),
        "0",
        "a fresh namespace does not forward"
    );
    let (_, steps) = run(&[]);
    assert_eq!(
        step(&steps, "sysctl.net.ipv4.ip_forward")["action"],
        "net.ipv4.ip_forward: 0 -> 1"
    );
    let (_, steps) = run(&["--apply"]);
    assert!(
        step(&steps, "sysctl.net.ipv4.ip_forward")["ok"] == true,
        "{steps:#}"
    );
    assert_eq!(read("net.ipv4.ip_forward"), "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_before,
        "the machine itself is untouched"
    );
}
