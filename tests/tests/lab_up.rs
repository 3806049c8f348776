//! `cnishift-lab up | down | status | deploy | rollback | fault` as processes,
//! observed the way an admin would: the real `cnishift` and the machine's
//! `kubectl`, from this machine's own namespace, against the lab's
//! cluster.toml and kubeconfig.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnishift_lab::harness::{check, lab_bin, report_node, text, Up, RENAMED};
use cnishift_lab::require_root;

#[test]
fn up_serves_the_seed_inventory_to_kubectl_and_cnishift_from_this_machine() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let start = Instant::now();
    let lab = Up::seed(&[]);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "up took {took:?}");
    if cnishift_lab::hostroot::shared_configs().is_some() {
        assert!(
            lab.up_output.contains("with CONFIG_SCHEDSTATS=y"),
            "up says which fix it applied: {}",
            lab.up_output
        );
    }
    let got = lab.kubectl_ok(&["get", "nodes,pods", "-A", "-o", "wide"]);
    for n in [
        "opi01",
        "opi02",
        "opi03",
        "raccoon00",
        "raccoon05",
        "argocd-server",
        "ingress-nginx-controller",
        "vaultwarden",
        "longhorn-ui",
        "longhorn-manager",
        "kube-vip",
        "cilium-",
        "postgres-0",
    ] {
        assert!(got.contains(n), "{n} missing:\n{got}");
    }
    let pvc = lab.kubectl_ok(&["get", "statefulsets,pvc", "-n", "database"]);
    assert!(
        pvc.contains("statefulset.apps/postgres") && pvc.contains("data-postgres-0"),
        "{pvc}"
    );
    // kube-vip runs on controllers only; Cilium is in the inventory's namespace.
    let vip = lab.kubectl_ok(&["get", "pods", "-n", "kube-system", "-o", "wide"]);
    assert_eq!(
        vip.lines().filter(|l| l.contains("kube-vip")).count(),
        3,
        "{vip}"
    );
    assert!(
        !vip.lines()
            .any(|l| l.contains("kube-vip") && l.contains("raccoon")),
        "{vip}"
    );
    // The seed inventory limits Cilium's DaemonSet to migrated nodes
    // ([cilium] node_label): before the migration no Cilium agent runs
    // beside Flannel, so it has no pod anywhere yet.
    let pods = lab.kubectl(&[
        "get",
        "pods",
        "-n",
        "cilium",
        "-l",
        "k8s-app=cilium",
        "--no-headers",
    ]);
    assert!(pods.status.success(), "{}", text(&pods));
    assert_eq!(
        String::from_utf8_lossy(&pods.stdout).lines().count(),
        0,
        "{}",
        text(&pods)
    );
    assert_eq!(
        lab.kubectl_ok(&[
            "get",
            "ds",
            "cilium",
            "-n",
            "cilium",
            "-o",
            "jsonpath={.spec.template.spec.nodeSelector}"
        ]),
        r#"{"cnishift.io/cni":"cilium"}"#
    );
    // preflight from this machine reaches every agent; the fixed RK3588 config passes.
    let r = lab.preflight();
    for n in r["nodes"].as_array().unwrap() {
        assert!(n["report"].is_object(), "{n:#}");
        assert_eq!(check(n, "bpf.fs")["verdict"], "pass", "{n:#}");
    }
    if cnishift_lab::hostroot::shared_configs().is_some() {
        assert_eq!(
            check(report_node(&r, "opi01"), "kernel.config.SCHEDSTATS")["verdict"],
            "pass"
        );
        assert_eq!(r["ready"], true, "{r:#}");
    }
    let o = lab.cnishift(&["cluster", "check"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("all 9 nodes Ready"), "{}", text(&o));
    // node drain from this machine: the Deployment pods leave, the DaemonSet pods stay.
    let o = lab.cnishift(&["node", "drain", "raccoon01"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let status = text(&lab.lab(&["status"]));
    let row = status.lines().find(|l| l.starts_with("raccoon01")).unwrap();
    assert!(
        row.contains("worker")
            && row.contains("flannel")
            && row.contains(" yes ")
            && row.contains("listening"),
        "{status}"
    );
    // One lab link on this machine, and only its subnet's route.
    let rec = lab.record();
    let link = rec["host_link"].as_str().unwrap();
    let routes = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["route", "show", "dev", link])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert_eq!(routes.lines().count(), 1, "{routes}");
}

#[test]
fn deploy_flips_a_controller_to_cilium_and_rollback_brings_it_back() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(RENAMED, &[]);
    // A worker's k3s restarted while no server has switched keeps Flannel.
    let o = lab.deploy_hook("w-1").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(400));
    lab.wait_node("w-1", "True", Duration::from_secs(2));
    let rows: serde_json::Value =
        serde_json::from_slice(&lab.lab(&["status", "-o", "json"]).stdout).unwrap();
    let w1 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "w-1")
        .unwrap();
    assert_eq!(w1["backend"], "flannel", "{rows:#}");
    assert_eq!(w1["agent"], "listening", "{rows:#}");
    let before = report_node(&lab.preflight(), "ctl-a").clone();
    assert!(
        check(&before, "cni.active")["message"]
            .as_str()
            .unwrap()
            .contains("10-flannel.conflist"),
        "{before:#}"
    );
    assert!(lab.cilium_pod("kube-system", "ctl-a").contains("0/1"));
    // Watch the node as kubectl would while the hook runs.
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args([
            "get",
            "node",
            "ctl-a",
            "-w",
            "-o",
            "jsonpath={.status.conditions[0].status}|{.status.conditions[0].message}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("True"));
    let start = Instant::now();
    let o = lab.deploy_hook("ctl-a").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut seen = vec![];
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push(l.clone());
        if l.starts_with("True") {
            break;
        }
    }
    let to_ready = start.elapsed();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen[0].starts_with("False"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|l| l == "False|container runtime network not ready: cni config uninitialized"),
        "NotReady while Cilium starts: {seen:?}"
    );
    // The 1 s budget is the benchmark's (benches/lab.rs); here, slack for a loaded CI machine.
    assert!(
        to_ready < Duration::from_secs(3),
        "deploy to Ready: {to_ready:?}"
    );
    assert!(lab.cilium_pod("kube-system", "ctl-a").contains("1/1"));
    let o = lab.cnishift(&["node", "wait-cilium", "ctl-a"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let after = report_node(&lab.preflight(), "ctl-a").clone();
    assert!(
        check(&after, "cni.active")["message"]
            .as_str()
            .unwrap()
            .contains("/etc/cni/net.d/05-cilium.conflist"),
        "{after:#}"
    );
    assert_eq!(check(&after, "k3s.flags")["verdict"], "pass", "{after:#}");
    // Flannel's leftovers stay until cleanup; the pods the drain left keep cni0.
    assert_eq!(
        check(&after, "flannel.interface.flannel.1")["verdict"],
        "warn"
    );
    let rows: serde_json::Value =
        serde_json::from_slice(&lab.lab(&["status", "-o", "json"]).stdout).unwrap();
    let c = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "ctl-a")
        .unwrap();
    assert_eq!(
        (
            c["role"].as_str(),
            c["backend"].as_str(),
            c["ready"].as_bool(),
            c["cilium"].as_str()
        ),
        (Some("controller"), Some("none"), Some(true), Some("Ready")),
        "{rows:#}"
    );
    let status = text(&lab.lab(&["status"]));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("ctl-a") && l.contains(" none ") && l.contains("Ready")),
        "{status}"
    );
    // Repod: the DaemonSet pods the drain left keep their veths on cni0 until
    // deleted; their replacements get Cilium endpoints, no veth.
    let cni0 = |r: &serde_json::Value| {
        check(report_node(r, "ctl-a"), "flannel.interface.cni0")["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(cni0(&lab.preflight()).contains("with 2 attached pod interfaces"));
    let pods = lab.kubectl_ok(&[
        "get", "pods", "-A", "--field-selector", "spec.nodeName=ctl-a", "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.metadata.labels.k8s-app}{\"\\n\"}{end}",
    ]);
    for l in pods.lines().filter(|l| !l.ends_with("cilium")) {
        let (ns, name) = l
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('/')
            .unwrap();
        lab.kubectl_ok(&["delete", "pod", "-n", ns, name]);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(cni0(&lab.preflight()).contains("with 0 attached pod interfaces"));
    let again = lab.kubectl_ok(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=ctl-a",
        "--no-headers",
    ]);
    assert_eq!(
        again.lines().filter(|l| l.contains("1/1")).count(),
        3,
        "recreated and Ready:\n{again}"
    );
    // The agents' rollback command is the lab's.
    let pid = lab.record()["nodes"][0]["agent_pid"].as_u64().unwrap();
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&env).contains("CNISHIFT_ROLLBACK_COMMAND="));

    let o = lab.lab(&["rollback", "ctl-a"]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(100));
    lab.wait_node("ctl-a", "True", Duration::from_secs(2));
    let back = report_node(&lab.preflight(), "ctl-a").clone();
    assert!(
        check(&back, "cni.active")["message"]
            .as_str()
            .unwrap()
            .contains("10-flannel.conflist"),
        "{back:#}"
    );
    assert_eq!(check(&back, "k3s.flags")["verdict"], "warn");
    assert!(lab.cilium_pod("kube-system", "ctl-a").contains("0/1"));
    // Renamed nodes: the API holds the inventory's names, podCIDRs and addresses.
    let nodes = lab.kubectl_ok(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[0].address}{\"\\n\"}{end}",
    ]);
    let rec = lab.record();
    for (i, n) in ["ctl-a", "w-1", "w-2"].iter().enumerate() {
        let addr = rec["nodes"][i]["address"].as_str().unwrap();
        assert!(
            nodes.contains(&format!("{n} 10.60.{i}.0/24 {addr}")),
            "{nodes}"
        );
    }
}

#[test]
fn kill_9_of_the_supervisor_then_down_leaves_nothing() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let lab = Up::new(RENAMED, &[]);
    let rec = lab.record();
    let subnet = rec["subnet"].as_u64().unwrap();
    let mine = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                l.contains(&format!("cnshl{subnet}")) || l.contains(lab.dir.to_str().unwrap())
            })
            .map(String::from)
            .collect()
    };
    let sh = |c: &str| {
        String::from_utf8_lossy(&Command::new("sh").arg("-c").arg(c).output().unwrap().stdout)
            .into_owned()
    };
    assert!(!mine(&sh("ip netns")).is_empty());
    assert!(!mine(&sh("ip link")).is_empty());
    assert!(!mine(&sh("cat /proc/mounts")).is_empty());
    assert!(!mine(&sh("ps -eo args")).is_empty());
    // The controller's etcd member is the lab's too, and must go with it.
    let etcd_pid = rec["nodes"][0]["etcd_pid"]
        .as_u64()
        .expect("ctl-a runs etcd");
    assert!(
        mine(&sh("ps -eo args"))
            .iter()
            .any(|l| l.contains("etcd --name ctl-a")),
        "{:?}",
        mine(&sh("ps -eo args"))
    );
    let pid = rec["supervisor_pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let o = lab.lab(&["down"]);
    let took = start.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(took < Duration::from_secs(3), "down took {took:?}");
    assert_eq!(mine(&sh("ip netns")), Vec::<String>::new());
    assert_eq!(mine(&sh("ip link")), Vec::<String>::new());
    assert_eq!(mine(&sh("cat /proc/mounts")), Vec::<String>::new());
    assert_eq!(mine(&sh("ps -eo args")), Vec::<String>::new());
    // Gone, or a zombie of a parent that does not reap (the supervisor died).
    let stat = std::fs::read_to_string(format!("/proc/{etcd_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "etcd {etcd_pid} runs: {stat}"
    );
    assert!(!lab.dir.exists(), "the lab's files are gone");
}

#[test]
fn without_root_it_says_so_and_how_to_run_it() {
    if !require_root("running as nobody needs root first") {
        return;
    }
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lab_bin())
        .args(["up", "-i", "/nonexistent", "--dir", "/tmp/never"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("needs root") && t.contains("sudo "), "{t}");
}
