//! `cnishift migrate` end to end in the lab: the seed's 9 nodes, from this
//! machine's namespace, with the real binaries, observed through the real
//! `cnishift` and the machine's `kubectl`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnishift_lab::harness::{cnishift_bin, text, Up};
use cnishift_lab::require_root;

const SEED: [&str; 9] = [
    "opi01",
    "opi02",
    "opi03",
    "raccoon00",
    "raccoon01",
    "raccoon02",
    "raccoon03",
    "raccoon04",
    "raccoon05",
];

/// Peak RSS (KiB) of a running process, from /proc.
fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn the_seed_cluster_migrates_end_to_end_and_is_verified_and_clean() {
    if !require_root("cnishift migrate in the lab") {
        return;
    }
    let lab = Up::seed(&[]);
    // An admin had cordoned raccoon02 before the migration: it must stay so.
    lab.kubectl_ok(&["cordon", "raccoon02"]);
    let state = lab.dir.join("migrate-state");
    let start = Instant::now();
    let mut child = Command::new(cnishift_bin())
        .args(["migrate", "-o", "json", "--state-dir"])
        .arg(&state)
        .env("CNISHIFT_INVENTORY", lab.cluster_toml())
        .env("KUBECONFIG", lab.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(vm_hwm(pid).unwrap_or(0));
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "migrate still running after 240 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    eprintln!("migrate of 9 nodes: {took:?}, coordinator peak RSS {peak} KiB");
    assert!(out.status.success(), "migrate failed:\n{}", text(&out));

    // One JSON event per transition; every node went through every step, in order.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let done: Vec<String> = events
        .iter()
        .filter(|e| e["step"] == "done" && e["phase"] == "done")
        .map(|e| e["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        done, SEED,
        "controllers first, in inventory order, then workers"
    );
    for e in &events {
        for k in [
            "time",
            "run",
            "step",
            "phase",
            "elapsed_ms",
            "deadline_ms",
            "detail",
        ] {
            assert!(!e[k].is_null(), "event without {k}: {e}");
        }
        // The cluster-wide steps are the only ones without a node (the
        // backup before the first node, the etcd snapshot, verify-cluster
        // and cleanup after the last).
        let cluster_step = ["backup", "etcd-snapshot", "verify-cluster", "cleanup"]
            .contains(&e["step"].as_str().unwrap());
        assert_eq!(e["node"].is_null(), cluster_step, "{e}");
    }

    // The controllers' etcd was snapshotted before the first one was cordoned.
    let at = |step: &str, node: Option<&str>, phase: &str| {
        events
            .iter()
            .position(|e| {
                e["step"] == step
                    && e["phase"] == phase
                    && node.map_or(e["node"].is_null(), |n| e["node"] == n)
            })
            .unwrap_or_else(|| panic!("no {step} {node:?} {phase}"))
    };
    assert!(at("etcd-snapshot", None, "done") < at("cordon", Some("opi01"), "started"));

    // Every node Ready, labelled, uncordoned — but the admin's cordon stays.
    let nodes: serde_json::Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    for n in nodes["items"].as_array().unwrap() {
        let name = n["metadata"]["name"].as_str().unwrap();
        let ready = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{name} is not Ready");
        assert_eq!(
            n["metadata"]["labels"]["cnishift.io/cni"], "cilium",
            "{name} is not labelled"
        );
        let cordoned = n["spec"]["unschedulable"] == true;
        assert_eq!(
            cordoned,
            name == "raccoon02",
            "{name}: cordoned = {cordoned}"
        );
    }

    // No pod left on Flannel: every pod the drain left was recreated.
    let pods: serde_json::Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "pods", "-A", "-o", "json"])).unwrap();
    for p in pods["items"].as_array().unwrap() {
        let name = p["metadata"]["name"].as_str().unwrap();
        let ready = p["status"]["conditions"]
            .as_array()
            .map(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .unwrap_or(false);
        assert!(
            ready || p["status"]["phase"] == "Succeeded",
            "pod {name} not Ready"
        );
    }

    // `cnishift verify`: migrated verdicts from every agent (Cilium's conflist,
    // cilium_host/cilium_net up, /v1/healthz Ok, nothing on cni0), the VIP from
    // every node, and nothing of Flannel left after the cleanup.
    let v = lab.cnishift(&["verify", "-o", "json"]);
    assert!(v.status.success(), "verify failed:\n{}", text(&v));
    let verdict: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let body = verdict.to_string();
    assert!(!body.contains("\"fail\""), "{verdict:#}");

    // `kubectl describe node` tells the story.
    let d = lab.kubectl_ok(&["describe", "node", "raccoon04"]);
    for reason in [
        "MigrationCordoned",
        "MigrationDrained",
        "MigrationCiliumReady",
        "MigrationUncordoned",
    ] {
        assert!(d.contains(reason), "no {reason} Event on raccoon04:\n{d}");
    }

    // A second run has nothing left to do.
    let again = lab.cnishift(&["migrate", "--state-dir", state.to_str().unwrap()]);
    assert!(again.status.success(), "{}", text(&again));
}
