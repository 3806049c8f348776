//! Hostile and broken inputs: a precise warn/fail or exit 2, never a panic,
//! never a pass on what could not be read.

mod common;

use common::*;

/// No check may pass whose input was unreadable: every kernel.config.* check
/// must be a warn saying "cannot verify".
fn assert_no_config_pass(r: &serde_json::Value) {
    for c in r["checks"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        if id.starts_with("kernel.config.") && id != "kernel.config.file" {
            assert_eq!(c["verdict"], "warn", "{id}: {}", c["message"]);
            assert!(
                c["message"].as_str().unwrap().contains("cannot verify"),
                "{id}"
            );
        }
    }
}

#[test]
fn truncated_config_gz_is_rejected_not_half_read() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64")
        .config_gz(&"CONFIG_BPF=y\nCONFIG_SCHEDSTATS=y\n".repeat(2000));
    let gz = std::fs::read(f.root().join("proc/config.gz")).unwrap();
    f.write("proc/config.gz", &gz[..gz.len() / 2]);
    let (code, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.config.file"), "warn");
    let msg = message(&r, "kernel.config.file");
    assert!(
        msg.contains("/proc/config.gz") && msg.contains("truncated"),
        "{msg}"
    );
    assert_no_config_pass(&r);
    assert_eq!(code, 0, "warnings alone do not make the node not-ready");
}

#[test]
fn corrupt_config_gz_falls_back_to_boot_config() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    f.write(
        "proc/config.gz",
        b"\x1f\x8b\x08\x00garbage that is not deflate",
    );
    f.write("boot/config-6.6.64", "CONFIG_BPF=y\n");
    let (_, r) = fixture_report(&f);
    assert_eq!(r["facts"]["kernel_config"]["source"], "/boot/config-6.6.64");
    let rejected = r["facts"]["kernel_config"]["rejected_sources"][0]
        .as_str()
        .unwrap();
    assert!(
        rejected.contains("/proc/config.gz") && rejected.contains("gzip"),
        "{rejected}"
    );
    assert_eq!(verdict(&r, "kernel.config.BPF"), "pass");
    assert_eq!(
        verdict(&r, "kernel.config.SCHEDSTATS"),
        "fail",
        "missing from the config that was read"
    );
}

#[test]
fn garbage_lines_are_named_and_good_lines_still_count() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    f.write(
        "boot/config-6.6.64",
        b"CONFIG_BPF=y\n\xff\xfe binary junk\nCONFIG_BPF_JIT=y\n<html>oops</html>\n",
    );
    let (_, r) = fixture_report(&f);
    let msg = message(&r, "kernel.config.file");
    assert_eq!(verdict(&r, "kernel.config.file"), "warn");
    assert!(
        msg.contains("2 lines") && msg.contains("line 2") && msg.contains("line 4"),
        "{msg}"
    );
    assert_eq!(verdict(&r, "kernel.config.BPF_JIT"), "pass");
}

#[test]
fn a_file_of_pure_garbage_is_not_a_config() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64");
    f.write("boot/config-6.6.64", "hello\nworld\n");
    let (_, r) = fixture_report(&f);
    assert!(r["facts"]["kernel_config"]["source"].is_null());
    assert!(message(&r, "kernel.config.file").contains("not a kernel config"));
    assert_no_config_pass(&r);
}

#[test]
fn unreadable_files_are_reported_with_their_path() {
    let f = Fixture::new();
    // A directory where a file should be is unreadable even for root.
    f.mkdir("proc/sys/kernel/osrelease");
    f.write("proc/sys/kernel/arch", "aarch64\n");
    f.mkdir("proc/sys/net/ipv4/ip_forward");
    let (code, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "kernel.version"), "fail");
    let msg = message(&r, "kernel.version");
    assert!(
        msg.contains("/proc/sys/kernel/osrelease could not be read"),
        "{msg}"
    );
    assert_eq!(code, 1, "an unknown kernel is never ready");
    assert_eq!(verdict(&r, "sysctl.net.ipv4.ip_forward"), "warn");
    assert!(message(&r, "sysctl.net.ipv4.ip_forward").contains("cannot verify"));
}

#[test]
fn unreadable_for_a_non_root_reader() {
    // Permission bits only bite non-root. As root (CI), the config is root's
    // own 0600 file and the agent runs as nobody through setpriv; as any other
    // user, the file is the user's own with no read bit. Either way the agent's
    // reader is denied: it must say so and never pass a config it did not read.
    use std::os::unix::fs::PermissionsExt;
    let root = nix::unistd::geteuid().is_root();
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64")
        .write("boot/config-6.6.64", "CONFIG_BPF=y\n");
    let config = f.root().join("boot/config-6.6.64");
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    if root {
        // Control: root reads the same tree, so what follows is the permission.
        let (_, r) = fixture_report(&f);
        assert_eq!(r["facts"]["kernel_config"]["source"], "/boot/config-6.6.64");
        mode(f.root(), 0o755); // a temp dir is 0700: let nobody walk the tree
        mode(&config, 0o600);
    } else {
        mode(&config, 0o000);
    }
    let (mut cmd, _bin_dir) = if root {
        as_nobody()
    } else {
        (agent_command(), tempfile::tempdir().unwrap())
    };
    let out = cmd
        .args(["report", "--json", "--no-live-probes", "--host-root"])
        .arg(f.root())
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}), {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // The agent did run and read the tree: the readable files were read.
    assert_eq!(verdict(&r, "kernel.version"), "pass", "{r:#}");
    let facts = &r["facts"]["kernel_config"];
    assert!(facts["source"].is_null(), "{facts:#}");
    assert_eq!(
        facts["rejected_sources"],
        serde_json::json!([
            "/boot/config-6.6.64 could not be read: Permission denied (os error 13)"
        ]),
        "{facts:#}"
    );
    assert_eq!(verdict(&r, "kernel.config.file"), "warn");
    assert_eq!(
        message(&r, "kernel.config.file"),
        "cannot verify kernel options: no usable kernel config: /boot/config-6.6.64 could not be read: Permission denied (os error 13)"
    );
    assert_no_config_pass(&r);
    assert_eq!(
        out.status.code(),
        Some(0),
        "warnings alone do not make the node not-ready; 2 would be an agent error"
    );
}

#[test]
fn an_empty_host_root_is_not_ready() {
    let f = Fixture::new();
    let (code, r) = fixture_report(&f);
    assert_eq!(code, 1);
    assert_eq!(r["ready"], false);
    assert_no_config_pass(&r);
    assert_eq!(verdict(&r, "resources.memory"), "warn");
    assert!(message(&r, "resources.memory").contains("/proc/meminfo does not exist"));
    assert_eq!(verdict(&r, "k3s.flags"), "warn");
}

#[test]
fn malformed_proc_modules_lines_are_named() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64")
        .config_gz("CONFIG_MODULES=y\nCONFIG_BRIDGE_NETFILTER=m\nCONFIG_OVERLAY_FS=m\n");
    f.write(
        "proc/modules",
        "br_netfilter 32768 0 - Live 0x0\n!!garbage!!\noverlay notanumber\n\n",
    );
    f.modules_dep("6.6.64", &["overlay"]);
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "module.list"), "warn");
    let msg = message(&r, "module.list");
    assert!(
        msg.contains("2 malformed lines") && msg.contains("line 2") && msg.contains("line 3"),
        "{msg}"
    );
    assert_eq!(
        verdict(&r, "module.br_netfilter"),
        "pass",
        "the good line still counts"
    );
    assert_eq!(
        r["facts"]["modules"]["modules"]["overlay"]["state"],
        "loadable"
    );
}

#[test]
fn a_kernel_without_module_support_is_handled() {
    let f = Fixture::new();
    f.kernel("6.18.0", "x86_64").config_gz(
        "# CONFIG_MODULES is not set\nCONFIG_BRIDGE_NETFILTER=y\n# CONFIG_OVERLAY_FS is not set\n",
    );
    let (_, r) = fixture_report(&f);
    assert_eq!(r["facts"]["modules"]["module_support"], false);
    assert_eq!(verdict(&r, "module.br_netfilter"), "pass");
    assert_eq!(verdict(&r, "module.overlay"), "fail");
    assert!(message(&r, "module.overlay").contains("CONFIG_OVERLAY_FS is not set"));
}

#[test]
fn symlinks_out_of_the_tree_are_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("evil.conflist"),
        r#"{"name":"x","plugins":[{"type":"flannel"}]}"#,
    )
    .unwrap();
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64").mkdir("etc/cni/net.d");
    // A relative link climbing out of the root, and an absolute one (re-rooted).
    let rel_target = format!(
        "../../../../../../../../..{}/evil.conflist",
        outside.path().display()
    );
    std::os::unix::fs::symlink(
        &rel_target,
        f.root().join("etc/cni/net.d/10-escape.conflist"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("evil.conflist"),
        f.root().join("etc/cni/net.d/20-abs.conflist"),
    )
    .unwrap();
    let (_, r) = fixture_report(&f);
    let escape = message(&r, "cni.file.10-escape.conflist");
    assert!(escape.contains("escapes the host root"), "{escape}");
    let abs = message(&r, "cni.file.20-abs.conflist");
    assert!(
        abs.contains("does not exist"),
        "absolute links resolve inside the root: {abs}"
    );
    let files = r["facts"]["cni"]["etc"]["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .all(|f| f["plugins"].as_array().unwrap().is_empty()),
        "nothing outside was parsed"
    );
    assert!(
        outside.path().join("evil.conflist").exists(),
        "a report never deletes anything"
    );
}

#[test]
fn garbage_meminfo_is_a_warn_not_a_panic() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64")
        .write("proc/meminfo", "MemTotal: lots\n\0\0\0");
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "resources.memory"), "warn");
}

#[test]
fn thin_memory_warns_and_too_little_fails() {
    let f = Fixture::new();
    f.kernel("6.6.64", "aarch64").meminfo(3_884_000, 3_000_000);
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "resources.memory"), "warn", "a 4 GB Pi");
    f.meminfo(3_884_000, 400_000);
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "resources.memory"), "fail");
    f.meminfo(16_000_000, 12_000_000);
    let (_, r) = fixture_report(&f);
    assert_eq!(verdict(&r, "resources.memory"), "pass");
}

#[test]
fn a_host_root_that_is_not_a_directory_exits_2() {
    let file = tempfile::NamedTempFile::new().unwrap();
    for root in [file.path().to_str().unwrap(), "/nonexistent/cnishift-root"] {
        let out = agent_command()
            .args(["report", "--host-root", root])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{root}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(root), "the message names the path: {err}");
        assert!(out.stdout.is_empty(), "no partial report on stdout");
    }
}

#[test]
fn bad_flags_are_a_usage_error() {
    let out = agent_command()
        .args(["report", "-o", "yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}
