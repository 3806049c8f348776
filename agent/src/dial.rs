//! `DialFromNode`: can this node reach an address (the API VIP), and who
//! answers there?
//!
//! The coordinator on the admin box reaching the VIP proves nothing about a
//! node whose network was just switched: only the node can dial from itself.
//! The dial is a TCP connect and, when asked, a TLS handshake whose peer
//! certificate is *reported*, not trusted — the handshake's signature is
//! still checked (the peer holds the certificate's key), and the caller
//! verifies the chain against the CA it trusts (the kubeconfig's). Nothing is
//! sent after the handshake.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DialResult {
    pub ok: bool,
    pub address: String,
    pub elapsed_us: u64,
    pub error: String,
    pub peer_subject: String,
    pub peer_sans: Vec<String>,
    pub tls_version: String,
    /// The peer's chain, DER, leaf first (for the caller to verify).
    pub peer_chain: Vec<Vec<u8>>,
}

/// Checks the caller's request before anything is dialled.
pub fn check(address: &str, timeout_ms: u64) -> Result<(String, u16, Duration), String> {
    let timeout = match timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        return Err(format!(
            "timeout {timeout_ms} ms is out of range (100 ms to 30 s)"
        ));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("address {address:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("address {address:?}: {port:?} is not a port (1-65535)"))?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !host_ok {
        return Err(format!(
            "address {address:?}: {host:?} is not an IP address or DNS name"
        ));
    }
    Ok((host.to_string(), port, timeout))
}

/// Records the peer's chain and checks only the handshake's signatures.
#[derive(Debug)]
struct Recorder {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.as_ref().to_vec()];
        chain.extend(intermediates.iter().map(|c| c.as_ref().to_vec()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn describe_cert(der: &[u8]) -> (String, Vec<String>) {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
        return ("(unparsable certificate)".into(), vec![]);
    };
    let sans = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (c.subject().to_string(), sans)
}

/// Dials `address` from this node (its network namespace).
pub async fn dial(address: &str, tls: bool, server_name: &str, timeout_ms: u64) -> DialResult {
    let mut r = DialResult {
        address: address.to_string(),
        ..Default::default()
    };
    let (host, port, timeout) = match check(address, timeout_ms) {
        Ok(x) => x,
        Err(e) => {
            r.error = e;
            return r;
        }
    };
    let start = Instant::now();
    let outcome = tokio::time::timeout(timeout, async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("TCP connect to {address}: {e}"))?;
        if let Ok(peer) = tcp.peer_addr() {
            r.address = peer.to_string();
        }
        if !tls {
            return Ok(());
        }
        let provider = crate::tls::provider();
        let recorder = Arc::new(Recorder {
            chain: Mutex::new(vec![]),
            provider: provider.clone(),
        });
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
        let sni = if server_name.is_empty() {
            host.as_str()
        } else {
            server_name
        };
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| format!("server name {sni:?}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {address}: {e}"))?;
        r.tls_version = stream
            .get_ref()
            .1
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let chain = recorder
            .chain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(leaf) = chain.first() {
            (r.peer_subject, r.peer_sans) = describe_cert(leaf);
        }
        r.peer_chain = chain;
        Ok::<(), String>(())
    })
    .await;
    r.elapsed_us = start.elapsed().as_micros() as u64;
    match outcome {
        Ok(Ok(())) => r.ok = true,
        Ok(Err(e)) => r.error = e,
        Err(_) => {
            r.error = format!(
                "no answer from {address} within {}",
                humantime::format_duration(timeout)
            )
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_or_malformed_addresses_are_refused() {
        assert_eq!(
            check("10.1.0.5", 0).unwrap_err(),
            "address \"10.1.0.5\" is not HOST:PORT"
        );
        assert_eq!(
            check("10.1.0.5:0", 0).unwrap_err(),
            "address \"10.1.0.5:0\": \"0\" is not a port (1-65535)"
        );
        assert_eq!(
            check("/etc/passwd:80", 0).unwrap_err(),
            "address \"/etc/passwd:80\": \"/etc/passwd\" is not an IP address or DNS name"
        );
        assert!(check("10.1.0.5:6443", 50)
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            check("[::1]:6443", 0).unwrap(),
            ("::1".into(), 6443, DEFAULT_TIMEOUT)
        );
    }

    #[tokio::test]
    async fn a_refused_port_is_an_error_in_the_systems_words() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = dial(&addr.to_string(), false, "", 1000).await;
        assert!(!r.ok);
        assert!(
            r.error
                .starts_with(&format!("TCP connect to {addr}: Connection refused")),
            "{}",
            r.error
        );
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_at_the_deadline() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let t = Instant::now();
        let r = dial(&addr.to_string(), true, "", 300).await;
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(r.error, format!("no answer from {addr} within 300ms"));
        drop(l);
    }
}
