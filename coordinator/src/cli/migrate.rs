//! `cnishift plan | migrate | pause | resume | status | rollback | verify`.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cnishift::agents::ClientTls;
use cnishift::inventory::{Inventory, Load, Node};
use cnishift::kube::lease::{self, LockOptions};
use cnishift::kube::Kube;
use cnishift::migrate::journal::{self, Accept, Journal, State};
use cnishift::migrate::live::{pause_value, AgentClients, KubeCluster};
use cnishift::migrate::plan::{self, PlanOptions, Step};
use cnishift::migrate::run::{self, Ctx, Driver, Event, Options, Outcome, Phase};
use cnishift::migrate::steps::{ArmState, Cause, Cluster, Control, K3sNetwork, NodeAgents};

use super::{
    connect, error, exit_for, interrupted, InventoryArg, KubeArgs, Output, EXIT_NOT_READY, EXIT_OK,
};

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    /// Plan without the Cleanup after the last node.
    #[arg(long)]
    pub no_cleanup: bool,
    /// Plan with --no-auto-rollback.
    #[arg(long)]
    pub no_auto_rollback: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args)]
pub struct StateArgs {
    /// Where the journal and the hook logs live (default: $XDG_STATE_HOME/cnishift/<cluster>/).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub state: StateArgs,
    /// Print every action and touch nothing (no journal, no lock, no call).
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the Cleanup of Flannel's leftovers after the last node.
    #[arg(long)]
    pub no_cleanup: bool,
    /// On a failure after Deploy, disarm the agent and leave the node for a person.
    #[arg(long)]
    pub no_auto_rollback: bool,
    /// Resume although the inventory changed since the run began.
    #[arg(long)]
    pub accept_changed_inventory: bool,
    /// Resume although a journal line (not the last) is damaged: that line is dropped.
    #[arg(long)]
    pub accept_damaged_journal: bool,
    /// Set the existing journal aside and start a new run.
    #[arg(long)]
    pub new_run: bool,
    /// Take over the migration lock when its holder stopped renewing it.
    #[arg(long)]
    pub take_over_stale_lock: bool,
    /// Touch the first controller without an etcd snapshot of this run (the
    /// journal records that none was taken). Without it, a controller's agent
    /// must take one first (`cnishift etcd snapshot` does the same by hand).
    #[arg(long)]
    pub skip_etcd_snapshot: bool,
    /// `json`: one event per line (see the README for the schema).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub state: StateArgs,
    /// The node, as named in the inventory.
    #[arg(value_name = "NODE")]
    pub node: String,
    #[arg(long)]
    pub take_over_stale_lock: bool,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Flannel leftovers fail the check (after cleanup) instead of warning.
    #[arg(long)]
    pub after_cleanup: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn load(path: &Path, tls: bool) -> Result<Inventory, ExitCode> {
    Inventory::load(
        path,
        Load {
            require_tls_files: tls,
        },
    )
    .map_err(error)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| error(format!("cannot start the async runtime: {e}")))
}

/// `--state-dir`, else `$XDG_STATE_HOME/cnishift/<cluster>/`, else `~/.local/state/cnishift/<cluster>/`.
pub fn state_dir(arg: &Option<PathBuf>, cluster: &str) -> PathBuf {
    if let Some(d) = arg {
        return d.clone();
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/state")
        });
    base.join("cnishift").join(cluster)
}

fn run_id() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        std::process::id()
    )
}

pub fn run_plan(args: PlanArgs) -> ExitCode {
    let inv = match load(&args.inventory.path, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let p = plan::plan(
        &inv,
        PlanOptions {
            no_cleanup: args.no_cleanup,
            no_auto_rollback: args.no_auto_rollback,
        },
    );
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&p).expect("plan serializes")
        ),
        Output::Table => print!("{}", plan::table(&p)),
    }
    ExitCode::from(EXIT_OK)
}

/// Nothing is called in a dry run; this answers if something were.
struct Untouched;

fn untouched() -> Cause {
    "a dry run touches nothing".into()
}

impl Cluster for Untouched {
    async fn gates(&self, _: &[String]) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn cordon(&self, _: &str) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn drain(&self, _: &str, _: Duration) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn cilium_present(&self) -> Result<bool, Cause> {
        Err(untouched())
    }
    async fn label(&self, _: &str, _: &str, _: &str) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn unlabel(&self, _: &str, _: &str) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn wait_cilium_and_ready(&self, _: &str, _: Duration) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn wait_ready(&self, _: &str, _: Duration) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn repod(&self, _: &str, _: Duration) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn uncordon(&self, _: &str) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn record(&self, _: &str, _: &str, _: bool, _: &str) {}
    async fn control(&self) -> Result<Control, Cause> {
        Ok(Control::Run)
    }
}

impl NodeAgents for Untouched {
    async fn preflight(&self, _: &Node) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn arm(&self, _: &Node, _: &str, _: Duration) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn confirm(&self, _: &Node, _: &str) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn disarm(&self, _: &Node, _: &str) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn arm_state(&self, _: &Node) -> Result<ArmState, Cause> {
        Err(untouched())
    }
    async fn migrated(&self, _: &Node) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn pods_on_cni0(&self, _: &Node) -> Result<u32, Cause> {
        Err(untouched())
    }
    async fn dial(&self, _: &Node, _: std::net::SocketAddr) -> Result<(), Cause> {
        Err(untouched())
    }
    async fn k3s_network(&self, _: &Node) -> Result<K3sNetwork, Cause> {
        Ok(K3sNetwork::Flannel)
    }
    async fn cleanup(&self, _: &Node) -> Result<String, Cause> {
        Err(untouched())
    }
    async fn leftovers(&self, _: &Node) -> Result<Vec<String>, Cause> {
        Err(untouched())
    }
}

/// How events are shown: JSON lines, a progress display on a terminal, or plain lines.
struct Display {
    output: Output,
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: usize,
}

impl Display {
    fn new(output: Output, total: usize) -> Display {
        let bar = (matches!(output, Output::Table) && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{pos}/{len} nodes [{elapsed}] {wide_msg}")
                    .expect("template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Display {
            output,
            bar,
            total,
            done: 0,
        }
    }

    fn show(&mut self, e: &Event) {
        if let Output::Json = self.output {
            println!("{}", serde_json::to_string(e).expect("events serialize"));
            return;
        }
        let node = e.node.as_deref().unwrap_or("cluster");
        let deadline = e
            .deadline_ms
            .map(|d| {
                format!(
                    " / {}",
                    humantime::format_duration(Duration::from_millis(d))
                )
            })
            .unwrap_or_default();
        if e.step == Step::Done.name() && e.phase == Phase::Done {
            self.done += 1;
        }
        let line = match e.phase {
            Phase::Started => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("{node}: {} (deadline{deadline})", e.step));
                }
                return;
            }
            Phase::Done => format!(
                "✓ {node:<12} {:<18} {:>7}ms  {}",
                e.step, e.elapsed_ms, e.detail
            ),
            Phase::Failed => format!(
                "✗ {node:<12} {:<18} {:>7}ms  {}",
                e.step, e.elapsed_ms, e.detail
            ),
            Phase::Halted => return,
            Phase::DryRun => format!(
                "· {node:<12} {:<18} {:>9}  {}",
                e.step,
                deadline.trim_start_matches(" / "),
                e.detail
            ),
            _ => format!("  {node:<12} {:<18} {:?}: {}", e.step, e.phase, e.detail),
        };
        match &self.bar {
            Some(b) => {
                b.set_position(self.done.min(self.total) as u64);
                b.println(line);
            }
            None => println!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn commands(args_path: &Path, state: &Option<PathBuf>) -> (String, String) {
    let inv = args_path.display();
    let sd = state
        .as_ref()
        .map(|d| format!(" --state-dir {}", d.display()))
        .unwrap_or_default();
    (
        format!("cnishift migrate -i {inv}{sd}"),
        format!("cnishift rollback -i {inv}{sd}"),
    )
}

pub fn run_migrate(args: MigrateArgs) -> ExitCode {
    let inv = match load(&args.inventory.path, !args.dry_run) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let dir = state_dir(&args.state.state_dir, &inv.cluster.name);
    let (resume, rollback) = commands(&args.inventory.path, &args.state.state_dir);
    let opts = Options {
        dry_run: args.dry_run,
        no_cleanup: args.no_cleanup,
        no_auto_rollback: args.no_auto_rollback,
        poll: Duration::from_millis(500),
        log_dir: dir.join("logs"),
        resume_command: resume,
        rollback_command: rollback,
        skip_etcd_snapshot: args.skip_etcd_snapshot,
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    let mut display = Display::new(args.output, inv.nodes.len());
    if args.dry_run {
        let state = match journal::read(&dir.join(journal::FILE)) {
            Ok(r) => State::fold(&r.records),
            Err(_) => State::default(),
        };
        let mut sink = |e: &Event| display.show(e);
        cnishift::migrate::prerun::dry_run(&inv, &state, &dir, &mut sink);
        let mut d = Driver {
            ctx: Ctx {
                inv: &inv,
                cluster: &Untouched,
                agents: &Untouched,
                opts: &opts,
                run: "dry-run".into(),
            },
            journal: None,
            state,
            sink: &mut sink,
        };
        let out = rt.block_on(d.run());
        display.finish();
        return match out {
            Outcome::Completed => ExitCode::from(EXIT_OK),
            Outcome::Halted(h) => {
                eprint!("cnishift: {h}");
                ExitCode::from(EXIT_NOT_READY)
            }
        };
    }
    let tls = match ClientTls::load(&inv.tls) {
        Ok(t) => t,
        Err(e) => return error(e),
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(c) => return c,
        };
        let identity = lease::default_identity();
        let mut lo = LockOptions::new(identity.clone());
        lo.take_over_stale = args.take_over_stale_lock;
        lo.ttl = inv.deadlines.lock_ttl;
        let guard = match kube.acquire_lock(&lo).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("cnishift: {e}");
                return ExitCode::from(exit_for(&e));
            }
        };
        let accept = Accept {
            damaged: args.accept_damaged_journal,
            changed_inventory: args.accept_changed_inventory,
            new_run: args.new_run,
        };
        let mut j = match Journal::open(&dir, &inv, accept, &run_id()) {
            Ok(j) => j,
            Err(e) => {
                let _ = guard.release().await;
                return error(e);
            }
        };
        for n in &j.notes {
            eprintln!("cnishift: {n}");
        }
        let mut state = j.state();
        {
            // The values gate and the backup, before the first step.
            let mut sink = |e: &Event| display.show(e);
            if let Err(h) = cnishift::migrate::prerun::before_nodes(
                &kube,
                &inv,
                &tls,
                &mut j,
                &state,
                &dir,
                &opts.resume_command,
                &mut sink,
            )
            .await
            {
                display.finish();
                let _ = guard.release().await;
                eprint!("cnishift: {h}");
                return ExitCode::from(EXIT_NOT_READY);
            }
            state = j.state();
        }
        let run = j.run.clone();
        let cluster = KubeCluster {
            kube: &kube,
            inv: &inv,
            guard: Some(&guard),
            identity: identity.clone(),
        };
        let agents = AgentClients::new(&tls, &inv);
        let mut sink = |e: &Event| display.show(e);
        let out = {
            let mut d = Driver {
                ctx: Ctx {
                    inv: &inv,
                    cluster: &cluster,
                    agents: &agents,
                    opts: &opts,
                    run,
                },
                journal: Some(&mut j),
                state,
                sink: &mut sink,
            };
            tokio::select! {
                o = d.run() => Some(o),
                _ = interrupted() => None,
            }
        };
        display.finish();
        let released = guard.release().await;
        let code = match out {
            Some(Outcome::Completed) => {
                eprintln!("cnishift: every node of {} is migrated", inv.cluster.name);
                EXIT_OK
            }
            Some(Outcome::Halted(h)) => {
                eprint!("cnishift: {h}");
                EXIT_NOT_READY
            }
            None => {
                eprintln!(
                    "cnishift: interrupted: the step in progress is journaled as begun and is done again on resume: {}",
                    opts.resume_command
                );
                EXIT_NOT_READY
            }
        };
        if let Err(e) = released {
            eprintln!("cnishift: releasing the migration lock: {e}");
        }
        ExitCode::from(code)
    })
}

pub fn run_pause(args: PauseArgs, pause: bool) -> ExitCode {
    let inv = match load(&args.inventory.path, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(c) => return c,
        };
        let by = pause.then(pause_value);
        match kube.set_paused(lease::NAMESPACE, lease::NAME, by).await {
            Ok(()) => {
                println!(
                    "{}",
                    if pause {
                        "paused: the run stops before its next step (cnishift resume goes on)"
                    } else {
                        "resumed: the run goes on at its next step"
                    }
                );
                ExitCode::from(EXIT_OK)
            }
            Err(e) if e.code() == Some(404) => {
                eprintln!("cnishift: {e}");
                ExitCode::from(EXIT_NOT_READY)
            }
            Err(e) => error(e),
        }
    })
}

/// What `migrate` would do next, from the journal.
pub fn next_action(inv: &Inventory, state: &State) -> String {
    let mut p = plan::plan(inv, PlanOptions::default());
    plan::stranded_first(&mut p, &run::stranded(state), inv.migrate.max_unavailable);
    for w in &p.waves {
        for n in &w.nodes {
            let s = state.nodes.get(&n.name);
            if let Some(step) = Step::ALL
                .into_iter()
                .find(|st| !s.is_some_and(|s| s.done.contains(st.name())))
            {
                return format!("{} {} ", n.name, step.name())
                    .trim_end()
                    .to_string();
            }
        }
    }
    for a in p.after {
        if !state.cluster.done.contains(a.name()) {
            return a.name().to_string();
        }
    }
    "nothing: the run is complete".into()
}

async fn kube_facts(kube: &Kube, inv: &Inventory, node: &str) -> serde_json::Value {
    use k8s_openapi::api::core::v1::Node as KNode;
    let api: kube::Api<KNode> = kube::Api::all(kube.client.clone());
    let n = kube.call(format!("get node {node}"), api.get(node)).await;
    let cilium = kube
        .wait_cilium_ready(
            node,
            &inv.cluster.cilium_namespace,
            Duration::from_millis(300),
        )
        .await;
    match n {
        Err(e) => serde_json::json!({"error": e.to_string()}),
        Ok(n) => serde_json::json!({
            "ready": cnishift::kube::nodes::node_ready(&n).is_ok(),
            "cordoned": n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
            "labelled": inv.cilium.node_label.as_ref().map(|(k, v)| {
                n.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
            }),
            "cilium_pod_ready": cilium.is_ok(),
        }),
    }
}

/// The network k3s runs on the node, in its agent's words (`k3s.network`).
fn k3s_word(n: &Result<K3sNetwork, Cause>) -> &'static str {
    match n {
        Ok(K3sNetwork::Flannel) => "flannel",
        Ok(K3sNetwork::NoFlannel) => "none",
        Ok(K3sNetwork::Unknown(_)) | Err(_) => "?",
    }
}

pub fn run_status(args: StatusArgs) -> ExitCode {
    let inv = match load(&args.inventory.path, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let dir = state_dir(&args.state.state_dir, &inv.cluster.name);
    let read = journal::read(&dir.join(journal::FILE));
    let (state, notes, run) = match &read {
        Ok(r) => (
            State::fold(&r.records),
            r.notes.clone(),
            r.records.first().and_then(|h| match h {
                journal::Record::Header { run, .. } => Some(run.clone()),
                _ => None,
            }),
        ),
        Err(_) => (State::default(), vec![], None),
    };
    let tls = ClientTls::load(&inv.tls).ok();
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(c) => return c,
        };
        let agents = tls.as_ref().map(|t| AgentClients::new(t, &inv));
        let mut rows = vec![];
        for n in &inv.nodes {
            let js = state.nodes.get(&n.name);
            let journal_step = match js {
                None => "not started".to_string(),
                Some(s) if s.done.contains("done") => "done".into(),
                Some(s) => match (&s.failed, &s.in_flight) {
                    (Some((st, _)), _) if st == journal::WATCH => {
                        "no Flannel before its turn".to_string()
                    }
                    (Some((st, _)), _) => format!("failed at {st}"),
                    (None, Some(st)) => format!("in {st}"),
                    _ => format!("{} steps done", s.done.len()),
                },
            };
            // The agent's dead-man state: a sentence for a person, its
            // fields for automation (`{"state": "armed", "remaining_ms": ...}`,
            // or `{"state": "unknown", "error": ...}` when it cannot be asked).
            let (arm, arm_json, k3s) = match &agents {
                None => {
                    let e = "no TLS files: the agents cannot be asked".to_string();
                    let j = serde_json::json!({"state": "unknown", "error": e});
                    (format!("unknown ({e})"), j, "?")
                }
                Some(a) => {
                    let (arm, arm_json) = match a.arm_state(n).await {
                        Ok(s) => (
                            s.to_string(),
                            serde_json::to_value(&s).expect("arm state serializes"),
                        ),
                        Err(e) => (
                            format!("unknown (cannot ask its agent: {e})"),
                            serde_json::json!({"state": "unknown", "error": e}),
                        ),
                    };
                    (arm, arm_json, k3s_word(&a.k3s_network(n).await))
                }
            };
            rows.push(serde_json::json!({
                "node": n.name,
                "role": n.role,
                "journal": journal_step,
                "live": kube_facts(&kube, &inv, &n.name).await,
                "arm": arm,
                "arm_state": arm_json,
                "k3s": k3s,
            }));
        }
        let next = next_action(&inv, &state);
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "cluster": inv.cluster.name, "run": run, "journal": dir.join(journal::FILE),
                    "notes": notes, "nodes": rows, "next": next,
                }))
                .expect("serializes")
            ),
            Output::Table => {
                println!(
                    "cluster {} — run {} — journal {}",
                    inv.cluster.name,
                    run.as_deref().unwrap_or("none"),
                    dir.join(journal::FILE).display()
                );
                for n in &notes {
                    println!("! {n}");
                }
                println!(
                    "{:<12} {:<10} {:<26} {:<6} {:<9} {:<8} {:<7} {:<8} ARM",
                    "NODE", "ROLE", "JOURNAL", "READY", "CORDONED", "LABEL", "CILIUM", "K3S"
                );
                for r in &rows {
                    let live = &r["live"];
                    let b = |v: &serde_json::Value| match v.as_bool() {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "-",
                    };
                    println!(
                        "{:<12} {:<10} {:<26} {:<6} {:<9} {:<8} {:<7} {:<8} {}",
                        r["node"].as_str().unwrap_or(""),
                        r["role"].as_str().unwrap_or(""),
                        r["journal"].as_str().unwrap_or(""),
                        b(&live["ready"]),
                        b(&live["cordoned"]),
                        b(&live["labelled"]),
                        b(&live["cilium_pod_ready"]),
                        r["k3s"].as_str().unwrap_or("?"),
                        r["arm"].as_str().unwrap_or("")
                    );
                }
                println!("next: {next}");
            }
        }
        ExitCode::from(EXIT_OK)
    })
}

pub fn run_rollback(args: RollbackArgs) -> ExitCode {
    let inv = match load(&args.inventory.path, false) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let Some(node) = inv.node(&args.node).cloned() else {
        return error(format!(
            "{:?} is not in {}; only nodes of the inventory are touched",
            args.node,
            inv.path.display()
        ));
    };
    if inv.hooks.rollback.is_none() {
        return error(format!(
            "{}: [hooks] rollback is not set: nothing would switch {} back to Flannel",
            inv.path.display(),
            node.name
        ));
    }
    let dir = state_dir(&args.state.state_dir, &inv.cluster.name);
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(c) => return c,
        };
        let identity = lease::default_identity();
        let mut lo = LockOptions::new(identity.clone());
        lo.take_over_stale = args.take_over_stale_lock;
        lo.ttl = inv.deadlines.lock_ttl;
        let guard = match kube.acquire_lock(&lo).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("cnishift: {e}");
                return ExitCode::from(exit_for(&e));
            }
        };
        let mut j = match Journal::open(
            &dir,
            &inv,
            Accept {
                changed_inventory: true,
                ..Default::default()
            },
            &run_id(),
        ) {
            Ok(j) => j,
            Err(e) => {
                let _ = guard.release().await;
                return error(e);
            }
        };
        let cluster = KubeCluster {
            kube: &kube,
            inv: &inv,
            guard: Some(&guard),
            identity,
        };
        let (resume, rollback) = commands(&args.inventory.path, &args.state.state_dir);
        let opts = Options {
            dry_run: false,
            no_cleanup: false,
            no_auto_rollback: false,
            poll: Duration::from_millis(500),
            log_dir: dir.join("logs"),
            resume_command: resume,
            rollback_command: rollback,
            skip_etcd_snapshot: false,
        };
        let r = run::rollback_node(&inv, &cluster, &opts, &mut j, &node, &mut |e| {
            println!("{} {:<10} {:?} {}", node.name, e.step, e.phase, e.detail)
        })
        .await;
        let _ = guard.release().await;
        match r {
            Ok(()) => {
                println!("{} is back on Flannel", node.name);
                ExitCode::from(EXIT_OK)
            }
            Err(cause) => {
                eprintln!("cnishift: rollback of {} failed: {cause}", node.name);
                ExitCode::from(EXIT_NOT_READY)
            }
        }
    })
}

pub fn run_verify(args: VerifyArgs) -> ExitCode {
    let inv = match load(&args.inventory.path, true) {
        Ok(i) => i,
        Err(c) => return c,
    };
    let tls = match ClientTls::load(&inv.tls) {
        Ok(t) => t,
        Err(e) => return error(e),
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(c) => return c,
        };
        let agents = AgentClients::new(&tls, &inv);
        let checks =
            cnishift::migrate::live::verify_cluster(&inv, &kube, &agents, args.after_cleanup).await;
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&checks).expect("serializes")
            ),
            Output::Table => {
                for c in &checks {
                    println!("{} {:<28} {}", c.verdict.mark(), c.id, c.message);
                }
            }
        }
        let failed = checks
            .iter()
            .any(|c| c.verdict == cnishift::migrate::live::CheckVerdict::Fail);
        ExitCode::from(if failed { EXIT_NOT_READY } else { EXIT_OK })
    })
}
