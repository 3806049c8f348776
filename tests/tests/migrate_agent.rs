//! The driver with a real agent on loopback (real mutual TLS, its real
//! dead-man rollback) and the simulated API server: a node whose Deploy fails
//! after ArmRollback is not confirmed, so its agent rolls it back at the
//! `[deadlines] confirm` timeout; the run waits for that outcome, halts there
//! and says so. The agent's readiness verdicts are not what is tested here
//! (this machine is not a k3s node), so Preflight and Verify answer from a
//! stand-in; every rollback call goes to the real agent.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cnishift::agents::ClientTls;
use cnishift::inventory::{Inventory, Load, Node};
use cnishift::kube::Kube;
use cnishift::migrate::journal::{Accept, Journal};
use cnishift::migrate::live::{AgentClients, KubeCluster};
use cnishift::migrate::run::{Ctx, Driver, Event, Options, Outcome};
use cnishift::migrate::steps::{ArmState, Cause, K3sNetwork, NodeAgents};
use cnishift_lab::apiserver::ApiServer;
use cnishift_lab::loopback::{Agent, Pki};

/// The real agent for the dead-man rollback; a stand-in for the verdicts.
struct RealRollback<'a>(AgentClients<'a>);

impl NodeAgents for RealRollback<'_> {
    async fn preflight(&self, _: &Node) -> Result<(), Cause> {
        Ok(())
    }
    async fn arm(&self, n: &Node, run: &str, d: Duration) -> Result<(), Cause> {
        self.0.arm(n, run, d).await
    }
    async fn confirm(&self, n: &Node, run: &str) -> Result<(), Cause> {
        self.0.confirm(n, run).await
    }
    async fn disarm(&self, n: &Node, run: &str) -> Result<(), Cause> {
        self.0.disarm(n, run).await
    }
    async fn arm_state(&self, n: &Node) -> Result<ArmState, Cause> {
        self.0.arm_state(n).await
    }
    async fn migrated(&self, _: &Node) -> Result<(), Cause> {
        Ok(())
    }
    async fn pods_on_cni0(&self, _: &Node) -> Result<u32, Cause> {
        Ok(0)
    }
    async fn dial(&self, _: &Node, _: SocketAddr) -> Result<(), Cause> {
        Ok(())
    }
    async fn k3s_network(&self, _: &Node) -> Result<K3sNetwork, Cause> {
        Ok(K3sNetwork::Flannel)
    }
    async fn leftovers(&self, _: &Node) -> Result<Vec<String>, Cause> {
        Ok(vec![])
    }
    async fn cleanup(&self, _: &Node) -> Result<String, Cause> {
        Ok("cleaned".into())
    }
}

fn inventory(pki: &Path, agent: &str, deploy: &str) -> Inventory {
    let text = format!(
        "[cluster]\nname = \"lab\"\ncilium_namespace = \"cilium\"\n\
         [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/coordinator.pem\"\nkey = \"{p}/coordinator-key.pem\"\n\
         [deadlines]\nconfirm = \"1s\"\nrollback = \"15s\"\napi = \"2s\"\nnode_ready = \"2s\"\ncilium_ready = \"2s\"\n\
         [hooks]\ndeploy = [\"sh\", \"-c\", {deploy:?}]\n\
         [[nodes]]\nname = \"raccoon00\"\nrole = \"worker\"\naddress = \"{agent}\"\n",
        p = pki.display()
    );
    Inventory::parse(
        &text,
        &pki.join("cluster.toml"),
        Load {
            require_tls_files: true,
        },
    )
    .unwrap()
}

struct Run {
    outcome: Outcome,
    took: Duration,
    api: ApiServer,
    agent: Agent,
    count: std::path::PathBuf,
    state: tempfile::TempDir,
    inv: Inventory,
    _pki: Pki,
}

/// One node, a real agent, the simulator with a Ready Cilium pod on the node.
fn migrate(deploy: &str) -> Run {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let count = pki.path("rolled-back");
    let action = format!("sh -c \"echo rolled back {{node}} >> {}\"", count.display());
    let agent = Agent::start(
        pki.dir.path(),
        "raccoon00",
        "raccoon00",
        &["--rollback-command", &action],
    )
    .unwrap();
    let inv = inventory(pki.dir.path(), &agent.address(), deploy);
    let tls = ClientTls::load(&inv.tls).unwrap();
    let api = ApiServer::new();
    api.add_node("raccoon00", false, true);
    let cilium = serde_json::json!({"k8s-app": "cilium"});
    api.add_daemonset_with_pods("cilium", "cilium", cilium, &["raccoon00"], true);
    let state = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(api.start());
    let opts = Options {
        dry_run: false,
        no_cleanup: false,
        no_auto_rollback: false,
        poll: Duration::from_millis(100),
        log_dir: state.path().join("logs"),
        resume_command: "cnishift migrate".into(),
        rollback_command: "cnishift rollback".into(),
        skip_etcd_snapshot: false,
    };
    let (outcome, took) = rt.block_on(async {
        let kube = Kube::for_url(&format!("http://{addr}"), Duration::from_secs(2)).unwrap();
        let cluster = KubeCluster {
            kube: &kube,
            inv: &inv,
            guard: None,
            identity: "test".into(),
        };
        let agents = RealRollback(AgentClients::new(&tls, &inv));
        let mut j = Journal::open(state.path(), &inv, Accept::default(), "run-e2e-1").unwrap();
        let st = j.state();
        let mut sink = |_: &Event| {};
        let mut d = Driver {
            ctx: Ctx {
                inv: &inv,
                cluster: &cluster,
                agents: &agents,
                opts: &opts,
                run: "run-e2e-1".into(),
            },
            journal: Some(&mut j),
            state: st,
            sink: &mut sink,
        };
        let started = Instant::now();
        let o = d.run().await;
        (o, started.elapsed())
    });
    Run {
        outcome,
        took,
        api,
        agent,
        count,
        state,
        inv,
        _pki: pki,
    }
}

#[test]
fn an_unconfirmed_node_is_rolled_back_by_its_agent_and_the_run_halts_saying_so() {
    let Run {
        outcome,
        took,
        api,
        agent,
        count,
        state,
        inv,
        _pki: _keep,
    } = migrate("echo switching; exit 1");
    let Outcome::Halted(h) = outcome else {
        panic!("completed: {}", agent.log())
    };
    assert_eq!(
        (h.node.as_deref(), h.step.as_str()),
        (Some("raccoon00"), "deploy"),
        "{h}"
    );
    assert!(h.cause.starts_with("sh exited with status 1"), "{h}");
    assert!(
        h.aftermath
            .starts_with("raccoon00 was rolled back to Flannel by its agent: "),
        "{h}\n{}",
        agent.log()
    );
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "rolled back raccoon00\n"
    );
    assert!(
        took >= Duration::from_secs(1),
        "waited for the agent's deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(
        api.node("raccoon00").unwrap()["spec"]["unschedulable"],
        true,
        "stays cordoned"
    );
    let reasons: Vec<String> = api
        .events_about("Node", "raccoon00")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    for r in [
        "MigrationPreflightDone",
        "MigrationCordoned",
        "MigrationArmRollbackDone",
        "MigrationDeployStarted",
        "MigrationDeployFailed",
    ] {
        assert!(reasons.iter().any(|x| x == r), "{r} not in {reasons:?}");
    }
    // The journal says the node starts over.
    let j = Journal::open(state.path(), &inv, Accept::default(), "x").unwrap();
    let n = &j.state().nodes["raccoon00"];
    assert!(n.rolled_back.is_some() && n.done.is_empty(), "{n:?}");
}

#[test]
fn a_node_that_passes_is_confirmed_over_a_new_connection_and_never_rolled_back() {
    let r = migrate("echo switching");
    assert_eq!(r.outcome, Outcome::Completed, "{}", r.agent.log());
    let n = r.api.node("raccoon00").unwrap();
    assert!(
        n["spec"]["unschedulable"].is_null() || n["spec"]["unschedulable"] == false,
        "{n}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !r.count.exists(),
        "confirmed: the agent did not roll back past its deadline"
    );
    let j = Journal::open(r.state.path(), &r.inv, Accept::default(), "x").unwrap();
    let s = j.state();
    assert_eq!(s.nodes["raccoon00"].done.len(), 12);
    assert!(s.cluster.done.contains("cleanup"));
    let _ = r.took;
}
