//! The order of a migration: controllers one at a time in inventory order,
//! then workers in waves of `[migrate] max_unavailable`; per node the steps
//! and their deadlines; after the last node, VerifyCluster and Cleanup; and
//! the warnings this cluster needs, each with its reason.

use std::time::Duration;

use serde::Serialize;

use crate::inventory::{Deadlines, Inventory, Node, Role};

/// One step of one node, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Preflight,
    Cordon,
    Drain,
    ArmRollback,
    Deploy,
    Label,
    WaitCiliumReady,
    Repod,
    Verify,
    Confirm,
    Uncordon,
    Done,
}

impl Step {
    pub const ALL: [Step; 12] = [
        Step::Preflight,
        Step::Cordon,
        Step::Drain,
        Step::ArmRollback,
        Step::Deploy,
        Step::Label,
        Step::WaitCiliumReady,
        Step::Repod,
        Step::Verify,
        Step::Confirm,
        Step::Uncordon,
        Step::Done,
    ];

    /// As in the journal, the events and the tables.
    pub fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Cordon => "cordon",
            Step::Drain => "drain",
            Step::ArmRollback => "arm-rollback",
            Step::Deploy => "deploy",
            Step::Label => "label",
            Step::WaitCiliumReady => "wait-cilium-ready",
            Step::Repod => "repod",
            Step::Verify => "verify",
            Step::Confirm => "confirm",
            Step::Uncordon => "uncordon",
            Step::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name() == s)
    }

    /// The deadline the driver enforces on the whole step.
    pub fn deadline(self, d: &Deadlines) -> Duration {
        match self {
            Step::Preflight => d.report,
            Step::Cordon | Step::Uncordon | Step::Done | Step::Label => d.api,
            Step::Drain => d.drain,
            Step::ArmRollback | Step::Confirm => d.report,
            // (cilium_install, before the first Label, has [deadlines] deploy of its own.)
            Step::Deploy => d.deploy,
            Step::WaitCiliumReady => d.cilium_ready.max(d.node_ready),
            Step::Repod => d.repod,
            Step::Verify => d.verify,
        }
    }

    /// Between ArmRollback and Confirm a failure leaves the node to its
    /// agent's dead-man rollback.
    pub fn armed(self) -> bool {
        (Step::Deploy..=Step::Verify).contains(&self)
    }
}

/// What runs after the last node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterStep {
    VerifyCluster,
    Cleanup,
}

impl ClusterStep {
    pub fn name(self) -> &'static str {
        match self {
            ClusterStep::VerifyCluster => "verify-cluster",
            ClusterStep::Cleanup => "cleanup",
        }
    }
}

/// Nodes migrated together (one controller, or up to max_unavailable workers).
#[derive(Debug, Clone, Serialize)]
pub struct Wave {
    pub role: Role,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    pub step: Step,
    #[serde(serialize_with = "ser_ms", rename = "deadline_ms")]
    pub deadline: Duration,
    /// What the step does on this cluster (the rendered hook, the label).
    pub action: String,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A run-wide step `migrate` takes before or around the first node: the
/// values gate (every start), the backup (once per run), the etcd snapshot
/// (after the first controller's Preflight, before its Cordon).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStep {
    pub step: &'static str,
    pub when: &'static str,
    pub action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub id: &'static str,
    pub message: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub cluster: String,
    /// The run-wide steps around the first node, journaled as cluster steps.
    pub before: Vec<RunStep>,
    pub waves: Vec<Wave>,
    /// The same for every node; actions name `{node}`.
    pub steps: Vec<PlannedStep>,
    pub after: Vec<ClusterStep>,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    pub no_cleanup: bool,
    pub no_auto_rollback: bool,
}

/// Moves `first` — workers the early-restart watch found without Flannel
/// before their turn — to the head of the workers, in the same waves of
/// `max_unavailable`. Such a worker has no pod network until it runs Cilium,
/// so it goes as soon as the controllers are done; never before them, since
/// a k3s agent takes its backend from the servers and can only be switched
/// once they have been.
pub fn stranded_first(p: &mut Plan, first: &[String], max_unavailable: usize) {
    if first.is_empty() {
        return;
    }
    let workers: Vec<Node> = p
        .waves
        .iter()
        .filter(|w| w.role == Role::Worker)
        .flat_map(|w| w.nodes.iter().cloned())
        .collect();
    let (mut ordered, rest): (Vec<Node>, Vec<Node>) =
        workers.into_iter().partition(|n| first.contains(&n.name));
    ordered.extend(rest);
    p.waves.retain(|w| w.role != Role::Worker);
    for chunk in ordered.chunks(max_unavailable.max(1)) {
        p.waves.push(Wave {
            role: Role::Worker,
            nodes: chunk.to_vec(),
        });
    }
}

fn argv(t: &Option<crate::migrate::hooks::Template>) -> Option<String> {
    t.as_ref().map(|t| t.argv().join(" "))
}

pub fn plan(inv: &Inventory, opts: PlanOptions) -> Plan {
    let mut waves: Vec<Wave> = inv
        .nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .map(|n| Wave {
            role: Role::Controller,
            nodes: vec![n.clone()],
        })
        .collect();
    let workers: Vec<Node> = inv
        .nodes
        .iter()
        .filter(|n| n.role == Role::Worker)
        .cloned()
        .collect();
    for chunk in workers.chunks(inv.migrate.max_unavailable.max(1)) {
        waves.push(Wave {
            role: Role::Worker,
            nodes: chunk.to_vec(),
        });
    }
    let d = &inv.deadlines;
    let label = inv
        .cilium
        .node_label
        .as_ref()
        .map(|(k, v)| format!("{k}={v}"));
    let steps = Step::ALL
        .into_iter()
        .map(|step| {
            let action = match step {
                Step::Preflight => "the agent's report is ready; the cluster gates pass".into(),
                Step::Cordon => "mark the node unschedulable".into(),
                Step::Drain => "evict its pods (PodDisruptionBudgets honoured)".into(),
                Step::ArmRollback => format!(
                    "arm the agent's dead-man rollback ({})",
                    humantime::format_duration(d.confirm)
                ),
                Step::Deploy => argv(&inv.hooks.deploy)
                    .map_or("no [hooks] deploy: migrate refuses to start".into(), |a| {
                        format!("run {a}")
                    }),
                Step::Label => match (&label, argv(&inv.hooks.cilium_install)) {
                    (Some(l), Some(i)) => {
                        format!("label {l} (first: run {i} if Cilium's DaemonSet is absent)")
                    }
                    (Some(l), None) => format!("label {l}"),
                    (None, _) => "nothing: [cilium] node_label is not set".into(),
                },
                Step::WaitCiliumReady => "wait for the Cilium pod and the node Ready".into(),
                Step::Repod => {
                    "delete its non-hostNetwork pods, wait until they are Ready, none left on cni0"
                        .into()
                }
                Step::Verify => {
                    let mut s = "the agent's migrated verdicts".to_string();
                    if let Some(vip) = inv.cluster.api_vip {
                        s.push_str(&format!(", dial {vip} from the node"));
                    }
                    if let Some(v) = argv(&inv.hooks.verify) {
                        s.push_str(&format!(", run {v}"));
                    }
                    s
                }
                Step::Confirm => "confirm the agent (no rollback)".into(),
                Step::Uncordon => "uncordon (an admin's cordon stays)".into(),
                Step::Done => "record the node as done".into(),
            };
            PlannedStep {
                step,
                deadline: step.deadline(d),
                action,
            }
        })
        .collect();
    let mut after = vec![ClusterStep::VerifyCluster];
    if !opts.no_cleanup {
        after.push(ClusterStep::Cleanup);
    }
    let mut before = vec![];
    if let Some(v) = &inv.cilium.values {
        before.push(RunStep {
            step: "values",
            when: "at every start of the run",
            action: format!(
                "check {} against the cluster (a failing finding halts)",
                v.display()
            ),
        });
    }
    before.push(RunStep {
        step: "backup",
        when: "once per run, before the first node",
        action:
            "NetworkPolicies, Nodes, PDBs and the CNI ConfigMaps as YAML under <state dir>/backups"
                .into(),
    });
    if waves.first().is_some_and(|w| w.role == Role::Controller) {
        before.push(RunStep {
            step: "etcd-snapshot",
            when: "after the first controller's preflight, before its cordon",
            action: "the first controller's agent takes an etcd snapshot named for the run (--skip-etcd-snapshot: journaled as skipped)".into(),
        });
    }
    Plan {
        cluster: inv.cluster.name.clone(),
        before,
        waves,
        steps,
        after,
        warnings: warnings(inv, opts),
    }
}

fn warnings(inv: &Inventory, opts: PlanOptions) -> Vec<Warning> {
    let mut w = vec![];
    let controllers = inv
        .nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .count();
    let workers = inv.nodes.len() - controllers;
    if inv.nodes.len() > 1 {
        w.push(Warning {
            id: "mixed-datapath",
            message: if opts.no_cleanup {
                "--no-cleanup: Flannel's devices stay on every node after the run".into()
            } else {
                "Flannel's leftovers are cleaned only after every node is migrated".into()
            },
            reason: "while some nodes run Flannel and others Cilium, pods reach each other only \
                     through the Flannel devices left on migrated nodes"
                .into(),
        });
    }
    if controllers > 0 && workers > 0 {
        w.push(Warning {
            id: "flannel-backend-from-servers",
            message: "keep the controller phase short; migrate halts if a worker comes up without Flannel before its turn".into(),
            reason: "k3s agents take the Flannel backend from whichever server answers when they \
                     start: while the servers disagree, a worker whose k3s restarts (a Pi that \
                     reboots) may come up without Flannel"
                .into(),
        });
    }
    if inv.cilium.node_label.is_none() {
        w.push(Warning {
            id: "cilium-daemonset-unrestricted",
            message: "[cilium] node_label is not set: the Cilium DaemonSet is not limited to migrated nodes".into(),
            reason: "a Cilium agent that starts on a node still running Flannel fights it for the \
                     node's pod network; set node_label and give the DaemonSet a nodeSelector on it"
                .into(),
        });
    }
    let d = &inv.deadlines;
    let armed: Duration = Step::ALL
        .into_iter()
        .filter(|s| s.armed())
        .map(|s| s.deadline(d))
        .sum();
    if d.confirm < armed {
        w.push(Warning {
            id: "confirm-shorter-than-steps",
            message: format!(
                "[deadlines] confirm ({}) is shorter than Deploy..Verify may take ({})",
                humantime::format_duration(d.confirm),
                humantime::format_duration(armed)
            ),
            reason: "an agent not confirmed by then rolls a healthy but slow node back".into(),
        });
    }
    if opts.no_auto_rollback {
        w.push(Warning {
            id: "no-auto-rollback",
            message:
                "--no-auto-rollback: a node that fails after Deploy is disarmed and left as it is"
                    .into(),
            reason: "a person decides: `cnishift rollback NODE` or fix it and resume".into(),
        });
    }
    if inv.hooks.deploy.is_none() {
        w.push(Warning {
            id: "no-deploy-hook",
            message: "[hooks] deploy is not set: migrate refuses to start".into(),
            reason: "nothing would switch a node to Cilium".into(),
        });
    }
    w
}

/// The plan for people.
pub fn table(p: &Plan) -> String {
    let mut s = format!("cluster {}: {} waves\n", p.cluster, p.waves.len());
    for (i, w) in p.waves.iter().enumerate() {
        let names: Vec<&str> = w.nodes.iter().map(|n| n.name.as_str()).collect();
        s.push_str(&format!(
            "  wave {:<2} {:<10} {}\n",
            i + 1,
            w.role.to_string(),
            names.join(", ")
        ));
    }
    if !p.before.is_empty() {
        s.push_str("\nrun-wide, around the first node:\n");
        for b in &p.before {
            s.push_str(&format!("  {:<18} {}: {}\n", b.step, b.when, b.action));
        }
    }
    s.push_str("\nper node:\n");
    for st in &p.steps {
        s.push_str(&format!(
            "  {:<18} {:>8}  {}\n",
            st.step.name(),
            humantime::format_duration(st.deadline).to_string(),
            st.action
        ));
    }
    s.push_str("\nafter the last node: ");
    s.push_str(
        &p.after
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", "),
    );
    s.push('\n');
    if !p.warnings.is_empty() {
        s.push_str("\nwarnings:\n");
        for w in &p.warnings {
            s.push_str(&format!(
                "  ! {}: {}\n    why: {}\n",
                w.id, w.message, w.reason
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Load;
    use std::path::Path;

    pub(crate) fn inventory(extra: &str, workers: usize) -> Inventory {
        let mut s = format!(
            "[cluster]\nname = \"lab\"\napi_vip = \"10.1.0.5:6443\"\n[tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n{extra}\n"
        );
        for i in 1..=2 {
            s.push_str(&format!(
                "[[nodes]]\nname = \"opi0{i}\"\nrole = \"controller\"\naddress = \"10.1.0.1{i}:7443\"\n"
            ));
        }
        for i in 0..workers {
            s.push_str(&format!(
                "[[nodes]]\nname = \"raccoon0{i}\"\nrole = \"worker\"\naddress = \"10.1.0.2{i}:7443\"\n"
            ));
        }
        Inventory::parse(&s, Path::new("/c/cluster.toml"), Load::default()).unwrap()
    }

    #[test]
    fn controllers_one_at_a_time_then_worker_waves() {
        let inv = inventory("[migrate]\nmax_unavailable = 2", 5);
        let p = plan(&inv, PlanOptions::default());
        let waves: Vec<Vec<&str>> = p
            .waves
            .iter()
            .map(|w| w.nodes.iter().map(|n| n.name.as_str()).collect())
            .collect();
        assert_eq!(
            waves,
            vec![
                vec!["opi01"],
                vec!["opi02"],
                vec!["raccoon00", "raccoon01"],
                vec!["raccoon02", "raccoon03"],
                vec!["raccoon04"]
            ]
        );
        assert_eq!(
            p.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
            Step::ALL.to_vec()
        );
        assert_eq!(p.after, [ClusterStep::VerifyCluster, ClusterStep::Cleanup]);
        let p = plan(
            &inv,
            PlanOptions {
                no_cleanup: true,
                ..Default::default()
            },
        );
        assert_eq!(p.after, [ClusterStep::VerifyCluster]);
    }

    #[test]
    fn stranded_workers_go_first_of_the_workers_never_before_the_controllers() {
        let inv = inventory("[migrate]\nmax_unavailable = 2", 5);
        let mut p = plan(&inv, PlanOptions::default());
        stranded_first(&mut p, &["raccoon03".into()], 2);
        let waves: Vec<Vec<&str>> = p
            .waves
            .iter()
            .map(|w| w.nodes.iter().map(|n| n.name.as_str()).collect())
            .collect();
        assert_eq!(
            waves,
            vec![
                vec!["opi01"],
                vec!["opi02"],
                vec!["raccoon03", "raccoon00"],
                vec!["raccoon01", "raccoon02"],
                vec!["raccoon04"]
            ]
        );
    }

    #[test]
    fn the_run_wide_steps_are_planned_where_migrate_takes_them() {
        let with_ctl = plan(&inventory("", 1), PlanOptions::default());
        let steps: Vec<&str> = with_ctl.before.iter().map(|b| b.step).collect();
        assert_eq!(steps, ["backup", "etcd-snapshot"]);
        assert!(table(&with_ctl)
            .contains("\n  etcd-snapshot      after the first controller's preflight"));
        let mut inv = inventory("", 1);
        inv.nodes.retain(|n| n.role == Role::Worker);
        inv.cilium.values = Some("helm-values.yaml".into());
        let workers_only = plan(&inv, PlanOptions::default());
        let steps: Vec<&str> = workers_only.before.iter().map(|b| b.step).collect();
        assert_eq!(
            steps,
            ["values", "backup"],
            "no controller: no etcd snapshot"
        );
    }

    #[test]
    fn deadlines_and_warnings_with_reasons() {
        let inv = inventory(
            "[deadlines]\ndeploy = \"7m\"\nconfirm = \"10m\"\n[hooks]\ndeploy = [\"just\", \"nix\", \"deploy\", \"{node}\"]",
            1,
        );
        let p = plan(&inv, PlanOptions::default());
        let deploy = p.steps.iter().find(|s| s.step == Step::Deploy).unwrap();
        assert_eq!(deploy.deadline, Duration::from_secs(420));
        assert_eq!(deploy.action, "run just nix deploy {node}");
        let ids: Vec<&str> = p.warnings.iter().map(|w| w.id).collect();
        assert_eq!(
            ids,
            [
                "mixed-datapath",
                "flannel-backend-from-servers",
                "cilium-daemonset-unrestricted",
                "confirm-shorter-than-steps"
            ]
        );
        assert!(p.warnings[1].reason.contains("whichever server answers"));
        assert_eq!(
            p.warnings[3].message,
            "[deadlines] confirm (10m) is shorter than Deploy..Verify may take (22m 10s)"
        );
        let t = table(&p);
        assert!(t.contains("  wave 3  worker     raccoon00\n"), "{t}");
        assert!(
            t.contains("  deploy                   7m  run just nix deploy {node}\n"),
            "{t}"
        );
        let inv = inventory("[cilium]\nnode_label = \"cni=cilium\"", 0);
        let p = plan(&inv, PlanOptions::default());
        let ids: Vec<&str> = p.warnings.iter().map(|w| w.id).collect();
        assert_eq!(ids, ["mixed-datapath", "no-deploy-hook"]);
    }
}
