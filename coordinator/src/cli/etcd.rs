//! `cnishift etcd status | snapshot`: k3s's embedded etcd as the
//! controllers' agents see it, and a named snapshot on one controller — the
//! same calls and the same quorum rule `migrate` uses before it takes a
//! controller down (`cnishift::migrate::etcd`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use cnishift::agents::{self, CallError};
use cnishift::inventory::Role;
use cnishift::migrate::etcd::{self as gate, Answer, View};
use cnishift_proto::v1 as pb;

use super::{connect_setup, error, InventoryArg, Output, EXIT_NOT_READY, EXIT_OK};

#[derive(Subcommand)]
pub enum EtcdCommand {
    /// Every controller's etcd member (health as `etcdctl endpoint health` decides it, member
    /// list, leader, the client certificate that worked) and whether each may be taken down.
    #[command(
        after_help = "Each controller's agent asks its own member at https://127.0.0.1:2379 with k3s's client\n\
                            certificate (/var/lib/rancher/k3s/server/tls/etcd/server-client.crt, else client.crt).\n\
                            A controller may be taken down while the other healthy voting members still make a\n\
                            quorum (more than half of the member list); a member no agent answers for counts as\n\
                            unhealthy.\n\n\
                            Example:\n  cnishift etcd status -i cluster.toml\n  \
                            cnishift etcd status -i cluster.toml -o json | jq '.take_down[] | select(.ok | not)'\n\n\
                            Exit codes: 0 every member healthy, 1 a member unhealthy or unreachable (or none answered),\n\
                            2 usage, inventory or TLS error."
    )]
    Status(StatusArgs),
    /// Take a named etcd snapshot on one controller with its agent's own command.
    #[command(
        after_help = "The agent runs its --etcd-snapshot-command (default `k3s etcd-snapshot save --name\n\
                            cnishift-pre-{run}`), kills it with its process group at --timeout, and reports the file it\n\
                            wrote under /var/lib/rancher/k3s/server/db/snapshots (k3s appends the node name and a\n\
                            timestamp) and its size. Restore with `k3s server --cluster-reset\n\
                            --cluster-reset-restore-path=FILE` on that node.\n\n\
                            Example:\n  cnishift etcd snapshot -i cluster.toml opi01 --run before-upgrade\n\n\
                            Exit codes: 0 taken, 1 the agent could not take it (the message says why), 2 usage,\n\
                            inventory or TLS error."
    )]
    Snapshot(SnapshotArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    /// The controller, as named in the inventory.
    #[arg(value_name = "NODE")]
    node: String,
    /// The snapshot's name part (`cnishift-pre-RUN` with the default command):
    /// letters, digits, `.`, `_`, `-`. Default: manual-<unix seconds>.
    #[arg(long, value_name = "NAME")]
    run: Option<String>,
    /// How long the agent lets the command run (never more than its own
    /// --etcd-snapshot-timeout).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(cmd: EtcdCommand) -> ExitCode {
    match cmd {
        EtcdCommand::Status(a) => status(a),
        EtcdCommand::Snapshot(a) => snapshot(a),
    }
}

fn status_json(s: &pb::EtcdStatus) -> Value {
    json!({
        "present": s.present,
        "absent_why": s.absent_why,
        "endpoint": s.endpoint,
        "client_cert": s.client_cert,
        "attempts": s.attempts.iter().map(|a| json!({"cert": a.cert, "key": a.key, "error": a.error})).collect::<Vec<_>>(),
        "healthy": s.healthy,
        "error": s.error,
        "took_ms": s.took_ms,
        "member_id": format!("{:x}", s.member_id),
        "leader_id": format!("{:x}", s.leader_id),
        "version": s.version,
        "db_size": s.db_size,
        "raft_term": s.raft_term,
        "is_learner": s.is_learner,
        "member_errors": s.member_errors,
        "alarms": s.alarms,
        "members": s.members.iter().map(|m| json!({
            "id": format!("{:x}", m.id), "name": m.name, "peer_urls": m.peer_urls,
            "client_urls": m.client_urls, "is_learner": m.is_learner,
        })).collect::<Vec<_>>(),
    })
}

fn status(args: StatusArgs) -> ExitCode {
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let controllers = gate::controllers(&inv.nodes);
    if controllers.is_empty() {
        return error(format!(
            "{} has no controller: etcd runs on k3s servers",
            inv.path.display()
        ));
    }
    let answers: Vec<(cnishift::inventory::Node, Answer)> = rt
        .block_on(agents::etcd_statuses(&controllers, &tls, &inv.deadlines))
        .into_iter()
        .map(|(n, r)| (n, r.map_err(|e| e.to_string())))
        .collect();
    let view = gate::view(&answers);
    let take_down: Vec<(String, Result<String, String>)> = match &view {
        Ok(Some(v)) => controllers
            .iter()
            .map(|c| (c.name.clone(), gate::safe_to_take_down(v, &c.name)))
            .collect(),
        _ => vec![],
    };
    let all_healthy = match &view {
        Ok(Some(v)) => v.members.iter().all(|m| m.healthy),
        Ok(None) => true,
        Err(_) => false,
    };
    match args.output {
        Output::Json => {
            let doc = json!({
                "controllers": answers.iter().map(|(n, a)| match a {
                    Ok(s) => json!({"node": n.name, "status": status_json(s)}),
                    Err(e) => json!({"node": n.name, "error": e}),
                }).collect::<Vec<_>>(),
                "cluster": match &view {
                    Ok(v) => serde_json::to_value(v).expect("the view serializes"),
                    Err(e) => json!({"error": e}),
                },
                "take_down": take_down.iter().map(|(n, r)| match r {
                    Ok(m) => json!({"node": n, "ok": true, "message": m}),
                    Err(m) => json!({"node": n, "ok": false, "message": m}),
                }).collect::<Vec<_>>(),
                "healthy": all_healthy,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("JSON serializes")
            );
        }
        Output::Table => print!("{}", table(&answers, &view, &take_down)),
    }
    ExitCode::from(if all_healthy { EXIT_OK } else { EXIT_NOT_READY })
}

fn table(
    answers: &[(cnishift::inventory::Node, Answer)],
    view: &Result<Option<View>, String>,
    take_down: &[(String, Result<String, String>)],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<9} {:<18} {:<18} {:<18} DETAIL",
        "CONTROLLER", "HEALTH", "MEMBER", "LEADER", "CERT"
    );
    for (n, a) in answers {
        let (health, member, leader, cert, detail) = match a {
            Err(e) => ("?".into(), "-".into(), "-".into(), "-".into(), e.clone()),
            Ok(s) if !s.present => (
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                s.absent_why.clone(),
            ),
            Ok(s) => (
                if s.healthy { "healthy" } else { "UNHEALTHY" }.to_string(),
                if s.member_id == 0 {
                    "-".into()
                } else {
                    format!("{:x}", s.member_id)
                },
                if s.leader_id == 0 {
                    "none".into()
                } else {
                    format!("{:x}", s.leader_id)
                },
                s.client_cert
                    .rsplit('/')
                    .next()
                    .filter(|c| !c.is_empty())
                    .unwrap_or("-")
                    .to_string(),
                if s.healthy {
                    format!("{} ms, etcd {}", s.took_ms, s.version)
                } else {
                    s.error.clone()
                },
            ),
        };
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:<18} {:<18} {:<18} {detail}",
            n.name, health, member, leader, cert
        );
    }
    match view {
        Err(e) => {
            let _ = writeln!(out, "\n✗ {e}");
        }
        Ok(None) => {
            let _ = writeln!(
                out,
                "\nno controller runs embedded etcd: nothing to keep in quorum or to snapshot (back k3s's datastore up yourself)"
            );
        }
        Ok(Some(v)) => {
            let _ = writeln!(
                out,
                "\nmembers (as {} lists them; {} voting, quorum {}; leader {}):",
                v.listed_by,
                v.voters(),
                v.quorum(),
                v.leader.as_deref().unwrap_or("none seen")
            );
            for m in &v.members {
                let _ = writeln!(
                    out,
                    "  {} {:<22} {:<16} on {:<12} {}",
                    if m.healthy { "✓" } else { "✗" },
                    m.name,
                    m.id,
                    m.node.as_deref().unwrap_or("(not in the inventory)"),
                    if m.learner { "learner" } else { "" }
                );
                if !m.healthy {
                    let _ = writeln!(out, "      {}", m.why);
                }
            }
            let _ = writeln!(out, "\ntaking a controller down:");
            for (n, r) in take_down {
                let (mark, msg) = match r {
                    Ok(m) => ("✓", m),
                    Err(m) => ("✗", m),
                };
                let _ = writeln!(out, "  {mark} {n:<12} {msg}");
            }
        }
    }
    out
}

fn snapshot(args: SnapshotArgs) -> ExitCode {
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(node) = inv.node(&args.node).cloned() else {
        return error(format!("{:?} is not in {}", args.node, inv.path.display()));
    };
    if node.role != Role::Controller {
        return error(format!(
            "{} is a worker: etcd runs on the controllers",
            node.name
        ));
    }
    let run = args.run.clone().unwrap_or_else(|| {
        format!(
            "manual-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )
    });
    match rt.block_on(agents::etcd_snapshot(
        &node,
        &tls,
        &inv.deadlines,
        &run,
        args.timeout,
    )) {
        Ok(t) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "node": node.name, "run": run, "path": t.path, "size_bytes": t.size_bytes,
                        "command": t.command, "elapsed_ms": t.elapsed_ms, "output_tail": t.output_tail,
                    }))
                    .expect("JSON serializes")
                ),
                Output::Table => println!(
                    "{}: etcd snapshot {} ({} bytes) in {} ms, by `{}`",
                    node.name, t.path, t.size_bytes, t.elapsed_ms, t.command
                ),
            }
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("cnishift: no etcd snapshot on {}: {e}", node.name);
            ExitCode::from(match e {
                CallError::Rpc { ref code, .. } if code == "InvalidArgument" => super::EXIT_ERROR,
                _ => EXIT_NOT_READY,
            })
        }
    }
}
