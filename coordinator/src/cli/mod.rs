//! The command handlers, one module per command. Each parses nothing itself
//! (clap did) and does no work of its own: the work is in the library; here
//! are argument handling, printing and exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::ValueEnum;

use cnishift::agents;
use cnishift::inventory::{Inventory, Load};
use cnishift::kube::{Kube, KubeError, KubeOptions};

pub mod arm;
pub mod backup;
pub mod certs;
pub mod cleanup;
pub mod cluster;
pub mod etcd;
pub mod lock;
pub mod migrate;
pub mod node;
pub mod preflight;
pub mod values;

/// Exit codes (also in the README).
pub const EXIT_OK: u8 = 0;
pub const EXIT_NOT_READY: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

/// How to reach the Kubernetes API.
#[derive(clap::Args, Clone)]
pub struct KubeArgs {
    /// A kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, value_name = "NAME", global = true)]
    pub context: Option<String>,
}

/// `-i/--inventory`, shared by every command that reads the inventory.
#[derive(clap::Args)]
pub struct InventoryArg {
    /// The inventory.
    #[arg(
        short = 'i',
        long = "inventory",
        value_name = "FILE",
        default_value = "cluster.toml",
        env = "CNISHIFT_INVENTORY"
    )]
    pub path: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cnishift: {e}");
    ExitCode::from(EXIT_ERROR)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| error(format!("cannot start the async runtime: {e}")))
}

/// What every command that talks to agents needs: the inventory (with its
/// TLS files), the client TLS material, and a runtime.
pub fn connect_setup(
    inventory: &Path,
) -> Result<(Inventory, agents::ClientTls, tokio::runtime::Runtime), ExitCode> {
    let inv = Inventory::load(
        inventory,
        Load {
            require_tls_files: true,
        },
    )
    .map_err(error)?;
    let tls = agents::ClientTls::load(&inv.tls).map_err(error)?;
    Ok((inv, tls, runtime()?))
}

/// What the Kubernetes-only commands need: the inventory (TLS files not
/// required) and a runtime.
pub fn kube_setup(inventory: &Path) -> Result<(Inventory, tokio::runtime::Runtime), ExitCode> {
    let inv = Inventory::load(
        inventory,
        Load {
            require_tls_files: false,
        },
    )
    .map_err(error)?;
    Ok((inv, runtime()?))
}

pub async fn connect(args: &KubeArgs, inv: &Inventory) -> Result<Kube, ExitCode> {
    Kube::connect(&KubeOptions {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
        api_timeout: inv.deadlines.api,
    })
    .await
    .map_err(error)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// 1 for "not done" (refused, blocked, timed out, lock held, interrupted), 2 for errors.
pub fn exit_for(e: &KubeError) -> u8 {
    match e {
        KubeError::Drain(_)
        | KubeError::Lock(_)
        | KubeError::WaitTimedOut { .. }
        | KubeError::Interrupted => EXIT_NOT_READY,
        _ => EXIT_ERROR,
    }
}
