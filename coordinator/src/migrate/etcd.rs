//! Is it safe to take a controller down? k3s's embedded etcd, as the
//! migration sees it: every controller's agent says how its local member is
//! (GetEtcdStatus: health as `etcdctl endpoint health` decides it, the member
//! list, the leader), and this module combines the answers into two rules.
//!
//! - **Quorum.** A controller's deploy restarts its k3s, and with it its
//!   etcd member. That is safe only while the *other* voting members that are
//!   healthy still make a quorum (⌊voters/2⌋+1 of the member list, never a
//!   hard-coded 3): with three members and one already unhealthy, taking a
//!   second down stops the cluster. Checked at every controller's Preflight,
//!   before it is cordoned; the refusal names the member and why it is not
//!   healthy. A member no agent answers for (its controller is not in the
//!   inventory, or its agent is down) counts as unhealthy: nothing vouches
//!   for it.
//! - **Snapshot.** The first controller is not touched (cordoned) until an
//!   etcd snapshot was taken in this run by a controller's agent with its own
//!   configured command, the file and size journaled — or `migrate
//!   --skip-etcd-snapshot` was given, which is journaled too. A snapshot that
//!   fails or hangs (bounded by the agent) halts the run; it is never skipped
//!   silently.

use std::time::{Duration, Instant};

use cnishift_proto::v1 as pb;
use serde::Serialize;

use super::journal::{self, Record};
use super::run::{Ctx, Driver, Event, Halt, Outcome, Phase};
use super::steps::{Cause, Cluster, NodeAgents};
use crate::inventory::{Node, Role};

/// The journal's (cluster) step for the snapshot.
pub const SNAPSHOT_STEP: &str = "etcd-snapshot";
/// The flag that goes without one.
pub const SKIP_FLAG: &str = "--skip-etcd-snapshot";
/// How long the snapshot may take (the agent kills its command then, and
/// bounds it by its own `--etcd-snapshot-timeout` too). k3s's own
/// `etcd-snapshot save` of a homelab's datastore takes seconds.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// One controller's answer.
pub type Answer = Result<pb::EtcdStatus, String>;

/// One member of the member list, judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberHealth {
    pub id: String,
    /// etcd's name for it (k3s names members `<node>-<random>`).
    pub name: String,
    /// The inventory's controller it runs on, when known.
    pub node: Option<String>,
    pub learner: bool,
    pub healthy: bool,
    /// Why not, in the agent's words; empty when healthy.
    pub why: String,
}

/// The cluster's etcd, from every controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    pub members: Vec<MemberHealth>,
    /// The leader as the healthy members see it.
    pub leader: Option<String>,
    /// The controller whose member list this is.
    pub listed_by: String,
}

impl View {
    pub fn voters(&self) -> usize {
        self.members.iter().filter(|m| !m.learner).count()
    }

    /// ⌊voters/2⌋ + 1.
    pub fn quorum(&self) -> usize {
        self.voters() / 2 + 1
    }
}

fn hex(id: u64) -> String {
    format!("{id:x}")
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The inventory controller a member runs on: the one whose agent reports
/// its id, else by name (`node` or `node-<suffix>`, as k3s names members),
/// else by its peer URL's host being the node's address.
fn node_of<'a>(m: &pb::EtcdMember, answers: &'a [(Node, Answer)]) -> Option<&'a Node> {
    let by_id = answers.iter().find(|(_, a)| {
        a.as_ref()
            .is_ok_and(|s| s.member_id != 0 && s.member_id == m.id)
    });
    let by_name = || {
        answers.iter().find(|(n, _)| {
            !m.name.is_empty()
                && (m.name == n.name
                    || m.name
                        .strip_prefix(n.name.as_str())
                        .is_some_and(|r| r.starts_with('-')))
        })
    };
    let by_ip = || {
        answers.iter().find(|(n, _)| {
            let ip = host_of(&n.address);
            m.peer_urls.iter().any(|u| host_of(u) == ip)
        })
    };
    by_id.or_else(by_name).or_else(by_ip).map(|(n, _)| n)
}

/// Combines every controller's answer. `Ok(None)`: no controller runs
/// embedded etcd (each says why); `Err`: no healthy member answered, so
/// nothing is known of the cluster.
pub fn view(answers: &[(Node, Answer)]) -> Result<Option<View>, String> {
    let present: Vec<&(Node, Answer)> = answers
        .iter()
        .filter(|(_, a)| a.as_ref().map_or(true, |s| s.present))
        .collect();
    if present.is_empty() && !answers.is_empty() {
        return Ok(None);
    }
    let lister = present
        .iter()
        .find(|(_, a)| a.as_ref().is_ok_and(|s| s.healthy && !s.members.is_empty()))
        .or_else(|| {
            present
                .iter()
                .find(|(_, a)| a.as_ref().is_ok_and(|s| !s.members.is_empty()))
        });
    let Some((lister, Ok(listed))) = lister.map(|p| (&p.0, &p.1)) else {
        let why: Vec<String> = answers
            .iter()
            .map(|(n, a)| match a {
                Err(e) => format!("{}: {e}", n.name),
                Ok(s) => format!("{}: {}", n.name, reason(s)),
            })
            .collect();
        return Err(format!(
            "no controller's etcd member answered with its member list: {}",
            why.join("; ")
        ));
    };
    let members = listed
        .members
        .iter()
        .map(|m| {
            let node = node_of(m, answers);
            let answer = node.and_then(|n| answers.iter().find(|(a, _)| a.name == n.name));
            let (healthy, why) = match answer.map(|(_, a)| a) {
                None => (
                    false,
                    "no agent answers for it (it runs on no controller of the inventory)".into(),
                ),
                Some(Err(e)) => (false, format!("its agent did not answer: {e}")),
                Some(Ok(s)) if s.member_id != 0 && s.member_id != m.id => (
                    false,
                    format!(
                        "{}'s agent reports another member ({})",
                        node.map(|n| n.name.as_str()).unwrap_or("?"),
                        hex(s.member_id)
                    ),
                ),
                Some(Ok(s)) if s.healthy => (true, String::new()),
                Some(Ok(s)) => (false, reason(s)),
            };
            MemberHealth {
                id: hex(m.id),
                name: if m.name.is_empty() {
                    "(not started)".into()
                } else {
                    m.name.clone()
                },
                node: node.map(|n| n.name.clone()),
                learner: m.is_learner,
                healthy: healthy && !m.name.is_empty(),
                why: if m.name.is_empty() {
                    "it joined but never started".into()
                } else {
                    why
                },
            }
        })
        .collect::<Vec<_>>();
    let leader = present
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok())
        .find(|s| s.healthy && s.leader_id != 0)
        .map(|s| {
            listed
                .members
                .iter()
                .find(|m| m.id == s.leader_id)
                .map(|m| format!("{} ({})", m.name, hex(m.id)))
                .unwrap_or_else(|| hex(s.leader_id))
        });
    Ok(Some(View {
        members,
        leader,
        listed_by: lister.name.clone(),
    }))
}

/// Why an answered member is not healthy, in the agent's words.
fn reason(s: &pb::EtcdStatus) -> String {
    if !s.present {
        return s.absent_why.clone();
    }
    if s.error.is_empty() {
        "unhealthy".into()
    } else {
        s.error.clone()
    }
}

/// May `target` be taken down? Ok says why it may, Err why not — naming
/// every other member that is not healthy.
pub fn safe_to_take_down(view: &View, target: &str) -> Result<String, String> {
    let mine = |m: &&MemberHealth| m.node.as_deref() == Some(target);
    let (voters, quorum) = (view.voters(), view.quorum());
    if voters == 1 && view.members.iter().filter(|m| !m.learner).all(|m| mine(&m)) {
        return Ok(format!(
            "etcd has a single voting member, {target}'s own: no quorum to lose, but the API is unavailable while its k3s restarts"
        ));
    }
    let others: Vec<&MemberHealth> = view
        .members
        .iter()
        .filter(|m| !m.learner && !mine(m))
        .collect();
    let up = others.iter().filter(|m| m.healthy).count();
    let down: Vec<String> = others
        .iter()
        .filter(|m| !m.healthy)
        .map(|m| {
            format!(
                "{}{} is not healthy: {}",
                m.node.as_deref().unwrap_or(&m.name),
                m.node
                    .as_ref()
                    .map(|_| format!(" (member {} {})", m.name, m.id))
                    .unwrap_or_else(|| format!(" (member {})", m.id)),
                m.why
            )
        })
        .collect();
    if up >= quorum {
        let mut msg = format!(
            "etcd keeps its quorum without {target}: {up} other healthy voting members of {voters} (quorum {quorum})"
        );
        if !down.is_empty() {
            msg.push_str(&format!("; note: {}", down.join("; ")));
        }
        Ok(msg)
    } else {
        Err(format!(
            "taking {target} down would lose etcd's quorum: {up} other healthy voting member{} of {voters} (quorum {quorum}); {}",
            if up == 1 { "" } else { "s" },
            down.join("; ")
        ))
    }
}

/// Every controller's answer, at once, in inventory order.
pub async fn answers<A: NodeAgents>(agents: &A, controllers: &[Node]) -> Vec<(Node, Answer)> {
    let got = futures::future::join_all(controllers.iter().map(|n| agents.etcd_status(n))).await;
    controllers.iter().cloned().zip(got).collect()
}

/// The quorum gate of a controller's Preflight: Ok is the detail for the
/// step's message, Err its cause.
pub async fn gate<C: Cluster, A: NodeAgents>(
    ctx: &Ctx<'_, C, A>,
    node: &Node,
) -> Result<String, Cause> {
    let controllers = controllers(&ctx.inv.nodes);
    let answers = answers(ctx.agents, &controllers).await;
    match view(&answers)? {
        None => Ok("no controller runs embedded etcd: no quorum to keep".into()),
        Some(v) => safe_to_take_down(&v, &node.name),
    }
}

pub fn controllers(nodes: &[Node]) -> Vec<Node> {
    nodes
        .iter()
        .filter(|n| n.role == Role::Controller)
        .cloned()
        .collect()
}

fn emit<C, A>(d: &mut Driver<'_, C, A>, phase: Phase, elapsed: Duration, detail: String) {
    let ev = Event {
        time: journal::now(),
        run: d.ctx.run.clone(),
        node: None,
        step: SNAPSHOT_STEP.into(),
        phase,
        elapsed_ms: elapsed.as_millis() as u64,
        deadline_ms: Some(SNAPSHOT_TIMEOUT.as_millis() as u64),
        detail,
    };
    (d.sink)(&ev);
}

fn write<C, A>(d: &mut Driver<'_, C, A>, rec: Record) -> Result<(), String> {
    match d.journal.as_deref_mut() {
        None => Ok(()),
        Some(j) => j
            .append(rec)
            .map_err(|e| format!("cannot write the journal {}: {e}", j.path().display())),
    }
}

fn halt<C, A>(d: &Driver<'_, C, A>, cause: String, aftermath: String) -> Outcome {
    Outcome::Halted(Halt {
        node: None,
        step: SNAPSHOT_STEP.into(),
        cause,
        aftermath,
        resume: d.ctx.opts.resume_command.clone(),
        rollback: None,
    })
}

/// Before the first controller is touched: a snapshot taken in this run
/// (journaled with its file and size), or `--skip-etcd-snapshot`
/// (journaled), or a halt that names both ways on. `todo` are the nodes the
/// next step touches; nothing happens when none is a controller or the run
/// already has its snapshot.
pub async fn snapshot_once<C: Cluster, A: NodeAgents>(
    d: &mut Driver<'_, C, A>,
    todo: &[Node],
) -> Result<(), Outcome> {
    if d.state.cluster.done.contains(SNAPSHOT_STEP)
        || !todo.iter().any(|n| n.role == Role::Controller)
    {
        return Ok(());
    }
    // The controllers about to be touched first, then the others.
    let mut order: Vec<Node> = todo
        .iter()
        .filter(|n| n.role == Role::Controller)
        .cloned()
        .collect();
    let rest: Vec<Node> = controllers(&d.ctx.inv.nodes)
        .into_iter()
        .filter(|c| !order.iter().any(|o| o.name == c.name))
        .collect();
    order.extend(rest);
    let run = d.ctx.run.clone();
    if d.ctx.opts.dry_run {
        let detail = if d.ctx.opts.skip_etcd_snapshot {
            format!("no etcd snapshot ({SKIP_FLAG}): record that in the journal")
        } else {
            format!(
                "ask {}'s agent for an etcd snapshot named cnishift-pre-{run} (its own command), before the first controller is touched",
                order[0].name
            )
        };
        emit(d, Phase::DryRun, Duration::ZERO, detail);
        return Ok(());
    }
    let io = |d: &Driver<'_, C, A>, e: String| halt(d, e, String::new());
    write(
        d,
        Record::Intent {
            node: None,
            step: SNAPSHOT_STEP.into(),
            time: journal::now(),
        },
    )
    .map_err(|e| io(d, e))?;
    let started = Instant::now();
    let outcome: Result<String, String> = if d.ctx.opts.skip_etcd_snapshot {
        Ok(format!(
            "skipped ({SKIP_FLAG}): no etcd snapshot was taken in this run"
        ))
    } else {
        emit(
            d,
            Phase::Started,
            Duration::ZERO,
            format!("asking {} for an etcd snapshot", order[0].name),
        );
        let mut failures = vec![];
        let mut taken = None;
        for n in &order {
            match d.ctx.agents.etcd_snapshot(n, &run, SNAPSHOT_TIMEOUT).await {
                Ok(t) => {
                    taken = Some(format!(
                        "{}: {} ({} bytes, {} ms)",
                        n.name, t.path, t.size_bytes, t.elapsed_ms
                    ));
                    break;
                }
                Err(e) => failures.push(format!("{}: {e}", n.name)),
            }
        }
        match taken {
            Some(t) if failures.is_empty() => Ok(t),
            Some(t) => Ok(format!("{t} (before it: {})", failures.join("; "))),
            None => Err(format!(
                "no etcd snapshot could be taken, and migrate does not touch the first controller without one: {}",
                failures.join("; ")
            )),
        }
    };
    match outcome {
        Ok(detail) => {
            write(
                d,
                Record::Done {
                    node: None,
                    step: SNAPSHOT_STEP.into(),
                    time: journal::now(),
                    detail: detail.clone(),
                },
            )
            .map_err(|e| io(d, e))?;
            let phase = if d.ctx.opts.skip_etcd_snapshot {
                Phase::Skipped
            } else {
                Phase::Done
            };
            emit(d, phase, started.elapsed(), detail);
            d.state.cluster.done.insert(SNAPSHOT_STEP.into());
            Ok(())
        }
        Err(cause) => {
            emit(d, Phase::Failed, started.elapsed(), cause.clone());
            let _ = write(
                d,
                Record::Failed {
                    node: None,
                    step: SNAPSHOT_STEP.into(),
                    time: journal::now(),
                    cause: cause.clone(),
                },
            );
            Err(halt(
                d,
                cause,
                format!(
                    "no node was touched; fix the snapshot and resume, or back k3s's datastore up yourself and resume with {SKIP_FLAG}"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str) -> Node {
        Node {
            name: name.into(),
            role: Role::Controller,
            address: format!("{ip}:7443"),
        }
    }

    fn member(id: u64, name: &str, ip: &str) -> pb::EtcdMember {
        pb::EtcdMember {
            id,
            name: name.into(),
            peer_urls: vec![format!("https://{ip}:2380")],
            client_urls: vec!["https://127.0.0.1:2379".into()],
            is_learner: false,
        }
    }

    /// A cluster of `n` members named like k3s names them, every one healthy.
    fn cluster(n: usize) -> Vec<(Node, Answer)> {
        let members: Vec<pb::EtcdMember> = (0..n)
            .map(|i| {
                member(
                    0x100 + i as u64,
                    &format!("opi0{}-1a2b3c4d", i + 1),
                    &format!("10.1.0.{}", 11 + i),
                )
            })
            .collect();
        (0..n)
            .map(|i| {
                let s = pb::EtcdStatus {
                    node: format!("opi0{}", i + 1),
                    present: true,
                    healthy: true,
                    member_id: 0x100 + i as u64,
                    leader_id: 0x100,
                    members: members.clone(),
                    ..Default::default()
                };
                (
                    node(&format!("opi0{}", i + 1), &format!("10.1.0.{}", 11 + i)),
                    Ok(s),
                )
            })
            .collect()
    }

    fn unhealthy(a: &mut (Node, Answer), why: &str) {
        let s = a.1.as_mut().unwrap();
        s.healthy = false;
        s.error = why.into();
        s.members.clear();
    }

    #[test]
    fn three_healthy_members_let_any_one_go() {
        let v = view(&cluster(3)).unwrap().unwrap();
        assert_eq!((v.voters(), v.quorum()), (3, 2));
        assert_eq!(v.leader.as_deref(), Some("opi01-1a2b3c4d (100)"));
        assert_eq!(
            safe_to_take_down(&v, "opi02").unwrap(),
            "etcd keeps its quorum without opi02: 2 other healthy voting members of 3 (quorum 2)"
        );
    }

    #[test]
    fn another_member_down_refuses_naming_it_and_why() {
        let mut a = cluster(3);
        unhealthy(&mut a[1], "https://127.0.0.1:2379: transport error: tcp connect error: Connection refused (os error 111)");
        let v = view(&a).unwrap().unwrap();
        let e = safe_to_take_down(&v, "opi01").unwrap_err();
        assert_eq!(
            e,
            "taking opi01 down would lose etcd's quorum: 1 other healthy voting member of 3 (quorum 2); \
             opi02 (member opi02-1a2b3c4d 101) is not healthy: https://127.0.0.1:2379: transport error: tcp connect error: Connection refused (os error 111)"
        );
        // The unhealthy one itself may go: the other two keep the quorum.
        assert!(safe_to_take_down(&v, "opi02").is_ok());
    }

    #[test]
    fn five_members_tolerate_one_down_not_two_and_an_unreachable_agent_counts_as_down() {
        let mut a = cluster(5);
        unhealthy(
            &mut a[4],
            "a linearizable read did not answer within 1s 500ms",
        );
        let v = view(&a).unwrap().unwrap();
        let ok = safe_to_take_down(&v, "opi01").unwrap();
        assert!(ok.starts_with("etcd keeps its quorum without opi01: 3 other healthy voting members of 5 (quorum 3); note: opi05"), "{ok}");
        a[3].1 = Err("unreachable: tcp connect error: Connection refused".into());
        let v = view(&a).unwrap().unwrap();
        let e = safe_to_take_down(&v, "opi01").unwrap_err();
        assert!(
            e.contains("2 other healthy voting members of 5 (quorum 3)"),
            "{e}"
        );
        assert!(e.contains("opi04 (member opi04-1a2b3c4d 103) is not healthy: its agent did not answer: unreachable"), "{e}");
        assert!(
            e.contains("opi05 (member opi05-1a2b3c4d 104) is not healthy: a linearizable read"),
            "{e}"
        );
    }

    #[test]
    fn a_member_on_no_inventoried_controller_is_not_vouched_for() {
        let mut a = cluster(3);
        // opi03 is not in the inventory: its member is in the list all the same.
        a.pop();
        let v = view(&a).unwrap().unwrap();
        let e = safe_to_take_down(&v, "opi01").unwrap_err();
        assert!(
            e.ends_with("opi03-1a2b3c4d (member 102) is not healthy: no agent answers for it (it runs on no controller of the inventory)"),
            "{e}"
        );
    }

    #[test]
    fn a_single_member_may_go_and_says_what_that_costs() {
        let v = view(&cluster(1)).unwrap().unwrap();
        assert!(safe_to_take_down(&v, "opi01")
            .unwrap()
            .starts_with("etcd has a single voting member, opi01's own"));
        // Learners do not vote.
        let mut a = cluster(2);
        for x in a.iter_mut() {
            x.1.as_mut().unwrap().members[1].is_learner = true;
        }
        let v = view(&a).unwrap().unwrap();
        assert_eq!(v.voters(), 1);
        assert!(safe_to_take_down(&v, "opi01").is_ok());
    }

    #[test]
    fn no_answer_at_all_is_an_error_and_no_etcd_anywhere_is_none() {
        let mut a = cluster(3);
        for x in a.iter_mut() {
            unhealthy(x, "connection refused");
        }
        let e = view(&a).unwrap_err();
        assert!(e.starts_with("no controller's etcd member answered with its member list: opi01: connection refused;"), "{e}");
        let none: Vec<(Node, Answer)> = (1..=2)
            .map(|i| {
                (
                    node(&format!("opi0{i}"), "10.1.0.1"),
                    Ok(pb::EtcdStatus {
                        present: false,
                        absent_why: "no embedded etcd on this node".into(),
                        ..Default::default()
                    }),
                )
            })
            .collect();
        assert_eq!(view(&none).unwrap(), None);
    }

    #[test]
    fn members_are_matched_by_id_name_or_peer_address() {
        let mut a = cluster(3);
        // opi02's agent answered without a status (connection refused), and
        // its member is named oddly: the peer address still places it.
        a[1].1 = Ok(pb::EtcdStatus {
            present: true,
            error: "connection refused".into(),
            ..Default::default()
        });
        for x in a.iter_mut() {
            if let Ok(s) = x.1.as_mut() {
                if !s.members.is_empty() {
                    s.members[1].name = "weird".into();
                }
            }
        }
        let v = view(&a).unwrap().unwrap();
        assert_eq!(v.members[1].node.as_deref(), Some("opi02"));
        assert_eq!(v.members[1].why, "connection refused");
    }
}
