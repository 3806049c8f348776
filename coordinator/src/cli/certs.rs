//! `cnishift certs init|issue`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use cnishift::certs;

use super::{error, EXIT_OK};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create ca.pem and ca-key.pem (0600) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue NAME.pem/NAME-key.pem for an agent, or coordinator.pem/coordinator-key.pem.
    #[command(group = clap::ArgGroup::new("who").required(true).args(["node", "coordinator"]))]
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node name (the certificate's SAN; must match the inventory).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Issue the coordinator's certificate instead.
        #[arg(long)]
        coordinator: bool,
        /// The coordinator identity to put in its certificate.
        #[arg(long, default_value = certs::DEFAULT_COORDINATOR_IDENTITY, requires = "coordinator")]
        identity: String,
        /// An IP address to add as a SAN (repeatable).
        #[arg(long, value_name = "IP")]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: CertsCommand) -> ExitCode {
    let written = match cmd {
        CertsCommand::Init { dir, days, force } => certs::init_ca(&dir, days, force),
        CertsCommand::Issue {
            dir,
            node,
            coordinator,
            identity,
            ip,
            days,
            force,
        } => {
            let (stem, name) = if coordinator {
                ("coordinator".to_string(), identity)
            } else {
                let n = node.expect("clap requires one");
                (n.clone(), n)
            };
            certs::issue_to_dir(
                &dir,
                &stem,
                &certs::Spec::for_days(vec![name], ip, days),
                force,
            )
        }
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            ExitCode::from(EXIT_OK)
        }
        Err(e) => error(e),
    }
}
