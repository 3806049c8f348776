//! Memory: will Cilium's agent (limit 512 MiB) and Hubble fit on this node?
//!
//! Read from `/proc/meminfo` under the host root, so a lab node reports its
//! own figures (sysinfo and procfs read the machine's `/proc` only, and
//! procfs's parser rejects a file missing any of ~20 fields with an
//! unhelpful message; we need two keys and a precise error).

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourceFacts {
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    pub error: Option<String>,
}

pub fn probe(host: &HostPaths) -> ResourceFacts {
    match host.read_string("proc/meminfo") {
        Ok(text) => parse_meminfo(&text),
        Err(e) => ResourceFacts {
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

/// Reads `MemTotal` and `MemAvailable` (`Key:   123456 kB`).
pub fn parse_meminfo(text: &str) -> ResourceFacts {
    let mut facts = ResourceFacts::default();
    let mut problems = Vec::new();
    for key in ["MemTotal", "MemAvailable"] {
        let line = text.lines().find(|l| l.split(':').next() == Some(key));
        let value = match line {
            None => {
                problems.push(format!("/proc/meminfo has no {key} line"));
                None
            }
            Some(l) => {
                let fields: Vec<&str> = l.split_whitespace().collect();
                match (
                    fields.get(1).and_then(|v| v.parse::<u64>().ok()),
                    fields.get(2),
                ) {
                    (Some(n), Some(&"kB")) => n.checked_mul(1024),
                    (Some(n), None) => Some(n),
                    _ => {
                        problems.push(format!(
                            "/proc/meminfo: cannot read {key} from {:?}",
                            l.trim()
                        ));
                        None
                    }
                }
            }
        };
        match key {
            "MemTotal" => facts.mem_total_bytes = value,
            _ => facts.mem_available_bytes = value,
        }
    }
    if !problems.is_empty() {
        facts.error = Some(problems.join("; "));
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_values_and_names_what_is_wrong() {
        let f = parse_meminfo(
            "MemTotal:        3884000 kB\nMemFree: 1 kB\nMemAvailable:    3200000 kB\n",
        );
        assert_eq!(f.mem_total_bytes, Some(3_884_000 * 1024));
        assert_eq!(f.mem_available_bytes, Some(3_200_000 * 1024));
        assert!(f.error.is_none());
        let f = parse_meminfo("MemTotal: lots kB\n");
        let e = f.error.unwrap();
        assert!(
            e.contains("cannot read MemTotal") && e.contains("no MemAvailable"),
            "{e}"
        );
        assert!(parse_meminfo("MemTotal: 99999999999999999999 kB")
            .error
            .is_some());
    }
}
