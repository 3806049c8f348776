//! `cnishift values check [FILE]`: the Cilium Helm values judged against
//! this cluster (the Kubernetes API and every agent).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use cnishift::values::{self, render};

use super::{
    connect, connect_setup, error, InventoryArg, KubeArgs, Output, EXIT_NOT_READY, EXIT_OK,
};

#[derive(Subcommand)]
pub enum ValuesCommand {
    /// Check the Helm values Cilium will be installed with against this cluster, rule by rule.
    #[command(
        after_help = "FILE is a Helm values file (YAML, as `helm install -f` takes it) or --set-style lines\n\
                            (key.path=value, one or more per line, as `helm install --set` takes them); without FILE,\n\
                            the inventory's [cilium] values. Keys, types and defaults are Cilium 1.16's.\n\n\
                            Every finding names the values key and its line, what was observed and on which node or object\n\
                            (the API's Nodes, each agent's report, a dial from every node to k8sServiceHost:k8sServicePort\n\
                            verified against the kubeconfig's CA), and the lines to write instead. The rules:\n\
                            k8sServiceHost reachable from every node and this cluster's API server; kubeProxyReplacement\n\
                            with a service host; ipam.mode (kubernetes: podCIDRs inside the pod CIDR; cluster-pool: no overlap);\n\
                            ipv4NativeRoutingCIDR covers the pod CIDR; autoDirectNodeRoutes on one shared subnet; tunnelPort\n\
                            off Flannel's 8472; bpf.masquerade with NodePort and the kernel's support; cni.confPath/binPath\n\
                            where containerd reads without Flannel (and not k3s's dir with cni.exclusive); the DaemonSet\n\
                            limited to [cilium] node_label; the MTU Cilium picks on every node, Tailscale paths flagged.\n\n\
                            Exit codes: 0 no finding fails (warnings allowed), 1 a finding fails, 2 the file cannot be read\n\
                            (not YAML, a known key with the wrong type, empty: file:line named), or a bad inventory,\n\
                            TLS files or kubeconfig."
    )]
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub inventory: InventoryArg,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The values file (default: the inventory's [cilium] values).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn run(cmd: ValuesCommand) -> ExitCode {
    let ValuesCommand::Check(args) = cmd;
    let (inv, tls, rt) = match connect_setup(&args.inventory.path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(file) = args.file.clone().or_else(|| inv.cilium.values.clone()) else {
        return error(format!(
            "no values file: name one (cnishift values check FILE) or set [cilium] values = \"PATH\" in {}",
            inv.path.display()
        ));
    };
    // A file that cannot be read is an error before anything is asked.
    if let Err(e) = values::Values::load(&file) {
        return error(e);
    }
    rt.block_on(async {
        let kube = match connect(&args.kube, &inv).await {
            Ok(k) => k,
            Err(code) => return code,
        };
        let report = match values::check(&file, &kube, &inv, &tls).await {
            Ok(r) => r,
            Err(e) => return error(e),
        };
        print!(
            "{}",
            match args.output {
                Output::Json => render::json(&report),
                Output::Table => render::table(&report),
            }
        );
        ExitCode::from(if report.fail == 0 {
            EXIT_OK
        } else {
            EXIT_NOT_READY
        })
    })
}
