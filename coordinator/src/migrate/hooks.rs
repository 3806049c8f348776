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

// --- running a hook -------------------------------------------------------------

/// Why a hook failed, with the end of its output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("{argv0} could not be started: {detail}")]
    Spawn { argv0: String, detail: String },
    #[error("{argv0} exited with {status} (log {log}){tail}")]
    Failed {
        argv0: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{argv0} did not finish within {}: its process group was killed (log {log}){tail}", humantime::format_duration(*after))]
    Deadline {
        argv0: String,
        after: std::time::Duration,
        log: String,
        tail: String,
    },
    #[error("the hook's log {log}: {detail}")]
    Log { log: String, detail: String },
}

/// The last few lines of a log, for a failure message.
fn tail_of(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = &lines[lines.len().saturating_sub(3)..];
    if last.is_empty() {
        String::new()
    } else {
        format!(": {}", last.join(" | "))
    }
}

/// Runs `argv` with stdout and stderr appended to `log`, in its own process
/// group. It must exit 0 within `deadline`; at the deadline the whole group
/// (children it spawned included) is killed with SIGKILL. A group left
/// behind by a hook that exited is killed too.
pub async fn run(
    argv: &[String],
    log: &std::path::Path,
    deadline: std::time::Duration,
) -> Result<(), HookError> {
    let argv0 = argv.first().cloned().unwrap_or_default();
    // A path that is not there is said so before anything starts: the
    // operating system's spawn error is the same message, but under some
    // runners (qemu-user) a failed exec shows up only as exit status 127.
    if argv0.contains('/') && std::fs::metadata(&argv0).is_err() {
        return Err(HookError::Spawn {
            argv0: argv0.clone(),
            detail: std::io::Error::from(std::io::ErrorKind::NotFound).to_string(),
        });
    }
    let log_err = |e: std::io::Error| HookError::Log {
        log: log.display().to_string(),
        detail: e.to_string(),
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(log_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    {
        use std::io::Write as _;
        let mut f = &file;
        writeln!(f, "--- cnishift: running {}", argv.join(" ")).map_err(log_err)?;
    }
    let err_file = file.try_clone().map_err(log_err)?;
    let mut cmd = tokio::process::Command::new(&argv0);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(file)
        .stderr(err_file)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| HookError::Spawn {
        argv0: argv0.clone(),
        detail: e.to_string(),
    })?;
    // Killed with its group however this function ends, even when the
    // future is dropped by a caller's deadline.
    struct Group(Option<i32>);
    impl Drop for Group {
        fn drop(&mut self) {
            if let Some(pg) = self.0 {
                // SAFETY: killpg only sends a signal; the group is the child's own.
                unsafe {
                    libc::killpg(pg, libc::SIGKILL);
                }
            }
        }
    }
    let group = Group(child.id().map(|p| p as i32));
    let status = tokio::time::timeout(deadline, child.wait()).await;
    drop(group);
    let logs = log.display().to_string();
    match status {
        Err(_) => {
            let _ = child.wait().await;
            Err(HookError::Deadline {
                argv0,
                after: deadline,
                log: logs,
                tail: tail_of(log),
            })
        }
        Ok(Err(e)) => Err(HookError::Spawn {
            argv0,
            detail: e.to_string(),
        }),
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => {
            use std::os::unix::process::ExitStatusExt as _;
            let status = match (st.code(), st.signal()) {
                (Some(c), _) => format!("status {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => st.to_string(),
            };
            Err(HookError::Failed {
                argv0,
                status,
                log: logs,
                tail: tail_of(log),
            })
        }
    }
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    /// Alive and not a zombie.
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(s) => !s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn success_and_output_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/opi01.deploy.log");
        run(
            &sh("echo switched; echo warn >&2"),
            &log,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("--- cnishift: running sh -c"), "{text}");
        assert!(
            text.contains("switched\n") && text.contains("warn\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_failing_hook_names_its_status_and_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("h.log");
        let e = run(
            &sh("echo copying closure; echo 'error: build failed' >&2; exit 3"),
            &log,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "sh exited with status 3 (log {}): --- cnishift: running sh -c echo copying closure; \
                 echo 'error: build failed' >&2; exit 3 | copying closure | error: build failed",
                log.display()
            )
        );
        let e = run(
            &["/nonexistent/hook".to_string()],
            &log,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, HookError::Spawn { argv0, .. } if argv0 == "/nonexistent/hook"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_hanging_hook_and_its_grandchild_are_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("h.log");
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!(
            "sleep 300 & echo $! > {}; echo waiting; sleep 300",
            pidfile.display()
        );
        let started = Instant::now();
        let e = run(&sh(&script), &log, Duration::from_millis(700))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, HookError::Deadline { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("sh did not finish within 700ms: its process group was killed"),
            "{e}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "the grandchild {pid} survived the deadline");
    }

    #[tokio::test]
    async fn a_grandchild_left_behind_by_a_finished_hook_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; exit 0", pidfile.display());
        run(
            &sh(&script),
            &dir.path().join("h.log"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "the background child {pid} outlived its hook");
    }
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
