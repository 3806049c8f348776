//! The gRPC service (`cnishift.v1.NodeAgent`) over mutual TLS.
//!
//! Authorisation is by the peer certificate's identity (its SAN DNS names):
//! any certificate the cluster CA signed may read; only the coordinator
//! identity may change the node. TLS itself (tls.rs) already refused anyone
//! without a CA-signed, unexpired client certificate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cnishift_proto::v1::node_agent_server::{NodeAgent, NodeAgentServer};
use cnishift_proto::v1::{self as pb};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cleanup;
use crate::dial;
use crate::etcd;
use crate::policy::{Expect, Family, Verdict};
use crate::remediate;
use crate::report::{self, Report};
use crate::rollback::{self, Refused, Switch};
use crate::tls::{self, Reloadable};

/// Requests are tiny (a flag at most); anything bigger is hostile or broken.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AgentService {
    pub report: std::sync::Arc<report::Options>,
    pub coordinator_identity: String,
    /// Backups and the cleanup journal live here.
    pub state_dir: std::path::PathBuf,
    /// The dead-man rollback.
    pub rollback: Arc<Switch>,
    /// The etcd snapshot before the first controller is touched.
    pub etcd_snapshot: Arc<etcd::snapshot::Snapshotter>,
}

/// One accepted mutual-TLS connection, numbered: `Confirm` must come over a
/// different connection from the one that armed, so each request carries
/// the number of the connection it came on (in its extensions, via
/// [`tonic::transport::server::Connected`]).
pub struct Conn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Unique for the life of this agent process.
    pub id: u64,
    pub remote: Option<SocketAddr>,
    /// The client's verified certificate chain.
    pub certs: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Conn {
    fn new(inner: tokio_rustls::server::TlsStream<TcpStream>) -> Conn {
        let remote = inner.get_ref().0.peer_addr().ok();
        let certs = inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Conn {
            inner,
            info: ConnInfo {
                id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
                remote,
                certs: Arc::new(certs),
            },
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn conn_info<T>(req: &Request<T>) -> Result<&ConnInfo, Status> {
    req.extensions()
        .get::<ConnInfo>()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))
}

/// Who is calling, from the verified client certificate.
fn peer_identity<T>(req: &Request<T>) -> Result<Vec<String>, Status> {
    let certs = &conn_info(req)?.certs;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let names = tls::san_dns_names(leaf);
    if names.is_empty() {
        return Err(Status::unauthenticated(
            "the client certificate has no DNS subjectAltName",
        ));
    }
    Ok(names)
}

impl AgentService {
    fn require_coordinator<T>(
        &self,
        req: &Request<T>,
        method: &str,
    ) -> Result<Vec<String>, Status> {
        let names = peer_identity(req)?;
        if names.contains(&self.coordinator_identity) {
            Ok(names)
        } else {
            tracing::warn!(
                ?names,
                method,
                "refused a changing RPC from a non-coordinator identity"
            );
            Err(Status::permission_denied(format!(
                "{method} changes the node and is allowed only for the coordinator identity {:?}; the caller is {names:?}",
                self.coordinator_identity
            )))
        }
    }

    async fn build_report(&self) -> Result<Report, Status> {
        self.build_report_expecting(Expect::Unspecified).await
    }

    async fn build_report_expecting(&self, expect: Expect) -> Result<Report, Status> {
        self.build_report_narrowed(expect, vec![]).await
    }

    async fn build_report_narrowed(
        &self,
        expect: Expect,
        families: Vec<Family>,
    ) -> Result<Report, Status> {
        let opts = self.report.clone();
        let start = std::time::Instant::now();
        let r =
            tokio::task::spawn_blocking(move || report::build_narrowed(&opts, expect, &families))
                .await
                .map_err(|e| Status::internal(format!("the report task failed: {e}")))?;
        tracing::debug!(elapsed = ?start.elapsed(), checks = r.checks.len(), "report built");
        Ok(r)
    }
}

fn refusal_proto(r: &cleanup::Refusal) -> pb::Refusal {
    pb::Refusal {
        interlock: r.interlock.clone(),
        reason: r.reason.clone(),
        fix: r.fix.clone(),
        overridable: r.overridable,
    }
}

pub fn plan_proto(node: &str, p: &cleanup::Plan) -> pb::CleanupPlan {
    pb::CleanupPlan {
        node: node.to_string(),
        items: p
            .items
            .iter()
            .map(|i| pb::CleanupItem {
                id: i.id.clone(),
                kind: match i.target {
                    cleanup::Target::Interface { .. } => "interface",
                    cleanup::Target::Path { .. } => "path",
                    cleanup::Target::Iptables { .. } => "iptables",
                }
                .into(),
                why: i.why.clone(),
            })
            .collect(),
        refusals: p.refusals.iter().map(refusal_proto).collect(),
        allowed: p.allowed(),
        errors: p.errors.clone(),
        notes: p.notes.clone(),
    }
}

pub fn arm_state_proto(v: &rollback::View) -> pb::ArmState {
    pb::ArmState {
        armed: v.armed,
        run_id: v.run_id.clone(),
        remaining_ms: v.remaining_ms,
        rebooted_while_armed: v.rebooted_while_armed,
        fired: v.fired,
        outcome: v.outcome.clone(),
        output_tail: v.output_tail.clone(),
        message: v.message.clone(),
        target: v.target.clone(),
        timeout_ms: v.timeout_ms,
        attempts: v.attempts,
    }
}

fn refused(e: Refused) -> Status {
    match e {
        Refused::Invalid(m) => Status::invalid_argument(m),
        Refused::State(m) => Status::failed_precondition(m),
        Refused::Unavailable(m) => Status::unavailable(m),
    }
}

fn expect_from_proto(e: i32) -> Expect {
    match pb::Expectation::try_from(e) {
        Ok(pb::Expectation::Flannel) => Expect::Flannel,
        Ok(pb::Expectation::Cilium) => Expect::Cilium,
        _ => Expect::Unspecified,
    }
}

/// The wire's families; an unknown number (a newer coordinator) is refused
/// rather than silently widened or dropped.
fn families_from_proto(fs: &[i32]) -> Result<Vec<Family>, Status> {
    fs.iter()
        .map(|f| match pb::CheckFamily::try_from(*f) {
            Ok(pb::CheckFamily::K3s) => Ok(Family::K3s),
            Ok(pb::CheckFamily::PodNetwork) => Ok(Family::PodNetwork),
            _ => Err(Status::invalid_argument(format!(
                "unknown check family {f}: this agent knows k3s (1) and pod-network (2)"
            ))),
        })
        .collect()
}

fn family_proto(f: Family) -> pb::CheckFamily {
    match f {
        Family::K3s => pb::CheckFamily::K3s,
        Family::PodNetwork => pb::CheckFamily::PodNetwork,
    }
}

fn expect_proto(e: Expect) -> pb::Expectation {
    match e {
        Expect::Unspecified => pb::Expectation::Unspecified,
        Expect::Flannel => pb::Expectation::Flannel,
        Expect::Cilium => pb::Expectation::Cilium,
    }
}

pub fn to_proto(r: &Report) -> pb::NodeReport {
    pb::NodeReport {
        arm_state: None,
        expect: expect_proto(r.expect) as i32,
        node: r.node.clone(),
        ready: r.ready,
        agent_version: r.agent.version.clone(),
        build_arch: r.agent.build_arch.clone(),
        kernel_release: r.facts.kernel.release.clone().unwrap_or_default(),
        kernel_arch: r.facts.kernel.arch.clone().unwrap_or_default(),
        summary: Some(pb::Summary {
            pass: r.summary.pass as u32,
            warn: r.summary.warn as u32,
            fail: r.summary.fail as u32,
        }),
        checks: r
            .checks
            .iter()
            .map(|c| pb::Check {
                id: c.id.clone(),
                verdict: match c.verdict {
                    Verdict::Pass => pb::Verdict::Pass,
                    Verdict::Warn => pb::Verdict::Warn,
                    Verdict::Fail => pb::Verdict::Fail,
                } as i32,
                message: c.message.clone(),
                remediation: c.remediation.clone(),
            })
            .collect(),
        skipped_probes: r.skipped_probes.clone(),
        facts_json: r.facts_json(),
        families: r.families.iter().map(|f| family_proto(*f) as i32).collect(),
    }
}

impl AgentService {
    async fn cleanup_plan(&self, force: bool) -> Result<cleanup::Plan, Status> {
        let r = self.build_report().await?;
        let opts = self.report.clone();
        tokio::task::spawn_blocking(move || cleanup::plan(&r, &opts.host, force, opts.live))
            .await
            .map_err(|e| Status::internal(format!("the cleanup plan failed: {e}")))
    }
}

pub fn etcd_status_proto(node: &str, e: &etcd::EtcdFacts) -> pb::EtcdStatus {
    let st = e.status.clone().unwrap_or_default();
    pb::EtcdStatus {
        node: node.to_string(),
        present: e.present,
        absent_why: e.absent_why.clone().unwrap_or_default(),
        endpoint: e.endpoint.clone(),
        client_cert: e.client_cert.clone().unwrap_or_default(),
        attempts: e
            .attempts
            .iter()
            .map(|a| pb::EtcdAttempt {
                cert: a.cert.clone(),
                key: a.key.clone(),
                error: a.error.clone().unwrap_or_default(),
            })
            .collect(),
        healthy: e.healthy,
        error: e.error.clone().unwrap_or_default(),
        took_ms: e.took_ms,
        member_id: st.member_id,
        leader_id: st.leader_id,
        version: st.version,
        db_size: st.db_size,
        raft_term: st.raft_term,
        is_learner: st.is_learner,
        member_errors: st.errors,
        cluster_id: st.cluster_id,
        members: e
            .members
            .iter()
            .map(|m| pb::EtcdMember {
                id: m.id,
                name: m.name.clone(),
                peer_urls: m.peer_urls.clone(),
                client_urls: m.client_urls.clone(),
                is_learner: m.is_learner,
            })
            .collect(),
        alarms: e.alarms.clone(),
    }
}

type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::CleanupEvent, Status>> + Send>>;

#[tonic::async_trait]
impl NodeAgent for AgentService {
    type ApplyCleanupStream = EventStream;

    #[tracing::instrument(skip_all)]
    async fn plan_cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupPlan>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::PLAN_CLEANUP)?;
        let plan = self.cleanup_plan(req.get_ref().force).await?;
        Ok(Response::new(plan_proto(&self.report.node_name, &plan)))
    }

    #[tracing::instrument(skip_all)]
    async fn apply_cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<Self::ApplyCleanupStream>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::APPLY_CLEANUP)?;
        let plan = self.cleanup_plan(req.get_ref().force).await?;
        let (tx, rx) = mpsc::channel(64);
        let host = self.report.host.clone();
        let store = cleanup::Store {
            state_dir: self.state_dir.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let result = cleanup::apply(&plan, &host, &store, |o| {
                let _ = tx.blocking_send(Ok(pb::CleanupEvent {
                    item: o.item.clone(),
                    ok: o.ok,
                    message: o.message.clone(),
                    backup_id: String::new(),
                    refused: vec![],
                }));
            });
            let summary = if result.refused.is_empty() {
                let failed = result.outcomes.iter().filter(|o| !o.ok).count();
                pb::CleanupEvent {
                    item: "*".into(),
                    ok: failed == 0,
                    message: format!("{} items, {failed} failed", result.outcomes.len()),
                    backup_id: result.backup_id.unwrap_or_default(),
                    refused: vec![],
                }
            } else {
                pb::CleanupEvent {
                    item: "*".into(),
                    ok: false,
                    message: "refused: an interlock holds; nothing was removed".into(),
                    backup_id: String::new(),
                    refused: result.refused.iter().map(refusal_proto).collect(),
                }
            };
            let _ = tx.blocking_send(Ok(summary));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(peer = tracing::field::Empty))]
    async fn get_report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::NodeReport>, Status> {
        let names = peer_identity(&req)?;
        tracing::Span::current().record("peer", tracing::field::debug(&names));
        let families = families_from_proto(&req.get_ref().families)?;
        let r = self
            .build_report_narrowed(expect_from_proto(req.get_ref().expect), families)
            .await?;
        let mut out = to_proto(&r);
        out.arm_state = Some(arm_state_proto(&self.rollback.view()));
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all, fields(run = %req.get_ref().run_id))]
    async fn arm_rollback(
        &self,
        req: Request<pb::ArmRequest>,
    ) -> Result<Response<pb::ArmState>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::ARM_ROLLBACK)?;
        let conn = conn_info(&req)?.id;
        let r = req.get_ref();
        let v = self
            .rollback
            .arm(&r.run_id, Duration::from_millis(r.timeout_ms), conn)
            .map_err(refused)?;
        Ok(Response::new(arm_state_proto(&v)))
    }

    #[tracing::instrument(skip_all, fields(run = %req.get_ref().run_id))]
    async fn confirm(
        &self,
        req: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ArmState>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::CONFIRM)?;
        let conn = conn_info(&req)?.id;
        let v = self
            .rollback
            .confirm(&req.get_ref().run_id, conn)
            .map_err(refused)?;
        Ok(Response::new(arm_state_proto(&v)))
    }

    #[tracing::instrument(skip_all, fields(run = %req.get_ref().run_id))]
    async fn disarm(
        &self,
        req: Request<pb::DisarmRequest>,
    ) -> Result<Response<pb::ArmState>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::DISARM)?;
        let v = self
            .rollback
            .disarm(&req.get_ref().run_id)
            .map_err(refused)?;
        Ok(Response::new(arm_state_proto(&v)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_arm_state(
        &self,
        req: Request<pb::ArmStateRequest>,
    ) -> Result<Response<pb::ArmState>, Status> {
        peer_identity(&req)?;
        Ok(Response::new(arm_state_proto(&self.rollback.view())))
    }

    #[tracing::instrument(skip_all, fields(address = %req.get_ref().address))]
    async fn dial_from_node(
        &self,
        req: Request<pb::DialRequest>,
    ) -> Result<Response<pb::DialResult>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::DIAL_FROM_NODE)?;
        let r = req.get_ref();
        dial::check(&r.address, r.timeout_ms).map_err(Status::invalid_argument)?;
        let d = dial::dial(&r.address, r.tls, &r.server_name, r.timeout_ms).await;
        Ok(Response::new(pb::DialResult {
            ok: d.ok,
            address: d.address,
            elapsed_us: d.elapsed_us,
            error: d.error,
            peer_subject: d.peer_subject,
            peer_sans: d.peer_sans,
            tls_version: d.tls_version,
            peer_chain_der: d.peer_chain,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_etcd_status(
        &self,
        req: Request<pb::EtcdStatusRequest>,
    ) -> Result<Response<pb::EtcdStatus>, Status> {
        peer_identity(&req)?;
        let host = &self.report.host;
        let facts = match etcd::presence(host) {
            Err(why) => etcd::EtcdFacts {
                absent_why: Some(why),
                endpoint: etcd::ENDPOINT.into(),
                ..Default::default()
            },
            Ok(()) => etcd::client::check(host, etcd::ENDPOINT).await,
        };
        Ok(Response::new(etcd_status_proto(
            &self.report.node_name,
            &facts,
        )))
    }

    #[tracing::instrument(skip_all, fields(run = %req.get_ref().run_id))]
    async fn etcd_snapshot(
        &self,
        req: Request<pb::EtcdSnapshotRequest>,
    ) -> Result<Response<pb::EtcdSnapshotResult>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::ETCD_SNAPSHOT)?;
        let r = req.get_ref();
        let t = self
            .etcd_snapshot
            .take(&r.run_id, Duration::from_millis(r.timeout_ms))
            .await
            .map_err(|e| match e {
                etcd::snapshot::Refused::Invalid(m) => Status::invalid_argument(m),
                etcd::snapshot::Refused::State(m) | etcd::snapshot::Refused::Failed(m) => {
                    Status::failed_precondition(m)
                }
            })?;
        Ok(Response::new(pb::EtcdSnapshotResult {
            path: t.path,
            size_bytes: t.size_bytes,
            command: t.command,
            elapsed_ms: t.elapsed_ms,
            output_tail: t.output_tail,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn remediate(
        &self,
        req: Request<pb::RemediateRequest>,
    ) -> Result<Response<pb::RemediateResult>, Status> {
        self.require_coordinator(&req, cnishift_proto::methods::REMEDIATE)?;
        let apply = req.get_ref().apply;
        let r = self.build_report().await?;
        let host = self.report.host.clone();
        let steps = tokio::task::spawn_blocking(move || {
            let mut steps = remediate::plan(&r);
            if apply {
                remediate::apply(&host, &mut steps);
            }
            steps
        })
        .await
        .map_err(|e| Status::internal(format!("the remediation task failed: {e}")))?;
        Ok(Response::new(pb::RemediateResult {
            applied: apply,
            steps: steps
                .into_iter()
                .map(|s| pb::RemediationStep {
                    check_id: s.check_id,
                    kind: format!("{:?}", s.kind).to_lowercase(),
                    action: s.action,
                    permanent: s.permanent,
                    ok: s.ok == Some(true),
                    outcome: s.outcome,
                })
                .collect(),
        }))
    }
}

/// Accepts TCP connections and completes the TLS handshake off the accept
/// loop, handing finished streams to tonic. A failed handshake (plaintext,
/// no certificate, wrong CA, expired) is logged and dropped here, before any
/// gRPC is read.
async fn accept_loop(
    listener: TcpListener,
    tls: Reloadable,
    tx: mpsc::Sender<Result<Conn, std::io::Error>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without TCP_NODELAY a multi-segment reply can stall ~40 ms on the
        // client's delayed ACK (Nagle); gRPC frames are already batched.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
        }
        let acceptor = TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(Conn::new(stream))).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(%peer, "refused a connection: TLS handshake failed: {e}")
                }
                Err(_) => {
                    tracing::info!(%peer, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                }
            }
        });
    }
}

/// Serves until `shutdown` resolves; in-flight RPCs finish first.
pub async fn serve(
    listener: TcpListener,
    tls: Reloadable,
    service: AgentService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(256);
    let acceptor = tokio::spawn(accept_loop(listener, tls, tx));
    let deadman = tokio::spawn(service.rollback.clone().run());
    tracing::info!(?local, node = %service.report.node_name, "serving cnishift.v1.NodeAgent over mutual TLS");
    let svc = NodeAgentServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let result = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    acceptor.abort();
    deadman.abort();
    result
}
