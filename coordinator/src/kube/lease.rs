//! The migration lock: a `coordination.k8s.io/v1` Lease held while a
//! migration runs, renewed in the background, naming its holder. A second
//! coordinator is refused and told who holds the lock and since when. A lease
//! whose holder stopped renewing for longer than its TTL is *stale*; taking it
//! over needs an explicit flag, because only the person at the keyboard can
//! know that the other coordinator is really gone.
//!
//! Every write carries the resourceVersion it was based on, so two
//! coordinators racing for the same Lease cannot both win: the loser gets a
//! 409 Conflict and says so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use serde::Serialize;

use super::{Kube, KubeError};

/// Where the lock lives: present in every cluster, next to k3s's own leases.
pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "cnishift-migration";

#[derive(Debug, Clone)]
pub struct LockOptions {
    pub namespace: String,
    pub name: String,
    /// Who we are, as other coordinators will read it.
    pub holder: String,
    /// How long the lock stays ours without a renewal.
    pub ttl: Duration,
    /// Take over a lease whose holder stopped renewing it.
    pub take_over_stale: bool,
}

impl LockOptions {
    pub fn new(holder: String) -> Self {
        LockOptions {
            namespace: NAMESPACE.into(),
            name: NAME.into(),
            holder,
            ttl: Duration::from_secs(30),
            take_over_stale: false,
        }
    }
}

/// `user@host pid N`: who this coordinator is, for the other one's message.
pub fn default_identity() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host} pid {}", std::process::id())
}

/// True when `holder` names a coordinator on this machine (same `user@host`)
/// whose process is gone: a coordinator killed with SIGKILL never released
/// its Lease, and waiting out the TTL (or asking for
/// `--take-over-stale-lock`) would only delay its own resume. A pid that is
/// alive and is a `cnishift` process is never taken for dead.
pub fn holder_is_dead_here(holder: &str) -> bool {
    let ours = default_identity();
    let (Some((who, pid)), Some((our_who, _))) =
        (holder.rsplit_once(" pid "), ours.rsplit_once(" pid "))
    else {
        return false;
    };
    if who != our_who {
        return false;
    }
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Err(_) => true,
        Ok(comm) => comm.trim() != "cnishift",
    }
}

/// Who holds a lease, as another coordinator is told.
#[derive(Debug, Clone)]
pub struct Holder {
    pub lease: String,
    pub holder: String,
    pub since: String,
    pub renewed_ago: String,
    pub ttl_s: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another coordinator is migrating this cluster: {} holds Lease {} since {}, last renewed {} ago (lease {}s); wait for it to finish", .0.holder, .0.lease, .0.since, .0.renewed_ago, .0.ttl_s)]
    Held(Holder),
    #[error("Lease {} is held by {} since {}, but it was last renewed {} ago, longer than its {}s: that coordinator looks gone. If you are sure it is not running, take the lock over with --take-over-stale-lock", .0.lease, .0.holder, .0.since, .0.renewed_ago, .0.ttl_s)]
    Stale(Holder),
    #[error("another coordinator wrote Lease {lease} at the same moment (409 Conflict); run again to see who holds it")]
    Conflict { lease: String },
    #[error("the migration lock (Lease {lease}) was lost: {why}")]
    Lost { lease: String, why: String },
}

/// What a Lease says, for `cnishift lock status`.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    pub lease: String,
    pub holder: String,
    pub since: Option<String>,
    pub renewed: Option<String>,
    pub ttl_seconds: i32,
    /// Not renewed within its TTL.
    pub stale: bool,
}

fn info(lease: &Lease, id: &str) -> LeaseInfo {
    let spec = lease.spec.clone().unwrap_or_default();
    let ttl = spec.lease_duration_seconds.unwrap_or(0);
    let renewed = spec.renew_time.clone().or(spec.acquire_time.clone());
    let stale = renewed
        .as_ref()
        .is_none_or(|r| Timestamp::now().duration_since(r.0).as_secs_f64() > f64::from(ttl));
    LeaseInfo {
        lease: id.to_string(),
        holder: spec.holder_identity.unwrap_or_default(),
        since: spec.acquire_time.map(|t| t.0.to_string()),
        renewed: renewed.map(|t| t.0.to_string()),
        ttl_seconds: ttl,
        stale,
    }
}

/// The identity a Lease names as its holder.
fn holder_of(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn ago(renewed: &Option<String>) -> String {
    renewed
        .as_deref()
        .and_then(|r| r.parse::<Timestamp>().ok())
        .map(|r| {
            let secs = Timestamp::now().duration_since(r).as_secs().max(0) as u64;
            humantime::format_duration(Duration::from_secs(secs)).to_string()
        })
        .unwrap_or_else(|| "never".into())
}

struct State {
    rv: Option<String>,
    lost: Option<String>,
}

/// The held lock. Renewal stops when it is released or dropped.
pub struct LockGuard {
    kube: Kube,
    opts: LockOptions,
    state: Arc<Mutex<State>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field(
                "lease",
                &format!("{}/{}", self.opts.namespace, self.opts.name),
            )
            .field("holder", &self.opts.holder)
            .finish()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn spec(opts: &LockOptions, acquired: MicroTime, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(opts.holder.clone()),
        lease_duration_seconds: Some(opts.ttl.as_secs().clamp(1, i32::MAX as u64) as i32),
        acquire_time: Some(acquired),
        renew_time: Some(MicroTime(Timestamp::now())),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

impl Kube {
    fn leases(&self, ns: &str) -> Api<Lease> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Who holds the migration lock, if anyone.
    pub async fn lock_status(&self, ns: &str, name: &str) -> Result<Option<LeaseInfo>, KubeError> {
        let lease = self
            .call(
                format!("get Lease {ns}/{name}"),
                self.leases(ns).get_opt(name),
            )
            .await?;
        Ok(lease
            .map(|l| info(&l, &format!("{ns}/{name}")))
            .filter(|i| !i.holder.is_empty()))
    }

    /// Deletes the lock whoever holds it; returns the holder it had.
    pub async fn force_release_lock(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<String>, KubeError> {
        let holder = self.lock_status(ns, name).await?.map(|i| i.holder);
        match self
            .call(
                format!("delete Lease {ns}/{name}"),
                self.leases(ns).delete(name, &DeleteParams::default()),
            )
            .await
        {
            Ok(_) => Ok(holder),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the migration lock, or says who has it.
    pub async fn acquire_lock(&self, opts: &LockOptions) -> Result<LockGuard, KubeError> {
        let id = format!("{}/{}", opts.namespace, opts.name);
        let api = self.leases(&opts.namespace);
        let now = MicroTime(Timestamp::now());
        let current = self
            .call(format!("get Lease {id}"), api.get_opt(&opts.name))
            .await?;
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(opts.name.clone()),
                        namespace: Some(opts.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec(opts, now, 0)),
                };
                self.call(
                    format!("create Lease {id}"),
                    api.create(&PostParams::default(), &lease),
                )
                .await
            }
            Some(existing) => {
                let seen = info(&existing, &id);
                if !seen.holder.is_empty() && seen.holder != opts.holder {
                    let holder = Holder {
                        lease: id.clone(),
                        holder: seen.holder.clone(),
                        since: seen
                            .since
                            .clone()
                            .unwrap_or_else(|| "an unknown time".into()),
                        renewed_ago: ago(&seen.renewed),
                        ttl_s: seen.ttl_seconds,
                    };
                    if holder_is_dead_here(&seen.holder) {
                        tracing::warn!(lease = %id, previous = %seen.holder, "taking over the migration lock of a coordinator on this machine whose process is gone");
                    } else if !seen.stale {
                        return Err(LockError::Held(holder).into());
                    } else if !opts.take_over_stale {
                        return Err(LockError::Stale(holder).into());
                    } else {
                        tracing::warn!(lease = %id, previous = %seen.holder, "taking over a stale migration lock");
                    }
                }
                let old = existing.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0)
                    + i32::from(seen.holder != opts.holder && !seen.holder.is_empty());
                let lease = Lease {
                    metadata: existing.metadata.clone(),
                    spec: Some(spec(opts, now, transitions)),
                };
                self.call(
                    format!("update Lease {id}"),
                    api.replace(&opts.name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        let written = match written {
            Ok(l) => l,
            Err(e) if e.code() == Some(409) => return Err(LockError::Conflict { lease: id }.into()),
            Err(e) => return Err(e),
        };
        let state = Arc::new(Mutex::new(State {
            rv: written.metadata.resource_version.clone(),
            lost: None,
        }));
        let renewer = tokio::spawn(renew(self.clone(), opts.clone(), written, state.clone()));
        Ok(LockGuard {
            kube: self.clone(),
            opts: opts.clone(),
            state,
            renewer,
        })
    }
}

/// Renews every third of the TTL; a 409 means someone else wrote the Lease,
/// so the lock is lost (unless the Lease still names us: then our own last
/// write landed and only its answer was lost).
async fn renew(kube: Kube, opts: LockOptions, mut lease: Lease, state: Arc<Mutex<State>>) {
    let id = format!("{}/{}", opts.namespace, opts.name);
    let api = kube.leases(&opts.namespace);
    let every = (opts.ttl / 3).max(Duration::from_millis(100));
    let mut last_ok = std::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        lease.metadata.resource_version = state.lock().expect("lock state").rv.clone();
        let result = kube
            .call(
                format!("renew Lease {id}"),
                api.replace(&opts.name, &PostParams::default(), &lease),
            )
            .await;
        let lost = match result {
            Ok(l) => {
                state.lock().expect("lock state").rv = l.metadata.resource_version.clone();
                lease = l;
                last_ok = std::time::Instant::now();
                None
            }
            Err(e) if e.code() == Some(409) => match kube
                .call(format!("get Lease {id}"), api.get_opt(&opts.name))
                .await
            {
                Ok(Some(l)) if holder_of(&l) == Some(opts.holder.as_str()) => {
                    state.lock().expect("lock state").rv = l.metadata.resource_version.clone();
                    lease = l;
                    None
                }
                Ok(Some(l)) => Some(format!(
                    "it now names {}",
                    holder_of(&l).unwrap_or("nobody")
                )),
                Ok(None) => Some("it was deleted".into()),
                Err(e) => Some(format!("after a 409, reading it failed: {e}")),
            },
            Err(e) if last_ok.elapsed() > opts.ttl => Some(format!(
                "not renewed for longer than its TTL ({}); last error: {e}",
                humantime::format_duration(opts.ttl)
            )),
            Err(e) => {
                tracing::warn!(lease = %id, "renewal failed, will retry: {e}");
                None
            }
        };
        if let Some(why) = lost {
            tracing::error!(lease = %id, "migration lock lost: {why}");
            state.lock().expect("lock state").lost = Some(why);
            return;
        }
    }
}

impl LockGuard {
    /// Err when the lock was lost; check before every step that changes anything.
    pub fn check(&self) -> Result<(), LockError> {
        match &self.state.lock().expect("lock state").lost {
            None => Ok(()),
            Some(why) => Err(LockError::Lost {
                lease: format!("{}/{}", self.opts.namespace, self.opts.name),
                why: why.clone(),
            }),
        }
    }

    pub fn holder(&self) -> &str {
        &self.opts.holder
    }

    /// Resolves when the lock is lost (checks the renewer's verdict, no API calls).
    pub async fn lost(&self) -> LockError {
        loop {
            if let Err(e) = self.check() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops renewing and deletes the Lease, only if it is still the version we wrote.
    pub async fn release(self) -> Result<(), KubeError> {
        self.renewer.abort();
        if self.check().is_err() {
            // Lost: the Lease is someone else's now and is left alone
            // (whoever holds the guard has already been told, by check or lost).
            return Ok(());
        }
        let rv = self.state.lock().expect("lock state").rv.clone();
        match self.delete_at(rv).await {
            Err(e) if e.code() == Some(409) => {
                // Our own renewal may have landed just before it was stopped:
                // delete only if the Lease still names us.
                let id = format!("{}/{}", self.opts.namespace, self.opts.name);
                let api = self.kube.leases(&self.opts.namespace);
                let current = self
                    .kube
                    .call(format!("get Lease {id}"), api.get_opt(&self.opts.name))
                    .await?;
                match current {
                    None => Ok(()),
                    Some(l) if holder_of(&l) == Some(self.opts.holder.as_str()) => {
                        self.delete_at(l.metadata.resource_version.clone()).await
                    }
                    Some(_) => Err(LockError::Lost {
                        lease: id,
                        why: "another coordinator wrote it before we released it".into(),
                    }
                    .into()),
                }
            }
            other => other,
        }
    }

    /// Deletes the Lease if it is still at resourceVersion `rv` (gone already is fine).
    async fn delete_at(&self, rv: Option<String>) -> Result<(), KubeError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: rv,
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let id = format!("{}/{}", self.opts.namespace, self.opts.name);
        match self
            .kube
            .call(
                format!("delete Lease {id}"),
                self.kube
                    .leases(&self.opts.namespace)
                    .delete(&self.opts.name, &dp),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_process_of_this_user_and_host_is_dead() {
        let ours = default_identity();
        let (who, _) = ours.rsplit_once(" pid ").unwrap();
        // This test process is alive but is not `cnishift`: a reused pid.
        assert!(holder_is_dead_here(&format!(
            "{who} pid {}",
            std::process::id()
        )));
        // A pid that cannot exist.
        assert!(holder_is_dead_here(&format!("{who} pid 4294967295")));
        // Another machine's coordinator is never judged from here.
        assert!(!holder_is_dead_here("alice@elsewhere pid 4294967295"));
        assert!(!holder_is_dead_here("garbage"));
    }
}
