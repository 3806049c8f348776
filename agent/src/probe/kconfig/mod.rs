//! The kernel build configuration (`.config`): where it is, and what it says.
//!
//! Looked for where distributions put it — `/proc/config.gz` (CONFIG_IKCONFIG_PROC),
//! `/boot/config-<release>`, `/lib/modules/<release>/config` — in that order.
//! A source that exists but cannot be decoded is recorded and the next one is
//! tried, so a corrupt `config.gz` never silently turns into "option unset".

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

mod parse;
pub use parse::{parse, parse_bytes, KernelConfig, OptionValue, MAX_REPORTED_MALFORMED};

/// Cap on the decompressed size of `config.gz`: real configs are ~250 KiB,
/// so 16 MiB is generous and stops a gzip bomb.
const MAX_DECOMPRESSED: u64 = 16 * 1024 * 1024;

/// Where the config came from and what was wrong with the sources before it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelConfigFacts {
    /// The file the options were read from (`/proc/config.gz`, ...), if any.
    pub source: Option<String>,
    /// Every source tried that existed but could not be used, with the reason.
    pub rejected_sources: Vec<String>,
    /// Options the policy asks about, with their values (only when `source` is set).
    pub options: BTreeMap<String, OptionValue>,
    pub malformed_lines: Vec<(usize, String)>,
    pub malformed_count: usize,
    /// Why no config could be used, when `source` is `None`.
    pub error: Option<String>,
    /// The whole parsed config, kept in memory for the policy and the module
    /// probe; only the options above are serialised.
    #[serde(skip)]
    pub full: Option<KernelConfig>,
}

impl KernelConfigFacts {
    /// The value of an option, or `None` when no config could be read (the
    /// policy must then say "cannot verify", never "pass").
    pub fn value(&self, option: &str) -> Option<OptionValue> {
        self.full.as_ref().map(|c| c.get(option))
    }
}

/// Finds and parses the running kernel's config. `release` selects the
/// `/boot` and `/lib/modules` candidates; `wanted` lists the options to keep
/// in the serialised facts (the whole config stays in memory for the policy).
pub fn probe(host: &HostPaths, release: Option<&str>, wanted: &[&str]) -> KernelConfigFacts {
    let mut facts = KernelConfigFacts::default();
    let mut candidates = vec!["proc/config.gz".to_string()];
    if let Some(rel) = release {
        candidates.push(format!("boot/config-{rel}"));
        candidates.push(format!("lib/modules/{rel}/config"));
    }
    for rel in &candidates {
        let bytes = match host.read_bytes(rel) {
            Ok(b) => b,
            Err(e) if e.is_missing() => continue,
            Err(e) => {
                facts.rejected_sources.push(e.to_string());
                continue;
            }
        };
        let text = if rel.ends_with(".gz") {
            match gunzip(&bytes) {
                Ok(t) => t,
                Err(e) => {
                    facts.rejected_sources.push(format!("/{rel}: {e}"));
                    continue;
                }
            }
        } else {
            bytes
        };
        let cfg = parse_bytes(&text);
        if cfg.options.is_empty() {
            facts.rejected_sources.push(format!(
                "/{rel}: no CONFIG_ lines found ({} unreadable lines); not a kernel config",
                cfg.malformed_count
            ));
            continue;
        }
        facts.source = Some(format!("/{rel}"));
        facts.options = wanted.iter().map(|o| (o.to_string(), cfg.get(o))).collect();
        facts.malformed_lines = cfg.malformed.clone();
        facts.malformed_count = cfg.malformed_count;
        facts.full = Some(cfg);
        return facts;
    }
    let tried: Vec<String> = candidates.iter().map(|c| format!("/{c}")).collect();
    facts.error = Some(if facts.rejected_sources.is_empty() {
        format!("no kernel config found (tried {})", tried.join(", "))
    } else {
        format!(
            "no usable kernel config: {}",
            facts.rejected_sources.join("; ")
        )
    });
    facts
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(bytes);
    decoder
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("corrupt or truncated gzip stream ({e})"))?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(format!(
            "decompresses to more than {MAX_DECOMPRESSED} bytes; refusing"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_value_kinds() {
        let cfg = parse(
            "#\n# comment\nCONFIG_BPF=y\nCONFIG_VXLAN=m\n# CONFIG_SCHEDSTATS is not set\n\
             CONFIG_HZ=250\nCONFIG_CC_VERSION_TEXT=\"gcc 13\"\n",
        );
        assert_eq!(cfg.get("BPF"), OptionValue::Y);
        assert_eq!(cfg.get("VXLAN"), OptionValue::M);
        assert_eq!(cfg.get("SCHEDSTATS"), OptionValue::Unset);
        assert_eq!(cfg.get("NOT_MENTIONED"), OptionValue::Unset);
        assert_eq!(cfg.get("HZ"), OptionValue::Value("250".into()));
        assert_eq!(cfg.malformed_count, 0);
    }

    #[test]
    fn garbage_lines_are_counted_not_trusted() {
        let cfg = parse("CONFIG_BPF=y\nthis is not config\nCONFIG_=y\nCONFIG_X=\"unterminated\nCONFIG_bad-name=y\n\u{0}\u{1}\nCONFIG_MT76x02_LIB=m");
        assert_eq!(cfg.get("BPF"), OptionValue::Y);
        assert_eq!(
            cfg.get("MT76x02_LIB"),
            OptionValue::M,
            "real symbols contain lower case"
        );
        assert_eq!(cfg.malformed_count, 5);
        assert_eq!(cfg.malformed[0], (2, "this is not config".to_string()));
        assert!(
            !cfg.options.contains_key("X"),
            "a half-quoted value must not be accepted"
        );
    }

    #[test]
    fn gunzip_rejects_truncation_and_garbage() {
        use flate2::{write::GzEncoder, Compression};
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(b"CONFIG_BPF=y\n".repeat(1000).as_slice())
            .unwrap();
        let gz = enc.finish().unwrap();
        assert!(gunzip(&gz).is_ok());
        assert!(gunzip(&gz[..gz.len() / 2])
            .unwrap_err()
            .contains("truncated"));
        assert!(gunzip(b"not gzip at all").is_err());
    }

    /// The fuzz target's property (agent/fuzz), run over deterministic
    /// mutations of a real-looking config so it is exercised in every test run.
    #[test]
    fn mutated_configs_never_panic_and_never_invent_options() {
        let seed = b"#\n# Linux/arm64 6.6.64 Kernel Configuration\nCONFIG_BPF=y\nCONFIG_VXLAN=m\n\
                     # CONFIG_SCHEDSTATS is not set\nCONFIG_HZ=250\nCONFIG_LOCALVERSION=\"-rpi\"\n";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut data = seed.to_vec();
            for _ in 0..(next() % 8) {
                let i = (next() as usize) % data.len();
                match next() % 3 {
                    0 => data[i] = next() as u8,
                    1 => data.truncate(i.max(1)),
                    _ => data.insert(i, b"=\n#\"Cy"[(next() % 5) as usize]),
                }
            }
            let cfg = parse_bytes(&data);
            let text = String::from_utf8_lossy(&data);
            for (name, value) in &cfg.options {
                let line = match value {
                    OptionValue::Y => format!("CONFIG_{name}=y"),
                    OptionValue::M => format!("CONFIG_{name}=m"),
                    OptionValue::Unset => continue,
                    OptionValue::Value(v) => format!("CONFIG_{name}={v}"),
                };
                assert!(
                    text.lines().any(|l| l.trim() == line),
                    "{line} invented from {text:?}"
                );
            }
            assert!(cfg.malformed.len() <= cfg.malformed_count.min(MAX_REPORTED_MALFORMED));
        }
    }
}
