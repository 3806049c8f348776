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
use super::plan::{plan, ClusterStep, PlanOptions, Step};
use super::steps::{ArmState, Cause, Cluster, Control, NodeAgents};
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

/// How much later than a hook's own deadline its step gives up on it.
const HOOK_GRACE: Duration = Duration::from_secs(2);

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
    pub async fn step(&self, node: &Node, step: Step) -> Result<String, Cause> {
        let d = &self.inv.deadlines;
        let name = node.name.as_str();
        match step {
            Step::Preflight => {
                self.agents.preflight(node).await?;
                self.cluster.gates().await?;
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
                    tokio::time::sleep(self.opts.poll).await;
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

    /// Between two steps: the Lease (lost → halt; paused → wait) and the
    /// watch on workers not yet migrated.
    async fn boundary(&mut self, next: &str, waiting: &[Node]) -> Result<(), Outcome> {
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
        // Asked at once: one slow agent costs its own deadline, not the sum.
        let workers: Vec<&Node> = waiting.iter().filter(|n| n.role == Role::Worker).collect();
        let answers = {
            let agents = self.ctx.agents;
            futures::future::join_all(workers.iter().map(|w| agents.flannel_missing(w))).await
        };
        for (w, answer) in workers.into_iter().zip(answers) {
            match answer {
                Ok(false) => {}
                Ok(true) => {
                    let cause = format!(
                        "worker {} came up without Flannel before its turn (its agent says so): its k3s restarted while the servers disagreed on the backend",
                        w.name
                    );
                    return Err(Outcome::Halted(Halt {
                        node: Some(w.name.clone()),
                        step: next.to_string(),
                        cause,
                        aftermath: format!("migrate it next: its pods have no network until it runs Cilium ({} {} rolls it back)", self.ctx.opts.rollback_command, w.name),
                        resume: self.ctx.opts.resume_command.clone(),
                        rollback: Some(format!("{} {}", self.ctx.opts.rollback_command, w.name)),
                    }));
                }
                Err(e) => self.emit(
                    Some(&w.name),
                    "watch",
                    Phase::Note,
                    Duration::ZERO,
                    None,
                    format!("could not ask whether it still runs Flannel: {e}"),
                ),
            }
        }
        Ok(())
    }

    /// What became of a node that failed at `step`.
    async fn aftermath(&mut self, node: &Node, step: Step) -> String {
        let armed = step.armed() || step == Step::Confirm;
        if !armed {
            return format!("{} stays cordoned", node.name);
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
                        message.clone(),
                    );
                    return format!(
                        "{} was rolled back to Flannel by its agent: {message}; it stays cordoned",
                        node.name
                    );
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
        match self.ctx.hook(&t, first, "cilium-install", deadline).await {
            Ok(d) => {
                self.write(Record::Done {
                    node: None,
                    step: "cilium-install".into(),
                    time: journal::now(),
                    detail: d.clone(),
                })
                .map_err(|e| self.halt(None, "cilium-install", e, String::new()))?;
                self.emit(
                    None,
                    "cilium-install",
                    Phase::Done,
                    started.elapsed(),
                    Some(deadline),
                    d,
                );
                self.state.cluster.done.insert("cilium-install".into());
                Ok(())
            }
            Err(cause) => {
                self.emit(
                    None,
                    "cilium-install",
                    Phase::Failed,
                    started.elapsed(),
                    Some(deadline),
                    cause.clone(),
                );
                let _ = self.write(Record::Failed {
                    node: None,
                    step: "cilium-install".into(),
                    time: journal::now(),
                    cause: cause.clone(),
                });
                Err(self.halt(None, "cilium-install", cause, format!("{} stays cordoned, armed: its agent rolls it back unless the run resumes in time", first.name)))
            }
        }
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
            self.ctx
                .cluster
                .record(
                    &n.name,
                    &format!("{}-started", step.name()),
                    true,
                    &format!("cnishift migrate: {} started", step.name()),
                )
                .await;
        }
        // A hook enforces its own deadline (and kills its process group);
        // the step's, a little later, is the backstop.
        let grace = match step {
            Step::Deploy | Step::Verify => HOOK_GRACE,
            _ => Duration::ZERO,
        };
        let started = Instant::now();
        let results = {
            let ctx = &self.ctx;
            futures::future::join_all(
                nodes
                    .iter()
                    .map(|n| within(deadline, grace, step.name(), ctx.step(n, step))),
            )
            .await
        };
        let elapsed = started.elapsed();
        let mut first_failure = None;
        for (n, r) in nodes.iter().zip(results) {
            match r {
                Ok(detail) => {
                    // The journal first: whoever sees "done" (the event, the
                    // Node's Event) may kill us, and a resumed run must not
                    // redo a step that was reported done.
                    self.write(Record::Done {
                        node: Some(n.name.clone()),
                        step: step.name().into(),
                        time: journal::now(),
                        detail: detail.clone(),
                    })
                    .map_err(|e| self.halt(Some(n), step.name(), e, String::new()))?;
                    self.emit(
                        Some(&n.name),
                        step.name(),
                        Phase::Done,
                        elapsed,
                        Some(deadline),
                        detail.clone(),
                    );
                    self.ctx
                        .cluster
                        .record(&n.name, &format!("{}-done", step.name()), true, &detail)
                        .await;
                }
                Err(cause) => {
                    self.emit(
                        Some(&n.name),
                        step.name(),
                        Phase::Failed,
                        elapsed,
                        Some(deadline),
                        cause.clone(),
                    );
                    self.ctx
                        .cluster
                        .record(&n.name, &format!("{}-failed", step.name()), false, &cause)
                        .await;
                    let _ = self.write(Record::Failed {
                        node: Some(n.name.clone()),
                        step: step.name().into(),
                        time: journal::now(),
                        cause: cause.clone(),
                    });
                    first_failure.get_or_insert((n.clone(), cause));
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
        self.boundary(name, &[]).await?;
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
                        ctx.cluster.gates().await?;
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
        match r {
            Ok(detail) => {
                self.write(Record::Done {
                    node: None,
                    step: name.into(),
                    time: journal::now(),
                    detail: detail.clone(),
                })
                .map_err(|e| self.halt(None, name, e, String::new()))?;
                self.emit(
                    None,
                    name,
                    Phase::Done,
                    started.elapsed(),
                    Some(deadline),
                    detail,
                );
                Ok(())
            }
            Err(cause) => {
                self.emit(
                    None,
                    name,
                    Phase::Failed,
                    started.elapsed(),
                    Some(deadline),
                    cause.clone(),
                );
                let _ = self.write(Record::Failed {
                    node: None,
                    step: name.into(),
                    time: journal::now(),
                    cause: cause.clone(),
                });
                Err(self.halt(
                    None,
                    name,
                    cause,
                    "every node is migrated; the cluster step can be run again".into(),
                ))
            }
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
        let p = plan(
            self.ctx.inv,
            PlanOptions {
                no_cleanup: self.ctx.opts.no_cleanup,
                no_auto_rollback: self.ctx.opts.no_auto_rollback,
            },
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
                self.boundary(step.name(), &waiting).await?;
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
        flannel_missing: HashSet<String>,
        arm_state: Option<ArmState>,
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
        async fn gates(&self) -> Result<(), Cause> {
            self.op("gates", "-").await
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
        async fn flannel_missing(&self, node: &Node) -> Result<bool, Cause> {
            Ok(self.flannel_missing.contains(&node.name))
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
    async fn a_worker_without_flannel_before_its_turn_halts_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let inv = inventory("", "true");
        let mut fake = Fake::default();
        fake.flannel_missing.insert("raccoon01".into());
        let Outcome::Halted(h) = run_with(&inv, &fake, dir.path(), options(dir.path()))
            .await
            .outcome
        else {
            panic!()
        };
        assert_eq!(
            (h.node.as_deref(), h.step.as_str()),
            (Some("raccoon01"), "preflight")
        );
        assert!(
            h.cause.starts_with(
                "worker raccoon01 came up without Flannel before its turn (its agent says so)"
            ),
            "{h}"
        );
        assert_eq!(fake.calls(), Vec::<String>::new());
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
        assert_eq!(h.aftermath, "opi01 stays cordoned");
        assert!(fake.snapshots.lock().unwrap().is_empty());
        assert!(!fake.calls().iter().any(|c| c.starts_with("cordon")));
    }
}
