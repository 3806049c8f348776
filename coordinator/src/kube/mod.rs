//! Kubernetes operations for the migration, on kube-rs: cordon and uncordon
//! (remembering an admin's cordon), drain through the Eviction API, waits for
//! a node and its Cilium agent to be Ready (by watching), cluster gates for
//! preflight, a Lease so that two coordinators never run at once, and Events
//! on each Node so `kubectl describe node` tells the story.
//!
//! One client, with kube's built-in retry layer **off**: on a
//! PodDisruptionBudget that never allows, that layer retries a 429'd eviction
//! 15 times with exponential backoff (about 336 s over 16 POSTs) before the
//! caller sees anything, and on a 503 it hides the error behind a wait. Every
//! call here has its own deadline instead, and the loops that should retry
//! (evictions on 429, watches that end) do so explicitly.

pub mod cilium;
pub mod drain;
pub mod events;
pub mod gates;
pub mod lease;
pub mod nodes;
pub mod ops;
pub mod selector;
pub mod wait;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where the API server is and who we are to it: the standard resolution.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// An explicit kubeconfig file; otherwise `KUBECONFIG` (a `:`-separated
    /// list, merged), then `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// A context other than the kubeconfig's current one.
    pub context: Option<String>,
    /// Deadline for one API request (not for watches).
    pub api_timeout: Duration,
}

/// A connected client plus the per-request deadline.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    /// The configuration the client was built from (for the VIP gate).
    pub config: Config,
    pub api_timeout: Duration,
    /// Each Node's uid, once read, for the Events recorded on it (see
    /// [`Kube::record`]).
    node_uids: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

/// What went wrong, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("{what}: the API server at {url} cannot be reached: {detail}")]
    Unreachable {
        what: String,
        url: String,
        detail: String,
    },
    #[error("{what}: the API server's answer could not be decoded ({detail}); is {url} a Kubernetes API server?")]
    BadAnswer {
        what: String,
        url: String,
        detail: String,
    },
    #[error("{what}: credentials from the kubeconfig could not be used: {detail}")]
    Credentials { what: String, detail: String },
    #[error("{what}: no answer from the API server within {}", humantime::format_duration(*after))]
    Timeout { what: String, after: Duration },
    #[error("{what}: the API server answered {code} {reason}: {message}")]
    Api {
        what: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{what}: not done after {}: {last}", humantime::format_duration(*after))]
    WaitTimedOut {
        what: String,
        after: Duration,
        /// Why it was not done yet, as last seen (or the last error).
        last: String,
    },
    #[error("{0}")]
    Drain(#[from] drain::DrainError),
    #[error("{0}")]
    Lock(#[from] lease::LockError),
    #[error("interrupted: the step was stopped where it was and the migration lock released; run it again to continue")]
    Interrupted,
}

impl KubeError {
    /// The HTTP status of an API answer, if this is one.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl Kube {
    /// Resolves the configuration the way kubectl does and builds the client.
    pub async fn connect(opts: &KubeOptions) -> Result<Kube, KubeError> {
        let kc_opts = KubeConfigOptions {
            context: opts.context.clone(),
            cluster: None,
            user: None,
        };
        let mut config = match (&opts.kubeconfig, &opts.context) {
            (Some(path), _) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kc, &kc_opts)
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
            }
            (None, Some(_)) => Config::from_kubeconfig(&kc_opts)
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
            (None, None) => Config::infer().await.map_err(|e| {
                KubeError::Config(format!(
                    "{e} (set KUBECONFIG, pass --kubeconfig, or run in a pod)"
                ))
            })?,
        };
        config.connect_timeout = Some(opts.api_timeout.min(Duration::from_secs(10)));
        Self::from_config(config, opts.api_timeout)
    }

    /// A client for `config` (kube's retry layer always off, see the module doc).
    pub fn from_config(mut config: Config, api_timeout: Duration) -> Result<Kube, KubeError> {
        config.default_retry = false;
        let client =
            Client::try_from(config.clone()).map_err(|e| KubeError::Config(e.to_string()))?;
        Ok(Kube {
            client,
            config,
            api_timeout,
            node_uids: Default::default(),
        })
    }

    /// A client for the API server at `url` without credentials (the lab's
    /// simulated server).
    pub fn for_url(url: &str, api_timeout: Duration) -> Result<Kube, KubeError> {
        let uri = url
            .parse()
            .map_err(|e| KubeError::Config(format!("{url}: {e}")))?;
        let mut config = Config::new(uri);
        config.connect_timeout = Some(api_timeout);
        Self::from_config(config, api_timeout)
    }

    /// A client over any tower service (the request-shape tests use tower-test).
    pub fn from_client(client: Client, api_timeout: Duration) -> Kube {
        let config = Config::new("http://127.0.0.1:1".parse().expect("static URI"));
        Kube {
            client,
            config,
            api_timeout,
            node_uids: Default::default(),
        }
    }

    /// Runs one API request with the per-request deadline and names it in errors.
    pub async fn call<T>(
        &self,
        what: impl Into<String>,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        let what = what.into();
        match tokio::time::timeout(self.api_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(what, e)),
            Err(_) => Err(KubeError::Timeout {
                what,
                after: self.api_timeout,
            }),
        }
    }

    /// Turns a kube error into ours.
    pub fn error(&self, what: String, e: kube::Error) -> KubeError {
        match e {
            // kube's stand-in for a watch line that was neither an event nor a Status.
            kube::Error::Api(s) if s.code == 0 => KubeError::Api {
                what,
                code: 0,
                reason: "(undecodable)".into(),
                message: "the API server sent a watch event that could not be decoded".into(),
            },
            // kube's stand-in when the error body was not a Kubernetes Status.
            kube::Error::Api(s) if s.reason.starts_with("Failed to parse") => KubeError::Api {
                what,
                code: s.code,
                reason: "(not a Kubernetes Status)".into(),
                message: format!(
                    "is {} a Kubernetes API server? body: {:?}",
                    self.config.cluster_url,
                    s.message
                        .split_once(": ")
                        .map(|(_, body)| body)
                        .unwrap_or(&s.message)
                ),
            },
            kube::Error::Api(s) => KubeError::Api {
                what,
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            },
            kube::Error::SerdeError(e) => KubeError::BadAnswer {
                what,
                url: self.config.cluster_url.to_string(),
                detail: e.to_string(),
            },
            kube::Error::Auth(e) => KubeError::Credentials {
                what,
                detail: e.to_string(),
            },
            other => {
                // Walk the source chain for the root cause ("Connection refused").
                let mut detail = other.to_string();
                let mut src = std::error::Error::source(&other);
                while let Some(s) = src {
                    detail = s.to_string();
                    src = s.source();
                }
                KubeError::Unreachable {
                    what,
                    url: self.config.cluster_url.to_string(),
                    detail,
                }
            }
        }
    }
}

/// The `a/b` name of a namespaced object, for messages.
pub fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}
