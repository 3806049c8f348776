//! `cnishift values check`: the Helm values the user will install Cilium
//! with, judged against this cluster before the first node is touched.
//!
//! A values file that fits another cluster is how an in-place migration
//! strands a node: a `k8sServiceHost` the nodes cannot reach, a native-routing
//! CIDR that leaves half the pod network masqueraded, a CNI directory
//! containerd never reads. Each rule here reads one part of the values, the
//! facts the Kubernetes API and the agents report, and says what it found,
//! from which node or object, and what to write instead.
//!
//! [`parse`] reads the file (YAML or `--set` lines) keeping every line;
//! [`schema`] knows Cilium 1.16's keys, types and defaults; [`facts`] gathers
//! what the rules need; [`rules`] judges; [`render`] shows it.

pub mod cidr;
pub mod facts;
pub mod parse;
pub mod render;
pub mod rules;
pub mod schema;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::Serialize;

pub use parse::{Format, ParseError};
use parse::{Key, Node, Value};

use crate::kube::gates::Verdict;

/// A values file, parsed and type-checked.
#[derive(Debug, Clone)]
pub struct Values {
    pub file: String,
    pub format: Format,
    pub root: Node,
}

impl Values {
    /// Reads and checks `path`; every error names the file and line.
    pub fn load(path: &Path) -> Result<Values, ParseError> {
        let text = std::fs::read_to_string(path).map_err(|e| ParseError {
            file: path.display().to_string(),
            line: 0,
            col: 0,
            message: format!("cannot read the values file: {e}"),
            hint: None,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Values, ParseError> {
        let (root, format) = parse::parse(text, path)?;
        let file = path.display().to_string();
        schema::validate(&root, &file)?;
        Ok(Values { file, format, root })
    }

    /// The key entry and value at a dotted path; None when absent or null.
    pub fn at(&self, path: &str) -> Option<(&Key, &Node)> {
        schema::lookup(&self.root, path).filter(|(_, n)| n.value != Value::Null)
    }

    /// The line that sets `path`.
    pub fn line(&self, path: &str) -> Option<usize> {
        self.at(path).map(|(k, _)| k.pos.line)
    }

    pub fn string(&self, path: &str) -> Option<&str> {
        match self.at(path) {
            Some((
                _,
                Node {
                    value: Value::Str(s),
                    ..
                },
            )) => Some(s),
            _ => None,
        }
    }

    /// A boolean (for `kubeProxyReplacement` also the strings "true"/"false").
    pub fn boolean(&self, path: &str) -> Option<bool> {
        match self.at(path).map(|(_, n)| &n.value) {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::Str(s)) if s == "true" => Some(true),
            Some(Value::Str(s)) if s == "false" => Some(false),
            _ => None,
        }
    }

    pub fn int(&self, path: &str) -> Option<i64> {
        match self.at(path).map(|(_, n)| &n.value) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// A port given as an integer or a string of digits.
    pub fn port(&self, path: &str) -> Option<u16> {
        match self.at(path).map(|(_, n)| &n.value) {
            Some(Value::Int(i)) => u16::try_from(*i).ok().filter(|p| *p > 0),
            Some(Value::Str(s)) => s.parse().ok().filter(|p| *p > 0),
            _ => None,
        }
    }

    /// A list of strings, or one string.
    pub fn strings(&self, path: &str) -> Option<Vec<String>> {
        match self.at(path).map(|(_, n)| &n.value) {
            Some(Value::Str(s)) => Some(s.split_whitespace().map(String::from).collect()),
            Some(Value::List(items)) => Some(
                items
                    .iter()
                    .filter_map(|i| match &i.value {
                        Value::Str(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// `path`'s value as a finding shows it: as written, or `(default) X`.
    pub fn shown(&self, path: &str, default: &str) -> String {
        match self.at(path) {
            Some((_, n)) => n.show(),
            None => format!("(default) {default}"),
        }
    }
}

/// One judgement: the values key it is about, where the key is set, the fact
/// observed (and from which node or object), and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable rule id (`api.endpoint`, `routing.native-cidr`, ...).
    pub rule: &'static str,
    /// The values key, dotted (`ipv4NativeRoutingCIDR`, `cni.confPath`).
    pub key: String,
    /// The line that sets it; None when the chart's default applies.
    pub line: Option<usize>,
    /// The value in effect, as written or `(default) X`.
    pub value: String,
    pub verdict: Verdict,
    /// What was observed, naming the node or object it came from.
    pub observed: String,
    /// The lines to write instead (or what to do), on a warn or fail.
    pub fix: Option<String>,
}

/// The whole answer of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub file: String,
    pub format: Format,
    pub findings: Vec<Finding>,
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Report {
    pub fn new(values: &Values, findings: Vec<Finding>) -> Report {
        let count = |v: Verdict| findings.iter().filter(|f| f.verdict == v).count();
        Report {
            file: values.file.clone(),
            format: values.format,
            pass: count(Verdict::Pass),
            warn: count(Verdict::Warn),
            fail: count(Verdict::Fail),
            findings,
        }
    }

    /// The failing findings in one line each (for a gate's cause).
    pub fn failures(&self) -> Vec<String> {
        self.findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .map(|f| {
                let at = f
                    .line
                    .map(|l| format!("{}:{l}: ", self.file))
                    .unwrap_or_default();
                format!("{at}{}: {}", f.key, f.observed)
            })
            .collect()
    }
}

/// Loads the values at `path`, gathers the facts and judges them.
pub async fn check(
    path: &Path,
    kube: &crate::kube::Kube,
    inv: &crate::inventory::Inventory,
    tls: &crate::agents::ClientTls,
) -> Result<Report, ParseError> {
    let values = Values::load(path)?;
    let endpoint = match (
        values.string("k8sServiceHost"),
        values.port("k8sServicePort"),
    ) {
        (Some("auto"), _) => Some(("auto", 0)),
        (Some(h), Some(p)) if !h.is_empty() => Some((h, p)),
        _ => None,
    };
    let facts = facts::gather(kube, inv, tls, endpoint).await;
    Ok(Report::new(&values, rules::check(&values, &facts)))
}

/// The Preflight gate: the inventory's `[cilium] values`, checked; Err names
/// every failing finding (or why the file could not be read).
pub async fn gate(
    kube: &crate::kube::Kube,
    inv: &crate::inventory::Inventory,
    tls: &crate::agents::ClientTls,
) -> Result<String, String> {
    let Some(path) = &inv.cilium.values else {
        return Ok("no [cilium] values in the inventory: the Helm values were not checked".into());
    };
    let r = check(path, kube, inv, tls)
        .await
        .map_err(|e| e.to_string())?;
    if r.fail > 0 {
        Err(format!(
            "the Cilium values do not fit this cluster ({} failing; `cnishift values check {}` shows each with its fix): {}",
            r.fail,
            path.display(),
            r.failures().join("; ")
        ))
    } else {
        Ok(format!(
            "the Cilium values {} fit this cluster ({} pass, {} warn)",
            path.display(),
            r.pass,
            r.warn
        ))
    }
}
