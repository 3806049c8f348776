//! `cnishift-agent`: the command line. Everything it does lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cnishift_agent::host::HostPaths;
use cnishift_agent::{cleanup, etcd, policy, remediate, render, report, rollback, server, tls};

/// Exit codes (also in the README).
const EXIT_READY: u8 = 0;
const EXIT_NOT_READY: u8 = 1;
const EXIT_AGENT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "cnishift-agent",
    version,
    about = "Per-node agent for moving a k3s cluster from Flannel to Cilium",
    long_about = "Checks, on this node's real kernel, everything Cilium needs and everything Flannel \
                  left behind, and reports it.\n\nLogs go to stderr; set RUST_LOG=debug for more.",
    after_help = "Exit codes: 0 ready (no check failed), 1 not ready, 2 the agent itself could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is this node ready for Cilium, and what of Flannel is left on it?
    #[command(
        after_help = "Examples:\n  cnishift-agent report                 # grouped table\n  \
                      cnishift-agent report --all           # include passing checks\n  \
                      cnishift-agent report -o json | jq '.checks[] | select(.verdict==\"fail\")'\n  \
                      cnishift-agent report --host-root /srv/lab/node1 --no-live-probes\n\n\
                      Exit codes: 0 ready, 1 not ready (a check failed), 2 the agent could not run."
    )]
    Report(ReportArgs),
    /// Serve the report (and, to the coordinator only, the changing RPCs) over mutual-TLS gRPC.
    #[command(
        after_help = "Example:\n  cnishift-agent serve --listen 0.0.0.0:7443 --tls-ca /run/credentials/ca.pem \\\n    \
                      --tls-cert /run/credentials/node.pem --tls-key /run/credentials/node-key.pem\n\n\
                      There is no plaintext mode. Clients must present a certificate signed by --tls-ca.\n\
                      The certificate files are re-read when they change; SIGTERM stops gracefully.\n\
                      Exit codes: 0 stopped by a signal, 2 could not start (the message says why)."
    )]
    Serve(Box<ServeArgs>),
    /// Set the sysctls the report flags and load missing loadable modules (dry run by default).
    Remediate(RemediateArgs),
    /// Remove what Flannel left on this node (dry run by default; --apply does it, with backups).
    #[command(
        after_help = "What it removes is fixed in the agent: the veths on cni0, cni0, flannel.1, flannel-v6.1,\n\
                            flannel-wg, flannel-wg-v6 (their routes go with them); 10-flannel.conflist in both CNI\n\
                            directories, k3s's flannel/net-conf.json, /run/flannel, /var/lib/cni/networks/cbr0,\n\
                            /var/lib/cni/flannel; FLANNEL-* iptables chains (and KUBE-ROUTER-* when k3s's policy\n\
                            controller is disabled). Every file is backed up first: `cnishift-agent restore ID`.\n\n\
                            It refuses while Flannel is still the active CNI. --force overrides only 'pods still on\n\
                            cni0' and 'Cilium not present yet'.\n\n\
                            Exit codes: 0 nothing refused (plan) / every item removed (--apply), 1 refused or an\n\
                            item failed, 2 could not run."
    )]
    Cleanup(CleanupArgs),
    /// Put back the files of a cleanup backup (`cnishift-agent cleanup --apply` prints its id).
    Restore(RestoreArgs),
    /// The dead-man rollback's state, read from disk (works while `serve` is down).
    #[command(
        after_help = "Exit codes: 0 shown (nothing failed), 1 the last rollback failed or was interrupted, 2 unreadable state."
    )]
    ArmState(ArmStateArgs),
}

#[derive(clap::Args)]
struct ArmStateArgs {
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cnishift-agent")]
    state_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// Perform the plan (default: only print it).
    #[arg(long)]
    apply: bool,
    /// Override the overridable interlocks (pods still on cni0, Cilium not present yet).
    #[arg(long)]
    force: bool,
    /// Where backups and the cleanup journal are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cnishift-agent")]
    state_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The backup id.
    id: String,
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cnishift-agent")]
    state_dir: PathBuf,
    /// Restore under DIR instead of `/`.
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
}

#[derive(clap::Args)]
struct HostArgs {
    /// Read every file from under DIR instead of `/` (a lab node, a fixture tree).
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
    /// Skip the syscall, netlink and iptables probes (for pure fixture trees);
    /// the report lists what was skipped, and those checks are warnings.
    #[arg(long)]
    no_live_probes: bool,
    /// The node name to report (default: the host root's /etc/hostname, else the hostname).
    #[arg(long)]
    node_name: Option<String>,
}

impl HostArgs {
    fn options(&self) -> Result<report::Options, String> {
        let host = HostPaths::new(&self.host_root)?;
        let node_name = self
            .node_name
            .clone()
            .unwrap_or_else(|| report::default_node_name(&host));
        Ok(report::Options {
            host,
            live: !self.no_live_probes,
            node_name,
        })
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:7443")]
    listen: std::net::SocketAddr,
    /// The cluster CA (PEM): client certificates must be signed by it.
    #[arg(long, value_name = "FILE")]
    tls_ca: PathBuf,
    /// This agent's certificate (PEM); its SANs must include the node name.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// This agent's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// The certificate identity (SAN) allowed to call changing RPCs.
    #[arg(long, default_value = "cnishift-coordinator")]
    coordinator_identity: String,
    /// Where the agent keeps its state (backups, journals, the rollback switch).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/cnishift-agent")]
    state_dir: PathBuf,
    /// How often to look for rotated certificate files.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    reload_interval: std::time::Duration,
    /// What the dead-man rollback runs when a switch is not confirmed in time:
    /// a command template with {node} and {generation} (the NixOS system
    /// generation current when armed). Default on NixOS:
    /// `systemctl start --wait cnishift-rollback@{generation}.service`
    /// (the unit the NixOS module declares); elsewhere arming is refused
    /// without one.
    #[arg(long, value_name = "TEMPLATE", env = "CNISHIFT_ROLLBACK_COMMAND")]
    rollback_command: Option<String>,
    /// How long one run of the rollback action may take before it is killed.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    rollback_timeout: std::time::Duration,
    /// What `EtcdSnapshot` runs (on a k3s server with embedded etcd) before the
    /// migration touches the first controller: a command template with {run}
    /// (the migration's run id) and {node}. It must write the snapshot under
    /// /var/lib/rancher/k3s/server/db/snapshots (k3s appends the node name and a
    /// timestamp to the name); the agent reports that file and its size.
    #[arg(
        long,
        value_name = "TEMPLATE",
        env = "CNISHIFT_ETCD_SNAPSHOT_COMMAND",
        default_value = cnishift_agent::etcd::snapshot::DEFAULT_COMMAND
    )]
    etcd_snapshot_command: String,
    /// The longest one etcd snapshot may take before its process group is
    /// killed (a caller may ask for less).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    etcd_snapshot_timeout: std::time::Duration,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(clap::Args)]
struct RemediateArgs {
    /// Perform the steps (default: only print them).
    #[arg(long)]
    apply: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Output format: a grouped table for people, JSON for automation.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Shorthand for `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    /// List passing checks too (the table shows only counts for them by default).
    #[arg(long)]
    all: bool,
    /// Judge the node as not migrated yet (flannel) or migrated (cilium);
    /// default: readiness for Cilium only.
    #[arg(long, value_enum, default_value_t = ExpectArg::Unspecified)]
    expect: ExpectArg,
    /// Only these families of checks, and only the probes they read (k3s:
    /// does k3s run Flannel here, with which flags; pod-network: pods left on
    /// cni0, judged with --expect cilium). The exit status then speaks for
    /// those checks alone. Default: every check.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FAMILY")]
    only: Vec<FamilyArg>,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum FamilyArg {
    K3s,
    PodNetwork,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExpectArg {
    Unspecified,
    Flannel,
    Cilium,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Report(args) => run_report(args),
        Command::Serve(args) => run_serve(*args),
        Command::Remediate(args) => run_remediate(args),
        Command::Cleanup(args) => run_cleanup(args),
        Command::Restore(args) => run_restore(args),
        Command::ArmState(args) => run_arm_state(args),
    }
}

fn run_arm_state(args: ArmStateArgs) -> ExitCode {
    let record = match rollback::load(&args.state_dir) {
        Ok(r) => r,
        Err(e) => return agent_error(e),
    };
    // Remaining time is only meaningful in the boot that armed.
    let host = HostPaths::system();
    let same_boot = |r: &rollback::Record| {
        host.read_trimmed(rollback::BOOT_ID)
            .map(|b| b == r.boot_id)
            .unwrap_or(false)
    };
    let view = match &record {
        Some(r) => {
            let mut v = r.view(rollback::boottime_ns());
            if v.armed && !same_boot(r) {
                v.remaining_ms = r.timeout_ms;
                v.message = format!(
                    "{} (armed in another boot: the serving agent restarts the whole countdown)",
                    v.message
                );
            }
            v
        }
        None => rollback::View {
            message: format!(
                "never armed (no {})",
                args.state_dir.join(rollback::STATE_FILE).display()
            ),
            ..Default::default()
        },
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&view) {
            Ok(j) => println!("{j}"),
            Err(e) => return agent_error(e),
        },
        Output::Table => {
            println!("armed:     {}", view.armed);
            if !view.run_id.is_empty() {
                println!("run:       {}", view.run_id);
                println!(
                    "remaining: {} ms of {} ms",
                    view.remaining_ms, view.timeout_ms
                );
                println!("target:    {}", view.target);
                println!(
                    "outcome:   {}",
                    if view.outcome.is_empty() {
                        "-"
                    } else {
                        &view.outcome
                    }
                );
                println!("attempts:  {}", view.attempts);
                if view.rebooted_while_armed {
                    println!("rebooted while armed: yes");
                }
            }
            println!("{}", view.message);
            if !view.output_tail.is_empty() {
                println!("--- output (tail) ---\n{}", view.output_tail.trim_end());
            }
        }
    }
    ExitCode::from(
        if matches!(view.outcome.as_str(), "failed" | "interrupted") {
            1
        } else {
            0
        },
    )
}

/// The agent itself could not run: say why on stderr, exit 2.
fn agent_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cnishift-agent: {e}");
    ExitCode::from(EXIT_AGENT_ERROR)
}

fn run_report(args: ReportArgs) -> ExitCode {
    let opts = match args.host.options() {
        Ok(o) => o,
        Err(e) => return agent_error(e),
    };
    let expect = match args.expect {
        ExpectArg::Unspecified => policy::Expect::Unspecified,
        ExpectArg::Flannel => policy::Expect::Flannel,
        ExpectArg::Cilium => policy::Expect::Cilium,
    };
    let families: Vec<policy::Family> = args
        .only
        .iter()
        .map(|f| match f {
            FamilyArg::K3s => policy::Family::K3s,
            FamilyArg::PodNetwork => policy::Family::PodNetwork,
        })
        .collect();
    let r = report::build_narrowed(&opts, expect, &families);
    let json = || -> serde_json::Result<String> {
        let mut v = serde_json::to_value(&r)?;
        if !r.families.is_empty() {
            // Only the facts that were probed (as over gRPC).
            v["facts"] = serde_json::from_str(&r.facts_json())?;
        }
        serde_json::to_string_pretty(&v)
    };
    let text = match (args.json, args.output) {
        (true, _) | (_, Output::Json) => match json() {
            Ok(j) => j + "\n",
            Err(e) => {
                eprintln!("cnishift-agent: cannot encode the report as JSON: {e}");
                return ExitCode::from(EXIT_AGENT_ERROR);
            }
        },
        (false, Output::Table) => render::table(&r, render::Style::detect(args.all)),
    };
    use std::io::Write;
    if let Err(e) = std::io::stdout().write_all(text.as_bytes()) {
        // A closed pipe (`| head`) is not worth a panic, but it is an error.
        eprintln!("cnishift-agent: cannot write the report: {e}");
        return ExitCode::from(EXIT_AGENT_ERROR);
    }
    ExitCode::from(if r.ready { EXIT_READY } else { EXIT_NOT_READY })
}

fn run_serve(args: ServeArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("cnishift-agent serve: {e}");
        ExitCode::from(EXIT_AGENT_ERROR)
    };
    let opts = match args.host.options() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if let Err(e) = prepare_state_dir(&args.state_dir) {
        return fail(e);
    }
    let files = tls::TlsFiles {
        ca: args.tls_ca,
        cert: args.tls_cert,
        key: args.tls_key,
    };
    let config = match tls::server_config(&files, &opts.node_name) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    // A bad rollback template is refused now, not at the deadline.
    if let Some(t) = &args.rollback_command {
        if let Err(e) = rollback::parse_template(t) {
            return fail(format!("--rollback-command: {e}"));
        }
    }
    let snapshotter = match etcd::snapshot::Snapshotter::new(etcd::snapshot::Config {
        host: opts.host.clone(),
        node: opts.node_name.clone(),
        template: args.etcd_snapshot_command.clone(),
        max_timeout: args.etcd_snapshot_timeout,
        state_dir: args.state_dir.clone(),
    }) {
        Ok(s) => s,
        Err(e) => return fail(format!("--etcd-snapshot-command: {e}")),
    };
    if args.etcd_snapshot_timeout < etcd::snapshot::MIN_TIMEOUT {
        return fail("--etcd-snapshot-timeout must be at least 1s".into());
    }
    let switch = match rollback::Switch::open(rollback::Config {
        state_dir: args.state_dir.clone(),
        host: opts.host.clone(),
        node: opts.node_name.clone(),
        command: args
            .rollback_command
            .clone()
            .filter(|c| !c.trim().is_empty()),
        action_timeout: args.rollback_timeout,
    }) {
        Ok(s) => s,
        Err(e) => return fail(format!("the rollback state: {e}")),
    };
    // One worker thread: the agent is idle almost always and must stay small
    // on a 4 GB Pi; reports run on the blocking pool.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let live = tls::Reloadable::new(config);
        tokio::spawn(tls::watch(
            files,
            opts.node_name.clone(),
            live.clone(),
            args.reload_interval,
        ));
        let service = server::AgentService {
            report: std::sync::Arc::new(opts),
            coordinator_identity: args.coordinator_identity,
            state_dir: args.state_dir,
            rollback: switch,
            etcd_snapshot: snapshotter,
        };
        server::serve(listener, live, service, shutdown_signal())
            .await
            .map_err(|e| format!("server error: {e}"))
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}

/// Creates the state directory (mode 0700) if needed and checks it is one.
fn prepare_state_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create --state-dir {}: {e}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("--state-dir {} is not a directory", dir.display()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "the state directory is readable by others; 0700 is expected");
    }
    Ok(())
}

fn run_remediate(args: RemediateArgs) -> ExitCode {
    let opts = match args.host.options() {
        Ok(o) => o,
        Err(e) => return agent_error(e),
    };
    let r = report::build(&opts);
    let mut steps = remediate::plan(&r);
    if args.apply {
        remediate::apply(&opts.host, &mut steps);
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&steps).unwrap_or_default()
        ),
        Output::Table => {
            if steps.is_empty() {
                println!("nothing to remediate");
            }
            for s in &steps {
                let status = match (s.ok, &s.outcome) {
                    (Some(true), Some(what)) => format!("done: {what}"),
                    (Some(false), Some(why)) => format!("FAILED: {why}"),
                    _ => "would do".to_string(),
                };
                println!(
                    "{:<44} {:<48} {status}\n    permanent: {}",
                    s.check_id, s.action, s.permanent
                );
            }
            if !args.apply && !steps.is_empty() {
                println!("\ndry run: pass --apply to perform these steps");
            }
        }
    }
    let failed = steps.iter().any(|s| s.ok == Some(false));
    ExitCode::from(if failed { EXIT_NOT_READY } else { EXIT_READY })
}

fn run_cleanup(args: CleanupArgs) -> ExitCode {
    let opts = match args.host.options() {
        Ok(o) => o,
        Err(e) => return agent_error(e),
    };
    let r = report::build(&opts);
    let plan = cleanup::plan(&r, &opts.host, args.force, opts.live);
    let json = matches!(args.output, Output::Json);
    if !json {
        print!("{}", render_plan(&opts.node_name, &plan, args.apply));
    }
    if !args.apply {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&plan).unwrap_or_default()
            );
        }
        return ExitCode::from(if plan.allowed() {
            EXIT_READY
        } else {
            EXIT_NOT_READY
        });
    }
    if let Err(e) = prepare_state_dir(&args.state_dir) {
        eprintln!("cnishift-agent cleanup: {e}");
        return ExitCode::from(EXIT_AGENT_ERROR);
    }
    let store = cleanup::Store {
        state_dir: args.state_dir,
    };
    let result = cleanup::apply(&plan, &opts.host, &store, |o| {
        if !json {
            println!(
                "  {} {:<44} {}",
                if o.ok { "✓" } else { "✗" },
                o.item,
                o.message
            );
        }
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    } else if !result.refused.is_empty() {
        println!("refused: nothing was removed");
    } else if let Some(id) = &result.backup_id {
        println!(
            "backup {id} (restore with: cnishift-agent restore {id} --state-dir {})",
            store.state_dir.display()
        );
    }
    let ok = result.refused.is_empty() && result.outcomes.iter().all(|o| o.ok);
    ExitCode::from(if ok { EXIT_READY } else { EXIT_NOT_READY })
}

fn render_plan(node: &str, plan: &cleanup::Plan, apply: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cleanup plan for {node}{}:",
        if apply {
            ""
        } else {
            " (dry run: --apply performs it)"
        }
    );
    if plan.items.is_empty() {
        let _ = writeln!(out, "  nothing of Flannel's is left");
    }
    for i in &plan.items {
        let _ = writeln!(out, "  - {:<46} {}", i.id, i.why);
    }
    for r in &plan.refusals {
        let how = if r.overridable {
            if plan.forced {
                "overridden by --force"
            } else {
                "--force overrides"
            }
        } else {
            "not overridable"
        };
        let _ = writeln!(
            out,
            "  {} {}: {} — {} ({how})",
            if r.overridable && plan.forced {
                "!"
            } else {
                "✗"
            },
            r.interlock,
            r.reason,
            r.fix
        );
    }
    for n in &plan.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for e in &plan.errors {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

fn run_restore(args: RestoreArgs) -> ExitCode {
    let host = match HostPaths::new(&args.host_root) {
        Ok(h) => h,
        Err(e) => return agent_error(e),
    };
    match cleanup::restore(
        &host,
        &cleanup::Store {
            state_dir: args.state_dir,
        },
        &args.id,
    ) {
        Ok(done) => {
            for d in done {
                println!("restored {d}");
            }
            ExitCode::from(EXIT_READY)
        }
        Err(e) => {
            eprintln!("cnishift-agent restore: {e}");
            ExitCode::from(EXIT_NOT_READY)
        }
    }
}
