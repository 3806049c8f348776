//! Cleanup on a real network namespace (vxlan flannel.1, bridge cni0 with a
//! pod veth, real iptables chains) plus a host-root tree with Flannel's files:
//! it removes exactly Flannel's leftovers, the bystanders survive, every
//! interlock refuses, an interrupted apply finishes on rerun, and restore
//! brings every file back byte for byte.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// A Flannel-era node after Cilium came up: Flannel's interfaces, files and
/// chains are still there, plus bystanders that must survive.
struct Node {
    ns: Netns,
    root: Fixture,
    state: tempfile::TempDir,
    outside: tempfile::TempDir,
}

const ETC: &str = "etc/cni/net.d";
const K3S: &str = "var/lib/rancher/k3s/agent/etc/cni/net.d";

fn node(tag: &str, pods: bool) -> Node {
    let ns = Netns::new(&format!("c-{tag}"));
    for cmd in [
        "ip link add eth0 type veth peer name eth0p",
        "ip link set eth0 up",
        "ip addr add 192.0.2.10/24 dev eth0",
        "ip link add flannel.1 type vxlan id 1 dstport 8472 dev eth0 nolearning",
        "ip link set flannel.1 up",
        "ip addr add 10.42.0.0/32 dev flannel.1",
        "ip route add 10.42.1.0/24 via 10.42.1.0 dev flannel.1 onlink",
        "ip link add cni0 type bridge",
        "ip link add cni1 type bridge",
        "ip link add flannel-wg type veth peer name flannel-wgp",
        "ip link add cilium_host type veth peer name cilium_net",
        "iptables -N FLANNEL-FWD",
        "iptables -A FLANNEL-FWD -s 10.42.0.0/16 -j ACCEPT",
        "iptables -A FORWARD -j FLANNEL-FWD",
        "iptables -N FLANNELX",
        "iptables -A FORWARD -j FLANNELX",
        "iptables -t nat -N FLANNEL-POSTRTG",
        "iptables -t nat -A POSTROUTING -j FLANNEL-POSTRTG",
        "iptables -N KUBE-ROUTER-INPUT",
        "iptables -A INPUT -j KUBE-ROUTER-INPUT",
    ] {
        ns.run(cmd);
    }
    if pods {
        ns.run("ip link add vethpod1 type veth peer name podeth0");
        ns.run("ip link set vethpod1 master cni0");
    }
    let root = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), "not Flannel's").unwrap();
    root.kernel("6.6.64", "aarch64");
    root.write("proc/1/cmdline", b"/usr/local/bin/k3s\0server\0");
    root.write(
        "etc/rancher/k3s/config.yaml",
        "flannel-backend: none\ndisable-network-policy: true\n",
    );
    root.write(
        &format!("{ETC}/05-cilium.conflist"),
        r#"{"name":"cilium","cniVersion":"0.3.1","plugins":[{"type":"cilium-cni"}]}"#,
    );
    root.write(
        &format!("{ETC}/10-flannel.conflist"),
        r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#,
    );
    root.write(
        &format!("{ETC}/99-other.conflist"),
        r#"{"name":"other","plugins":[{"type":"bridge"}]}"#,
    );
    root.write(
        &format!("{K3S}/10-flannel.conflist"),
        r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#,
    );
    root.write(
        "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
        r#"{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    root.write(
        "run/flannel/subnet.env",
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.1.1/24\n",
    );
    std::os::unix::fs::symlink(
        outside.path().join("precious"),
        root.root().join("run/flannel/link-out"),
    )
    .unwrap();
    root.write("var/lib/cni/networks/cbr0/10.42.1.5", "c0ffee\neth0\n");
    root.write("var/lib/cni/networks/cbr0/last_reserved_ip.0", "10.42.1.5");
    root.write("var/lib/cni/flannel/c0ffee", r#"{"cniVersion":"0.3.1"}"#);
    root.write("var/lib/cni/results/keep-me", "not Flannel's either");
    std::fs::set_permissions(
        root.root().join("run/flannel/subnet.env"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    Node {
        ns,
        root,
        state: tempfile::tempdir().unwrap(),
        outside,
    }
}

impl Node {
    fn cleanup(&self, extra: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Value) {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns.0,
            &agent_bin(),
            "cleanup",
            "-o",
            "json",
            "--host-root",
        ])
        .arg(self.root.root())
        .arg("--state-dir")
        .arg(self.state.path())
        .args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), json)
    }
    /// `cnishift-agent restore ID` for this node's tree; it must succeed.
    fn restore(&self, id: &str) {
        let out = Command::new(agent_bin())
            .args(["restore", id, "--host-root"])
            .arg(self.root.root())
            .arg("--state-dir")
            .arg(self.state.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn report(&self) -> Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.0,
                &agent_bin(),
                "report",
                "--json",
                "--host-root",
            ])
            .arg(self.root.root())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Every file under `dir` (not following links) with its bytes or link target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(base).unwrap().to_path_buf();
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(rel.clone(), "<dir>".into());
                walk(base, &path, out);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let bytes = std::fs::read(&path).unwrap();
                out.insert(
                    rel,
                    format!(
                        "{:o} {}",
                        meta.permissions().mode() & 0o7777,
                        String::from_utf8_lossy(&bytes)
                    ),
                );
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

fn ids(plan: &Value) -> Vec<String> {
    plan["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn interlocks(plan: &Value) -> Vec<String> {
    plan["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["interlock"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plan_lists_exactly_flannels_leftovers() {
    if !require_root("network namespaces and iptables") {
        return;
    }
    let n = node("plan", true);
    let (code, plan) = n.cleanup(&[], &[]);
    assert_eq!(
        ids(&plan),
        [
            "interface:vethpod1",
            "interface:cni0",
            "interface:flannel.1",
            "interface:flannel-wg",
            "path:/etc/cni/net.d/10-flannel.conflist",
            "path:/var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
            "path:/var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
            "path:/run/flannel",
            "path:/var/lib/cni/networks/cbr0",
            "path:/var/lib/cni/flannel",
            "iptables:ipv4",
        ]
    );
    let v4 = &plan["items"].as_array().unwrap()[10]["target"];
    let chains: Vec<&str> = v4["chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        chains,
        [
            "filter/FLANNEL-FWD",
            "nat/FLANNEL-POSTRTG",
            "filter/KUBE-ROUTER-INPUT"
        ]
    );
    assert_eq!(
        interlocks(&plan),
        ["pods-on-cni0"],
        "only the pod veth stands in the way"
    );
    assert_eq!(code, Some(1), "a refused plan exits 1");
    // A plan changes nothing.
    assert!(n.ns.links().contains(&"flannel.1".to_string()));
    assert!(n.root.root().join("run/flannel/subnet.env").exists());
}

#[test]
fn apply_removes_exactly_them_bystanders_survive_and_restore_brings_files_back() {
    if !require_root("network namespaces and iptables") {
        return;
    }
    let n = node("apply", true);
    let before = snapshot(n.root.root());
    let (code, result) = n.cleanup(&["--apply", "--force"], &[]);
    assert_eq!(code, Some(0), "{result:#}");
    let outcomes = result["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 11);
    assert!(outcomes.iter().all(|o| o["ok"] == true), "{result:#}");

    let links = n.ns.links();
    for gone in ["vethpod1", "cni0", "flannel.1", "flannel-wg"] {
        assert!(
            !links.contains(&gone.to_string()),
            "{gone} survived: {links:?}"
        );
    }
    for kept in ["eth0", "cni1", "cilium_host", "cilium_net", "lo"] {
        assert!(
            links.contains(&kept.to_string()),
            "bystander {kept} was removed: {links:?}"
        );
    }
    assert!(
        !n.ns.run("ip route").contains("flannel.1"),
        "routes go with the interface"
    );
    let filter = n.ns.chains("filter");
    assert!(filter.contains(&"FLANNELX".to_string()), "{filter:?}");
    assert!(
        !filter
            .iter()
            .any(|c| c.starts_with("FLANNEL-") || c.starts_with("KUBE-ROUTER-")),
        "{filter:?}"
    );
    assert!(n.ns.run("iptables -S FORWARD").contains("-j FLANNELX"));
    assert!(!n.ns.chains("nat").iter().any(|c| c.starts_with("FLANNEL-")));

    let r = n.root.root();
    assert!(
        r.join(format!("{ETC}/99-other.conflist")).exists()
            && r.join(format!("{ETC}/05-cilium.conflist")).exists()
    );
    assert!(r.join("var/lib/cni/results/keep-me").exists());
    assert!(
        !r.join("run/flannel").exists() && !r.join(format!("{K3S}/10-flannel.conflist")).exists()
    );
    assert_eq!(
        std::fs::read_to_string(n.outside.path().join("precious")).unwrap(),
        "not Flannel's",
        "a symlink's target is never touched"
    );

    // The agent's own report agrees nothing of Flannel is left.
    let rep = n.report();
    for c in rep["checks"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        if id.starts_with("flannel.") || id.starts_with("iptables.") {
            assert_eq!(c["verdict"], "pass", "{id}: {}", c["message"]);
        }
    }

    // Idempotent: a second run has nothing to do.
    let (code, again) = n.cleanup(&["--apply", "--force"], &[]);
    assert_eq!(code, Some(0));
    assert!(
        again["outcomes"].as_array().unwrap().is_empty(),
        "{again:#}"
    );

    // Restore puts every file back byte for byte (and mode for mode).
    n.restore(result["backup_id"].as_str().unwrap());
    assert_eq!(snapshot(r), before);
    let journal = std::fs::read_to_string(n.state.path().join("cleanup-journal.jsonl")).unwrap();
    assert_eq!(
        journal
            .lines()
            .filter(|l| l.contains("\"removed\""))
            .count(),
        11,
        "{journal}"
    );
}

#[test]
fn an_apply_killed_half_way_is_finished_by_the_next() {
    if !require_root("network namespaces and iptables") {
        return;
    }
    let n = node("crash", false);
    let reference = node("crash-ref", false);
    let before = snapshot(n.root.root());
    let (code, _) = n.cleanup(&["--apply"], &[("CNISHIFT_TEST_CRASH_AFTER_ITEMS", "5")]);
    assert_ne!(code, Some(0), "the hook kills the apply");
    assert!(
        n.state.path().join("cleanup-pending").exists(),
        "the unfinished apply is remembered"
    );
    let (code, result) = n.cleanup(&["--apply"], &[]);
    assert_eq!(code, Some(0), "{result:#}");
    assert!(!n.state.path().join("cleanup-pending").exists());
    let (code, _) = reference.cleanup(&["--apply"], &[]);
    assert_eq!(code, Some(0));
    // The same end state as an uninterrupted run.
    let strip = |s: BTreeMap<PathBuf, String>| s.into_iter().collect::<Vec<_>>();
    assert_eq!(
        strip(snapshot(n.root.root())),
        strip(snapshot(reference.root.root()))
    );
    let mut a = n.ns.links();
    let mut b = reference.ns.links();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(n.ns.chains("filter"), reference.ns.chains("filter"));
    // One backup holds both halves: restoring it restores everything.
    n.restore(result["backup_id"].as_str().unwrap());
    assert_eq!(snapshot(n.root.root()), before);
}

#[test]
fn each_interlock_refuses_and_force_overrides_only_the_overridable() {
    if !require_root("network namespaces and iptables") {
        return;
    }
    // k3s still selects Flannel: never overridable.
    let n = node("lock-k3s", false);
    n.root.write(
        "etc/rancher/k3s/config.yaml",
        "disable-network-policy: true\n",
    );
    for args in [&["--apply"][..], &["--apply", "--force"][..]] {
        let (code, r) = n.cleanup(args, &[]);
        assert_eq!(code, Some(1));
        let refused: Vec<&str> = r["refused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["interlock"].as_str().unwrap())
            .collect();
        assert!(refused.contains(&"k3s-flannel-backend"), "{r:#}");
        assert!(r["outcomes"].as_array().unwrap().is_empty());
    }
    assert!(
        n.ns.links().contains(&"flannel.1".to_string()),
        "nothing was removed"
    );

    // Flannel's conflist still wins in the directory containerd reads: never overridable.
    let n = node("lock-conf", false);
    std::fs::remove_file(n.root.root().join(format!("{ETC}/05-cilium.conflist"))).unwrap();
    let (code, r) = n.cleanup(&["--apply", "--force"], &[]);
    assert_eq!(code, Some(1));
    assert!(
        r["refused"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["interlock"] == "flannel-conflist-wins" && x["overridable"] == false),
        "{r:#}"
    );
    assert!(n
        .root
        .root()
        .join(format!("{ETC}/10-flannel.conflist"))
        .exists());

    // Pods on cni0: --force overrides.
    let n = node("lock-pods", true);
    let (code, r) = n.cleanup(&["--apply"], &[]);
    assert_eq!(code, Some(1));
    assert!(r["refused"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["interlock"] == "pods-on-cni0" && x["overridable"] == true));
    let (code, _) = n.cleanup(&["--apply", "--force"], &[]);
    assert_eq!(code, Some(0));

    // Cilium not present yet: --force overrides.
    let n = node("lock-cil", false);
    n.ns.run("ip link del cilium_host");
    std::fs::remove_file(n.root.root().join(format!("{ETC}/05-cilium.conflist"))).unwrap();
    std::fs::remove_file(n.root.root().join(format!("{ETC}/10-flannel.conflist"))).unwrap();
    let (code, r) = n.cleanup(&["--apply"], &[]);
    assert_eq!(code, Some(1));
    assert_eq!(
        r["refused"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["interlock"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["cilium-absent"]
    );
    let (code, _) = n.cleanup(&["--apply", "--force"], &[]);
    assert_eq!(code, Some(0));
}

#[test]
fn bad_input_gives_per_item_errors_and_the_rest_of_the_plan() {
    if !require_root("bind mounts and network namespaces") {
        return;
    }
    let n = node("bad", false);
    n.root
        .write(&format!("{ETC}/50-broken.conflist"), "{ this is not json");
    // Flannel's own conflist, damaged: still Flannel's by name, still removed.
    n.root
        .write(&format!("{K3S}/10-flannel.conflist"), "\u{0}\u{1} garbage");
    // A parent directory that is a symlink out of the tree is refused, not followed.
    std::fs::remove_dir_all(n.root.root().join("var/lib/cni/flannel")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(elsewhere.path().join("flannel")).unwrap();
    std::fs::write(elsewhere.path().join("flannel/keep"), "outside").unwrap();
    std::fs::remove_dir_all(n.root.root().join("var/lib/cni/networks")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), n.root.root().join("var/lib/cni/networks"))
        .unwrap();
    std::fs::create_dir_all(elsewhere.path().join("cbr0")).unwrap();
    std::fs::write(elsewhere.path().join("cbr0/10.42.1.9"), "outside").unwrap();
    let (_, plan) = n.cleanup(&[], &[]);
    let errors: Vec<&str> = plan["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("/var/lib/cni/networks/cbr0") && e.contains("symlink")),
        "{plan:#}"
    );
    assert!(
        ids(&plan).contains(&"path:/run/flannel".to_string()),
        "the rest of the plan is still there"
    );
    assert!(
        ids(&plan).contains(&format!("path:/{K3S}/10-flannel.conflist")),
        "a damaged Flannel conflist is still Flannel's: {plan:#}"
    );
    assert!(
        !ids(&plan).iter().any(|i| i.contains("50-broken")),
        "a broken bystander is not touched"
    );

    // A read-only host root: each file item fails with the reason; interfaces still go.
    let script = format!(
        "mount --bind {root} {root} && mount -o remount,bind,ro {root} && exec ip netns exec {ns} {bin} cleanup --apply -o json --host-root {root} --state-dir {state}",
        root = n.root.root().display(),
        ns = n.ns.0,
        bin = agent_bin(),
        state = n.state.path().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1));
    let outcomes = r["outcomes"].as_array().unwrap();
    let failed: Vec<&Value> = outcomes.iter().filter(|o| o["ok"] == false).collect();
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|o| o["item"].as_str().unwrap().starts_with("path:")),
        "{r:#}"
    );
    assert!(
        failed.iter().all(|o| o["message"]
            .as_str()
            .unwrap()
            .contains("Read-only file system")),
        "{r:#}"
    );
    assert!(outcomes
        .iter()
        .any(|o| o["item"] == "interface:flannel.1" && o["ok"] == true));
    assert_eq!(
        std::fs::read_to_string(elsewhere.path().join("cbr0/10.42.1.9")).unwrap(),
        "outside"
    );
    assert!(
        n.root.root().join("run/flannel/subnet.env").exists(),
        "nothing was lost on a read-only tree"
    );
}

#[test]
fn restore_refuses_hostile_ids() {
    let state = tempfile::tempdir().unwrap();
    for id in ["../../etc", "", "a/b"] {
        let out = Command::new(agent_bin())
            .args(["restore", id, "--host-root", "/tmp", "--state-dir"])
            .arg(state.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{id:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a backup id"),
            "{id:?}"
        );
    }
}
