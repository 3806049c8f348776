//! The shipped agent has no test hooks. The fault hooks the kill tests use
//! (`CNISHIFT_TEST_*` variables, e.g. `CNISHIFT_TEST_CRASH_AFTER_ITEMS`) exist
//! only under the `test-hooks` feature, which the tests' build enables and
//! `cargo build --release` does not. The release binary checked here is the
//! shipped aarch64 agent that `scripts/build-aarch64` builds (`.ci/run` sets
//! CNISHIFT_AARCH64_AGENT); each check has a control on this test build, which
//! has the hooks, so it cannot pass by finding nothing anywhere.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// The release agent, run through `$CNISHIFT_TEST_RUNNER` (qemu-aarch64-static).
fn release_agent() -> Option<String> {
    match std::env::var("CNISHIFT_AARCH64_AGENT") {
        Ok(bin) if !bin.is_empty() => Some(bin),
        _ => {
            assert!(
                !in_ci(),
                "CI=true but CNISHIFT_AARCH64_AGENT is not set (scripts/build-aarch64 builds it)"
            );
            eprintln!("SKIPPED: CNISHIFT_AARCH64_AGENT not set; run scripts/build-aarch64");
            None
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_release_binary_names_no_test_hook() {
    let Some(release) = release_agent() else {
        return;
    };
    // Control: the name is findable in a build that has the hook.
    let hooked = std::fs::read(agent_bin()).unwrap();
    assert!(
        contains(&hooked, b"CNISHIFT_TEST_CRASH_AFTER_ITEMS"),
        "the test build ({}) should have the crash hook",
        agent_bin()
    );
    let shipped = std::fs::read(&release).unwrap();
    assert!(shipped.len() > 1_000_000, "{release} is not the agent");
    assert!(
        contains(&shipped, b"cnishift-agent"),
        "{release} is not the agent"
    );
    assert!(
        !contains(&shipped, b"CNISHIFT_TEST_"),
        "{release} reads a CNISHIFT_TEST_* variable: a test hook is in the shipped build"
    );
}

/// A host root with only Flannel's files left (no live probes: no interfaces,
/// no iptables), and Cilium's config in place.
fn leftovers() -> Fixture {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    f.write("proc/1/cmdline", b"/usr/local/bin/k3s\0server\0");
    f.write(
        "etc/rancher/k3s/config.yaml",
        "flannel-backend: none\ndisable-network-policy: true\n",
    );
    f.write(
        "etc/cni/net.d/05-cilium.conflist",
        r#"{"name":"cilium","cniVersion":"0.3.1","plugins":[{"type":"cilium-cni"}]}"#,
    );
    f.write(
        "etc/cni/net.d/10-flannel.conflist",
        r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#,
    );
    f.write(
        "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
        r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel"}]}"#,
    );
    f.write("run/flannel/subnet.env", "FLANNEL_NETWORK=10.42.0.0/16\n");
    f.write("var/lib/cni/flannel/c0ffee", r#"{"cniVersion":"0.3.1"}"#);
    f
}

/// `cleanup --apply` of [`leftovers`] with the crash hook set to the first item.
fn apply_with_crash_hook(mut agent: Command) -> (std::process::Output, tempfile::TempDir) {
    let f = leftovers();
    let state = tempfile::tempdir().unwrap();
    let out = agent
        .args([
            "cleanup",
            "--apply",
            "--force",
            "--no-live-probes",
            "-o",
            "json",
        ])
        .arg("--host-root")
        .arg(f.root())
        .arg("--state-dir")
        .arg(state.path())
        .env("CNISHIFT_TEST_CRASH_AFTER_ITEMS", "1")
        .output()
        .unwrap();
    (out, state)
}

#[test]
fn the_release_binary_ignores_the_crash_hook() {
    let Some(release) = release_agent() else {
        return;
    };
    // Control: the test build dies after the first item.
    let (out, state) = apply_with_crash_hook(agent_command());
    assert_eq!(out.status.code(), None, "the hook aborts: {}", out.status);
    assert!(state.path().join("cleanup-pending").exists());

    let runner =
        std::env::var("CNISHIFT_TEST_RUNNER").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let mut shipped = Command::new(&runner);
    shipped.arg(&release);
    let (out, state) = apply_with_crash_hook(shipped);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{release} obeyed the crash hook ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let outcomes = r["outcomes"].as_array().unwrap();
    assert!(outcomes.len() >= 3, "{r:#}");
    assert!(outcomes.iter().all(|o| o["ok"] == true), "{r:#}");
    assert!(
        !state.path().join("cleanup-pending").exists(),
        "the apply finished"
    );
}
