//! Budget benchmark for the cleanup issue: on a node with 100 veths on cni0,
//! the plan ≤ 50 ms and the apply ≤ 1 s, each measured as the whole
//! `cnishift-agent cleanup` process inside a real network namespace.
//!
//! Run (as root): `cargo bench -p cnishift-agent --bench cleanup`
//! Env: VETHS=100 PLAN_RUNS=20 APPLY_RUNS=5. Exits 1 when a budget is missed.

use std::process::Command;
use std::time::{Duration, Instant};

const PLAN_BUDGET: Duration = Duration::from_millis(50);
const APPLY_BUDGET: Duration = Duration::from_secs(1);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip -batch` input that builds a Flannel node with `veths` pod interfaces.
fn batch(veths: usize) -> String {
    let mut b = String::from(
        "link add eth0 type veth peer name eth0p\nlink set eth0 up\naddr add 192.0.2.10/24 dev eth0\n\
         link add flannel.1 type vxlan id 1 dstport 8472 dev eth0 nolearning\nlink set flannel.1 up\n\
         link add cni0 type bridge\nlink add cilium_host type veth peer name cilium_net\n",
    );
    for i in 0..veths {
        b.push_str(&format!(
            "link add veth{i} type veth peer name pod{i}\nlink set veth{i} master cni0\n"
        ));
    }
    b
}

fn setup(ns: &str, root: &std::path::Path, veths: usize) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
    sh(&["ip", "netns", "add", ns]);
    let file = root.join("batch");
    std::fs::write(&file, batch(veths)).unwrap();
    sh(&["ip", "-n", ns, "-batch", file.to_str().unwrap()]);
    for cmd in [
        &["iptables", "-N", "FLANNEL-FWD"][..],
        &["iptables", "-A", "FORWARD", "-j", "FLANNEL-FWD"][..],
    ] {
        let mut a = vec!["ip", "netns", "exec", ns];
        a.extend(cmd);
        sh(&a);
    }
    let w = |rel: &str, body: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    w("proc/sys/kernel/osrelease", "6.6.64\n");
    w("proc/1/cmdline", "k3s\0server\0");
    w(
        "etc/rancher/k3s/config.yaml",
        "flannel-backend: none\ndisable-network-policy: true\n",
    );
    w(
        "etc/cni/net.d/05-cilium.conflist",
        r#"{"name":"cilium","plugins":[{"type":"cilium-cni"}]}"#,
    );
    w(
        "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
        r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#,
    );
    w("run/flannel/subnet.env", "FLANNEL_SUBNET=10.42.1.1/24\n");
    for i in 0..veths {
        w(
            &format!("var/lib/cni/networks/cbr0/10.42.1.{}", i + 2),
            "c0ffee\neth0\n",
        );
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the cleanup benchmark needs root (network namespaces)");
        return;
    }
    let veths: usize = std::env::var("VETHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let plan_runs: usize = std::env::var("PLAN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let apply_runs: usize = std::env::var("APPLY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let agent = env!("CARGO_BIN_EXE_cnishift-agent");
    let ns = format!("cnishift-bench-{}", std::process::id());
    let run = |root: &std::path::Path, state: &std::path::Path, apply: bool| {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &ns,
            agent,
            "cleanup",
            "-o",
            "json",
            "--host-root",
        ])
        .arg(root)
        .arg("--state-dir")
        .arg(state);
        if apply {
            c.args(["--apply", "--force"]);
        }
        let t = Instant::now();
        let out = c.output().unwrap();
        let took = t.elapsed();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cleanup JSON");
        (took, json)
    };

    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    setup(&ns, root.path(), veths);
    let (_, plan) = run(root.path(), state.path(), false);
    let items = plan["items"].as_array().unwrap().len();
    assert_eq!(
        items,
        veths + 2 + 3 + 1,
        "veths, cni0, flannel.1, three paths, iptables:ipv4"
    );
    let plans: Vec<Duration> = (0..plan_runs)
        .map(|_| run(root.path(), state.path(), false).0)
        .collect();

    let mut applies = Vec::new();
    for _ in 0..apply_runs {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        setup(&ns, root.path(), veths);
        let (took, result) = run(root.path(), state.path(), true);
        let outcomes = result["outcomes"].as_array().unwrap();
        assert_eq!(outcomes.len(), items);
        assert!(outcomes.iter().all(|o| o["ok"] == true), "{result:#}");
        applies.push(took);
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let (p, a) = (median(plans), median(applies));
    println!("node: {veths} veths on cni0, {items} cleanup items");
    println!(
        "plan  (whole process, {plan_runs} runs): median {:>8.2} ms (budget 50 ms, {:.2}x)",
        p.as_secs_f64() * 1e3,
        p.as_secs_f64() / PLAN_BUDGET.as_secs_f64()
    );
    println!(
        "apply (whole process, {apply_runs} runs):  median {:>8.2} ms (budget 1000 ms, {:.2}x)",
        a.as_secs_f64() * 1e3,
        a.as_secs_f64() / APPLY_BUDGET.as_secs_f64()
    );
    if p > PLAN_BUDGET || a > APPLY_BUDGET {
        println!("budget: MISSED");
        std::process::exit(1);
    }
    println!("budget: OK");
}
