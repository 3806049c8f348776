//! `cnishift lock status|release`: the migration Lease.

use std::process::ExitCode;

use clap::Subcommand;

use cnishift::kube::lease;

use super::{connect, error, kube_setup, InventoryArg, KubeArgs, Output, EXIT_OK};

#[derive(Subcommand)]
pub enum LockCommand {
    /// Who holds the migration lock, since when, and whether it is stale.
    Status {
        #[command(flatten)]
        inventory: InventoryArg,
        #[command(flatten)]
        kube: KubeArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete the migration lock whoever holds it (only when its coordinator is gone for good).
    Release {
        #[command(flatten)]
        inventory: InventoryArg,
        #[command(flatten)]
        kube: KubeArgs,
        /// Required: this does not check that the holder is gone.
        #[arg(long, required = true)]
        force: bool,
    },
}

pub fn run(cmd: LockCommand) -> ExitCode {
    let (inventory, kube_args) = match &cmd {
        LockCommand::Status {
            inventory, kube, ..
        }
        | LockCommand::Release {
            inventory, kube, ..
        } => (inventory, kube),
    };
    let (inv, rt) = match kube_setup(&inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    rt.block_on(async {
        let kube = match connect(kube_args, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        match cmd {
            LockCommand::Status { output, .. } => {
                match kube.lock_status(lease::NAMESPACE, lease::NAME).await {
                    Err(e) => error(e),
                    Ok(info) => {
                        match output {
                            Output::Json => println!(
                                "{}",
                                serde_json::to_string_pretty(&info).expect("serializes")
                            ),
                            Output::Table => match &info {
                                None => println!(
                                    "the migration lock ({}/{}) is free",
                                    lease::NAMESPACE,
                                    lease::NAME
                                ),
                                Some(i) => println!(
                                    "held by {} since {}, last renewed {} (TTL {}s){}",
                                    i.holder,
                                    i.since.as_deref().unwrap_or("?"),
                                    i.renewed.as_deref().unwrap_or("never"),
                                    i.ttl_seconds,
                                    if i.stale {
                                        " — STALE: its holder stopped renewing it"
                                    } else {
                                        ""
                                    }
                                ),
                            },
                        }
                        ExitCode::from(EXIT_OK)
                    }
                }
            }
            LockCommand::Release { .. } => {
                match kube.force_release_lock(lease::NAMESPACE, lease::NAME).await {
                    Ok(Some(holder)) => {
                        println!("released the migration lock held by {holder}");
                        ExitCode::from(EXIT_OK)
                    }
                    Ok(None) => {
                        println!("the migration lock was free");
                        ExitCode::from(EXIT_OK)
                    }
                    Err(e) => error(e),
                }
            }
        }
    })
}
