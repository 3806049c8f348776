//! The agent's etcd client: mutual TLS to the local member with k3s's
//! certificates, then etcd's own RPCs (`KV.Range`, `Maintenance.Alarm`,
//! `Maintenance.Status`, `Cluster.MemberList`) over one HTTP/2 connection.
//!
//! Health is decided as `etcdctl endpoint health` decides it (etcd 3.5's
//! etcdctl/ctlv3/command/ep_command.go; 3.4's is the same without the alarm
//! part): a *linearizable* `Range` of the key `health` — which needs a leader
//! and a quorum, so a member cut off from its peers is unhealthy even though
//! it still answers — that succeeds, or fails only with `permission denied`
//! (the request did go through consensus); then no alarm raised. `Status`
//! and `MemberList` are answered by the member locally, so a member without
//! quorum still says whom it knows and that it sees no leader.

use std::error::Error as _;
use std::time::Instant;

use cnishift_proto::etcdserverpb as etcd;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{
    Attempt, EtcdFacts, Member, MemberStatus, CA, CLIENT_PAIRS, CONNECT_TIMEOUT, HEALTH_TIMEOUT,
    PROBE_TIMEOUT,
};
use crate::host::HostPaths;

/// The full chain of an error's messages (tonic wraps the cause, e.g.
/// "Connection refused", several levels down).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
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

fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    if let Some(src) = s.source() {
        let c = chain(src);
        if c.starts_with(&text) {
            text = c;
        } else if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    if text.is_empty() {
        format!("{:?}", s.code())
    } else {
        text
    }
}

/// A call that failed below gRPC (the connection broke; tonic gives such a
/// status a source), as opposed to an answer from etcd. With TLS 1.3 a
/// client learns that the server refused its certificate only on its first
/// read, i.e. when the first RPC finds the connection closed, so this is
/// what a refused client certificate looks like: the next pair is tried.
fn broke_before_answering(s: &tonic::Status) -> bool {
    s.source().is_some()
}

/// The words of a connect error, with what they mean here.
fn connect_error(e: &tonic::transport::Error) -> String {
    let text = chain(e);
    if text.contains("UnknownIssuer") {
        format!("{text} (the member's serving certificate is not signed by /{CA})")
    } else {
        text
    }
}

fn shown(rel: &str) -> String {
    format!("/{rel}")
}

/// Connects with one certificate pair (TCP, TLS with our client
/// certificate, HTTP/2), within [`CONNECT_TIMEOUT`].
async fn connect(endpoint: &str, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("{endpoint}: {e}"))?
        .tls_config(tls)
        .map_err(|e| chain(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    match tokio::time::timeout(CONNECT_TIMEOUT, ep.connect()).await {
        Err(_) => Err(format!(
            "no connection to {endpoint} within {}",
            humantime::format_duration(CONNECT_TIMEOUT)
        )),
        Ok(Err(e)) => Err(connect_error(&e)),
        Ok(Ok(ch)) => Ok(ch),
    }
}

/// Asks the member at `endpoint` (on a real node [`super::ENDPOINT`]) with
/// the certificates under `host`, within [`PROBE_TIMEOUT`].
pub async fn check(host: &HostPaths, endpoint: &str) -> EtcdFacts {
    let mut facts = EtcdFacts {
        present: true,
        endpoint: endpoint.to_string(),
        ..Default::default()
    };
    let started = Instant::now();
    if tokio::time::timeout(PROBE_TIMEOUT, check_into(host, endpoint, &mut facts))
        .await
        .is_err()
    {
        facts.healthy = false;
        facts.error = Some(format!(
            "{endpoint} did not answer within {} (after {} ms)",
            humantime::format_duration(PROBE_TIMEOUT),
            started.elapsed().as_millis()
        ));
    }
    facts
}

async fn check_into(host: &HostPaths, endpoint: &str, facts: &mut EtcdFacts) {
    let ca = match host.read_bytes(CA) {
        Ok(b) => b,
        Err(e) => {
            facts.error = Some(format!(
                "the etcd CA cannot be read: {e}; k3s writes it when it starts with embedded etcd"
            ));
            return;
        }
    };
    for (cert_rel, key_rel) in CLIENT_PAIRS {
        let mut attempt = Attempt {
            cert: shown(cert_rel),
            key: shown(key_rel),
            error: None,
        };
        let files = host
            .read_bytes(cert_rel)
            .and_then(|c| host.read_bytes(key_rel).map(|k| (c, k)));
        let (cert, key) = match files {
            Ok(f) => f,
            Err(e) => {
                attempt.error = Some(e.to_string());
                facts.attempts.push(attempt);
                continue;
            }
        };
        let channel = match connect(endpoint, &ca, &cert, &key).await {
            Ok(c) => c,
            Err(e) => {
                attempt.error = Some(e);
                facts.attempts.push(attempt);
                continue;
            }
        };
        match ask(channel, facts).await {
            Ok(()) => {
                facts.client_cert = Some(attempt.cert.clone());
                facts.attempts.push(attempt);
                return;
            }
            Err(e) => {
                attempt.error = Some(e);
                facts.attempts.push(attempt);
            }
        }
    }
    let errors: Vec<&str> = facts
        .attempts
        .iter()
        .map(|a| a.error.as_deref().unwrap_or("no error recorded"))
        .collect();
    facts.error = Some(match errors.as_slice() {
        // The same answer whatever the certificate (nothing listens): once.
        [first, rest @ ..] if !rest.is_empty() && rest.iter().all(|e| e == first) => format!(
            "{endpoint}: {first} (with each client certificate: {})",
            facts
                .attempts
                .iter()
                .map(|a| a.cert.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => {
            let tried: Vec<String> = facts
                .attempts
                .iter()
                .zip(&errors)
                .map(|(a, e)| format!("{}: {e}", a.cert))
                .collect();
            format!(
                "no client certificate worked against {endpoint}: {}",
                tried.join("; ")
            )
        }
    });
}

/// The four questions over one connection. `Err` only when the member
/// refused our certificate (the caller tries the next pair); anything etcd
/// itself answers is recorded in `facts`.
async fn ask(channel: Channel, facts: &mut EtcdFacts) -> Result<(), String> {
    let mut kv = etcd::kv_client::KvClient::new(channel.clone());
    let mut maint = etcd::maintenance_client::MaintenanceClient::new(channel.clone());
    let mut maint2 = maint.clone();
    let mut cluster = etcd::cluster_client::ClusterClient::new(channel);
    let started = Instant::now();
    let health = async {
        let r = tokio::time::timeout(
            HEALTH_TIMEOUT,
            kv.range(etcd::RangeRequest {
                key: b"health".to_vec(),
                limit: 1,
                serializable: false,
                keys_only: true,
                count_only: false,
            }),
        )
        .await;
        (r, started.elapsed())
    };
    let (health, status, members) = tokio::join!(
        health,
        maint.status(etcd::StatusRequest {}),
        cluster.member_list(etcd::MemberListRequest {}),
    );
    // Nothing answered: the connection broke under every call (a refused
    // client certificate, or the member went away).
    fn broke<T>(r: &Result<T, tonic::Status>) -> bool {
        r.as_ref().err().is_some_and(broke_before_answering)
    }
    if broke(&status) && broke(&members) && matches!(&health.0, Ok(r) if broke(r)) {
        let text = status.err().map(|s| status_text(&s)).unwrap_or_default();
        return Err(format!(
            "the connection closed before any answer ({text}): the member refused this client certificate, or it stopped"
        ));
    }
    match status {
        Ok(r) => {
            let r = r.into_inner();
            let h = r.header.unwrap_or_default();
            facts.status = Some(MemberStatus {
                cluster_id: h.cluster_id,
                member_id: h.member_id,
                leader_id: r.leader,
                version: r.version,
                db_size: r.db_size,
                raft_term: r.raft_term,
                raft_index: r.raft_index,
                is_learner: r.is_learner,
                errors: r.errors,
            });
        }
        Err(s) => facts.status_error = Some(format!("Maintenance.Status: {}", status_text(&s))),
    }
    match members {
        Ok(r) => {
            facts.members = r
                .into_inner()
                .members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_urls,
                    client_urls: m.client_urls,
                    is_learner: m.is_learner,
                })
                .collect();
        }
        Err(s) => facts.members_error = Some(format!("Cluster.MemberList: {}", status_text(&s))),
    }
    let (health, took) = health;
    facts.took_ms = took.as_millis() as u64;
    let read = match health {
        Err(_) => Err(format!(
            "a linearizable read did not answer within {} (no leader, or no quorum)",
            humantime::format_duration(HEALTH_TIMEOUT)
        )),
        Ok(Ok(_)) => Ok(()),
        // etcdctl: "permission denied is OK since proposal goes through consensus".
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => Ok(()),
        Ok(Err(s)) => Err(format!("a linearizable read failed: {}", status_text(&s))),
    };
    if let Err(e) = read {
        facts.healthy = false;
        facts.error = Some(e);
        return Ok(());
    }
    // etcd 3.5's etcdctl also fails health on a raised alarm.
    match maint2
        .alarm(etcd::AlarmRequest {
            action: etcd::alarm_request::AlarmAction::Get as i32,
            member_id: 0,
            alarm: etcd::AlarmType::None as i32,
        })
        .await
    {
        Ok(r) => {
            facts.alarms = r
                .into_inner()
                .alarms
                .iter()
                .map(|a| {
                    let kind = etcd::AlarmType::try_from(a.alarm)
                        .map(|t| t.as_str_name().to_string())
                        .unwrap_or_else(|_| format!("alarm {}", a.alarm));
                    format!("{kind} on member {:x}", a.member_id)
                })
                .collect();
            if facts.alarms.is_empty() {
                facts.healthy = true;
                facts.error = None;
            } else {
                facts.healthy = false;
                facts.error = Some(format!("active alarm(s): {}", facts.alarms.join(", ")));
            }
        }
        Err(s) => {
            facts.healthy = false;
            facts.error = Some(format!(
                "unable to fetch the alarm list: {}",
                status_text(&s)
            ));
        }
    }
    Ok(())
}
