//! Budget benchmark for the dead-man rollback: arm + confirm over mutual TLS
//! on loopback (each call a fresh connection, as `migrate` makes them), and
//! the RSS of an armed, idle agent.
//!
//! Run: `cargo bench -p cnishift-lab --bench rollback`
//! Env: ROUNDS=200. Exits 1 when a budget is missed.

use std::time::{Duration, Instant};

use cnishift::agents::{self, ClientTls};
use cnishift::inventory::{Deadlines, Node, Role, Tls};
use cnishift_lab::loopback::{Agent, Pki};

const BUDGET_ARM_CONFIRM: Duration = Duration::from_millis(20);
const BUDGET_ARMED_RSS_KIB: u64 = 8 * 1024;

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    let pki = Pki::new(&["raccoon00"]).expect("pki");
    let root = tempfile::tempdir().expect("tmp");
    cnishift_lab::hostroot::build(root.path(), "raccoon00", Role::Worker).expect("host root");
    let root_arg = root.path().to_str().unwrap().to_string();
    let agent = Agent::start(
        pki.dir.path(),
        "raccoon00",
        "raccoon00",
        &[
            "--host-root",
            &root_arg,
            "--no-live-probes",
            "--rollback-command",
            "true",
        ],
    )
    .expect("agent");
    let tls = ClientTls::load(&Tls {
        ca: pki.path("ca.pem"),
        cert: pki.path("coordinator.pem"),
        key: pki.path("coordinator-key.pem"),
    })
    .expect("tls");
    let node = Node {
        name: "raccoon00".into(),
        role: Role::Worker,
        address: agent.address(),
    };
    let d = Deadlines::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let run = format!("bench-{i}");
        let t = Instant::now();
        rt.block_on(async {
            agents::arm_rollback(&node, &tls, &d, &run, Duration::from_secs(600))
                .await
                .expect("arm");
            let s = agents::confirm(&node, &tls, &d, &run)
                .await
                .expect("confirm");
            assert_eq!(s.outcome, "confirmed");
        });
        times.push(t.elapsed());
    }
    // The same two fresh connections with read-only calls: what the arm and
    // confirm cost beyond TLS and gRPC is the state written (fsync'd) twice.
    let mut reads = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        rt.block_on(async {
            agents::arm_state(&node, &tls, &d).await.expect("state");
            agents::arm_state(&node, &tls, &d).await.expect("state");
        });
        reads.push(t.elapsed());
    }
    reads.sort();
    let read_median = reads[reads.len() / 2];
    times.sort();
    let median = times[times.len() / 2];
    let p90 = times[times.len() * 9 / 10];
    // The agent above has served 800 connections (its allocator keeps what
    // it grew to); the budget is for an armed agent at rest: a fresh one,
    // armed once, idle.
    let (served_peak, served_rss) = agent.rss_kib().expect("rss");
    let idle = Agent::start(
        pki.dir.path(),
        "raccoon00",
        "raccoon00",
        &[
            "--host-root",
            &root_arg,
            "--no-live-probes",
            "--rollback-command",
            "true",
        ],
    )
    .expect("agent");
    let idle_node = Node {
        address: idle.address(),
        ..node.clone()
    };
    rt.block_on(agents::arm_rollback(
        &idle_node,
        &tls,
        &d,
        "idle",
        Duration::from_secs(600),
    ))
    .expect("arm");
    std::thread::sleep(Duration::from_secs(2));
    let (peak, rss) = idle.rss_kib().expect("rss");
    println!(
        "the benchmarked agent after {} connections: RSS {served_rss} KiB (peak {served_peak} KiB)",
        rounds * 4
    );
    println!(
        "arm + confirm over mutual TLS (2 fresh connections): median {:.2} ms, p90 {:.2} ms, {rounds} rounds; budget {} ms → {:.3}×",
        median.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3,
        BUDGET_ARM_CONFIRM.as_millis(),
        median.as_secs_f64() / BUDGET_ARM_CONFIRM.as_secs_f64()
    );
    println!(
        "two GetArmState calls (2 fresh connections, nothing written): median {:.2} ms → arm + confirm is {:.2}× that",
        read_median.as_secs_f64() * 1e3,
        median.as_secs_f64() / read_median.as_secs_f64()
    );
    println!(
        "armed idle agent: RSS {rss} KiB (peak {peak} KiB); budget {} KiB → {:.2}×",
        BUDGET_ARMED_RSS_KIB,
        rss as f64 / BUDGET_ARMED_RSS_KIB as f64
    );
    if median > BUDGET_ARM_CONFIRM || rss > BUDGET_ARMED_RSS_KIB {
        eprintln!("BUDGET MISSED");
        std::process::exit(1);
    }
}
