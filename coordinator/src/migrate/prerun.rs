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
    let run = j.run.clone();
    let halt = |step: &str, cause: String| Halt {
        node: None,
        step: step.into(),
        cause,
        aftermath: "no node was touched by this run's start".into(),
        resume: resume.to_string(),
        rollback: None,
    };
    let write = |j: &mut Journal, rec: Record| {
        j.append(rec)
            .map_err(|e| format!("the journal cannot be written: {e}"))
    };
    if inv.cilium.values.is_some() {
        let start = Instant::now();
        let d = values_deadline(inv);
        sink(&event(
            &run,
            VALUES,
            Phase::Started,
            start,
            d,
            String::new(),
        ));
        let r = tokio::time::timeout(d, crate::values::gate(kube, inv, tls))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the values check did not finish within {}",
                    humantime::format_duration(d)
                ))
            });
        let rec = match &r {
            Ok(m) => Record::Done {
                node: None,
                step: VALUES.into(),
                time: journal::now(),
                detail: m.clone(),
            },
            Err(c) => Record::Failed {
                node: None,
                step: VALUES.into(),
                time: journal::now(),
                cause: c.clone(),
            },
        };
        write(j, rec).map_err(|e| halt(VALUES, e))?;
        match r {
            Ok(m) => sink(&event(&run, VALUES, Phase::Done, start, d, m)),
            Err(c) => {
                sink(&event(&run, VALUES, Phase::Failed, start, d, c.clone()));
                return Err(halt(VALUES, c));
            }
        }
    }
    if !state.cluster.done.contains(BACKUP) {
        let start = Instant::now();
        let d = backup_deadline(inv);
        sink(&event(
            &run,
            BACKUP,
            Phase::Started,
            start,
            d,
            String::new(),
        ));
        write(
            j,
            Record::Intent {
                node: None,
                step: BACKUP.into(),
                time: journal::now(),
            },
        )
        .map_err(|e| halt(BACKUP, e))?;
        let b = tokio::time::timeout(
            d,
            crate::backup::backup(kube, &state_dir.join("backups"), &inv.cluster.name),
        )
        .await;
        let b = b.unwrap_or_else(|_| {
            Err(crate::backup::BackupError::Io {
                path: state_dir.join("backups"),
                error: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not finished within {}", humantime::format_duration(d)),
                ),
            })
        });
        match b {
            Ok(b) => {
                let detail = format!(
                    "{} objects saved to {} (restore: kubectl apply -f {})",
                    b.objects,
                    b.dir.display(),
                    b.dir.display()
                );
                write(
                    j,
                    Record::Done {
                        node: None,
                        step: BACKUP.into(),
                        time: journal::now(),
                        detail: detail.clone(),
                    },
                )
                .map_err(|e| halt(BACKUP, e))?;
                sink(&event(&run, BACKUP, Phase::Done, start, d, detail));
            }
            Err(e) => {
                let cause = format!("the backup failed, so nothing is touched without one: {e}");
                write(
                    j,
                    Record::Failed {
                        node: None,
                        step: BACKUP.into(),
                        time: journal::now(),
                        cause: cause.clone(),
                    },
                )
                .map_err(|e| halt(BACKUP, e))?;
                sink(&event(&run, BACKUP, Phase::Failed, start, d, cause.clone()));
                return Err(halt(BACKUP, cause));
            }
        }
    }
    Ok(())
}
