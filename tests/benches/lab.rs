//! Budgets of `cnishift-lab` itself, run as processes like an admin would:
//!
//! - `up` of the 9-node seed inventory (examples/avalanche.toml): ≤ 10 s;
//! - `down` of it: ≤ 3 s;
//! - `deploy` of one controller, from the hook's start until the API server
//!   says the node is Ready again on Cilium: ≤ 1 s;
//! - RSS of the supervisor (API server included) + its 9 agents: ≤ 150 MiB.
//!
//! Also shown, not budgeted on their own: what the controllers' real etcd
//! members add to `up` (how long after they started they were healthy, and
//! how long the agents took meanwhile — `up` waits for both) and their memory.
//!
//! Run (root): `cargo bench -p cnishift-lab --bench lab` (ROUNDS=5 by default).
//! It needs `cargo build -p cnishift-lab -p cnishift -p cnishift-agent` first
//! (the benchmark runs the binaries beside it in target/).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cnishift_lab::cluster::binary;
use serde_json::Value;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "median {:.0} ms, max {:.0} ms",
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

/// Node `name`'s Ready status, straight from the API server (one HTTP GET).
fn ready(api: SocketAddr, name: &str) -> Option<bool> {
    let mut s = TcpStream::connect(api).ok()?;
    write!(
        s,
        "GET /api/v1/nodes/{name} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let body = buf.split_once("\r\n\r\n")?.1;
    let v: Value = serde_json::from_str(body).ok()?;
    Some(v["status"]["conditions"][0]["status"] == "True")
}

/// A field (KiB) of /proc/PID/status or /proc/PID/smaps_rollup.
fn kib(pid: u64, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the lab benchmark needs root (network namespaces); run it as root");
        std::process::exit(2);
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let lab = binary("cnishift-lab", "CNISHIFT_LAB_BIN").expect("cnishift-lab built");
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/avalanche.toml");
    let (mut ups, mut downs, mut deploys, mut rss) = (vec![], vec![], vec![], vec![]);
    let (mut etcd_ready, mut etcd_extra, mut etcd_pss) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let start = Instant::now();
        let out = Command::new(&lab)
            .arg("up")
            .arg("-i")
            .arg(&inv)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ups.push(start.elapsed());
        let rec: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
        let api: SocketAddr = rec["api"].as_str().unwrap().parse().unwrap();
        // Let the agents settle (first report served) before measuring memory.
        let _ = Command::new(binary("cnishift", "CNISHIFT_BIN").unwrap())
            .args(["preflight", "-o", "json", "-i"])
            .arg(dir.join("cluster.toml"))
            .output();
        // "etcd: ... healthy N ms after the members started (the agents listened at M ms; ...".
        let note = rec["notes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str())
            .find(|n| n.starts_with("etcd: "))
            .expect("up notes when etcd was healthy")
            .to_string();
        let num = |after: &str| -> u64 {
            note.split(after)
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (healthy, agents) = (num(" healthy "), num(" listened at "));
        etcd_ready.push(Duration::from_millis(healthy));
        etcd_extra.push(Duration::from_millis(healthy.saturating_sub(agents)));
        etcd_pss.push(
            rec["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n["etcd_pid"].as_u64())
                .map(|p| kib(p, "smaps_rollup", "Pss:"))
                .sum::<u64>(),
        );
        let mut pids = vec![rec["supervisor_pid"].as_u64().unwrap()];
        pids.extend(
            rec["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["agent_pid"].as_u64().unwrap()),
        );
        // RSS counts the pages of the one agent binary nine times; PSS splits
        // shared pages among the processes that map them (what they cost together).
        let rss_sum: u64 = pids.iter().map(|p| kib(*p, "status", "VmRSS:")).sum();
        let pss_sum: u64 = pids.iter().map(|p| kib(*p, "smaps_rollup", "Pss:")).sum();
        rss.push((pss_sum, rss_sum));
        // The seed's Cilium DaemonSet selects the migration label
        // ([cilium] node_label): set it as migrate's Label step would, or no
        // Cilium pod ever makes the switched node Ready.
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .args(["label", "node", "opi01", "cnishift.io/cni=cilium"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let start = Instant::now();
        let out = Command::new(&lab)
            .args(["deploy", "--dir"])
            .arg(&dir)
            .arg("opi01")
            .output()
            .unwrap();
        assert!(out.status.success());
        // Wait for NotReady (the restart) and then Ready (Cilium up).
        let mut was_down = false;
        loop {
            match ready(api, "opi01") {
                Some(false) => was_down = true,
                Some(true) if was_down => break,
                _ => {}
            }
            assert!(start.elapsed() < Duration::from_secs(10), "never Ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        deploys.push(start.elapsed());
        let start = Instant::now();
        let out = Command::new(&lab)
            .args(["down", "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        downs.push(start.elapsed());
    }
    rss.sort();
    etcd_pss.sort();
    println!("lab benchmark, 9-node seed inventory, {rounds} rounds");
    println!(
        "  up (9 nodes, to ready):        {}  (budget 10 s)",
        stats(ups)
    );
    println!(
        "  down:                          {}  (budget 3 s)",
        stats(downs)
    );
    println!(
        "  deploy opi01 to Ready:         {}  (budget 1 s)",
        stats(deploys)
    );
    let (pss, sum) = rss[rss.len() / 2];
    println!(
        "  memory, supervisor + 9 agents: PSS {:.1} MiB (max {:.1}), plain RSS sum {:.1} MiB  (budget 150 MiB)",
        pss as f64 / 1024.0,
        rss[rss.len() - 1].0 as f64 / 1024.0,
        sum as f64 / 1024.0
    );
    println!(
        "  etcd (3 members) healthy after: {}; of it after the agents listened: {}",
        stats(etcd_ready),
        stats(etcd_extra)
    );
    println!(
        "  memory, the 3 etcd members:    PSS {:.1} MiB (max {:.1})",
        etcd_pss[etcd_pss.len() / 2] as f64 / 1024.0,
        etcd_pss[etcd_pss.len() - 1] as f64 / 1024.0
    );
}
