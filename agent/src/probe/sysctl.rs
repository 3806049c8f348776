//! The sysctls Cilium and the runbook care about, read from `/proc/sys`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

pub const SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.default.rp_filter",
    "net.core.bpf_jit_enable",
];

/// One sysctl: its value, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum SysctlValue {
    Value(String),
    /// The key does not exist on this kernel (or its module is not loaded).
    Absent,
    Unreadable(String),
}

/// `net.ipv4.ip_forward` → `proc/sys/net/ipv4/ip_forward`. Dots inside a
/// component do not occur in the keys we read, so a plain replace is right.
pub fn path_of(key: &str) -> String {
    format!("proc/sys/{}", key.replace('.', "/"))
}

pub fn probe(host: &HostPaths) -> BTreeMap<String, SysctlValue> {
    SYSCTLS
        .iter()
        .map(|key| {
            let v = match host.read_trimmed(&path_of(key)) {
                Ok(v) => SysctlValue::Value(v),
                Err(e) if e.is_missing() => SysctlValue::Absent,
                Err(e) => SysctlValue::Unreadable(e.to_string()),
            };
            (key.to_string(), v)
        })
        .collect()
}
