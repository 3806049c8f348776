//! Budget benchmark for the README's first command (issue 15), with the
//! release binaries it builds:
//!
//! - `cnishift-lab up -i examples/avalanche.toml` until it returns (every
//!   agent listening, the API server holding the nodes and the workload);
//!   budget 10 s;
//! - the clean 9-node rehearsal, `cnishift-lab rehearse -i
//!   examples/avalanche.toml`, wall time of the whole process (up, the real
//!   `cnishift preflight`, `migrate` with its cleanup, `verify`, down); budget
//!   30 s;
//! - per-node coordinator overhead, reported (its budget, 0.5 s, is `cnishift
//!   migrate`'s): from the rehearsal's own summary, each node's wall time
//!   (first step started → Done, as the rehearsal saw the events) minus what
//!   the cluster imposes (the deploy hook, the wait for Cilium and Ready,
//!   Repod's wait for recreated pods); the median over the 9 nodes.
//!
//! Medians of ROUNDS rounds (default 3; UP_ROUNDS for `up`, default 5), each
//! beside the 1-minute load average before and after it, because this machine
//! is shared. Run (as root):
//!
//! ```sh
//! cargo build --release --workspace
//! cargo bench -p cnishift-lab --bench rehearse --profile dev    # the bench itself need not be optimised
//! ```
//!
//! It runs target/release/{cnishift-lab,cnishift,cnishift-agent} (or
//! CNISHIFT_LAB_BIN / CNISHIFT_BIN / CNISHIFT_AGENT_BIN), and exits 1 when
//! the `up` or the rehearsal budget is missed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BUDGET_UP: Duration = Duration::from_secs(10);
const BUDGET_REHEARSAL: Duration = Duration::from_secs(30);
const BUDGET_OVERHEAD: Duration = Duration::from_millis(500);
/// Steps whose time is the cluster's, not the coordinator's.
const IMPOSED: &[&str] = &["deploy", "wait-cilium-ready", "repod"];

fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn release(name: &str, env: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/release")
            .join(name)
    });
    if !p.is_file() {
        eprintln!(
            "rehearse bench: {} not found; `cargo build --release --workspace` first (or set {env})",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn rounds(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("rehearse bench: needs root (network namespaces)");
        std::process::exit(2);
    }
    let lab = release("cnishift-lab", "CNISHIFT_LAB_BIN");
    let cnishift = release("cnishift", "CNISHIFT_BIN");
    let agent = release("cnishift-agent", "CNISHIFT_AGENT_BIN");
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/avalanche.toml");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "binaries: {}, {}, {}; {cores} cores",
        lab.display(),
        cnishift.display(),
        agent.display()
    );
    let cmd = |c: &mut Command| {
        c.env("CNISHIFT_BIN", &cnishift)
            .env("CNISHIFT_AGENT_BIN", &agent);
    };

    // 1. up (and down) of the seed.
    let mut ups = vec![];
    for r in 0..rounds("UP_ROUNDS", 5) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let before = load();
        let t = Instant::now();
        let mut up = Command::new(&lab);
        up.arg("up").arg("-i").arg(&seed).arg("--dir").arg(&dir);
        cmd(&mut up);
        let o = up.output().unwrap();
        let took = t.elapsed();
        let after = load();
        let _ = Command::new(&lab)
            .arg("down")
            .arg("--dir")
            .arg(&dir)
            .output();
        assert!(
            o.status.success(),
            "up failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        println!(
            "up round {}: {} (load {before:.2} → {after:.2})",
            r + 1,
            ms(took)
        );
        ups.push(took);
    }

    // 2. The clean rehearsal, and the per-node overhead from its summary.
    let mut walls = vec![];
    let mut overheads = vec![];
    let mut stages = vec![];
    for r in 0..rounds("ROUNDS", 3) {
        let before = load();
        let t = Instant::now();
        let mut c = Command::new(&lab);
        c.arg("rehearse").arg("-i").arg(&seed).args(["-o", "json"]);
        cmd(&mut c);
        let o = c.output().unwrap();
        let wall = t.elapsed();
        let after = load();
        assert_eq!(
            o.status.code(),
            Some(0),
            "the rehearsal failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut per_node: Vec<Duration> = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let imposed: u64 = n["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|st| IMPOSED.contains(&st[0].as_str().unwrap_or("")))
                    .map(|st| st[1].as_u64().unwrap_or(0))
                    .sum();
                Duration::from_millis(n["wall_ms"].as_u64().unwrap().saturating_sub(imposed))
            })
            .collect();
        let overhead = median(&mut per_node);
        let stage = |k: &str| Duration::from_millis(s[k]["ms"].as_u64().unwrap_or(0));
        println!(
            "rehearsal round {}: {} wall (up {}, preflight {}, migrate {}, verify {}); \
             overhead per node median {} (min {}, max {}) (load {before:.2} → {after:.2})",
            r + 1,
            ms(wall),
            ms(Duration::from_millis(s["up_ms"].as_u64().unwrap_or(0))),
            ms(stage("preflight")),
            ms(stage("migrate")),
            ms(stage("verify")),
            ms(overhead),
            ms(per_node[0]),
            ms(*per_node.last().unwrap()),
        );
        walls.push(wall);
        overheads.push(overhead);
        stages.push(stage("migrate"));
    }

    let up = median(&mut ups);
    let wall = median(&mut walls);
    let overhead = median(&mut overheads);
    let migrate = median(&mut stages);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "up, 9 nodes:            median {} of {} rounds = {:.2}× the {} s budget",
        ms(up),
        ups.len(),
        ratio(up, BUDGET_UP),
        BUDGET_UP.as_secs()
    );
    println!(
        "rehearsal, 9 nodes:     median {} of {} rounds = {:.2}× the {} s budget (its migrate {})",
        ms(wall),
        walls.len(),
        ratio(wall, BUDGET_REHEARSAL),
        BUDGET_REHEARSAL.as_secs(),
        ms(migrate)
    );
    println!(
        "coordinator overhead per node: median {} = {:.2}× migrate's 0.5 s budget (reported)",
        ms(overhead),
        ratio(overhead, BUDGET_OVERHEAD)
    );
    if up > BUDGET_UP || wall > BUDGET_REHEARSAL {
        println!("BUDGET MISSED");
        std::process::exit(1);
    }
}
