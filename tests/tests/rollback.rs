//! The dead-man rollback with real processes on loopback and real mutual TLS:
//! the agent binary, its state directory, kill -9 and restarts, and the
//! coordinator's client calls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnishift::agents::{self, ClientTls};
use cnishift::inventory::{Deadlines, Node, Role, Tls};
use cnishift_lab::cluster::binary;
use cnishift_lab::loopback::{free_port, Pki};
use cnishift_lab::netns::is_listening;
use cnishift_proto::v1 as pb;
use cnishift_proto::v1::node_agent_client::NodeAgentClient;

/// One agent whose state directory outlives its process (so it can be
/// killed and started again on the same state).
struct Agent {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    pki: PathBuf,
    extra: Vec<String>,
}

impl Agent {
    fn start(pki: &Path, extra: &[&str]) -> Agent {
        let mut a = Agent {
            child: None,
            port: free_port().unwrap(),
            dir: tempfile::Builder::new()
                .prefix("cnishift-rb-")
                .tempdir()
                .unwrap(),
            pki: pki.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.spawn();
        a
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn count_file(&self) -> PathBuf {
        self.dir.path().join("count")
    }
    fn runs(&self) -> usize {
        std::fs::read_to_string(self.count_file())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let extra: Vec<String> = self
            .extra
            .iter()
            .map(|e| e.replace("COUNT", &self.count_file().display().to_string()))
            .collect();
        let child = Command::new(binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap())
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--tls-ca")
            .arg(self.pki.join("ca.pem"))
            .arg("--tls-cert")
            .arg(self.pki.join("raccoon00.pem"))
            .arg("--tls-key")
            .arg(self.pki.join("raccoon00-key.pem"))
            .args(["--node-name", "raccoon00"])
            .arg("--state-dir")
            .arg(self.state())
            .args(&extra)
            .env("RUST_LOG", "info")
            .env_remove("CNISHIFT_ROLLBACK_COMMAND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.child = Some(child);
        let start = Instant::now();
        while !is_listening(pid, self.port) {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited ({s}):\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn node(&self) -> Node {
        Node {
            name: "raccoon00".into(),
            role: Role::Worker,
            address: format!("127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn client_tls(pki: &Path, stem: &str) -> ClientTls {
    ClientTls::load(&Tls {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{stem}.pem")),
        key: pki.join(format!("{stem}-key.pem")),
    })
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn state(rt: &tokio::runtime::Runtime, a: &Agent, tls: &ClientTls) -> pb::ArmState {
    rt.block_on(agents::arm_state(&a.node(), tls, &Deadlines::default()))
        .unwrap()
}

/// Waits until the agent reports an outcome other than "" and "running".
fn wait_outcome(
    rt: &tokio::runtime::Runtime,
    a: &Agent,
    tls: &ClientTls,
    limit: Duration,
) -> pb::ArmState {
    let start = Instant::now();
    loop {
        let s = state(rt, a, tls);
        if !s.outcome.is_empty() && s.outcome != "running" {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "no outcome after {limit:?}: {s:?}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const COUNTING: &str = "sh -c \"echo rolled back {node} >> COUNT\"";

#[test]
fn unconfirmed_the_action_runs_exactly_once_and_is_reported() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let a = Agent::start(pki.dir.path(), &["--rollback-command", COUNTING]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    let armed = rt
        .block_on(agents::arm_rollback(
            &a.node(),
            &tls,
            &d,
            "run-1",
            Duration::from_secs(2),
        ))
        .unwrap();
    assert!(armed.armed && armed.remaining_ms > 1500, "{armed:?}");
    assert_eq!(
        armed.target,
        format!(
            "`sh -c echo rolled back raccoon00 >> {}`",
            a.count_file().display()
        )
    );
    assert_eq!(a.runs(), 0);
    let s = wait_outcome(&rt, &a, &tls, Duration::from_secs(6));
    assert_eq!(
        (s.outcome.as_str(), s.fired, s.attempts, s.armed),
        ("succeeded", true, 1, false),
        "{s:?}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(a.runs(), 1, "exactly one run");
    assert_eq!(
        std::fs::read_to_string(a.count_file()).unwrap(),
        "rolled back raccoon00\n"
    );
    // The report carries the same state.
    let r = rt
        .block_on(agents::get_report(&a.node(), &tls, &d))
        .unwrap();
    assert_eq!(r.arm_state.unwrap().outcome, "succeeded");
    // And so does the state on disk, read without the server.
    let out = Command::new(binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap())
        .args(["arm-state", "-o", "json", "--state-dir"])
        .arg(a.state())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "succeeded");
    assert_eq!(v["run_id"], "run-1");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn confirmed_over_a_new_connection_in_time_never_runs_and_on_the_arming_one_is_refused() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let a = Agent::start(pki.dir.path(), &["--rollback-command", COUNTING]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    rt.block_on(async {
        let ch = agents::connect(&a.node(), &tls, &d).await.unwrap();
        let mut c = NodeAgentClient::new(ch);
        c.arm_rollback(pb::ArmRequest {
            run_id: "run-2".into(),
            timeout_ms: 2000,
        })
        .await
        .unwrap();
        let e = c
            .confirm(pb::ConfirmRequest {
                run_id: "run-2".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().starts_with(
                "Confirm came over the connection that armed; it must come over a new connection"
            ),
            "{}",
            e.message()
        );
    });
    // A second run id is refused, naming the holder.
    let e = rt
        .block_on(agents::arm_rollback(
            &a.node(),
            &tls,
            &d,
            "run-x",
            Duration::from_secs(5),
        ))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("agent error FailedPrecondition: already armed by run run-2 ("),
        "{e}"
    );
    let s = rt
        .block_on(agents::confirm(&a.node(), &tls, &d, "run-2"))
        .unwrap();
    assert_eq!(s.outcome, "confirmed");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.runs(), 0, "a confirmed switch never rolls back");
    assert_eq!(state(&rt, &a, &tls).outcome, "confirmed");
}

#[test]
fn killed_while_armed_the_restarted_agent_keeps_the_deadline_and_fires() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let mut a = Agent::start(pki.dir.path(), &["--rollback-command", COUNTING]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    let armed_at = Instant::now();
    rt.block_on(agents::arm_rollback(
        &a.node(),
        &tls,
        &d,
        "run-3",
        Duration::from_secs(4),
    ))
    .unwrap();
    a.kill9();
    std::thread::sleep(Duration::from_millis(500));
    a.spawn();
    let s = state(&rt, &a, &tls);
    let expected = 4000u64.saturating_sub(armed_at.elapsed().as_millis() as u64);
    assert!(s.armed && !s.rebooted_while_armed, "{s:?}");
    assert!(
        s.remaining_ms.abs_diff(expected) <= 500,
        "remaining {} ms, expected {expected} ± 500 ms",
        s.remaining_ms
    );
    let s = wait_outcome(&rt, &a, &tls, Duration::from_secs(8));
    assert_eq!(s.outcome, "succeeded");
    let fired_after = armed_at.elapsed();
    assert!(
        fired_after >= Duration::from_millis(3900) && fired_after < Duration::from_millis(5500),
        "fired after {fired_after:?}, armed for 4 s"
    );
    assert_eq!(a.runs(), 1);
}

#[test]
fn a_new_boot_restarts_the_countdown_and_nothing_fires_at_start() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let root = tempfile::tempdir().unwrap();
    let boot = root.path().join("proc/sys/kernel/random/boot_id");
    std::fs::create_dir_all(boot.parent().unwrap()).unwrap();
    std::fs::write(&boot, "11111111-aaaa\n").unwrap();
    let host_root = root.path().display().to_string();
    let mut a = Agent::start(
        pki.dir.path(),
        &[
            "--rollback-command",
            COUNTING,
            "--host-root",
            &host_root,
            "--no-live-probes",
        ],
    );
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    rt.block_on(agents::arm_rollback(
        &a.node(),
        &tls,
        &d,
        "run-4",
        Duration::from_secs(3),
    ))
    .unwrap();
    a.kill9();
    // The node is "down" for longer than the whole timeout, then boots anew.
    std::thread::sleep(Duration::from_millis(3200));
    std::fs::write(&boot, "22222222-bbbb\n").unwrap();
    a.spawn();
    let s = state(&rt, &a, &tls);
    assert!(s.armed && s.rebooted_while_armed && !s.fired, "{s:?}");
    assert!(s.remaining_ms > 2500, "the whole timeout again: {s:?}");
    assert_eq!(a.runs(), 0, "nothing fired at start");
    let s = wait_outcome(&rt, &a, &tls, Duration::from_secs(6));
    assert_eq!(s.outcome, "succeeded");
    assert_eq!(a.runs(), 1);
}

#[test]
fn a_failing_or_hanging_action_is_bounded_reported_failed_and_not_rerun() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    for (cmd, expect) in [
        (
            "sh -c \"echo attempt >> COUNT; echo disk full >&2; exit 3\"",
            "exited 3",
        ),
        (
            "sh -c \"echo attempt >> COUNT; sleep 60\"",
            "did not finish within 1s; killed",
        ),
    ] {
        let a = Agent::start(
            pki.dir.path(),
            &["--rollback-command", cmd, "--rollback-timeout", "1s"],
        );
        rt.block_on(agents::arm_rollback(
            &a.node(),
            &tls,
            &d,
            "run-5",
            Duration::from_secs(1),
        ))
        .unwrap();
        let t = Instant::now();
        let s = wait_outcome(&rt, &a, &tls, Duration::from_secs(6));
        assert!(t.elapsed() < Duration::from_secs(4));
        assert_eq!((s.outcome.as_str(), s.attempts), ("failed", 1), "{s:?}");
        assert!(
            s.message.starts_with("the rollback FAILED: ") && s.message.ends_with(expect),
            "{}",
            s.message
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(a.runs(), 1, "not re-run");
        assert!(
            a.log()
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("the rollback FAILED")),
            "{}",
            a.log()
        );
        // Failed is never reported as success: the CLI exits 1 on it.
        let inv = inventory(pki.dir.path(), &a);
        let out = Command::new(binary("cnishift", "CNISHIFT_BIN").unwrap())
            .args(["node", "arm-state", "raccoon00", "-o", "json", "-i"])
            .arg(&inv)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["result"]["outcome"], "failed");
        if expect == "exited 3" {
            assert!(v["result"]["output_tail"]
                .as_str()
                .unwrap()
                .contains("disk full"));
        }
        // A new run is refused until the failure is acknowledged.
        let e = rt
            .block_on(agents::arm_rollback(
                &a.node(),
                &tls,
                &d,
                "run-6",
                Duration::from_secs(5),
            ))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the last rollback (run run-5) failed"),
            "{e}"
        );
    }
}

#[test]
fn an_agent_killed_during_the_action_runs_it_once_more_then_holds() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let cmd = "sh -c \"echo attempt >> COUNT; sleep 30\"";
    let mut a = Agent::start(pki.dir.path(), &["--rollback-command", cmd]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    rt.block_on(agents::arm_rollback(
        &a.node(),
        &tls,
        &d,
        "run-7",
        Duration::from_secs(1),
    ))
    .unwrap();
    let wait_runs = |a: &Agent, n: usize| {
        let t = Instant::now();
        while a.runs() < n {
            assert!(t.elapsed() < Duration::from_secs(6), "{}", a.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Killing the agent takes its action with it (systemd kills the unit's
    // whole cgroup; here: the action's process group).
    let kill_all = |a: &mut Agent| {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &a.count_file().display().to_string()])
            .status();
        a.kill9();
    };
    wait_runs(&a, 1);
    kill_all(&mut a);
    a.spawn();
    wait_runs(&a, 2);
    let s = state(&rt, &a, &tls);
    assert_eq!((s.outcome.as_str(), s.attempts), ("running", 2), "{s:?}");
    kill_all(&mut a);
    a.spawn();
    let s = state(&rt, &a, &tls);
    assert_eq!(s.outcome, "interrupted", "{s:?}");
    assert!(
        s.message.contains("a person must look at this node"),
        "{}",
        s.message
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(a.runs(), 2, "no third run");
}

#[test]
fn only_the_coordinator_may_arm_confirm_disarm_or_dial() {
    let pki = Pki::new(&["raccoon00", "raccoon01"]).unwrap();
    let a = Agent::start(pki.dir.path(), &["--rollback-command", COUNTING]);
    let agent_tls = client_tls(pki.dir.path(), "raccoon01");
    let rt = rt();
    let d = Deadlines::default();
    let n = a.node();
    let denied = |r: Result<pb::ArmState, agents::CallError>| {
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("agent error PermissionDenied: "), "{e}");
    };
    denied(rt.block_on(agents::arm_rollback(
        &n,
        &agent_tls,
        &d,
        "r",
        Duration::from_secs(5),
    )));
    denied(rt.block_on(agents::confirm(&n, &agent_tls, &d, "r")));
    denied(rt.block_on(agents::disarm(&n, &agent_tls, &d, "r")));
    let e = rt
        .block_on(agents::dial_from_node(
            &n,
            &agent_tls,
            &d,
            pb::DialRequest {
                address: "127.0.0.1:1".into(),
                ..Default::default()
            },
        ))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("agent error PermissionDenied: "), "{e}");
    // Reading is allowed to any cluster identity.
    assert_eq!(state(&rt, &a, &agent_tls).message, "never armed");
}

#[test]
fn dial_from_node_reports_the_peer_certificate_or_the_error() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let a = Agent::start(pki.dir.path(), &["--rollback-command", COUNTING]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let d = Deadlines::default();
    // The agent dials its own TLS listener: a real handshake, peer reported.
    let r = rt
        .block_on(agents::dial_from_node(
            &a.node(),
            &tls,
            &d,
            pb::DialRequest {
                address: a.node().address,
                tls: true,
                server_name: "raccoon00".into(),
                timeout_ms: 2000,
            },
        ))
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert!(r.peer_sans.contains(&"raccoon00".to_string()), "{r:?}");
    assert_eq!(r.tls_version, "TLSv1_3");
    assert!(!r.peer_chain_der.is_empty());
    let closed = free_port().unwrap();
    let r = rt
        .block_on(agents::dial_from_node(
            &a.node(),
            &tls,
            &d,
            pb::DialRequest {
                address: format!("127.0.0.1:{closed}"),
                ..Default::default()
            },
        ))
        .unwrap();
    assert!(!r.ok && r.error.contains("Connection refused"), "{r:?}");
    let e = rt
        .block_on(agents::dial_from_node(
            &a.node(),
            &tls,
            &d,
            pb::DialRequest {
                address: "../../etc:80".into(),
                ..Default::default()
            },
        ))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "agent error InvalidArgument: address \"../../etc:80\": \"../../etc\" is not an IP address or DNS name"
    );
}

#[test]
fn an_agent_without_a_rollback_action_refuses_to_arm_and_a_bad_template_refuses_to_start() {
    let pki = Pki::new(&["raccoon00"]).unwrap();
    let a = Agent::start(pki.dir.path(), &[]);
    let tls = client_tls(pki.dir.path(), "coordinator");
    let rt = rt();
    let e = rt
        .block_on(agents::arm_rollback(
            &a.node(),
            &tls,
            &Deadlines::default(),
            "r",
            Duration::from_secs(5),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("agent error Unavailable: no rollback action on this node"),
        "{e}"
    );
    let out = Command::new(binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rollback-command",
            "undo {nodes}",
            "--tls-ca",
        ])
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("raccoon00.pem"))
        .arg("--tls-key")
        .arg(pki.path("raccoon00-key.pem"))
        .args(["--node-name", "raccoon00", "--state-dir"])
        .arg(a.dir.path().join("other-state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "cnishift-agent serve: --rollback-command: rollback command \"undo {nodes}\": unknown placeholder {nodes}; known: {node}, {generation}"
    );
}

fn inventory(pki: &Path, a: &Agent) -> PathBuf {
    let p = a.dir.path().join("cluster.toml");
    std::fs::write(
        &p,
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[[nodes]]\nname = \"raccoon00\"\nrole = \"worker\"\naddress = \"{}\"\n",
            pki.join("ca.pem").display(),
            pki.join("coordinator.pem").display(),
            pki.join("coordinator-key.pem").display(),
            a.node().address
        ),
    )
    .unwrap();
    p
}
