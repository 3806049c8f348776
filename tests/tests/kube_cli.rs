//! The `cnishift` binary's Kubernetes commands against the simulated API
//! server: kubeconfig resolution, the lock between two real coordinator
//! processes, a stale lock, the cluster gates' exit codes, and an API server
//! that is down.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cnishift_lab::apiserver::{kubeconfig, ApiServer};
use serde_json::{json, Value};

struct Setup {
    api: ApiServer,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

const NODES: [&str; 3] = ["opi01", "raccoon00", "raccoon01"];

fn setup() -> Setup {
    let api = ApiServer::new();
    for (i, n) in NODES.iter().enumerate() {
        api.add_node(n, i == 0, true);
    }
    api.add_homelab_workload(&NODES);
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
        inventory(&addr.to_string()),
    )
    .unwrap();
    Setup {
        api,
        addr,
        dir,
        _rt: rt,
    }
}

fn inventory(vip: &str) -> String {
    let mut s = format!(
        "[cluster]\nname = \"lab\"\napi_vip = \"{vip}\"\ncilium_namespace = \"cilium\"\n\n\
         [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator-key.pem\"\n\n\
         [deadlines]\ndrain = \"3s\"\napi = \"2s\"\nnode_ready = \"2s\"\nlock_ttl = \"900ms\"\n\n[drain]\nretry_interval = \"200ms\"\n"
    );
    for (i, n) in NODES.iter().enumerate() {
        let role = if i == 0 { "controller" } else { "worker" };
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{n}\"\nrole = \"{role}\"\naddress = \"10.1.0.{}:7443\"\n",
            10 + i
        ));
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
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cnishift());
        c.env("KUBECONFIG", self.path("kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("CNISHIFT_INVENTORY", self.path("cluster.toml"))
            .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
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
fn a_second_coordinator_is_refused_and_told_who_holds_the_lock() {
    let s = setup();
    let first = blocked_drain(&s);
    let pid = first.id();
    let second = s.run(&["node", "cordon", "raccoon01"]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another coordinator is migrating this cluster"),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains(" since 20"),
        "who and since when: {err}"
    );
    assert!(
        s.api.node("raccoon01").unwrap()["spec"]["unschedulable"].is_null(),
        "the refused coordinator changed nothing"
    );

    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(1), "{}", text(&first));
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("PodDisruptionBudget shop/db-pdb"), "{err}");
    assert!(
        s.api.lease("kube-system", "cnishift-migration").is_none(),
        "released on the way out"
    );
    let reasons: Vec<String> = s
        .api
        .events_about("Node", "raccoon00")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap(),
                e["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "Normal MigrationCordoned",
            "Normal MigrationDrainStarted",
            "Warning MigrationDrainFailed"
        ]
    );

    let again = s.run(&["node", "cordon", "raccoon01", "-o", "json"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["was_cordoned"], false);
}

#[test]
fn the_fresh_lock_of_a_dead_coordinator_on_this_machine_is_taken_over_at_once() {
    let s = setup();
    // What a `cnishift migrate` killed with SIGKILL leaves: a Lease renewed
    // a moment ago by `user@this-host pid N`, and no process N.
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let holder = format!("{user}@{} pid {pid}", host.trim());
    let now = "2030-01-01T00:00:00.000000Z";
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": holder, "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now}),
    );
    let taken = s.run(&["node", "cordon", "raccoon00"]);
    assert_eq!(taken.status.code(), Some(0), "{}", text(&taken));
    assert!(
        String::from_utf8_lossy(&taken.stderr).contains("whose process is gone"),
        "{}",
        text(&taken)
    );
    // A live holder elsewhere, renewed just now, still refuses.
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "alice@laptop pid 7", "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now}),
    );
    let refused = s.run(&["node", "cordon", "raccoon01"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
}

#[test]
fn a_stale_lock_needs_the_flag_and_lock_status_and_release_say_what_they_do() {
    let s = setup();
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "ghost@gone pid 1", "leaseDurationSeconds": 30,
        "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:10:00.000000Z"}),
    );
    let status = s.run(&["lock", "status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("held by ghost@gone pid 1")
            && String::from_utf8_lossy(&status.stdout).contains("STALE"),
        "{}",
        text(&status)
    );
    let refused = s.run(&["node", "cordon", "raccoon00"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--take-over-stale-lock"),
        "{}",
        text(&refused)
    );
    assert!(s.api.node("raccoon00").unwrap()["spec"]["unschedulable"].is_null());
    let taken = s.run(&["node", "cordon", "raccoon00", "--take-over-stale-lock"]);
    assert_eq!(taken.status.code(), Some(0), "{}", text(&taken));
    assert_eq!(
        s.api.node("raccoon00").unwrap()["spec"]["unschedulable"],
        true
    );
    let free = s.run(&["lock", "status", "-o", "json"]);
    assert_eq!(
        String::from_utf8_lossy(&free.stdout).trim(),
        "null",
        "{}",
        text(&free)
    );

    // A fresh lease of someone else: release needs --force and says whose it was.
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "bob@laptop pid 9", "leaseDurationSeconds": 30,
        "acquireTime": "2099-01-01T00:00:00.000000Z", "renewTime": "2099-01-01T00:00:00.000000Z"}),
    );
    let no_force = s.run(&["lock", "release"]);
    assert_eq!(no_force.status.code(), Some(2), "{}", text(&no_force));
    assert!(s.api.lease("kube-system", "cnishift-migration").is_some());
    let forced = s.run(&["lock", "release", "--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced));
    assert!(String::from_utf8_lossy(&forced.stdout).contains("bob@laptop pid 9"));
    assert!(s.api.lease("kube-system", "cnishift-migration").is_none());
}

#[test]
fn cluster_check_exit_codes_and_json() {
    let s = setup();
    let ok = s.run(&["cluster", "check", "-o", "json"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let gates: Value = serde_json::from_slice(&ok.stdout).unwrap();
    let ids: Vec<&str> = gates
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "nodes.ready",
            "pdbs.blocking",
            "pods.healthy",
            "cilium.daemonset",
            "api.vip"
        ]
    );
    assert_eq!(gates[4]["verdict"], "pass", "{gates}");

    s.api.set_node_ready("raccoon01", false);
    let bad = s.run(&["cluster", "check"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("✗ nodes.ready") && l.contains("raccoon01")),
        "{out}"
    );
    assert!(out.contains("1 gate(s) failed"), "{out}");
}

fn write_kubeconfig(path: &Path, contexts: &[(&str, String)], current: &str) {
    let mut s = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    for (name, server) in contexts {
        s.push_str(&format!(
            "- name: {name}\n  cluster:\n    server: {server}\n"
        ));
    }
    s.push_str("users:\n- name: u\n  user:\n    token: t\ncontexts:\n");
    for (name, _) in contexts {
        s.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}\n    user: u\n"
        ));
    }
    s.push_str(&format!("current-context: {current}\n"));
    std::fs::write(path, s).unwrap();
}

#[test]
fn kubeconfig_resolution_context_flag_and_an_api_server_that_is_down() {
    let s = setup();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let multi = s.path("multi");
    write_kubeconfig(
        &multi,
        &[
            ("down", format!("http://{closed}")),
            ("lab", format!("http://{}", s.addr)),
        ],
        "down",
    );

    // The current context is down: bounded, clear, exit 2 (nothing was done).
    let started = Instant::now();
    let down = s.run(&[
        "node",
        "cordon",
        "raccoon00",
        "--kubeconfig",
        multi.to_str().unwrap(),
    ]);
    assert_eq!(down.status.code(), Some(2), "{}", text(&down));
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = String::from_utf8_lossy(&down.stderr).to_lowercase();
    assert!(
        err.contains("cannot be reached") && err.contains("refused"),
        "{err}"
    );
    let gates = s.run(&["cluster", "check", "--kubeconfig", multi.to_str().unwrap()]);
    assert_eq!(gates.status.code(), Some(1), "{}", text(&gates));

    // --context picks the live one; KUBECONFIG is read when --kubeconfig is absent.
    let mut c = s.cmd(&["node", "cordon", "raccoon00", "--context", "lab"]);
    c.env("KUBECONFIG", &multi);
    let live = c.output().unwrap();
    assert_eq!(live.status.code(), Some(0), "{}", text(&live));
    assert_eq!(
        s.api.node("raccoon00").unwrap()["spec"]["unschedulable"],
        true
    );
    let nope = s.run(&[
        "cluster",
        "check",
        "--kubeconfig",
        multi.to_str().unwrap(),
        "--context",
        "nope",
    ]);
    assert_eq!(nope.status.code(), Some(2), "{}", text(&nope));
    assert!(
        String::from_utf8_lossy(&nope.stderr).contains("nope"),
        "{}",
        text(&nope)
    );

    // A node that is not in the inventory is never touched.
    let stranger = s.run(&["node", "cordon", "elsewhere"]);
    assert_eq!(stranger.status.code(), Some(2), "{}", text(&stranger));
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("not in"),
        "{}",
        text(&stranger)
    );
}

#[test]
fn preflight_with_cluster_adds_the_gates_and_a_failed_gate_makes_it_not_ready() {
    use cnishift_lab::loopback::{Agent, Pki};
    let s = setup();
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let root = tempfile::tempdir().unwrap();
    cnishift_lab::hostroot::build(root.path(), "raccoon00", cnishift::inventory::Role::Worker)
        .unwrap();
    let agent = Agent::start(
        pki.dir.path(),
        "raccoon00",
        "raccoon00",
        &[
            "--host-root",
            root.path().to_str().unwrap(),
            "--no-live-probes",
        ],
    )
    .unwrap();
    let inv = format!(
        "[cluster]\napi_vip = \"{}\"\ncilium_namespace = \"cilium\"\n\n[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/coordinator.pem\"\nkey = \"{p}/coordinator-key.pem\"\n\n\
         [[nodes]]\nname = \"raccoon00\"\nrole = \"worker\"\naddress = \"{}\"\n",
        s.addr,
        agent.address(),
        p = pki.dir.path().display()
    );
    std::fs::write(s.path("preflight.toml"), inv).unwrap();
    let inv = s.path("preflight.toml");
    let run = || {
        s.run(&[
            "preflight",
            "--cluster",
            "-o",
            "json",
            "-i",
            inv.to_str().unwrap(),
        ])
    };

    let ok = run();
    let v: Value =
        serde_json::from_slice(&ok.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&ok)));
    assert_eq!(v["nodes"][0]["status"], "ready", "{}", text(&ok));
    assert_eq!(v["cluster"].as_array().unwrap().len(), 5, "{v}");
    assert_eq!(v["ready"], true, "{}", text(&ok));
    assert_eq!(ok.status.code(), Some(0));

    s.api.set_node_ready("raccoon01", false);
    let bad = run();
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(
        v["nodes"][0]["status"], "ready",
        "the agent's node is still ready"
    );
    assert_eq!(v["cluster"][0]["verdict"], "fail");
    assert_eq!(
        v["ready"], false,
        "a failed gate makes the preflight not ready"
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));

    // Without --cluster nothing asks the API server.
    let before = s.api.faults().requests();
    let plain = s.run(&["preflight", "-o", "json", "-i", inv.to_str().unwrap()]);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain));
    let v: Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(v.get("cluster").is_none());
    assert_eq!(s.api.faults().requests(), before);
}

/// Starts a drain of raccoon00 that a budget keeps waiting; returns once it holds the lock.
fn blocked_drain(s: &Setup) -> std::process::Child {
    s.api
        .add_deployment("shop", "db", json!({"app": "db"}), 1, &["raccoon00"]);
    s.api
        .add_pdb("shop", "db-pdb", json!({"app": "db"}), None, Some(0));
    let child = s
        .cmd(&["node", "drain", "raccoon00"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while s.api.lease("kube-system", "cnishift-migration").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn a_drain_stops_when_its_lock_is_taken_and_releases_it_on_sigterm() {
    let s = setup();
    let child = blocked_drain(&s);
    std::thread::sleep(Duration::from_millis(200));
    s.api.put_lease(
        "kube-system",
        "cnishift-migration",
        json!({"holderIdentity": "intruder@elsewhere pid 3", "leaseDurationSeconds": 30}),
    );
    let stolen_at = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        stolen_at.elapsed() < Duration::from_millis(1500),
        "stopped at the next renewal: {:?}",
        stolen_at.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lock") && err.contains("lost") && err.contains("intruder@elsewhere"),
        "{err}"
    );
    assert_eq!(
        s.api.lease("kube-system", "cnishift-migration").unwrap()["spec"]["holderIdentity"],
        "intruder@elsewhere pid 3",
        "a lost lock is not deleted on the way out"
    );

    let s = setup();
    let child = blocked_drain(&s);
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        text(&out)
    );
    assert!(
        s.api.lease("kube-system", "cnishift-migration").is_none(),
        "released on SIGTERM"
    );
}

#[test]
fn bad_kubeconfigs_get_a_clear_error_and_exit_2() {
    let s = setup();
    let garbage = s.path("garbage");
    std::fs::write(&garbage, "clusters: [this is: not: yaml\n\u{0}\u{1}").unwrap();
    let truncated = s.path("truncated");
    let full = std::fs::read_to_string(s.path("kubeconfig")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let missing = s.path("missing");
    for (file, expect) in [
        (&garbage, "garbage"),
        (&truncated, "truncated"),
        (&missing, "missing"),
        (
            &s.dir.path().to_path_buf(),
            s.dir.path().file_name().unwrap().to_str().unwrap(),
        ),
    ] {
        let started = Instant::now();
        let o = s.run(&["cluster", "check", "--kubeconfig", file.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("cnishift: kubeconfig: ") && err.contains(expect),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // KUBECONFIG naming nothing usable, and no in-cluster service account.
    let o = s
        .cmd(&["cluster", "check"])
        .env("KUBECONFIG", &missing)
        .env("HOME", s.dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--kubeconfig"),
        "says what to do: {}",
        text(&o)
    );
}
