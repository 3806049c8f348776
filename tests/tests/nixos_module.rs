//! The NixOS module, evaluated by nixpkgs' own module system (`lib.evalModules`
//! from the real nixpkgs `lib` in ../shared/vendor/nixpkgs-lib/lib) with
//! Debian's nix-bin and no daemon or store: its evaluation tests, its ExecStart
//! against the real agent's flags, bad option values refused with the module
//! system's own messages, a NixOS option type error planted in the module, the
//! rollback unit's script run for the arguments it must refuse, and mutations
//! of the module that the tests must catch. The NixOS options the module sets
//! are declared with NixOS's types in nixos-module/tests/nixos-options.nix;
//! the flake's VM test (`nix flake check`, needs Nix) is the full check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// nixpkgs' `lib/` from the shared dir (`$CNISHIFT_SHARED`, else `../shared`
/// beside the repository). Missing: a failure under CI=true, a loud skip
/// elsewhere.
fn nixpkgs_lib() -> Option<PathBuf> {
    let shared = std::env::var_os("CNISHIFT_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"));
    let lib = shared.join("vendor/nixpkgs-lib/lib");
    if lib.join("default.nix").is_file() {
        return Some(lib);
    }
    let msg = format!(
        "nixpkgs' lib not found at {}: the NixOS module is evaluated with nixpkgs' own \
         lib.evalModules from ../shared/vendor/nixpkgs-lib/lib beside the repository \
         (set CNISHIFT_SHARED to the shared dir)",
        lib.display()
    );
    assert!(!in_ci(), "CI=true but {msg}");
    eprintln!("SKIPPED: {msg}");
    None
}

/// `nix-instantiate --eval --strict` of `eval.nix -A attr` without a daemon
/// or a store; `module` replaces module.nix. None when skipped (never under CI).
fn nix_eval(attr: &str, module: Option<&Path>, json: bool) -> Option<Output> {
    let lib = nixpkgs_lib()?;
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
        .args(["-A", attr])
        .arg("--arg")
        .arg("nixpkgsLib")
        .arg(&lib);
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
                !in_ci(),
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

fn source_commit() -> String {
    let lib = nixpkgs_lib().expect("checked by the caller");
    let source = std::fs::read_to_string(lib.join("../SOURCE")).unwrap();
    let at = source.find("commit ").expect("SOURCE names a commit") + "commit ".len();
    source[at..at + 40].to_string()
}

#[test]
fn the_module_passes_its_evaluation_tests() {
    let Some(s) = summary(None) else { return };
    let line = s["line"].as_str().unwrap();
    println!("nixos-module evaluation: {line}");
    assert_eq!(s["failed"], 0, "{s:#}");
    assert!(s["passed"].as_u64().unwrap() >= 44, "{s:#}");
    // The line says which nixpkgs lib ran it: its version and the vendored commit.
    let version = std::fs::read_to_string(nixpkgs_lib().unwrap().join(".version")).unwrap();
    assert!(
        line.contains(&format!("nixpkgs lib {}", version.trim())),
        "{line}"
    );
    assert!(line.contains(&source_commit()), "{line}");
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

/// Each bad definition fails with the module system's own message, naming the
/// option (the sysctl and host name cases are NixOS options declared with
/// NixOS's types).
#[test]
fn bad_values_fail_naming_the_option() {
    for (case, message) in [
        (
            "badPort",
            "A definition for option `services.cnishift-agent.port' is not of type \
             `16 bit unsigned integer; between 0 and 65535 (both inclusive)'",
        ),
        (
            "relativeTls",
            "A definition for option `services.cnishift-agent.tls.caFile' is not of type \
             `absolute path",
        ),
        (
            "unknownOption",
            "The option `services.cnishift-agent.prot' does not exist.",
        ),
        (
            "wrongType",
            "A definition for option `services.cnishift-agent.openFirewall' is not of type `boolean'",
        ),
        (
            "sysctlList",
            "A definition for option `boot.kernel.sysctl.\"net.core.somaxconn\"' is not of type \
             `sysctl option value'",
        ),
        (
            "hostNameWithDomain",
            "A definition for option `networking.hostName' is not of type `string matching the pattern",
        ),
        (
            "rollbackScriptSet",
            "The option `services.cnishift-agent.rollback.script' is read-only",
        ),
    ] {
        let Some(o) = nix_eval(&format!("case.{case}"), None, false) else {
            return;
        };
        assert!(!o.status.success(), "{case} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(message), "{case}: expected {message:?} in:\n{err}");
    }
}

/// A wrong type for a NixOS option, planted in the module itself: the real
/// type check refuses the configuration with NixOS's own type name.
#[test]
fn a_nixos_option_type_error_in_the_module_is_caught() {
    let original = std::fs::read_to_string(repo().join("nixos-module/module.nix")).unwrap();
    let from = "\"net.ipv4.ip_forward\" = 1;";
    assert!(original.contains(from), "the mutation no longer applies");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sysctl-list.nix");
    std::fs::write(
        &path,
        original.replace(from, "\"net.ipv4.ip_forward\" = [ 1 ];"),
    )
    .unwrap();
    // The unchanged module evaluates the same configuration.
    let Some(good) = nix_eval("check.prereqServer", None, false) else {
        return;
    };
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let bad = nix_eval("check.prereqServer", Some(&path), false).unwrap();
    assert!(!bad.status.success(), "a sysctl list was accepted");
    let err = String::from_utf8_lossy(&bad.stderr);
    let expected = "error: A definition for option `boot.kernel.sysctl.\"net.ipv4.ip_forward\"' \
                    is not of type `sysctl option value'. Definition values:";
    assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    // ...and it names the file the bad definition is in.
    assert!(err.contains("sysctl-list.nix"), "{err}");
}

/// The rollback unit's script, run for instances it must refuse: it stops
/// before it looks at a profile or runs nix-env.
#[test]
fn the_rollback_script_accepts_only_a_generation_number() {
    let Some(o) = nix_eval("rollbackScript", None, true) else {
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script: String = serde_json::from_slice(&o.stdout).unwrap();
    let run = |arg: Option<&str>| {
        let mut c = Command::new("bash");
        c.arg("-c").arg(&script).arg("cnishift-rollback");
        if let Some(a) = arg {
            c.arg(a);
        }
        c.output().unwrap()
    };
    for arg in [
        None,
        Some(""),
        Some("abc"),
        Some("42;reboot"),
        Some("4 2"),
        Some("-1"),
        Some("../42"),
        Some("42\n"),
    ] {
        let o = run(arg);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{arg:?}: {err}");
        assert!(
            err.contains("cnishift-rollback: refusing generation")
                && err.contains("it must be digits only"),
            "{arg:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{arg:?} went on: {:?}", o.stdout);
    }
    // Digits pass the check; a generation that does not exist stops there.
    let o = run(Some("987654321"));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "cnishift-rollback: no system generation 987654321: \
         /nix/var/nix/profiles/system-987654321-link does not exist\n"
    );
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
        // The real module system resolves an mkIf inside a listOf option's
        // elements (the firewall's ports), but not inside a systemd unit
        // option's list, which NixOS only concatenates: there it leaks.
        (
            "mkIf inside a unit's list leaks",
            "ReadWritePaths = cleanupPaths ++ lib.optional (!stateUnderVarLib) cfg.stateDir;",
            "ReadWritePaths = cleanupPaths ++ [ (mkIf (!stateUnderVarLib) cfg.stateDir) ];",
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
        (
            "rollback unit started at boot",
            "restartIfChanged = false;\n",
            "restartIfChanged = false;\n        wantedBy = [ \"multi-user.target\" ];\n",
            "rollback unit: not started at boot",
        ),
        (
            "rollback command run inside the agent's unit",
            "default = \"systemctl start --wait cnishift-rollback@{generation}.service\";",
            "default = \"/nix/var/nix/profiles/system-{generation}-link/bin/switch-to-configuration switch\";",
            "the agent unit does not run the rollback itself",
        ),
        (
            "rollback command default changed",
            "default = \"systemctl start --wait cnishift-rollback@{generation}.service\";",
            "default = \"systemctl start cnishift-rollback@{generation}.service\";",
            "rollback command defaults to the rollback unit",
        ),
        (
            "rollback override ignored",
            "environment.CNISHIFT_ROLLBACK_COMMAND = cfg.rollback.command;",
            "environment.CNISHIFT_ROLLBACK_COMMAND = \"systemctl start --wait cnishift-rollback@{generation}.service\";",
            "rollback command can be overridden",
        ),
        (
            "agent made writable for the rollback",
            "ReadWritePaths = cleanupPaths ++",
            "ReadWritePaths = cleanupPaths ++ [ \"/nix/var/nix/profiles\" ] ++",
            "the agent unit gains no capability or writable path for the rollback",
        ),
        (
            "agent given a capability for the rollback",
            "\"CAP_DAC_READ_SEARCH\" ];",
            "\"CAP_DAC_READ_SEARCH\" \"CAP_SYS_BOOT\" ];",
            "the agent unit gains no capability or writable path for the rollback",
        ),
        (
            "rollback unit not a oneshot",
            "Type = \"oneshot\";",
            "Type = \"simple\";",
            "rollback unit: a oneshot template",
        ),
        (
            "rollback unit hardened like the agent",
            "Type = \"oneshot\";",
            "Type = \"oneshot\";\n          ProtectSystem = \"strict\";",
            "rollback unit: not hardened like the agent",
        ),
        (
            "rollback unit without its instance",
            "ExecStart = \"${cfg.rollback.script} %i\";",
            "ExecStart = \"${cfg.rollback.script}\";",
            "rollback unit: ExecStart is its script with the instance (%i)",
        ),
        (
            "rollback unit restarted by the switch it runs",
            "restartIfChanged = false;\n",
            "",
            "rollback unit: not restarted by the switch it runs",
        ),
        (
            "rollback unit unbounded",
            "TimeoutStartSec = \"4min\";",
            "",
            "rollback unit: bounded, within the agent's 5 min",
        ),
        (
            "rollback script takes any instance",
            "\"\" | *[!0-9]*)",
            "\"\")",
            "rollback script: refuses anything but digits, first",
        ),
        (
            "rollback script ignores nix.package",
            "${config.nix.package}/bin/nix-env",
            "${pkgs.nix}/bin/nix-env",
            "rollback script: nix from nix.package",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (bug, from, to, test) in mutations {
        assert!(
            original.contains(from),
            "mutation {bug:?} no longer applies: update the test"
        );
        // A Nix path literal: letters, digits and dashes only.
        let name: String = bug
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = dir.path().join(format!("{name}.nix"));
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
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
