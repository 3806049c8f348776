//! `cnishift-lab rehearse` of other clusters than the seed (issue 15): the
//! seed's 9 nodes and the cluster renamed (examples/renamed.toml), and the
//! smallest shape, 1 controller + 2 workers (examples/small.toml), with the
//! example files exactly as a person would pass them. Each must exit 0 with
//! every node migrated, verified and clean, and leave nothing behind.
//!
//! (The seed itself, examples/avalanche.toml, is the README's first command:
//! lab_migrate.rs runs its migration and verify end to end, and
//! tests/benches/rehearse.rs times its rehearsal.)

use std::path::Path;
use std::process::Command;

use cnishift_lab::harness::{lab_bin, text};
use cnishift_lab::require_root;
use serde_json::Value;

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Node names in inventory order, from the example itself.
fn names(inventory: &Path) -> Vec<String> {
    let t: toml::Table = toml::from_str(&std::fs::read_to_string(inventory).unwrap()).unwrap();
    t["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

fn rehearse_passes(file: &str) {
    let inv = example(file);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let o = Command::new(lab_bin())
        .arg("rehearse")
        .arg("-i")
        .arg(&inv)
        .arg("--dir")
        .arg(&dir)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "rehearse -i {file}:\n{}",
        text(&o)
    );
    let s: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(s["ok"], true, "{s:#}");
    for stage in ["preflight", "migrate", "verify"] {
        assert_eq!(s[stage]["exit_code"], 0, "{stage}: {s:#}");
    }
    let want = names(&inv);
    let got: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(got, want, "{s:#}");
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["outcome"], "migrated", "{s:#}");
        let steps: Vec<&str> = n["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|st| st[0].as_str().unwrap())
            .collect();
        assert_eq!(steps.first(), Some(&"preflight"), "{n}");
        assert_eq!(steps.last(), Some(&"done"), "{n}");
        assert_eq!(steps.len(), 12, "{n}");
    }
    let cluster: Vec<&str> = s["cluster_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st[0].as_str().unwrap())
        .collect();
    assert_eq!(
        cluster,
        ["backup", "etcd-snapshot", "verify-cluster", "cleanup"],
        "{s:#}"
    );
    // Torn down: `down` ran (it removes lab.json last) and no process of
    // the lab (supervisor, agents, hooks: all name DIR) is left.
    assert!(!dir.join("lab.json").exists(), "the lab was not torn down");
    let needle = dir.display().to_string();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(!cmd.contains(&needle), "left running: {cmd}");
    }
}

#[test]
fn the_seed_renamed_and_a_one_controller_two_worker_cluster_rehearse_clean() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    std::thread::scope(|s| {
        let a = s.spawn(|| rehearse_passes("renamed.toml"));
        let b = s.spawn(|| rehearse_passes("small.toml"));
        let (a, b) = (a.join(), b.join());
        if let Err(e) = a {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = b {
            std::panic::resume_unwind(e);
        }
    });
}
