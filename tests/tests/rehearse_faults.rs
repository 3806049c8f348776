//! The fault matrix (issue 15): every fault kind of the lab, one test each,
//! through `cnishift-lab rehearse --fault` (its summary) and the real
//! `cnishift migrate` on the lab it kept, observed as an admin would: exit
//! codes, messages, `-o json` events, the machine's `kubectl`, and the lab's
//! hook log. In each: the run halts at the faulted node and step with a
//! message that says what went wrong; the nodes after it are untouched; the
//! faulted node is cordoned when the run had cordoned it (rolled back by its
//! agent when it was armed), never when the halt came before its Cordon; no
//! other node is left cordoned; and after `cnishift-lab fault --clear` the
//! same `cnishift migrate` resumes and finishes.
//!
//! Three kinds are tested in lab_migrate_faults.rs, with more detail on
//! their messages and on `cnishift status`, and not again here:
//! `unconfirmed`, `hook-fails` (on the fourth worker), `worker-restarts-early`.
//!
//! The faulted node is always w-1 of ctl-a, w-1, w-2, so that a node before
//! it (migrated) and one after it (untouched) are both there to look at.
//! `pdb-blocks` and `slow-api` are cluster-wide in effect, so each is tested
//! twice: present from the start (the run refuses before touching a node)
//! and arriving while w-1's Preflight runs (injected on its `started` event).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};

use cnishift_lab::harness::{lab_bin, text, Up};
use cnishift_lab::require_root;
use serde_json::Value;

const LABEL: &str = "cnishift.io/cni";

/// 1 controller + 2 workers with deadlines of seconds: deploy 3 s (a hung
/// hook is killed then), confirm 10 s (the dead-man clock: a healthy node's
/// arm-to-confirm takes ~2 s here, more under load).
const INVENTORY: &str = r#"
[cluster]
name = "fault-matrix"
pod_cidr = "10.64.0.0/16"

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
deploy = "3s"
confirm = "10s"
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

[[nodes]]
name = "w-1"
role = "worker"
address = "10.9.9.2:7443"

[[nodes]]
name = "w-2"
role = "worker"
address = "10.9.9.3:7443"
"#;

/// At most two labs at once (two cores; each test races a dead-man clock).
struct Slot;
static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());
impl Slot {
    fn take() -> Slot {
        let (m, cv) = &SLOTS;
        let mut n = cv
            .wait_while(m.lock().unwrap_or_else(|e| e.into_inner()), |n| *n >= 2)
            .unwrap_or_else(|e| e.into_inner());
        *n += 1;
        Slot
    }
}
impl Drop for Slot {
    fn drop(&mut self) {
        let (m, cv) = &SLOTS;
        *m.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cv.notify_one();
    }
}

fn state(lab: &Up) -> PathBuf {
    lab.dir.join("migrate-state")
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
    fn failed<'a>(&'a self, node: &'a str) -> &'a Value {
        self.of_node(node)
            .find(|e| e["phase"] == "failed" && e["step"] != "rollback")
            .unwrap_or_else(|| panic!("no failure on {node}:\n{}", self.all))
    }
}

/// `cnishift migrate -o json` on the lab; with `inject`, the fault
/// `(NODE:KIND)` is injected with `cnishift-lab fault` as soon as the event
/// `(node, step, phase)` is printed.
fn migrate(lab: &Up, inject: Option<((&str, &str, &str), &str)>) -> Run {
    let mut child = lab
        .cnishift_cmd("migrate", &state(lab))
        .args(["-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut events = vec![];
    let mut pending = inject;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let e: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout not JSON only: {e}: {line}"));
        if let Some(((n, st, ph), fault)) = pending {
            if e["node"] == n && e["step"] == st && e["phase"] == ph {
                let o = lab.lab(&["fault", fault]);
                assert!(o.status.success(), "{}", text(&o));
                pending = None;
            }
        }
        events.push(e);
    }
    let status = child.wait().unwrap();
    let stderr = err.join().unwrap();
    assert!(
        pending.is_none(),
        "the event to inject on never came:\n{stderr}"
    );
    let all = format!(
        "{}\n{stderr}",
        events
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Run {
        code: status.code(),
        events,
        stderr,
        all,
    }
}

fn assert_untouched(lab: &Up, run: &Run, node: &str) {
    assert_eq!(
        run.of_node(node).filter(|e| e["phase"] != "note").count(),
        0,
        "{node} was started:\n{}",
        run.all
    );
    assert_eq!(
        lab.node_state(node, LABEL),
        (false, None),
        "{node} was touched"
    );
}

fn assert_migrated(lab: &Up, node: &str) {
    assert_eq!(
        lab.node_state(node, LABEL),
        (false, Some("cilium".to_string())),
        "{node} is not migrated and uncordoned"
    );
}

/// Only `node` may be cordoned (by us), or none.
fn only_cordoned(lab: &Up, node: Option<&str>) {
    for n in lab.node_names() {
        let cordoned = lab.node_state(&n, LABEL).0;
        assert_eq!(
            cordoned,
            Some(n.as_str()) == node,
            "{n}: cordoned = {cordoned}, expected only {node:?} cordoned"
        );
    }
}

/// The halt message tells the truth about the node's cordon.
fn cordon_told_truly(lab: &Up, run: &Run, node: &str) {
    let cordoned = lab.node_state(node, LABEL).0;
    let says = run.stderr.contains(&format!("{node} stays cordoned"))
        || run.stderr.contains("; it stays cordoned");
    assert_eq!(
        says, cordoned,
        "the halt message {} that {node} stays cordoned, and kubectl says cordoned = {cordoned}:\n{}",
        if says { "says" } else { "does not say" },
        run.stderr
    );
}

/// `cnishift-lab fault --clear`, then the same `cnishift migrate` finishes.
fn clear_and_resume(lab: &Up) {
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = migrate(lab, None);
    assert_eq!(run.code, Some(0), "the resume after --clear:\n{}", run.all);
    for n in lab.node_names() {
        assert_migrated(lab, &n);
        assert_eq!(lab.node_ready(&n).0, "True", "{n} is not Ready");
    }
}

/// A rehearsal with `--fault w-1:KIND` that fails: its JSON summary.
fn rehearse(kind: &str) -> (Up, Value) {
    let fault = format!("w-1:{kind}");
    let inventory = match kind {
        // ctl-a's migration asks the cut-off w-1's agent at every step
        // boundary and waits out [deadlines] connect (1 s) each time: six of
        // them lie between its arm and its confirm.
        "partition" => INVENTORY.replace("confirm = \"10s\"", "confirm = \"30s\""),
        _ => INVENTORY.to_string(),
    };
    let (lab, o) = Up::rehearse(&inventory, &["--fault", &fault, "-o", "json"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "rehearse --fault {fault}:\n{}",
        text(&o)
    );
    let s: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(s["ok"], false, "{s:#}");
    (lab, s)
}

fn summary_node<'a>(s: &'a Value, node: &str) -> &'a Value {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {s:#}"))
}

/// A fault the whole-cluster preflight sees: the rehearsal stops there,
/// before `migrate`, and nothing is touched.
fn rehearsal_stops_at_preflight(kind: &str, says: &[&str]) -> Up {
    let (lab, s) = rehearse(kind);
    assert_eq!(s["preflight"]["exit_code"], 1, "{s:#}");
    assert_eq!(s["migrate"]["ran"], false, "{s:#}");
    let halted = s["halted"].as_str().unwrap();
    for w in says {
        assert!(
            halted.contains(w),
            "the summary does not say {w:?}:\n{halted}"
        );
    }
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["outcome"], "not started", "{s:#}");
    }
    only_cordoned(&lab, None);
    lab
}

/// A fault that halts `migrate` at w-1's Preflight (w-1 never cordoned).
fn migrate_halts_at_w1_preflight(lab: &Up, says: &[&str]) {
    let run = migrate(lab, None);
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert_eq!(
        (&h["node"], &h["step"]),
        (&"w-1".into(), &"preflight".into()),
        "{h}"
    );
    let cause = run.failed("w-1")["detail"].as_str().unwrap().to_string();
    for w in says {
        assert!(cause.contains(w), "the cause does not say {w:?}: {cause}");
    }
    assert!(
        run.stderr
            .starts_with("cnishift: halted at w-1, step preflight: "),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\n  nothing further was started\n"),
        "{}",
        run.stderr
    );
    assert_migrated(lab, "ctl-a");
    assert_untouched(lab, &run, "w-2");
    only_cordoned(lab, None);
    cordon_told_truly(lab, &run, "w-1");
}

#[test]
fn agent_down_stops_the_rehearsal_at_preflight_and_migrate_at_that_node() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    let lab = rehearsal_stops_at_preflight("agent-down", &["w-1", "unreachable"]);
    migrate_halts_at_w1_preflight(&lab, &["unreachable", "Connection refused"]);
    clear_and_resume(&lab);
}

#[test]
fn a_partitioned_node_stops_the_rehearsal_at_preflight_and_migrate_at_that_node() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    let lab = rehearsal_stops_at_preflight("partition", &["w-1", "timed out"]);
    // The API still sees the node Ready; only its agent is out of reach.
    assert_eq!(lab.node_ready("w-1").0, "True");
    // Either tonic's connect timeout ("deadline has elapsed") or the
    // coordinator's own ("no TLS connection to ... within 1s") fires first,
    // both the same deadline; both are reported as a timeout.
    migrate_halts_at_w1_preflight(&lab, &["timed out: "]);
    clear_and_resume(&lab);
}

#[test]
fn a_blocking_pdb_is_refused_before_any_cordon_and_halts_w1_when_it_appears_later() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    const PDB: &str = "lab-faults/blocked-on-w-1";
    let lab = rehearsal_stops_at_preflight("pdb-blocks", &["pdbs.blocking", PDB]);
    // migrate's own Preflight runs the same gate: it halts at the first node,
    // before any cordon, naming the budget.
    let run = migrate(&lab, None);
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert_eq!(
        (&h["node"], &h["step"]),
        (&"ctl-a".into(), &"preflight".into()),
        "{h}"
    );
    assert!(run.stderr.contains(PDB), "{}", run.stderr);
    only_cordoned(&lab, None);
    cordon_told_truly(&lab, &run, "ctl-a");

    // Cleared, resumed, and the budget comes back while w-1's Preflight
    // runs: the gate (or, if it already passed, the drain) stops at w-1.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = migrate(
        &lab,
        Some((("w-1", "preflight", "started"), "w-1:pdb-blocks")),
    );
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert_eq!(h["node"], "w-1", "{h}");
    let step = h["step"].as_str().unwrap();
    assert!(
        ["preflight", "drain"].contains(&step),
        "halted at {step}: {}",
        run.all
    );
    assert!(
        run.failed("w-1")["detail"]
            .as_str()
            .unwrap()
            .contains("blocked-on-w-1"),
        "the cause does not name the budget: {}",
        run.all
    );
    assert_migrated(&lab, "ctl-a");
    assert_untouched(&lab, &run, "w-2");
    // Cordoned only if the run got as far as its drain.
    only_cordoned(&lab, (step == "drain").then_some("w-1"));
    cordon_told_truly(&lab, &run, "w-1");
    clear_and_resume(&lab);
}

#[test]
fn a_slow_api_is_refused_at_once_and_halts_w1_when_it_turns_slow_later() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let _slot = Slot::take();
    const SAYS: &str = "no answer from the API server within 2s";
    // (A rehearsal would only show its preflight's five gates timing out.)
    let lab = Up::new(INVENTORY, &["--fault", "w-1:slow-api"]);
    let o = lab.cnishift_cmd("migrate", &state(&lab)).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(SAYS), "{err}");
    assert!(!state(&lab).join("journal.jsonl").exists(), "a run began");
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    only_cordoned(&lab, None);

    // The API turns slow while w-1's Preflight runs: its gates cannot be
    // read, and the run halts there (or at the boundary before, reading its
    // Lease), w-1 untouched.
    let run = migrate(
        &lab,
        Some((("w-1", "preflight", "started"), "w-1:slow-api")),
    );
    assert_eq!(run.code, Some(1), "{}", run.all);
    let h = run.halted();
    assert!(h["node"] == "w-1" || h["node"].is_null(), "{h}");
    assert_eq!(h["step"], "preflight", "{h}");
    // The halt's own words name the API's deadline (not only the step's).
    let said = run
        .stderr
        .lines()
        .find(|l| l.starts_with("cnishift: halted at "))
        .unwrap_or_else(|| panic!("no halt line:\n{}", run.stderr));
    assert!(said.contains(SAYS), "{said}");
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_migrated(&lab, "ctl-a");
    assert_untouched(&lab, &run, "w-2");
    only_cordoned(&lab, None);
    cordon_told_truly(&lab, &run, "w-1");
    clear_and_resume(&lab);
}

/// A fault after w-1's Deploy began (armed): the rehearsal halts at `step`,
/// its summary names node, step and cause, w-1's agent rolls it back, it
/// stays cordoned, w-2 is untouched. Returns the kept lab.
fn armed_fault(kind: &str, step: &str, cause_says: &[&str]) -> Up {
    let (lab, s) = rehearse(kind);
    assert_eq!(s["preflight"]["exit_code"], 0, "{s:#}");
    assert_eq!(s["migrate"]["exit_code"], 1, "{s:#}");
    assert_eq!(summary_node(&s, "ctl-a")["outcome"], "migrated", "{s:#}");
    assert_eq!(summary_node(&s, "w-2")["outcome"], "not started", "{s:#}");
    let outcome = summary_node(&s, "w-1")["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with(&format!("failed at {step}: ")),
        "w-1's outcome: {outcome}"
    );
    for w in cause_says {
        assert!(
            outcome.contains(w),
            "w-1's outcome does not say {w:?}: {outcome}"
        );
    }
    assert!(
        outcome.ends_with("; rolled back by its agent"),
        "w-1's outcome: {outcome}"
    );
    let halted = s["halted"].as_str().unwrap();
    assert!(
        halted.starts_with(&format!("cnishift: halted at w-1, step {step}: ")),
        "{halted}"
    );
    // The aftermath line reports the agent's rollback of w-1 (in whatever
    // words: what its k3s came back on is `migrate`'s to say).
    let aftermath = halted.lines().nth(1).unwrap_or_default();
    assert!(
        aftermath.starts_with("  w-1")
            && aftermath.contains("agent")
            && aftermath.contains("rolled"),
        "{halted}"
    );
    assert!(
        halted.contains("\n  nothing further was started\n"),
        "{halted}"
    );
    assert_migrated(&lab, "ctl-a");
    assert_eq!(
        lab.node_state("w-2", LABEL),
        (false, None),
        "w-2 was touched"
    );
    only_cordoned(&lab, Some("w-1"));
    assert_eq!(lab.hook_runs("deploy").get("w-1"), Some(&1));
    assert_eq!(lab.hook_runs("deploy").get("w-2"), None);
    assert_eq!(lab.hook_runs("rollback").get("w-1"), Some(&1));
    lab
}

#[test]
fn a_hanging_deploy_hook_is_killed_at_its_deadline_and_the_node_rolled_back() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    let lab = armed_fault(
        "hook-hangs",
        "deploy",
        &["did not finish within 3s", "process group was killed"],
    );
    // The hung hook's whole process group is gone.
    let hook = format!("deploy --dir {} w-1", lab.dir.display());
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&hook))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "the hung hook still runs: {left:?}");
    clear_and_resume(&lab);
}

#[test]
fn a_node_that_never_turns_ready_halts_its_wait_saying_so() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    // The cause names the node's own condition, not only the deadline.
    let lab = armed_fault("never-ready", "wait-cilium-ready", &["w-1 is NotReady"]);
    clear_and_resume(&lab);
}

#[test]
fn a_crashlooping_cilium_agent_halts_the_wait_naming_its_pod() {
    if !require_root("cnishift-lab rehearse") {
        return;
    }
    let _slot = Slot::take();
    // The cause names the Cilium pod that is not Ready, not only the deadline.
    let lab = armed_fault(
        "cilium-crashloop",
        "wait-cilium-ready",
        &["cilium", "not Ready"],
    );
    clear_and_resume(&lab);
}

#[test]
fn every_fault_kind_is_covered_by_a_test() {
    // The kinds the lab knows, and where each is tested end to end.
    let here = [
        "agent-down",
        "partition",
        "pdb-blocks",
        "slow-api",
        "hook-hangs",
        "never-ready",
        "cilium-crashloop",
    ];
    let in_lab_migrate_faults = ["unconfirmed", "hook-fails", "worker-restarts-early"];
    // The safety gates' own faults, tested with their gates.
    let in_lab_etcd = ["etcd-down", "etcd-snapshot-fails"];
    let in_lab_values = ["other-subnet", "sole-replica"];
    let o = Command::new(lab_bin())
        .args(["fault", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    let mut kinds: Vec<&str> = cnishift_lab::supervisor::FAULT_KINDS.split(", ").collect();
    kinds.sort();
    let mut covered: Vec<&str> = here
        .iter()
        .chain(&in_lab_migrate_faults)
        .chain(&in_lab_etcd)
        .chain(&in_lab_values)
        .copied()
        .collect();
    covered.sort();
    assert_eq!(kinds, covered);
    for k in kinds {
        assert!(
            help.contains(k),
            "`cnishift-lab fault --help` does not explain {k}"
        );
    }
}
