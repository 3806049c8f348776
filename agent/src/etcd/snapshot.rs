//! A named etcd snapshot, taken before the migration touches the first
//! controller: the agent runs its *own* configured command (the caller sends
//! only the run id, which becomes part of the name), bounded by a deadline
//! after which its whole process group is killed, and then finds the file the
//! command wrote under `/var/lib/rancher/k3s/server/db/snapshots` — k3s appends
//! the node name and a timestamp to the name it is given
//! (`cnishift-pre-<run>-<node>-<unix seconds>`), so the file is looked for,
//! not assumed. A command that fails, hangs, or exits 0 without writing a
//! file is an error that says so; there is no silent skip.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::SNAPSHOT_DIR;
use crate::host::HostPaths;

/// What k3s's own CLI does on a k3s server (`k3s etcd-snapshot save`
/// talks to the local member with k3s's certificates and writes into
/// `${data-dir}/server/db/snapshots`).
pub const DEFAULT_COMMAND: &str = "k3s etcd-snapshot save --name cnishift-pre-{run}";
/// The placeholders a snapshot command may use.
pub const PLACEHOLDERS: &[&str] = &["{run}", "{node}"];
/// The longest a snapshot may take unless the agent is told otherwise
/// (`--etcd-snapshot-timeout`); a caller may ask for less, never more.
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(600);
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of the command's output a result or an error quotes.
const TAIL_BYTES: usize = 1024;

/// Why a snapshot was not taken; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request is wrong (run id, timeout).
    #[error("{0}")]
    Invalid(String),
    /// The node cannot (no embedded etcd) or another snapshot is running.
    #[error("{0}")]
    State(String),
    /// The command failed, hung, or wrote nothing.
    #[error("{0}")]
    Failed(String),
}

/// The snapshot's configuration (from `serve`'s flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub host: HostPaths,
    pub node: String,
    /// The command template, checked by [`parse_template`] at start-up.
    pub template: String,
    /// The longest one snapshot may take.
    pub max_timeout: Duration,
    /// The command's output goes to `<state_dir>/etcd-snapshot-<run>.log`.
    pub state_dir: PathBuf,
}

/// A snapshot taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Taken {
    /// As a path on the node.
    pub path: String,
    pub size_bytes: u64,
    pub command: String,
    pub elapsed_ms: u64,
    pub output_tail: String,
}

/// Checks a command template: shell words, only known placeholders. The
/// agent refuses to start with a bad one rather than fail when the
/// migration needs the snapshot.
pub fn parse_template(template: &str) -> Result<Vec<String>, String> {
    let words = shlex::split(template)
        .ok_or_else(|| format!("etcd snapshot command {template:?}: unbalanced quotes"))?;
    if words.is_empty() {
        return Err("the etcd snapshot command is empty".into());
    }
    for w in &words {
        let mut rest = w.as_str();
        while let Some(start) = rest.find('{') {
            let Some(len) = rest[start..].find('}') else {
                return Err(format!(
                    "etcd snapshot command {template:?}: unclosed '{{' in {w:?}"
                ));
            };
            let ph = &rest[start..start + len + 1];
            if !PLACEHOLDERS.contains(&ph) {
                return Err(format!(
                    "etcd snapshot command {template:?}: unknown placeholder {ph}; known: {}",
                    PLACEHOLDERS.join(", ")
                ));
            }
            rest = &rest[start + len + 1..];
        }
    }
    Ok(words)
}

/// One snapshot at a time per agent; a second request while one runs is
/// refused, not queued (the first one's outcome is what the caller needs).
pub struct Snapshotter {
    cfg: Config,
    /// The run whose snapshot is being taken, if any.
    running: Arc<Mutex<Option<String>>>,
}

/// Clears [`Snapshotter::running`] when the snapshot ends, however it ends.
struct Busy(Arc<Mutex<Option<String>>>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Snapshotter {
    pub fn new(cfg: Config) -> Result<Arc<Snapshotter>, String> {
        parse_template(&cfg.template)?;
        Ok(Arc::new(Snapshotter {
            cfg,
            running: Arc::new(Mutex::new(None)),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Takes the snapshot of `run` within `timeout` (zero: the agent's bound).
    /// The command runs on a task of its own, so a caller that hangs up does
    /// not cut it short (its deadline still does).
    pub async fn take(self: &Arc<Self>, run: &str, timeout: Duration) -> Result<Taken, Refused> {
        crate::rollback::check_run_id(run).map_err(|e| Refused::Invalid(e.to_string()))?;
        let timeout = match timeout {
            Duration::ZERO => self.cfg.max_timeout,
            t if t < MIN_TIMEOUT => {
                return Err(Refused::Invalid(format!(
                    "timeout {} is below the 1 s minimum",
                    humantime::format_duration(t)
                )))
            }
            t if t > self.cfg.max_timeout => {
                return Err(Refused::Invalid(format!(
                    "timeout {} is over this agent's bound of {} (--etcd-snapshot-timeout)",
                    humantime::format_duration(t),
                    humantime::format_duration(self.cfg.max_timeout)
                )))
            }
            t => t,
        };
        super::presence(&self.cfg.host)
            .map_err(|why| Refused::State(format!("{why}: there is no etcd to snapshot here")))?;
        let guard = {
            let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = r.as_ref() {
                return Err(Refused::State(format!(
                    "a snapshot (run {other}) is being taken; ask again when it is done"
                )));
            }
            *r = Some(run.to_string());
            Busy(self.running.clone())
        };
        let me = self.clone();
        let run = run.to_string();
        tokio::spawn(async move {
            let _held = guard;
            me.run(&run, timeout).await
        })
        .await
        .map_err(|e| Refused::Failed(format!("the snapshot task failed: {e}")))?
    }

    async fn run(&self, run: &str, timeout: Duration) -> Result<Taken, Refused> {
        let words = parse_template(&self.cfg.template).map_err(Refused::Invalid)?;
        let argv: Vec<String> = words
            .iter()
            .map(|w| w.replace("{run}", run).replace("{node}", &self.cfg.node))
            .collect();
        let by_run = self.cfg.template.contains("{run}");
        let command = argv.join(" ");
        let log = self.cfg.state_dir.join(format!("etcd-snapshot-{run}.log"));
        let _ = fs::remove_file(&log);
        let wall_start = SystemTime::now();
        let started = Instant::now();
        tracing::info!(run, %command, "taking an etcd snapshot");
        let result = crate::rollback::run_action(&argv, &log, timeout).await;
        let output_tail = tail(&log);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let with_output = |msg: String| {
            if output_tail.trim().is_empty() {
                msg
            } else {
                format!("{msg}; its output ends: {}", output_tail.trim())
            }
        };
        if let Err(e) = result {
            tracing::error!(run, "etcd snapshot failed: {e}");
            return Err(Refused::Failed(with_output(format!(
                "the etcd snapshot command {e}"
            ))));
        }
        let found = newest_since(&self.cfg.host, wall_start, by_run.then_some(run))
            .map_err(|e| Refused::Failed(with_output(e)))?;
        let Some((name, size)) = found else {
            return Err(Refused::Failed(with_output(format!(
                "`{command}` exited 0 but no new file{} appeared in /{SNAPSHOT_DIR} \
                 (does k3s write its snapshots elsewhere, --etcd-snapshot-dir?)",
                if by_run {
                    format!(" named after the run ({run})")
                } else {
                    String::new()
                }
            ))));
        };
        let path = format!("/{SNAPSHOT_DIR}/{name}");
        if size == 0 {
            return Err(Refused::Failed(with_output(format!(
                "`{command}` wrote {path}, but it is empty"
            ))));
        }
        tracing::info!(run, %path, size, elapsed_ms, "etcd snapshot taken");
        Ok(Taken {
            path,
            size_bytes: size,
            command,
            elapsed_ms,
            output_tail,
        })
    }
}

/// The newest regular file in the snapshot directory modified since
/// `since` (a second's slack for coarse file-system clocks), whose name
/// contains `run` when given: `(name, size)`.
fn newest_since(
    host: &HostPaths,
    since: SystemTime,
    run: Option<&str>,
) -> Result<Option<(String, u64)>, String> {
    let dir = host.path(SNAPSHOT_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the command exited 0 but /{SNAPSHOT_DIR} does not exist"
            ))
        }
        Err(e) => return Err(format!("/{SNAPSHOT_DIR} cannot be listed: {e}")),
    };
    let since = since - Duration::from_secs(1);
    let mut best: Option<(SystemTime, String, u64)> = None;
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if run.is_some_and(|r| !name.contains(r)) {
            continue;
        }
        let Ok(mtime) = meta.modified() else { continue };
        if mtime < since {
            continue;
        }
        if best.as_ref().is_none_or(|(t, _, _)| mtime > *t) {
            best = Some((mtime, name, meta.len()));
        }
    }
    Ok(best.map(|(_, n, s)| (n, s)))
}

fn tail(path: &std::path::Path) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server node's tree with k3s's etcd directory, and a snapshotter
    /// running `template` there.
    fn node(template: &str, max: Duration) -> (tempfile::TempDir, Arc<Snapshotter>) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join(super::super::TLS_DIR)).unwrap();
        fs::create_dir_all(d.path().join(SNAPSHOT_DIR)).unwrap();
        fs::create_dir_all(d.path().join("state")).unwrap();
        let template = template.replace("@ROOT@", &d.path().display().to_string());
        let s = Snapshotter::new(Config {
            host: HostPaths::new(d.path()).unwrap(),
            node: "opi01".into(),
            template,
            max_timeout: max,
            state_dir: d.path().join("state"),
        })
        .unwrap();
        (d, s)
    }

    const WRITES: &str = "sh -c 'printf snapshot-bytes > \"$0/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-$1-$2-1767225600\"' @ROOT@ {run} {node}";

    #[test]
    fn templates_with_unknown_placeholders_or_bad_quotes_are_refused() {
        assert_eq!(
            parse_template("k3s etcd-snapshot save --name {runid}").unwrap_err(),
            "etcd snapshot command \"k3s etcd-snapshot save --name {runid}\": unknown placeholder {runid}; known: {run}, {node}"
        );
        assert!(parse_template("sh -c 'x")
            .unwrap_err()
            .contains("unbalanced quotes"));
        assert_eq!(
            parse_template(" ").unwrap_err(),
            "the etcd snapshot command is empty"
        );
        assert_eq!(
            parse_template(DEFAULT_COMMAND).unwrap(),
            vec![
                "k3s",
                "etcd-snapshot",
                "save",
                "--name",
                "cnishift-pre-{run}"
            ]
        );
    }

    #[tokio::test]
    async fn the_file_the_command_wrote_is_found_with_its_size() {
        let (_d, s) = node(WRITES, Duration::from_secs(10));
        let t = s.take("run-1", Duration::ZERO).await.unwrap();
        assert_eq!(
            t.path,
            "/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-run-1-opi01-1767225600"
        );
        assert_eq!(t.size_bytes, "snapshot-bytes".len() as u64);
        assert!(t.command.starts_with("sh -c "), "{}", t.command);
        assert!(t.command.ends_with(" run-1 opi01"), "{}", t.command);
    }

    #[tokio::test]
    async fn hostile_run_ids_and_timeouts_are_refused_before_anything_runs() {
        let (d, s) = node(WRITES, Duration::from_secs(10));
        for bad in ["../x", "a/b", "..", ".hidden", "", "a b", "x;rm -rf /"] {
            let e = s.take(bad, Duration::ZERO).await.unwrap_err();
            assert!(matches!(e, Refused::Invalid(_)), "{bad:?}: {e}");
        }
        let e = s.take("r", Duration::from_secs(11)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "timeout 11s is over this agent's bound of 10s (--etcd-snapshot-timeout)"
        );
        assert!(matches!(
            s.take("r", Duration::from_millis(10)).await,
            Err(Refused::Invalid(_))
        ));
        let left: Vec<_> = fs::read_dir(d.path().join(SNAPSHOT_DIR)).unwrap().collect();
        assert!(left.is_empty(), "nothing ran: {left:?}");
    }

    #[tokio::test]
    async fn a_failing_command_is_an_error_with_its_exit_status_and_output() {
        let (_d, s) = node(
            "sh -c 'echo \"etcd-snapshot: context deadline exceeded\" >&2; exit 3'",
            Duration::from_secs(10),
        );
        let e = s.take("r1", Duration::ZERO).await.unwrap_err();
        let Refused::Failed(m) = &e else {
            panic!("{e:?}")
        };
        assert!(m.starts_with("the etcd snapshot command `sh -c "), "{m}");
        assert!(
            m.ends_with("exited 3; its output ends: etcd-snapshot: context deadline exceeded"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_with_its_process_group_at_the_deadline() {
        let (d, s) = node(
            "sh -c 'sleep 30 & echo $! > \"$0/state/child.pid\"; sleep 30' @ROOT@",
            Duration::from_secs(10),
        );
        let started = Instant::now();
        let e = s.take("r1", Duration::from_secs(1)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(4), "bounded");
        assert!(
            e.to_string().contains("did not finish within 1s; killed"),
            "{e}"
        );
        // The background child of the command is gone too (its group was killed).
        let pid: i32 = fs::read_to_string(d.path().join("state/child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
        {
            assert!(
                Instant::now() < deadline,
                "the command's child {pid} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn exit_0_without_a_new_file_or_with_an_empty_one_is_an_error() {
        let (_d, s) = node("true", Duration::from_secs(10));
        let e = s.take("r1", Duration::ZERO).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "`true` exited 0 but no new file appeared in /var/lib/rancher/k3s/server/db/snapshots (does k3s write its snapshots elsewhere, --etcd-snapshot-dir?)"
        );
        // A file of another run does not count when the command names the run.
        let (d, s) = node("true {run}", Duration::from_secs(10));
        fs::write(
            d.path()
                .join(SNAPSHOT_DIR)
                .join("cnishift-pre-other-opi01-1"),
            "x",
        )
        .unwrap();
        let e = s.take("r1", Duration::ZERO).await.unwrap_err();
        assert!(e.to_string().contains("named after the run (r1)"), "{e}");
        let (_d, s) = node(
            "sh -c ': > \"$0/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-$1-opi01-1\"' @ROOT@ {run}",
            Duration::from_secs(10),
        );
        let e = s.take("r1", Duration::ZERO).await.unwrap_err();
        assert!(e.to_string().ends_with("but it is empty"), "{e}");
    }

    #[tokio::test]
    async fn no_embedded_etcd_means_no_snapshot_and_one_snapshot_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(Config {
            host: HostPaths::new(d.path()).unwrap(),
            node: "raccoon00".into(),
            template: "true".into(),
            max_timeout: Duration::from_secs(5),
            state_dir: d.path().into(),
        })
        .unwrap();
        let e = s.take("r1", Duration::ZERO).await.unwrap_err();
        assert!(
            matches!(&e, Refused::State(m) if m.starts_with("no embedded etcd on this node") && m.ends_with("there is no etcd to snapshot here")),
            "{e:?}"
        );
        let (_d, s) = node("sleep 1", Duration::from_secs(10));
        let first = tokio::spawn({
            let s = s.clone();
            async move { s.take("r1", Duration::ZERO).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = s.take("r2", Duration::ZERO).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "a snapshot (run r1) is being taken; ask again when it is done"
        );
        let _ = first.await.unwrap();
        // Done (here: no file), the next may run.
        assert!(!s
            .take("r3", Duration::ZERO)
            .await
            .unwrap_err()
            .to_string()
            .contains("being taken"));
    }
}
