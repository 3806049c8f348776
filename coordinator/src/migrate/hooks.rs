//! The inventory's `[hooks]`: command templates (`["nixos-rebuild", "switch",
//! "--flake", ".#{node}", "--target-host", "root@{address}"]`), rendered per
//! node and run with their output in a per-node log file, their exit status
//! checked and their deadline enforced: at the deadline the child's whole
//! process group is killed, grandchildren included.

use std::collections::BTreeMap;
use std::fmt;

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 4] = ["node", "address", "role", "run"];

/// One piece of a parsed template argument.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(String),
}

/// A template argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Byte offset of the problem within the argument.
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Splits one argument into text and `{placeholder}`s; `{{` and `}}` are
/// literal braces. Unknown placeholders and unbalanced braces are errors.
fn parse_arg(arg: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut out = vec![];
    let mut text = String::new();
    let mut chars = arg.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let rest = &arg[i + 1..];
                let Some(end) = rest.find('}') else {
                    return Err(TemplateError {
                        offset: i,
                        message: format!("{arg:?}: '{{' without a closing '}}'"),
                    });
                };
                let name = &rest[..end];
                if !PLACEHOLDERS.contains(&name) {
                    return Err(TemplateError {
                        offset: i,
                        message: format!(
                            "{arg:?}: unknown placeholder {{{name}}}; a hook may use {}",
                            PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                        ),
                    });
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Var(name.to_string()));
                for _ in 0..=end {
                    chars.next();
                }
            }
            '}' => {
                return Err(TemplateError {
                    offset: i,
                    message: format!(
                        "{arg:?}: '}}' without an opening '{{' (write '}}}}' for a literal brace)"
                    ),
                })
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// A checked command template: argv with placeholders.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Template {
    argv: Vec<String>,
    #[serde(skip)]
    parsed: Vec<Vec<Piece>>,
}

impl Template {
    /// Checks every argument; the error carries the index of the bad one.
    pub fn parse(argv: &[String]) -> Result<Template, (usize, TemplateError)> {
        let parsed = argv
            .iter()
            .enumerate()
            .map(|(i, a)| parse_arg(a).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Template {
            argv: argv.to_vec(),
            parsed,
        })
    }

    /// The template as written.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The command for one node. Every placeholder was checked at parse
    /// time; one missing from `vars` renders empty.
    pub fn render(&self, vars: &Vars) -> Vec<String> {
        self.parsed
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => t.as_str(),
                        Piece::Var(v) => vars.0.get(v.as_str()).map_or("", |s| s.as_str()),
                    })
                    .collect()
            })
            .collect()
    }
}

/// The values of the placeholders for one node.
#[derive(Debug, Clone, Default)]
pub struct Vars(BTreeMap<&'static str, String>);

impl Vars {
    /// `{node}`, `{address}` (the agent address's host, without the port),
    /// `{role}` and `{run}`.
    pub fn for_node(node: &crate::inventory::Node, run: &str) -> Vars {
        let host = host_of(&node.address);
        Vars(BTreeMap::from([
            ("node", node.name.clone()),
            ("address", host),
            ("role", node.role.to_string()),
            ("run", run.to_string()),
        ]))
    }
}

/// `10.1.0.11:7443` → `10.1.0.11`; `[fd00::1]:7443` → `fd00::1`.
pub fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod template_tests {
    use super::*;
    use crate::inventory::{Node, Role};

    fn t(argv: &[&str]) -> Result<Template, (usize, TemplateError)> {
        Template::parse(&argv.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn renders_every_placeholder() {
        let node = Node {
            name: "raccoon03".into(),
            role: Role::Worker,
            address: "10.1.0.23:7443".into(),
        };
        let tpl = t(&[
            "nixos-rebuild",
            "--flake",
            ".#{node}",
            "--target-host",
            "root@{address}",
            "{role}-{run}",
            "{{literal}}",
        ])
        .unwrap();
        assert_eq!(
            tpl.render(&Vars::for_node(&node, "r1")),
            [
                "nixos-rebuild",
                "--flake",
                ".#raccoon03",
                "--target-host",
                "root@10.1.0.23",
                "worker-r1",
                "{literal}"
            ]
        );
        assert_eq!(host_of("[fd00::1]:7443"), "fd00::1");
        assert_eq!(host_of("pi.lan:7443"), "pi.lan");
    }

    #[test]
    fn unknown_placeholders_and_stray_braces_are_errors() {
        let (i, e) = t(&["deploy", "{nodename}"]).unwrap_err();
        assert_eq!(i, 1);
        assert_eq!(
            e.message,
            "\"{nodename}\": unknown placeholder {nodename}; a hook may use {node}, {address}, {role}, {run}"
        );
        let (_, e) = t(&["x{node"]).unwrap_err();
        assert_eq!(e.message, "\"x{node\": '{' without a closing '}'");
        assert_eq!(e.offset, 1);
        let (_, e) = t(&["a}b"]).unwrap_err();
        assert_eq!(
            e.message,
            "\"a}b\": '}' without an opening '{' (write '}}' for a literal brace)"
        );
    }
}
