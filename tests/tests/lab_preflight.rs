//! `cnishift preflight` against the 9-node seed cluster in the lab: real
//! agents in network namespaces, the real coordinator binary in its own
//! namespace, mutual TLS over the lab bridge.

use std::time::{Duration, Instant};

use cnishift_lab::cluster::{seed_nodes, Lab, LabOptions};
use cnishift_lab::require_root;
use serde_json::Value;

/// Runs `cnishift preflight -o json` in the coordinator namespace.
fn preflight(lab: &Lab) -> (i32, Value, Duration) {
    let start = Instant::now();
    let out = lab
        .coordinator()
        .args(["preflight", "-o", "json"])
        .output()
        .unwrap();
    let took = start.elapsed();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json, took)
}

fn node<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap()
}

fn reported(r: &Value) -> Vec<String> {
    r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["report"].is_object())
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn nine_seed_nodes_report_over_mutual_tls() {
    if !require_root("lab network namespaces") {
        return;
    }
    let lab = Lab::up(&seed_nodes(), &LabOptions::default()).unwrap();
    let (code, r, _) = preflight(&lab);
    assert_eq!(reported(&r).len(), 9, "{r:#}");
    for (name, role) in seed_nodes() {
        let n = node(&r, &name);
        assert_eq!(n["role"], role.to_string());
        let report = &n["report"];
        assert_eq!(
            report["kernel_arch"], "aarch64",
            "each agent read its own host root"
        );
        assert!(report["checks"].as_array().unwrap().len() > 60);
        // The verdicts are the agent's: the coordinator ships them unchanged.
        let facts_node = report["facts"]["k3s"]["role"].as_str().unwrap();
        assert_eq!(
            facts_node,
            if name.starts_with("opi") {
                "server"
            } else {
                "agent"
            }
        );
    }
    if cnishift_lab::hostroot::shared_configs().is_some() {
        // The real RK3588 config lacks SCHEDSTATS: controllers are not ready.
        let c = node(&r, "opi01");
        assert_eq!(c["status"], "not_ready");
        let sched = c["report"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "kernel.config.SCHEDSTATS")
            .unwrap();
        assert_eq!(sched["verdict"], "fail");
        assert_eq!(node(&r, "raccoon00")["status"], "ready");
        assert_eq!(code, 1);
        assert_eq!(r["ready"], false);
    }
}

#[test]
fn a_killed_agent_is_reported_unreachable_and_the_others_still_report() {
    if !require_root("lab network namespaces") {
        return;
    }
    let mut lab = Lab::up(&seed_nodes(), &LabOptions::default()).unwrap();
    lab.kill_agent("raccoon03").unwrap();
    let (code, r, took) = preflight(&lab);
    assert_eq!(code, 1);
    assert_eq!(
        node(&r, "raccoon03")["status"],
        "unreachable",
        "{:#}",
        node(&r, "raccoon03")
    );
    assert!(node(&r, "raccoon03")["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("refused"));
    assert_eq!(reported(&r).len(), 8);
    assert!(
        took < Duration::from_secs(2),
        "a refused connection is reported at once, took {took:?}"
    );
}

#[test]
fn a_cut_link_is_reported_within_its_deadline_and_the_others_still_report() {
    if !require_root("lab network namespaces") {
        return;
    }
    let opts = LabOptions {
        connect_deadline: "1500ms",
        report_deadline: "4s",
        ..Default::default()
    };
    let lab = Lab::up(&seed_nodes(), &opts).unwrap();
    lab.net.set_link("raccoon04", false).unwrap();
    let (code, r, took) = preflight(&lab);
    assert_eq!(code, 1);
    let cut = node(&r, "raccoon04");
    assert_eq!(cut["status"], "timeout", "{cut:#}");
    assert!(
        cut["elapsed_ms"].as_u64().unwrap() < 2_500,
        "the connect deadline (1.5 s) was enforced: {cut:#}"
    );
    assert_eq!(reported(&r).len(), 8);
    assert!(
        took < Duration::from_secs(4),
        "one cut link must not hold the run: {took:?}"
    );

    lab.net.set_link("raccoon04", true).unwrap();
    let (_, r, _) = preflight(&lab);
    assert_eq!(
        reported(&r).len(),
        9,
        "the node reports again once its link is back"
    );
}

#[test]
fn the_table_names_failures_first_with_the_agents_fix() {
    if !require_root("lab network namespaces") {
        return;
    }
    let mut lab = Lab::up(&seed_nodes(), &LabOptions::default()).unwrap();
    lab.kill_agent("opi02").unwrap();
    let out = lab.coordinator().arg("preflight").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("opi02") && text.contains("unreachable"),
        "{text}"
    );
    // Without the real configs every reachable node is ready; with them the
    // two remaining controllers fail SCHEDSTATS.
    let expected = if cnishift_lab::hostroot::shared_configs().is_some() {
        "6/9 nodes ready"
    } else {
        "8/9 nodes ready"
    };
    assert!(text.contains(expected), "{text}");
    if cnishift_lab::hostroot::shared_configs().is_some() {
        let fail_row = text
            .find("kernel.config.SCHEDSTATS")
            .expect("the failing check is listed");
        let warn_row = text
            .find("flannel.file.10-flannel.conflist")
            .expect("warnings are listed");
        assert!(fail_row < warn_row, "failures come first:\n{text}");
        assert!(
            text.contains("fix: rebuild the kernel with CONFIG_SCHEDSTATS"),
            "{text}"
        );
    }
}
