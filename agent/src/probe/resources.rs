//! Memory: will Cilium's agent (limit 512 MiB) and Hubble fit on this node?

use procfs_core::{FromRead, Meminfo};
use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourceFacts {
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    pub error: Option<String>,
}

/// Reads `/proc/meminfo` under the host root (procfs's parser, our path), so
/// a lab node reports its own figures.
pub fn probe(host: &HostPaths) -> ResourceFacts {
    let rel = "proc/meminfo";
    let bytes = match host.read_bytes(rel) {
        Ok(b) => b,
        Err(e) => {
            return ResourceFacts {
                error: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    match Meminfo::from_read(bytes.as_slice()) {
        Ok(m) => ResourceFacts {
            mem_total_bytes: Some(m.mem_total),
            mem_available_bytes: m.mem_available,
            error: None,
        },
        Err(e) => ResourceFacts {
            error: Some(format!("/{rel} could not be parsed: {e}")),
            ..Default::default()
        },
    }
}
