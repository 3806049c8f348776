//! `cnishift plan | migrate | pause | resume | status` as processes against
//! the simulated API server. The agents' rollback RPCs are not on this branch
//! yet, so the end-to-end run of `migrate` lives in the lab tests; here: the
//! plan, a dry run that touches nothing, bad input refused before anything
//! runs, a halt at Preflight that names the node, the step, the cause and the
//! resume command, a changed inventory refused on resume, status from the
//! journal, and pause/resume on the Lease.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use cnishift_lab::apiserver::{kubeconfig, ApiServer};
use serde_json::{json, Value};

struct Setup {
    api: ApiServer,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

const NODES: [&str; 3] = ["opi01", "raccoon00", "raccoon01"];

/// A port on 127.0.0.1 with nothing listening: an agent that is down.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn inventory(vip: &str, deploy: &str, extra: &str) -> String {
    let mut s = format!(
        "[cluster]\nname = \"lab\"\napi_vip = \"{vip}\"\ncilium_namespace = \"cilium\"\n\n\
         [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator-key.pem\"\n\n\
         [deadlines]\nconnect = \"500ms\"\nreport = \"1s\"\napi = \"2s\"\nlock_ttl = \"900ms\"\n\n\
         [hooks]\ndeploy = {deploy}\n{extra}\n"
    );
    for (i, n) in NODES.iter().enumerate() {
        let role = if i == 0 { "controller" } else { "worker" };
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{n}\"\nrole = \"{role}\"\naddress = \"127.0.0.1:{}\"\n",
            closed_port()
        ));
    }
    s
}

fn setup(deploy: &str) -> Setup {
    let api = ApiServer::new();
    for (i, n) in NODES.iter().enumerate() {
        api.add_node(n, i == 0, true);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(api.start());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubeconfig"), kubeconfig(addr)).unwrap();
    std::fs::write(
        dir.path().join("cluster.toml"),
        inventory(&addr.to_string(), deploy, ""),
    )
    .unwrap();
    let s = Setup { api, dir, _rt: rt };
    let pki = s.path("pki");
    let pki = pki.to_str().unwrap();
    for args in [
        vec!["certs", "init", "--dir", pki],
        vec!["certs", "issue", "--dir", pki, "--coordinator"],
    ] {
        let o = s.run(&args);
        assert!(o.status.success(), "{}", text(&o));
    }
    s
}

fn cnishift() -> PathBuf {
    cnishift_lab::cluster::binary("cnishift", "CNISHIFT_BIN").unwrap()
}

impl Setup {
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    fn run(&self, args: &[&str]) -> Output {
        Command::new(cnishift())
            .env("KUBECONFIG", self.path("kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("CNISHIFT_INVENTORY", self.path("cluster.toml"))
            .env("XDG_STATE_HOME", self.path("state"))
            .args(args)
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn plan_prints_waves_steps_and_warnings_as_a_table_and_as_json() {
    let s = setup("[\"true\"]");
    let o = s.run(&["plan"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("cluster lab: 3 waves\n  wave 1  controller opi01\n"),
        "{out}"
    );
    assert!(out.contains("! flannel-backend-from-servers"), "{out}");
    let o = s.run(&["plan", "-o", "json", "--no-cleanup"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["waves"].as_array().unwrap().len(), 3);
    assert_eq!(v["steps"][4]["step"], "deploy");
    assert_eq!(v["after"], json!(["verify-cluster"]));
    assert_eq!(
        s.api.faults().requests(),
        0,
        "plan reads only the inventory"
    );
}

#[test]
fn dry_run_prints_every_action_as_json_events_and_touches_nothing() {
    let s = setup("[\"just\", \"nix\", \"deploy\", \"{node}\"]");
    let o = s.run(&["migrate", "--dry-run", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let events: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The backup, every node's 12 steps, the etcd snapshot, verify-cluster
    // and cleanup.
    assert_eq!(events.len(), 1 + 3 * 12 + 3);
    assert_eq!(events[0]["step"], "backup", "{}", events[0]);
    assert!(
        events[0]["detail"]
            .as_str()
            .unwrap()
            .ends_with("/state/cnishift/lab/backups"),
        "{}",
        events[0]
    );
    for e in &events {
        for k in [
            "time",
            "run",
            "node",
            "step",
            "phase",
            "elapsed_ms",
            "deadline_ms",
            "detail",
        ] {
            assert!(e.get(k).is_some(), "{k} missing in {e}");
        }
        assert_eq!(e["phase"], "dry-run");
    }
    assert!(events
        .iter()
        .any(|e| e["detail"] == "run just nix deploy raccoon01"));
    let snap = events
        .iter()
        .find(|e| e["step"] == "etcd-snapshot")
        .expect("the etcd snapshot is planned");
    assert!(
        snap["detail"]
            .as_str()
            .unwrap()
            .starts_with("ask opi01's agent for an etcd snapshot named cnishift-pre-dry-run"),
        "{snap}"
    );
    assert_eq!(
        s.api.faults().requests(),
        0,
        "a dry run does not even connect"
    );
    assert!(
        !s.path("state/cnishift/lab/journal.jsonl").exists(),
        "no journal"
    );
    assert!(!s.path("state/cnishift/lab/backups").exists(), "no backup");
}

#[test]
fn an_unknown_placeholder_is_refused_with_file_and_line_before_anything_runs() {
    let s = setup("[\"deploy\", \"{host}\"]");
    let o = s.run(&["migrate"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cluster.toml:18:22: hooks.deploy: \"{host}\": unknown placeholder {host}"),
        "{err}"
    );
    assert_eq!(s.api.faults().requests(), 0);
}

#[test]
fn a_halt_names_node_step_cause_and_resume_and_status_reads_the_journal() {
    let s = setup("[\"true\"]");
    let o = s.run(&["migrate"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cnishift: halted at opi01, step preflight: unreachable"),
        "{err}"
    );
    assert!(
        err.contains("  opi01 is untouched: it was not cordoned\n  nothing further was started\n"),
        "{err}"
    );
    let inv = s.path("cluster.toml");
    assert!(
        err.contains(&format!(
            "  to resume:       cnishift migrate -i {}\n",
            inv.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "  to roll it back: cnishift rollback -i {} opi01\n",
            inv.display()
        )),
        "{err}"
    );
    assert!(
        s.api.node("opi01").unwrap()["spec"]["unschedulable"].is_null(),
        "the failed preflight touched nothing"
    );
    assert!(
        s.api.lease("kube-system", "cnishift-migration").is_none(),
        "lock released"
    );
    let journal = std::fs::read_to_string(s.path("state/cnishift/lab/journal.jsonl")).unwrap();
    assert_eq!(
        journal.lines().count(),
        5,
        "header, the backup's intent and done (before any node), the node's intent, failed: {journal}"
    );
    assert!(
        journal
            .lines()
            .nth(2)
            .unwrap()
            .contains("\"type\":\"done\",\"step\":\"backup\""),
        "{journal}"
    );
    assert!(
        journal
            .lines()
            .nth(4)
            .unwrap()
            .contains("\"type\":\"failed\""),
        "{journal}"
    );

    let o = s.run(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let row = out
        .lines()
        .find(|l| l.starts_with("opi01"))
        .unwrap_or_default();
    assert!(
        row.contains("failed at preflight") && row.contains(" yes "),
        "{out}"
    );
    assert!(out.ends_with("next: opi01 preflight\n"), "{out}");

    // The inventory changes: a resume is refused with what differs.
    let text_inv = std::fs::read_to_string(&inv).unwrap();
    std::fs::write(&inv, text_inv.replace("report = \"1s\"", "report = \"2s\"")).unwrap();
    let o = s.run(&["migrate"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the inventory changed since run "), "{err}");
    assert!(err.contains("  deadlines.report: \"1s\" → \"2s\""), "{err}");
    assert!(err.contains("--accept-changed-inventory"), "{err}");
    assert!(
        s.api.lease("kube-system", "cnishift-migration").is_none(),
        "lock released"
    );
}

#[test]
fn pause_and_resume_set_and_clear_the_annotation_on_the_migration_lease() {
    let s = setup("[\"true\"]");
    let o = s.run(&["pause"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no migration is running"));
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "laptop pid 1", "leaseDurationSeconds": 30}),
    );
    let o = s.run(&["pause"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let l = s.api.lease("kube-system", "cnishift-migration").unwrap();
    assert!(
        l["metadata"]["annotations"]["cnishift.io/paused"]
            .as_str()
            .unwrap()
            .contains(" at 20"),
        "{l}"
    );
    assert_eq!(
        l["spec"]["holderIdentity"], "laptop pid 1",
        "the holder is untouched"
    );
    let o = s.run(&["resume"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let l = s.api.lease("kube-system", "cnishift-migration").unwrap();
    assert!(
        l["metadata"]["annotations"]
            .get("cnishift.io/paused")
            .is_none(),
        "{l}"
    );
}

#[test]
fn rollback_cordons_drains_runs_the_hook_unlabels_waits_and_uncordons_journaled() {
    let s = setup("[\"true\"]");
    let inv = s.path("cluster.toml");
    let marker = s.path("rolled-back");
    let t = std::fs::read_to_string(&inv).unwrap().replace(
        "[hooks]\n",
        &format!(
            "[cilium]\nnode_label = \"cnishift.io/cni=cilium\"\n\n[hooks]\nrollback = [\"sh\", \"-c\", \"echo {{node}} {{role}} > {}\"]\n",
            marker.display()
        ),
    );
    std::fs::write(&inv, t).unwrap();
    let o = s.run(&["rollback", "raccoon00"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "raccoon00 worker\n"
    );
    let n = s.api.node("raccoon00").unwrap();
    assert!(
        n["spec"]["unschedulable"].is_null() || n["spec"]["unschedulable"] == false,
        "{n}"
    );
    assert!(
        n["metadata"]["labels"].get("cnishift.io/cni").is_none(),
        "{n}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.ends_with("raccoon00 is back on Flannel\n"), "{out}");
    let journal = std::fs::read_to_string(s.path("state/cnishift/lab/journal.jsonl")).unwrap();
    let types: Vec<&str> = journal
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            match v["rec"]["type"].as_str().unwrap() {
                "header" => "header",
                "intent" => "intent",
                "done" => "done",
                "rolled-back" => "rolled-back",
                other => panic!("{other}"),
            }
        })
        .collect();
    assert_eq!(types, ["header", "intent", "done", "rolled-back"]);
    let reasons: Vec<String> = s
        .api
        .events_about("Node", "raccoon00")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        reasons,
        [
            "MigrationCordoned",
            "MigrationDrainStarted",
            "MigrationDrained",
            "MigrationNodeReady",
            "MigrationUncordoned",
            "MigrationRollback"
        ]
    );
    assert!(
        s.api.lease("kube-system", "cnishift-migration").is_none(),
        "lock released"
    );
}

#[test]
fn a_rollback_whose_hook_fails_stops_there_leaves_the_node_cordoned_and_says_why() {
    let s = setup("[\"true\"]");
    let inv = s.path("cluster.toml");
    let t = std::fs::read_to_string(&inv).unwrap().replace(
        "[hooks]\n",
        "[hooks]\nrollback = [\"sh\", \"-c\", \"echo no flake for {node} >&2; exit 4\"]\n",
    );
    std::fs::write(&inv, t).unwrap();
    let o = s.run(&["rollback", "raccoon01"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rollback of raccoon01 failed: sh exited with status 4 (log ")
            && err.contains("no flake for raccoon01"),
        "{err}"
    );
    assert_eq!(
        s.api.node("raccoon01").unwrap()["spec"]["unschedulable"],
        true
    );
}

#[test]
fn the_migration_operations_against_the_api_label_repod_and_pause() {
    use cnishift::kube::Kube;
    use cnishift::migrate::live::KubeCluster;
    use cnishift::migrate::steps::{Cluster, Control};
    use cnishift_lab::apiserver::{Owner, Pod};
    use std::time::Duration;

    let s = setup("[\"true\"]");
    let url = String::from_utf8_lossy(&std::fs::read(s.path("kubeconfig")).unwrap())
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("server: ")
                .map(|u| u.trim().to_string())
        })
        .unwrap();
    s.api.add_daemonset_with_pods(
        "kube-system",
        "svclb",
        json!({"app": "svclb"}),
        &["raccoon00"],
        true,
    );
    s.api.add_pod(Pod {
        ns: "kube-system",
        name: "kube-proxy-static",
        node: "raccoon00",
        owner: Owner::Mirror,
        labels: json!({}),
        ready: true,
        empty_dir: false,
    });
    let inv =
        cnishift::inventory::Inventory::load(&s.path("cluster.toml"), Default::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let kube = Kube::for_url(&url, Duration::from_secs(2)).unwrap();
        assert!(kube
            .label_node("raccoon00", "cnishift.io/cni", "cilium")
            .await
            .unwrap());
        assert!(
            !kube
                .label_node("raccoon00", "cnishift.io/cni", "cilium")
                .await
                .unwrap(),
            "idempotent"
        );
        assert_eq!(
            s.api.node("raccoon00").unwrap()["metadata"]["labels"]["cnishift.io/cni"],
            "cilium"
        );
        let n = kube
            .repod(
                "raccoon00",
                Duration::from_secs(3),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        assert_eq!(n, 1, "the DaemonSet pod, not the mirror pod");
        assert!(s
            .api
            .daemon_pod_on("kube-system", "svclb", "raccoon00")
            .is_none());
        assert!(s.api.pod("kube-system", "kube-proxy-static").is_some());

        let cluster = KubeCluster {
            kube: &kube,
            inv: &inv,
            guard: None,
            identity: "test".into(),
        };
        s.api.put_lease(
            "kube-system",
            "cnishift-migration",
            json!({"holderIdentity": "test"}),
        );
        assert_eq!(cluster.control().await.unwrap(), Control::Run);
        kube.set_paused("kube-system", "cnishift-migration", Some("me".into()))
            .await
            .unwrap();
        assert_eq!(cluster.control().await.unwrap(), Control::Paused);
        kube.set_paused("kube-system", "cnishift-migration", None)
            .await
            .unwrap();
        assert_eq!(cluster.control().await.unwrap(), Control::Run);
    });
}
