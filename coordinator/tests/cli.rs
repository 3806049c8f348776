//! The `cnishift` binary as a user runs it. (These tests also make
//! `cargo test --workspace` build the binary that the lab tests drive.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn cnishift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnishift"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn openssl(args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn certs_are_issued_0600_checked_by_openssl_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(cnishift(&["certs", "init", "--dir", d]).status.success());
    assert!(cnishift(&["certs", "issue", "--dir", d, "--coordinator"])
        .status
        .success());
    let o = cnishift(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--node",
        "opi01",
        "--ip",
        "10.1.0.11",
        "--days",
        "30",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for key in ["ca-key.pem", "coordinator-key.pem", "opi01-key.pem"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // An implementation nobody here wrote agrees: chain, SANs, usage, validity.
    let ca = format!("{d}/ca.pem");
    assert!(openssl(&["verify", "-CAfile", &ca, &format!("{d}/opi01.pem")]).contains("OK"));
    assert!(openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-purpose",
        "sslclient",
        &format!("{d}/coordinator.pem")
    ])
    .contains("OK"));
    let san = openssl(&[
        "x509",
        "-in",
        &format!("{d}/opi01.pem"),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        san.contains("DNS:opi01") && san.contains("IP Address:10.1.0.11"),
        "{san}"
    );
    let san = openssl(&[
        "x509",
        "-in",
        &format!("{d}/coordinator.pem"),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(san.contains("DNS:cnishift-coordinator"), "{san}");
    let days_ok = Command::new("openssl")
        .args([
            "x509",
            "-in",
            &format!("{d}/opi01.pem"),
            "-noout",
            "-checkend",
            &(29 * 86400).to_string(),
        ])
        .status()
        .unwrap();
    assert!(days_ok.success(), "valid for the 30 days asked");
    let days_over = Command::new("openssl")
        .args([
            "x509",
            "-in",
            &format!("{d}/opi01.pem"),
            "-noout",
            "-checkend",
            &(31 * 86400).to_string(),
        ])
        .status()
        .unwrap();
    assert!(!days_over.success(), "and not longer");

    let before = std::fs::read(dir.path().join("opi01-key.pem")).unwrap();
    let o = cnishift(&["certs", "issue", "--dir", d, "--node", "opi01"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("refusing to overwrite") && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(dir.path().join("opi01-key.pem")).unwrap(),
        before
    );
    assert_eq!(
        cnishift(&["certs", "init", "--dir", d]).status.code(),
        Some(2),
        "the CA is never replaced silently"
    );

    let o = cnishift(&["certs", "issue", "--dir", d, "--node", "../../etc/evil"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("not a usable node name"));
    assert!(!Path::new("/etc/evil.pem").exists());
}

#[test]
fn issuing_without_a_ca_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = cnishift(&[
        "certs",
        "issue",
        "--dir",
        dir.path().to_str().unwrap(),
        "--node",
        "opi01",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("ca.pem"), "{}", text(&o));
    let o = cnishift(&["certs", "issue", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--node or --coordinator is required"
    );
}

#[test]
fn a_bad_inventory_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("cluster.toml");
    std::fs::write(&inv, "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\n[[nodes]]\nname = \"opi01\"\nrole = \"controler\"\naddress = \"10.1.0.11:7443\"\n").unwrap();
    let o = cnishift(&["preflight", "-i", inv.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o),
        format!(
            "cnishift: {}:8:8: unknown variant `controler`, expected `controller` or `worker`\n  \
             hint: role is \"controller\" or \"worker\"\n",
            inv.display()
        )
    );

    let missing = dir.path().join("missing.toml");
    let o = cnishift(&["preflight", "-i", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o),
        format!(
            "cnishift: {}: cannot read the inventory: No such file or directory (os error 2)\n  \
             hint: pass -i PATH, or see examples/avalanche.toml for the format\n",
            missing.display()
        )
    );
}

#[test]
fn the_seed_example_parses_and_wants_its_certificates() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/avalanche.toml");
    let inv = cnishift::inventory::Inventory::load(&example, Default::default()).unwrap();
    assert_eq!(inv.nodes.len(), 9);
    assert_eq!(
        inv.nodes
            .iter()
            .filter(|n| n.role == cnishift::inventory::Role::Controller)
            .count(),
        3
    );
    assert_eq!(inv.cluster.api_vip, Some("10.1.0.5:6443".parse().unwrap()));
    assert_eq!(inv.cluster.cilium_namespace, "cilium");
    let o = cnishift(&["preflight", "-i", example.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let ca = example.parent().unwrap().join("pki/ca.pem");
    assert_eq!(
        text(&o),
        format!(
            "cnishift: {}:13:6: tls.ca: {} does not exist\n  hint: create it with `cnishift \
             certs init/issue --dir DIR`; relative paths are relative to the inventory file\n",
            example.display(),
            ca.display()
        )
    );
}

#[test]
fn help_teaches_the_workflow_and_exit_codes() {
    let h = text(&cnishift(&["--help"]));
    assert!(
        h.contains("cnishift certs init") && h.contains("Exit codes"),
        "{h}"
    );
    let h = text(&cnishift(&["preflight", "--help"]));
    assert!(
        h.contains("--inventory") && h.contains("CNISHIFT_INVENTORY") && h.contains("Exit codes"),
        "{h}"
    );
}

#[test]
fn etcd_snapshot_is_for_controllers_of_the_inventory_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(cnishift(&["certs", "init", "--dir", d]).status.success());
    assert!(cnishift(&["certs", "issue", "--dir", d, "--coordinator"])
        .status
        .success());
    let inv = dir.path().join("cluster.toml");
    std::fs::write(
        &inv,
        format!(
            "[cluster]\nname = \"c\"\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/coordinator.pem\"\nkey = \"{d}/coordinator-key.pem\"\n\
             [[nodes]]\nname = \"opi01\"\nrole = \"controller\"\naddress = \"127.0.0.1:9\"\n\
             [[nodes]]\nname = \"raccoon00\"\nrole = \"worker\"\naddress = \"127.0.0.2:9\"\n"
        ),
    )
    .unwrap();
    let i = inv.to_str().unwrap();
    let o = cnishift(&["etcd", "snapshot", "-i", i, "raccoon00"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "cnishift: raccoon00 is a worker: etcd runs on the controllers"
    );
    let o = cnishift(&["etcd", "snapshot", "-i", i, "opi09"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // Nothing listens: not taken, and the agent's absence is said.
    let o = cnishift(&["etcd", "snapshot", "-i", i, "opi01", "--run", "r1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).starts_with("cnishift: no etcd snapshot on opi01: unreachable: "),
        "{}",
        text(&o)
    );
    let o = cnishift(&["etcd", "status", "-i", i, "-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    assert!(v["controllers"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("unreachable: "));
    assert!(v["cluster"]["error"].as_str().unwrap().starts_with(
        "no controller's etcd member answered with its member list: opi01: unreachable"
    ));
}

#[test]
fn a_reader_that_goes_away_ends_plan_quietly_not_with_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/avalanche.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cnishift"))
        .args(["plan", "-o", "json", "-i"])
        .arg(&example)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The read end is closed before the child has started writing (as
    // `| head -c0` would): its first write meets EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        o.status
    );
}
