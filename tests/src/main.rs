//! `cnishift-lab`: a cluster on this machine, for rehearsing against.

use std::process::ExitCode;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cnishift_lab::cluster::{many_nodes, seed_nodes, Lab, LabOptions};
use cnishift_lab::record::{self, Record};
use cnishift_lab::supervisor::{self, node_pair, Fault, Reply, Request, UpSpec};

const UP_HELP: &str =
    "Needs root. Each node is a network namespace on a private bridge running the real\n\
cnishift-agent (mutual TLS, certificates from `cnishift certs`) with a k3s + Flannel host root\n\
(DIR/hosts/NODE) and real flannel.1, cni0, pod veths and FLANNEL-* chains. One link (cnshlN)\n\
joins this machine to the lab's /24 in 198.18.0.0/15 (address .254); the simulated API server\n\
listens there on port 6443. Then, from this machine:\n\
  cnishift preflight -i DIR/cluster.toml\n\
  kubectl --kubeconfig DIR/kubeconfig get nodes,pods -A\n\
  cnishift cluster check -i DIR/cluster.toml --kubeconfig DIR/kubeconfig\n\
Every deploy and rollback the lab's hooks run is one line of DIR/logs/hooks.log.\n\
`cnishift-lab down --dir DIR` removes it all.";

const FAULT_HELP: &str = "Kinds: hook-fails (deploy exits 1), hook-hangs (deploy never returns), never-ready (the node\n\
never turns Ready after its deploy), cilium-crashloop (the Cilium pod restarts, never Ready; health\n\
says Failure), agent-down (the agent is stopped), partition (the admin box cannot reach the node;\n\
the API still sees it), pdb-blocks (a PDB on a pod of the node never allows), slow-api (every API\n\
answer comes after [deadlines] api + 1 s), unconfirmed (after its deploy the admin box cannot\n\
reach the node), worker-restarts-early (the worker's k3s restarts as soon as a server switches),\n\
etcd-down (a controller's etcd member is stopped), etcd-snapshot-fails (a controller's etcd snapshots\n\
cannot be written), sole-replica (a Longhorn volume's only healthy replica is the node's),\n\
other-subnet (the node's InternalIP moves to 192.0.2.0/24, a second address on its eth0).";

fn fault_arg(s: &str) -> Result<(String, Fault), String> {
    let (n, k) = node_pair(s)?;
    Ok((n, k.parse()?))
}

fn kernel_arg(s: &str) -> Result<(String, PathBuf), String> {
    let (n, f) = node_pair(s)?;
    Ok((n, PathBuf::from(f)))
}

#[derive(Parser)]
#[command(
    name = "cnishift-lab",
    version,
    about = "A k3s-shaped cluster on one machine: network namespaces running the real cnishift-agent",
    after_help = "Needs root (network namespaces, links, mounts). `up` joins this machine to the lab's own\n\
                  /24 of 198.18.0.0/15 with one link (cnshlN) and nothing else; `down` removes it.\n\
                  `preflight` tears its lab down on exit; `apiserver` (no root needed) only listens where told."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up the lab, run the real `cnishift preflight` against it from the coordinator's namespace, tear down.
    Preflight {
        /// Number of nodes (default: the 9-node seed cluster opi01–03, raccoon00–05).
        #[arg(long)]
        nodes: Option<usize>,
        /// Passed to `cnishift preflight -o`.
        #[arg(short, long, default_value = "table")]
        output: String,
    },
    /// Build the inventory's cluster in DIR and return once it is ready; a supervisor keeps it running.
    #[command(after_help = UP_HELP)]
    Up {
        /// The inventory: node names and roles, [cluster] pod_cidr and cilium_namespace.
        #[arg(short, long, value_name = "FILE")]
        inventory: PathBuf,
        /// Where the lab writes cluster.toml, kubeconfig, pki/, hosts/, logs/ and lab.json.
        /// The lab's directory, as given to `up`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Start with a fault on a node (repeatable); kinds as for `fault`.
        #[arg(long = "fault", value_name = "NODE:KIND", value_parser = fault_arg)]
        faults: Vec<(String, Fault)>,
        /// Give NODE's kernel FILE as its config (default: its board's fixture with preflight's fix).
        #[arg(long = "kernel-config", value_name = "NODE:FILE", value_parser = kernel_arg)]
        kernel_configs: Vec<(String, PathBuf)>,
    },
    /// Remove every namespace, process, link, mount and file of the lab in DIR (no --dir: every lab here).
    Down {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Each node's role, k3s backend, Ready, cordoned, Cilium pod and agent state.
    Status {
        /// The lab's directory, as given to `up`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// The lab's deploy hook: switch NODE's k3s to --flannel-backend=none and restart it.
    Deploy {
        /// The lab's directory, as given to `up`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node, as named in the inventory.
        node: String,
    },
    /// The reverse of deploy (the lab agents' rollback command): NODE back to Flannel.
    Rollback {
        /// The lab's directory, as given to `up`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node, as named in the inventory.
        node: String,
    },
    /// Inject a fault on a running lab's node, or clear faults.
    #[command(after_help = FAULT_HELP)]
    Fault {
        /// The lab's directory, as given to `up`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// NODE:KIND to inject.
        #[arg(value_name = "NODE:KIND", value_parser = fault_arg, required_unless_present = "clear")]
        fault: Option<(String, Fault)>,
        /// Clear every fault (on NODE only, when given).
        #[arg(long, value_name = "NODE", num_args = 0..=1, default_missing_value = "")]
        clear: Option<String>,
    },
    /// (internal) The supervisor `up` starts in the background.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        spec: String,
    },
    /// The whole migration on this machine: `up`, then the real `cnishift preflight`, `migrate`
    /// (cleanup included) and `verify` from this machine's namespace, then a summary per node.
    #[command(
        after_help = "Example:\n  cnishift-lab rehearse -i examples/avalanche.toml\n  \
                            cnishift-lab rehearse -i examples/avalanche.toml --fault raccoon03:hook-fails --keep\n\n\
                            Exit codes: 0 the cluster ended migrated, verified and clean; 1 it did not (the summary\n\
                            names the node, step and cause); 2 the lab could not be built."
    )]
    Rehearse {
        /// The inventory to rehearse (names, roles, hooks and deadlines as for the real cluster).
        #[arg(short, long, value_name = "FILE")]
        inventory: PathBuf,
        /// The lab's directory (default: a new temporary one).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// A fault on a node (repeatable), as for `up --fault`.
        #[arg(long = "fault", value_name = "NODE:KIND")]
        faults: Vec<String>,
        /// Leave the lab up afterwards (for kubectl and `cnishift status`); `down --dir` removes it.
        #[arg(long)]
        keep: bool,
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Run the simulated Kubernetes API server alone (for kubectl and kube-rs), until Ctrl-C.
    #[command(
        after_help = "Example:\n  cnishift-lab apiserver --listen 127.0.0.1:16443 --kubeconfig-out /tmp/lab.kubeconfig --nodes 9 &\n  \
                            KUBECONFIG=/tmp/lab.kubeconfig kubectl get nodes\n\n\
                            Serves discovery, /version, Nodes, Pods with evictions and PodDisruptionBudgets, DaemonSets,\n\
                            Deployments/ReplicaSets, Leases and Events over plain HTTP on the given address, with the\n\
                            seed cluster's workload: Longhorn and node-exporter DaemonSets, CoreDNS, Traefik, ArgoCD,\n\
                            a web app (ArgoCD and web behind PodDisruptionBudgets)."
    )]
    Apiserver {
        #[arg(long, default_value = "127.0.0.1:16443")]
        listen: std::net::SocketAddr,
        /// Where to write a kubeconfig pointing at it.
        #[arg(long, value_name = "FILE")]
        kubeconfig_out: std::path::PathBuf,
        /// Ready nodes to start with (the seed cluster's names first).
        #[arg(long, default_value_t = 9)]
        nodes: usize,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Apiserver {
        listen,
        kubeconfig_out,
        nodes,
    } = &cli.command
    {
        return run_apiserver(*listen, kubeconfig_out, *nodes);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "cnishift-lab: needs root (it creates network namespaces, links and mounts); run it as root, e.g.\n  sudo {}",
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        return ExitCode::from(2);
    }
    let nodes = |n: Option<usize>| n.map_or_else(seed_nodes, many_nodes);
    let result = match cli.command {
        Cmd::Preflight { nodes: n, output } => (|| -> anyhow::Result<u8> {
            let lab = Lab::up(&nodes(n), &LabOptions::default())?;
            eprintln!("lab up: {} agents; running `cnishift preflight -o {output}` in the coordinator namespace", lab.agents.len());
            let status = lab
                .coordinator()
                .args(["preflight", "-o", &output])
                .status()?;
            Ok(status.code().unwrap_or(2) as u8)
        })(),
        Cmd::Apiserver { .. } => unreachable!("handled above"),
        Cmd::Up {
            inventory,
            dir,
            faults,
            kernel_configs,
        } => up(inventory, dir, faults, kernel_configs),
        Cmd::Down { dir } => down(dir),
        Cmd::Rehearse {
            inventory,
            dir,
            faults,
            keep,
            output,
        } => (|| -> anyhow::Result<u8> {
            let opts = cnishift_lab::rehearse::Options {
                inventory,
                dir,
                faults,
                keep,
            };
            let s = cnishift_lab::rehearse::run(&opts, &mut |m| eprintln!("… {m}"))?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", cnishift_lab::rehearse::table(&s));
                if keep {
                    println!(
                        "the lab is still up in {}: cnishift-lab down --dir {}",
                        s.dir, s.dir
                    );
                }
            }
            Ok(if s.ok { 0 } else { 1 })
        })(),
        Cmd::Status { dir, output } => status(&dir, &output),
        Cmd::Deploy { dir, node } => hook(&dir, Request::Deploy { node }),
        Cmd::Rollback { dir, node } => hook(&dir, Request::Rollback { node }),
        Cmd::Fault { dir, fault, clear } => {
            let req = match (fault, clear) {
                (_, Some(n)) => Request::Clear {
                    node: (!n.is_empty()).then_some(n),
                },
                (Some((node, kind)), None) => Request::Fault { node, kind },
                (None, None) => unreachable!("clap requires one"),
            };
            hook(&dir, req)
        }
        Cmd::Supervise { spec } => (|| -> anyhow::Result<u8> {
            let spec: UpSpec = serde_json::from_str(&spec)?;
            supervisor::supervise(spec)?;
            Ok(0)
        })(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cnishift-lab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_apiserver(
    listen: std::net::SocketAddr,
    kubeconfig_out: &std::path::Path,
    nodes: usize,
) -> ExitCode {
    let api = cnishift_lab::apiserver::ApiServer::new();
    for (name, role) in seed_nodes()
        .into_iter()
        .chain(many_nodes(nodes).into_iter().skip(9))
        .take(nodes)
    {
        api.add_node(&name, role == cnishift::inventory::Role::Controller, true);
    }
    let names: Vec<String> = seed_nodes()
        .into_iter()
        .chain(many_nodes(nodes).into_iter().skip(9))
        .take(nodes)
        .map(|(n, _)| n)
        .collect();
    if !names.is_empty() {
        api.add_homelab_workload(&names.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cnishift-lab: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        std::fs::write(kubeconfig_out, cnishift_lab::apiserver::kubeconfig(addr))
            .map_err(|e| format!("{}: {e}", kubeconfig_out.display()))?;
        eprintln!(
            "simulated API server on http://{addr}; kubeconfig in {}",
            kubeconfig_out.display()
        );
        tokio::select! {
            r = api.serve(listener) => r.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cnishift-lab apiserver: {e}");
            ExitCode::from(2)
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn supervisor_alive(rec: &Record) -> bool {
    rec.supervisor_pid.is_some_and(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("supervise"))
    })
}

fn up(
    inventory: PathBuf,
    dir: PathBuf,
    faults: Vec<(String, Fault)>,
    kernel_configs: Vec<(String, PathBuf)>,
) -> anyhow::Result<u8> {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let dir = absolute(&dir)?;
    let inventory = absolute(&inventory)?;
    supervisor::read_inventory(&inventory)?;
    if let Ok(rec) = Record::load(&dir) {
        if supervisor_alive(&rec) {
            anyhow::bail!(
                "a lab is already running in {} (supervisor {}); `cnishift-lab down --dir {}` first",
                dir.display(),
                rec.supervisor_pid.unwrap_or(0),
                dir.display()
            );
        }
        // A lab whose supervisor died: remove what it left first.
        record::down(&dir)?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let spec = UpSpec {
        inventory,
        dir: dir.clone(),
        faults,
        kernel_configs: kernel_configs
            .into_iter()
            .map(|(n, f)| absolute(&f).map(|f| (n, f)))
            .collect::<anyhow::Result<_>>()?,
    };
    let log = dir.join("logs/supervisor.log");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("supervise")
        .arg("--spec")
        .arg(serde_json::to_string(&spec)?)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(&log)?);
    // SAFETY: setsid is async-signal-safe; the supervisor outlives this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let rec = loop {
        if let Ok(rec) = Record::load(&dir) {
            if rec.ready {
                break rec;
            }
            if let Some(e) = &rec.error {
                let _ = child.wait();
                let _ = record::down(&dir);
                anyhow::bail!("the lab did not come up: {e}");
            }
        }
        if let Some(st) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = record::down(&dir);
            anyhow::bail!("the lab supervisor exited ({st}) before the lab was ready:\n{text}");
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = record::down(&dir);
            anyhow::bail!("the lab was not ready after 60 s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "lab up in {:.1} s: {} nodes, supervisor pid {}, files in {}",
        start.elapsed().as_secs_f64(),
        rec.nodes.len(),
        rec.supervisor_pid.unwrap_or(0),
        dir.display()
    );
    for n in &rec.notes {
        println!("  {n}");
    }
    let host = rec.host_address.map(|a| a.to_string()).unwrap_or_default();
    println!(
        "  this machine reaches the lab through {} ({host}/24); the API server is http://{}",
        rec.host_link.as_deref().unwrap_or("?"),
        rec.api.map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  cnishift preflight -i {}/cluster.toml", dir.display());
    println!(
        "  kubectl --kubeconfig {}/kubeconfig get nodes,pods -A",
        dir.display()
    );
    println!("  cnishift-lab down --dir {}", dir.display());
    Ok(0)
}

fn down(dir: Option<PathBuf>) -> anyhow::Result<u8> {
    let start = Instant::now();
    match dir {
        Some(d) => {
            let d = absolute(&d)?;
            let done = record::down(&d)?;
            println!(
                "lab in {} down in {:.2} s: {}",
                d.display(),
                start.elapsed().as_secs_f64(),
                done.join(", ")
            );
        }
        None => {
            let done = record::down_all();
            if done.is_empty() {
                println!("no lab on this machine");
            }
            for l in done {
                println!("{l}");
            }
        }
    }
    Ok(0)
}

fn status(dir: &Path, output: &str) -> anyhow::Result<u8> {
    let dir = absolute(dir)?;
    let rec = Record::load(&dir)?;
    if !supervisor_alive(&rec) {
        anyhow::bail!(
            "the lab supervisor (pid {}) is not running; `cnishift-lab down --dir {}` removes what is left",
            rec.supervisor_pid.unwrap_or(0),
            dir.display()
        );
    }
    let reply = supervisor::request(&dir, &Request::Status)?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&reply.rows)?);
        return Ok(0);
    }
    println!(
        "{:<14} {:<10} {:<10} {:<8} {:<9} {:<28} {:<14} {:<9} FAULTS",
        "NODE", "ROLE", "K3S", "READY", "CORDONED", "CILIUM POD", "AGENT", "ETCD"
    );
    for r in reply.rows {
        println!(
            "{:<14} {:<10} {:<10} {:<8} {:<9} {:<28} {:<14} {:<9} {}",
            r.node,
            r.role,
            r.backend,
            if r.ready { "Ready" } else { "NotReady" },
            if r.cordoned { "yes" } else { "no" },
            r.cilium,
            r.agent,
            r.etcd,
            r.faults.join(",")
        );
    }
    Ok(0)
}

fn hook(dir: &Path, req: Request) -> anyhow::Result<u8> {
    let dir = absolute(dir)?;
    let reply: Reply = supervisor::request(&dir, &req)?;
    if reply.hang {
        eprintln!("cnishift-lab: this hook hangs (fault hook-hangs); it never returns");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if reply.ok {
        if !reply.message.is_empty() {
            println!("{}", reply.message);
        }
        Ok(0)
    } else {
        eprintln!("cnishift-lab: {}", reply.message);
        Ok(1)
    }
}
