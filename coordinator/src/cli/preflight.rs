//! `cnishift preflight`: every agent's report at once, and with --cluster the gates.

use std::process::ExitCode;

use cnishift::{agents, render};

use super::{connect_setup, InventoryArg, KubeArgs, Output, EXIT_NOT_READY, EXIT_OK};

#[derive(clap::Args)]
pub struct PreflightArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    /// Also check the cluster through the Kubernetes API (the gates of `cnishift cluster check`, and the
    /// inventory's [cilium] values as `cnishift values check` judges them).
    #[arg(long)]
    cluster: bool,
    #[command(flatten)]
    kube: KubeArgs,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub fn run(args: PreflightArgs) -> ExitCode {
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (outcomes, gates) = match rt.block_on(async {
        let gates = match args.cluster {
            false => None,
            true => Some(super::cluster::gates(&args.kube, &inv).await?),
        };
        // The inventory's [cilium] values, as the migration's Preflight gate checks them.
        let gates = match (gates, &inv.cilium.values) {
            (Some(mut g), Some(_)) => {
                let kube = super::connect(&args.kube, &inv).await?;
                let (verdict, message) = match cnishift::values::gate(&kube, &inv, &tls).await {
                    Ok(m) => (cnishift::kube::gates::Verdict::Pass, m),
                    Err(m) => (cnishift::kube::gates::Verdict::Fail, m),
                };
                g.push(cnishift::kube::gates::Gate {
                    id: "cilium.values",
                    verdict,
                    message,
                });
                Some(g)
            }
            (g, _) => g,
        };
        let outcomes = agents::fan_out_reports(&inv.nodes, &tls, &inv.deadlines).await;
        Ok::<_, ExitCode>((outcomes, gates))
    }) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let text = match args.output {
        Output::Json => render::preflight_json(&outcomes, gates.as_deref()),
        Output::Table => {
            let mut t = render::preflight_table(&outcomes);
            if let Some(g) = &gates {
                t.push('\n');
                t.push_str(&render::gates_table(g));
            }
            t
        }
    };
    print!("{text}");
    let gates_ok = gates.as_deref().is_none_or(|g| {
        g.iter()
            .all(|g| g.verdict != cnishift::kube::gates::Verdict::Fail)
    });
    let all_ready = gates_ok
        && outcomes
            .iter()
            .all(|o| render::status_of(o) == render::NodeStatus::Ready);
    ExitCode::from(if all_ready { EXIT_OK } else { EXIT_NOT_READY })
}
