//! Watching a migration as a person would (issue 15): the real `cnishift
//! migrate` in a real terminal (tmux, a terminal emulator: what its screen
//! shows is what a person sees), while the machine's `kubectl get nodes -w`
//! runs beside it, and `kubectl get events` / `kubectl describe node`
//! afterwards.
//!
//! The progress display (indicatif, coordinator/src/cli/migrate.rs) must draw
//! (a bar line `N/3 nodes [elapsed] NODE: STEP (deadline / D)`), update (its
//! count and its step change while the run goes on), and leave a clean
//! summary: the ✓ lines and the closing line, and no progress line anywhere
//! in the terminal's history once the run has ended.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnishift_lab::harness::{cnishift_bin, Up};
use cnishift_lab::require_root;
use serde_json::Value;

const NODES: [&str; 3] = ["ctl-a", "w-1", "w-2"];

const INVENTORY: &str = r#"
[cluster]
name = "watched"
pod_cidr = "10.65.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "3s"
api = "2s"
drain = "5s"
node_ready = "5s"
cilium_ready = "5s"
deploy = "10s"
confirm = "30s"
verify = "5s"
repod = "5s"

[drain]
retry_interval = "200ms"

[cilium]
node_label = "cnishift.io/cni=cilium"

[[nodes]]
name = "ctl-a"
role = "controller"
address = "10.9.9.1:7443"

[[nodes]]
name = "w-1"
role = "worker"
address = "10.9.9.2:7443"

[[nodes]]
name = "w-2"
role = "worker"
address = "10.9.9.3:7443"
"#;

/// A tmux server of this test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (.ci/run installs it)");
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// The screen, and with `history` everything that scrolled off it;
    /// wrapped lines joined.
    fn capture(&self, history: bool) -> String {
        if history {
            self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", "m"])
        } else {
            self.run(&["capture-pane", "-p", "-J", "-t", "m"])
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A line of indicatif's bar: `1/3 nodes [00:00:02] w-1: drain (deadline / 5s)`.
fn bar_line(l: &str) -> Option<(u32, String)> {
    let (n, rest) = l.trim().split_once("/3 nodes [")?;
    Some((n.parse().ok()?, rest.to_string()))
}

#[test]
fn a_migration_watched_in_a_terminal_and_with_kubectl() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(INVENTORY, &[]);
    let state = lab.dir.join("migrate-state");

    // `kubectl get nodes -w` in "another terminal".
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(["get", "nodes", "-w"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl is installed");
    let watch_out = watch.stdout.take().unwrap();
    let watched = std::thread::spawn(move || {
        BufReader::new(watch_out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // Its first lines (the list) before the run starts.
    std::thread::sleep(Duration::from_millis(500));

    let tmux = Tmux {
        socket: format!("cnishift-test-{}", std::process::id()),
    };
    let cmd = format!(
        "{} migrate -i {} --kubeconfig {} --state-dir {}; echo cnishift-exit=$?; sleep 600",
        shell_quote(&cnishift_bin().display().to_string()),
        shell_quote(&lab.cluster_toml().display().to_string()),
        shell_quote(&lab.kubeconfig().display().to_string()),
        shell_quote(&state.display().to_string()),
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "m",
        "-x",
        "160",
        "-y",
        "40",
        &cmd,
    ]);
    let start = Instant::now();
    let mut bars: Vec<(u32, String)> = vec![];
    let screen = loop {
        let screen = tmux.capture(false);
        for l in screen.lines() {
            if let Some(b) = bar_line(l) {
                if bars.last() != Some(&b) {
                    bars.push(b);
                }
            }
        }
        if screen.contains("cnishift-exit=") {
            break screen;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "migrate still running after 180 s:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let history = tmux.capture(true);
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let _ = watch.wait();
    let watched = watched.join().unwrap();

    assert!(
        screen.contains("cnishift-exit=0"),
        "migrate failed:\n{history}"
    );
    // It drew, and it updated: the count went up and the step changed.
    assert!(
        bars.len() >= 3,
        "the progress display was seen {} times: {bars:?}\n{history}",
        bars.len()
    );
    let counts: std::collections::BTreeSet<u32> = bars.iter().map(|b| b.0).collect();
    assert!(counts.len() >= 2, "the count never changed: {bars:?}");
    // (Before the first step starts the bar has no message yet.)
    for (_, rest) in &bars {
        let msg = rest.split_once("] ").map_or("", |(_, m)| m.trim());
        assert!(
            msg.is_empty() || (msg.contains(": ") && msg.contains(" (deadline / ")),
            "a bar without node, step and deadline: {rest}"
        );
    }
    assert!(
        bars.iter().any(|(_, r)| r.contains("w-1: ")),
        "the bar never named w-1: {bars:?}"
    );
    // A clean summary: no progress line left anywhere in the terminal.
    let lines: Vec<&str> = history.lines().collect();
    assert!(
        lines
            .iter()
            .all(|l| bar_line(l).is_none() && !l.contains(" nodes [")),
        "a progress line was left behind:\n{history}"
    );
    let end = lines
        .iter()
        .position(|l| l.starts_with("cnishift-exit="))
        .unwrap();
    let before: Vec<&str> = lines[..end]
        .iter()
        .copied()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        before.last().copied(),
        Some("cnishift: every node of watched is migrated"),
        "{history}"
    );
    let done: Vec<&str> = before
        .iter()
        .filter_map(|l| l.strip_prefix("✓ "))
        .filter(|l| l.split_whitespace().nth(1) == Some("done"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(done, NODES, "each node's ✓ done line, in order:\n{history}");
    for l in &before {
        assert!(
            l.starts_with("✓ ") || l.starts_with("cnishift: "),
            "an unexpected line in the summary: {l:?}\n{history}"
        );
    }

    // kubectl -w saw each node cordoned, then uncordoned, one after another.
    let mut cordoned_at = vec![];
    for n in NODES {
        let rows: Vec<(usize, &String)> = watched
            .iter()
            .enumerate()
            .filter(|(_, l)| l.split_whitespace().next() == Some(n))
            .collect();
        let on = rows
            .iter()
            .find(|(_, l)| l.contains("SchedulingDisabled"))
            .unwrap_or_else(|| {
                panic!(
                    "kubectl -w never showed {n} cordoned:\n{}",
                    watched.join("\n")
                )
            })
            .0;
        let off = rows
            .iter()
            .find(|(i, l)| *i > on && !l.contains("SchedulingDisabled") && l.contains(" Ready "))
            .unwrap_or_else(|| {
                panic!(
                    "kubectl -w never showed {n} Ready and uncordoned after its cordon:\n{}",
                    watched.join("\n")
                )
            })
            .0;
        cordoned_at.push((on, off));
    }
    for w in cordoned_at.windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "a node was cordoned before the one before it was uncordoned: {cordoned_at:?}\n{}",
            watched.join("\n")
        );
    }

    // The Events a person reads afterwards.
    let events: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "events", "-A", "-o", "json"])).unwrap();
    let reasons = |node: &str| -> Vec<String> {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["involvedObject"]["kind"] == "Node" && e["involvedObject"]["name"] == node
            })
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect()
    };
    for n in NODES {
        let r = reasons(n);
        let at = |reason: &str| {
            r.iter()
                .position(|x| x == reason)
                .unwrap_or_else(|| panic!("no {reason} Event on {n}: {r:?}"))
        };
        assert!(
            at("MigrationCordoned") < at("MigrationDrained")
                && at("MigrationDrained") < at("MigrationCiliumReady")
                && at("MigrationCiliumReady") < at("MigrationUncordoned"),
            "{n}'s Events out of order: {r:?}"
        );
    }
    let table = lab.kubectl_ok(&["get", "events", "-A"]);
    assert!(
        table.contains("MigrationCordoned") && table.contains("node/w-1"),
        "{table}"
    );
    let d = lab.kubectl_ok(&["describe", "node", "w-1"]);
    let events_at = d.find("Events:").unwrap_or_else(|| panic!("{d}"));
    for reason in ["MigrationCordoned", "MigrationUncordoned"] {
        assert!(
            d[events_at..].contains(reason),
            "describe node w-1 shows no {reason}:\n{d}"
        );
    }
}
