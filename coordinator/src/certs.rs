//! The cluster's certificates (rcgen): one CA, one certificate per agent
//! (SAN = node name, plus its IPs), one for the coordinator (a distinct
//! identity, SAN `cnishift-coordinator`). Keys are written 0600 and nothing
//! is ever overwritten silently.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub const DEFAULT_COORDINATOR_IDENTITY: &str = "cnishift-coordinator";
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("refusing to overwrite {0}; move it away or pass --force to replace it")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Spec {
    /// Valid from an hour ago (clock skew between Pis without RTCs) for `days`.
    pub fn for_days(dns: Vec<String>, ips: Vec<IpAddr>, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Spec {
            dns,
            ips,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days.into()),
        }
    }
}

/// A node name becomes a file name and a SAN: letters, digits, `-` and `.`,
/// no leading dot, nothing that can climb directories.
pub fn validate_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.starts_with('-')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(CertError::Invalid(format!(
            "{name:?} is not a usable node name: use letters, digits, '-' and '.' (a DNS name, as in the inventory)"
        )))
    }
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    // `mode` only applies on creation; make a forced overwrite 0600 too.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(io)?;
    Ok(())
}

fn check_free(paths: &[&Path], force: bool) -> Result<(), CertError> {
    if !force {
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(CertError::Exists(p.to_path_buf()));
        }
    }
    Ok(())
}

fn ensure_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates `ca.pem` and `ca-key.pem` in `dir`.
pub fn init_ca(dir: &Path, days: u32, force: bool) -> Result<Vec<PathBuf>, CertError> {
    ensure_dir(dir)?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    check_free(&[&cert_path, &key_path], force)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "cnishift cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let spec = Spec::for_days(vec![], vec![], days);
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok(vec![cert_path, key_path])
}

/// Loads the CA from `dir` to sign with.
pub fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
    };
    let (cert, key) = (read(CA_CERT)?, read(CA_KEY)?);
    let key = KeyPair::from_pem(&key).map_err(|e| {
        CertError::Invalid(format!(
            "{}: not a private key ({e})",
            dir.join(CA_KEY).display()
        ))
    })?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(|e| {
        CertError::Invalid(format!(
            "{}: not a CA certificate ({e})",
            dir.join(CA_CERT).display()
        ))
    })
}

/// Issues a leaf certificate; returns (certificate PEM, key PEM).
pub fn issue(issuer: &Issuer<'_, KeyPair>, spec: &Spec) -> Result<(String, String), CertError> {
    let mut params = CertificateParams::new(spec.dns.clone())?;
    params
        .subject_alt_names
        .extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    if let Some(cn) = spec.dns.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, cn.clone());
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Agents serve and also call (a read-only client); the coordinator calls.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues `<stem>.pem` and `<stem>-key.pem` in `dir`, signed by the CA there.
pub fn issue_to_dir(
    dir: &Path,
    stem: &str,
    spec: &Spec,
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    validate_name(stem)?;
    for d in &spec.dns {
        validate_name(d)?;
    }
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    );
    check_free(&[&cert_path, &key_path], force)?;
    let issuer = load_ca(dir)?;
    let (cert, key) = issue(&issuer, spec)?;
    write_file(&key_path, &key, 0o600, force)?;
    write_file(&cert_path, &cert, 0o644, force)?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_0600_and_never_overwritten_silently() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), 3650, false).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let before = fs::read(dir.path().join(CA_KEY)).unwrap();
        assert!(matches!(
            init_ca(dir.path(), 3650, false),
            Err(CertError::Exists(_))
        ));
        assert_eq!(
            fs::read(dir.path().join(CA_KEY)).unwrap(),
            before,
            "untouched"
        );
        let spec = Spec::for_days(vec!["opi01".into()], vec!["10.1.0.11".parse().unwrap()], 30);
        issue_to_dir(dir.path(), "opi01", &spec, false).unwrap();
        assert!(matches!(
            issue_to_dir(dir.path(), "opi01", &spec, false),
            Err(CertError::Exists(_))
        ));
        issue_to_dir(dir.path(), "opi01", &spec, true).unwrap();
        let mode = fs::metadata(dir.path().join("opi01-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "../etc/passwd",
            "a/b",
            "",
            ".hidden",
            "x..y",
            "node name",
            "-rf",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name("raccoon00").unwrap();
        validate_name("opi01.lan").unwrap();
    }
}
