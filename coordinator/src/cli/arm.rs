//! `cnishift node arm | confirm | disarm | arm-state NODE`: the dead-man
//! rollback by hand — the same agent calls `cnishift migrate` makes. They
//! talk to the agent only (no kubeconfig needed).

use std::process::ExitCode;
use std::time::Duration;

use cnishift::agents::{self, CallError};
use cnishift_proto::v1 as pb;

use super::{connect_setup, error, InventoryArg, Output, EXIT_ERROR, EXIT_NOT_READY, EXIT_OK};

#[derive(clap::Args)]
pub struct AgentNodeArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    /// The node, as named in the inventory.
    #[arg(value_name = "NODE")]
    pub node: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args)]
pub struct ArmArgs {
    #[command(flatten)]
    pub target: AgentNodeArgs,
    /// How long the switched node has to be confirmed before its agent rolls it back (1s..24h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The run id (default: `manual-<unix seconds>`); arming again with the same id is a no-op.
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: AgentNodeArgs,
    /// The run id (default: the one the agent is armed with now).
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
}

pub enum ArmCommand {
    Arm(ArmArgs),
    Confirm(RunArgs),
    Disarm(RunArgs),
    State(AgentNodeArgs),
}

fn show(node: &str, what: &str, s: &pb::ArmState, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "node": node, "step": what, "ok": true,
                "result": {
                    "armed": s.armed, "run_id": s.run_id, "remaining_ms": s.remaining_ms,
                    "timeout_ms": s.timeout_ms, "rebooted_while_armed": s.rebooted_while_armed,
                    "fired": s.fired, "outcome": s.outcome, "attempts": s.attempts,
                    "target": s.target, "message": s.message, "output_tail": s.output_tail,
                }
            })
        ),
        Output::Table => {
            println!("{node}: {}", s.message);
            if !s.run_id.is_empty() {
                println!(
                    "  run {}  armed={}  remaining={} ms of {} ms  outcome={}  attempts={}",
                    s.run_id,
                    s.armed,
                    s.remaining_ms,
                    s.timeout_ms,
                    if s.outcome.is_empty() {
                        "-"
                    } else {
                        &s.outcome
                    },
                    s.attempts
                );
                println!("  target: {}", s.target);
            }
            if s.rebooted_while_armed {
                println!("  the node rebooted while armed (the countdown restarted)");
            }
            if !s.output_tail.is_empty() {
                println!("  --- rollback output (tail) ---");
                for l in s.output_tail.lines() {
                    println!("  {l}");
                }
            }
        }
    }
}

pub fn run(cmd: ArmCommand) -> ExitCode {
    let (args, what) = match &cmd {
        ArmCommand::Arm(a) => (&a.target, "arm"),
        ArmCommand::Confirm(a) => (&a.target, "confirm"),
        ArmCommand::Disarm(a) => (&a.target, "disarm"),
        ArmCommand::State(a) => (a, "arm-state"),
    };
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(node) = inv.node(&args.node).cloned() else {
        return error(format!(
            "{:?} is not in {}; only nodes of the inventory are touched",
            args.node,
            inv.path.display()
        ));
    };
    let d = &inv.deadlines;
    let result: Result<pb::ArmState, CallError> = rt.block_on(async {
        // Without --run, the run the agent is armed with now.
        let current_run = |given: &Option<String>| {
            let given = given.clone();
            async {
                match given {
                    Some(r) => Ok(r),
                    None => agents::arm_state(&node, &tls, d).await.map(|s| s.run_id),
                }
            }
        };
        match &cmd {
            ArmCommand::Arm(a) => {
                let run = a.run.clone().unwrap_or_else(|| {
                    format!(
                        "manual-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|t| t.as_secs())
                            .unwrap_or(0)
                    )
                });
                agents::arm_rollback(&node, &tls, d, &run, a.timeout).await
            }
            ArmCommand::Confirm(a) => {
                let run = current_run(&a.run).await?;
                agents::confirm(&node, &tls, d, &run).await
            }
            ArmCommand::Disarm(a) => {
                let run = current_run(&a.run).await?;
                agents::disarm(&node, &tls, d, &run).await
            }
            ArmCommand::State(_) => agents::arm_state(&node, &tls, d).await,
        }
    });
    match result {
        Ok(s) => {
            show(&node.name, what, &s, args.output);
            // A rollback that failed is never reported as success.
            if matches!(s.outcome.as_str(), "failed" | "interrupted") {
                ExitCode::from(EXIT_NOT_READY)
            } else {
                ExitCode::from(EXIT_OK)
            }
        }
        Err(e) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"node": node.name, "step": what, "ok": false, "error": e.to_string()})
                ),
                Output::Table => eprintln!("cnishift: {}: {e}", node.name),
            }
            // Refused by the agent (another run holds it, wrong connection,
            // too late) is "not done"; not reaching it is an error.
            ExitCode::from(match e {
                CallError::Rpc { .. } => EXIT_NOT_READY,
                _ => EXIT_ERROR,
            })
        }
    }
}
