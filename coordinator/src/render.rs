//! What the coordinator shows: the preflight matrix for people, JSON for
//! automation. Verdicts are the agents'; nothing here re-derives one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cnishift_proto::v1::{self as pb, Verdict};
use serde::Serialize;

use crate::agents::{CallError, Outcome};

/// Per node: ready, not ready, or not asked successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Ready,
    NotReady,
    Unreachable,
    Timeout,
    WrongIdentity,
    TlsError,
    AgentError,
}

impl NodeStatus {
    pub fn label(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::NotReady => "not ready",
            NodeStatus::Unreachable => "unreachable",
            NodeStatus::Timeout => "timeout",
            NodeStatus::WrongIdentity => "wrong identity",
            NodeStatus::TlsError => "tls error",
            NodeStatus::AgentError => "agent error",
        }
    }
}

pub fn status_of(o: &Outcome) -> NodeStatus {
    match &o.result {
        Ok(r) if r.ready => NodeStatus::Ready,
        Ok(_) => NodeStatus::NotReady,
        Err(CallError::Unreachable(_)) => NodeStatus::Unreachable,
        Err(CallError::Timeout(_)) => NodeStatus::Timeout,
        Err(CallError::WrongIdentity(_)) => NodeStatus::WrongIdentity,
        Err(CallError::Tls(_)) => NodeStatus::TlsError,
        Err(CallError::Rpc { .. }) => NodeStatus::AgentError,
    }
}

#[derive(Serialize)]
struct JsonCheck<'a> {
    id: &'a str,
    verdict: &'static str,
    message: &'a str,
    remediation: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonNode<'a> {
    name: &'a str,
    role: String,
    address: &'a str,
    status: NodeStatus,
    elapsed_ms: u128,
    error: Option<&'a CallError>,
    report: Option<JsonReport<'a>>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    ready: bool,
    agent_version: &'a str,
    kernel_release: &'a str,
    kernel_arch: &'a str,
    summary: Option<[u32; 3]>,
    checks: Vec<JsonCheck<'a>>,
    facts: serde_json::Value,
}

pub fn verdict_str(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Pass) => "pass",
        Ok(Verdict::Warn) => "warn",
        Ok(Verdict::Fail) => "fail",
        _ => "unknown",
    }
}

/// `{ "ready": bool, "nodes": [...] }`: ready is true only when every node is.
/// `cluster`: the cluster gates, when preflight was asked to check them too.
pub fn preflight_json(
    outcomes: &[Outcome],
    cluster: Option<&[crate::kube::gates::Gate]>,
) -> String {
    let nodes: Vec<JsonNode> = outcomes
        .iter()
        .map(|o| JsonNode {
            name: &o.node.name,
            role: o.node.role.to_string(),
            address: &o.node.address,
            status: status_of(o),
            elapsed_ms: o.elapsed.as_millis(),
            error: o.result.as_ref().err(),
            report: o.result.as_ref().ok().map(|r| JsonReport {
                ready: r.ready,
                agent_version: &r.agent_version,
                kernel_release: &r.kernel_release,
                kernel_arch: &r.kernel_arch,
                summary: r.summary.map(|s| [s.pass, s.warn, s.fail]),
                checks: r
                    .checks
                    .iter()
                    .map(|c| JsonCheck {
                        id: &c.id,
                        verdict: verdict_str(c.verdict),
                        message: &c.message,
                        remediation: c.remediation.as_deref(),
                    })
                    .collect(),
                facts: serde_json::from_str(&r.facts_json).unwrap_or(serde_json::Value::Null),
            }),
        })
        .collect();
    let gates_ok = cluster.is_none_or(|g| {
        g.iter()
            .all(|g| g.verdict != crate::kube::gates::Verdict::Fail)
    });
    let ready = gates_ok && outcomes.iter().all(|o| status_of(o) == NodeStatus::Ready);
    let mut doc = serde_json::json!({ "ready": ready, "nodes": nodes });
    if let Some(gates) = cluster {
        doc["cluster"] = serde_json::to_value(gates).expect("serialisable");
    }
    serde_json::to_string_pretty(&doc).expect("serialisable") + "\n"
}

fn mark(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Pass) => "✓",
        Ok(Verdict::Warn) => "!",
        Ok(Verdict::Fail) => "✗",
        _ => "?",
    }
}

/// The people's view: one line per node, then every check that is not a pass
/// on some node as a node × check matrix, failures first, each with the
/// agent's remediation.
pub fn preflight_table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let w = outcomes
        .iter()
        .map(|o| o.node.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<w$}  {:<10}  {:<14}  {:>4} {:>4} {:>4}  KERNEL / PROBLEM",
        "NODE", "ROLE", "STATUS", "FAIL", "WARN", "PASS"
    );
    for o in outcomes {
        let status = status_of(o).label();
        match &o.result {
            Ok(r) => {
                let s = r.summary.unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<w$}  {:<10}  {:<14}  {:>4} {:>4} {:>4}  {} {}",
                    o.node.name,
                    o.node.role.to_string(),
                    status,
                    s.fail,
                    s.warn,
                    s.pass,
                    r.kernel_release,
                    r.kernel_arch
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "{:<w$}  {:<10}  {:<14}  {:>4} {:>4} {:>4}  {e}",
                    o.node.name,
                    o.node.role.to_string(),
                    status,
                    "-",
                    "-",
                    "-"
                );
            }
        }
    }
    // check id → (worst verdict, per-node verdicts, one message and fix)
    let reports: Vec<(&str, &pb::NodeReport)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| (o.node.name.as_str(), r)))
        .collect();
    let mut rows: BTreeMap<&str, (i32, BTreeMap<&str, i32>, &pb::Check)> = BTreeMap::new();
    for (node, r) in &reports {
        for c in &r.checks {
            let e = rows
                .entry(c.id.as_str())
                .or_insert((c.verdict, BTreeMap::new(), c));
            e.1.insert(node, c.verdict);
            if c.verdict > e.0 {
                e.0 = c.verdict;
                e.2 = c;
            }
        }
    }
    let mut problems: Vec<_> = rows
        .into_iter()
        .filter(|(_, (worst, _, _))| *worst != Verdict::Pass as i32)
        .collect();
    problems.sort_by_key(|(id, (worst, _, _))| (std::cmp::Reverse(*worst), *id));
    if !problems.is_empty() {
        let _ = writeln!(
            out,
            "\nChecks that are not a pass everywhere (✗ fail, ! warn, ✓ pass, - no report):"
        );
        let names: Vec<&str> = outcomes.iter().map(|o| o.node.name.as_str()).collect();
        if names.len() <= 16 {
            let idw = problems.iter().map(|(id, _)| id.len()).max().unwrap_or(10);
            let _ = write!(out, "  {:<idw$}", "");
            for (i, _) in names.iter().enumerate() {
                let _ = write!(out, " {:>2}", i + 1);
            }
            let _ = writeln!(
                out,
                "   (columns: {})",
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{}={n}", i + 1))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            for (id, (_, per_node, c)) in &problems {
                let _ = write!(out, "  {id:<idw$}");
                for n in &names {
                    let _ = write!(out, " {:>2}", per_node.get(n).map_or("-", |v| mark(*v)));
                }
                let _ = writeln!(out);
                let _ = writeln!(out, "      {}", c.message);
                if let Some(fix) = &c.remediation {
                    let _ = writeln!(out, "      fix: {fix}");
                }
            }
        } else {
            for (id, (_, per_node, c)) in &problems {
                let bad: Vec<&str> = per_node
                    .iter()
                    .filter(|(_, v)| **v != Verdict::Pass as i32)
                    .map(|(n, _)| *n)
                    .collect();
                let _ = writeln!(
                    out,
                    "  {} {id} on {} nodes: {}",
                    mark(c.verdict),
                    bad.len(),
                    bad.join(" ")
                );
                if let Some(fix) = &c.remediation {
                    let _ = writeln!(out, "      fix: {fix}");
                }
            }
        }
    }
    let ready = outcomes
        .iter()
        .filter(|o| status_of(o) == NodeStatus::Ready)
        .count();
    let _ = writeln!(
        out,
        "\n{ready}/{} nodes ready for Cilium{}",
        outcomes.len(),
        if ready == outcomes.len() {
            ""
        } else {
            ": preflight failed"
        }
    );
    out
}

/// A node's cleanup plan as the agent sent it.
pub fn cleanup_plan(p: &pb::CleanupPlan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {}",
        p.node,
        if p.allowed {
            "cleanup allowed"
        } else {
            "cleanup refused"
        }
    );
    if p.items.is_empty() {
        let _ = writeln!(out, "  nothing of Flannel's is left");
    }
    for i in &p.items {
        let _ = writeln!(out, "  - {:<46} {}", i.id, i.why);
    }
    for r in &p.refusals {
        let how = if r.overridable {
            "--force overrides"
        } else {
            "not overridable"
        };
        let _ = writeln!(out, "  ✗ {}: {} — {} ({how})", r.interlock, r.reason, r.fix);
    }
    for n in &p.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for e in &p.errors {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

/// The cluster gates as a table: one line per gate, failures and warnings marked.
pub fn gates_table(gates: &[crate::kube::gates::Gate]) -> String {
    use crate::kube::gates::Verdict;
    let mut out = String::new();
    for g in gates {
        let mark = match g.verdict {
            Verdict::Pass => "✓",
            Verdict::Warn => "!",
            Verdict::Fail => "✗",
        };
        out.push_str(&format!("{mark} {:<18} {}\n", g.id, g.message));
    }
    let failed = gates.iter().filter(|g| g.verdict == Verdict::Fail).count();
    out.push_str(&if failed == 0 {
        "cluster: ready to migrate\n".to_string()
    } else {
        format!("cluster: {failed} gate(s) failed; fix them before migrating\n")
    });
    out
}
