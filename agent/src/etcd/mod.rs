//! k3s's embedded etcd on this node: is the local member healthy, who are
//! the members, who leads — asked the way `etcdctl` asks it, over etcd's own
//! gRPC API at `https://127.0.0.1:2379` with k3s's client certificate — and a
//! named snapshot before the migration touches the first controller.
//!
//! Why the agent asks and not the coordinator: etcd's client port listens on
//! the node's loopback with certificates that never leave the node (k3s's),
//! exactly like the runbook's `ssh opi01; sudo etcdctl ... endpoint health`.
//! The coordinator combines every controller's answer into the quorum gate.
//!
//! The facts flow as everywhere in the agent: [`client`] reads, the policy
//! (`policy.rs`, `etcd.*` checks) judges, the server ships both (the report's
//! checks and `GetEtcdStatus`).

pub mod client;
pub mod snapshot;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

/// Where k3s's etcd serves clients, on every server node.
pub const ENDPOINT: &str = "https://127.0.0.1:2379";
/// k3s's etcd certificates (`${data-dir}/server/tls/etcd`).
pub const TLS_DIR: &str = "var/lib/rancher/k3s/server/tls/etcd";
/// The CA etcd trusts for clients and signs its serving certificate with.
pub const CA: &str = "var/lib/rancher/k3s/server/tls/etcd/server-ca.crt";
/// The client certificates tried, in order: `server-client.crt` (what the
/// etcd member itself presents, and what k3s's docs name) and `client.crt`
/// (the API server's etcd client certificate, the one the seed runbook's
/// `etcdctl` command names). Both are signed by `server-ca.crt`.
pub const CLIENT_PAIRS: &[(&str, &str)] = &[
    (
        "var/lib/rancher/k3s/server/tls/etcd/server-client.crt",
        "var/lib/rancher/k3s/server/tls/etcd/server-client.key",
    ),
    (
        "var/lib/rancher/k3s/server/tls/etcd/client.crt",
        "var/lib/rancher/k3s/server/tls/etcd/client.key",
    ),
];
/// The member's data directory (present only with embedded etcd).
pub const DATA_DIR: &str = "var/lib/rancher/k3s/server/db/etcd";
/// Where `k3s etcd-snapshot save` writes (`${data-dir}/server/db/snapshots`).
pub const SNAPSHOT_DIR: &str = "var/lib/rancher/k3s/server/db/snapshots";

/// How long one TLS connection to the member may take (etcdctl's
/// `--dial-timeout` default is 2 s; the member is on loopback).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the health read may take. Shorter than etcdctl's 5 s
/// `--command-timeout`: the report must stay fast, and a linearizable read
/// on a healthy member takes milliseconds; one without a leader never
/// answers, so waiting longer only delays the same verdict.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(1500);
/// The whole probe, every certificate pair included.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);

/// One client certificate tried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// As a path on the node, e.g. `/var/lib/rancher/k3s/server/tls/etcd/client.crt`.
    pub cert: String,
    pub key: String,
    /// None when this pair worked.
    pub error: Option<String>,
}

/// `Maintenance.Status` of the local member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub cluster_id: u64,
    pub member_id: u64,
    /// 0: the member knows no leader.
    pub leader_id: u64,
    pub version: String,
    pub db_size: i64,
    pub raft_term: u64,
    pub raft_index: u64,
    pub is_learner: bool,
    /// The member's own alarm and health notes.
    pub errors: Vec<String>,
}

/// One entry of `Cluster.MemberList`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Empty while the member has not started.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// What the agent found of the local etcd member (the report's
/// `facts.etcd`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdFacts {
    /// k3s's etcd certificates or data directory are on this node.
    pub present: bool,
    /// Why not, when not present.
    pub absent_why: Option<String>,
    pub endpoint: String,
    /// The client certificate that worked.
    pub client_cert: Option<String>,
    /// Every pair tried, in order, with why it did not work.
    pub attempts: Vec<Attempt>,
    /// As `etcdctl endpoint health` decides it (etcd 3.5's etcdctl): a
    /// linearizable read of the key `health` answered, or was refused for
    /// permission only (the request went through consensus), and no alarm
    /// is raised.
    pub healthy: bool,
    /// Why not healthy, in the agent's or etcd's words.
    pub error: Option<String>,
    /// How long the health read took.
    pub took_ms: u64,
    pub status: Option<MemberStatus>,
    /// Why `status` is missing although the member answered.
    pub status_error: Option<String>,
    pub members: Vec<Member>,
    /// Why `members` is empty although the member answered.
    pub members_error: Option<String>,
    /// Raised alarms, e.g. `NOSPACE on member 8e9e05c52164694d`.
    pub alarms: Vec<String>,
}

impl EtcdFacts {
    /// The member id's name in the member list (etcd ids print as hex).
    pub fn name_of(&self, id: u64) -> String {
        member_name(&self.members, id)
    }
}

/// `name (id)`, or the id alone when the list does not have it.
pub fn member_name(members: &[Member], id: u64) -> String {
    match members.iter().find(|m| m.id == id) {
        Some(m) if !m.name.is_empty() => format!("{} ({id:x})", m.name),
        _ => format!("{id:x}"),
    }
}

/// Whether this node has k3s's embedded etcd at all, and if not, why not.
pub fn presence(host: &HostPaths) -> Result<(), String> {
    if host.exists(TLS_DIR) || host.exists(DATA_DIR) {
        Ok(())
    } else {
        Err(format!(
            "no embedded etcd on this node (neither /{TLS_DIR} nor /{DATA_DIR} exists)"
        ))
    }
}

/// The probe, for the report (which is built on plain threads): a
/// current-thread runtime of its own for the few gRPC calls.
pub fn probe(host: &HostPaths) -> EtcdFacts {
    if let Err(why) = presence(host) {
        return EtcdFacts {
            absent_why: Some(why),
            endpoint: ENDPOINT.into(),
            ..Default::default()
        };
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(client::check(host, ENDPOINT)),
        Err(e) => EtcdFacts {
            present: true,
            endpoint: ENDPOINT.into(),
            error: Some(format!("cannot start the etcd probe's runtime: {e}")),
            ..Default::default()
        },
    }
}
