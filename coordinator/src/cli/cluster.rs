//! `cnishift cluster check`: the cluster gates.

use std::process::ExitCode;

use clap::Subcommand;

use cnishift::inventory::Inventory;
use cnishift::kube::gates::Gate;
use cnishift::render;

use super::{connect, kube_setup, InventoryArg, KubeArgs, Output, EXIT_NOT_READY, EXIT_OK};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The cluster gates: nodes Ready, blocking PodDisruptionBudgets, unhealthy pods, Cilium's DaemonSet, the VIP.
    #[command(
        after_help = "Exit codes: 0 no gate failed, 1 a gate failed, 2 usage, inventory or kubeconfig error."
    )]
    Check(ClusterArgs),
}

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    inventory: InventoryArg,
    #[command(flatten)]
    kube: KubeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The cluster gates, for `preflight --cluster`.
pub async fn gates(args: &KubeArgs, inv: &Inventory) -> Result<Vec<Gate>, ExitCode> {
    let kube = connect(args, inv).await?;
    Ok(kube
        .cluster_gates(&inv.cluster.cilium_namespace, inv.cluster.api_vip)
        .await)
}

pub fn run(cmd: ClusterCommand) -> ExitCode {
    match cmd {
        ClusterCommand::Check(a) => check(a),
    }
}

fn check(args: ClusterArgs) -> ExitCode {
    let (inv, rt) = match kube_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        let gates = kube
            .cluster_gates(&inv.cluster.cilium_namespace, inv.cluster.api_vip)
            .await;
        match args.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&gates).expect("gates serialize")
            ),
            Output::Table => print!("{}", render::gates_table(&gates)),
        }
        let failed = gates
            .iter()
            .any(|g| g.verdict == cnishift::kube::gates::Verdict::Fail);
        ExitCode::from(if failed { EXIT_NOT_READY } else { EXIT_OK })
    })
}
