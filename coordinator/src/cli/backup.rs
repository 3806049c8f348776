//! `cnishift backup`: NetworkPolicies, Nodes, PodDisruptionBudgets and the
//! Cilium/Flannel ConfigMaps, as YAML to `kubectl apply -f` (see
//! `cnishift::backup`).

use std::path::PathBuf;
use std::process::ExitCode;

use cnishift::backup;

use super::{connect, error, kube_setup, InventoryArg, KubeArgs, Output, EXIT_OK};

#[derive(clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Where the backup's directory (cnishift-backup-<UTC time>) is created.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn run(args: BackupArgs) -> ExitCode {
    let (inv, rt) = match kube_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        let b = match backup::backup(&kube, &args.dir, &inv.cluster.name).await {
            Ok(b) => b,
            Err(e) => return error(e),
        };
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&b).unwrap_or_default()),
            Output::Table => {
                println!("backed up {} objects to {}", b.objects, b.dir.display());
                for f in &b.files {
                    if f.count == 0 {
                        println!("  {:<27} no {} in the cluster", f.file, f.kind);
                    } else {
                        println!("  {:<27} {} {}", f.file, f.count, f.kind);
                    }
                }
                println!("restore with: kubectl apply -f {}", b.dir.display());
            }
        }
        ExitCode::from(EXIT_OK)
    })
}
