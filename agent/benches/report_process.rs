//! Budget benchmark for issue "agent self-report": a full live report, as a
//! whole process, median ≤ 20 ms wall and peak RSS ≤ 16 MiB, side by side with
//! `bpftool feature probe` on the same machine.
//!
//! Run: `cargo bench -p cnishift-agent --bench report_process`
//! (env RUNS=N to change the sample size; exits 1 when a budget is missed).
//! Peak RSS comes from the kernel (`wait4` rusage `ru_maxrss`), per run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUDGET_WALL: Duration = Duration::from_millis(20);
const BUDGET_RSS_KIB: i64 = 16 * 1024;

struct Sample {
    wall: Duration,
    rss_kib: i64,
}

/// Spawns `cmd`, waits with wait4 and returns wall time and peak RSS.
fn run_once(program: &str, args: &[&str]) -> Sample {
    let start = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI with valid out-pointers; we reap our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(r, pid, "wait4 failed");
    std::mem::forget(child); // already reaped
    Sample {
        wall,
        rss_kib: usage.ru_maxrss,
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn measure(label: &str, program: &str, args: &[&str], runs: usize) -> (Duration, i64) {
    let _ = run_once(program, args); // warm the page cache
    let samples: Vec<Sample> = (0..runs).map(|_| run_once(program, args)).collect();
    let walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    let rss: Vec<i64> = samples.iter().map(|s| s.rss_kib).collect();
    let med = median(walls.clone());
    let mut sorted = walls.clone();
    sorted.sort();
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    let rss_med = median(rss.clone());
    println!(
        "{label:<36} runs={runs:<4} median={:>7.2} ms  p90={:>7.2} ms  min={:>7.2} ms  peak RSS median={:>6} KiB max={:>6} KiB",
        med.as_secs_f64() * 1e3,
        p90.as_secs_f64() * 1e3,
        sorted[0].as_secs_f64() * 1e3,
        rss_med,
        rss.iter().max().unwrap()
    );
    (med, rss_med)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let agent = env!("CARGO_BIN_EXE_cnishift-agent");
    println!(
        "host: {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let (wall, rss) = measure(
        "cnishift-agent report --json",
        agent,
        &["report", "--json"],
        runs,
    );
    let table = measure(
        "cnishift-agent report (table)",
        agent,
        &["report"],
        runs / 4,
    );
    let _ = table;
    let bpftool = Command::new("bpftool")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if bpftool {
        let (bt, bt_rss) = measure(
            "bpftool feature probe",
            "bpftool",
            &["feature", "probe"],
            (runs / 10).max(5),
        );
        println!(
            "ratio: cnishift-agent report takes {:.3}x the wall time of bpftool feature probe ({:.2}x its peak RSS)",
            wall.as_secs_f64() / bt.as_secs_f64(),
            rss as f64 / bt_rss as f64
        );
    } else {
        println!("bpftool not installed: no comparison (apt-get install bpftool)");
    }
    let wall_ok = wall <= BUDGET_WALL;
    let rss_ok = rss <= BUDGET_RSS_KIB;
    println!(
        "budget: median wall {:.2} ms <= 20 ms: {}; peak RSS {} KiB <= 16384 KiB: {}",
        wall.as_secs_f64() * 1e3,
        if wall_ok { "OK" } else { "OVER" },
        rss,
        if rss_ok { "OK" } else { "OVER" }
    );
    if !(wall_ok && rss_ok) {
        std::process::exit(1);
    }
}
