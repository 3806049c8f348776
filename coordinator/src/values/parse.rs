//! Reading a Helm values file into a tree that remembers where every key and
//! value is, so each finding and each error can name its line.
//!
//! Two forms are read: a YAML values file (what `helm install -f` takes, the
//! runbook's `helm-values.yaml`), and `--set`-style lines (`key.path=value`,
//! one or more per line, what `helm install --set` takes). Scalars are typed
//! the way Helm types them: YAML plain scalars by YAML 1.1 as Helm's
//! `sigs.k8s.io/yaml` does (`yes`/`on`/`y` are booleans there, unlike YAML
//! 1.2), `--set` values by Helm's `strvals` (`true`/`false`, `null`, decimal
//! integers; everything else a string).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A place in the file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Node>),
    /// Entries in file order; keys are unique (a duplicate is an error).
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// The value of `key` in this mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The key entry (for its line) of `key` in this mapping.
    pub fn key(&self, key: &str) -> Option<&Key> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(k, _)| k),
            _ => None,
        }
    }

    /// What the value is, in a person's words (for type errors).
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The value as the file would show it (scalars only; else its kind).
    pub fn show(&self) -> String {
        match &self.value {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::List(l) => format!(
                "[{}]",
                l.iter().map(Node::show).collect::<Vec<_>>().join(", ")
            ),
            Value::Map(_) => "a mapping".into(),
        }
    }
}

/// Which form the file was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Yaml,
    /// `key.path=value` lines, as `helm --set` takes them.
    SetLines,
}

/// A values file that could not be read, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    /// 0 when the error is about the whole file.
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )?;
        } else {
            write!(f, "{}: {}", self.file, self.message)?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// Parses `text` (the contents of `file`): YAML if it is a YAML mapping,
/// `--set`-style lines if every line that is not blank or a comment is
/// `key=value`.
pub fn parse(text: &str, file: &Path) -> Result<(Node, Format), ParseError> {
    let name = file.display().to_string();
    let err = |line: usize, col: usize, message: String, hint: Option<&str>| ParseError {
        file: name.clone(),
        line,
        col,
        message,
        hint: hint.map(String::from),
    };
    let meaningful: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#') && *l != "---")
        .collect();
    if meaningful.is_empty() {
        return Err(err(
            0,
            0,
            "the file is empty: no values in it (only blank lines or comments)".into(),
            Some(
                "write the Helm values as YAML (key: value), or one --set-style key=value per line",
            ),
        ));
    }
    if meaningful.iter().all(|(_, l)| looks_like_set(l)) {
        return parse_set_lines(text, &name).map(|n| (n, Format::SetLines));
    }
    let mut loader = Loader::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut loader, true) {
        let m = e.marker();
        let hint = if e.info().contains("anchor") {
            "define the anchor (&name) before an alias (*name) uses it"
        } else {
            "check the indentation and the `key: value` form on that line (YAML allows no tabs for indentation)"
        };
        return Err(err(
            m.line(),
            m.col() + 1,
            format!("not YAML: {}", e.info()),
            Some(hint),
        ));
    }
    if let Some(e) = loader.error {
        return Err(ParseError { file: name, ..e });
    }
    let mut docs = loader.docs;
    match docs.len() {
        0 => Err(err(
            0,
            0,
            "the file is empty: no YAML document in it".into(),
            None,
        )),
        1 => {
            let doc = docs.remove(0);
            match &doc.value {
                Value::Map(_) => Ok((doc, Format::Yaml)),
                Value::Null => Err(err(
                    doc.pos.line,
                    doc.pos.col,
                    "the file is empty: its YAML document holds no values".into(),
                    None,
                )),
                _ => Err(err(
                    doc.pos.line,
                    doc.pos.col,
                    format!(
                        "not a values file: the top level is {}, and Helm values are a mapping of keys (`key: value`)",
                        doc.kind()
                    ),
                    Some("write `k8sServiceHost: \"10.1.0.5\"` and the like, one key per line; or --set-style `key.path=value` lines"),
                )),
            }
        }
        _ => {
            let second = &docs[1];
            Err(err(
                second.pos.line,
                second.pos.col,
                "more than one YAML document: Helm reads one values document per file".into(),
                Some("remove the `---` separator, or split the file"),
            ))
        }
    }
}

/// `key.path=value` (a key made of Helm's path characters, then `=`).
fn looks_like_set(line: &str) -> bool {
    let line = line
        .strip_prefix("--set=")
        .or_else(|| line.strip_prefix("--set "))
        .unwrap_or(line)
        .trim_start();
    match line.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && k.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '.' | '_' | '-' | '/' | '[' | ']' | '\\')
                })
        }
        None => false,
    }
}

// --- YAML -------------------------------------------------------------------------

/// Builds nodes from the parser's events; remembers anchors for aliases.
struct Frame {
    node: Node,
    pending: Option<Key>,
    anchor: usize,
    merged: Vec<String>,
}

#[derive(Default)]
struct Loader {
    docs: Vec<Node>,
    /// Open collections: the node, a pending key (mappings), its anchor id,
    /// and the keys a merge key (`<<`) brought in, which the mapping's own keys override.
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    error: Option<ParseError>,
}

fn pos_of(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

impl Loader {
    fn fail(&mut self, pos: Pos, message: String, hint: Option<&str>) {
        if self.error.is_none() {
            self.error = Some(ParseError {
                file: String::new(),
                line: pos.line,
                col: pos.col,
                message,
                hint: hint.map(String::from),
            });
        }
    }

    /// Adds a finished node to whatever is open (or as a document).
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(Frame {
            node: top,
            pending,
            merged,
            ..
        }) = self.stack.last_mut()
        else {
            self.docs.push(node);
            return;
        };
        match &mut top.value {
            Value::List(items) => items.push(node),
            Value::Map(entries) => match pending.take() {
                None => {
                    let name = match &node.value {
                        Value::Str(s) => s.clone(),
                        Value::Null => String::new(),
                        Value::Bool(b) => b.to_string(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        _ => {
                            let p = node.pos;
                            self.fail(
                                p,
                                format!("a mapping key must be a plain value, not {}", node.kind()),
                                None,
                            );
                            return;
                        }
                    };
                    if entries.is_empty() {
                        // A block mapping's start mark is past its first
                        // key; the mapping is where that key is.
                        top.pos = node.pos;
                    }
                    *pending = Some(Key {
                        name,
                        pos: node.pos,
                    });
                }
                Some(key) => {
                    if key.name == "<<" {
                        // A merge key: the entries of the aliased mapping(s)
                        // that this mapping does not set itself.
                        let sources: Vec<Node> = match node.value {
                            Value::Map(_) => vec![node],
                            Value::List(l) => l,
                            _ => {
                                self.fail(
                                    key.pos,
                                    "a merge key (<<) must name a mapping".into(),
                                    None,
                                );
                                return;
                            }
                        };
                        for s in sources {
                            if let Value::Map(src) = s.value {
                                for (k, v) in src {
                                    if !entries.iter().any(|(e, _)| e.name == k.name) {
                                        merged.push(k.name.clone());
                                        entries.push((k, v));
                                    }
                                }
                            }
                        }
                        return;
                    }
                    if let Some(i) = merged.iter().position(|m| *m == key.name) {
                        // The mapping's own key overrides the merged one.
                        merged.remove(i);
                        entries.retain(|(k, _)| k.name != key.name);
                        entries.push((key, node));
                        return;
                    }
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.name == key.name) {
                        let line = first.pos.line;
                        let name = key.name.clone();
                        self.fail(
                            key.pos,
                            format!("duplicate key {name:?} (first set at line {line})"),
                            Some("a mapping may set each key once; remove one of them"),
                        );
                        return;
                    }
                    entries.push((key, node));
                }
            },
            _ => {}
        }
    }
}

fn tag_suffix(tag: &Option<Tag>) -> Option<&str> {
    tag.as_ref()
        .filter(|t| t.handle == "!!" || t.handle == "tag:yaml.org,2002:")
        .map(|t| t.suffix.as_str())
}

impl MarkedEventReceiver for Loader {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = pos_of(&mark);
        match ev {
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                let value = if matches!(ev, Event::MappingStart(..)) {
                    Value::Map(vec![])
                } else {
                    Value::List(vec![])
                };
                self.stack.push(Frame {
                    node: Node { value, pos },
                    pending: None,
                    anchor,
                    merged: vec![],
                })
            }
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some(f) = self.stack.pop() {
                    self.push(f.node, f.anchor);
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = match (style, tag_suffix(&tag)) {
                    (_, Some("str")) => Value::Str(text),
                    (TScalarStyle::Plain, _) => yaml11_plain(&text),
                    _ => Value::Str(text),
                };
                self.push(Node { value, pos }, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut n) => {
                    n.pos = pos;
                    self.push(n, 0);
                }
                None => self.fail(
                    pos,
                    "an alias (*name) to an anchor that is not defined before it".into(),
                    None,
                ),
            },
            _ => {}
        }
    }
}

/// A plain YAML scalar typed as Helm's YAML library (go-yaml v2, YAML 1.1) does.
fn yaml11_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Value::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Value::Bool(false)
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let plain: String = s.chars().filter(|c| *c != '_').collect();
    let (neg, digits) = match plain.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, plain.strip_prefix('+').unwrap_or(&plain)),
    };
    let int = if let Some(h) = digits.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()
    } else if let Some(b) = digits.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()
    } else if digits.len() > 1
        && digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        i64::from_str_radix(&digits[1..], 8).ok()
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse::<i64>().ok()
    } else {
        None
    };
    if let Some(i) = int {
        return Value::Int(if neg { -i } else { i });
    }
    let float_like = !digits.is_empty()
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && digits.bytes().any(|b| b.is_ascii_digit())
        && (digits.contains('.') || digits.contains(['e', 'E']));
    if float_like {
        if let Ok(f) = plain.parse::<f64>() {
            return Value::Float(f);
        }
    }
    Value::Str(s.to_string())
}

// --- --set lines ------------------------------------------------------------------

/// Helm's `strvals` typing of a `--set` value.
fn set_value(s: &str) -> Value {
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ if (s == "0" || (!s.starts_with('0') && !s.starts_with("-0")))
            && s.strip_prefix('-')
                .unwrap_or(s)
                .bytes()
                .all(|b| b.is_ascii_digit())
            && !s.strip_prefix('-').unwrap_or(s).is_empty() =>
        {
            s.parse::<i64>()
                .map(Value::Int)
                .unwrap_or_else(|_| Value::Str(s.into()))
        }
        _ => Value::Str(s.into()),
    }
}

/// Splits on `sep` outside `{...}`, honouring `\` escapes; returns (piece, byte offset).
fn split_outside_braces(s: &str, sep: char) -> Vec<(String, usize)> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some((_, n)) = chars.next() {
                    cur.push(n);
                }
            }
            '{' => {
                depth += 1;
                cur.push(c);
            }
            '}' => {
                depth = depth.saturating_sub(1);
                cur.push(c);
            }
            c if c == sep && depth == 0 => {
                out.push((std::mem::take(&mut cur), start));
                start = i + c.len_utf8();
            }
            c => cur.push(c),
        }
    }
    out.push((cur, start));
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_set_lines(text: &str, file: &str) -> Result<Node, ParseError> {
    let mut root = Node {
        value: Value::Map(vec![]),
        pos: Pos { line: 1, col: 1 },
    };
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.trim() == "---" {
            continue;
        }
        let mut offset = raw.len() - trimmed.len();
        let mut body = trimmed.trim_end();
        for prefix in ["--set=", "--set "] {
            if let Some(rest) = body.strip_prefix(prefix) {
                let rest_t = rest.trim_start();
                offset += prefix.len() + (rest.len() - rest_t.len());
                body = rest_t;
            }
        }
        for (assignment, at) in split_outside_braces(body, ',') {
            let col = offset + at + 1;
            let err = |message: String| ParseError {
                file: file.to_string(),
                line: line_no,
                col,
                message,
                hint: Some(
                    "write key.path=value (lists as key={a,b}, list items as key[0]=value)".into(),
                ),
            };
            if assignment.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = assignment.split_once('=') else {
                return Err(err(format!("{assignment:?} is not key=value")));
            };
            let pos = Pos { line: line_no, col };
            let vpos = Pos {
                line: line_no,
                col: col + key.len() + 1,
            };
            let value_node = if value.starts_with('{') && value.ends_with('}') {
                let inner = &value[1..value.len() - 1];
                let items = if inner.is_empty() {
                    vec![]
                } else {
                    split_outside_braces(inner, ',')
                        .into_iter()
                        .map(|(v, _)| Node {
                            value: set_value(&unescape(&v)),
                            pos: vpos,
                        })
                        .collect()
                };
                Node {
                    value: Value::List(items),
                    pos: vpos,
                }
            } else {
                Node {
                    value: set_value(&unescape(value)),
                    pos: vpos,
                }
            };
            let path = split_key(key).map_err(err)?;
            set_path(&mut root, &path, value_node, pos).map_err(err)?;
        }
    }
    Ok(root)
}

/// One step of a `--set` key: a name, or a list index after it.
enum Step {
    Name(String),
    Index(usize),
}

fn split_key(key: &str) -> Result<Vec<Step>, String> {
    let mut steps = vec![];
    let mut cur = String::new();
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '.' => {
                if !cur.is_empty() {
                    steps.push(Step::Name(std::mem::take(&mut cur)));
                } else if !matches!(steps.last(), Some(Step::Index(_))) {
                    return Err(format!("key {key:?} has an empty part"));
                }
            }
            '[' => {
                if !cur.is_empty() {
                    steps.push(Step::Name(std::mem::take(&mut cur)));
                }
                let mut n = String::new();
                for d in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                    n.push(d);
                }
                let i: usize = n
                    .parse()
                    .ok()
                    .filter(|i| *i < 10_000)
                    .ok_or_else(|| format!("key {key:?}: [{n}] is not a list index"))?;
                steps.push(Step::Index(i));
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        steps.push(Step::Name(cur));
    }
    match steps.first() {
        Some(Step::Name(_)) => Ok(steps),
        _ => Err(format!("key {key:?} does not start with a name")),
    }
}

/// Sets `value` at `path` under `node`, creating mappings and lists on the
/// way (a later line overrides an earlier one, as with repeated `--set`).
fn set_path(node: &mut Node, path: &[Step], value: Node, pos: Pos) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    match first {
        Step::Name(name) => {
            if !matches!(node.value, Value::Map(_)) {
                node.value = Value::Map(vec![]);
            }
            let Value::Map(entries) = &mut node.value else {
                unreachable!("made a mapping above")
            };
            let i = match entries.iter().position(|(k, _)| &k.name == name) {
                Some(i) => i,
                None => {
                    entries.push((
                        Key {
                            name: name.clone(),
                            pos,
                        },
                        Node {
                            value: Value::Null,
                            pos,
                        },
                    ));
                    entries.len() - 1
                }
            };
            entries[i].0.pos = pos;
            set_path(&mut entries[i].1, rest, value, pos)
        }
        Step::Index(i) => {
            if !matches!(node.value, Value::List(_)) {
                node.value = Value::List(vec![]);
            }
            let Value::List(items) = &mut node.value else {
                unreachable!("made a list above")
            };
            while items.len() <= *i {
                items.push(Node {
                    value: Value::Null,
                    pos,
                });
            }
            set_path(&mut items[*i], rest, value, pos)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<(Node, Format), ParseError> {
        parse(text, Path::new("values.yaml"))
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn yaml_keys_and_values_keep_their_lines_and_helms_types() {
        let (n, f) = p("# c\nk8sServiceHost: \"10.1.0.5\"\nk8sServicePort: 6443\nbpf:\n  masquerade: yes\nipam:\n  operator:\n    clusterPoolIPv4PodCIDRList:\n      - \"10.42.0.0/16\"\nMTU: 0x5dc\nname: 0755\nq: '0755'\n").unwrap();
        assert_eq!(f, Format::Yaml);
        let host = n.get("k8sServiceHost").unwrap();
        assert_eq!(host.value, Value::Str("10.1.0.5".into()));
        assert_eq!(host.pos, Pos { line: 2, col: 17 });
        assert_eq!(
            n.key("k8sServicePort").unwrap().pos,
            Pos { line: 3, col: 1 }
        );
        assert_eq!(n.get("k8sServicePort").unwrap().value, Value::Int(6443));
        let m = n.get("bpf").unwrap().get("masquerade").unwrap();
        assert_eq!((m.value.clone(), m.pos.line), (Value::Bool(true), 5));
        let list = n
            .get("ipam")
            .unwrap()
            .get("operator")
            .unwrap()
            .get("clusterPoolIPv4PodCIDRList")
            .unwrap();
        match &list.value {
            Value::List(items) => {
                assert_eq!(items[0].value, Value::Str("10.42.0.0/16".into()));
                assert_eq!(items[0].pos.line, 9);
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(n.get("MTU").unwrap().value, Value::Int(1500));
        assert_eq!(n.get("name").unwrap().value, Value::Int(0o755));
        assert_eq!(n.get("q").unwrap().value, Value::Str("0755".into()));
    }

    #[test]
    fn anchors_aliases_and_merge_keys_resolve() {
        let (n, _) = p("base: &b\n  a: 1\n  c: 2\nother:\n  <<: *b\n  c: 3\nsame: *b\n").unwrap();
        let o = n.get("other").unwrap();
        assert_eq!(o.get("a").unwrap().value, Value::Int(1));
        assert_eq!(o.get("c").unwrap().value, Value::Int(3));
        assert_eq!(
            n.get("same").unwrap().get("c").unwrap().value,
            Value::Int(2)
        );
    }

    #[test]
    fn bad_yaml_is_an_error_at_its_line_and_column() {
        assert_eq!(
            err("k8sServiceHost: \"10.1.0.5\"\nipam:\n  mode: kubernetes\n   operator: {}\n"),
            "values.yaml:4:12: not YAML: mapping values are not allowed in this context\n  \
             hint: check the indentation and the `key: value` form on that line (YAML allows no tabs for indentation)"
        );
        assert_eq!(
            err("a: [1, 2\nb: 3\n"),
            "values.yaml:2:2: not YAML: illegal placement of ':' indicator\n  \
             hint: check the indentation and the `key: value` form on that line (YAML allows no tabs for indentation)"
        );
        assert_eq!(
            err("ipam:\n  mode: kubernetes\nipam:\n  mode: cluster-pool\n"),
            "values.yaml:3:1: duplicate key \"ipam\" (first set at line 1)\n  \
             hint: a mapping may set each key once; remove one of them"
        );
        assert_eq!(
            err("- k8sServiceHost: x\n"),
            "values.yaml:1:1: not a values file: the top level is a list, and Helm values are a mapping of keys (`key: value`)\n  \
             hint: write `k8sServiceHost: \"10.1.0.5\"` and the like, one key per line; or --set-style `key.path=value` lines"
        );
        assert_eq!(
            err("just some words\n"),
            "values.yaml:1:1: not a values file: the top level is a string, and Helm values are a mapping of keys (`key: value`)\n  \
             hint: write `k8sServiceHost: \"10.1.0.5\"` and the like, one key per line; or --set-style `key.path=value` lines"
        );
        assert_eq!(
            err("a: 1\n---\nb: 2\n"),
            "values.yaml:3:1: more than one YAML document: Helm reads one values document per file\n  \
             hint: remove the `---` separator, or split the file"
        );
        assert_eq!(
            err("a: *nope\n"),
            "values.yaml:1:4: not YAML: while parsing node, found unknown anchor\n  \
             hint: define the anchor (&name) before an alias (*name) uses it"
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        for text in ["", "\n\n", "# only a comment\n  # and another\n", "---\n"] {
            assert_eq!(
                err(text),
                "values.yaml: the file is empty: no values in it (only blank lines or comments)\n  \
                 hint: write the Helm values as YAML (key: value), or one --set-style key=value per line",
                "{text:?}"
            );
        }
        assert_eq!(
            err("~\n"),
            "values.yaml:1:1: the file is empty: its YAML document holds no values"
        );
    }

    #[test]
    fn set_lines_build_the_same_tree_typed_as_helm_does() {
        let (n, f) = p("# the runbook, as --set\nk8sServiceHost=10.1.0.5\n--set k8sServicePort=6443\nipam.mode=kubernetes,bpf.masquerade=true\nipam.operator.clusterPoolIPv4PodCIDRList={10.42.0.0/16,10.44.0.0/16}\ntolerations[0].operator=Exists\nnodeSelector.cnishift\\.io/cni=cilium\nMTU=01280\n").unwrap();
        assert_eq!(f, Format::SetLines);
        assert_eq!(
            n.get("k8sServiceHost").unwrap().value,
            Value::Str("10.1.0.5".into())
        );
        let port = n.get("k8sServicePort").unwrap();
        assert_eq!(
            (port.value.clone(), port.pos),
            (Value::Int(6443), Pos { line: 3, col: 22 })
        );
        assert_eq!(
            n.key("k8sServicePort").unwrap().pos,
            Pos { line: 3, col: 7 }
        );
        assert_eq!(
            n.get("ipam").unwrap().get("mode").unwrap().value,
            Value::Str("kubernetes".into())
        );
        let m = n.get("bpf").unwrap().get("masquerade").unwrap();
        assert_eq!((m.value.clone(), m.pos.line), (Value::Bool(true), 4));
        assert_eq!(n.key("bpf").unwrap().pos, Pos { line: 4, col: 22 });
        match &n
            .get("ipam")
            .unwrap()
            .get("operator")
            .unwrap()
            .get("clusterPoolIPv4PodCIDRList")
            .unwrap()
            .value
        {
            Value::List(items) => assert_eq!(items.len(), 2),
            v => panic!("{v:?}"),
        }
        match &n.get("tolerations").unwrap().value {
            Value::List(items) => assert_eq!(
                items[0].get("operator").unwrap().value,
                Value::Str("Exists".into())
            ),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            n.get("nodeSelector")
                .unwrap()
                .get("cnishift.io/cni")
                .unwrap()
                .value,
            Value::Str("cilium".into())
        );
        assert_eq!(
            n.get("MTU").unwrap().value,
            Value::Str("01280".into()),
            "strvals keeps a leading zero a string"
        );
        assert_eq!(
            err("a.b=1\na..b=2\n"),
            "values.yaml:2:1: key \"a..b\" has an empty part\n  \
             hint: write key.path=value (lists as key={a,b}, list items as key[0]=value)"
        );
    }
}
