//! Budget benchmark for `cnishift migrate` in the lab: the seed's 9 nodes
//! migrated by the real binaries from this machine's namespace.
//!
//! - coordinator overhead per node: the node's wall time (its Preflight
//!   started → its Done) minus what the cluster imposes (the deploy hook, the
//!   wait for Cilium and Ready, Repod's wait for recreated pods); median over
//!   the nodes; budget 0.5 s;
//! - the coordinator's peak RSS during the run; budget 40 MiB;
//! - resume after SIGKILL: a run killed right after a worker's Deploy, started
//!   again — from its start to its first step event; budget 1 s.
//!
//! Run (as root) with the release binaries, the ones the budget is about:
//!
//! ```sh
//! cargo build --release -p cnishift -p cnishift-agent -p cnishift-lab
//! CNISHIFT_BIN=$PWD/target/release/cnishift CNISHIFT_AGENT_BIN=$PWD/target/release/cnishift-agent \
//!   CNISHIFT_LAB_BIN=$PWD/target/release/cnishift-lab \
//!   cargo bench -p cnishift-lab --bench migrate_lab --profile dev
//! ```
//!
//! (the bench itself only drives and times them, so it is built in the dev
//! profile; without the three variables it uses the binaries beside it, the
//! debug ones). It prints which binaries it ran. Exits 1 when a budget is
//! missed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnishift_lab::harness::{cnishift_bin, Up, RENAMED};

const BUDGET_OVERHEAD: Duration = Duration::from_millis(500);
const BUDGET_RSS_KIB: u64 = 40 * 1024;
const BUDGET_RESUME: Duration = Duration::from_secs(1);
/// Steps whose time is the cluster's, not the coordinator's.
const IMPOSED: &[&str] = &["deploy", "wait-cilium-ready", "repod"];

fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn migrate(lab: &Up, state: &std::path::Path) -> Command {
    let mut c = Command::new(cnishift_bin());
    c.args(["migrate", "-o", "json", "--state-dir"])
        .arg(state)
        .env("CNISHIFT_INVENTORY", lab.cluster_toml())
        .env("KUBECONFIG", lab.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("migrate_lab: needs root (network namespaces)");
        std::process::exit(2);
    }
    for (what, var) in [
        ("cnishift", "CNISHIFT_BIN"),
        ("cnishift-agent", "CNISHIFT_AGENT_BIN"),
        ("cnishift-lab", "CNISHIFT_LAB_BIN"),
    ] {
        let p = cnishift_lab::cluster::binary(what, var).expect(what);
        println!("binary {what}: {}", p.display());
    }
    // 1. The seed cluster, end to end.
    let lab = Up::seed(&[]);
    let state = lab.dir.join("migrate-state");
    let start = Instant::now();
    let mut child = migrate(&lab, &state).spawn().expect("cnishift migrate");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| {
                (
                    Instant::now(),
                    serde_json::from_str::<serde_json::Value>(&l).expect("a JSON event"),
                )
            })
            .collect::<Vec<_>>()
    });
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(vm_hwm(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = start.elapsed();
    let status = child.wait().unwrap();
    let events = reader.join().unwrap();
    assert!(status.success(), "migrate failed");
    // Per node: first event → done, minus the imposed steps' elapsed.
    let mut spans: BTreeMap<String, (Instant, Instant, Duration)> = BTreeMap::new();
    for (at, e) in &events {
        let Some(node) = e["node"].as_str() else {
            continue;
        };
        let entry = spans
            .entry(node.to_string())
            .or_insert((*at, *at, Duration::ZERO));
        entry.1 = *at;
        let step = e["step"].as_str().unwrap_or("");
        if e["phase"] != "started" && IMPOSED.contains(&step) {
            entry.2 += Duration::from_millis(e["elapsed_ms"].as_u64().unwrap_or(0));
        }
    }
    let mut overhead: Vec<Duration> = spans
        .values()
        .map(|(a, b, imposed)| b.duration_since(*a).saturating_sub(*imposed))
        .collect();
    overhead.sort();
    let median = overhead[overhead.len() / 2];
    let totals: Vec<Duration> = spans
        .values()
        .map(|(a, b, _)| b.duration_since(*a))
        .collect();
    drop(lab);

    // 2. Killed right after a worker's Deploy, then resumed.
    let small = Up::new(RENAMED, &[]);
    let state = small.dir.join("migrate-state");
    let mut child = migrate(&small, &state).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = lines
            .next()
            .expect("migrate ended before w-1's deploy")
            .unwrap();
        let e: serde_json::Value = serde_json::from_str(&l).unwrap();
        if e["node"] == "w-1" && e["step"] == "deploy" && e["phase"] == "done" {
            break;
        }
    }
    child.kill().unwrap();
    let _ = child.wait();
    let t = Instant::now();
    let mut again = migrate(&small, &state).spawn().unwrap();
    let mut lines = BufReader::new(again.stdout.take().unwrap()).lines();
    let first = lines.next().expect("an event").unwrap();
    let back = t.elapsed();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let ok = again.wait().unwrap().success();
    assert!(ok, "the resumed run failed");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let deploys_after = rest
        .iter()
        .filter(|l| l.contains("\"node\":\"w-1\"") && l.contains("\"step\":\"deploy\""))
        .count();
    // Down before any exit below (process::exit runs no Drop).
    drop(small);

    println!(
        "migrate, 9 seed nodes: wall {:.1} s; per node {:.2}..{:.2} s",
        wall.as_secs_f64(),
        totals.iter().min().unwrap().as_secs_f64(),
        totals.iter().max().unwrap().as_secs_f64()
    );
    println!(
        "coordinator overhead per node (all but {}): median {} ms, min {} ms, max {} ms; budget {} ms → {:.2}×",
        IMPOSED.join(", "),
        median.as_millis(),
        overhead[0].as_millis(),
        overhead[overhead.len() - 1].as_millis(),
        BUDGET_OVERHEAD.as_millis(),
        median.as_secs_f64() / BUDGET_OVERHEAD.as_secs_f64()
    );
    println!(
        "coordinator peak RSS: {peak} KiB; budget {BUDGET_RSS_KIB} KiB → {:.2}×",
        peak as f64 / BUDGET_RSS_KIB as f64
    );
    println!(
        "resume after SIGKILL (after w-1's deploy): first step event in {} ms ({} {} {}); budget {} ms → {:.2}×; w-1's deploy run again: {}",
        back.as_millis(),
        first["node"],
        first["step"],
        first["phase"],
        BUDGET_RESUME.as_millis(),
        back.as_secs_f64() / BUDGET_RESUME.as_secs_f64(),
        deploys_after > 0
    );
    if median > BUDGET_OVERHEAD || peak > BUDGET_RSS_KIB || back > BUDGET_RESUME {
        eprintln!("BUDGET MISSED");
        std::process::exit(1);
    }
}
