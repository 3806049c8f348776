//! The real agent against a real etcd member (Debian's etcd-server, 3.4):
//! each test gives the member a network namespace of its own, so it listens
//! where k3s's does (`https://127.0.0.1:2379`) and the agent — run inside that
//! namespace, as it runs on a controller — asks the address it asks on a real
//! k3s server, with the certificates at k3s's paths under its host root. The
//! member keeps its own copy of its serving certificates, so a test can spoil
//! the agent's view (a missing pair, a stranger's certificate, another CA)
//! without touching the member.
//!
//! Observed the way a person would: `cnishift-agent report -o json`, and the
//! coordinator's own client calls over mutual TLS (GetEtcdStatus,
//! EtcdSnapshot) from a thread inside the namespace.

use std::fs;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnishift::agents::{self, CallError, ClientTls};
use cnishift::inventory::{Deadlines, Node, Role, Tls};
use cnishift_lab::cluster::binary;
use cnishift_lab::etcd::{self, Member, Pki};
use cnishift_lab::loopback;
use cnishift_lab::netns::Network;
use cnishift_lab::require_root;
use serde_json::Value;

/// One member in a namespace of its own, and a k3s server's host root for
/// the agent.
struct Single {
    net: Network,
    dir: tempfile::TempDir,
    member: Child,
    member_tls: PathBuf,
}

impl Single {
    fn start() -> Single {
        let mut net = Network::new().unwrap();
        let host = net.add_host("opi01").unwrap();
        let dir = tempfile::Builder::new()
            .prefix("cnishift-etcd-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("proc/1")).unwrap();
        // A k3s server, as the agent's k3s probe finds one.
        fs::write(root.join("proc/1/cmdline"), "/usr/local/bin/k3s\0server\0").unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "opi01\n").unwrap();
        let pki = Pki::new().unwrap();
        let agent_tls = root.join(etcd::TLS_DIR);
        pki.write_member(&agent_tls, "opi01", IpAddr::V4(host.address))
            .unwrap();
        let member_tls = dir.path().join("member-tls");
        fs::create_dir_all(&member_tls).unwrap();
        for e in fs::read_dir(&agent_tls).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), member_tls.join(e.file_name())).unwrap();
        }
        fs::create_dir_all(root.join(etcd::SNAPSHOT_DIR)).unwrap();
        let cluster = etcd::initial_cluster(&[("opi01".into(), IpAddr::V4(host.address))]);
        let log = dir.path().join("etcd.log");
        let data = root.join(etcd::DATA_DIR);
        let mut member = etcd::spawn(&Member {
            name: "opi01",
            netns: Some(&host.netns),
            peer_ip: IpAddr::V4(host.address),
            tls_dir: &member_tls,
            data_dir: &data,
            cluster: &cluster,
            token: "etcd-agent-test",
            log: &log,
        })
        .unwrap();
        etcd::wait_healthy(
            &mut [(
                "opi01",
                Some(host.netns.as_str()),
                member_tls.as_path(),
                &mut member,
                log.as_path(),
            )],
            Duration::from_secs(20),
        )
        .unwrap();
        Single {
            net,
            dir,
            member,
            member_tls,
        }
    }

    fn netns(&self) -> &str {
        &self.net.hosts[0].netns
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn tls(&self, file: &str) -> PathBuf {
        self.root().join(etcd::TLS_DIR).join(file)
    }

    /// `cnishift-agent report -o json` inside the member's namespace.
    fn report(&self) -> Value {
        let agent = binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap();
        let out = etcd::command_in(Some(self.netns()), &agent)
            .unwrap()
            .args([
                "report",
                "-o",
                "json",
                "--no-live-probes",
                "--node-name",
                "opi01",
            ])
            .arg("--host-root")
            .arg(self.root())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for Single {
    fn drop(&mut self) {
        let _ = self.member.kill();
        let _ = self.member.wait();
    }
}

fn check<'a>(r: &'a Value, id: &str) -> (&'a str, &'a str) {
    let c = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {r:#}"));
    (
        c["verdict"].as_str().unwrap(),
        c["message"].as_str().unwrap(),
    )
}

#[test]
fn the_agent_checks_its_member_as_etcdctl_does_and_says_which_certificate_worked() {
    if !require_root("etcd in a network namespace") || !etcd::require_etcd("the agent's etcd check")
    {
        return;
    }
    let mut lab = Single::start();

    // Healthy, with k3s's server-client.crt.
    let r = lab.report();
    let (v, m) = check(&r, "etcd.health");
    assert_eq!(v, "pass", "{m}");
    assert!(
        m.starts_with("healthy: a linearizable read answered in ")
            && m.ends_with("(https://127.0.0.1:2379, client certificate /var/lib/rancher/k3s/server/tls/etcd/server-client.crt)"),
        "{m}"
    );
    let e = &r["facts"]["etcd"];
    assert_eq!(e["members"].as_array().unwrap().len(), 1, "{e:#}");
    assert_eq!(e["members"][0]["name"], "opi01");
    let id = e["status"]["member_id"].as_u64().unwrap();
    assert_eq!(
        e["status"]["leader_id"].as_u64(),
        Some(id),
        "a single member leads"
    );
    assert_eq!(
        e["status"]["version"].as_str().map(|v| &v[..3]),
        Some("3.4")
    );
    let (v, m) = check(&r, "etcd.leader");
    assert_eq!(v, "pass");
    assert!(
        m.starts_with(&format!("leader opi01 ({id:x}), raft term ")),
        "{m}"
    );
    let (v, m) = check(&r, "etcd.members");
    assert_eq!(
        (v, m.split(':').next().unwrap()),
        ("pass", "1 voting of 1 members")
    );

    // No server-client pair: the runbook's client.crt works, and is named.
    let key = lab.tls("server-client.key");
    fs::rename(&key, key.with_extension("away")).unwrap();
    let r = lab.report();
    assert_eq!(check(&r, "etcd.health").0, "pass");
    let e = &r["facts"]["etcd"];
    assert_eq!(
        e["client_cert"],
        "/var/lib/rancher/k3s/server/tls/etcd/client.crt"
    );
    assert_eq!(
        e["attempts"][0]["error"],
        "/var/lib/rancher/k3s/server/tls/etcd/server-client.key does not exist"
    );
    assert!(e["attempts"][1]["error"].is_null(), "{e:#}");

    // ...and client.crt a stranger's: refused by the member, both tries named.
    let (c, k) = etcd::stranger().unwrap();
    fs::write(lab.tls("client.crt"), c).unwrap();
    fs::write(lab.tls("client.key"), k).unwrap();
    let r = lab.report();
    let (v, m) = check(&r, "etcd.health");
    assert_eq!(v, "fail");
    assert!(
        m.contains("no client certificate worked against https://127.0.0.1:2379: /var/lib/rancher/k3s/server/tls/etcd/server-client.crt: /var/lib/rancher/k3s/server/tls/etcd/server-client.key does not exist; /var/lib/rancher/k3s/server/tls/etcd/client.crt: the connection closed before any answer"),
        "{m}"
    );
    assert!(m.contains("BadCertificate") || m.contains("refused"), "{m}");
    assert!(r["facts"]["etcd"]["client_cert"].is_null());
    assert_eq!(check(&r, "etcd.members").0, "fail");
    assert_eq!(check(&r, "etcd.leader").0, "fail");
    assert!(
        !r["ready"].as_bool().unwrap(),
        "a failed etcd check fails the report"
    );

    // Both pairs back, but the CA the agent trusts is not the member's.
    fs::rename(key.with_extension("away"), &key).unwrap();
    let (c, _) = etcd::stranger().unwrap();
    fs::write(lab.tls("server-ca.crt"), c).unwrap();
    let r = lab.report();
    let (v, m) = check(&r, "etcd.health");
    assert_eq!(v, "fail");
    assert!(
        m.contains("server-client.crt: transport error: invalid peer certificate: UnknownIssuer (the member's serving certificate is not signed by /var/lib/rancher/k3s/server/tls/etcd/server-ca.crt)"),
        "{m}"
    );
    fs::copy(
        lab.member_tls.join("server-ca.crt"),
        lab.tls("server-ca.crt"),
    )
    .unwrap();
    assert_eq!(check(&lab.report(), "etcd.health").0, "pass");

    // The member stopped: refused, in the operating system's words; fast.
    lab.member.kill().unwrap();
    lab.member.wait().unwrap();
    let started = Instant::now();
    let r = lab.report();
    let (v, m) = check(&r, "etcd.health");
    assert_eq!(v, "fail");
    assert!(m.contains("Connection refused"), "{m}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (v, m) = check(&r, "etcd.leader");
    assert_eq!(
        (v, m),
        (
            "fail",
            "the member's status not read: the local member did not answer (see etcd.health)"
        )
    );
}

#[test]
fn a_worker_has_no_etcd_checks_and_a_server_without_etcd_is_warned_about() {
    let agent = binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap();
    let report = |cmdline: &str| -> Value {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("proc/1")).unwrap();
        fs::write(d.path().join("proc/1/cmdline"), cmdline).unwrap();
        let out = Command::new(&agent)
            .args([
                "report",
                "-o",
                "json",
                "--no-live-probes",
                "--node-name",
                "n",
            ])
            .arg("--host-root")
            .arg(d.path())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = report("/usr/local/bin/k3s\0agent\0");
    let ids: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .filter(|id| id.starts_with("etcd."))
        .collect();
    assert!(ids.is_empty(), "{ids:?}");
    let r = report("/usr/local/bin/k3s\0server\0");
    let (v, m) = check(&r, "etcd.member");
    assert_eq!(v, "warn");
    assert!(
        m.starts_with("no embedded etcd on this node (neither /var/lib/rancher/k3s/server/tls/etcd nor /var/lib/rancher/k3s/server/db/etcd exists)"),
        "{m}"
    );
}

/// `cnishift-agent serve` inside the member's namespace.
struct Served {
    child: Child,
    _state: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PORT: u16 = 7443;

fn serve(lab: &Single, pki: &loopback::Pki, command: &str, timeout: &str) -> Served {
    let agent = binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap();
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("agent.log");
    let child = etcd::command_in(Some(lab.netns()), &agent)
        .unwrap()
        .arg("serve")
        .arg(format!("--listen=127.0.0.1:{PORT}"))
        .arg("--tls-ca")
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("opi01.pem"))
        .arg("--tls-key")
        .arg(pki.path("opi01-key.pem"))
        .args(["--node-name", "opi01"])
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .arg("--host-root")
        .arg(lab.root())
        .args(["--etcd-snapshot-timeout", timeout])
        .env("CNISHIFT_ETCD_SNAPSHOT_COMMAND", command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !cnishift_lab::netns::is_listening(child.id(), PORT) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the agent does not listen: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Served {
        child,
        _state: state,
        log,
    }
}

/// Runs `f` on a thread inside `netns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = fs::File::open(Path::new("/run/netns").join(netns)).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace file we own.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

fn client(pki: &loopback::Pki, stem: &str) -> ClientTls {
    ClientTls::load(&Tls {
        ca: pki.path("ca.pem"),
        cert: pki.path(&format!("{stem}.pem")),
        key: pki.path(&format!("{stem}-key.pem")),
    })
    .unwrap()
}

fn opi01() -> Node {
    Node {
        name: "opi01".into(),
        role: Role::Controller,
        address: format!("127.0.0.1:{PORT}"),
    }
}

fn snapshot(
    netns: &str,
    tls: ClientTls,
    run: &str,
    timeout: Duration,
) -> Result<cnishift_proto::v1::EtcdSnapshotResult, CallError> {
    let run = run.to_string();
    in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(agents::etcd_snapshot(
            &opi01(),
            &tls,
            &Deadlines::default(),
            &run,
            timeout,
        ))
    })
}

#[test]
fn the_snapshot_rpc_is_the_coordinators_bounded_and_its_file_is_a_real_snapshot() {
    if !require_root("etcd in a network namespace") || !etcd::require_etcd("EtcdSnapshot") {
        return;
    }
    let lab = Single::start();
    let pki = loopback::Pki::new(&["opi01"]).unwrap();
    let served = serve(&lab, &pki, &etcd::snapshot_command(&lab.root()), "10s");
    let ns = lab.netns().to_string();

    // Read-only for any identity of the cluster: the node's own may ask.
    let status = {
        let tls = client(&pki, "opi01");
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(agents::etcd_status(&opi01(), &tls, &Deadlines::default()))
        })
    }
    .unwrap();
    assert!(status.present && status.healthy, "{status:?}");
    assert_eq!(
        status.client_cert,
        "/var/lib/rancher/k3s/server/tls/etcd/server-client.crt"
    );
    assert_eq!(status.members.len(), 1);
    assert_eq!(status.leader_id, status.member_id);

    // Changing: refused to anyone but the coordinator, before anything runs.
    let e = snapshot(&ns, client(&pki, "opi01"), "run-1", Duration::ZERO).unwrap_err();
    assert!(
        matches!(&e, CallError::Rpc { code, message } if code == "PermissionDenied" && message.contains("EtcdSnapshot changes the node")),
        "{e}"
    );
    // Hostile names never reach the command.
    for bad in ["../../etc", "a/b", ".."] {
        let e = snapshot(&ns, client(&pki, "coordinator"), bad, Duration::ZERO).unwrap_err();
        assert!(
            matches!(&e, CallError::Rpc { code, .. } if code == "InvalidArgument"),
            "{bad:?}: {e}"
        );
    }
    let snaps = lab.root().join(etcd::SNAPSHOT_DIR);
    assert_eq!(
        fs::read_dir(&snaps).unwrap().count(),
        0,
        "nothing was written"
    );

    // The coordinator's: etcdctl snapshot save, the file found and sized.
    let t = snapshot(&ns, client(&pki, "coordinator"), "run-1", Duration::ZERO).unwrap();
    let name = t
        .path
        .strip_prefix("/var/lib/rancher/k3s/server/db/snapshots/cnishift-pre-run-1-opi01-")
        .unwrap_or_else(|| panic!("{t:?}"));
    assert!(name.parse::<u64>().is_ok(), "k3s-like name: {t:?}");
    let file = lab.root().join(t.path.trim_start_matches('/'));
    assert_eq!(fs::metadata(&file).unwrap().len(), t.size_bytes);
    assert!(t.size_bytes > 0);
    let out = Command::new(etcd::tool("etcdctl").unwrap())
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["totalKey"].as_u64().is_some(), "{st}");
    drop(served);

    // A hanging command: bounded by the agent, its error says so.
    let served = serve(&lab, &pki, "sh -c 'sleep 60'", "1s");
    let started = Instant::now();
    let e = snapshot(&ns, client(&pki, "coordinator"), "run-2", Duration::ZERO).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(&e, CallError::Rpc { code, message } if code == "FailedPrecondition" && message.contains("did not finish within 1s; killed")),
        "{e}\n{}",
        fs::read_to_string(&served.log).unwrap_or_default()
    );
    drop(served);

    // A failing one: its exit status and its own words.
    let served = serve(
        &lab,
        &pki,
        "sh -c 'echo \"Error: context deadline exceeded\" >&2; exit 1'",
        "10s",
    );
    let e = snapshot(&ns, client(&pki, "coordinator"), "run-3", Duration::ZERO).unwrap_err();
    assert!(
        matches!(&e, CallError::Rpc { code, message } if code == "FailedPrecondition"
            && message.ends_with("exited 1; its output ends: Error: context deadline exceeded")),
        "{e}"
    );
    drop(served);
}

#[test]
fn a_bad_snapshot_command_stops_the_agent_at_start() {
    let pki = loopback::Pki::new(&["opi01"]).unwrap();
    let agent = binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(agent)
        .arg("serve")
        .arg("--listen=127.0.0.1:0")
        .arg("--tls-ca")
        .arg(pki.path("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.path("opi01.pem"))
        .arg("--tls-key")
        .arg(pki.path("opi01-key.pem"))
        .args(["--node-name", "opi01"])
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .args([
            "--etcd-snapshot-command",
            "k3s etcd-snapshot save --name {name}",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "cnishift-agent serve: --etcd-snapshot-command: etcd snapshot command \"k3s etcd-snapshot save --name {name}\": unknown placeholder {name}; known: {run}, {node}"
    );
}
