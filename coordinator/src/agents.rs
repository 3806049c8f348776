//! Talking to agents: a mutual-TLS gRPC connection per call (or, for the
//! read-only questions a migration repeats, one kept per node in a
//! [`Pool`]), the agent's certificate checked against the node name we meant
//! to reach, and a
//! concurrent fan-out in which every node has its own deadline, so one dead or
//! slow agent never holds up the others.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::{Duration, Instant};

use cnishift_proto::v1::node_agent_client::NodeAgentClient;
use cnishift_proto::v1::{self as pb};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::inventory::{Deadlines, Node, Tls};

/// The coordinator's TLS material, read once.
#[derive(Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: Identity,
}

impl ClientTls {
    pub fn load(tls: &Tls) -> Result<Self, String> {
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("tls.{what} {}: {e}", p.display()))
        };
        let (ca, cert, key) = (
            read("ca", &tls.ca)?,
            read("cert", &tls.cert)?,
            read("key", &tls.key)?,
        );
        for (what, bytes, marker) in [
            ("ca", &ca, "CERTIFICATE"),
            ("cert", &cert, "CERTIFICATE"),
            ("key", &key, "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(bytes).contains(&format!("-----BEGIN {marker}"))
                && !String::from_utf8_lossy(bytes).contains(&format!(" {marker}-----"))
            {
                return Err(format!("tls.{what}: no PEM {marker} block found"));
            }
        }
        Ok(ClientTls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
    }
}

/// Why a node could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum CallError {
    /// Nothing listens, or the network is down.
    Unreachable(String),
    /// No answer within the deadline.
    Timeout(String),
    /// The agent presented a certificate that is not the node's.
    WrongIdentity(String),
    /// The TLS handshake failed otherwise (CA mismatch, expired, refused our certificate).
    Tls(String),
    /// The agent answered with a gRPC error.
    Rpc { code: String, message: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(d) => write!(f, "unreachable: {d}"),
            CallError::Timeout(d) => write!(f, "timed out: {d}"),
            CallError::WrongIdentity(d) => write!(f, "wrong identity: {d}"),
            CallError::Tls(d) => write!(f, "TLS failed: {d}"),
            CallError::Rpc { code, message } => write!(f, "agent error {code}: {message}"),
        }
    }
}

/// The full chain of an error's messages (tonic hides the cause several levels down).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn classify_transport(node: &Node, text: String) -> CallError {
    let lower = text.to_lowercase();
    if lower.contains("not valid for name") || lower.contains("notvalidforname") {
        CallError::WrongIdentity(format!(
            "{} answered at {} with a certificate that is not {:?}'s ({text})",
            node.name, node.address, node.name
        ))
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("alert")
    {
        CallError::Tls(text)
    } else if lower.contains("timed out") || lower.contains("deadline") || lower.contains("elapsed")
    {
        CallError::Timeout(text)
    } else {
        CallError::Unreachable(text)
    }
}

/// Opens a channel to `node`'s agent, checking its certificate names `node.name`.
pub async fn connect(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Result<Channel, CallError> {
    let endpoint = Endpoint::from_shared(format!("https://{}", node.address))
        .map_err(|e| CallError::Unreachable(format!("bad address {}: {e}", node.address)))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(tls.ca.clone())
                .identity(tls.identity.clone())
                .domain_name(node.name.clone()),
        )
        .map_err(|e| CallError::Tls(chain(&e)))?
        .connect_timeout(deadlines.connect)
        .tcp_nodelay(true)
        .timeout(deadlines.report);
    match tokio::time::timeout(deadlines.connect, endpoint.connect()).await {
        Err(_) => Err(CallError::Timeout(format!(
            "no TLS connection to {} within {:?}",
            node.address, deadlines.connect
        ))),
        Ok(Err(e)) => Err(classify_transport(node, chain(&e))),
        Ok(Ok(ch)) => Ok(ch),
    }
}

fn status_error(node: &Node, s: tonic::Status) -> CallError {
    let text = format!(
        "{}{}",
        s.message(),
        s.source()
            .map(|e| format!(": {}", chain(e)))
            .unwrap_or_default()
    );
    match s.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => CallError::Timeout(text),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            if s.source().is_some() =>
        {
            classify_transport(node, text)
        }
        code => CallError::Rpc {
            code: format!("{code:?}"),
            message: s.message().to_string(),
        },
    }
}

/// Connections to agents kept open for the read-only questions a migration
/// asks over and over: the early-restart watch between every two steps,
/// Repod's "any pod left on cni0?", a dead-man rollback's progress. Each is
/// a mutual-TLS channel whose handshake checked the node's certificate
/// (tonic re-does that handshake, with the same name check, if it has to
/// reconnect); a call that fails on it below gRPC drops it, so the next call
/// connects afresh. Changing calls never use it — above all Confirm, which
/// must come over a connection of its own (see [`confirm`]).
#[derive(Default)]
pub struct Pool {
    channels: std::sync::Mutex<HashMap<String, Channel>>,
}

impl Pool {
    fn key(node: &Node) -> String {
        format!("{}@{}", node.name, node.address)
    }

    async fn channel(
        &self,
        node: &Node,
        tls: &ClientTls,
        deadlines: &Deadlines,
    ) -> Result<Channel, CallError> {
        let cached = self
            .channels
            .lock()
            .expect("pool")
            .get(&Self::key(node))
            .cloned();
        if let Some(ch) = cached {
            return Ok(ch);
        }
        let ch = connect(node, tls, deadlines).await?;
        self.channels
            .lock()
            .expect("pool")
            .insert(Self::key(node), ch.clone());
        Ok(ch)
    }

    fn forget(&self, node: &Node) {
        self.channels.lock().expect("pool").remove(&Self::key(node));
    }

    /// How many connections are open (for tests).
    pub fn open(&self) -> usize {
        self.channels.lock().expect("pool").len()
    }
}

/// Where a call gets its connection.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// A connection of its own, closed after the call.
    Fresh,
    /// The pool's connection to the node (read-only calls only).
    Reuse(&'a Pool),
}

/// Connects to `node` (or takes the pool's connection) and runs `call` on a
/// client, the whole of it within `limit`: the one place every RPC gets its
/// connection, its error classification and its deadline.
async fn with_client<T, Fut>(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    limit: Duration,
    what: &str,
    via: Via<'_>,
    call: impl FnOnce(NodeAgentClient<Channel>) -> Fut,
) -> Result<T, CallError>
where
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let run = async {
        let ch = match via {
            Via::Fresh => connect(node, tls, deadlines).await?,
            Via::Reuse(pool) => pool.channel(node, tls, deadlines).await?,
        };
        call(NodeAgentClient::new(ch)).await
    };
    let r = tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
        Err(CallError::Timeout(format!(
            "no {what} from {} within {limit:?}",
            node.address
        )))
    });
    if let (Via::Reuse(pool), Err(e)) = (via, &r) {
        if !matches!(e, CallError::Rpc { .. }) {
            pool.forget(node);
        }
    }
    r
}

/// One unary RPC: connection, deadline (`deadlines.report`), the answer
/// unwrapped, a gRPC status classified.
async fn unary<Req, Resp, Fut>(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    what: &str,
    via: Via<'_>,
    req: Req,
    rpc: impl FnOnce(NodeAgentClient<Channel>, Req) -> Fut,
) -> Result<Resp, CallError>
where
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    with_client(
        node,
        tls,
        deadlines,
        deadlines.report,
        what,
        via,
        |c| async move {
            rpc(c, req)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| status_error(node, s))
        },
    )
    .await
}

/// Asks one agent for its report, all within `deadlines.report`.
pub async fn get_report(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Result<pb::NodeReport, CallError> {
    get_report_expecting(node, tls, deadlines, pb::Expectation::Unspecified).await
}

/// The report judged against what the node should be on now: `Flannel`
/// before its turn, `Cilium` once migrated.
pub async fn get_report_expecting(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    expect: pb::Expectation,
) -> Result<pb::NodeReport, CallError> {
    get_report_via(node, tls, deadlines, expect, &[], Via::Fresh).await
}

/// The report narrowed to `families` (all of them when empty), over `via`.
/// The agent must answer as the node we meant to reach.
pub async fn get_report_via(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    expect: pb::Expectation,
    families: &[pb::CheckFamily],
    via: Via<'_>,
) -> Result<pb::NodeReport, CallError> {
    let req = pb::ReportRequest {
        expect: expect as i32,
        families: families.iter().map(|f| *f as i32).collect(),
    };
    let report = unary(
        node,
        tls,
        deadlines,
        "report",
        via,
        req,
        |c, r| async move {
            c.max_decoding_message_size(16 * 1024 * 1024)
                .get_report(r)
                .await
        },
    )
    .await?;
    if report.node != node.name {
        return Err(CallError::WrongIdentity(format!(
            "the agent at {} reports as {:?}, not {:?}",
            node.address, report.node, node.name
        )));
    }
    Ok(report)
}

/// Arms the node's dead-man rollback for `run_id` (coordinator identity
/// only). Idempotent for the same run id.
pub async fn arm_rollback(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    run_id: &str,
    timeout: Duration,
) -> Result<pb::ArmState, CallError> {
    let req = pb::ArmRequest {
        run_id: run_id.into(),
        timeout_ms: timeout.as_millis() as u64,
    };
    unary(
        node,
        tls,
        deadlines,
        "arm answer",
        Via::Fresh,
        req,
        |mut c, r| async move { c.arm_rollback(r).await },
    )
    .await
}

/// Confirms the switch of `run_id`. Always on a connection of its own (never
/// the pool's), so it is never the connection that armed — which is what the
/// agent requires as proof the node is still reachable after the switch.
pub async fn confirm(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    run_id: &str,
) -> Result<pb::ArmState, CallError> {
    let req = pb::ConfirmRequest {
        run_id: run_id.into(),
    };
    unary(
        node,
        tls,
        deadlines,
        "confirm answer",
        Via::Fresh,
        req,
        |mut c, r| async move { c.confirm(r).await },
    )
    .await
}

/// Disarms `run_id` (or acknowledges its failed rollback).
pub async fn disarm(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    run_id: &str,
) -> Result<pb::ArmState, CallError> {
    let req = pb::DisarmRequest {
        run_id: run_id.into(),
    };
    unary(
        node,
        tls,
        deadlines,
        "disarm answer",
        Via::Fresh,
        req,
        |mut c, r| async move { c.disarm(r).await },
    )
    .await
}

/// The node's dead-man state (read-only).
pub async fn arm_state(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Result<pb::ArmState, CallError> {
    arm_state_via(node, tls, deadlines, Via::Fresh).await
}

/// The same, over `via`.
pub async fn arm_state_via(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    via: Via<'_>,
) -> Result<pb::ArmState, CallError> {
    unary(
        node,
        tls,
        deadlines,
        "arm state",
        via,
        pb::ArmStateRequest {},
        |mut c, r| async move { c.get_arm_state(r).await },
    )
    .await
}

/// Asks the node to dial `address` itself (coordinator identity only).
pub async fn dial_from_node(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    req: pb::DialRequest,
) -> Result<pb::DialResult, CallError> {
    unary(
        node,
        tls,
        deadlines,
        "dial result",
        Via::Fresh,
        req,
        |mut c, r| async move { c.dial_from_node(r).await },
    )
    .await
}

/// Asks the agent to remediate (a changing RPC: the agent allows it only to
/// the coordinator identity).
pub async fn remediate(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    apply: bool,
) -> Result<pb::RemediateResult, CallError> {
    let req = pb::RemediateRequest { apply };
    unary(
        node,
        tls,
        deadlines,
        "remediation result",
        Via::Fresh,
        req,
        |mut c, r| async move { c.remediate(r).await },
    )
    .await
}

/// Asks the agent what its cleanup would remove (coordinator identity only).
pub async fn plan_cleanup(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    force: bool,
) -> Result<pb::CleanupPlan, CallError> {
    let req = pb::CleanupRequest { force };
    unary(
        node,
        tls,
        deadlines,
        "cleanup plan",
        Via::Fresh,
        req,
        |mut c, r| async move { c.plan_cleanup(r).await },
    )
    .await
}

/// Runs the agent's cleanup, handing each event to `on_event` as it arrives;
/// the whole run must finish within `deadlines.cleanup`.
pub async fn apply_cleanup(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    force: bool,
    mut on_event: impl FnMut(&pb::CleanupEvent),
) -> Result<Vec<pb::CleanupEvent>, CallError> {
    with_client(
        node,
        tls,
        deadlines,
        deadlines.cleanup,
        "finished cleanup",
        Via::Fresh,
        |mut c| async move {
            let mut stream = c
                .apply_cleanup(pb::CleanupRequest { force })
                .await
                .map_err(|s| status_error(node, s))?
                .into_inner();
            let mut events = Vec::new();
            while let Some(ev) = stream.message().await.map_err(|s| status_error(node, s))? {
                on_event(&ev);
                events.push(ev);
            }
            Ok(events)
        },
    )
    .await
}

/// One node's answer in a fan-out.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub node: Node,
    pub elapsed: Duration,
    pub result: Result<pb::NodeReport, CallError>,
}

/// Asks every node at once; returns in inventory order.
pub async fn fan_out_reports(
    nodes: &[Node],
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Vec<Outcome> {
    let calls = nodes.iter().map(|n| async move {
        let start = Instant::now();
        let result = get_report(n, tls, deadlines).await;
        Outcome {
            node: n.clone(),
            elapsed: start.elapsed(),
            result,
        }
    });
    futures::future::join_all(calls).await
}

/// The same, one after another (the runbook's `for node in ...; ssh` loop);
/// kept for the benchmark's comparison.
pub async fn sequential_reports(
    nodes: &[Node],
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let start = Instant::now();
        let result = get_report(n, tls, deadlines).await;
        out.push(Outcome {
            node: n.clone(),
            elapsed: start.elapsed(),
            result,
        });
    }
    out
}

// --- k3s's embedded etcd (issue #16) ----------------------------------------
// Kept apart from the calls above: GetEtcdStatus (read-only) and
// EtcdSnapshot (coordinator only), used by `cnishift etcd` and by the
// migration's etcd gate (migrate/etcd.rs).

/// How much longer than the agent's own snapshot deadline the coordinator
/// waits for its answer: the agent kills the command at its deadline and
/// then answers; this only covers the answer's way back.
pub const ETCD_SNAPSHOT_GRACE: Duration = Duration::from_secs(5);

/// The local etcd member of `node` (a controller), as its agent sees it.
pub async fn etcd_status(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Result<pb::EtcdStatus, CallError> {
    with_client(
        node,
        tls,
        deadlines,
        deadlines.report,
        "etcd status",
        Via::Fresh,
        |mut c| async move {
            let s = c
                .get_etcd_status(pb::EtcdStatusRequest {})
                .await
                .map_err(|s| status_error(node, s))?
                .into_inner();
            if s.node != node.name {
                return Err(CallError::WrongIdentity(format!(
                    "the agent at {} answers as {:?}, not {:?}",
                    node.address, s.node, node.name
                )));
            }
            Ok(s)
        },
    )
    .await
}

/// Every controller's etcd status at once, in inventory order.
pub async fn etcd_statuses(
    nodes: &[Node],
    tls: &ClientTls,
    deadlines: &Deadlines,
) -> Vec<(Node, Result<pb::EtcdStatus, CallError>)> {
    let calls = nodes
        .iter()
        .map(|n| async move { (n.clone(), etcd_status(n, tls, deadlines).await) });
    futures::future::join_all(calls).await
}

/// Has `node`'s agent take the named snapshot of `run_id` with its own
/// command, within `timeout` (the agent kills the command then).
pub async fn etcd_snapshot(
    node: &Node,
    tls: &ClientTls,
    deadlines: &Deadlines,
    run_id: &str,
    timeout: Duration,
) -> Result<pb::EtcdSnapshotResult, CallError> {
    let req = pb::EtcdSnapshotRequest {
        run_id: run_id.into(),
        timeout_ms: timeout.as_millis() as u64,
    };
    // The channel's own per-request timeout is the report deadline; the
    // snapshot gets its own, the agent's plus the way back.
    let limit = timeout + ETCD_SNAPSHOT_GRACE;
    let long = Deadlines {
        report: limit,
        ..deadlines.clone()
    };
    with_client(
        node,
        tls,
        &long,
        limit,
        "etcd snapshot",
        Via::Fresh,
        |mut c| async move {
            c.etcd_snapshot(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| status_error(node, s))
        },
    )
    .await
}
