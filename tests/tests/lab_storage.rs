//! The storage gate and the run-wide steps of `cnishift migrate` across a
//! `cnishift-lab up` lab: a Longhorn volume whose only healthy replica is on
//! the node to drain blocks that drain (`cnishift node drain`, and the same
//! step in `cnishift migrate`), after migrate's values gate passed and its
//! backup was written and journaled. Observed by exit code, `-o json`, the
//! journal's own words (`cnishift status`) and the machine's kubectl.

use std::path::Path;
use std::process::{Command, Output};

use cnishift_lab::harness::{cnishift_bin, text, Up};
use cnishift_lab::require_root;
use serde_json::Value;

fn inventory(values: &Path) -> String {
    format!(
        r#"
[cluster]
name = "storage"
pod_cidr = "10.68.0.0/16"
service_cidr = "10.69.0.0/16"
cilium_namespace = "cilium"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"

[deadlines]
connect = "1s"
report = "3s"
api = "2s"
drain = "5s"
node_ready = "4s"
cilium_ready = "4s"
deploy = "10s"
confirm = "20s"
verify = "5s"
repod = "5s"

[drain]
retry_interval = "200ms"

[cilium]
node_label = "cnishift.io/cni=cilium"
values = "{}"

[[nodes]]
name = "ctl-a"
role = "controller"
address = "10.9.9.1:7443"

[[nodes]]
name = "w-1"
role = "worker"
address = "10.9.9.2:7443"

[[nodes]]
name = "w-2"
role = "worker"
address = "10.9.9.3:7443"
"#,
        values.display()
    )
}

fn cnishift(lab: &Up, args: &[&str], state: &Path) -> Output {
    Command::new(cnishift_bin())
        .args(args)
        .arg("-i")
        .arg(lab.cluster_toml())
        .arg("--kubeconfig")
        .arg(lab.kubeconfig())
        .args(if args[0] == "migrate" || args[0] == "status" {
            vec!["--state-dir".to_string(), state.display().to_string()]
        } else {
            vec![]
        })
        .env_remove("CNISHIFT_INVENTORY")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap()
}

fn pods_on(lab: &Up, node: &str) -> Vec<String> {
    let mut v: Vec<String> = lab
        .kubectl_ok(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "name",
        ])
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn a_volume_whose_only_healthy_replica_is_on_the_node_blocks_its_drain() {
    if !require_root("cnishift-lab up") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let values = tmp.path().join("helm-values.yaml");
    let state = tmp.path().join("state");
    let lab = Up::new(&inventory(&values), &[]);
    let api = lab.record()["api"].as_str().unwrap().to_string();
    let (host, port) = api.rsplit_once(':').unwrap();
    std::fs::write(
        &values,
        format!(
            "k8sServiceHost: \"{host}\"\nk8sServicePort: {port}\nipam:\n  mode: kubernetes\nroutingMode: native\n\
             autoDirectNodeRoutes: true\nipv4NativeRoutingCIDR: \"10.68.0.0/16\"\nnodeSelector:\n  cnishift.io/cni: cilium\n"
        ),
    )
    .unwrap();
    // Postgres's Longhorn volume: replicas on w-1, w-2 and ctl-a; now only w-1's is healthy.
    let o = lab.lab(&["fault", "w-1:sole-replica"]);
    assert!(o.status.success(), "{}", text(&o));
    let reps = lab.kubectl_ok(&[
        "get",
        "replicas.longhorn.io",
        "-n",
        "longhorn-system",
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeID}={.spec.failedAt}{\"\\n\"}{end}",
    ]);
    assert!(reps.lines().any(|l| l == "w-1="), "{reps}");
    let before = pods_on(&lab, "w-1");

    // `cnishift node drain`: refused before anything is evicted, naming the volume and its claim.
    let o = cnishift(&lab, &["node", "drain", "w-1"], &state);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let all = text(&o);
    assert!(
        all.contains(
            "drain of w-1 refused before evicting anything: Longhorn volume longhorn-system/pvc-"
        ) && all.contains(
            "(claim database/data-postgres-0, degraded) has its only healthy replica on w-1"
        ),
        "{all}"
    );
    assert_eq!(pods_on(&lab, "w-1"), before, "nothing was evicted");
    let o = cnishift(&lab, &["node", "uncordon", "w-1"], &state);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // `cnishift migrate`: the values gate passes, the backup is written and
    // journaled, ctl-a migrates (its drain is fine: the healthy replica is
    // w-1's), and w-1's Drain step halts naming the volume.
    let o = cnishift(&lab, &["migrate", "-o", "json"], &state);
    let events: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let done = |step: &str| {
        events
            .iter()
            .find(|e| e["node"].is_null() && e["step"] == step && e["phase"] == "done")
            .cloned()
    };
    let v = done("values").unwrap_or_else(|| panic!("no values done: {}", text(&o)));
    assert!(
        v["detail"].as_str().unwrap().contains("fit this cluster"),
        "{v:#}"
    );
    let b = done("backup").unwrap_or_else(|| panic!("no backup done: {}", text(&o)));
    let dir = b["detail"]
        .as_str()
        .unwrap()
        .split(" saved to ")
        .nth(1)
        .unwrap()
        .split(" (restore")
        .next()
        .unwrap()
        .to_string();
    assert!(Path::new(&dir).join("nodes.yaml").is_file(), "{dir}");
    assert!(dir.starts_with(state.to_str().unwrap()), "{dir}");
    let first_node = events.iter().position(|e| !e["node"].is_null()).unwrap();
    let backup_at = events
        .iter()
        .position(|e| e["step"] == "backup" && e["phase"] == "done")
        .unwrap();
    assert!(
        backup_at < first_node,
        "the backup comes before the first node is touched"
    );
    assert!(
        events
            .iter()
            .any(|e| e["node"] == "ctl-a" && e["step"] == "done" && e["phase"] == "done"),
        "{}",
        text(&o)
    );
    let halted = events.iter().find(|e| e["phase"] == "halted").unwrap();
    assert_eq!(
        (halted["node"].as_str(), halted["step"].as_str()),
        (Some("w-1"), Some("drain")),
        "{halted:#}"
    );
    assert!(
        halted["detail"]
            .as_str()
            .unwrap()
            .contains("has its only healthy replica on w-1"),
        "{halted:#}"
    );
    assert_eq!(pods_on(&lab, "w-1"), before, "nothing was evicted from w-1");
    // The journal keeps the backup's path; a resume does not back up again.
    let o = cnishift(&lab, &["status", "-o", "json"], &state);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("w-1"),
        "{}",
        text(&o)
    );
    let journal = std::fs::read_to_string(state.join("journal.jsonl")).unwrap();
    assert_eq!(
        journal.matches("\"step\":\"backup\"").count(),
        2,
        "an intent and its done: {journal}"
    );
    assert!(journal.contains(&dir), "{journal}");

    // Once Longhorn has rebuilt the replicas, the same command resumes at
    // w-1's Drain and finishes, without a second backup.
    let o = lab.lab(&["fault", "--clear"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cnishift(&lab, &["migrate", "-o", "json"], &state);
    assert_eq!(o.status.code(), Some(0), "the resume: {}", text(&o));
    let journal = std::fs::read_to_string(state.join("journal.jsonl")).unwrap();
    assert_eq!(
        journal.matches("\"step\":\"backup\"").count(),
        2,
        "the resume backed up again: {journal}"
    );
    for n in ["ctl-a", "w-1", "w-2"] {
        assert_eq!(
            lab.node_state(n, "cnishift.io/cni"),
            (false, Some("cilium".to_string())),
            "{n} is not migrated and uncordoned"
        );
    }
}
