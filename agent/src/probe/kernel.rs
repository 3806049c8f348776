//! The running kernel: release string, architecture and parsed version.

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelFacts {
    /// `/proc/sys/kernel/osrelease`, e.g. `6.6.64-current-bcm2711`.
    pub release: Option<String>,
    /// `/proc/sys/kernel/arch`, e.g. `aarch64`.
    pub arch: Option<String>,
    /// The numeric version parsed from `release`.
    pub version: Option<KernelVersion>,
    /// Why a field above is missing.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses the leading `X.Y[.Z]` of a release string (`6.12.0-rc3` → 6.12.0).
pub fn parse_version(release: &str) -> Option<KernelVersion> {
    let numeric: String = release
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some(KernelVersion {
        major,
        minor,
        patch,
    })
}

pub fn probe(host: &HostPaths) -> KernelFacts {
    let mut facts = KernelFacts::default();
    match host.read_trimmed("proc/sys/kernel/osrelease") {
        Ok(r) if !r.is_empty() => {
            facts.version = parse_version(&r);
            if facts.version.is_none() {
                facts.errors.push(format!(
                    "kernel release {r:?} does not start with a version number"
                ));
            }
            facts.release = Some(r);
        }
        Ok(_) => facts
            .errors
            .push("/proc/sys/kernel/osrelease is empty".into()),
        Err(e) => facts.errors.push(e.to_string()),
    }
    match host.read_trimmed("proc/sys/kernel/arch") {
        Ok(a) if !a.is_empty() => facts.arch = Some(a),
        Ok(_) => facts.errors.push("/proc/sys/kernel/arch is empty".into()),
        Err(e) => facts.errors.push(e.to_string()),
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_real_release_strings() {
        let v = |s| parse_version(s).map(|v| v.to_string());
        assert_eq!(v("6.6.64-current-bcm2711").as_deref(), Some("6.6.64"));
        assert_eq!(
            v("6.12.0-rc3-edge-rockchip-rk3588").as_deref(),
            Some("6.12.0")
        );
        assert_eq!(v("6.18.44-fc-v657").as_deref(), Some("6.18.44"));
        assert_eq!(v("5.10").as_deref(), Some("5.10.0"));
        assert_eq!(v("garbage"), None);
        assert_eq!(v("6"), None);
        assert_eq!(v("99999999999.1"), None);
    }
}
