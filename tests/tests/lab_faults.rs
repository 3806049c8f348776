//! Every fault kind of `cnishift-lab up --fault` / `cnishift-lab fault`,
//! observed through the real `cnishift` and `kubectl` (and, for Cilium's
//! health, Cilium's own API on the node's socket), never through lab internals.

use std::process::Command;
use std::time::{Duration, Instant};

use cnishift_lab::harness::{check, report_node, text, Up, RENAMED};
use cnishift_lab::require_root;

fn status_of<'a>(r: &'a serde_json::Value, node: &str) -> &'a str {
    report_node(r, node)["status"].as_str().unwrap()
}

#[test]
fn hook_fails_and_hook_hangs_and_agent_down_and_partition() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(
        RENAMED,
        &["--fault", "ctl-a:hook-fails", "--fault", "w-2:agent-down"],
    );
    // hook-fails: the deploy hook exits 1 with a message; nothing changed.
    let o = lab.deploy_hook("ctl-a").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("hook-fails"), "{}", text(&o));
    assert_eq!(lab.node_ready("ctl-a").0, "True");
    // agent-down: preflight says unreachable, the others report.
    let r = lab.preflight();
    assert_eq!(status_of(&r, "w-2"), "unreachable", "{r:#}");
    assert!(report_node(&r, "w-1")["report"].is_object());
    // partition: the admin box cannot reach w-1, the API still sees it Ready.
    let o = lab.lab(&["fault", "w-1:partition"]);
    assert!(o.status.success(), "{}", text(&o));
    let start = Instant::now();
    let r = lab.preflight();
    assert_eq!(status_of(&r, "w-1"), "timeout", "{r:#}");
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_eq!(lab.node_ready("w-1").0, "True");
    // Clearing brings the agent back and the link up.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = lab.preflight();
    for n in ["ctl-a", "w-1", "w-2"] {
        assert!(report_node(&r, n)["report"].is_object(), "{n}: {r:#}");
    }
    // hook-hangs: the hook does not return.
    let o = lab.lab(&["fault", "ctl-a:hook-hangs"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut child = lab.deploy_hook("ctl-a").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "the hook returned");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lab.node_ready("ctl-a").0, "True");
}

#[test]
fn never_ready_and_cilium_crashloop_keep_the_node_not_ready() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(
        RENAMED,
        &[
            "--fault",
            "w-1:never-ready",
            "--fault",
            "ctl-a:cilium-crashloop",
        ],
    );
    // cilium-crashloop: after the deploy the Cilium pod restarts and never
    // turns Ready; Cilium's health API says Failure with a message.
    let o = lab.deploy_hook("ctl-a").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(2500));
    let pod = lab.cilium_pod("kube-system", "ctl-a");
    assert!(
        pod.contains("0/1") && pod.contains("CrashLoopBackOff"),
        "{pod}"
    );
    let restarts: u32 = pod.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(restarts >= 2, "{pod}");
    assert_eq!(
        lab.node_ready("ctl-a"),
        (
            "False".to_string(),
            "container runtime network not ready: cni config uninitialized".to_string()
        )
    );
    let sock = lab.dir.join("hosts/ctl-a/var/run/cilium/cilium.sock");
    let health = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/v1/healthz")
        .output()
        .unwrap();
    let h: serde_json::Value =
        serde_json::from_slice(&health.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&health)));
    assert_eq!(h["cilium"]["state"], "Failure", "{h}");
    assert!(
        h["cilium"]["msg"].as_str().unwrap().contains("crashloop"),
        "{h}"
    );
    let o = lab.cnishift(&["node", "wait-cilium", "ctl-a"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // never-ready: w-1 (its deploy restarts k3s; it stays NotReady).
    let o = lab.deploy_hook("w-1").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lab.node_ready("w-1").0, "False");
    let o = lab.cnishift(&["node", "wait-ready", "w-1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // Cleared: both turn Ready on Cilium.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    lab.wait_node("ctl-a", "True", Duration::from_secs(3));
    lab.wait_node("w-1", "True", Duration::from_secs(3));
    let h = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/v1/healthz")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&h.stdout).contains(r#""state":"Ok""#));
}

#[test]
fn pdb_blocks_slow_api_unconfirmed_and_a_worker_that_restarts_early() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(
        RENAMED,
        &[
            "--fault",
            "w-2:worker-restarts-early",
            "--fault",
            "ctl-a:unconfirmed",
        ],
    );
    // pdb-blocks: the drain of w-1 stops at its deadline naming the budget.
    let o = lab.lab(&["fault", "w-1:pdb-blocks"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = lab.cnishift(&["node", "drain", "w-1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("blocked-on-w-1"), "{}", text(&o));
    // slow-api: answers come after the client's deadline ([deadlines] api = 1s).
    let o = lab.lab(&["fault", "w-1:slow-api"]);
    assert!(o.status.success(), "{}", text(&o));
    let start = Instant::now();
    let o = lab.cnishift(&["cluster", "check"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let o = lab.lab(&["fault", "--clear", "w-1"]);
    assert!(o.status.success(), "{}", text(&o));
    // unconfirmed: right after its deploy the admin box cannot reach ctl-a.
    assert!(report_node(&lab.preflight(), "ctl-a")["report"].is_object());
    let o = lab.deploy_hook("ctl-a").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r = lab.preflight();
    assert_eq!(status_of(&r, "ctl-a"), "timeout", "{r:#}");
    assert!(
        report_node(&r, "w-1")["report"].is_object(),
        "only ctl-a is cut off"
    );
    // worker-restarts-early: w-2's k3s restarted when the server switched and
    // came up without Flannel, before its turn; w-1 kept Flannel.
    lab.wait_node("ctl-a", "True", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(600));
    let r = lab.preflight();
    let w2 = report_node(&r, "w-2");
    assert!(
        check(w2, "cni.active")["message"]
            .as_str()
            .unwrap()
            .contains("/etc/cni/net.d"),
        "{w2:#}"
    );
    let w1 = report_node(&r, "w-1");
    assert!(
        check(w1, "cni.active")["message"]
            .as_str()
            .unwrap()
            .contains("10-flannel"),
        "{w1:#}"
    );
    assert!(lab.cilium_pod("kube-system", "w-2").contains("1/1"));
    // The rollback the agents run (the dead-man's) brings ctl-a back within reach.
    let o = lab.lab(&["rollback", "ctl-a"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(report_node(&lab.preflight(), "ctl-a")["report"].is_object());
}
