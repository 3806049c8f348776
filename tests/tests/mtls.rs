//! Mutual TLS between the coordinator and an agent, over real loopback
//! sockets: who is let in, who is refused, and that the agent keeps serving.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use cnishift::agents::{self, CallError, ClientTls};
use cnishift::certs;
use cnishift::inventory::{Deadlines, Node, Role, Tls};
use cnishift_lab::loopback::{Agent, Pki};
use cnishift_proto::v1 as pb;
use cnishift_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn deadlines() -> Deadlines {
    Deadlines {
        connect: Duration::from_secs(3),
        report: Duration::from_secs(10),
        cleanup: Duration::from_secs(30),
        ..Deadlines::default()
    }
}

fn node(name: &str, agent: &Agent) -> Node {
    Node {
        name: name.into(),
        role: Role::Worker,
        address: agent.address(),
    }
}

fn coordinator_tls(pki: &Path) -> ClientTls {
    ClientTls::load(&Tls {
        ca: pki.join("ca.pem"),
        cert: pki.join("coordinator.pem"),
        key: pki.join("coordinator-key.pem"),
    })
    .unwrap()
}

/// A channel with an arbitrary client identity (or none).
async fn channel(
    agent: &Agent,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: &str,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(domain);
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    let ep = Endpoint::from_shared(format!("https://{}", agent.address()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    ep.connect().await.map_err(|e| format!("{e:?}"))
}

async fn report_with(
    agent: &Agent,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<pb::NodeReport, String> {
    let ch = channel(agent, ca, identity, "n1").await?;
    NodeAgentClient::new(ch)
        .get_report(pb::ReportRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{s:?}"))
}

/// The agent still answers the coordinator after whatever the test did.
async fn still_serving(agent: &Agent, pki: &Path) {
    let r = agents::get_report(&node("n1", agent), &coordinator_tls(pki), &deadlines())
        .await
        .expect("agent still serves");
    assert_eq!(r.node, "n1");
}

/// The agent logs from its own tasks, possibly after the client has already
/// seen the outcome: wait (up to 2 s) for `needle` instead of reading once.
async fn log_shows(agent: &Agent, needle: &str) -> bool {
    for _ in 0..50 {
        if agent.log().to_lowercase().contains(&needle.to_lowercase()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    false
}

fn start(pki: &Pki) -> Agent {
    Agent::start(
        pki.dir.path(),
        "n1",
        "n1",
        &["--no-live-probes", "--reload-interval", "200ms"],
    )
    .unwrap()
}

#[tokio::test]
async fn the_coordinator_gets_a_typed_report() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    let r = agents::get_report(
        &node("n1", &agent),
        &coordinator_tls(pki.dir.path()),
        &deadlines(),
    )
    .await
    .unwrap();
    assert_eq!(r.node, "n1");
    assert!(!r.checks.is_empty());
    assert!(r.checks.iter().any(|c| c.id == "kernel.version"));
    let facts: serde_json::Value = serde_json::from_str(&r.facts_json).unwrap();
    assert_eq!(facts["kernel"]["release"], r.kernel_release.as_str());
    assert_eq!(r.skipped_probes.len(), 3, "--no-live-probes is reported");
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    let ch = Endpoint::from_shared(format!("http://{}", agent.address()))
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    let result = match ch.connect().await {
        Ok(ch) => NodeAgentClient::new(ch)
            .get_report(pb::ReportRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err(), "plaintext must never get a report");
    still_serving(&agent, pki.dir.path()).await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    let err = report_with(&agent, &pki.path("ca.pem"), None)
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    still_serving(&agent, pki.dir.path()).await;
    assert!(
        log_shows(&agent, "TLS handshake failed").await,
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new(&["n1"]).unwrap();
    let other = Pki::new(&[]).unwrap(); // its own CA and coordinator certificate
    let agent = start(&pki);
    let err = report_with(
        &agent,
        &pki.path("ca.pem"),
        Some((
            &other.path("coordinator.pem"),
            &other.path("coordinator-key.pem"),
        )),
    )
    .await
    .unwrap_err();
    assert!(!err.is_empty());
    assert!(
        log_shows(&agent, "TLS handshake failed").await,
        "{}",
        agent.log()
    );
    still_serving(&agent, pki.dir.path()).await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let pki = Pki::new(&["n1"]).unwrap();
    let issuer = certs::load_ca(pki.dir.path()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let spec = certs::Spec {
        dns: vec![certs::DEFAULT_COORDINATOR_IDENTITY.into()],
        ips: vec![],
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    };
    let (cert, key) = certs::issue(&issuer, &spec).unwrap();
    std::fs::write(pki.path("expired.pem"), cert).unwrap();
    std::fs::write(pki.path("expired-key.pem"), key).unwrap();
    let agent = start(&pki);
    let err = report_with(
        &agent,
        &pki.path("ca.pem"),
        Some((&pki.path("expired.pem"), &pki.path("expired-key.pem"))),
    )
    .await
    .unwrap_err();
    assert!(!err.is_empty());
    assert!(
        log_shows(&agent, "expired").await,
        "the agent says why: {}",
        agent.log()
    );
    still_serving(&agent, pki.dir.path()).await;
}

#[tokio::test]
async fn an_agent_identity_may_read_but_not_change() {
    let pki = Pki::new(&["n1", "n2"]).unwrap();
    let agent = start(&pki);
    let n2 = (pki.path("n2.pem"), pki.path("n2-key.pem"));
    let ch = channel(&agent, &pki.path("ca.pem"), Some((&n2.0, &n2.1)), "n1")
        .await
        .unwrap();
    let mut client = NodeAgentClient::new(ch);
    assert!(
        client
            .get_report(pb::ReportRequest::default())
            .await
            .is_ok(),
        "read-only RPCs are open to any cluster identity"
    );
    let status = client
        .remediate(pb::RemediateRequest { apply: true })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("cnishift-coordinator") && status.message().contains("n2"),
        "{}",
        status.message()
    );
    for s in [
        client
            .plan_cleanup(pb::CleanupRequest { force: false })
            .await
            .unwrap_err(),
        client
            .apply_cleanup(pb::CleanupRequest { force: true })
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    }
    // The coordinator identity may.
    let r = agents::remediate(
        &node("n1", &agent),
        &coordinator_tls(pki.dir.path()),
        &deadlines(),
        false,
    )
    .await
    .unwrap();
    assert!(!r.applied);
}

#[tokio::test]
async fn the_coordinator_refuses_an_agent_with_another_nodes_certificate() {
    let pki = Pki::new(&["n1", "n2"]).unwrap();
    // n2's agent answers at the address the inventory gives for n1.
    let impostor = Agent::start(pki.dir.path(), "n2", "n2", &["--no-live-probes"]).unwrap();
    let err = agents::get_report(
        &node("n1", &impostor),
        &coordinator_tls(pki.dir.path()),
        &deadlines(),
    )
    .await
    .unwrap_err();
    match err {
        CallError::WrongIdentity(msg) => {
            assert!(msg.contains("not valid for name \"n1\""), "{msg}")
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
}

#[test]
fn openssl_s_client_without_a_certificate_is_refused() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    // In TLS 1.3 the server's refusal arrives after the client's Finished:
    // keep s_client's stdin open long enough for it to read the alert.
    let run = |extra: &[&str]| {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &agent.address(),
                "-servername",
                "n1",
                "-alpn",
                "h2",
                "-CAfile",
            ])
            .arg(pki.path("ca.pem"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl is installed");
        std::thread::sleep(Duration::from_millis(800));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let without = run(&[]);
    assert!(
        without.contains("alert certificate required"),
        "openssl was not refused:\n{without}"
    );
    let with = run(&[
        "-cert",
        pki.path("coordinator.pem").to_str().unwrap(),
        "-key",
        pki.path("coordinator-key.pem").to_str().unwrap(),
    ]);
    assert!(with.contains("Verify return code: 0 (ok)"), "{with}");
    assert!(with.contains("ALPN protocol: h2"), "{with}");
    assert!(!with.contains("certificate required"), "{with}");
}

/// Sends raw bytes as a gRPC message, to try what no generated client would.
#[derive(Clone, Default)]
struct Raw;
impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}
impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(
    ch: Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn oversized_and_malformed_messages_get_a_status_and_the_agent_keeps_serving() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    let id = (pki.path("coordinator.pem"), pki.path("coordinator-key.pem"));
    let ch = channel(&agent, &pki.path("ca.pem"), Some((&id.0, &id.1)), "n1")
        .await
        .unwrap();

    // 1 MiB where at most 64 KiB is accepted (a bytes field 1 of ReportRequest would be unknown anyway).
    let big = vec![0x0a; 1024 * 1024];
    let s = raw_call(ch.clone(), cnishift_proto::methods::GET_REPORT, big)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");

    // Bytes that are not protobuf at all.
    let s = raw_call(
        ch.clone(),
        cnishift_proto::methods::REMEDIATE,
        vec![0xff; 32],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            s.code(),
            tonic::Code::Internal | tonic::Code::InvalidArgument
        ),
        "{s:?}"
    );
    assert!(s.message().to_lowercase().contains("decode"), "{s:?}");

    // A method that does not exist.
    let s = raw_call(
        ch.clone(),
        "/cnishift.v1.NodeAgent/DeleteEverything",
        vec![],
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unimplemented);

    // A valid, empty request on the same connection still works.
    let ok = raw_call(ch, cnishift_proto::methods::GET_REPORT, vec![])
        .await
        .unwrap();
    let report: pb::NodeReport = prost::Message::decode(ok.as_slice()).unwrap();
    assert_eq!(report.node, "n1");
    still_serving(&agent, pki.dir.path()).await;
}

/// The serial of the certificate the agent presents on a new connection.
async fn served_serial(agent: &Agent, pki: &Path) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.join("ca.pem")).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(pki.join("coordinator.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(pki.join("coordinator-key.pem")).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(agent.address())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from("n1").unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    parsed.raw_serial().to_vec()
}

#[tokio::test]
async fn rotated_certificates_are_picked_up_without_dropping_the_listener() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = start(&pki);
    let before = served_serial(&agent, pki.dir.path()).await;
    // A channel opened before the rotation.
    let old = channel(
        &agent,
        &pki.path("ca.pem"),
        Some((
            &pki.path("coordinator.pem"),
            &pki.path("coordinator-key.pem"),
        )),
        "n1",
    )
    .await
    .unwrap();
    certs::issue_to_dir(
        pki.dir.path(),
        "n1",
        &certs::Spec::for_days(vec!["n1".into()], vec![], 30),
        true,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let s = served_serial(&agent, pki.dir.path()).await;
        if s != before || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(
        after,
        before,
        "the agent still serves the old certificate:\n{}",
        agent.log()
    );
    assert!(
        log_shows(&agent, "reloaded TLS certificate files").await,
        "{}",
        agent.log()
    );
    // The connection made before the rotation still works.
    NodeAgentClient::new(old)
        .get_report(pb::ReportRequest::default())
        .await
        .unwrap();
    still_serving(&agent, pki.dir.path()).await;

    // A broken replacement is refused and the working certificate stays.
    std::fs::write(pki.path("n1-key.pem"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        log_shows(&agent, "keeping the previous ones").await,
        "{}",
        agent.log()
    );
    assert_eq!(served_serial(&agent, pki.dir.path()).await, after);
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let pki = Pki::new(&["n1"]).unwrap();
    let mut agent = start(&pki);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(agent.log().contains("SIGTERM"), "{}", agent.log());
}

#[test]
fn bad_tls_files_stop_the_agent_with_a_precise_message() {
    let pki = Pki::new(&["n1", "n2"]).unwrap();
    std::fs::write(pki.path("junk.pem"), "not a certificate").unwrap();
    std::fs::write(pki.path("junk-key.pem"), "not a key").unwrap();
    let serve = |cert: &str, node: &str| {
        let out = Command::new(
            cnishift_lab::cluster::binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap(),
        )
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node-name",
            node,
            "--state-dir",
        ])
        .arg(pki.path("state"))
        .arg("--tls-ca")
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path(&format!("{cert}.pem")))
        .arg("--tls-key")
        .arg(pki.path(&format!("{cert}-key.pem")))
        .output()
        .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = serve("junk", "n1");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--tls-cert") && err.contains("junk.pem"),
        "{err}"
    );
    let (code, err) = serve("n2", "n1");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("not for node \"n1\"") && err.contains("cnishift certs issue --node n1"),
        "{err}"
    );
}

#[tokio::test]
async fn a_slow_agent_is_reported_within_its_deadline() {
    // Accepts TCP and then says nothing: the TLS handshake never completes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let pki = Pki::new(&["n1"]).unwrap();
    let node = Node {
        name: "n1".into(),
        role: Role::Worker,
        address: addr.to_string(),
    };
    let d = Deadlines {
        connect: Duration::from_millis(700),
        report: Duration::from_secs(5),
        cleanup: Duration::from_secs(5),
        ..Deadlines::default()
    };
    let start = Instant::now();
    let err = agents::get_report(&node, &coordinator_tls(pki.dir.path()), &d)
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the connect deadline was enforced: {took:?}"
    );
    hold.abort();
}

/// A TCP relay in front of the agent that counts the connections made
/// through it (the TLS is end to end: it sees only bytes).
async fn counting_relay(to: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, n)
}

/// The read-only questions a migration repeats share one connection per
/// node (a pool); Arm and Confirm each get their own — the agent refuses a
/// Confirm on the connection that armed — and the narrowed report is the
/// k3s checks alone.
#[tokio::test]
async fn repeated_read_only_questions_share_a_connection_and_confirm_gets_its_own() {
    let pki = Pki::new(&["n1"]).unwrap();
    let agent = Agent::start(
        pki.dir.path(),
        "n1",
        "n1",
        &["--no-live-probes", "--rollback-command", "true"],
    )
    .unwrap();
    let (relay, connections) = counting_relay(agent.address()).await;
    let n = Node {
        name: "n1".into(),
        role: Role::Worker,
        address: relay,
    };
    let tls = coordinator_tls(pki.dir.path());
    let d = deadlines();
    let pool = agents::Pool::default();
    let count = || connections.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..4 {
        let r = agents::get_report_via(
            &n,
            &tls,
            &d,
            pb::Expectation::Flannel,
            &[pb::CheckFamily::K3s],
            agents::Via::Reuse(&pool),
        )
        .await
        .unwrap();
        let ids: Vec<&str> = r.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["k3s.flags", "k3s.network"]);
        assert_eq!(r.families, [pb::CheckFamily::K3s as i32]);
        agents::arm_state_via(&n, &tls, &d, agents::Via::Reuse(&pool))
            .await
            .unwrap();
    }
    assert_eq!(
        (count(), pool.open()),
        (1, 1),
        "8 questions, one connection"
    );
    agents::arm_rollback(&n, &tls, &d, "run-1", Duration::from_secs(60))
        .await
        .unwrap();
    let c = agents::confirm(&n, &tls, &d, "run-1").await.unwrap();
    assert_eq!(c.outcome, "confirmed", "{c:?}");
    assert_eq!(
        count(),
        3,
        "arm and confirm each on a connection of its own"
    );
    // The pooled connection still serves.
    agents::arm_state_via(&n, &tls, &d, agents::Via::Reuse(&pool))
        .await
        .unwrap();
    assert_eq!(count(), 3);
}
