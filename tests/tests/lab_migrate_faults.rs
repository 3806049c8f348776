//! `cnishift migrate` end to end across a `cnishift-lab up` lab with a fault
//! injected: the real coordinator, the real agents (whose dead-man rollback
//! runs `cnishift-lab rollback`), observed the way an admin would — exit code,
//! message, `-o json` events, `cnishift status`, and the machine's `kubectl` —
//! never through lab internals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use cnishift_lab::harness::{cnishift_bin, text, Up};
use cnishift_lab::require_root;
use serde_json::Value;

const LABEL_KEY: &str = "cnishift.io/cni";

/// One lab at a time: every test here races an 8 s dead-man clock, and the
/// machine has two cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One controller and `workers` workers, with deadlines short enough that a
/// dead-man rollback (confirm 8 s: arm to confirm takes ~2 s here, more under load) and every wait stay within seconds.
fn inventory(cluster: &str, workers: usize) -> String {
    let mut s = format!(
        r#"
[cluster]
name = "{cluster}"
pod_cidr = "10.62.0.0/16"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "3s"
api = "2s"
drain = "5s"
node_ready = "4s"
cilium_ready = "4s"
deploy = "10s"
confirm = "8s"
rollback = "20s"
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
"#
    );
    for w in 1..=workers {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"w-{w}\"\nrole = \"worker\"\naddress = \"10.9.9.{}:7443\"\n",
            w + 1
        ));
    }
    s
}

/// The real `cnishift`, with the lab's inventory and kubeconfig given as an
/// admin would give them, and a state dir of the test's.
fn cnishift(lab: &Up, state: &Path, args: &[&str]) -> Output {
    Command::new(cnishift_bin())
        .arg(args[0])
        .arg("-i")
        .arg(lab.cluster_toml())
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .arg("--state-dir")
        .arg(state)
        .args(&args[1..])
        .env_remove("CNISHIFT_INVENTORY")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

struct Run {
    code: Option<i32>,
    events: Vec<Value>,
    stderr: String,
    all: String,
}

impl Run {
    fn of_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["node"] == node)
    }
    fn halted(&self) -> &Value {
        self.events
            .iter()
            .find(|e| e["phase"] == "halted")
            .unwrap_or_else(|| panic!("no halted event:\n{}", self.all))
    }
}

fn migrate(lab: &Up, state: &Path) -> Run {
    let o = cnishift(lab, state, &["migrate", "-o", "json"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let events = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout not JSON only: {e}: {l}"))
        })
        .collect();
    Run {
        code: o.status.code(),
        events,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        all: text(&o),
    }
}

/// `cnishift status -o json`: the journal and the live state, per node.
fn status(lab: &Up, state: &Path) -> Value {
    let o = cnishift(lab, state, &["status", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

fn status_node<'a>(s: &'a Value, node: &str) -> &'a Value {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {s:#}"))
}

/// What kubectl says of a node: (cordoned, the migration label's value).
fn kube_node(lab: &Up, node: &str) -> (bool, Option<String>) {
    let v: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "node", node, "-o", "json"])).unwrap();
    (
        v["spec"]["unschedulable"].as_bool().unwrap_or(false),
        v["metadata"]["labels"][LABEL_KEY]
            .as_str()
            .map(str::to_string),
    )
}

fn state_dir(lab: &Up) -> PathBuf {
    lab.dir.with_file_name("migrate-state")
}

fn assert_untouched(lab: &Up, run: &Run, node: &str) {
    assert_eq!(
        run.of_node(node).count(),
        0,
        "{node} was started:\n{}",
        run.all
    );
    assert_eq!(kube_node(lab, node), (false, None), "{node} was touched");
}

fn assert_migrated(lab: &Up, node: &str) {
    assert_eq!(
        kube_node(lab, node),
        (false, Some("cilium".to_string())),
        "{node} not migrated and uncordoned"
    );
}

/// A clean resume with the same state dir finishes the migration.
fn clear_and_resume(lab: &Up, state: &Path, nodes: &[&str]) {
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = migrate(lab, state);
    assert_eq!(run.code, Some(0), "resume:\n{}", run.all);
    assert!(
        run.events
            .iter()
            .any(|e| e["step"] == "verify-cluster" && e["phase"] == "done"),
        "{}",
        run.all
    );
    let s = status(lab, state);
    for n in nodes {
        assert_migrated(lab, n);
        assert_eq!(status_node(&s, n)["journal"], "done", "{n}: {s:#}");
    }
}

/// `cnishift status -o json`'s arm state is structured; its table column a
/// sentence (never a Rust Debug string).
fn arm_state_is_rolled_back(node: &Value) -> bool {
    node["arm_state"]["state"] == "rolled-back" && node["arm_state"]["ok"] == true
}

/// The Cilium pods kubectl sees on `node`.
fn cilium_pods_on(lab: &Up, node: &str) -> usize {
    lab.cilium_pod("kube-system", node).lines().count()
}

#[test]
fn unconfirmed_worker_is_rolled_back_by_its_agent_and_a_resume_finishes() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let _one = one_at_a_time();
    let lab = Up::new(
        &inventory("mf-unconfirmed", 2),
        &["--fault", "w-1:unconfirmed"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);

    // Deployed, then cut off from the admin box: a step that needs the
    // agent between deploy and confirm fails, and the agent's own dead-man
    // clock (confirm = 8s) rolls the node back; migrate waits and says so.
    let deployed = run
        .of_node("w-1")
        .any(|e| e["step"] == "deploy" && e["phase"] == "done");
    assert!(deployed, "{}", run.all);
    let halted = run.halted();
    assert_eq!(halted["node"], "w-1", "{halted}");
    let step = halted["step"].as_str().unwrap().to_string();
    assert!(
        ["label", "wait-cilium-ready", "repod", "verify", "confirm"].contains(&step.as_str()),
        "halted at {step}: {}",
        run.all
    );
    assert!(
        !run.of_node("w-1")
            .any(|e| e["step"] == "confirm" && e["phase"] == "done"),
        "confirmed although cut off: {}",
        run.all
    );
    let rollback = run
        .of_node("w-1")
        .find(|e| e["step"] == "rollback" && e["phase"] == "done")
        .unwrap_or_else(|| panic!("no rollback outcome: {}", run.all));
    assert!(
        rollback["detail"].as_str().unwrap().contains("rolled back"),
        "{rollback}"
    );
    assert!(
        run.stderr
            .contains(&format!("cnishift: halted at w-1, step {step}: ")),
        "{}",
        run.stderr
    );
    // The truth after the rollback: ctl-a already runs without Flannel, so
    // w-1's k3s (an agent: it takes the backend from the servers) came back
    // without it. Its label stays: Cilium is the only network it can have.
    assert!(
        run.stderr.contains("\n  w-1's agent rolled it back (")
            && run.stderr.contains(
                "but its k3s came back WITHOUT Flannel: the servers already run --flannel-backend=none, and a k3s agent takes the backend from them when it starts; its label cnishift.io/cni=cilium is kept, so Cilium"
            )
            && run.stderr.contains(
                "; it stays cordoned; a resume migrates it again from its preflight (its being NotReady does not block that)\n"
            ),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("rolled back to Flannel"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\n  nothing further was started\n"),
        "{}",
        run.stderr
    );
    assert!(run
        .stderr
        .contains("  to resume:       cnishift migrate -i "));
    assert!(run
        .stderr
        .contains("  to roll it back: cnishift rollback -i "));

    // kubectl: the node stays cordoned; the controller before it migrated and
    // uncordoned; the worker after it untouched.
    assert!(kube_node(&lab, "w-1").0, "w-1 is not cordoned");
    assert_migrated(&lab, "ctl-a");
    assert_untouched(&lab, &run, "w-2");

    // cnishift status: the journal's failure, the agent's rollback, the
    // live cordon; the next node not started.
    let s = status(&lab, &state);
    let w1 = status_node(&s, "w-1");
    assert_eq!(w1["journal"], format!("failed at {step}"), "{s:#}");
    assert_eq!(w1["live"]["cordoned"], true, "{s:#}");
    assert!(arm_state_is_rolled_back(w1), "{s:#}");
    assert_eq!(w1["k3s"], "none", "{s:#}");
    assert_eq!(w1["live"]["labelled"], true, "{s:#}");
    assert!(
        w1["arm"].as_str().unwrap().starts_with("rolled back: "),
        "{s:#}"
    );
    let w2 = status_node(&s, "w-2");
    assert_eq!(w2["journal"], "not started", "{s:#}");
    assert_eq!(w2["live"]["cordoned"], false, "{s:#}");
    assert_eq!(w2["live"]["labelled"], false, "{s:#}");
    assert_eq!(w2["k3s"], "flannel", "{s:#}");
    assert_eq!(s["next"], "w-1 preflight", "{s:#}");

    clear_and_resume(&lab, &state, &["ctl-a", "w-1", "w-2"]);
}

#[test]
fn a_deploy_hook_failing_on_the_fourth_worker_halts_there_and_later_workers_are_untouched() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let _one = one_at_a_time();
    let lab = Up::new(
        &inventory("mf-hookfails", 5),
        &["--fault", "w-4:hook-fails"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);

    const HOOK_SAYS: &str = "switch-to-configuration failed (injected by the lab: hook-fails)";
    let failed = run
        .of_node("w-4")
        .find(|e| e["phase"] == "failed")
        .unwrap_or_else(|| panic!("no failure on w-4: {}", run.all));
    assert_eq!(failed["step"], "deploy", "{failed}");
    assert!(
        failed["detail"].as_str().unwrap().contains(HOOK_SAYS),
        "{failed}"
    );
    let halted = run.halted();
    assert_eq!(
        (&halted["node"], &halted["step"]),
        (&"w-4".into(), &"deploy".into()),
        "{halted}"
    );
    let first = run.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("cnishift: halted at w-4, step deploy: ") && first.contains(HOOK_SAYS),
        "{}",
        run.stderr
    );
    // Its agent's rollback restarted its k3s, which took the servers'
    // backend (none): the aftermath says so, and what comes next.
    assert!(
        run.stderr.contains("\n  w-4's agent rolled it back (")
            && run.stderr.contains("but its k3s came back WITHOUT Flannel: the servers already run --flannel-backend=none")
            && run.stderr.contains(
                "it is not labelled cnishift.io/cni=cilium, so Cilium does not start there either: it has no pod network, and is NotReady, until it is migrated; it stays cordoned; a resume migrates it again from its preflight"
            ),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("rolled back to Flannel"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\n  nothing further was started\n"),
        "{}",
        run.stderr
    );

    // kubectl: everything before it migrated and uncordoned, it cordoned and
    // never labelled, w-5 untouched.
    for n in ["ctl-a", "w-1", "w-2", "w-3"] {
        assert_migrated(&lab, n);
    }
    assert_eq!(kube_node(&lab, "w-4"), (true, None), "w-4");
    assert_untouched(&lab, &run, "w-5");

    let s = status(&lab, &state);
    assert_eq!(
        status_node(&s, "w-4")["journal"],
        "failed at deploy",
        "{s:#}"
    );
    assert_eq!(status_node(&s, "w-4")["live"]["cordoned"], true, "{s:#}");
    assert_eq!(status_node(&s, "w-5")["journal"], "not started", "{s:#}");
    for n in ["ctl-a", "w-1", "w-2", "w-3"] {
        assert_eq!(status_node(&s, n)["journal"], "done", "{n}: {s:#}");
    }
    // No node but w-4 is left cordoned; cleared, the same command finishes.
    for n in ["ctl-a", "w-1", "w-2", "w-3", "w-5"] {
        assert!(!kube_node(&lab, n).0, "{n} is cordoned");
    }
    let w4 = status_node(&s, "w-4");
    assert_eq!(w4["k3s"], "none", "{s:#}");
    assert_eq!(w4["live"]["ready"], false, "{s:#}");
    assert!(arm_state_is_rolled_back(w4), "{s:#}");
    assert_eq!(s["next"], "w-4 preflight", "{s:#}");

    // The resume goes on with w-4 although it is NotReady (it is the run's
    // own halted node); no other node was NotReady.
    clear_and_resume(&lab, &state, &["ctl-a", "w-1", "w-2", "w-3", "w-4", "w-5"]);
}

#[test]
fn an_unconfirmed_controller_goes_back_to_flannel_and_loses_its_label() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let _one = one_at_a_time();
    let lab = Up::new(
        &inventory("mf-ctl-unconfirmed", 1),
        &["--fault", "ctl-a:unconfirmed"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);
    assert_eq!(run.halted()["node"], "ctl-a", "{}", run.all);
    assert!(
        run.of_node("ctl-a")
            .any(|e| e["step"] == "label" && e["phase"] == "done"),
        "{}",
        run.all
    );
    // A server takes its backend from its own flags: the rollback brought
    // Flannel back, and the label goes, so Cilium's DaemonSet leaves it.
    assert!(
        run.stderr.contains("\n  ctl-a was rolled back to Flannel by its agent: ")
            && run.stderr.contains(
                "; its k3s runs Flannel again; its label cnishift.io/cni is removed, so Cilium's DaemonSet leaves it; it stays cordoned; a resume migrates it again from its preflight\n"
            ),
        "{}",
        run.stderr
    );
    assert!(
        run.of_node("ctl-a")
            .any(|e| e["step"] == "unlabel" && e["phase"] == "done"),
        "{}",
        run.all
    );
    assert_eq!(
        kube_node(&lab, "ctl-a"),
        (true, None),
        "cordoned, unlabelled"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cilium_pods_on(&lab, "ctl-a") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Cilium's pod stays on ctl-a, back on Flannel: {}",
            lab.cilium_pod("kube-system", "ctl-a")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let s = status(&lab, &state);
    let c = status_node(&s, "ctl-a");
    assert_eq!(c["k3s"], "flannel", "{s:#}");
    assert!(arm_state_is_rolled_back(c), "{s:#}");
    assert_untouched(&lab, &run, "w-1");

    clear_and_resume(&lab, &state, &["ctl-a", "w-1"]);
}

#[test]
fn a_worker_whose_k3s_restarts_early_without_flannel_halts_the_run_naming_it() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let _one = one_at_a_time();
    let lab = Up::new(
        &inventory("mf-early", 2),
        &["--fault", "w-2:worker-restarts-early"],
    );
    let state = state_dir(&lab);
    let run = migrate(&lab, &state);
    assert_eq!(run.code, Some(1), "{}", run.all);

    // The controller's switch restarted w-2's k3s without Flannel; the watch
    // between steps sees it and halts, naming w-2 and its own state (not the
    // controller's next step), before any worker starts.
    let halted = run.halted();
    assert_eq!(
        (&halted["node"], &halted["step"]),
        (&"w-2".into(), &"watch".into()),
        "{halted}"
    );
    let first = run.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("cnishift: halted at w-2, before its turn: worker w-2 came up without Flannel before its turn (its agent says so)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            "\n  w-2 is not started (not cordoned, not labelled): with no Flannel and no Cilium its pods have no network, and it is NotReady, until it is migrated; a resume migrates it first of the workers"
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\n  nothing further was started\n"),
        "{}",
        run.stderr
    );
    // The controller in flight is left in a state the halt explains, and
    // the run waited for it: confirmed if it had passed Verify, else rolled
    // back by its agent (back on Flannel, label removed) — never left armed
    // to roll back unreported after migrate exits.
    let confirmed = run.stderr.contains(
        "ctl-a had passed Verify, so it is confirmed on Cilium rather than left to roll back",
    );
    let rolled_back = run.stderr.contains(
        "ctl-a was switched but not verified, so it is left to its agent's dead-man rollback: ctl-a was rolled back to Flannel by its agent: ",
    ) && run
        .stderr
        .contains("its label cnishift.io/cni is removed, so Cilium's DaemonSet leaves it");
    assert!(confirmed ^ rolled_back, "{}", run.stderr);
    let s = status(&lab, &state);
    let c = status_node(&s, "ctl-a");
    if rolled_back {
        assert!(arm_state_is_rolled_back(c), "{s:#}");
        assert_eq!(kube_node(&lab, "ctl-a"), (true, None), "{s:#}");
        assert_eq!(c["k3s"], "flannel", "{s:#}");
    } else {
        assert_eq!(c["arm_state"]["state"], "confirmed", "{s:#}");
        assert_eq!(kube_node(&lab, "ctl-a"), (true, Some("cilium".into())));
    }
    assert!(
        run.events
            .iter()
            .filter(|e| e["node"] == "w-1" || e["node"] == "w-2")
            .all(|e| e["phase"] == "halted" || e["step"] == "watch"),
        "a worker was started: {}",
        run.all
    );
    assert_untouched(&lab, &run_without_watch(&run), "w-1");
    assert_untouched(&lab, &run_without_watch(&run), "w-2");
    let w2 = status_node(&s, "w-2");
    assert_eq!(w2["k3s"], "none", "{s:#}");
    assert_eq!(w2["journal"], "no Flannel before its turn", "{s:#}");
    assert_eq!(status_node(&s, "w-1")["k3s"], "flannel", "{s:#}");

    // The resume: the controller (again, if it was rolled back), then w-2
    // first of the workers — NotReady, but the run's own halted node — then w-1.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let again = migrate(&lab, &state);
    assert_eq!(again.code, Some(0), "resume:\n{}", again.all);
    let at = |node: &str| {
        again
            .events
            .iter()
            .position(|e| e["node"] == node && e["step"] == "preflight")
            .unwrap_or_else(|| panic!("{node} not migrated: {}", again.all))
    };
    assert!(at("w-2") < at("w-1"), "{}", again.all);
    for n in ["ctl-a", "w-1", "w-2"] {
        assert_migrated(&lab, n);
    }
}

/// The run without its halt and the watch's own events (the worker was
/// only watched, never started).
fn run_without_watch(run: &Run) -> Run {
    Run {
        code: run.code,
        events: run
            .events
            .iter()
            .filter(|e| e["phase"] != "halted" && e["step"] != "watch")
            .cloned()
            .collect(),
        stderr: run.stderr.clone(),
        all: run.all.clone(),
    }
}
