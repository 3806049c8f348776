//! The agent's TLS: a rustls server config that *requires* a client
//! certificate signed by the cluster CA, built from PEM files and rebuilt when
//! those files change (sops-nix and cert-manager rotate them in place), without
//! touching the listener. There is no plaintext mode.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(flag: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        flag,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

pub fn read_certs(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|e| file_err(flag, path, e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(flag, path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(file_err(flag, path, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

pub fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = fs::read(path).map_err(|e| file_err(flag, path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_err(flag, path, format!("no usable PRIVATE KEY block ({e})")))
}

/// The DNS names in a certificate's subjectAltName: the identity we authorise by.
pub fn san_dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return vec![];
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server config; `node_name` must be one of the certificate's
/// SANs, because that is what the coordinator checks when it connects.
pub fn server_config(files: &TlsFiles, node_name: &str) -> Result<ServerConfig, TlsError> {
    let ca = read_certs("--tls-ca", &files.ca)?;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c).map_err(|e| {
            file_err(
                "--tls-ca",
                &files.ca,
                format!("not a usable CA certificate ({e})"),
            )
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let chain = read_certs("--tls-cert", &files.cert)?;
    let names = san_dns_names(&chain[0]);
    if !names.iter().any(|n| n == node_name) {
        return Err(file_err(
            "--tls-cert",
            &files.cert,
            format!(
                "is issued for {names:?}, not for node {node_name:?}; issue one with `cnishift certs issue --node {node_name}` or pass --node-name"
            ),
        ));
    }
    let key = read_key("--tls-key", &files.key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            file_err(
                "--tls-key",
                &files.key,
                format!("does not fit the certificate ({e})"),
            )
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The live config, swapped atomically on reload. Each new connection takes
/// the current one; established connections keep theirs.
#[derive(Clone)]
pub struct Reloadable {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Reloadable {
    pub fn new(cfg: ServerConfig) -> Self {
        Reloadable {
            current: Arc::new(RwLock::new(Arc::new(cfg))),
        }
    }
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config lock").clone()
    }
    fn swap(&self, cfg: ServerConfig) {
        *self.current.write().expect("tls config lock") = Arc::new(cfg);
    }
}

/// What identifies a file version: modification time and length, read through
/// symlinks (sops-nix swaps a symlink; cert-manager rewrites the file).
fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| {
            fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Polls the three files and reloads when any changes. A broken new set is
/// logged and the old config stays in force.
pub async fn watch(files: TlsFiles, node_name: String, live: Reloadable, every: Duration) {
    let mut last = stamp(&files);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = stamp(&files);
        if now == last {
            continue;
        }
        last = now;
        match server_config(&files, &node_name) {
            Ok(cfg) => {
                live.swap(cfg);
                tracing::info!(cert = %files.cert.display(), "reloaded TLS certificate files");
            }
            Err(e) => tracing::error!(
                "TLS files changed but cannot be used, keeping the previous ones: {e}"
            ),
        }
    }
}
