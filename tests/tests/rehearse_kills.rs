//! The kill matrix (issue 15): the real `cnishift migrate` of a lab of one
//! controller and two workers SIGKILLed at step boundaries and at random moments, then
//! run again. Every time the run goes on and ends with every node migrated,
//! Ready, labelled and uncordoned, and no deploy ran twice unless a kill fell
//! inside it (the lab's hooks log every run: DIR/logs/hooks.log).
//!
//! The exact boundaries come from the coordinator's own test hook
//! (`CNISHIFT_TEST_KILL_AFTER_RECORDS=N`, feature `test-hooks`: the process
//! kills itself with SIGKILL right after the Nth journal record it wrote is
//! on disk). `cargo test --workspace` builds target/debug/cnishift with it;
//! alone: `cargo build -p cnishift --features test-hooks` first.
//!
//! What each test proves, and what it does not:
//!
//! - `every_step_boundary_survives_a_chain_of_kills`: ONE lab, ONE run that is
//!   killed after the journal header, then after every intent and every done
//!   record of every node (the controller's and both workers') and of the
//!   cluster steps (the backup before the nodes, the etcd snapshot before the
//!   first controller's cordon, verify-cluster and cleanup after), each
//!   resumed run being itself killed at the next boundary (81 kill points). It proves that a run resumed from each boundary
//!   writes the right next record (the test checks the journal's tail after
//!   every kill), that the final resume completes, and that no external side
//!   effect is repeated (one deploy per node, no rollback). It does NOT prove
//!   that a run resumed from boundary k completes *by itself*: each resumed
//!   run lives for one step only, so state a resumed run computes at its
//!   start and uses many steps later is exercised over one step. That is what
//!   the independent kill points below are for.
//! - `independent_kill_points_each_resume_to_the_end`: four boundaries chosen
//!   where a kill matters most (before a controller's deploy, after a
//!   worker's deploy, before a worker's confirm with the dead-man clock
//!   running, before the cleanup), each from a fresh lab, killed once and
//!   then resumed by ONE run to the end.
//! - `twenty_kills_at_random_moments`: kills from outside at random moments
//!   (uniform in 20 ms – 2.5 s after each start, seed printed, overridable
//!   with CNISHIFT_KILL_SEED), chained the same way until 20 kills landed on a
//!   running coordinator, across as many fresh labs as that takes; these land
//!   inside steps and hooks and mid-write (a torn journal line), not only at
//!   boundaries.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cnishift_lab::harness::{boundary, cnishift_bin, journal, planned_boundaries, text, Up};
use cnishift_lab::require_root;

const LABEL: &str = "cnishift.io/cni";
const NODES: [&str; 3] = ["ctl-a", "w-1", "w-2"];

/// One controller and two workers. `confirm` is a minute: in the chain a
/// node's arm and confirm are a dozen coordinator restarts apart.
const INVENTORY: &str = r#"
[cluster]
name = "kill-matrix"
pod_cidr = "10.63.0.0/16"

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
confirm = "60s"
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

/// At most two labs at once in this file (two cores).
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

/// The coordinator these tests run must have the kill hook.
fn require_hook() {
    let bin = cnishift_bin();
    let bytes = std::fs::read(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let needle = b"CNISHIFT_TEST_KILL_AFTER_RECORDS";
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle),
        "{} was built without the `test-hooks` feature, so it cannot be killed at an exact boundary: \
         `cargo test --workspace` builds it with the hook; to run this file alone, \
         `cargo build -p cnishift --features test-hooks` first",
        bin.display()
    );
}

fn state(lab: &Up) -> PathBuf {
    lab.dir.with_file_name("migrate-state")
}

/// `cnishift migrate -o json` killed by its own hook after `records` records.
fn migrate_killed_after(lab: &Up, records: usize) -> Output {
    lab.cnishift_cmd("migrate", &state(lab))
        .args(["-o", "json"])
        .env("CNISHIFT_TEST_KILL_AFTER_RECORDS", records.to_string())
        .output()
        .unwrap()
}

fn migrate_to_the_end(lab: &Up, why: &str) {
    let o = lab
        .cnishift_cmd("migrate", &state(lab))
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{why}:\n{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for l in stdout.lines() {
        let e: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            !["failed", "halted"].contains(&e["phase"].as_str().unwrap_or("")),
            "{why}: {e}"
        );
    }
}

fn tail(lab: &Up) -> String {
    journal(&state(lab))
        .last()
        .map(boundary)
        .unwrap_or_else(|| "nothing".into())
}

/// How many records the next run writes before it reaches the next boundary:
/// a fresh run writes the header first; a run resumed after an intent writes
/// that intent again (the step is done again) before its outcome.
fn records_to_next_boundary(lab: &Up) -> usize {
    let recs = journal(&state(lab));
    match recs.last() {
        None => 1,
        Some(r) if r["type"] == "intent" => 2,
        Some(_) => 1,
    }
}

/// The cluster after the last run: every node migrated, Ready, uncordoned,
/// the journal done; `extra_deploys` says how many deploys of a node may
/// have run again (kills that fell inside its Deploy).
fn assert_migrated_once(lab: &Up, extra_deploys: &std::collections::BTreeMap<String, usize>) {
    for n in NODES {
        assert_eq!(
            lab.node_state(n, LABEL),
            (false, Some("cilium".to_string())),
            "{n} is not migrated and uncordoned"
        );
        assert_eq!(lab.node_ready(n).0, "True", "{n} is not Ready");
    }
    let deploys = lab.hook_runs("deploy");
    for n in NODES {
        let ran = deploys.get(n).copied().unwrap_or(0);
        let may = 1 + extra_deploys.get(n).copied().unwrap_or(0);
        assert!(
            (1..=may).contains(&ran),
            "{n}: the deploy hook ran {ran} times, at most {may} allowed ({} kill(s) inside its deploy): {deploys:?}",
            may - 1
        );
    }
    assert!(
        lab.hook_runs("rollback").is_empty(),
        "a node was rolled back: {:?}",
        lab.hook_runs("rollback")
    );
    let s = lab
        .cnishift_cmd("status", &state(lab))
        .args(["-o", "json"])
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    for n in s["nodes"].as_array().unwrap() {
        assert_eq!(n["journal"], "done", "{s:#}");
    }
    assert_eq!(s["next"], "nothing: the run is complete", "{s:#}");
}

#[test]
fn every_step_boundary_survives_a_chain_of_kills() {
    if !require_root("the kill matrix") {
        return;
    }
    require_hook();
    let _slot = Slot::take();
    let started = Instant::now();
    let lab = Up::new(INVENTORY, &[]);
    let points = planned_boundaries(&lab.cluster_toml());
    // The header, the backup's and the etcd snapshot's intent and done, 24
    // per node, the cluster steps'.
    assert_eq!(points.len(), 1 + 2 + 3 * 24 + 2 + 4, "{points:?}");
    for (k, want) in points.iter().enumerate() {
        let n = records_to_next_boundary(&lab);
        let o = migrate_killed_after(&lab, n);
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGKILL),
            "kill point {} ({want}): the run was not killed there ({}); the journal ends at {}:\n{}",
            k + 1,
            o.status,
            tail(&lab),
            text(&o)
        );
        assert_eq!(
            &tail(&lab),
            want,
            "kill point {}: the resumed run's next record is not the plan's",
            k + 1
        );
    }
    migrate_to_the_end(&lab, "the run after the last kill");
    assert_migrated_once(&lab, &Default::default());
    // The issue's count is the controller's and one worker's boundaries;
    // the chain also killed w-2's, the header and the cluster steps'.
    let issue: usize = points
        .iter()
        .filter(|p| p.contains(" ctl-a ") || p.contains(" w-1 "))
        .count();
    eprintln!(
        "kill matrix (chain): {} of {} kill points survived ({issue} of {issue} of ctl-a and w-1), in {:.1} s",
        points.len(),
        points.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn independent_kill_points_each_resume_to_the_end() {
    if !require_root("the kill matrix") {
        return;
    }
    require_hook();
    let points = [
        "intent ctl-a deploy",
        "done w-1 deploy",
        "intent w-1 confirm",
        "intent cluster cleanup",
    ];
    let started = Instant::now();
    let survived: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = points
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let _slot = Slot::take();
                    let lab = Up::new(INVENTORY, &[]);
                    let plan = planned_boundaries(&lab.cluster_toml());
                    let k = plan
                        .iter()
                        .position(|b| b == p)
                        .expect("a planned boundary")
                        + 1;
                    let o = migrate_killed_after(&lab, k);
                    assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{p}: {}", text(&o));
                    assert_eq!(tail(&lab), *p, "killed at the wrong record");
                    migrate_to_the_end(&lab, &format!("one resume after a kill at {p}"));
                    assert_migrated_once(&lab, &Default::default());
                    p.to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "kill matrix (independent): {} of {} kill points survived ({}), in {:.1} s",
        survived.len(),
        points.len(),
        survived.join(", "),
        started.elapsed().as_secs_f64()
    );
}

/// xorshift64*: enough to spread kill moments, and reproducible by its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Runs `migrate` and SIGKILLs it `delay` after its start, if it still runs.
/// Returns None when it was killed, its output when it ended first.
fn migrate_killed_at(lab: &Up, delay: Duration) -> Option<Output> {
    let mut child = lab
        .cnishift_cmd("migrate", &state(lab))
        .args(["-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) of our own, not yet reaped, child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let o = child.wait_with_output().unwrap();
    match o.status.signal() {
        Some(libc::SIGKILL) => None,
        _ => Some(o),
    }
}

#[test]
fn twenty_kills_at_random_moments() {
    if !require_root("the kill matrix") {
        return;
    }
    let seed = std::env::var("CNISHIFT_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("random kills: CNISHIFT_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut kills = 0;
    let mut labs = 0;
    while kills < 20 {
        let _slot = Slot::take();
        let lab = Up::new(INVENTORY, &[]);
        labs += 1;
        let mut inside_deploy: std::collections::BTreeMap<String, usize> = Default::default();
        let mut landed = vec![];
        loop {
            if kills == 20 {
                migrate_to_the_end(&lab, "the run after the 20th kill");
                break;
            }
            let delay = Duration::from_millis(rng.between(20, 2500));
            match migrate_killed_at(&lab, delay) {
                None => {
                    kills += 1;
                    let at = tail(&lab);
                    if let Some(node) = at
                        .strip_prefix("intent ")
                        .and_then(|r| r.strip_suffix(" deploy"))
                    {
                        *inside_deploy.entry(node.to_string()).or_insert(0) += 1;
                    }
                    landed.push(format!("{}ms→{at}", delay.as_millis()));
                }
                Some(o) => {
                    assert_eq!(
                        o.status.code(),
                        Some(0),
                        "a run after kill {kills} (seed {seed}) did not go on:\n{}",
                        text(&o)
                    );
                    break;
                }
            }
        }
        assert_migrated_once(&lab, &inside_deploy);
        eprintln!(
            "random kills, lab {labs}: {} kills at {}",
            landed.len(),
            landed.join(", ")
        );
    }
    eprintln!(
        "random kills: {kills} of 20 survived across {labs} lab(s), in {:.1} s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
}
