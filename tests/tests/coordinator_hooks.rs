//! The coordinator's one test hook, `CNISHIFT_TEST_KILL_AFTER_RECORDS=N`
//! (coordinator/src/migrate/journal.rs, feature `test-hooks`): the tests'
//! build obeys it, and a build as shipped neither names nor obeys it.
//!
//! No root needed: the simulated API server runs in this process on
//! loopback, and the inventory's one agent address answers nothing, so a run
//! writes exactly three records (the header, an intent for the node's
//! Preflight, its failure) and halts.
//!
//! The shipped binary: `CNISHIFT_SHIPPED_COORDINATOR`, else
//! target/release/cnishift when it exists (the README's first command builds
//! it; a `--release` build never enables a dev-dependency's feature). CI
//! builds no shipped coordinator (a build without the tests' dependencies
//! resolves tokio and a few other shared crates with other features, so most
//! of the dependency tree would compile a second time), so there the proof
//! is Cargo's own resolution of a build without tests
//! (`a_build_without_tests_resolves_no_test_hooks`); both run where they can.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cnishift_lab::apiserver::{kubeconfig, ApiServer};
use cnishift_lab::harness::{boundary, cnishift_bin, journal, text};

const HOOK: &[u8] = b"CNISHIFT_TEST_KILL_AFTER_RECORDS";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A one-node cluster whose agent is not there: an API server on loopback,
/// certificates, an inventory.
struct World {
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = ApiServer::new();
        api.add_node("n1", true, true);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(api.serve(listener));
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig(addr)).unwrap();
        let pki = dir.path().join("pki");
        for args in [
            vec!["init", "--days", "1"],
            vec!["issue", "--coordinator", "--ip", "127.0.0.1", "--days", "1"],
        ] {
            let o = Command::new(cnishift_bin())
                .arg("certs")
                .args(&args[..1])
                .arg("--dir")
                .arg(&pki)
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(o.status.success(), "cnishift certs {args:?}: {}", text(&o));
        }
        std::fs::write(
            dir.path().join("cluster.toml"),
            "[cluster]\nname = \"hooks\"\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator-key.pem\"\n\
             [deadlines]\nconnect = \"1s\"\nreport = \"2s\"\napi = \"2s\"\n\
             [hooks]\ndeploy = [\"true\"]\n\
             [[nodes]]\nname = \"n1\"\nrole = \"controller\"\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        World { dir, _rt: rt }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `BIN migrate` with the hook's variable set to `n`.
    fn migrate(&self, bin: &Path, state: &str, n: &str) -> Output {
        Command::new(bin)
            .arg("migrate")
            .arg("-i")
            .arg(self.dir.path().join("cluster.toml"))
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--state-dir")
            .arg(self.state(state))
            .env("CNISHIFT_TEST_KILL_AFTER_RECORDS", n)
            .env_remove("KUBECONFIG")
            .output()
            .unwrap()
    }

    fn records(&self, state: &str) -> Vec<String> {
        journal(&self.state(state)).iter().map(boundary).collect()
    }
}

#[test]
fn the_tests_coordinator_is_killed_right_after_the_record_it_is_told() {
    let bin = cnishift_bin();
    assert!(
        contains(&std::fs::read(&bin).unwrap(), HOOK),
        "{} has no kill hook: `cargo test --workspace` builds it with the `test-hooks` feature; \
         alone, `cargo build -p cnishift --features test-hooks` first",
        bin.display()
    );
    let w = World::new();
    // Unset, the run backs the cluster up, then halts at n1's Preflight
    // (its agent is not there).
    let o = w.migrate(&bin, "free", "");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(
        w.records("free"),
        [
            "header",
            "intent cluster backup",
            "done cluster backup",
            "intent n1 preflight",
            "failed n1 preflight"
        ]
    );
    for (n, records) in [
        ("1", vec!["header"]),
        ("2", vec!["header", "intent cluster backup"]),
        (
            "4",
            vec![
                "header",
                "intent cluster backup",
                "done cluster backup",
                "intent n1 preflight",
            ],
        ),
    ] {
        let state = format!("killed-after-{n}");
        let o = w.migrate(&bin, &state, n);
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGKILL),
            "N={n}: {} {}",
            o.status,
            text(&o)
        );
        assert_eq!(w.records(&state), records, "N={n}");
    }
}

/// The shipped coordinator, if this machine has one.
fn shipped() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CNISHIFT_SHIPPED_COORDINATOR").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/cnishift");
    release.is_file().then_some(release)
}

#[test]
fn a_shipped_coordinator_neither_names_nor_obeys_the_hook() {
    let Some(bin) = shipped() else {
        eprintln!(
            "SKIPPED: no shipped coordinator here (set CNISHIFT_SHIPPED_COORDINATOR, or \
             `cargo build --release -p cnishift`); a_build_without_tests_resolves_no_test_hooks \
             is the proof that runs everywhere"
        );
        return;
    };
    let bytes = std::fs::read(&bin).unwrap();
    assert!(
        bytes.len() > 1_000_000,
        "{} is not the coordinator",
        bin.display()
    );
    assert!(
        contains(&bytes, b"cnishift-coordinator"),
        "{} is not the coordinator",
        bin.display()
    );
    assert!(
        !contains(&bytes, b"CNISHIFT_TEST_"),
        "{} names a CNISHIFT_TEST_* variable: a test hook is in the shipped build",
        bin.display()
    );
    let w = World::new();
    let o = w.migrate(&bin, "shipped", "2");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{} obeyed the kill hook ({}): {}",
        bin.display(),
        o.status,
        text(&o)
    );
    assert_eq!(
        w.records("shipped"),
        [
            "header",
            "intent cluster backup",
            "done cluster backup",
            "intent n1 preflight",
            "failed n1 preflight"
        ]
    );
}

/// `cnishift`'s features as Cargo resolves them for `edges`.
fn features(edges: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args(["tree", "-p", "cnishift", "-e", edges, "-f", "{p} [{f}]"])
        .args(["--prefix", "none", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(o.status.success(), "cargo tree: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.starts_with("cnishift v"))
        .unwrap_or_else(|| panic!("no cnishift in {}", text(&o)))
        .to_string()
}

#[test]
fn a_build_without_tests_resolves_no_test_hooks() {
    // Control: the tests' resolution (dev-dependencies) has the feature.
    let tests = features("normal,build,dev");
    assert!(tests.contains("test-hooks"), "{tests}");
    // `cargo build` / `cargo install` / `--release`: no dev-dependencies.
    let shipped = features("normal,build");
    assert!(
        shipped.ends_with(" []"),
        "a build without tests enables features of cnishift: {shipped}"
    );
}
