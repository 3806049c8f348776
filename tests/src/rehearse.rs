//! `cnishift-lab rehearse`: the whole migration on this machine, with the
//! real binaries and the user's own inventory — `up`, then the real
//! `cnishift` from this machine's namespace: `preflight` → `migrate` (its
//! cleanup phase included) → `verify`, then a summary per node.
//!
//! The rehearsal drives the programs exactly as a person would (processes,
//! the lab's cluster.toml and kubeconfig); nothing here reaches into the
//! lab's internals, so what passes here is what `cnishift` itself saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cluster::binary;

/// One node's line of the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSummary {
    pub node: String,
    pub role: String,
    /// Step → milliseconds, in the order they ran.
    pub steps: Vec<(String, u64)>,
    /// The steps' own times, added up.
    pub total_ms: u64,
    /// From the node's first step starting to its last outcome, as the
    /// rehearsal saw the events: the steps plus what the coordinator did
    /// between them (boundary checks, journal, Events).
    pub wall_ms: u64,
    /// "migrated", or "failed at STEP: cause", or "not started".
    pub outcome: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub dir: String,
    pub up_ms: u64,
    pub preflight: Stage,
    pub migrate: Stage,
    pub verify: Stage,
    pub nodes: Vec<NodeSummary>,
    /// Cluster-wide steps (verify-cluster, cleanup) → milliseconds.
    pub cluster_steps: Vec<(String, u64)>,
    pub total_ms: u64,
    /// Where the run halted, in cnishift's words.
    pub halted: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stage {
    pub ran: bool,
    pub exit_code: Option<i32>,
    pub ms: u64,
}

pub struct Options {
    pub inventory: PathBuf,
    pub dir: Option<PathBuf>,
    pub faults: Vec<String>,
    pub keep: bool,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Roles by node, in inventory order, from the lab's cluster.toml.
fn roles(cluster_toml: &Path) -> Result<Vec<(String, String)>> {
    let t: toml::Table = toml::from_str(&std::fs::read_to_string(cluster_toml)?)?;
    Ok(t.get("nodes")
        .and_then(|n| n.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|n| {
                    Some((
                        n.get("name")?.as_str()?.to_string(),
                        n.get("role")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

fn cnishift(dir: &Path) -> Result<Command> {
    let mut c = Command::new(binary("cnishift", "CNISHIFT_BIN")?);
    c.env("CNISHIFT_INVENTORY", dir.join("cluster.toml"))
        .env("KUBECONFIG", dir.join("kubeconfig"));
    Ok(c)
}

/// Runs the rehearsal; the caller prints the summary. The lab is torn down
/// at the end unless `keep`.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Summary> {
    let tmp;
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("cnishift-rehearse-")
                .tempdir()?
                .keep();
            tmp.join("lab")
        }
    };
    let mut s = Summary {
        dir: dir.display().to_string(),
        ..Default::default()
    };
    let started = Instant::now();
    let lab = std::env::current_exe()?;
    let mut up = Command::new(&lab);
    up.arg("up")
        .arg("-i")
        .arg(&opts.inventory)
        .arg("--dir")
        .arg(&dir);
    for f in &opts.faults {
        up.args(["--fault", f]);
    }
    progress(&format!(
        "cnishift-lab up -i {} --dir {}",
        opts.inventory.display(),
        dir.display()
    ));
    let out = up.output().context("starting cnishift-lab up")?;
    s.up_ms = ms(started.elapsed());
    if !out.status.success() {
        anyhow::bail!(
            "cnishift-lab up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let result = (|| -> Result<()> {
        let order = roles(&dir.join("cluster.toml"))?;
        let mut by_node: BTreeMap<String, NodeSummary> = order
            .iter()
            .map(|(n, r)| {
                (
                    n.clone(),
                    NodeSummary {
                        node: n.clone(),
                        role: r.clone(),
                        outcome: "not started".into(),
                        ..Default::default()
                    },
                )
            })
            .collect();

        progress("cnishift preflight");
        let t = Instant::now();
        let pf = cnishift(&dir)?.args(["preflight", "--cluster"]).output()?;
        s.preflight = Stage {
            ran: true,
            exit_code: pf.status.code(),
            ms: ms(t.elapsed()),
        };
        if !pf.status.success() {
            s.halted = Some(format!(
                "preflight: not ready\n{}",
                String::from_utf8_lossy(&pf.stdout)
            ));
            s.nodes = order.iter().map(|(n, _)| by_node[n].clone()).collect();
            return Ok(());
        }

        progress("cnishift migrate");
        let t = Instant::now();
        let mut child = cnishift(&dir)?
            .args(["migrate", "-o", "json", "--state-dir"])
            .arg(dir.join("migrate-state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut v = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut v);
            v
        });
        let mut spans: BTreeMap<String, (Instant, Instant)> = BTreeMap::new();
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            let line = line?;
            let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let step = e["step"].as_str().unwrap_or("").to_string();
            let phase = e["phase"].as_str().unwrap_or("");
            let elapsed = e["elapsed_ms"].as_u64().unwrap_or(0);
            match e["node"].as_str() {
                Some(node) => {
                    let Some(n) = by_node.get_mut(node) else {
                        continue;
                    };
                    if phase != "note" {
                        let now = Instant::now();
                        let span = spans.entry(node.to_string()).or_insert((now, now));
                        span.1 = now;
                        n.wall_ms = ms(span.1.duration_since(span.0));
                    }
                    match phase {
                        // The dead-man rollback after a failure is reported
                        // beside the failure, never instead of it.
                        "started" if step == "rollback" => {
                            progress(&format!("{node}: waiting for its agent's rollback"));
                        }
                        "done" | "failed" if step == "rollback" => {
                            let said = e["detail"].as_str().unwrap_or("");
                            n.steps.push((step.clone(), elapsed));
                            n.total_ms += elapsed;
                            n.outcome = if phase == "done" {
                                format!("{}; rolled back by its agent", n.outcome)
                            } else {
                                format!("{}; its agent's rollback failed: {said}", n.outcome)
                            };
                        }
                        "started" => {
                            n.outcome = format!("in {step}");
                            progress(&format!("{node}: {step}"));
                        }
                        "done" => {
                            n.steps.push((step.clone(), elapsed));
                            n.total_ms += elapsed;
                            if step == "done" {
                                n.outcome = "migrated".into();
                            }
                        }
                        "failed" => {
                            n.steps.push((step.clone(), elapsed));
                            n.total_ms += elapsed;
                            n.outcome =
                                format!("failed at {step}: {}", e["detail"].as_str().unwrap_or(""));
                        }
                        _ => {}
                    }
                }
                None if phase == "done" || phase == "failed" => {
                    s.cluster_steps.push((step, elapsed));
                }
                None => {}
            }
        }
        let status = child.wait()?;
        let stderr = err_reader.join().unwrap_or_default();
        s.migrate = Stage {
            ran: true,
            exit_code: status.code(),
            ms: ms(t.elapsed()),
        };
        s.nodes = order.iter().map(|(n, _)| by_node[n].clone()).collect();
        if !status.success() {
            s.halted = Some(stderr.trim().to_string());
            return Ok(());
        }

        progress("cnishift verify");
        let t = Instant::now();
        let v = cnishift(&dir)?.arg("verify").output()?;
        s.verify = Stage {
            ran: true,
            exit_code: v.status.code(),
            ms: ms(t.elapsed()),
        };
        if !v.status.success() {
            s.halted = Some(format!(
                "verify failed:\n{}",
                String::from_utf8_lossy(&v.stdout)
            ));
        }
        Ok(())
    })();
    s.total_ms = ms(started.elapsed());
    s.ok = result.is_ok()
        && s.halted.is_none()
        && [&s.preflight, &s.migrate, &s.verify]
            .iter()
            .all(|st| st.ran && st.exit_code == Some(0));
    if !opts.keep {
        let _ = Command::new(&lab)
            .arg("down")
            .arg("--dir")
            .arg(&dir)
            .output();
    }
    result?;
    Ok(s)
}

/// The summary as a table: one line per node, then the totals.
pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    fn short(step: &str) -> &str {
        match step {
            "wait-cilium-ready" => "wait",
            "arm-rollback" => "arm",
            other => other,
        }
    }
    out.push_str(&format!(
        "{:<12} {:<10} {:>8}  {:<40} steps (ms)\n",
        "NODE", "ROLE", "TOTAL", "OUTCOME"
    ));
    for n in &s.nodes {
        let steps: Vec<String> = n
            .steps
            .iter()
            .filter(|(st, _)| st != "done")
            .map(|(st, m)| format!("{}={m}", short(st)))
            .collect();
        let mut outcome = n.outcome.clone();
        if outcome.len() > 40 {
            outcome.truncate(39);
            outcome.push('…');
        }
        out.push_str(&format!(
            "{:<12} {:<10} {:>6.1} s  {:<40} {}\n",
            n.node,
            n.role,
            n.wall_ms as f64 / 1000.0,
            outcome,
            steps.join(" ")
        ));
    }
    for (st, m) in &s.cluster_steps {
        out.push_str(&format!(
            "{:<12} {:<10} {:>6.1} s  {}\n",
            "cluster",
            "",
            *m as f64 / 1000.0,
            st
        ));
    }
    let stage = |name: &str, st: &Stage| {
        if st.ran {
            format!(
                "{name} {:.1} s (exit {})",
                st.ms as f64 / 1000.0,
                st.exit_code.unwrap_or(-1)
            )
        } else {
            format!("{name} not run")
        }
    };
    out.push_str(&format!(
        "\nup {:.1} s · {} · {} · {} · total {:.1} s\n",
        s.up_ms as f64 / 1000.0,
        stage("preflight", &s.preflight),
        stage("migrate", &s.migrate),
        stage("verify", &s.verify),
        s.total_ms as f64 / 1000.0
    ));
    let migrated = s.nodes.iter().filter(|n| n.outcome == "migrated").count();
    if s.ok {
        out.push_str(&format!(
            "rehearsal passed: {migrated}/{} nodes migrated, verified and clean\n",
            s.nodes.len()
        ));
    } else {
        out.push_str(&format!(
            "rehearsal FAILED: {migrated}/{} nodes migrated\n",
            s.nodes.len()
        ));
        if let Some(h) = &s.halted {
            out.push_str(h);
            out.push('\n');
        }
    }
    out
}
