//! What a migrated node looks like: Cilium's own health over its unix socket
//! (a fake Cilium API that answers Ok, Failure, garbage, or hangs), the one
//! rule for the CNI directory containerd reads, and verdicts judged against
//! the expectation (before: Flannel; after: Cilium).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::*;

const CILIUM_CONFLIST: &str = r#"{"cniVersion":"0.3.1","name":"cilium","plugins":[{"type":"cilium-cni","enable-debug":false}]}"#;
const FLANNEL_CONFLIST: &str = r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
const K3S_DIR: &str = "var/lib/rancher/k3s/agent/etc/cni/net.d";
const CONTAINERD: &str = "var/lib/rancher/k3s/agent/etc/containerd/config.toml";

fn containerd(conf_dir: &str) -> String {
    format!("version = 3\n[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dir = \"/opt/cni/bin\"\n  conf_dir = \"{conf_dir}\"\n")
}

/// A fake Cilium agent API on `<root>/var/run/cilium/cilium.sock` answering
/// every connection with `answer` (None: accept, read, never answer).
fn fake_cilium(f: &Fixture, answer: Option<&'static str>) -> std::thread::JoinHandle<()> {
    let dir = f.root().join("var/run/cilium");
    std::fs::create_dir_all(&dir).unwrap();
    let l = UnixListener::bind(dir.join("cilium.sock")).unwrap();
    std::thread::spawn(move || {
        // One report asks once; serve a few connections, then stop.
        for _ in 0..2 {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap_or(0);
            assert!(
                String::from_utf8_lossy(&buf[..n]).starts_with("GET /v1/healthz HTTP/1."),
                "the agent asks GET /v1/healthz"
            );
            match answer {
                Some(raw) if raw.starts_with("RAW ") => {
                    let _ = s.write_all(&raw.as_bytes()["RAW ".len()..]);
                }
                Some(body) => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
                None => std::thread::sleep(Duration::from_secs(4)),
            }
        }
    })
}

fn node() -> Fixture {
    let f = pi4_fixture("CONFIG_BPF=y\nCONFIG_BPF_SYSCALL=y\n");
    f.write("proc/1/cmdline", "/usr/local/bin/k3s\0agent\0");
    f
}

fn report(f: &Fixture, expect: &str) -> serde_json::Value {
    report_json(&[
        "--host-root",
        f.root().to_str().unwrap(),
        "--no-live-probes",
        "--expect",
        expect,
    ])
    .1
}

#[test]
fn cilium_says_ok_and_it_passes() {
    let f = node();
    let _srv = fake_cilium(
        &f,
        Some(
            r#"{"cilium":{"state":"Ok","msg":""},"cluster":{"ciliumHealth":{"state":"Ok"}},"kubernetes":{"state":"Ok","msg":"1.33"}}"#,
        ),
    );
    let r = report(&f, "cilium");
    assert_eq!(
        verdict(&r, "cilium.health"),
        "pass",
        "{}",
        message(&r, "cilium.health")
    );
    assert!(message(&r, "cilium.health")
        .starts_with("Cilium says Ok (GET /v1/healthz on /var/run/cilium/cilium.sock, "));
    assert_eq!(r["facts"]["cilium"]["cilium"]["state"], "Ok");
}

#[test]
fn cilium_says_failure_and_the_check_fails_in_ciliums_words() {
    let f = node();
    let _srv = fake_cilium(
        &f,
        Some(
            r#"{"cilium":{"state":"Failure","msg":"Kubernetes apiserver unreachable: dial tcp 10.43.0.1:443: i/o timeout"}}"#,
        ),
    );
    let r = report(&f, "unspecified");
    assert_eq!(verdict(&r, "cilium.health"), "fail");
    assert!(
        message(&r, "cilium.health").starts_with(
            "Cilium says Failure: Kubernetes apiserver unreachable: dial tcp 10.43.0.1:443: i/o timeout ("
        ),
        "{}",
        message(&r, "cilium.health")
    );
    assert_eq!(r["ready"], false, "a failing Cilium is never ready");
}

#[test]
fn garbage_and_http_errors_are_unreadable_failures_never_a_pass() {
    for (answer, expected) in [
        (
            "<html>hello</html>",
            "Cilium's API answer is unreadable: not JSON (",
        ),
        (
            "RAW HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
            "Cilium's API answered 500 Internal Server Error: oops (",
        ),
        (
            "RAW SSH-2.0-OpenSSH_9.2\r\n",
            "Cilium's API answer is unreadable: not HTTP (",
        ),
        (
            r#"{"cilium":{"state":"Grand"}}"#,
            "Cilium's API answer is unreadable: unknown cilium.state \"Grand\" (",
        ),
    ] {
        let f = node();
        let _srv = fake_cilium(&f, Some(answer));
        let r = report(&f, "cilium");
        assert_eq!(verdict(&r, "cilium.health"), "fail", "{answer}");
        assert!(
            message(&r, "cilium.health").starts_with(expected),
            "{answer}: {}",
            message(&r, "cilium.health")
        );
    }
}

#[test]
fn a_hung_cilium_fails_at_the_deadline() {
    let f = node();
    let _srv = fake_cilium(&f, None);
    let t = Instant::now();
    let r = report(&f, "cilium");
    let took = t.elapsed();
    assert!(took < Duration::from_millis(3500), "bounded: took {took:?}");
    assert_eq!(verdict(&r, "cilium.health"), "fail");
    assert_eq!(
        message(&r, "cilium.health"),
        "Cilium's API did not answer GET /v1/healthz within 2s (/var/run/cilium/cilium.sock)"
    );
}

#[test]
fn no_socket_warns_before_the_migration_and_fails_after() {
    let f = node();
    let before = report(&f, "flannel");
    assert_eq!(verdict(&before, "cilium.health"), "warn");
    assert_eq!(
        message(&before, "cilium.health"),
        "Cilium does not run here yet (no /var/run/cilium/cilium.sock)"
    );
    let after = report(&f, "cilium");
    assert_eq!(verdict(&after, "cilium.health"), "fail");
    assert!(message(&after, "cilium.health")
        .starts_with("Cilium's API socket /var/run/cilium/cilium.sock does not exist"));
    // A socket nobody listens on is refused, precisely.
    std::fs::create_dir_all(f.root().join("var/run/cilium")).unwrap();
    drop(UnixListener::bind(f.root().join("var/run/cilium/cilium.sock")).unwrap());
    let r = report(&f, "cilium");
    assert!(
        message(&r, "cilium.health")
            .starts_with("cannot connect to Cilium's API socket: Connection refused"),
        "{}",
        message(&r, "cilium.health")
    );
}

fn cleanup_plan(f: &Fixture) -> serde_json::Value {
    let out = agent_command()
        .args(["cleanup", "-o", "json", "--no-live-probes", "--host-root"])
        .arg(f.root())
        .arg("--state-dir")
        .arg(f.root().join("state"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn interlocks(plan: &serde_json::Value) -> Vec<String> {
    plan["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["interlock"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_report_and_the_cleanup_interlock_judge_the_same_cni_directory() {
    // A node whose k3s flags cannot be seen, with Cilium's conflist in
    // /etc/cni/net.d and Flannel's in k3s's own directory. The old report
    // rule picked k3s's directory ("Flannel") while the old cleanup rule
    // picked /etc/cni/net.d ("Cilium": cleanup allowed) — they disagreed.
    let f = node();
    std::fs::remove_file(f.root().join("proc/1/cmdline")).unwrap();
    f.write("etc/cni/net.d/05-cilium.conflist", CILIUM_CONFLIST);
    f.write(&format!("{K3S_DIR}/10-flannel.conflist"), FLANNEL_CONFLIST);
    let r = report(&f, "unspecified");
    assert_eq!(
        message(&r, "cni.active"),
        format!("containerd loads /{K3S_DIR}/10-flannel.conflist (Flannel: flannel, portmap)")
    );
    assert!(interlocks(&cleanup_plan(&f)).contains(&"flannel-conflist-wins".to_string()));

    // k3s's generated containerd config says /etc/cni/net.d: both follow it.
    f.write(CONTAINERD, containerd("/etc/cni/net.d"));
    let r = report(&f, "unspecified");
    assert_eq!(
        message(&r, "cni.active"),
        "containerd loads /etc/cni/net.d/05-cilium.conflist (Cilium: cilium-cni)"
    );
    assert!(!interlocks(&cleanup_plan(&f)).contains(&"flannel-conflist-wins".to_string()));

    // And it says k3s's own directory: both judge Flannel's conflist.
    f.write(CONTAINERD, containerd(&format!("/{K3S_DIR}")));
    let r = report(&f, "unspecified");
    assert!(message(&r, "cni.active").contains("Flannel"));
    assert!(interlocks(&cleanup_plan(&f)).contains(&"flannel-conflist-wins".to_string()));
}

#[test]
fn a_worker_that_came_up_without_flannel_before_its_turn_fails_the_flannel_expectation() {
    let f = node();
    f.write(CONTAINERD, containerd("/etc/cni/net.d"));
    let before = report(&f, "flannel");
    assert_eq!(verdict(&before, "k3s.network"), "fail");
    assert!(
        message(&before, "k3s.network").starts_with(
            "k3s on this node runs without Flannel before its migration: k3s's containerd reads /etc/cni/net.d ("
        ),
        "{}",
        message(&before, "k3s.network")
    );
    // The same facts are what a migrated node should show.
    assert_eq!(verdict(&report(&f, "cilium"), "k3s.network"), "pass");
    // A node still on Flannel fails the Cilium expectation.
    f.write(CONTAINERD, containerd(&format!("/{K3S_DIR}")));
    let after = report(&f, "cilium");
    assert_eq!(verdict(&after, "k3s.network"), "fail");
    assert_eq!(verdict(&report(&f, "flannel"), "k3s.network"), "pass");
}

#[test]
fn a_migrated_node_needs_ciliums_conflist_where_containerd_reads() {
    let f = node();
    f.write(CONTAINERD, containerd("/etc/cni/net.d"));
    f.write(&format!("{K3S_DIR}/10-flannel.conflist"), FLANNEL_CONFLIST);
    let r = report(&f, "cilium");
    assert_eq!(verdict(&r, "cilium.cni"), "fail");
    assert_eq!(
        message(&r, "cilium.cni"),
        "no valid CNI config in /etc/cni/net.d, the directory containerd reads"
    );
    f.write("etc/cni/net.d/05-cilium.conflist", CILIUM_CONFLIST);
    let r = report(&f, "cilium");
    assert_eq!(verdict(&r, "cilium.cni"), "pass");
    // Without live probes the interfaces cannot be seen: a failure, not a pass.
    assert_eq!(verdict(&r, "cilium.interfaces"), "fail");
    // Before the migration none of these are judged.
    let before = report(&f, "unspecified");
    assert!(before["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["id"] != "cilium.cni"));
}

#[test]
fn cilium_host_and_cilium_net_must_be_up_in_the_nodes_namespace() {
    if !require_root("cilium_host/cilium_net in a network namespace") {
        return;
    }
    let f = node();
    let ns = Netns::new("cilium-if");
    ns.run("ip link add cilium_host type veth peer name cilium_net");
    ns.run("ip link set cilium_host up");
    let report_in_ns = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                &agent_bin(),
                "report",
                "--json",
                "--expect",
                "cilium",
                "--host-root",
            ])
            .arg(f.root())
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = report_in_ns();
    assert_eq!(verdict(&r, "cilium.interfaces"), "fail");
    assert_eq!(message(&r, "cilium.interfaces"), "cilium_net is down");
    ns.run("ip link set cilium_net up");
    let r = report_in_ns();
    assert_eq!(
        verdict(&r, "cilium.interfaces"),
        "pass",
        "{}",
        message(&r, "cilium.interfaces")
    );
    assert_eq!(verdict(&r, "cilium.pods"), "pass");
    // A pod left on Flannel's bridge fails the migrated verdict.
    ns.run("ip link add cni0 type bridge");
    ns.run("ip link add vethpod1 type veth peer name eth0p");
    ns.run("ip link set vethpod1 master cni0");
    let r = report_in_ns();
    assert_eq!(verdict(&r, "cilium.pods"), "fail");
    assert!(message(&r, "cilium.pods")
        .starts_with("1 pod interfaces are still on Flannel's cni0 (vethpod1)"));
}

/// `--only k3s` (the wire's `families`): the k3s checks alone, judged the
/// same as in the full report, from the k3s and CNI facts alone — Cilium's
/// socket (like every kernel, BPF and iptables probe) is never touched.
#[test]
fn a_narrowed_report_judges_k3s_alone_as_the_full_report_does() {
    let f = node();
    f.write(CONTAINERD, containerd("/etc/cni/net.d"));
    let dir = f.root().join("var/run/cilium");
    std::fs::create_dir_all(&dir).unwrap();
    let cilium = UnixListener::bind(dir.join("cilium.sock")).unwrap();
    cilium.set_nonblocking(true).unwrap();
    let root = f.root().to_str().unwrap();
    let (code, narrow) = report_json(&[
        "--host-root",
        root,
        "--no-live-probes",
        "--expect",
        "flannel",
        "--only",
        "k3s",
    ]);
    assert!(
        matches!(cilium.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the narrowed report asked Cilium's socket"
    );
    let ids: Vec<&str> = narrow["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["k3s.flags", "k3s.network"], "{narrow:#}");
    assert_eq!(narrow["families"], serde_json::json!(["k3s"]));
    let facts: Vec<&String> = narrow["facts"].as_object().unwrap().keys().collect();
    assert_eq!(facts, ["cni", "k3s"], "only the probed facts");
    // A worker without Flannel before its turn: a failure, so exit 1 — the
    // same verdict and words as the full report's.
    assert_eq!(code, 1);
    let full = report(&f, "flannel");
    for id in ids {
        assert_eq!(check(&narrow, id), check(&full, id), "{id}");
    }
    // pod-network is judged only when Cilium is expected (as in full).
    let (_, pods) = report_json(&[
        "--host-root",
        root,
        "--no-live-probes",
        "--expect",
        "flannel",
        "--only",
        "pod-network",
    ]);
    assert_eq!(pods["checks"], serde_json::json!([]), "{pods:#}");
}
