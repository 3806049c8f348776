//! Budget benchmark for the mutual-TLS issue: `preflight` fan-out to 9, 100
//! and 500 agents (real `cnishift-agent serve` processes on loopback ports),
//! concurrent against one-after-another (the runbook's `for node in ...; ssh`
//! loop), and the agents' idle RSS.
//!
//! Run: `cargo bench -p cnishift-lab --bench fanout`
//! Env: SIZES=9,100,500  ROUNDS=5  LIVE=1 (live probes; default: the lab's
//! fixture host roots with --no-live-probes). Exits 1 when a budget is missed.

use std::time::Duration;

use cnishift::agents::{self, ClientTls};
use cnishift::inventory::{Deadlines, Node, Role, Tls};
use cnishift_lab::loopback::{Agent, Pki};

const BUDGET_500: Duration = Duration::from_secs(2);
const BUDGET_IDLE_RSS_KIB: u64 = 12 * 1024;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "9,100,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let live = std::env::var("LIVE").is_ok_and(|v| v == "1");
    let max = *sizes.iter().max().expect("SIZES");
    let names: Vec<String> = (0..max).map(|i| format!("node{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = Pki::new(&refs).expect("pki");
    let root = tempfile::tempdir().expect("tmp");
    cnishift_lab::hostroot::build(root.path(), "node", Role::Worker).expect("host root");
    let root_arg = root.path().to_str().unwrap().to_string();
    let mut extra = vec!["--host-root", &root_arg];
    if !live {
        extra.push("--no-live-probes");
    }
    eprintln!(
        "starting {max} agents ({})...",
        if live {
            "live probes"
        } else {
            "fixture host root, no live probes"
        }
    );
    let agents: Vec<Agent> = names
        .iter()
        .map(|n| Agent::start(pki.dir.path(), n, n, &extra).expect("agent"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let idle: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.rss_kib().map(|(_, rss)| rss))
        .collect();
    let mut idle_sorted = idle.clone();
    idle_sorted.sort();
    let idle_median = idle_sorted[idle_sorted.len() / 2];
    let idle_max = *idle_sorted.last().unwrap();

    let tls = ClientTls::load(&Tls {
        ca: pki.path("ca.pem"),
        cert: pki.path("coordinator.pem"),
        key: pki.path("coordinator-key.pem"),
    })
    .unwrap();
    let deadlines = Deadlines {
        connect: Duration::from_secs(10),
        report: Duration::from_secs(30),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ok = true;
    println!("agents: {max} processes, idle RSS median {idle_median} KiB, max {idle_max} KiB (budget {BUDGET_IDLE_RSS_KIB} KiB)");
    if idle_max > BUDGET_IDLE_RSS_KIB {
        ok = false;
    }
    for &n in &sizes {
        let nodes: Vec<Node> = agents[..n]
            .iter()
            .zip(&names)
            .map(|(a, name)| Node {
                name: name.clone(),
                role: Role::Worker,
                address: a.address(),
            })
            .collect();
        let mut conc = Vec::new();
        let mut seq = Vec::new();
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            let out = rt.block_on(agents::fan_out_reports(&nodes, &tls, &deadlines));
            conc.push(t.elapsed());
            let failed: Vec<_> = out.iter().filter(|o| o.result.is_err()).collect();
            assert!(
                failed.is_empty(),
                "{} of {n} failed: {:?}",
                failed.len(),
                failed.first().map(|o| &o.result)
            );
            let t = std::time::Instant::now();
            let out = rt.block_on(agents::sequential_reports(&nodes, &tls, &deadlines));
            seq.push(t.elapsed());
            assert!(out.iter().all(|o| o.result.is_ok()));
        }
        let (c, s) = (median(conc), median(seq));
        println!(
            "fan-out to {n:>3} agents: concurrent median {:>8.1} ms, sequential median {:>8.1} ms, ratio {:.3} ({:.1}x faster)",
            c.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            c.as_secs_f64() / s.as_secs_f64(),
            s.as_secs_f64() / c.as_secs_f64()
        );
        if n >= 500 && c > BUDGET_500 {
            ok = false;
        }
    }
    let after: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.rss_kib().map(|(hwm, _)| hwm))
        .collect();
    println!(
        "agents after serving: peak RSS max {} KiB",
        after.iter().max().unwrap()
    );
    println!("budget: {}", if ok { "OK" } else { "MISSED" });
    if !ok {
        std::process::exit(1);
    }
}
