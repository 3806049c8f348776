//! `cnishift`: the command line, parsed here; each command's handler is in
//! `cli/`, and everything they do lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::{backup, certs, cleanup, cluster, etcd, lock, migrate, node, preflight, values};

#[derive(Parser)]
#[command(
    name = "cnishift",
    version,
    about = "Move a k3s cluster from Flannel to Cilium, node by node",
    long_about = "The coordinator: reads the inventory (cluster.toml), talks to every node's cnishift-agent \
                  over mutual-TLS gRPC and to the Kubernetes API (standard kubeconfig resolution), and checks, \
                  then migrates, the cluster.\n\n\
                  Logs go to stderr; set RUST_LOG=debug for more.",
    after_help = "Exit codes: 0 success, 1 not ready or not done (a node not ready or unreachable, a gate failed, a drain\n\
                  blocked, a wait timed out, the lock held), 2 usage, inventory, TLS or kubeconfig error; each command's --help has its own.\n\n\
                  Getting started:\n  cnishift certs init --dir pki\n  cnishift certs issue --dir pki --coordinator\n  \
                  cnishift certs issue --dir pki --node opi01 --ip 10.1.0.11\n  cnishift preflight -i cluster.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the cluster CA and issue agent and coordinator certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Ask every agent at once whether its node is ready for Cilium.
    #[command(
        after_help = "Each agent has its own deadline ([deadlines] connect/report in the inventory): a dead,\n\
                            slow or impostor agent is reported as such and the others still report. With --cluster,\n\
                            the cluster gates (`cnishift cluster check`) are checked too and count towards the exit code.\n\n\
                            Exit codes: 0 every node ready, 1 some node not ready or not reachable (or a gate failed),\n\
                            2 bad inventory, TLS files or kubeconfig."
    )]
    Preflight(preflight::PreflightArgs),
    /// Remove what Flannel left, node by node: each node's plan first, then (with --apply) the cleanup.
    #[command(
        after_help = "Nodes are done one at a time, controllers first. The run halts at the first node whose\n\
                            agent refuses (an interlock holds) or whose cleanup fails; the nodes after it are not touched.\n\
                            Every agent backs up what it removes (cnishift-agent restore ID on the node).\n\n\
                            Exit codes: 0 every plan allowed (dry run) / every node cleaned, 1 refused or failed, 2 usage error."
    )]
    Cleanup(cleanup::CleanupArgs),
    /// The cluster as the Kubernetes API sees it.
    #[command(
        after_help = "Uses the standard kubeconfig resolution: --kubeconfig, else KUBECONFIG, else ~/.kube/config,\n\
                            else the in-cluster service account; --context picks a context."
    )]
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// One migration step on one node through the Kubernetes API: cordon, drain, uncordon, wait.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// k3s's embedded etcd on the controllers: members, health, leader, quorum; a named snapshot.
    #[command(subcommand)]
    Etcd(etcd::EtcdCommand),
    /// The migration lock (a Lease in kube-system): who holds it; release it.
    #[command(subcommand)]
    Lock(lock::LockCommand),
    /// The migration's order: waves, steps with their deadlines, and the warnings this cluster needs.
    #[command(after_help = "Reads only the inventory. Exit codes: 0 planned, 2 bad inventory.")]
    Plan(migrate::PlanArgs),
    /// Migrate the cluster node by node (resumes a run from its journal).
    #[command(
        after_help = "Per node: preflight, cordon, drain, arm-rollback, deploy, label, wait-cilium-ready, repod,\n\
                            verify, confirm, uncordon, done; then verify-cluster and cleanup. A controller's preflight\n\
                            also refuses when taking it down would lose etcd's quorum (naming the member), and before\n\
                            the first controller is cordoned a controller's agent takes an etcd snapshot (journaled;\n\
                            --skip-etcd-snapshot goes without one, journaled too). The first failure halts\n\
                            between steps and says how to resume or roll the node back. The journal in --state-dir\n\
                            makes a resumed run start where the last one stopped.\n\n\
                            Exit codes: 0 migrated, 1 halted or interrupted (or the lock held), 2 usage, inventory,\n\
                            journal, TLS or kubeconfig error."
    )]
    Migrate(migrate::MigrateArgs),
    /// Pause a running migration before its next step (from any machine with a kubeconfig).
    Pause(migrate::PauseArgs),
    /// Resume a paused migration.
    Resume(migrate::PauseArgs),
    /// The journal and the live state side by side, per node, and what migrate would do next.
    Status(migrate::StatusArgs),
    /// Switch one node back to Flannel: cordon, drain, [hooks] rollback, unlabel, wait Ready, uncordon.
    Rollback(migrate::RollbackArgs),
    /// The validation checklist: nodes Ready, Cilium on every node, agents' verdicts, the VIP, leftovers.
    Verify(migrate::VerifyArgs),
    /// Save NetworkPolicies, Nodes, PodDisruptionBudgets and Cilium/Flannel ConfigMaps as YAML to kubectl apply.
    #[command(
        after_help = "Writes DIR/cnishift-backup-<UTC time>/ (nodes.yaml, networkpolicies.yaml,\n\
                            poddisruptionbudgets.yaml, configmaps.yaml) with server-set fields stripped; written under a\n\
                            .partial name and renamed when complete, never over an existing one. `cnishift migrate` makes\n\
                            one in --state-dir/backups before the first node is touched and journals its path.\n\n\
                            Exit codes: 0 written, 2 the API or the directory failed, or a bad inventory or kubeconfig."
    )]
    Backup(backup::BackupArgs),
    /// The Cilium Helm values checked against this cluster (also a Preflight gate with [cilium] values).
    #[command(subcommand)]
    Values(values::ValuesCommand),
}

fn main() -> ExitCode {
    // `cnishift plan -o json | head`: a reader that goes away ends us as it
    // ends any Unix tool (SIGPIPE), instead of println! panicking on EPIPE.
    // Sockets are unaffected: Rust sends with MSG_NOSIGNAL.
    // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Certs(c) => certs::run(c),
        Command::Preflight(a) => preflight::run(a),
        Command::Cleanup(a) => cleanup::run(a),
        Command::Cluster(c) => cluster::run(c),
        Command::Node(c) => node::run(c),
        Command::Etcd(c) => etcd::run(c),
        Command::Lock(c) => lock::run(c),
        Command::Plan(a) => migrate::run_plan(a),
        Command::Migrate(a) => migrate::run_migrate(a),
        Command::Pause(a) => migrate::run_pause(a, true),
        Command::Resume(a) => migrate::run_pause(a, false),
        Command::Status(a) => migrate::run_status(a),
        Command::Rollback(a) => migrate::run_rollback(a),
        Command::Verify(a) => migrate::run_verify(a),
        Command::Values(c) => values::run(c),
        Command::Backup(a) => backup::run(a),
    }
}
