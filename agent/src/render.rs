//! Human output for `cnishift-agent report`: checks grouped by family,
//! ✓ / ! / ✗, colour only on a terminal and never with `NO_COLOR`.

use std::fmt::Write as _;

use crate::policy::{Check, Verdict};
use crate::report::Report;

#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub colour: bool,
    /// Show passing checks too (otherwise only a count per group).
    pub all: bool,
}

impl Style {
    /// Colour when stdout is a terminal and `NO_COLOR` is unset or empty
    /// (https://no-color.org).
    pub fn detect(all: bool) -> Self {
        use std::io::IsTerminal;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            colour: std::io::stdout().is_terminal() && !no_color,
            all,
        }
    }
}

fn mark(v: Verdict, s: Style) -> &'static str {
    match (v, s.colour) {
        (Verdict::Pass, false) => "✓",
        (Verdict::Warn, false) => "!",
        (Verdict::Fail, false) => "✗",
        (Verdict::Pass, true) => "\x1b[32m✓\x1b[0m",
        (Verdict::Warn, true) => "\x1b[33m!\x1b[0m",
        (Verdict::Fail, true) => "\x1b[1;31m✗\x1b[0m",
    }
}

/// The family a check belongs to: the first segment of its id.
pub fn group_of(c: &Check) -> &str {
    c.id.split('.').next().unwrap_or(&c.id)
}

pub fn table(r: &Report, style: Style) -> String {
    let mut out = String::new();
    let k = &r.facts.kernel;
    let _ = writeln!(
        out,
        "cnishift-agent {} ({}) — node {}, kernel {} {}{}",
        r.agent.version,
        r.agent.build_arch,
        r.node,
        k.release.as_deref().unwrap_or("?"),
        k.arch.as_deref().unwrap_or("?"),
        if r.host_root == "/" {
            String::new()
        } else {
            format!(", host root {}", r.host_root)
        },
    );
    for s in &r.skipped_probes {
        let _ = writeln!(out, "  skipped: {s}");
    }
    let mut groups: Vec<&str> = Vec::new();
    for c in &r.checks {
        let g = group_of(c);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for g in groups {
        let checks: Vec<&Check> = r.checks.iter().filter(|c| group_of(c) == g).collect();
        let worst = checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Pass);
        let passed = checks.iter().filter(|c| c.verdict == Verdict::Pass).count();
        let _ = writeln!(
            out,
            "\n{} {g} ({passed}/{} pass)",
            mark(worst, style),
            checks.len()
        );
        for c in checks {
            if c.verdict == Verdict::Pass && !style.all {
                continue;
            }
            let _ = writeln!(
                out,
                "  {} {:<40} {}",
                mark(c.verdict, style),
                c.id,
                c.message
            );
            if let Some(fix) = &c.remediation {
                if c.verdict != Verdict::Pass {
                    let _ = writeln!(out, "      fix: {fix}");
                }
            }
        }
    }
    let verdict = if r.ready {
        "READY for Cilium"
    } else {
        "NOT READY for Cilium"
    };
    let _ = writeln!(
        out,
        "\n{verdict}: {} pass, {} warn, {} fail{}",
        r.summary.pass,
        r.summary.warn,
        r.summary.fail,
        if style.all {
            ""
        } else {
            " (--all lists the passes)"
        }
    );
    out
}
