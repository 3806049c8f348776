//! How a values check is shown: a table a person reads top to bottom (each
//! warn and fail with its fix indented under it), or JSON.

use std::fmt::Write as _;

use super::Report;
use crate::kube::gates::Verdict;

fn mark(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "✓ pass",
        Verdict::Warn => "! warn",
        Verdict::Fail => "✗ fail",
    }
}

pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let width = r
        .findings
        .iter()
        .map(|f| f.key.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let _ = writeln!(
        s,
        "values {} ({}), checked against the cluster as Cilium 1.16 would read them",
        r.file,
        match r.format {
            super::Format::Yaml => "YAML",
            super::Format::SetLines => "--set lines",
        }
    );
    let _ = writeln!(
        s,
        "{:<7} {:<width$} {:>5}  FINDING",
        "VERDICT", "KEY", "LINE"
    );
    for f in &r.findings {
        let line = f.line.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<7} {:<width$} {:>5}  {} — {}",
            mark(f.verdict),
            f.key,
            line,
            f.value,
            f.observed
        );
        if let Some(fix) = &f.fix {
            let _ = writeln!(s, "{:<7} {:<width$} {:>5}  fix:", "", "", "");
            for l in fix.lines() {
                let _ = writeln!(s, "{:<7} {:<width$} {:>5}    {l}", "", "", "");
            }
        }
    }
    let _ = writeln!(s, "{} pass, {} warn, {} fail", r.pass, r.warn, r.fail);
    s
}

pub fn json(r: &Report) -> String {
    let mut s = serde_json::to_string_pretty(r)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    s.push('\n');
    s
}
