//! Before the driver walks the nodes: the run-wide gate and safety copy,
//! journaled as cluster steps so a resumed run knows them.
//!
//! - `values`: with `[cilium] values` in the inventory, the Helm values
//!   Cilium will be installed with are checked against the cluster
//!   ([`crate::values::gate`]) at every start of the run (facts change as
//!   nodes move); a failing finding halts before any step.
//! - `backup`: [`crate::backup`] into `<state dir>/backups`, once per run
//!   journal, before the first node is touched; its path is the record's
//!   detail. A failed backup halts: nothing is touched without one.

use std::path::Path;
use std::time::{Duration, Instant};

use super::journal::{self, Journal, Record, State};
use super::run::{Event, Halt, Phase};
use crate::agents::ClientTls;
use crate::inventory::Inventory;
use crate::kube::Kube;

pub const VALUES: &str = "values";
pub const BACKUP: &str = "backup";

fn event(
    run: &str,
    step: &str,
    phase: Phase,
    start: Instant,
    deadline: Duration,
    detail: String,
) -> Event {
    Event {
        time: journal::now(),
        run: run.to_string(),
        node: None,
        step: step.into(),
        phase,
        elapsed_ms: start.elapsed().as_millis() as u64,
        deadline_ms: Some(deadline.as_millis() as u64),
        detail,
    }
}

/// The values gate's deadline: one report and one dial from every node (at
/// once) and the API's answers, each bounded by its own deadline.
pub fn values_deadline(inv: &Inventory) -> Duration {
    inv.deadlines.report + inv.deadlines.api
}

/// The backup's: four lists from the API, one after another, and the writing.
pub fn backup_deadline(inv: &Inventory) -> Duration {
    inv.deadlines.api * 4 + Duration::from_secs(10)
}

/// What [`before_nodes`] would do, as `dry-run` events (a dry run touches
/// nothing: no API call, no file).
pub fn dry_run(inv: &Inventory, state: &State, state_dir: &Path, sink: &mut dyn FnMut(&Event)) {
    let now = Instant::now();
    if let Some(v) = &inv.cilium.values {
        sink(&event(
            "dry-run",
            VALUES,
            Phase::DryRun,
            now,
            values_deadline(inv),
            format!(
                "check the Helm values {} against the cluster (a failing finding halts)",
                v.display()
            ),
        ));
    }
    if !state.cluster.done.contains(BACKUP) {
        sink(&event(
            "dry-run",
            BACKUP,
            Phase::DryRun,
            now,
            backup_deadline(inv),
            format!(
                "back up NetworkPolicies, Nodes, PodDisruptionBudgets and the CNI ConfigMaps under {}",
                state_dir.join("backups").display()
            ),
        ));
    }
}

/// Runs the values gate and the backup; Err is the halt to report (also
/// sent to `sink` as a `halted` event, as the driver's halts are).
#[allow(clippy::too_many_arguments)]
pub async fn before_nodes(
    kube: &Kube,
    inv: &Inventory,
    tls: &ClientTls,
    j: &mut Journal,
    state: &State,
    state_dir: &Path,
    resume: &str,
    sink: &mut dyn FnMut(&Event),
) -> Result<(), Halt> {
    let r = gate_and_backup(kube, inv, tls, j, state, state_dir, resume, sink).await;
    if let Err(h) = &r {
        let d = if h.step == VALUES {
            values_deadline(inv)
        } else {
            backup_deadline(inv)
        };
        let mut ev = event(
            &j.run,
            &h.step,
            Phase::Halted,
            Instant::now(),
            d,
            h.to_string(),
        );
        ev.elapsed_ms = 0;
        sink(&ev);
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn gate_and_backup(
    kube: &Kube,
    inv: &Inventory,
    tls: &ClientTls,
    j: &mut Journal,
    state: &State,
    state_dir: &Path,
    resume: &str,
    sink: &mut dyn FnMut(&Event),
) -> Result<(), Halt> {
    let halt = |step: &str, cause: String| Halt {
        node: None,
        step: step.into(),
        cause,
        aftermath: "no node was touched by this run's start".into(),
        resume: resume.to_string(),
        rollback: None,
    };
    if inv.cilium.values.is_some() {
        let d = values_deadline(inv);
        // No intent record: the check changes nothing.
        cluster_step(
            j,
            VALUES,
            d,
            false,
            crate::values::gate(kube, inv, tls),
            format!(
                "the values check did not finish within {}",
                humantime::format_duration(d)
            ),
            &halt,
            sink,
        )
        .await?;
    }
    if !state.cluster.done.contains(BACKUP) {
        let d = backup_deadline(inv);
        let dir = state_dir.join("backups");
        let refused = |e: crate::backup::BackupError| {
            format!("the backup failed, so nothing is touched without one: {e}")
        };
        let timed_out = refused(crate::backup::BackupError::Io {
            path: dir.clone(),
            error: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not finished within {}", humantime::format_duration(d)),
            ),
        });
        let work = async {
            let b = crate::backup::backup(kube, &dir, &inv.cluster.name)
                .await
                .map_err(refused)?;
            Ok(format!(
                "{} objects saved to {} (restore: kubectl apply -f {})",
                b.objects,
                b.dir.display(),
                b.dir.display()
            ))
        };
        cluster_step(j, BACKUP, d, true, work, timed_out, &halt, sink).await?;
    }
    Ok(())
}

/// One run-wide step: its started event; an intent record first when it
/// changes something; `work` under `d` (`timed_out` is the cause past it);
/// then its done or failed record and, once that is written, its event —
/// the driver's order (`Driver::finish`). Err: the halt to report.
#[allow(clippy::too_many_arguments)]
async fn cluster_step(
    j: &mut Journal,
    step: &str,
    d: Duration,
    intent: bool,
    work: impl std::future::Future<Output = Result<String, String>>,
    timed_out: String,
    halt: &dyn Fn(&str, String) -> Halt,
    sink: &mut dyn FnMut(&Event),
) -> Result<(), Halt> {
    let run = j.run.clone();
    let start = Instant::now();
    let mut write = |rec: Record| {
        j.append(rec)
            .map_err(|e| format!("the journal cannot be written: {e}"))
    };
    sink(&event(&run, step, Phase::Started, start, d, String::new()));
    if intent {
        write(Record::Intent {
            node: None,
            step: step.into(),
            time: journal::now(),
        })
        .map_err(|e| halt(step, e))?;
    }
    let r = tokio::time::timeout(d, work)
        .await
        .unwrap_or(Err(timed_out));
    match r {
        Ok(detail) => {
            write(Record::Done {
                node: None,
                step: step.into(),
                time: journal::now(),
                detail: detail.clone(),
            })
            .map_err(|e| halt(step, e))?;
            sink(&event(&run, step, Phase::Done, start, d, detail));
            Ok(())
        }
        Err(cause) => {
            write(Record::Failed {
                node: None,
                step: step.into(),
                time: journal::now(),
                cause: cause.clone(),
            })
            .map_err(|e| halt(step, e))?;
            sink(&event(&run, step, Phase::Failed, start, d, cause.clone()));
            Err(halt(step, cause))
        }
    }
}
