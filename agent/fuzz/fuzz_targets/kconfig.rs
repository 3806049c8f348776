//! Fuzzes the kernel-config parser: any bytes must parse without panicking,
//! every accepted option must round-trip to a line that was in the input, and
//! every rejected non-comment line must be counted.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The agent's parser, the very file it compiles (see agent/fuzz/Cargo.toml).
#[path = "../../src/probe/kconfig/parse.rs"]
#[allow(dead_code)]
mod parse;
use parse::{parse_bytes, OptionValue};

fuzz_target!(|data: &[u8]| {
    let cfg = parse_bytes(data);
    let text = String::from_utf8_lossy(data);
    for (name, value) in &cfg.options {
        let line = match value {
            OptionValue::Y => format!("CONFIG_{name}=y"),
            OptionValue::M => format!("CONFIG_{name}=m"),
            OptionValue::Unset => continue, // `=n` and "is not set" both map here
            OptionValue::Value(v) => format!("CONFIG_{name}={v}"),
        };
        assert!(text.lines().any(|l| l.trim() == line), "{line} not in input");
    }
    assert!(cfg.malformed.len() <= cfg.malformed_count);
});
