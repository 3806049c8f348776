//! The `.config` text format itself: `CONFIG_X=y|m|value`, `# CONFIG_X is not
//! set`, comments. Only `std` and `serde`, and no access to the host: the fuzz
//! target (agent/fuzz) compiles this file alone, so a sanitizer build does not
//! rebuild the agent's whole dependency tree (tokio, tonic, rustls, aya).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An option's value as the config file states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptionValue {
    /// `CONFIG_X=y`: built into the kernel.
    Y,
    /// `CONFIG_X=m`: built as a module; present only if the module loads.
    M,
    /// `# CONFIG_X is not set`, or not mentioned at all.
    Unset,
    /// A string or number value (`CONFIG_X="..."`, `CONFIG_X=64`).
    Value(String),
}

/// A parsed config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelConfig {
    /// Option name without the `CONFIG_` prefix → value.
    pub options: BTreeMap<String, OptionValue>,
    /// Lines that are neither an assignment, a "not set" comment, a comment,
    /// nor blank: `(line number, first 80 chars)`, at most [`MAX_REPORTED_MALFORMED`].
    pub malformed: Vec<(usize, String)>,
    /// Total malformed lines, including those not listed.
    pub malformed_count: usize,
}

pub const MAX_REPORTED_MALFORMED: usize = 5;

impl KernelConfig {
    /// The value of `option` (name without `CONFIG_`); unmentioned means unset,
    /// which is how Kconfig itself reads a missing line.
    pub fn get(&self, option: &str) -> OptionValue {
        self.options
            .get(option)
            .cloned()
            .unwrap_or(OptionValue::Unset)
    }
}

/// Parses config text. Never fails: what it cannot read is listed in
/// `malformed`, and the caller decides whether the rest can be trusted.
pub fn parse(text: &str) -> KernelConfig {
    let mut cfg = KernelConfig::default();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if is_option_name(name) {
                    cfg.options.insert(name.to_string(), OptionValue::Unset);
                    continue;
                }
            }
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("CONFIG_") {
            if let Some((name, value)) = rest.split_once('=') {
                if is_option_name(name) && is_plausible_value(value) {
                    let v = match value {
                        "y" => OptionValue::Y,
                        "m" => OptionValue::M,
                        "n" => OptionValue::Unset,
                        other => OptionValue::Value(other.to_string()),
                    };
                    cfg.options.insert(name.to_string(), v);
                    continue;
                }
            }
        }
        cfg.malformed_count += 1;
        if cfg.malformed.len() < MAX_REPORTED_MALFORMED {
            let shown: String = line.chars().take(80).collect();
            cfg.malformed.push((idx + 1, shown));
        }
    }
    cfg
}

/// Parses raw bytes (the fuzz target's entry): invalid UTF-8 becomes
/// replacement characters and so shows up as malformed lines.
pub fn parse_bytes(bytes: &[u8]) -> KernelConfig {
    parse(&String::from_utf8_lossy(bytes))
}

/// Kconfig symbols are mostly upper case, but not all: real configs carry
/// `CONFIG_SCSI_DC395x` and `CONFIG_MT76x02_LIB`.
fn is_option_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_plausible_value(value: &str) -> bool {
    match value.as_bytes() {
        [] => false,
        [b'"', .., b'"'] => true,
        [b'"'] | [b'"', ..] => false,
        _ => value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
    }
}
