//! YAML for `kubectl apply`, written from JSON values: block mappings and
//! sequences, every string that a YAML 1.1 reader (kubectl's) could take for
//! something else double-quoted with JSON's escapes (which YAML shares), and
//! multi-line strings as literal blocks when that is exact.

use serde_json::Value;

/// Can `s` be written plain, and be read back as this same string by YAML 1.1?
fn plain_ok(s: &str) -> bool {
    if s.is_empty() || s.trim() != s {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    const SPECIAL: &[&str] = &[
        "y", "n", "yes", "no", "true", "false", "on", "off", "null", "~", ".inf", "-.inf", "+.inf",
        ".nan",
    ];
    if SPECIAL.contains(&lower.as_str()) {
        return false;
    }
    let first = s.chars().next().unwrap_or(' ');
    if first.is_ascii_digit() || matches!(first, '-' | '+' | '.') {
        // Numbers, dates, "-x" (a list item) and ".5": quote anything starting so.
        return false;
    }
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '.' | '-'))
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A literal block (`|`/`|-`) for `s` at `indent`, when it reads back exactly.
fn literal(s: &str, indent: usize) -> Option<String> {
    if !s.contains('\n')
        || s.contains(['\r', '\t'])
        || s.starts_with([' ', '\n'])
        || s.ends_with("\n\n")
    {
        return None;
    }
    let body = s.strip_suffix('\n');
    let (indicator, text) = match body {
        Some(b) => ("|", b),
        None => ("|-", s),
    };
    if text.lines().any(|l| l.ends_with(' ')) {
        return None;
    }
    let pad = " ".repeat(indent);
    let mut out = indicator.to_string();
    for l in text.split('\n') {
        out.push('\n');
        if !l.is_empty() {
            out.push_str(&pad);
            out.push_str(l);
        }
    }
    Some(out)
}

fn scalar(v: &Value, indent: usize) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if plain_ok(s) => s.clone(),
        Value::String(s) => literal(s, indent).unwrap_or_else(|| quoted(s)),
        _ => unreachable!("scalars only"),
    }
}

fn key(k: &str) -> String {
    if plain_ok(k) {
        k.to_string()
    } else {
        quoted(k)
    }
}

fn emit(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                out.push_str(&pad);
                out.push_str(&key(k));
                match val {
                    Value::Object(x) if !x.is_empty() => {
                        out.push_str(":\n");
                        emit(val, indent + 2, out);
                    }
                    Value::Array(x) if !x.is_empty() => {
                        out.push_str(":\n");
                        emit(val, indent, out);
                    }
                    Value::Object(_) => out.push_str(": {}\n"),
                    Value::Array(_) => out.push_str(": []\n"),
                    s => {
                        out.push_str(": ");
                        out.push_str(&scalar(s, indent + 2));
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&pad);
                out.push('-');
                match item {
                    Value::Object(x) if !x.is_empty() => {
                        // The first key on the dash's line, the rest under it.
                        let mut inner = String::new();
                        emit(item, indent + 2, &mut inner);
                        out.push(' ');
                        out.push_str(inner.trim_start());
                    }
                    Value::Array(x) if !x.is_empty() => {
                        out.push('\n');
                        emit(item, indent + 2, out);
                    }
                    Value::Object(_) => out.push_str(" {}\n"),
                    Value::Array(_) => out.push_str(" []\n"),
                    s => {
                        out.push(' ');
                        out.push_str(&scalar(s, indent + 2));
                        out.push('\n');
                    }
                }
            }
        }
        s => {
            out.push_str(&pad);
            out.push_str(&scalar(s, indent + 2));
            out.push('\n');
        }
    }
}

/// One YAML document (`---` first) for `v`.
pub fn document(v: &Value) -> String {
    let mut out = String::from("---\n");
    emit(v, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::parse::{parse, Node, Value as Y};
    use serde_json::json;
    use std::path::Path;

    /// The YAML tree, back as JSON (integers and strings as the reader types them).
    fn back(n: &Node) -> Value {
        match &n.value {
            Y::Null => Value::Null,
            Y::Bool(b) => json!(b),
            Y::Int(i) => json!(i),
            Y::Float(f) => json!(f),
            Y::Str(s) => json!(s),
            Y::List(l) => Value::Array(l.iter().map(back).collect()),
            Y::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.name.clone(), back(v))).collect()),
        }
    }

    #[test]
    fn what_a_yaml_1_1_reader_gets_back_is_exactly_what_was_written() {
        let v = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cilium-config", "labels": {"a": "y", "b": "no", "c": "On", "d": "0755", "e": "1e3", "f": "", "g": "~",
                                                              "h": "- x", "i": "a: b", "j": "#c", "k": " lead", "l": "trail ", "m": "null", "n": "x\"y\\z"},
                         "annotations": {"kubernetes.io/hostname": "opi01", "k3s.io/node-args": "[\"server\",\"--flannel-backend\",\"none\"]"}},
            "data": {"Corefile": ".:53 {\n    errors\n    health\n}\n", "nolf": "a\nb", "blank": "a\n\nb\n", "tabs": "a\tb\n", "trailsp": "a \nb\n", "two": "x\n\n", "ünï": "çødé"},
            "spec": {"taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}], "podCIDRs": ["10.42.0.0/24"],
                     "empty": {}, "none": [], "n": 3, "t": true, "nested": [[1, 2], []], "unschedulable": false},
        });
        let text = document(&v);
        let (tree, _) = parse(&text, Path::new("x.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back(&tree), v, "\n{text}");
        assert!(
            text.contains("  Corefile: |\n    .:53 {\n        errors\n"),
            "{text}"
        );
        assert!(
            text.contains("a: \"y\"") && text.contains("d: \"0755\""),
            "{text}"
        );
    }
}
