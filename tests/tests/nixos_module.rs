//! The NixOS module, evaluated with Debian's nix-bin and the stand-in lib
//! (nixos-module/tests/): its own evaluation tests, its ExecStart against the
//! real agent's flags, bad option values, and mutations of the module that the
//! tests must catch. The flake's VM test is the full check; it needs Nix.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `nix-instantiate --eval --strict` without a daemon or a store.
fn nix_eval(attr: &str, module: Option<&Path>, json: bool) -> Option<Output> {
    let state = std::env::temp_dir().join("cnishift-nix-state");
    let mut c = Command::new("nix-instantiate");
    c.env("NIX_STATE_DIR", &state)
        .args([
            "--option",
            "build-users-group",
            "",
            "--eval",
            "--strict",
            "--store",
            "dummy://",
        ])
        .arg(repo().join("nixos-module/tests/eval.nix"))
        .args(["-A", attr]);
    if json {
        c.arg("--json");
    }
    if let Some(m) = module {
        c.arg("--arg").arg("modulePath").arg(m);
    }
    match c.output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but nix-instantiate is missing (apt-get install nix-bin)"
            );
            eprintln!("SKIPPED: nix-instantiate not installed (apt-get install nix-bin)");
            None
        }
        Err(e) => panic!("nix-instantiate: {e}"),
    }
}

fn summary(module: Option<&Path>) -> Option<serde_json::Value> {
    let o = nix_eval("summary", module, true)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

#[test]
fn the_module_passes_its_evaluation_tests() {
    let Some(s) = summary(None) else { return };
    println!("nixos-module evaluation: {}", s["line"].as_str().unwrap());
    assert_eq!(s["failed"], 0, "{s:#}");
    assert!(s["passed"].as_u64().unwrap() >= 28, "{s:#}");
}

#[test]
fn exec_start_uses_only_flags_the_agent_has() {
    let Some(o) = nix_eval("execStart", None, true) else {
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exec: String = serde_json::from_slice(&o.stdout).unwrap();
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(words[0].ends_with("/bin/cnishift-agent"), "{exec}");
    let agent = cnishift_lab::cluster::binary("cnishift-agent", "CNISHIFT_AGENT_BIN").unwrap();
    // clap rejects an unknown flag before it reaches --help.
    let run = |extra: &[&str]| {
        Command::new(&agent)
            .args(&words[1..])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&["--help"]);
    assert!(
        ok.status.success(),
        "the agent refused the module's ExecStart:\n{exec}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bogus = run(&["--bogus-flag", "--help"]);
    assert_eq!(
        bogus.status.code(),
        Some(2),
        "the check can fail: an unknown flag is refused"
    );
}

#[test]
fn bad_values_fail_naming_the_option() {
    for (case, option) in [
        ("badPort", "services.cnishift-agent.port"),
        ("relativeTls", "services.cnishift-agent.tls.caFile"),
        ("unknownOption", "services.cnishift-agent.prot"),
        ("wrongType", "services.cnishift-agent.openFirewall"),
    ] {
        let Some(o) = nix_eval(&format!("case.{case}"), None, false) else {
            return;
        };
        assert!(!o.status.success(), "{case} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("`{option}'")), "{case}: {err}");
    }
}

/// Each bug, planted in a copy of the module, must make the named test fail.
#[test]
fn the_tests_catch_planted_bugs() {
    let original = std::fs::read_to_string(repo().join("nixos-module/module.nix")).unwrap();
    let mutations: &[(&str, &str, &str, &str)] = &[
        (
            "wrong default port",
            "default = 7443;",
            "default = 7444;",
            "default port 7443 in ExecStart",
        ),
        (
            "missing ExecStart flag",
            "\"--node-name\"\n    cfg.nodeName\n",
            "",
            "ExecStart has every serve flag",
        ),
        (
            "mkIf inside a list leaks",
            "networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];",
            "networking.firewall.allowedTCPPorts = [ (mkIf cfg.openFirewall cfg.port) ];",
            "nothing leaks (no unresolved mkIf anywhere)",
        ),
        (
            "mkIf false does not guard",
            "(mkIf cfg.enable {",
            "(mkIf true {",
            "disabled generates nothing",
        ),
        (
            "k3s flags on an agent node",
            "mkIf (config.services.k3s.role == \"server\") [",
            "mkIf true [",
            "prerequisites: no k3s flags on an agent node",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (bug, from, to, test) in mutations {
        assert!(
            original.contains(from),
            "mutation {bug:?} no longer applies: update the test"
        );
        let path = dir.path().join(format!("{}.nix", bug.replace(' ', "-")));
        std::fs::write(&path, original.replace(from, to)).unwrap();
        let Some(s) = summary(Some(&path)) else {
            return;
        };
        let failures: Vec<&str> = s["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert!(
            failures.contains(test),
            "planted bug {bug:?} was not caught by {test:?}; failures: {failures:?}"
        );
    }
}
