//! The journal: append-only JSON lines in the state directory. A header
//! (cluster, run id, inventory digest, version), then for every step an
//! *intent* record, written and fsync'd before the step's side effect starts,
//! and a *done* or *failed* record after it. Every line carries a checksum of
//! its record:
//!
//! ```text
//! {"sum":"<16 hex digits: FNV-1a 64 of REC>","rec":REC}
//! ```
//!
//! Reading it back: a torn last line (the coordinator killed mid-write) is
//! reported and dropped, and its step is done again; a bad line anywhere
//! else, a journal of another cluster, or an inventory changed since the run
//! began are refused, with what differs and the flag that accepts it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;

pub const FILE: &str = "journal.jsonl";
/// The "step" of a worker the early-restart watch found without Flannel
/// before its turn: journaled as that worker's failure, so a resume knows
/// the run halted on it (and migrates it first of the workers).
pub const WATCH: &str = "watch";

/// One line's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Record {
    Header {
        cluster: String,
        run: String,
        inventory_digest: String,
        /// The inventory as the run began, to say what changed since.
        inventory: serde_json::Value,
        version: String,
        time: String,
    },
    /// `--accept-changed-inventory`: the run goes on with this inventory.
    InventoryAccepted {
        inventory_digest: String,
        inventory: serde_json::Value,
        differences: Vec<String>,
        time: String,
    },
    /// Written before the step's side effect. `node` is absent for the
    /// cluster steps (verify-cluster, cleanup).
    Intent {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        step: String,
        time: String,
    },
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        step: String,
        time: String,
        detail: String,
    },
    Failed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        step: String,
        time: String,
        cause: String,
    },
    /// The node is back on Flannel (its agent's dead-man rollback, or
    /// `cnishift rollback`): its migration starts over.
    RolledBack {
        node: String,
        time: String,
        outcome: String,
    },
}

/// FNV-1a, 64 bits: enough to tell a damaged line from a good one.
pub fn checksum(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn encode(rec: &Record) -> String {
    let r = serde_json::to_string(rec).expect("records serialize");
    format!("{{\"sum\":\"{}\",\"rec\":{r}}}\n", checksum(r.as_bytes()))
}

fn decode(line: &str) -> Result<Record, String> {
    const HEAD: &str = "{\"sum\":\"";
    let rest = line
        .strip_prefix(HEAD)
        .ok_or("it does not start with {\"sum\":\"")?;
    let (sum, rest) = rest.split_at_checked(16).ok_or("it is too short")?;
    let rec = rest
        .strip_prefix("\",\"rec\":")
        .and_then(|r| r.strip_suffix('}'))
        .ok_or("it is not {\"sum\":…,\"rec\":…}")?;
    if checksum(rec.as_bytes()) != sum {
        return Err(format!(
            "its checksum is {sum} but its record sums to {}",
            checksum(rec.as_bytes())
        ));
    }
    serde_json::from_str(rec).map_err(|e| format!("its record does not parse: {e}"))
}

/// The inventory as the journal keeps it: everything but where the file is.
pub fn inventory_value(inv: &Inventory) -> serde_json::Value {
    let mut v = serde_json::to_value(inv).expect("the inventory serializes");
    if let Some(m) = v.as_object_mut() {
        m.remove("path");
    }
    v
}

pub fn digest(v: &serde_json::Value) -> String {
    checksum(v.to_string().as_bytes())
}

/// Where two inventories differ, as `path: old → new`.
pub fn differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: String, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            (Array(x), Array(y)) if x.len() == y.len() => {
                for (i, (a, b)) in x.iter().zip(y).enumerate() {
                    walk(format!("{path}[{i}]"), a, b, out);
                }
            }
            (a, b) if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = vec![];
    walk(String::new(), old, new, &mut out);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("journal {path}: {detail}")]
    Io { path: String, detail: String },
    #[error(
        "journal {path}: line {line} is damaged ({why}); nothing was done. \
             Look at it; --accept-damaged-journal drops that line and resumes without it"
    )]
    Damaged {
        path: String,
        line: usize,
        why: String,
    },
    #[error(
        "journal {path} has no header line; it is not a cnishift journal. \
             Use another --state-dir, or --new-run to set it aside and start over"
    )]
    NoHeader { path: String },
    #[error("journal {path} is of cluster {journal:?} (run {run}), the inventory is of cluster {inventory:?}; \
             nothing was done. Use that cluster's --state-dir, or --new-run to set this journal aside and start over")]
    OtherCluster {
        path: String,
        journal: String,
        run: String,
        inventory: String,
    },
    #[error("the inventory changed since run {run} began (journal {path}); nothing was done:\n{}\n\
             Restore it, or pass --accept-changed-inventory to go on with the new one",
             .differences.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    InventoryChanged {
        path: String,
        run: String,
        differences: Vec<String>,
    },
}

/// What `open` may accept instead of refusing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accept {
    pub damaged: bool,
    pub changed_inventory: bool,
    /// Set an existing journal aside (renamed with its run id) and start a new run.
    pub new_run: bool,
}

/// One node's steps as the journal tells them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeState {
    pub done: BTreeSet<String>,
    /// The step with an intent but no outcome (the coordinator stopped in it).
    pub in_flight: Option<String>,
    pub failed: Option<(String, String)>,
    pub rolled_back: Option<String>,
    /// The last step with a record, for status.
    pub last: Option<String>,
    /// The early-restart watch halted the run on this worker (its agent's
    /// words): it came up without Flannel before its turn. Kept once its
    /// migration has begun, so that every later resume keeps it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stranded: Option<String>,
}

/// Everything the journal says, folded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct State {
    pub nodes: BTreeMap<String, NodeState>,
    /// Cluster steps (no node).
    pub cluster: NodeState,
}

impl State {
    pub fn fold(records: &[Record]) -> State {
        let mut s = State::default();
        for r in records {
            match r {
                Record::Intent { node, step, .. } => {
                    let n = s.entry(node.as_ref());
                    n.in_flight = Some(step.clone());
                    n.last = Some(step.clone());
                }
                Record::Done { node, step, .. } => {
                    let n = s.entry(node.as_ref());
                    n.done.insert(step.clone());
                    n.in_flight = None;
                    n.failed = None;
                }
                Record::Failed {
                    node, step, cause, ..
                } => {
                    let n = s.entry(node.as_ref());
                    if step == WATCH {
                        n.stranded = Some(cause.clone());
                    }
                    n.failed = Some((step.clone(), cause.clone()));
                    n.done.remove(step);
                    n.in_flight = None;
                }
                Record::RolledBack { node, outcome, .. } => {
                    let n = s.entry(Some(node));
                    n.done.clear();
                    n.rolled_back = Some(outcome.clone());
                    n.last = Some("rolled-back".into());
                }
                Record::Header { .. } | Record::InventoryAccepted { .. } => {}
            }
        }
        s
    }

    fn entry(&mut self, node: Option<&String>) -> &mut NodeState {
        match node {
            Some(n) => self.nodes.entry(n.clone()).or_default(),
            None => &mut self.cluster,
        }
    }
}

/// The journal file, open for appending.
pub struct Journal {
    path: PathBuf,
    file: File,
    pub run: String,
    pub records: Vec<Record>,
    /// Said once when opening: a torn line dropped, a damaged line accepted.
    pub notes: Vec<String>,
    /// Whether this opened an existing run.
    pub resumed: bool,
}

/// A journal read without opening it for writing (`cnishift status`).
pub struct Read {
    pub records: Vec<Record>,
    pub notes: Vec<String>,
    /// Byte length of the good prefix (a torn last line is after it).
    good_len: usize,
    damaged: Vec<(usize, String)>,
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Reads and checks every line; damaged lines are collected, not fatal here.
pub fn read(path: &Path) -> Result<Read, JournalError> {
    let io = |e: std::io::Error| JournalError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let text = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8_lossy(&text);
    let mut out = Read {
        records: vec![],
        notes: vec![],
        good_len: 0,
        damaged: vec![],
    };
    let mut offset = 0;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let complete = raw.ends_with('\n');
        match decode(raw.trim_end_matches('\n')) {
            Ok(r) if complete => {
                out.records.push(r);
                offset += raw.len();
                out.good_len = offset;
            }
            Ok(_) | Err(_) if last => {
                let why = match decode(raw.trim_end_matches('\n')) {
                    Err(e) => e,
                    Ok(_) => "it has no newline".into(),
                };
                out.notes.push(format!(
                    "journal {}: the last line ({}) was torn — the coordinator stopped while writing it ({why}); \
                     it was dropped and its step is done again",
                    path.display(),
                    i + 1
                ));
            }
            Ok(_) => unreachable!("only the last line can lack a newline"),
            Err(why) => {
                out.damaged.push((i + 1, why));
                offset += raw.len();
                out.good_len = offset;
            }
        }
    }
    Ok(out)
}

/// The kill tests' hook, compiled only with the `test-hooks` feature (the
/// tests' build; never `cargo build`/`cargo install`, and
/// tests/tests/coordinator_hooks.rs checks that a build without it neither
/// names nor obeys the variable). `CNISHIFT_TEST_KILL_AFTER_RECORDS=N`: the
/// process SIGKILLs itself right after the Nth journal record it wrote (the
/// header counts) is on disk, so a test can stop the coordinator exactly at a
/// step boundary — after an intent, before its side effect; after an
/// outcome, before the next step — and prove that the resumed run is right.
/// Here, in the one write path, because a boundary *is* a durable record.
mod test_hook {
    #[cfg(feature = "test-hooks")]
    pub fn record_durable() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static WRITTEN: AtomicU64 = AtomicU64::new(0);
        let n = WRITTEN.fetch_add(1, Ordering::SeqCst) + 1;
        let kill_at = std::env::var("CNISHIFT_TEST_KILL_AFTER_RECORDS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if kill_at == Some(n) {
            // SAFETY: kill(2) of this very process; SIGKILL cannot be caught,
            // so nothing after this line runs: exactly a `kill -9`.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    #[cfg(not(feature = "test-hooks"))]
    #[inline(always)]
    pub fn record_durable() {}
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Journal {
    /// Opens the journal in `dir` for `inv`, starting a run (`new_run_id`)
    /// when there is none; see the module documentation for what is refused.
    pub fn open(
        dir: &Path,
        inv: &Inventory,
        accept: Accept,
        new_run_id: &str,
    ) -> Result<Journal, JournalError> {
        let path = dir.join(FILE);
        let ps = path.display().to_string();
        let io = |e: std::io::Error| JournalError::Io {
            path: ps.clone(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let inventory = inventory_value(inv);
        let digest_now = digest(&inventory);
        if path.exists() && accept.new_run {
            let old = read(&path).ok().and_then(|r| match r.records.first() {
                Some(Record::Header { run, .. }) => Some(run.clone()),
                _ => None,
            });
            let aside = dir.join(format!(
                "journal.{}.jsonl",
                old.unwrap_or_else(|| "unknown".into())
            ));
            std::fs::rename(&path, &aside).map_err(io)?;
        }
        if !path.exists() {
            let header = Record::Header {
                cluster: inv.cluster.name.clone(),
                run: new_run_id.to_string(),
                inventory_digest: digest_now,
                inventory,
                version: env!("CARGO_PKG_VERSION").to_string(),
                time: now(),
            };
            let mut file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            file.write_all(encode(&header).as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(dir);
            test_hook::record_durable();
            return Ok(Journal {
                path,
                file,
                run: new_run_id.to_string(),
                records: vec![header],
                notes: vec![],
                resumed: false,
            });
        }
        let mut r = read(&path)?;
        if let Some((line, why)) = r.damaged.first() {
            if !accept.damaged {
                return Err(JournalError::Damaged {
                    path: ps,
                    line: *line,
                    why: why.clone(),
                });
            }
            for (line, why) in &r.damaged {
                r.notes.push(format!(
                    "journal {ps}: line {line} was damaged ({why}) and is ignored (--accept-damaged-journal)"
                ));
            }
        }
        let (cluster, run, mut digest_then, mut inv_then) = match r.records.first() {
            Some(Record::Header {
                cluster,
                run,
                inventory_digest,
                inventory,
                ..
            }) => (
                cluster.clone(),
                run.clone(),
                inventory_digest.clone(),
                inventory.clone(),
            ),
            _ => return Err(JournalError::NoHeader { path: ps }),
        };
        if cluster != inv.cluster.name {
            return Err(JournalError::OtherCluster {
                path: ps,
                journal: cluster,
                run,
                inventory: inv.cluster.name.clone(),
            });
        }
        for rec in &r.records {
            if let Record::InventoryAccepted {
                inventory_digest,
                inventory,
                ..
            } = rec
            {
                digest_then = inventory_digest.clone();
                inv_then = inventory.clone();
            }
        }
        // Drop a torn tail before appending after it.
        let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
        file.set_len(r.good_len as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        let mut j = Journal {
            path,
            file,
            run: run.clone(),
            records: r.records,
            notes: r.notes,
            resumed: true,
        };
        if digest_then != digest_now {
            let differences = differences(&inv_then, &inventory);
            if !accept.changed_inventory {
                return Err(JournalError::InventoryChanged {
                    path: ps,
                    run,
                    differences,
                });
            }
            j.notes.push(format!(
                "the inventory changed since run {run} began; going on with the new one (--accept-changed-inventory): {}",
                differences.join("; ")
            ));
            j.append(Record::InventoryAccepted {
                inventory_digest: digest_now,
                inventory,
                differences,
                time: now(),
            })
            .map_err(io)?;
        }
        Ok(j)
    }

    /// Appends one record and fsyncs it before returning: an intent is on
    /// disk before its side effect starts.
    pub fn append(&mut self, rec: Record) -> std::io::Result<()> {
        self.file.write_all(encode(&rec).as_bytes())?;
        self.file.sync_data()?;
        self.records.push(rec);
        test_hook::record_durable();
        Ok(())
    }

    pub fn state(&self) -> State {
        State::fold(&self.records)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Load;

    fn inv(name: &str, addr: &str) -> Inventory {
        let text = format!(
            "[cluster]\nname = \"{name}\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[nodes]]\nname = \"opi01\"\nrole = \"controller\"\naddress = \"{addr}\"\n"
        );
        Inventory::parse(&text, Path::new("/x/cluster.toml"), Load::default()).unwrap()
    }

    fn intent(node: &str, step: &str) -> Record {
        Record::Intent {
            node: Some(node.into()),
            step: step.into(),
            time: "t".into(),
        }
    }

    fn done(node: &str, step: &str) -> Record {
        Record::Done {
            node: Some(node.into()),
            step: step.into(),
            time: "t".into(),
            detail: "ok".into(),
        }
    }

    #[test]
    fn a_new_journal_has_a_header_and_resumes_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let i = inv("lab", "10.1.0.11:7443");
        let mut j = Journal::open(dir.path(), &i, Accept::default(), "run-1").unwrap();
        assert!(!j.resumed);
        j.append(intent("opi01", "cordon")).unwrap();
        j.append(done("opi01", "cordon")).unwrap();
        j.append(intent("opi01", "drain")).unwrap();
        drop(j);
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("{\"sum\":\"")
                && first
                    .contains("\"rec\":{\"type\":\"header\",\"cluster\":\"lab\",\"run\":\"run-1\""),
            "{first}"
        );
        let j = Journal::open(dir.path(), &i, Accept::default(), "run-2").unwrap();
        assert!(j.resumed && j.notes.is_empty());
        assert_eq!(j.run, "run-1", "the run goes on under its own id");
        let s = j.state();
        let n = &s.nodes["opi01"];
        assert!(n.done.contains("cordon"));
        assert_eq!(n.in_flight.as_deref(), Some("drain"));
    }

    #[test]
    fn a_torn_last_line_is_reported_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let i = inv("lab", "10.1.0.11:7443");
        let mut j = Journal::open(dir.path(), &i, Accept::default(), "r").unwrap();
        j.append(intent("opi01", "cordon")).unwrap();
        drop(j);
        let path = dir.path().join(FILE);
        let good = std::fs::read(&path).unwrap();
        let line = encode(&done("opi01", "cordon"));
        let mut torn = good.clone();
        torn.extend_from_slice(&line.as_bytes()[..line.len() / 2]);
        std::fs::write(&path, &torn).unwrap();
        let mut j = Journal::open(dir.path(), &i, Accept::default(), "r").unwrap();
        assert_eq!(j.notes.len(), 1);
        assert!(
            j.notes[0].contains("the last line (3) was torn")
                && j.notes[0].contains("its step is done again"),
            "{}",
            j.notes[0]
        );
        assert_eq!(
            j.state().nodes["opi01"].in_flight.as_deref(),
            Some("cordon")
        );
        assert_eq!(std::fs::read(&path).unwrap(), good, "the torn tail is cut");
        j.append(done("opi01", "cordon")).unwrap();
        drop(j);
        let j = Journal::open(dir.path(), &i, Accept::default(), "r").unwrap();
        assert!(j.notes.is_empty());
        assert!(j.state().nodes["opi01"].done.contains("cordon"));
    }

    #[test]
    fn a_bad_line_elsewhere_is_refused_unless_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let i = inv("lab", "10.1.0.11:7443");
        let mut j = Journal::open(dir.path(), &i, Accept::default(), "r").unwrap();
        j.append(intent("opi01", "cordon")).unwrap();
        j.append(done("opi01", "cordon")).unwrap();
        drop(j);
        let path = dir.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let bad = text.replacen("\"step\":\"cordon\"", "\"step\":\"uncordon\"", 1);
        std::fs::write(&path, &bad).unwrap();
        let e = Journal::open(dir.path(), &i, Accept::default(), "r")
            .err()
            .unwrap();
        let JournalError::Damaged { line, ref why, .. } = e else {
            panic!("{e}")
        };
        assert_eq!(line, 2);
        assert!(why.starts_with("its checksum is "), "{why}");
        assert!(
            e.to_string()
                .ends_with("--accept-damaged-journal drops that line and resumes without it"),
            "{e}"
        );
        let j = Journal::open(
            dir.path(),
            &i,
            Accept {
                damaged: true,
                ..Default::default()
            },
            "r",
        )
        .unwrap();
        assert!(j.notes[0].contains("line 2 was damaged"), "{:?}", j.notes);
        assert!(j.state().nodes["opi01"].done.contains("cordon"));
        assert_eq!(j.state().nodes["opi01"].in_flight, None);
        // Garbage that is not even a record.
        std::fs::write(
            &path,
            format!(
                "{}not json\n{}",
                text.lines().next().unwrap().to_owned() + "\n",
                encode(&done("opi01", "x"))
            ),
        )
        .unwrap();
        let e = Journal::open(dir.path(), &i, Accept::default(), "r")
            .err()
            .unwrap();
        assert!(
            matches!(&e, JournalError::Damaged { line: 2, why, .. } if why == "it does not start with {\"sum\":\""),
            "{e}"
        );
    }

    #[test]
    fn a_journal_of_another_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Journal::open(
            dir.path(),
            &inv("lab", "10.1.0.11:7443"),
            Accept::default(),
            "r1",
        )
        .unwrap();
        let e = Journal::open(
            dir.path(),
            &inv("avalanche", "10.1.0.11:7443"),
            Accept::default(),
            "r2",
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "journal {} is of cluster \"lab\" (run r1), the inventory is of cluster \"avalanche\"; nothing was done. \
                 Use that cluster's --state-dir, or --new-run to set this journal aside and start over",
                dir.path().join(FILE).display()
            )
        );
        let j = Journal::open(
            dir.path(),
            &inv("avalanche", "10.1.0.11:7443"),
            Accept {
                new_run: true,
                ..Default::default()
            },
            "r2",
        )
        .unwrap();
        assert!(!j.resumed && j.run == "r2");
        assert!(
            dir.path().join("journal.r1.jsonl").exists(),
            "set aside, not deleted"
        );
    }

    #[test]
    fn a_changed_inventory_is_refused_with_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        Journal::open(
            dir.path(),
            &inv("lab", "10.1.0.11:7443"),
            Accept::default(),
            "r1",
        )
        .unwrap();
        let changed = inv("lab", "10.1.0.99:7443");
        let e = Journal::open(dir.path(), &changed, Accept::default(), "r2")
            .err()
            .unwrap();
        assert_eq!(
            e,
            JournalError::InventoryChanged {
                path: dir.path().join(FILE).display().to_string(),
                run: "r1".into(),
                differences: vec![
                    "nodes[0].address: \"10.1.0.11:7443\" → \"10.1.0.99:7443\"".into()
                ],
            }
        );
        assert!(
            e.to_string()
                .ends_with("pass --accept-changed-inventory to go on with the new one"),
            "{e}"
        );
        let accept = Accept {
            changed_inventory: true,
            ..Default::default()
        };
        let j = Journal::open(dir.path(), &changed, accept, "r2").unwrap();
        assert!(
            j.notes[0].contains("going on with the new one"),
            "{:?}",
            j.notes
        );
        drop(j);
        // Accepted once, it is the run's inventory from then on.
        Journal::open(dir.path(), &changed, Accept::default(), "r3").unwrap();
    }

    #[test]
    fn state_folds_failures_and_rollbacks() {
        let s = State::fold(&[
            done("n", "cordon"),
            intent("n", "deploy"),
            Record::Failed {
                node: Some("n".into()),
                step: "deploy".into(),
                time: "t".into(),
                cause: "exit 1".into(),
            },
            Record::RolledBack {
                node: "n".into(),
                time: "t".into(),
                outcome: "rolled back by its agent".into(),
            },
            Record::Done {
                node: None,
                step: "verify-cluster".into(),
                time: "t".into(),
                detail: String::new(),
            },
        ]);
        let n = &s.nodes["n"];
        assert!(n.done.is_empty() && n.in_flight.is_none());
        assert_eq!(n.failed.as_ref().unwrap().0, "deploy");
        assert!(n.rolled_back.is_some());
        assert!(s.cluster.done.contains("verify-cluster"));
    }
}
