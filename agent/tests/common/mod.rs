//! Test helpers: fixture host roots, the real fixtures in ../shared, running
//! the real `cnishift-agent` binary, and the root/CI skip rule.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `../shared/fixtures` beside the repository (CI lays it there), or
/// `$CNISHIFT_SHARED/fixtures`.
pub fn shared_fixtures() -> Option<PathBuf> {
    let base = std::env::var_os("CNISHIFT_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let p = base.join("fixtures/kernel-configs");
    p.is_dir().then_some(p)
}

/// The real config file `name` from the shared fixtures. Under CI a missing
/// fixture is a failure, elsewhere a loud skip (returns None).
pub fn real_config(name: &str) -> Option<String> {
    match shared_fixtures() {
        Some(dir) => Some(fs::read_to_string(dir.join(name)).expect("fixture readable")),
        None => {
            assert!(
                !in_ci(),
                "CI=true but ../shared/fixtures/kernel-configs is missing"
            );
            eprintln!("SKIPPED: ../shared/fixtures/kernel-configs not found (set CNISHIFT_SHARED)");
            None
        }
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when the test may use root-only facilities; prints a loud SKIPPED
/// line otherwise, and refuses to skip under CI=true.
pub fn require_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!in_ci(), "CI=true but not root: {what} must run in CI");
    eprintln!("SKIPPED (needs root): {what}");
    false
}

/// A host-root tree under a temp dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> &Self {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
        self
    }

    pub fn mkdir(&self, rel: &str) -> &Self {
        fs::create_dir_all(self.root().join(rel)).unwrap();
        self
    }

    pub fn kernel(&self, release: &str, arch: &str) -> &Self {
        self.write("proc/sys/kernel/osrelease", format!("{release}\n"));
        self.write("proc/sys/kernel/arch", format!("{arch}\n"))
    }

    pub fn config_gz(&self, text: &str) -> &Self {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        self.write("proc/config.gz", enc.finish().unwrap())
    }

    /// A `modules.dep` listing every module an `=m` option of `config` builds
    /// among `modules`, as a node with its modules package installed has.
    pub fn modules_dep(&self, release: &str, modules: &[&str]) -> &Self {
        let body: String = modules
            .iter()
            .map(|m| format!("kernel/net/{m}.ko.xz:\n"))
            .collect();
        self.write(&format!("lib/modules/{release}/modules.dep"), body)
    }

    pub fn meminfo(&self, total_kib: u64, avail_kib: u64) -> &Self {
        self.write(
            "proc/meminfo",
            format!(
                "MemTotal: {total_kib} kB\nMemFree: {avail_kib} kB\nMemAvailable: {avail_kib} kB\n"
            ),
        )
    }

    /// The sysctls a well-prepared node has.
    pub fn good_sysctls(&self) -> &Self {
        for (k, v) in [
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/forwarding", "1"),
            ("net/bridge/bridge-nf-call-iptables", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/core/bpf_jit_enable", "1"),
        ] {
            self.write(&format!("proc/sys/{k}"), format!("{v}\n"));
        }
        self
    }
}

/// The modules Raspberry Pi 4's `=m` options and the runbook need.
pub const PI4_MODULES: &[&str] = &[
    "sch_ingress",
    "algif_hash",
    "vxlan",
    "geneve",
    "xt_set",
    "ip_set",
    "ip_set_hash_ip",
    "xt_comment",
    "xt_TPROXY",
    "xt_mark",
    "xt_CT",
    "xt_socket",
    "xt_conntrack",
    "br_netfilter",
    "overlay",
    "cls_bpf",
];

pub const PI4_RELEASE: &str = "6.6.64-current-bcm2711";
pub const RK3588_RELEASE: &str = "6.12.0-rc3-edge-rockchip-rk3588";

/// A Raspberry Pi 4 host root built around `config` (the real one or a copy).
pub fn pi4_fixture(config: &str) -> Fixture {
    let f = Fixture::new();
    f.kernel(PI4_RELEASE, "aarch64")
        .config_gz(config)
        .modules_dep(PI4_RELEASE, PI4_MODULES);
    f.meminfo(3_884_000, 3_200_000).good_sysctls();
    f.write("etc/hostname", "raccoon00\n");
    f
}

/// The agent binary under test: this build's, or `$CNISHIFT_AGENT_BIN` (the
/// aarch64 build, run through `$CNISHIFT_TEST_RUNNER`).
pub fn agent_bin() -> String {
    std::env::var("CNISHIFT_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_cnishift-agent").to_string())
}

/// A command that runs the agent binary under test, through
/// `$CNISHIFT_TEST_RUNNER` (e.g. `qemu-aarch64-static`) when it is set: the
/// aarch64 agent is tested on an x86_64 machine without binfmt_misc.
pub fn agent_command() -> Command {
    match std::env::var("CNISHIFT_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut c = Command::new(runner);
            c.arg(agent_bin());
            c
        }
        _ => Command::new(agent_bin()),
    }
}

/// A command (run as root) that runs the agent under test as the unprivileged
/// user nobody (65534, no groups) through util-linux `setpriv`, for what only
/// permission bits decide. The binary is copied into the returned temp dir,
/// which nobody can reach: the build's target dir may sit under a 0700 home.
pub fn as_nobody() -> (Command, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("cnishift-agent");
    fs::copy(agent_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
    match std::env::var("CNISHIFT_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => c.arg(runner).arg(&bin),
        _ => c.arg(&bin),
    };
    (c, dir)
}

/// Runs `cnishift-agent report --json` with `args`; returns (exit code, JSON).
pub fn report_json(args: &[&str]) -> (i32, Value) {
    let out = agent_command()
        .arg("report")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let code = out.status.code().expect("exited, not killed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}), exit {code}:\n{stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}

/// The report of a fixture tree without live probes.
pub fn fixture_report(f: &Fixture) -> (i32, Value) {
    report_json(&[
        "--host-root",
        f.root().to_str().unwrap(),
        "--no-live-probes",
    ])
}

pub fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in report"))
}

pub fn verdict(report: &Value, id: &str) -> String {
    check(report, id)["verdict"].as_str().unwrap().to_string()
}

pub fn message(report: &Value, id: &str) -> String {
    check(report, id)["message"].as_str().unwrap().to_string()
}

/// Runs a command that must succeed; returns its trimmed stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A network namespace of this test process, deleted on drop (also when the
/// test fails). Tags must be unique among the tests of one binary.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("cnishift-t-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        Netns(name)
    }

    /// Runs `cmd` (split on whitespace) inside the namespace; it must succeed.
    pub fn run(&self, cmd: &str) -> String {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend(cmd.split_whitespace());
        sh("ip", &args)
    }

    /// Interface names, as `ip -o link show` lists them.
    pub fn links(&self) -> Vec<String> {
        self.run("ip -o link show")
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }

    /// The user-defined chains of an iptables table.
    pub fn chains(&self, table: &str) -> Vec<String> {
        self.run(&format!("iptables -t {table} -S"))
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .map(String::from)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
