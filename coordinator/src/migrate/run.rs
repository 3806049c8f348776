//! The driver: walks the plan, one step at a time for every node of a wave,
//! journaling an intent before each step and its outcome after, under the
//! step's deadline. The first failure halts between steps: nothing further
//! starts, the node stays cordoned (rolled back by its agent if it was armed
//! and not confirmed), and the message names the node, the step, the cause
//! and the commands to resume or roll back. Between steps the migration
//! Lease is checked (pause, lost) and every worker not yet migrated is
//! watched for a k3s that came up without Flannel.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::hooks::{self, Vars};
use super::journal::{self, Journal, Record, State};
use super::plan::{plan, stranded_first, ClusterStep, PlanOptions, Step};
use super::steps::{ArmState, Cause, Cluster, Control, K3sNetwork, NodeAgents};
use crate::inventory::{Inventory, Node, Role};

#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub no_cleanup: bool,
    pub no_auto_rollback: bool,
    /// How often pause, a rollback's outcome and pods on cni0 are polled.
    pub poll: Duration,
    /// Hook logs go to `<log_dir>/<node>.<step>.log`.
    pub log_dir: PathBuf,
    /// The command that resumes this run, for the halt message.
    pub resume_command: String,
    /// `cnishift rollback` with the inventory, for the halt message (NODE appended).
    pub rollback_command: String,
    /// `--skip-etcd-snapshot`: touch the first controller without an etcd
    /// snapshot of this run (journaled; see migrate/etcd.rs).
    pub skip_etcd_snapshot: bool,
}

/// What happened, one per transition (`-o json` prints these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Started,
    Done,
    Failed,
    Skipped,
    Paused,
    Resumed,
    Halted,
    DryRun,
    Note,
}

/// The event schema (README: "cnishift migrate -o json").
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub run: String,
    /// Absent for cluster steps and run-wide notes.
    pub node: Option<String>,
    pub step: String,
    pub phase: Phase,
    /// Milliseconds since the step started (0 when it starts).
    pub elapsed_ms: u64,
    /// The step's deadline in milliseconds, when it has one.
    pub deadline_ms: Option<u64>,
    pub detail: String,
}

/// Why the run stopped before the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Halt {
    pub node: Option<String>,
    pub step: String,
    pub cause: String,
    /// What became of the node (rolled back, disarmed, left cordoned).
    pub aftermath: String,
    pub resume: String,
    pub rollback: Option<String>,
}

impl fmt::Display for Halt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) if self.step == journal::WATCH => {
                writeln!(f, "halted at {n}, before its turn: {}", self.cause)?
            }
            Some(n) => writeln!(f, "halted at {n}, step {}: {}", self.step, self.cause)?,
            None => writeln!(f, "halted at step {}: {}", self.step, self.cause)?,
        }
        if !self.aftermath.is_empty() {
            writeln!(f, "  {}", self.aftermath)?;
        }
        writeln!(f, "  nothing further was started")?;
        writeln!(f, "  to resume:       {}", self.resume)?;
        if let Some(r) = &self.rollback {
            writeln!(f, "  to roll it back: {r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Halted(Halt),
}

/// The world and the settings every step sees (the journal and the event
/// sink are the driver's alone).
pub struct Ctx<'a, C, A> {
    pub inv: &'a Inventory,
    pub cluster: &'a C,
    pub agents: &'a A,
    pub opts: &'a Options,
    pub run: String,
}

/// How often Repod asks the node's agent whether a pod is left on cni0.
const CNI0_POLL: Duration = Duration::from_millis(100);

/// How much later than its own deadline a step gives up on its work. What a
/// step does enforces its own deadlines (a hook kills its process group, an
/// API call gives up after `[deadlines] api`, the Cilium and Ready waits end
/// at theirs) and says why; the step's timer, a little later, is only the
/// backstop, so that the inner cause — "no answer from the API server within
/// 2s", "w-1 not Ready within 4s" — is the one reported, not the step's.
const STEP_GRACE: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// `f` under `deadline`, plus `grace` (the step's message names the deadline).
fn within<T>(
    deadline: Duration,
    grace: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, Cause>>,
) -> impl std::future::Future<Output = Result<T, Cause>> {
    let what = what.to_string();
    async move {
        tokio::time::timeout(deadline + grace, f)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{what} did not finish within {}",
                    humantime::format_duration(deadline)
                ))
            })
    }
}

impl<C: Cluster, A: NodeAgents> Ctx<'_, C, A> {
    async fn hook(
        &self,
        t: &hooks::Template,
        node: &Node,
        step: &str,
        deadline: Duration,
    ) -> Result<String, Cause> {
        let argv = t.render(&Vars::for_node(node, &self.run));
        let log = self.opts.log_dir.join(format!("{}.{step}.log", node.name));
        hooks::run(&argv, &log, deadline)
            .await
            .map(|()| format!("{} exited 0 (log {})", argv.join(" "), log.display()))
            .map_err(|e| e.to_string())
    }

    /// One step on one node; idempotent, so a resumed run may do it again.
    /// `unfinished`: the run's own started, unfinished nodes (the gates
    /// excuse their being NotReady).
    pub async fn step(
        &self,
        node: &Node,
        step: Step,
        unfinished: &[String],
    ) -> Result<String, Cause> {
        let d = &self.inv.deadlines;
        let name = node.name.as_str();
        match step {
            Step::Preflight => {
                self.agents.preflight(node).await?;
                self.cluster.gates(unfinished).await?;
                let mut msg = "the agent's report is ready and the cluster gates pass".to_string();
                if node.role == Role::Controller {
                    msg = format!("{msg}; {}", super::etcd::gate(self, node).await?);
                }
                Ok(msg)
            }
            Step::Cordon => self.cluster.cordon(name).await,
            Step::Drain => self.cluster.drain(name, d.drain).await,
            Step::ArmRollback => {
                self.agents.arm(node, &self.run, d.confirm).await?;
                Ok(format!(
                    "armed: the agent rolls the node back unless confirmed within {}",
                    humantime::format_duration(d.confirm)
                ))
            }
            Step::Deploy => match &self.inv.hooks.deploy {
                Some(t) => self.hook(t, node, "deploy", d.deploy).await,
                None => Err("[hooks] deploy is not set".into()),
            },
            Step::Label => match &self.inv.cilium.node_label {
                Some((k, v)) => self.cluster.label(name, k, v).await,
                None => Ok("no [cilium] node_label: nothing to set".into()),
            },
            Step::WaitCiliumReady => {
                self.cluster
                    .wait_cilium_and_ready(name, Step::WaitCiliumReady.deadline(d))
                    .await
            }
            Step::Repod => {
                let msg = self.cluster.repod(name, d.repod).await?;
                loop {
                    match self.agents.pods_on_cni0(node).await? {
                        0 => return Ok(format!("{msg}; no pod left on cni0")),
                        n => tracing::debug!("{name}: {n} pods still on cni0"),
                    }
                    // A narrowed report (one netlink dump on the node): asked
                    // often, since the last veth usually goes within a tick
                    // of the pods being Ready again.
                    tokio::time::sleep(self.opts.poll.min(CNI0_POLL)).await;
                }
            }
            Step::Verify => {
                self.agents.migrated(node).await?;
                let mut parts = vec!["the agent judges the node migrated".to_string()];
                if let Some(vip) = self.inv.cluster.api_vip {
                    self.agents
                        .dial(node, vip)
                        .await
                        .map_err(|e| format!("dial from the node to the API VIP {vip}: {e}"))?;
                    parts.push(format!("{vip} reachable from the node"));
                }
                if let Some(t) = &self.inv.hooks.verify {
                    parts.push(self.hook(t, node, "verify", d.verify).await?);
                }
                Ok(parts.join("; "))
            }
            Step::Confirm => {
                self.agents.confirm(node, &self.run).await?;
                Ok("confirmed: the agent will not roll the node back".into())
            }
            Step::Uncordon => self.cluster.uncordon(name).await,
            Step::Done => Ok("migrated".into()),
        }
    }
}

/// The driver of one run.
pub struct Driver<'a, C, A> {
    pub ctx: Ctx<'a, C, A>,
    /// None in a dry run: nothing is written.
    pub journal: Option<&'a mut Journal>,
    /// The journal's state when the run (re)started.
    pub state: State,
    pub sink: &'a mut dyn FnMut(&Event),
}

impl<C: Cluster, A: NodeAgents> Driver<'_, C, A> {
    fn emit(
        &mut self,
        node: Option<&str>,
        step: &str,
        phase: Phase,
        elapsed: Duration,
        deadline: Option<Duration>,
        detail: String,
    ) {
        let ev = Event {
            time: journal::now(),
            run: self.ctx.run.clone(),
            node: node.map(str::to_string),
            step: step.to_string(),
            phase,
            elapsed_ms: ms(elapsed),
            deadline_ms: deadline.map(ms),
            detail,
        };
        (self.sink)(&ev);
    }

    fn write(&mut self, rec: Record) -> Result<(), Cause> {
        match self.journal.as_deref_mut() {
            None => Ok(()),
            Some(j) => j
                .append(rec)
                .map_err(|e| format!("cannot write the journal {}: {e}", j.path().display())),
        }
    }

    /// A step's outcome, always in this order: its journal record (fsync'd),
    /// then its event, then the Event on the Node (node steps only). The
    /// record comes first because whoever sees "done" — the `-o json` reader,
    /// `kubectl describe node` — may kill us, and a resumed run must never
    /// redo a step that was reported done (a second Deploy). Err: the record
    /// could not be written; a done that is not durable is not announced.
    async fn finish(
        &mut self,
        node: Option<&Node>,
        step: &str,
        result: &Result<String, Cause>,
        elapsed: Duration,
        deadline: Option<Duration>,
    ) -> Result<(), Cause> {
        let name = node.map(|n| n.name.clone());
        let (rec, phase, detail, ok) = match result {
            Ok(d) => (
                Record::Done {
                    node: name.clone(),
                    step: step.into(),
                    time: journal::now(),
                    detail: d.clone(),
                },
                Phase::Done,
                d.clone(),
                true,
            ),
            Err(c) => (
                Record::Failed {
                    node: name.clone(),
                    step: step.into(),
                    time: journal::now(),
                    cause: c.clone(),
                },
                Phase::Failed,
                c.clone(),
                false,
            ),
        };
        let written = self.write(rec);
        if ok && written.is_err() {
            return written;
        }
        self.emit(
            name.as_deref(),
            step,
            phase,
            elapsed,
            deadline,
            detail.clone(),
        );
        if let Some(n) = node {
            let suffix = if ok { "done" } else { "failed" };
            self.ctx
                .cluster
                .record(&n.name, &format!("{step}-{suffix}"), ok, &detail)
                .await;
        }
        written
    }

    fn halt(&self, node: Option<&Node>, step: &str, cause: String, aftermath: String) -> Outcome {
        Outcome::Halted(Halt {
            node: node.map(|n| n.name.clone()),
            step: step.to_string(),
            cause,
            aftermath,
            resume: self.ctx.opts.resume_command.clone(),
            rollback: node.map(|n| format!("{} {}", self.ctx.opts.rollback_command, n.name)),
        })
    }

    /// Between two steps: the Lease (lost → halt; paused → wait).
    async fn boundary(&mut self, next: &str) -> Result<(), Outcome> {
        if self.ctx.opts.dry_run {
            return Ok(());
        }
        let mut paused_since: Option<Instant> = None;
        loop {
            match self.ctx.cluster.control().await {
                Ok(Control::Run) => break,
                Ok(Control::Paused) => {
                    if paused_since.is_none() {
                        paused_since = Some(Instant::now());
                        self.emit(
                            None,
                            next,
                            Phase::Paused,
                            Duration::ZERO,
                            None,
                            "paused by `cnishift pause`; `cnishift resume` goes on".into(),
                        );
                    }
                    tokio::time::sleep(self.ctx.opts.poll).await;
                }
                Ok(Control::Lost(why)) => {
                    return Err(self.halt(
                        None,
                        next,
                        format!("the migration Lease was lost: {why}"),
                        String::new(),
                    ))
                }
                Err(e) => {
                    return Err(self.halt(
                        None,
                        next,
                        format!("cannot read the migration Lease: {e}"),
                        String::new(),
                    ))
                }
            }
        }
        if let Some(t) = paused_since {
            self.emit(
                None,
                next,
                Phase::Resumed,
                t.elapsed(),
                None,
                "resumed".into(),
            );
        }
        Ok(())
    }

    /// The early-restart watch, between two steps: the first worker of
    /// `waiting` whose agent says its k3s runs without Flannel, with the
    /// agent's words. Every worker is asked at once (one slow agent costs its
    /// own deadline, not the sum), with the narrowed `k3s` report over the
    /// node's pooled connection: a few file reads on the node, no handshake.
    async fn watch(&mut self, waiting: &[Node]) -> Option<Node> {
        if self.ctx.opts.dry_run {
            return None;
        }
        let workers: Vec<&Node> = waiting.iter().filter(|n| n.role == Role::Worker).collect();
        let answers = {
            let agents = self.ctx.agents;
            futures::future::join_all(workers.iter().map(|w| agents.k3s_network(w))).await
        };
        for (w, answer) in workers.into_iter().zip(answers) {
            match answer {
                Ok(K3sNetwork::Flannel) => {}
                Ok(K3sNetwork::NoFlannel) => return Some(w.clone()),
                Ok(K3sNetwork::Unknown(e)) | Err(e) => self.emit(
                    Some(&w.name),
                    journal::WATCH,
                    Phase::Note,
                    Duration::ZERO,
                    None,
                    format!("could not tell whether it still runs Flannel: {e}"),
                ),
            }
        }
        None
    }

    /// The watch found `w` without Flannel before its turn, between two steps
    /// of `wave` (`next` is the wave's next step). The halt names `w` and what
    /// it is now, journals it (so a resume migrates it first of the workers,
    /// its NotReady excused by the gates, and the watch no longer halts on
    /// it), and settles every node of the wave in flight (see [`Self::settle`]).
    async fn halt_stranded(&mut self, w: &Node, wave: &[Node], next: Step) -> Outcome {
        let cause = format!(
            "worker {} came up without Flannel before its turn (its agent says so): its k3s restarted while the servers disagreed on the backend, and a k3s agent takes the backend from the server that answers when it starts",
            w.name
        );
        let mut said = cause.clone();
        if let Err(e) = self
            .finish(
                Some(w),
                journal::WATCH,
                &Err(cause.clone()),
                Duration::ZERO,
                None,
            )
            .await
        {
            said.push_str(&format!(" ({e})"));
        }
        let mut parts = vec![format!(
            "{} is not started (not cordoned, not labelled): with no Flannel and no Cilium its pods have no network, and it is NotReady, until it is migrated; a resume migrates it first of the workers, right after the controllers (its being NotReady does not block that resume)",
            w.name
        )];
        let why = format!("{} came up without Flannel before its turn", w.name);
        for n in wave {
            if let Some(s) = self.settle(n, next, &why).await {
                parts.push(s);
            }
        }
        Outcome::Halted(Halt {
            node: Some(w.name.clone()),
            step: journal::WATCH.to_string(),
            cause: said,
            aftermath: parts.join("; "),
            resume: self.ctx.opts.resume_command.clone(),
            rollback: Some(format!("{} {}", self.ctx.opts.rollback_command, w.name)),
        })
    }

    /// What becomes of `n`, a node of the wave in flight, when the run halts
    /// before its step `next` because of another node. Chosen for safety,
    /// by how far `n` got:
    /// - not yet armed, or already confirmed: nothing can roll it back, and
    ///   it is left as it is (cordoned if it was);
    /// - armed but not deployed: it was never switched, so it is disarmed
    ///   (a dead-man rollback would run a needless switch back to the
    ///   generation it already runs, restarting its k3s);
    /// - deployed and verified (only Confirm left): it is confirmed now, over
    ///   a new connection as always. The agent has already judged it
    ///   migrated; rolling it back would gain nothing and, for a server,
    ///   would switch the servers' backend once more — the very event that
    ///   strands workers without Flannel;
    /// - deployed, not verified: nothing vouches for it, and nothing further
    ///   starts after a halt, so it is left to its agent's dead-man
    ///   rollback, which the run waits for and reports, as after any failure
    ///   past Deploy (or disarmed for a person under --no-auto-rollback).
    async fn settle(&mut self, n: &Node, next: Step, why: &str) -> Option<String> {
        let did = |s: Step| self.done(n, s.name());
        if !did(Step::Preflight) || did(Step::Done) {
            return None;
        }
        if !did(Step::Cordon) {
            return Some(format!(
                "{} had only passed its preflight: it is untouched",
                n.name
            ));
        }
        if !did(Step::ArmRollback) {
            return Some(format!("{} stays cordoned; it was not switched", n.name));
        }
        if did(Step::Confirm) {
            return Some(format!(
                "{} is migrated and confirmed; it stays cordoned until the resume uncordons it",
                n.name
            ));
        }
        let run = self.ctx.run.clone();
        if !did(Step::Deploy) {
            return Some(match self.ctx.agents.disarm(n, &run).await {
                Ok(()) => {
                    let cause = format!("disarmed: the run halted before its deploy ({why})");
                    let _ = self.write(Record::Failed {
                        node: Some(n.name.clone()),
                        step: Step::ArmRollback.name().into(),
                        time: journal::now(),
                        cause: cause.clone(),
                    });
                    self.emit(
                        Some(&n.name),
                        Step::ArmRollback.name(),
                        Phase::Note,
                        Duration::ZERO,
                        None,
                        cause,
                    );
                    format!(
                        "{} was armed but never switched: it is disarmed and stays cordoned",
                        n.name
                    )
                }
                Err(e) => format!(
                    "{} was armed but never switched, and disarming it failed ({e}): its agent rolls it back at its deadline; it stays cordoned",
                    n.name
                ),
            });
        }
        if did(Step::Verify) {
            match self.ctx.agents.confirm(n, &run).await {
                Ok(()) => {
                    let detail = format!(
                        "confirmed: the agent will not roll the node back (it had passed Verify when the run halted: {why})"
                    );
                    let _ = self
                        .finish(
                            Some(n),
                            Step::Confirm.name(),
                            &Ok(detail),
                            Duration::ZERO,
                            None,
                        )
                        .await;
                    self.state
                        .nodes
                        .entry(n.name.clone())
                        .or_default()
                        .done
                        .insert(Step::Confirm.name().into());
                    return Some(format!(
                        "{} had passed Verify, so it is confirmed on Cilium rather than left to roll back (a rollback would switch it — and, for a server, the servers' backend — once more); it stays cordoned until the resume uncordons it",
                        n.name
                    ));
                }
                Err(e) => {
                    let cause = format!("confirming it after the halt failed: {e}");
                    let _ = self
                        .finish(
                            Some(n),
                            Step::Confirm.name(),
                            &Err(cause),
                            Duration::ZERO,
                            None,
                        )
                        .await;
                    let after = self.aftermath(n, Step::Confirm).await;
                    return Some(format!(
                        "{} had passed Verify but could not be confirmed ({e}): {after}",
                        n.name
                    ));
                }
            }
        }
        let cause = format!("not started: the run halted ({why})");
        let _ = self
            .finish(Some(n), next.name(), &Err(cause), Duration::ZERO, None)
            .await;
        let after = self.aftermath(n, next).await;
        Some(format!(
            "{} was switched but not verified, so it is left to its agent's dead-man rollback: {after}",
            n.name
        ))
    }

    /// What became of a node that failed at `step`.
    async fn aftermath(&mut self, node: &Node, step: Step) -> String {
        let armed = step.armed() || step == Step::Confirm;
        if !armed {
            // Only a node whose cordon is done (or failed, and may have
            // landed) is said to stay cordoned: a Preflight halt leaves it
            // as it was.
            let cordon_tried = step >= Step::Cordon || self.done(node, Step::Cordon.name());
            return if cordon_tried {
                format!("{} stays cordoned", node.name)
            } else {
                format!("{} is untouched: it was not cordoned", node.name)
            };
        }
        let run = self.ctx.run.clone();
        if self.ctx.opts.no_auto_rollback {
            return match self.ctx.agents.disarm(node, &run).await {
                Ok(()) => {
                    let _ = self.write(Record::Failed {
                        node: Some(node.name.clone()),
                        step: Step::ArmRollback.name().into(),
                        time: journal::now(),
                        cause: "disarmed (--no-auto-rollback)".into(),
                    });
                    format!("{} was disarmed (--no-auto-rollback) and is left as it is, cordoned, for a person", node.name)
                }
                Err(e) => format!(
                    "disarming {} failed ({e}): its agent will roll it back at its deadline",
                    node.name
                ),
            };
        }
        // Whether it carries the migration label, before the rolled-back
        // record folds its steps away.
        let labelled = self.done(node, Step::Label.name());
        // The agent rolls back at its deadline; wait for that, bounded.
        let started = Instant::now();
        let mut limit = self.ctx.inv.deadlines.rollback;
        let mut bounded = false;
        self.emit(
            Some(&node.name),
            "rollback",
            Phase::Started,
            Duration::ZERO,
            None,
            "waiting for the agent's dead-man rollback".into(),
        );
        loop {
            match self.ctx.agents.arm_state(node).await {
                Ok(ArmState::RolledBack { ok: true, message }) => {
                    let _ = self.write(Record::RolledBack {
                        node: node.name.clone(),
                        time: journal::now(),
                        outcome: message.clone(),
                    });
                    self.emit(
                        Some(&node.name),
                        "rollback",
                        Phase::Done,
                        started.elapsed(),
                        Some(limit),
                        format!("rolled back by its agent: {message}"),
                    );
                    return self.after_rollback(node, &message, labelled).await;
                }
                Ok(ArmState::RolledBack { ok: false, message }) => {
                    self.emit(
                        Some(&node.name),
                        "rollback",
                        Phase::Failed,
                        started.elapsed(),
                        Some(limit),
                        message.clone(),
                    );
                    return format!(
                        "{}'s agent could not roll it back: {message}; it stays cordoned",
                        node.name
                    );
                }
                Ok(ArmState::Confirmed) => {
                    return format!(
                        "{} was already confirmed: it stays on Cilium, cordoned",
                        node.name
                    );
                }
                Ok(ArmState::Disarmed) => {
                    return format!(
                        "{}'s agent is not armed: nothing rolls it back; it stays cordoned",
                        node.name
                    );
                }
                Ok(ArmState::Armed { remaining }) if !bounded => {
                    limit += remaining;
                    bounded = true;
                }
                Ok(_) | Err(_) => {}
            }
            if started.elapsed() >= limit {
                let msg = format!(
                    "no rollback outcome from {}'s agent within {}",
                    node.name,
                    humantime::format_duration(limit)
                );
                self.emit(
                    Some(&node.name),
                    "rollback",
                    Phase::Failed,
                    started.elapsed(),
                    Some(limit),
                    msg.clone(),
                );
                return format!("{msg}: check the node; it stays cordoned");
            }
            tokio::time::sleep(self.ctx.opts.poll).await;
        }
    }

    /// After a dead-man rollback: what the node's k3s runs now, in its
    /// agent's words — a rollback restores the node's own configuration,
    /// but a k3s *agent* takes the Flannel backend from the servers when it
    /// starts, so a worker rolled back after a server has switched comes
    /// back without Flannel.
    ///
    /// The migration label follows what the node runs, because the label's
    /// one job (ARCHITECTURE.md, "why this order") is that no Cilium agent
    /// ever runs beside Flannel:
    /// - back on Flannel: the label is removed, so Cilium's DaemonSet leaves
    ///   the node;
    /// - without Flannel: a label already there is kept. No Flannel runs
    ///   there for Cilium to run beside, and Cilium is then the only pod
    ///   network the node can have: removing the label would leave it with
    ///   none at all. A node not labelled yet is not labelled now either:
    ///   the label goes on at its Label step, after a deploy that succeeded,
    ///   which the resume gets to first.
    async fn after_rollback(&mut self, node: &Node, message: &str, labelled: bool) -> String {
        let n = &node.name;
        let label = self.ctx.inv.cilium.node_label.clone();
        let resume = "a resume migrates it again from its preflight";
        match self.ctx.agents.k3s_network(node).await {
            Ok(K3sNetwork::Flannel) => {
                let label_part = match &label {
                    None => String::new(),
                    Some((k, _)) => {
                        let d = self.ctx.inv.deadlines.api;
                        let r = within(d, Duration::ZERO, "unlabel", self.ctx.cluster.unlabel(n, k))
                            .await;
                        let ok = r.is_ok();
                        let note = match &r {
                            Ok(_) => format!("label {k} removed: the node is back on Flannel"),
                            Err(e) => format!("removing label {k} failed: {e}"),
                        };
                        self.emit(Some(n), "unlabel", if ok { Phase::Done } else { Phase::Failed }, Duration::ZERO, Some(d), note.clone());
                        self.ctx.cluster.record(n, if ok { "unlabel-done" } else { "unlabel-failed" }, ok, &note).await;
                        match r {
                            Ok(_) if labelled => format!("; its label {k} is removed, so Cilium's DaemonSet leaves it"),
                            Ok(_) => format!("; it carries no label {k}"),
                            Err(e) => format!("; removing its label {k} FAILED ({e}): Cilium's DaemonSet may start beside Flannel there — remove it: kubectl label node {n} {k}-"),
                        }
                    }
                };
                format!("{n} was rolled back to Flannel by its agent: {message}; its k3s runs Flannel again{label_part}; it stays cordoned; {resume}")
            }
            Ok(K3sNetwork::NoFlannel) => {
                let why = match node.role {
                    Role::Worker => "the servers already run --flannel-backend=none, and a k3s agent takes the backend from them when it starts",
                    Role::Controller => "a k3s server runs what its own flags say: the rollback did not bring Flannel's flags back",
                };
                let label_part = match &label {
                    None => "Cilium runs there if its DaemonSet selects the node".to_string(),
                    Some((k, v)) if labelled => format!(
                        "its label {k}={v} is kept, so Cilium — the only pod network it can have now — runs there (no Flannel runs beside it)"
                    ),
                    Some((k, v)) => format!(
                        "it is not labelled {k}={v}, so Cilium does not start there either: it has no pod network, and is NotReady, until it is migrated"
                    ),
                };
                format!("{n}'s agent rolled it back ({message}), but its k3s came back WITHOUT Flannel: {why}; {label_part}; it stays cordoned; {resume} (its being NotReady does not block that)")
            }
            Ok(K3sNetwork::Unknown(e)) | Err(e) => format!(
                "{n} was rolled back by its agent ({message}), but whether its k3s runs Flannel now cannot be told ({e}); its label is left as it is; it stays cordoned; look at it (cnishift status) before resuming"
            ),
        }
    }

    async fn cilium_install_once(&mut self, first: &Node) -> Result<(), Outcome> {
        let Some(t) = self.ctx.inv.hooks.cilium_install.clone() else {
            return Ok(());
        };
        if self.state.cluster.done.contains("cilium-install") {
            return Ok(());
        }
        if self.ctx.opts.dry_run {
            let argv = t.render(&Vars::for_node(first, &self.ctx.run));
            self.emit(
                None,
                "cilium-install",
                Phase::DryRun,
                Duration::ZERO,
                Some(self.ctx.inv.deadlines.deploy),
                format!("if Cilium's DaemonSet is absent: run {}", argv.join(" ")),
            );
            return Ok(());
        }
        let present = self
            .ctx
            .cluster
            .cilium_present()
            .await
            .map_err(|e| self.halt(None, "cilium-install", e, String::new()))?;
        if present {
            return Ok(());
        }
        let deadline = self.ctx.inv.deadlines.deploy;
        self.write(Record::Intent {
            node: None,
            step: "cilium-install".into(),
            time: journal::now(),
        })
        .map_err(|e| self.halt(None, "cilium-install", e, String::new()))?;
        self.emit(
            None,
            "cilium-install",
            Phase::Started,
            Duration::ZERO,
            Some(deadline),
            String::new(),
        );
        let started = Instant::now();
        let r = self.ctx.hook(&t, first, "cilium-install", deadline).await;
        let written = self
            .finish(
                None,
                "cilium-install",
                &r,
                started.elapsed(),
                Some(deadline),
            )
            .await;
        match r {
            Ok(_) => {
                written.map_err(|e| self.halt(None, "cilium-install", e, String::new()))?;
                self.state.cluster.done.insert("cilium-install".into());
                Ok(())
            }
            Err(cause) => Err(self.halt(
                None,
                "cilium-install",
                with_journal_error(cause, written),
                format!(
                    "{} stays cordoned, armed: its agent rolls it back unless the run resumes in time",
                    first.name
                ),
            )),
        }
    }

    /// The run's own nodes that it has started and not finished (failed,
    /// in flight, rolled back, or found without Flannel by the watch): the
    /// gates do not hold their being NotReady against the run that is
    /// about to migrate them.
    fn unfinished(&self) -> Vec<String> {
        self.state
            .nodes
            .iter()
            .filter(|(_, s)| !s.done.contains(Step::Done.name()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Runs `step` on `nodes` at once; the first failure (in inventory order) halts.
    async fn node_step(&mut self, nodes: &[Node], step: Step) -> Result<(), Outcome> {
        let deadline = step.deadline(&self.ctx.inv.deadlines);
        if self.ctx.opts.dry_run {
            let plan = plan(self.ctx.inv, PlanOptions::default());
            let action = plan
                .steps
                .iter()
                .find(|p| p.step == step)
                .map(|p| p.action.clone())
                .unwrap_or_default();
            for n in nodes {
                let detail = match step {
                    Step::Deploy => {
                        self.ctx
                            .inv
                            .hooks
                            .deploy
                            .as_ref()
                            .map_or(action.clone(), |t| {
                                format!(
                                    "run {}",
                                    t.render(&Vars::for_node(n, &self.ctx.run)).join(" ")
                                )
                            })
                    }
                    _ => action.replace("{node}", &n.name),
                };
                self.emit(
                    Some(&n.name),
                    step.name(),
                    Phase::DryRun,
                    Duration::ZERO,
                    Some(deadline),
                    detail,
                );
            }
            return Ok(());
        }
        for n in nodes {
            self.write(Record::Intent {
                node: Some(n.name.clone()),
                step: step.name().into(),
                time: journal::now(),
            })
            .map_err(|e| self.halt(Some(n), step.name(), e, String::new()))?;
            self.emit(
                Some(&n.name),
                step.name(),
                Phase::Started,
                Duration::ZERO,
                Some(deadline),
                String::new(),
            );
        }
        let grace = STEP_GRACE;
        let unfinished = self.unfinished();
        let started = Instant::now();
        let results = {
            let ctx = &self.ctx;
            // The "started" Event on each Node is recorded while the step
            // runs (it is a record of the step having begun, not a
            // precondition of it), and before its outcome's Event.
            let (what, note) = (
                format!("{}-started", step.name()),
                format!("cnishift migrate: {} started", step.name()),
            );
            let started_events = futures::future::join_all(
                nodes
                    .iter()
                    .map(|n| ctx.cluster.record(&n.name, &what, true, &note)),
            );
            let steps = futures::future::join_all(
                nodes
                    .iter()
                    .map(|n| within(deadline, grace, step.name(), ctx.step(n, step, &unfinished))),
            );
            futures::future::join(steps, started_events).await.0
        };
        let elapsed = started.elapsed();
        let mut first_failure = None;
        for (n, r) in nodes.iter().zip(results) {
            let written = self
                .finish(Some(n), step.name(), &r, elapsed, Some(deadline))
                .await;
            match r {
                Ok(_) => written.map_err(|e| self.halt(Some(n), step.name(), e, String::new()))?,
                Err(cause) => {
                    first_failure.get_or_insert((n.clone(), with_journal_error(cause, written)));
                }
            }
        }
        if let Some((n, cause)) = first_failure {
            // Every failed node of the wave gets its aftermath; the first is named.
            let mut aftermath = self.aftermath(&n, step).await;
            for other in nodes.iter().filter(|o| o.name != n.name) {
                if self.journal_failed(other, step) {
                    aftermath.push_str(&format!("; {}", self.aftermath(other, step).await));
                }
            }
            return Err(self.halt(Some(&n), step.name(), cause, aftermath));
        }
        Ok(())
    }

    fn journal_failed(&self, node: &Node, step: Step) -> bool {
        self.journal.as_ref().is_some_and(|j| {
            j.records.iter().rev().find_map(|r| match r {
                Record::Failed {
                    node: Some(n),
                    step: s,
                    ..
                } if *n == node.name => Some(s == step.name()),
                Record::Done { node: Some(n), .. } if *n == node.name => Some(false),
                _ => None,
            }) == Some(true)
        })
    }

    fn done(&self, node: &Node, step: &str) -> bool {
        self.state
            .nodes
            .get(&node.name)
            .is_some_and(|s| s.done.contains(step))
    }

    async fn cluster_step(&mut self, step: ClusterStep) -> Result<(), Outcome> {
        let name = step.name();
        if self.state.cluster.done.contains(name) {
            return Ok(());
        }
        let d = &self.ctx.inv.deadlines;
        let deadline = match step {
            ClusterStep::VerifyCluster => d.verify,
            ClusterStep::Cleanup => d.cleanup * self.ctx.inv.nodes.len() as u32,
        };
        if self.ctx.opts.dry_run {
            let detail = match step {
                ClusterStep::VerifyCluster => {
                    "the cluster gates, every agent's migrated verdicts".to_string()
                }
                ClusterStep::Cleanup => {
                    "remove Flannel's leftovers, node by node, controllers first".to_string()
                }
            };
            self.emit(
                None,
                name,
                Phase::DryRun,
                Duration::ZERO,
                Some(deadline),
                detail,
            );
            return Ok(());
        }
        self.boundary(name).await?;
        self.write(Record::Intent {
            node: None,
            step: name.into(),
            time: journal::now(),
        })
        .map_err(|e| self.halt(None, name, e, String::new()))?;
        self.emit(
            None,
            name,
            Phase::Started,
            Duration::ZERO,
            Some(deadline),
            String::new(),
        );
        let started = Instant::now();
        let r = {
            let ctx = &self.ctx;
            within(deadline, Duration::ZERO, name, async {
                match step {
                    ClusterStep::VerifyCluster => {
                        ctx.cluster.gates(&[]).await?;
                        for n in &ctx.inv.nodes {
                            ctx.agents
                                .migrated(n)
                                .await
                                .map_err(|e| format!("{}: {e}", n.name))?;
                        }
                        Ok("every node migrated; the cluster gates pass".to_string())
                    }
                    ClusterStep::Cleanup => {
                        let mut nodes = ctx.inv.nodes.clone();
                        nodes.sort_by_key(|n| n.role);
                        let mut out = vec![];
                        for n in &nodes {
                            out.push(format!(
                                "{}: {}",
                                n.name,
                                ctx.agents
                                    .cleanup(n)
                                    .await
                                    .map_err(|e| format!("cleanup on {}: {e}", n.name))?
                            ));
                        }
                        Ok(out.join("; "))
                    }
                }
            })
            .await
        };
        let written = self
            .finish(None, name, &r, started.elapsed(), Some(deadline))
            .await;
        match r {
            Ok(_) => written.map_err(|e| self.halt(None, name, e, String::new())),
            Err(cause) => Err(self.halt(
                None,
                name,
                with_journal_error(cause, written),
                "every node is migrated; the cluster step can be run again".into(),
            )),
        }
    }

    /// Runs (or resumes) the migration to its end or its first halt.
    pub async fn run(&mut self) -> Outcome {
        match self.walk().await {
            Ok(()) => Outcome::Completed,
            Err(o) => {
                if let Outcome::Halted(h) = &o {
                    let (node, step, msg) = (h.node.clone(), h.step.clone(), h.to_string());
                    self.emit(
                        node.as_deref(),
                        &step,
                        Phase::Halted,
                        Duration::ZERO,
                        None,
                        msg,
                    );
                }
                o
            }
        }
    }

    async fn walk(&mut self) -> Result<(), Outcome> {
        if self.ctx.inv.hooks.deploy.is_none() {
            return Err(self.halt(
                None,
                Step::Deploy.name(),
                "[hooks] deploy is not set in the inventory: nothing would switch a node to Cilium"
                    .into(),
                String::new(),
            ));
        }
        let mut p = plan(
            self.ctx.inv,
            PlanOptions {
                no_cleanup: self.ctx.opts.no_cleanup,
                no_auto_rollback: self.ctx.opts.no_auto_rollback,
            },
        );
        stranded_first(
            &mut p,
            &stranded(&self.state),
            self.ctx.inv.migrate.max_unavailable,
        );
        for (i, wave) in p.waves.iter().enumerate() {
            let pending: Vec<Node> = wave
                .nodes
                .iter()
                .filter(|n| !self.done(n, Step::Done.name()))
                .cloned()
                .collect();
            if pending.is_empty() {
                continue;
            }
            // Workers of later waves, not started yet: watched between steps.
            let waiting: Vec<Node> = p.waves[i + 1..]
                .iter()
                .flat_map(|w| w.nodes.iter())
                .filter(|n| !self.state.nodes.contains_key(&n.name))
                .cloned()
                .collect();
            for step in Step::ALL {
                let todo: Vec<Node> = pending
                    .iter()
                    .filter(|n| !self.done(n, step.name()))
                    .cloned()
                    .collect();
                if todo.is_empty() {
                    continue;
                }
                self.boundary(step.name()).await?;
                // Done has no side effect, and the next wave's first
                // boundary comes right after it: no watch round for it.
                if step != Step::Done {
                    if let Some(w) = self.watch(&waiting).await {
                        return Err(self.halt_stranded(&w, &pending, step).await);
                    }
                }
                if step == Step::Label {
                    self.cilium_install_once(&todo[0]).await?;
                }
                if step == Step::Cordon {
                    super::etcd::snapshot_once(self, &todo).await?;
                }
                self.node_step(&todo, step).await?;
                for n in &todo {
                    self.state
                        .nodes
                        .entry(n.name.clone())
                        .or_default()
                        .done
                        .insert(step.name().into());
                }
            }
        }
        for step in p.after {
            self.cluster_step(step).await?;
        }
        Ok(())
    }
}

/// The workers the early-restart watch halted a run on (see
/// [`stranded_first`]).
pub fn stranded(state: &State) -> Vec<String> {
    state
        .nodes
        .iter()
        .filter(|(_, s)| s.stranded.is_some())
        .map(|(n, _)| n.clone())
        .collect()
}

/// A failure's cause, with the journal's own failure to record it if any.
fn with_journal_error(cause: Cause, written: Result<(), Cause>) -> Cause {
    match written {
        Ok(()) => cause,
        Err(e) => format!("{cause} (and {e})"),
    }
}

/// `cnishift rollback NODE`: cordon, drain, `[hooks] rollback`, remove the
/// label, wait Ready on Flannel, uncordon; journaled like a step (an intent
/// for `rollback`, then done or failed, and on success a rolled-back record
/// so that a later `migrate` starts the node over).
pub async fn rollback_node<C: Cluster>(
    inv: &Inventory,
    cluster: &C,
    opts: &Options,
    journal: &mut Journal,
    node: &Node,
    sink: &mut dyn FnMut(&Event),
) -> Result<(), Cause> {
    let Some(hook) = &inv.hooks.rollback else {
        return Err("[hooks] rollback is not set".into());
    };
    let io = |e: std::io::Error| format!("cannot write the journal: {e}");
    journal
        .append(Record::Intent {
            node: Some(node.name.clone()),
            step: "rollback".into(),
            time: journal::now(),
        })
        .map_err(io)?;
    let d = &inv.deadlines;
    let name = node.name.as_str();
    let run = journal.run.clone();
    let mut emit =
        |step: &str, phase: Phase, started: Instant, deadline: Duration, detail: String| {
            sink(&Event {
                time: journal::now(),
                run: run.clone(),
                node: Some(name.to_string()),
                step: step.to_string(),
                phase,
                elapsed_ms: ms(started.elapsed()),
                deadline_ms: Some(ms(deadline)),
                detail,
            })
        };
    let result: Result<(), Cause> = async {
        let t = Instant::now();
        let m = within(d.api, Duration::ZERO, "cordon", cluster.cordon(name)).await?;
        emit("cordon", Phase::Done, t, d.api, m);
        let t = Instant::now();
        let m = within(
            d.drain,
            Duration::ZERO,
            "drain",
            cluster.drain(name, d.drain),
        )
        .await?;
        emit("drain", Phase::Done, t, d.drain, m);
        let t = Instant::now();
        let argv = hook.render(&Vars::for_node(node, &run));
        let log = opts.log_dir.join(format!("{name}.rollback.log"));
        hooks::run(&argv, &log, d.rollback)
            .await
            .map_err(|e| e.to_string())?;
        emit(
            "rollback-hook",
            Phase::Done,
            t,
            d.rollback,
            format!("{} exited 0", argv.join(" ")),
        );
        if let Some((k, _)) = &inv.cilium.node_label {
            let t = Instant::now();
            let m = within(d.api, Duration::ZERO, "unlabel", cluster.unlabel(name, k)).await?;
            emit("unlabel", Phase::Done, t, d.api, m);
        }
        let t = Instant::now();
        let m = within(
            d.node_ready,
            Duration::ZERO,
            "wait-ready",
            cluster.wait_ready(name, d.node_ready),
        )
        .await?;
        emit("wait-ready", Phase::Done, t, d.node_ready, m);
        let t = Instant::now();
        let m = within(d.api, Duration::ZERO, "uncordon", cluster.uncordon(name)).await?;
        emit("uncordon", Phase::Done, t, d.api, m);
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            cluster
                .record(
                    name,
                    "rollback",
                    true,
                    "rolled back to Flannel by cnishift rollback",
                )
                .await;
            journal
                .append(Record::Done {
                    node: Some(node.name.clone()),
                    step: "rollback".into(),
                    time: journal::now(),
                    detail: "back on Flannel".into(),
                })
                .map_err(io)?;
            journal
                .append(Record::RolledBack {
                    node: node.name.clone(),
                    time: journal::now(),
                    outcome: "cnishift rollback".into(),
                })
                .map_err(io)
        }
        Err(cause) => {
            cluster.record(name, "rollback", false, &cause).await;
            let _ = journal.append(Record::Failed {
                node: Some(node.name.clone()),
                step: "rollback".into(),
                time: journal::now(),
                cause: cause.clone(),
            });
            Err(cause)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Load;
    use crate::migrate::journal::Accept;
    use cnishift_proto::v1 as pb;
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::path::Path;
    use std::sync::Mutex;

    /// The agents and the API server, recorded and scripted.
    #[derive(Default)]
    struct Fake {
        /// "op node" for every call that belongs to a step.
        calls: Mutex<Vec<String>>,
        fail: HashMap<String, String>,
        hang: HashSet<String>,
        control: Mutex<VecDeque<Control>>,
        /// Workers whose k3s runs without Flannel (the watch's answer).
        no_flannel: Mutex<HashSet<String>>,
        /// ("op node", worker): once that call is made, the worker's k3s
        /// runs without Flannel (a server switched; the worker restarted).
        strand_after: Option<(String, String)>,
        /// k3s_network's answer after a rollback, per node (default: the
        /// watch's answer).
        after_rollback: HashMap<String, K3sNetwork>,
        /// Nodes the API says are NotReady: the gates fail on them unless
        /// the run calls them its own unfinished nodes.
        not_ready: Mutex<HashSet<String>>,
        /// What the gates were told was the run's own (per gates call).
        excused: Mutex<Vec<Vec<String>>>,
        arm_state: Option<ArmState>,
        /// One ordered log: "node step-done/failed ok" Node Events, and
        /// (pushed by a test's sink) the driver's events.
        events: Mutex<Vec<String>>,
        /// The inventory's controllers (run_with sets them): one etcd member each.
        etcd_members: Mutex<Vec<Node>>,
        /// Also a member that no controller of the inventory runs.
        etcd_stranger: bool,
        etcd_snapshot_fails: Option<String>,
        /// "node run" for every snapshot taken.
        snapshots: Mutex<Vec<String>>,
    }

    impl Fake {
        async fn op(&self, op: &str, node: &str) -> Result<(), Cause> {
            let key = format!("{op} {node}");
            self.calls.lock().unwrap().push(key.clone());
            if op == "wait" {
                // WaitCiliumReady passed: the node is Ready (on Cilium).
                self.not_ready.lock().unwrap().remove(node);
            }
            if let Some((after, worker)) = &self.strand_after {
                if *after == key {
                    self.no_flannel.lock().unwrap().insert(worker.clone());
                }
            }
            if self.hang.contains(&key) {
                std::future::pending::<()>().await;
            }
            match self.fail.get(&key) {
                Some(c) => Err(c.clone()),
                None => Ok(()),
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Cluster for Fake {
        async fn gates(&self, unfinished: &[String]) -> Result<(), Cause> {
            self.op("gates", "-").await?;
            self.excused.lock().unwrap().push(unfinished.to_vec());
            let not_ready = self.not_ready.lock().unwrap().clone();
            let bad: Vec<&String> = not_ready
                .iter()
                .filter(|n| !unfinished.contains(n))
                .collect();
            match bad.first() {
                None => Ok(()),
                Some(n) => Err(format!("gate nodes.ready: node {n} is NotReady")),
            }
        }
        async fn cordon(&self, node: &str) -> Result<String, Cause> {
            self.op("cordon", node).await.map(|()| "cordoned".into())
        }
        async fn drain(&self, node: &str, _: Duration) -> Result<String, Cause> {
            self.op("drain", node).await.map(|()| "drained".into())
        }
        async fn cilium_present(&self) -> Result<bool, Cause> {
            self.op("cilium-present", "-").await.map(|()| true)
        }
        async fn label(&self, node: &str, k: &str, v: &str) -> Result<String, Cause> {
            self.op("label", node)
                .await
                .map(|()| format!("labelled {k}={v}"))
        }
        async fn unlabel(&self, node: &str, _: &str) -> Result<String, Cause> {
            self.op("unlabel", node).await.map(|()| "unlabelled".into())
        }
        async fn wait_cilium_and_ready(&self, node: &str, _: Duration) -> Result<String, Cause> {
            self.op("wait", node).await.map(|()| "Ready".into())
        }
        async fn wait_ready(&self, node: &str, _: Duration) -> Result<String, Cause> {
            self.op("wait-ready", node).await.map(|()| "Ready".into())
        }
        async fn repod(&self, node: &str, _: Duration) -> Result<String, Cause> {
            self.op("repod", node)
                .await
                .map(|()| "3 pods recreated".into())
        }
        async fn uncordon(&self, node: &str) -> Result<String, Cause> {
            self.op("uncordon", node)
                .await
                .map(|()| "uncordoned".into())
        }
        async fn record(&self, node: &str, step: &str, ok: bool, _: &str) {
            self.events
                .lock()
                .unwrap()
                .push(format!("{node} {step} {ok}"));
        }
        async fn control(&self) -> Result<Control, Cause> {
            Ok(self
                .control
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Control::Run))
        }
    }

    impl NodeAgents for Fake {
        async fn preflight(&self, node: &Node) -> Result<(), Cause> {
            self.op("preflight", &node.name).await
        }
        async fn arm(&self, node: &Node, _: &str, _: Duration) -> Result<(), Cause> {
            self.op("arm", &node.name).await
        }
        async fn confirm(&self, node: &Node, _: &str) -> Result<(), Cause> {
            self.op("confirm", &node.name).await
        }
        async fn disarm(&self, node: &Node, _: &str) -> Result<(), Cause> {
            self.op("disarm", &node.name).await
        }
        async fn arm_state(&self, node: &Node) -> Result<ArmState, Cause> {
            self.op("arm-state", &node.name).await?;
            Ok(self.arm_state.clone().unwrap_or(ArmState::RolledBack {
                ok: true,
                message: "restored the Flannel configuration; k3s restarted".into(),
            }))
        }
        async fn migrated(&self, node: &Node) -> Result<(), Cause> {
            self.op("migrated", &node.name).await
        }
        async fn pods_on_cni0(&self, node: &Node) -> Result<u32, Cause> {
            self.op("pods-on-cni0", &node.name).await.map(|()| 0)
        }
        async fn dial(&self, node: &Node, _: std::net::SocketAddr) -> Result<(), Cause> {
            self.op("dial", &node.name).await
        }
        async fn k3s_network(&self, node: &Node) -> Result<K3sNetwork, Cause> {
            let rolled_back = self
                .calls
                .lock()
                .unwrap()
                .contains(&format!("arm-state {}", node.name));
            if rolled_back {
                if let Some(n) = self.after_rollback.get(&node.name) {
                    return Ok(n.clone());
                }
            }
            Ok(if self.no_flannel.lock().unwrap().contains(&node.name) {
                K3sNetwork::NoFlannel
            } else {
                K3sNetwork::Flannel
            })
        }
        async fn cleanup(&self, node: &Node) -> Result<String, Cause> {
            self.op("cleanup", &node.name)
                .await
                .map(|()| "cleaned".into())
        }
        async fn leftovers(&self, _: &Node) -> Result<Vec<String>, Cause> {
            Ok(vec![])
        }
        async fn etcd_status(&self, node: &Node) -> Result<pb::EtcdStatus, Cause> {
            let ctl = self.etcd_members.lock().unwrap().clone();
            let id = |name: &str| 1 + ctl.iter().position(|c| c.name == name).unwrap() as u64;
            let mut members: Vec<pb::EtcdMember> = ctl
                .iter()
                .map(|c| pb::EtcdMember {
                    id: id(&c.name),
                    name: c.name.clone(),
                    ..Default::default()
                })
                .collect();
            if self.etcd_stranger {
                members.push(pb::EtcdMember {
                    id: 99,
                    name: "opi09-5e1f2a3b".into(),
                    peer_urls: vec!["https://10.1.0.99:2380".into()],
                    ..Default::default()
                });
            }
            Ok(pb::EtcdStatus {
                node: node.name.clone(),
                present: true,
                healthy: true,
                member_id: id(&node.name),
                leader_id: 1,
                members,
                ..Default::default()
            })
        }
        async fn etcd_snapshot(
            &self,
            node: &Node,
            run: &str,
            _: Duration,
        ) -> Result<pb::EtcdSnapshotResult, Cause> {
            self.snapshots
                .lock()
                .unwrap()
                .push(format!("{} {run}", node.name));
            match &self.etcd_snapshot_fails {
                Some(e) => Err(e.clone()),
                None => Ok(pb::EtcdSnapshotResult {
                    path: format!(
                        "/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-{run}-{}-1767225600",
                        node.name
                    ),
                    size_bytes: 20512,
                    ..Default::default()
                }),
            }
        }
    }

    const NODES: [&str; 3] = ["opi01", "raccoon00", "raccoon01"];

    fn inventory(deadlines: &str, deploy: &str) -> Inventory {
        let mut s = format!(
            "[cluster]\nname = \"lab\"\napi_vip = \"10.1.0.5:6443\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [deadlines]\n{deadlines}\n[hooks]\ndeploy = [\"sh\", \"-c\", {deploy:?}]\n\
             [cilium]\nnode_label = \"cnishift.io/cni=cilium\"\n"
        );
        for (i, n) in NODES.iter().enumerate() {
            let role = if i == 0 { "controller" } else { "worker" };
            s.push_str(&format!(
                "[[nodes]]\nname = \"{n}\"\nrole = \"{role}\"\naddress = \"10.1.0.1{i}:7443\"\n"
            ));
        }
        Inventory::parse(&s, Path::new("/x/cluster.toml"), Load::default()).unwrap()
    }

    fn options(dir: &Path) -> Options {
        Options {
            dry_run: false,
            no_cleanup: false,
            no_auto_rollback: false,
            poll: Duration::from_millis(10),
            log_dir: dir.join("logs"),
            resume_command: "cnishift migrate -i /x/cluster.toml".into(),
            rollback_command: "cnishift rollback -i /x/cluster.toml".into(),
            skip_etcd_snapshot: false,
        }
    }

    struct Ran {
        outcome: Outcome,
        events: Vec<Event>,
    }

    async fn run_with(inv: &Inventory, fake: &Fake, dir: &Path, opts: Options) -> Ran {
        *fake.etcd_members.lock().unwrap() = crate::migrate::etcd::controllers(&inv.nodes);
        let mut j = Journal::open(dir, inv, Accept::default(), "run-1").unwrap();
        let state = j.state();
        let mut events = vec![];
        let mut sink = |e: &Event| events.push(e.clone());
        let outcome = {
            let mut d = Driver {
                ctx: Ctx {
                    inv,
                    cluster: fake,
                    agents: fake,
                    opts: &opts,
                    run: "run-1".into(),
                },
                journal: if opts.dry_run { None } else { Some(&mut j) },
                state,
                sink: &mut sink,
            };
            d.run().await
        };
        Ran { outcome, events }
    }

    /// The fake's operation for a step (Deploy is a real hook, Done has none).
    fn op_of(step: Step) -> Option<&'static str> {
        Some(match step {
            Step::Preflight => "preflight",
            Step::Cordon => "cordon",
            Step::Drain => "drain",
            Step::ArmRollback => "arm",
            Step::Label => "label",
            Step::WaitCiliumReady => "wait",
            Step::Repod => "repod",
            Step::Verify => "migrated",
            Step::Confirm => "confirm",
            Step::Uncordon => "uncordon",
            Step::Deploy | Step::Done => return None,
        })
    }

    fn per_node(n: &str) -> Vec<String> {
        [
            "preflight",
            "gates",
            "cordon",
            "drain",
            "arm",
            "label",
            "wait",
            "repod",
            "pods-on-cni0",
            "migrated",
            "dial",
            "confirm",
            "uncordon",
        ]
        .iter()
        .map(|op| format!("{op} {}", if *op == "gates" { "-" } else { n }))
        .collect()
    }

    #[tokio::test]
    async fn a_run_walks_every_step_of_every_node_in_order_then_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "echo deploying {node}");
        let fake = Fake::default();
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert_eq!(r.outcome, Outcome::Completed);
        let mut want: Vec<String> = NODES.iter().flat_map(|n| per_node(n)).collect();
        want.extend(
            [
                "gates -",
                "migrated opi01",
                "migrated raccoon00",
                "migrated raccoon01",
            ]
            .map(String::from),
        );
        want.extend(NODES.map(|n| format!("cleanup {n}")));
        assert_eq!(fake.calls(), want);
        let log = std::fs::read_to_string(dir.path().join("logs/raccoon01.deploy.log")).unwrap();
        assert!(log.contains("deploying raccoon01"), "{log}");
        let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
        let s = j.state();
        for n in NODES {
            assert_eq!(s.nodes[n].done.len(), 12, "{n}: {:?}", s.nodes[n]);
        }
        assert!(s.cluster.done.contains("verify-cluster") && s.cluster.done.contains("cleanup"));
        assert!(s.cluster.done.contains("etcd-snapshot"));
        // Every step has a started and a done event (the etcd snapshot one
        // each too); the schema's fields are filled.
        let started = r
            .events
            .iter()
            .filter(|e| e.phase == Phase::Started)
            .count();
        let done = r.events.iter().filter(|e| e.phase == Phase::Done).count();
        assert_eq!((started, done), (3 * 12 + 3, 3 * 12 + 3));
        let e = r
            .events
            .iter()
            .find(|e| e.step == "drain" && e.phase == Phase::Done)
            .unwrap();
        assert_eq!(
            (e.run.as_str(), e.node.as_deref(), e.deadline_ms),
            ("run-1", Some("opi01"), Some(600_000))
        );
        // An Event on the Node when each step starts and ends.
        assert_eq!(fake.events.lock().unwrap().len(), 3 * 12 * 2);
        let ev = fake.events.lock().unwrap().clone();
        assert_eq!(
            ev[..2],
            ["opi01 preflight-started true", "opi01 preflight-done true"]
        );
        // Run again: all done, nothing is touched.
        let again = Fake::default();
        assert_eq!(
            run_with(&inv, &again, dir.path(), options(dir.path()))
                .await
                .outcome,
            Outcome::Completed
        );
        assert_eq!(again.calls(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_failure_at_each_step_halts_there_and_nothing_after_it_starts() {
        for step in Step::ALL.into_iter().filter(|s| *s != Step::Done) {
            let dir = tempfile::tempdir().unwrap();
            let mut fake = Fake::default();
            let deploy = if step == Step::Deploy {
                "echo 'error: activation failed' >&2; test {node} != raccoon00"
            } else {
                "true"
            };
            let inv = inventory("", deploy);
            let cause = format!("the {} said no", step.name());
            if let Some(op) = op_of(step) {
                fake.fail.insert(format!("{op} raccoon00"), cause.clone());
            }
            let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
            let Outcome::Halted(h) = r.outcome else {
                panic!("{step:?}: completed")
            };
            assert_eq!(
                (h.node.as_deref(), h.step.as_str()),
                (Some("raccoon00"), step.name()),
                "{h}"
            );
            if step == Step::Deploy {
                assert!(
                    h.cause.starts_with("sh exited with status 1 (log ")
                        && h.cause.ends_with("error: activation failed"),
                    "{h}"
                );
            } else {
                assert_eq!(h.cause, cause);
            }
            assert_eq!(h.resume, "cnishift migrate -i /x/cluster.toml");
            let last = r.events.last().unwrap();
            assert_eq!(
                (&last.phase, last.node.as_deref()),
                (&Phase::Halted, Some("raccoon00"))
            );
            assert_eq!(last.detail, h.to_string());
            assert_eq!(
                h.rollback.as_deref(),
                Some("cnishift rollback -i /x/cluster.toml raccoon00")
            );
            let text = h.to_string();
            assert!(
                text.starts_with(&format!("halted at raccoon00, step {}: ", step.name())),
                "{text}"
            );
            assert!(text.contains("nothing further was started"), "{text}");
            if step.armed() || step == Step::Confirm {
                assert!(
                    h.aftermath.contains(
                        "rolled back to Flannel by its agent: restored the Flannel configuration"
                    ),
                    "{step:?}: {h}"
                );
            } else if step == Step::Preflight {
                assert_eq!(h.aftermath, "raccoon00 is untouched: it was not cordoned");
            } else {
                assert_eq!(h.aftermath, "raccoon00 stays cordoned");
            }
            // Nothing after the failure: no raccoon01 at all, no later step of raccoon00.
            let calls = fake.calls();
            assert!(
                !calls.iter().any(|c| c.ends_with("raccoon01")),
                "{step:?}: {calls:?}"
            );
            let later: Vec<&str> = Step::ALL
                .iter()
                .filter(|s| **s > step)
                .filter_map(|s| op_of(*s))
                .collect();
            for c in &calls {
                let op = c.split(' ').next().unwrap();
                assert!(
                    !(c.ends_with("raccoon00") && later.contains(&op)),
                    "{step:?}: {c} ran after the failure"
                );
            }
            assert!(!calls.iter().any(|c| c.starts_with("cleanup")));
            let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
            let n = &j.state().nodes["raccoon00"];
            assert_eq!(n.failed.as_ref().map(|f| f.0.as_str()), Some(step.name()));
            assert_eq!(
                n.rolled_back.is_some(),
                step.armed() || step == Step::Confirm
            );
        }
    }

    #[tokio::test]
    async fn resume_from_every_journal_state_does_exactly_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        run_with(&inv, &Fake::default(), dir.path(), options(dir.path())).await;
        let full = std::fs::read_to_string(dir.path().join(journal::FILE)).unwrap();
        let lines: Vec<&str> = full.lines().collect();
        for k in 1..lines.len() {
            let d = tempfile::tempdir().unwrap();
            let prefix: String = lines[..k].iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(d.path().join(journal::FILE), &prefix).unwrap();
            let before = Journal::open(d.path(), &inv, Accept::default(), "x")
                .unwrap()
                .state();
            let fake = Fake::default();
            let r = run_with(&inv, &fake, d.path(), options(d.path())).await;
            assert_eq!(r.outcome, Outcome::Completed, "prefix {k}");
            let calls = fake.calls();
            for n in NODES {
                for step in Step::ALL {
                    // "migrated" is asked again by VerifyCluster; "dial" only by Verify.
                    let Some(op) = (if step == Step::Verify {
                        Some("dial")
                    } else {
                        op_of(step)
                    }) else {
                        continue;
                    };
                    let was_done = before
                        .nodes
                        .get(n)
                        .is_some_and(|s| s.done.contains(step.name()));
                    let called = calls.contains(&format!("{op} {n}"));
                    assert_eq!(
                        called, !was_done,
                        "prefix {k}: {n} {step:?} done={was_done}"
                    );
                }
            }
            let after = Journal::open(d.path(), &inv, Accept::default(), "x")
                .unwrap()
                .state();
            assert!(
                NODES.iter().all(|n| after.nodes[*n].done.contains("done")),
                "prefix {k}"
            );
            assert!(after.cluster.done.contains("cleanup"), "prefix {k}");
        }
    }

    #[tokio::test]
    async fn each_deadline_fires() {
        let short = "report = \"150ms\"\napi = \"150ms\"\ndrain = \"150ms\"\ndeploy = \"150ms\"\n\
                     cilium_ready = \"150ms\"\nnode_ready = \"150ms\"\nrepod = \"150ms\"\nverify = \"150ms\"\n\
                     confirm = \"150ms\"\nrollback = \"150ms\"";
        for step in Step::ALL.into_iter().filter(|s| *s != Step::Done) {
            let dir = tempfile::tempdir().unwrap();
            let mut fake = Fake::default();
            let deploy = if step == Step::Deploy {
                "sleep 30"
            } else {
                "true"
            };
            let inv = inventory(short, deploy);
            if let Some(op) = op_of(step) {
                fake.hang.insert(format!("{op} opi01"));
            }
            let started = Instant::now();
            let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
            let Outcome::Halted(h) = r.outcome else {
                panic!("{step:?}: completed")
            };
            let want = humantime::format_duration(step.deadline(&inv.deadlines)).to_string();
            if step == Step::Deploy {
                assert!(
                    h.cause
                        .starts_with(&format!("sh did not finish within {want}")),
                    "{h}"
                );
            } else {
                assert_eq!(
                    h.cause,
                    format!("{} did not finish within {want}", step.name())
                );
            }
            assert_eq!(h.node.as_deref(), Some("opi01"));
            assert!(started.elapsed() < Duration::from_secs(5), "{step:?}");
        }
    }

    #[tokio::test]
    async fn an_armed_node_waits_for_its_rollback_and_starts_over_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("rollback = \"200ms\"", "true");
        let mut fake = Fake::default();
        fake.fail
            .insert("migrated opi01".into(), "cilium_host is down".into());
        fake.arm_state = Some(ArmState::Armed {
            remaining: Duration::from_millis(100),
        });
        let started = Instant::now();
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        let Outcome::Halted(h) = r.outcome else {
            panic!()
        };
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited for the armed deadline plus [deadlines] rollback"
        );
        assert_eq!(h.aftermath, "no rollback outcome from opi01's agent within 300ms: check the node; it stays cordoned");
        // The agent did roll back: a resume starts the node over.
        let dir = tempfile::tempdir().unwrap();
        let mut fake = Fake::default();
        fake.fail
            .insert("migrated opi01".into(), "cilium_host is down".into());
        run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        let fake = Fake::default();
        assert_eq!(
            run_with(&inv, &fake, dir.path(), options(dir.path()))
                .await
                .outcome,
            Outcome::Completed
        );
        assert_eq!(
            fake.calls()[..3],
            ["preflight opi01", "gates -", "cordon opi01"]
        );
    }

    #[tokio::test]
    async fn no_auto_rollback_disarms_and_a_resume_arms_again() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let mut fake = Fake::default();
        fake.fail
            .insert("migrated opi01".into(), "cilium_host is down".into());
        let mut opts = options(dir.path());
        opts.no_auto_rollback = true;
        let Outcome::Halted(h) = run_with(&inv, &fake, dir.path(), opts).await.outcome else {
            panic!()
        };
        assert_eq!(
            h.aftermath,
            "opi01 was disarmed (--no-auto-rollback) and is left as it is, cordoned, for a person"
        );
        assert!(fake.calls().contains(&"disarm opi01".to_string()));
        assert!(!fake.calls().iter().any(|c| c.starts_with("arm-state")));
        let fake = Fake::default();
        assert_eq!(
            run_with(&inv, &fake, dir.path(), options(dir.path()))
                .await
                .outcome,
            Outcome::Completed
        );
        assert_eq!(
            fake.calls()[..3],
            ["arm opi01", "migrated opi01", "dial opi01"]
        );
    }

    #[tokio::test]
    async fn pause_waits_between_steps_and_a_lost_lease_halts_at_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let fake = Fake::default();
        fake.control.lock().unwrap().extend([
            Control::Run,
            Control::Paused,
            Control::Paused,
            Control::Run,
        ]);
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert_eq!(r.outcome, Outcome::Completed);
        let p: Vec<(&str, &Phase)> = r
            .events
            .iter()
            .filter(|e| matches!(e.phase, Phase::Paused | Phase::Resumed))
            .map(|e| (e.step.as_str(), &e.phase))
            .collect();
        assert_eq!(p, [("cordon", &Phase::Paused), ("cordon", &Phase::Resumed)]);

        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        fake.control.lock().unwrap().extend([
            Control::Run,
            Control::Run,
            Control::Run,
            Control::Lost("held by laptop-2 since 10:01".into()),
        ]);
        let Outcome::Halted(h) = run_with(&inv, &fake, dir.path(), options(dir.path()))
            .await
            .outcome
        else {
            panic!()
        };
        assert_eq!((h.node, h.step.as_str()), (None, "arm-rollback"));
        assert_eq!(
            h.cause,
            "the migration Lease was lost: held by laptop-2 since 10:01"
        );
        assert_eq!(
            fake.calls(),
            ["preflight opi01", "gates -", "cordon opi01", "drain opi01"]
        );
    }

    #[tokio::test]
    async fn a_worker_without_flannel_before_its_turn_halts_naming_it_and_goes_first_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let fake = Fake::default();
        fake.no_flannel.lock().unwrap().insert("raccoon01".into());
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        let Outcome::Halted(h) = r.outcome else {
            panic!()
        };
        // The worker and its own state, not the controller's next step.
        assert_eq!(
            (h.node.as_deref(), h.step.as_str()),
            (Some("raccoon01"), "watch")
        );
        let text = h.to_string();
        assert!(
            text.starts_with(
                "halted at raccoon01, before its turn: worker raccoon01 came up without Flannel before its turn (its agent says so)"
            ),
            "{text}"
        );
        assert!(
            h.aftermath
                .starts_with("raccoon01 is not started (not cordoned, not labelled)")
                && h.aftermath
                    .contains("a resume migrates it first of the workers"),
            "{h}"
        );
        assert_eq!(fake.calls(), Vec::<String>::new(), "nothing was started");
        assert!(r
            .events
            .iter()
            .any(|e| e.node.as_deref() == Some("raccoon01")
                && e.step == "watch"
                && e.phase == Phase::Failed));
        let s = Journal::open(dir.path(), &inv, Accept::default(), "x")
            .unwrap()
            .state();
        assert!(s.nodes["raccoon01"].stranded.is_some(), "{s:?}");
        assert_eq!(stranded(&s), ["raccoon01"]);

        // The resume: raccoon01 is still without Flannel and NotReady. It is
        // the run's own node, so the gates excuse it, the watch does not
        // halt on it again, and it goes first of the workers.
        let fake = Fake::default();
        fake.no_flannel.lock().unwrap().insert("raccoon01".into());
        fake.not_ready.lock().unwrap().insert("raccoon01".into());
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert_eq!(r.outcome, Outcome::Completed);
        let calls = fake.calls();
        let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
        assert!(at("uncordon opi01") < at("preflight raccoon01"));
        assert!(at("uncordon raccoon01") < at("preflight raccoon00"));
        // Excused while unfinished (the preflights of opi01 and of itself),
        // no longer once it is done (raccoon00's preflight, verify-cluster).
        let excused = fake.excused.lock().unwrap().clone();
        let has = |e: &Vec<String>| e.contains(&"raccoon01".to_string());
        assert_eq!(
            excused.iter().map(has).collect::<Vec<_>>(),
            [true, true, false, false],
            "{excused:?}"
        );
    }

    /// The in-flight node of a halt for another node's sake, by how far it
    /// got: the trigger is the call after which the worker came up without
    /// Flannel; the watch sees it at the next boundary.
    #[tokio::test]
    async fn a_watch_halt_leaves_the_node_in_flight_in_an_explained_state() {
        struct Case {
            after: &'static str,
            says: &'static str,
            called: &'static [&'static str],
            not_called: &'static [&'static str],
        }
        let cases = [
            Case {
                after: "cordon opi01",
                says: "opi01 stays cordoned; it was not switched",
                called: &[],
                not_called: &["disarm opi01", "arm-state opi01", "confirm opi01"],
            },
            Case {
                after: "arm opi01",
                says: "opi01 was armed but never switched: it is disarmed and stays cordoned",
                called: &["disarm opi01"],
                not_called: &["arm-state opi01", "confirm opi01"],
            },
            Case {
                after: "label opi01",
                says: "opi01 was switched but not verified, so it is left to its agent's dead-man rollback: opi01 was rolled back to Flannel by its agent: restored the Flannel configuration; k3s restarted; its k3s runs Flannel again; its label cnishift.io/cni is removed",
                called: &["arm-state opi01", "unlabel opi01"],
                not_called: &["confirm opi01", "disarm opi01"],
            },
            Case {
                after: "dial opi01",
                says: "opi01 had passed Verify, so it is confirmed on Cilium rather than left to roll back",
                called: &["confirm opi01"],
                not_called: &["arm-state opi01", "disarm opi01", "uncordon opi01"],
            },
            Case {
                after: "confirm opi01",
                says: "opi01 is migrated and confirmed; it stays cordoned until the resume uncordons it",
                called: &[],
                not_called: &["arm-state opi01", "disarm opi01", "uncordon opi01"],
            },
        ];
        for c in cases {
            let dir = tempfile::tempdir().unwrap();
            let inv = inventory("", "true");
            let fake = Fake {
                strand_after: Some((c.after.into(), "raccoon01".into())),
                ..Default::default()
            };
            let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
            let Outcome::Halted(h) = r.outcome else {
                panic!("{}: completed", c.after)
            };
            assert_eq!(
                (h.node.as_deref(), h.step.as_str()),
                (Some("raccoon01"), "watch"),
                "{}",
                c.after
            );
            assert!(h.aftermath.contains(c.says), "{}: {h}", c.after);
            let calls = fake.calls();
            let trigger = calls.iter().position(|x| x == c.after).unwrap();
            for want in c.called {
                assert!(
                    calls[trigger + 1..].contains(&want.to_string()),
                    "{}: {calls:?}",
                    c.after
                );
            }
            for not in c.not_called {
                assert!(
                    !calls[trigger + 1..].contains(&not.to_string()),
                    "{}: {not} in {calls:?}",
                    c.after
                );
            }
            // Nothing further started: no step of opi01 after the trigger
            // but the settling, nothing of the workers.
            assert!(!calls
                .iter()
                .any(|x| x.ends_with("raccoon00") || x.ends_with("raccoon01")));
            let later: Vec<&str> = Step::ALL
                .iter()
                .filter_map(|s| op_of(*s))
                .filter(|op| !["confirm", "disarm"].contains(op))
                .collect();
            assert!(
                !calls[trigger + 1..]
                    .iter()
                    .any(|x| later.contains(&x.split(' ').next().unwrap())),
                "{}: {calls:?}",
                c.after
            );
            // A resume finishes from there.
            let fake = Fake::default();
            fake.no_flannel.lock().unwrap().insert("raccoon01".into());
            let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
            assert_eq!(r.outcome, Outcome::Completed, "{}", c.after);
        }
    }

    /// After a dead-man rollback, the aftermath says what the node's k3s
    /// runs in its agent's words, and the migration label follows it.
    #[tokio::test]
    async fn after_a_rollback_the_aftermath_tells_what_k3s_runs_and_the_label_follows() {
        let labelled_fail = ("migrated raccoon00", "true");
        let unlabelled_fail = (
            "-",
            "echo 'error: activation failed' >&2; test {node} != raccoon00",
        );
        /// (failing op, deploy hook), the answer after the rollback, what the
        /// aftermath says, what it must never say, whether it unlabels.
        type Case<'a> = (
            (&'a str, &'a str),
            Option<K3sNetwork>,
            &'a [&'a str],
            &'a [&'a str],
            bool,
        );
        let cases: [Case; 4] = [
            (
                labelled_fail,
                None,
                &["raccoon00 was rolled back to Flannel by its agent: restored the Flannel configuration; k3s restarted; its k3s runs Flannel again; its label cnishift.io/cni is removed, so Cilium's DaemonSet leaves it; it stays cordoned; a resume migrates it again from its preflight"],
                &["WITHOUT"],
                true,
            ),
            (
                labelled_fail,
                Some(K3sNetwork::NoFlannel),
                &[
                    "raccoon00's agent rolled it back (restored the Flannel configuration; k3s restarted), but its k3s came back WITHOUT Flannel: the servers already run --flannel-backend=none, and a k3s agent takes the backend from them when it starts",
                    "its label cnishift.io/cni=cilium is kept, so Cilium",
                    "a resume migrates it again from its preflight (its being NotReady does not block that)",
                ],
                &["rolled back to Flannel", "removed"],
                false,
            ),
            (
                unlabelled_fail,
                Some(K3sNetwork::NoFlannel),
                &["it is not labelled cnishift.io/cni=cilium, so Cilium does not start there either: it has no pod network, and is NotReady, until it is migrated"],
                &["rolled back to Flannel", "kept"],
                false,
            ),
            (
                labelled_fail,
                Some(K3sNetwork::Unknown("no containerd config".into())),
                &["whether its k3s runs Flannel now cannot be told (no containerd config); its label is left as it is"],
                &["rolled back to Flannel"],
                false,
            ),
        ];
        for ((fail, deploy), net, says, never, unlabel) in cases {
            let dir = tempfile::tempdir().unwrap();
            let inv = inventory("", deploy);
            let mut fake = Fake::default();
            fake.fail.insert(fail.into(), "cilium_host is down".into());
            if let Some(n) = net.clone() {
                fake.after_rollback.insert("raccoon00".into(), n);
            }
            let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
            let Outcome::Halted(h) = r.outcome else {
                panic!("{net:?}: completed")
            };
            assert_eq!(h.node.as_deref(), Some("raccoon00"));
            for s in says {
                assert!(h.aftermath.contains(s), "{net:?}: {s}\n{h}");
            }
            for s in never {
                assert!(!h.aftermath.contains(s), "{net:?}: {s}\n{h}");
            }
            let calls = fake.calls();
            assert_eq!(
                calls.contains(&"unlabel raccoon00".to_string()),
                unlabel,
                "{net:?}: {calls:?}"
            );
            if unlabel {
                let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
                assert!(at("arm-state raccoon00") < at("unlabel raccoon00"));
                assert!(fake
                    .events
                    .lock()
                    .unwrap()
                    .contains(&"raccoon00 unlabel-done true".to_string()));
            }
        }
    }

    #[tokio::test]
    async fn a_resume_goes_on_with_its_own_notready_node_but_not_past_another() {
        let dir = tempfile::tempdir().unwrap();
        // The deploy fails on raccoon00 while the marker exists (the
        // inventory must stay the same for the resume).
        let marker = dir.path().join("fail");
        std::fs::write(&marker, "").unwrap();
        let inv = inventory(
            "",
            &format!(
                "test {{node}} != raccoon00 || test ! -e {}",
                marker.display()
            ),
        );
        let mut fake = Fake::default();
        fake.after_rollback
            .insert("raccoon00".into(), K3sNetwork::NoFlannel);
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert!(
            matches!(r.outcome, Outcome::Halted(ref h) if h.node.as_deref() == Some("raccoon00"))
        );
        let halted = std::fs::read_to_string(dir.path().join(journal::FILE)).unwrap();
        std::fs::remove_file(&marker).unwrap();

        // Another node NotReady — one the run finished, or one it has not
        // started — still blocks.
        for other in ["opi01", "raccoon01"] {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(journal::FILE), &halted).unwrap();
            let fake = Fake::default();
            fake.not_ready.lock().unwrap().insert("raccoon00".into());
            fake.not_ready.lock().unwrap().insert(other.into());
            let Outcome::Halted(h) = run_with(&inv, &fake, d.path(), options(d.path()))
                .await
                .outcome
            else {
                panic!("{other}: completed")
            };
            assert_eq!(
                (h.node.as_deref(), h.step.as_str(), h.cause.as_str()),
                (
                    Some("raccoon00"),
                    "preflight",
                    format!("gate nodes.ready: node {other} is NotReady").as_str()
                )
            );
        }

        // Its own halted node NotReady: the resume migrates it.
        let fake = Fake::default();
        fake.not_ready.lock().unwrap().insert("raccoon00".into());
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(
            fake.calls()[..3],
            ["preflight raccoon00", "gates -", "cordon raccoon00"]
        );
        assert_eq!(fake.excused.lock().unwrap()[0], ["raccoon00"]);
    }

    /// The done record is on disk before the done event is emitted, and the
    /// event before the Node's Event — for every node step, cluster step and
    /// failure: a kill right after "done" never redoes the step.
    #[tokio::test]
    async fn each_outcome_is_journaled_then_emitted_then_recorded_on_the_node() {
        for fail in [None, Some("migrated raccoon00")] {
            let dir = tempfile::tempdir().unwrap();
            let inv = inventory("", "true");
            let mut fake = Fake::default();
            *fake.etcd_members.lock().unwrap() = crate::migrate::etcd::controllers(&inv.nodes);
            if let Some(f) = fail {
                fake.fail.insert(f.into(), "cilium_host is down".into());
            }
            let opts = options(dir.path());
            let mut j = Journal::open(dir.path(), &inv, Accept::default(), "run-1").unwrap();
            let state = j.state();
            let path = dir.path().join(journal::FILE);
            let mut checked = 0;
            let mut sink = |e: &Event| {
                let (kind, what) = match e.phase {
                    Phase::Done => ("\"type\":\"done\"", &e.detail),
                    Phase::Failed => ("\"type\":\"failed\"", &e.detail),
                    _ => return,
                };
                if e.step == "rollback" || e.step == "unlabel" {
                    return; // not a step's outcome
                }
                fake.events.lock().unwrap().push(format!(
                    "event {} {} {:?}",
                    e.node.as_deref().unwrap_or("-"),
                    e.step,
                    e.phase
                ));
                let text = std::fs::read_to_string(&path).unwrap();
                let rec = serde_json::to_string(what).unwrap();
                assert!(
                    text.lines().any(|l| l.contains(kind)
                        && l.contains(&format!("\"step\":\"{}\"", e.step))
                        && l.contains(&rec)),
                    "{} {} {:?} emitted before its record was written",
                    e.node.as_deref().unwrap_or("-"),
                    e.step,
                    e.phase
                );
                checked += 1;
            };
            {
                let mut d = Driver {
                    ctx: Ctx {
                        inv: &inv,
                        cluster: &fake,
                        agents: &fake,
                        opts: &opts,
                        run: "run-1".into(),
                    },
                    journal: Some(&mut j),
                    state,
                    sink: &mut sink,
                };
                d.run().await;
            }
            assert!(checked > 12, "{checked}");
            let log = fake.events.lock().unwrap().clone();
            for (i, l) in log.iter().enumerate() {
                // "opi01 preflight-done true" follows "event opi01 preflight Done".
                let Some((node, rest)) = l.split_once(' ') else {
                    continue;
                };
                if node == "event" {
                    continue;
                }
                let (step, phase) = match rest.split_once(' ').unwrap().0.rsplit_once('-') {
                    Some((s, "done")) => (s, "Done"),
                    Some((s, "failed")) => (s, "Failed"),
                    _ => continue,
                };
                if step == "unlabel" {
                    continue;
                }
                let event = format!("event {node} {step} {phase}");
                assert!(log[..i].contains(&event), "{l} before {event}: {log:?}");
            }
        }
    }

    #[tokio::test]
    async fn dry_run_prints_every_action_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "just nix deploy {node}");
        let fake = Fake::default();
        let mut opts = options(dir.path());
        opts.dry_run = true;
        let r = run_with(&inv, &fake, dir.path(), opts).await;
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(fake.calls(), Vec::<String>::new());
        assert!(fake.events.lock().unwrap().is_empty());
        assert!(r.events.iter().all(|e| e.phase == Phase::DryRun));
        // Every node's 12 steps, the etcd snapshot, verify-cluster and cleanup.
        assert_eq!(r.events.len(), 3 * 12 + 3);
        assert!(fake.snapshots.lock().unwrap().is_empty());
        let d = r
            .events
            .iter()
            .find(|e| e.step == "deploy" && e.node.as_deref() == Some("raccoon00"))
            .unwrap();
        assert_eq!(d.detail, "run sh -c just nix deploy raccoon00");
        let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
        assert_eq!(j.records.len(), 1, "only the header this test's open wrote");
    }

    /// The budget's part that needs no lab: the driver's own cost per node
    /// (journal records fsync'd, Events, the hook's spawn, the boundary
    /// checks) with a world that answers at once, and reading back a whole
    /// 9-node journal, which is what a resume after SIGKILL does first.
    #[tokio::test]
    async fn overhead_per_node_and_resume_read_are_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = "[cluster]\nname = \"avalanche\"\napi_vip = \"10.1.0.5:6443\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
                        [hooks]\ndeploy = [\"true\"]\n[cilium]\nnode_label = \"cni=cilium\"\n"
            .to_string();
        for i in 0..9 {
            let role = if i < 3 { "controller" } else { "worker" };
            text.push_str(&format!(
                "[[nodes]]\nname = \"n{i}\"\nrole = \"{role}\"\naddress = \"10.1.0.{}:7443\"\n",
                20 + i
            ));
        }
        let inv = Inventory::parse(&text, Path::new("/x/cluster.toml"), Load::default()).unwrap();
        let started = Instant::now();
        let r = run_with(&inv, &Fake::default(), dir.path(), options(dir.path())).await;
        let per_node = started.elapsed() / 9;
        assert_eq!(r.outcome, Outcome::Completed);
        let started = Instant::now();
        let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
        let state = j.state();
        let resume = started.elapsed();
        assert!(state.nodes.values().all(|n| n.done.len() == 12));
        eprintln!(
            "driver overhead per node: {per_node:?}; resume read of {} records: {resume:?}",
            j.records.len()
        );
        assert!(
            per_node < Duration::from_millis(500),
            "{per_node:?} per node"
        );
        assert!(resume < Duration::from_secs(1), "{resume:?}");
    }

    #[tokio::test]
    async fn the_first_controller_is_touched_only_after_an_etcd_snapshot_of_this_run() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let fake = Fake::default();
        let r = run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(*fake.snapshots.lock().unwrap(), ["opi01 run-1"]);
        let pos = |step: &str, node: Option<&str>, phase: Phase| {
            r.events
                .iter()
                .position(|e| e.step == step && e.node.as_deref() == node && e.phase == phase)
                .unwrap_or_else(|| panic!("no {step} {node:?} {phase:?}"))
        };
        assert!(
            pos("preflight", Some("opi01"), Phase::Done) < pos("etcd-snapshot", None, Phase::Done)
                && pos("etcd-snapshot", None, Phase::Done)
                    < pos("cordon", Some("opi01"), Phase::Started)
        );
        let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
        let detail = j
            .records
            .iter()
            .find_map(|rec| match rec {
                Record::Done {
                    node: None,
                    step,
                    detail,
                    ..
                } if step == "etcd-snapshot" => Some(detail.clone()),
                _ => None,
            })
            .expect("journaled");
        assert_eq!(
            detail,
            "opi01: /var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-run-1-opi01-1767225600 (20512 bytes, 0 ms)"
        );
        // The controller's preflight says the quorum holds (one member: its own).
        let pre = &r.events[pos("preflight", Some("opi01"), Phase::Done)].detail;
        assert!(pre.ends_with("etcd has a single voting member, opi01's own: no quorum to lose, but the API is unavailable while its k3s restarts"), "{pre}");
        // Resumed (here: a run already done), no second snapshot.
        let fake = Fake::default();
        run_with(&inv, &fake, dir.path(), options(dir.path())).await;
        assert!(fake.snapshots.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn no_snapshot_halts_before_any_node_is_touched_and_the_flag_is_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let fake = Fake {
            etcd_snapshot_fails: Some("agent error FailedPrecondition: the etcd snapshot command `k3s etcd-snapshot save --name cnishift-pre-run-1` exited 1".into()),
            ..Default::default()
        };
        let Outcome::Halted(h) = run_with(&inv, &fake, dir.path(), options(dir.path()))
            .await
            .outcome
        else {
            panic!("completed")
        };
        assert_eq!(
            (h.node.as_deref(), h.step.as_str()),
            (None, "etcd-snapshot")
        );
        assert_eq!(
            h.cause,
            "no etcd snapshot could be taken, and migrate does not touch the first controller without one: \
             opi01: agent error FailedPrecondition: the etcd snapshot command `k3s etcd-snapshot save --name cnishift-pre-run-1` exited 1"
        );
        assert!(
            h.aftermath.ends_with("resume with --skip-etcd-snapshot"),
            "{h}"
        );
        assert_eq!(h.rollback, None, "nothing to roll back");
        assert_eq!(
            fake.calls(),
            ["preflight opi01", "gates -"],
            "nothing touched"
        );
        // With the flag: no snapshot, and the journal says so.
        let fake = Fake::default();
        let mut opts = options(dir.path());
        opts.skip_etcd_snapshot = true;
        let r = run_with(&inv, &fake, dir.path(), opts).await;
        assert_eq!(r.outcome, Outcome::Completed);
        assert!(fake.snapshots.lock().unwrap().is_empty());
        let skipped = r
            .events
            .iter()
            .find(|e| e.step == "etcd-snapshot" && e.phase == Phase::Skipped)
            .expect("a skipped event");
        assert_eq!(
            skipped.detail,
            "skipped (--skip-etcd-snapshot): no etcd snapshot was taken in this run"
        );
        let j = Journal::open(dir.path(), &inv, Accept::default(), "x").unwrap();
        assert!(j.records.iter().any(|rec| matches!(rec,
            Record::Done { node: None, step, detail, .. }
                if step == "etcd-snapshot" && detail.starts_with("skipped (--skip-etcd-snapshot)"))));
    }

    #[tokio::test]
    async fn a_controller_whose_going_down_would_lose_etcds_quorum_halts_at_its_preflight() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let fake = Fake {
            etcd_stranger: true,
            ..Default::default()
        };
        let Outcome::Halted(h) = run_with(&inv, &fake, dir.path(), options(dir.path()))
            .await
            .outcome
        else {
            panic!("completed")
        };
        assert_eq!(
            (h.node.as_deref(), h.step.as_str()),
            (Some("opi01"), "preflight")
        );
        assert_eq!(
            h.cause,
            "taking opi01 down would lose etcd's quorum: 0 other healthy voting members of 2 (quorum 2); \
             opi09-5e1f2a3b (member 63) is not healthy: no agent answers for it (it runs on no controller of the inventory)"
        );
        assert_eq!(h.aftermath, "opi01 is untouched: it was not cordoned");
        assert!(fake.snapshots.lock().unwrap().is_empty());
        assert!(!fake.calls().iter().any(|c| c.starts_with("cordon")));
    }
}
