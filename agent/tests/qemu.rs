//! The aarch64 agent, run under qemu-user on this x86_64 machine's /proc
//! (`scripts/build-aarch64 --test` sets CNISHIFT_AARCH64_AGENT). qemu-user
//! does not pass bpf() through, like gVisor and some seccomp profiles: the
//! report must say so as a fail of `bpf.syscall`, keep every file-based check,
//! and exit 1 (not ready), not 2 and not a crash.

mod common;

use std::process::Command;

#[test]
fn aarch64_agent_under_qemu_reports_enosys_and_keeps_file_checks() {
    let Ok(bin) = std::env::var("CNISHIFT_AARCH64_AGENT") else {
        assert!(
            !common::in_ci(),
            "CI=true but CNISHIFT_AARCH64_AGENT is not set (scripts/build-aarch64 --test sets it)"
        );
        eprintln!("SKIPPED: CNISHIFT_AARCH64_AGENT not set; run scripts/build-aarch64 --test");
        return;
    };
    let runner =
        std::env::var("CNISHIFT_TEST_RUNNER").unwrap_or_else(|_| "qemu-aarch64-static".into());
    let out = Command::new(&runner)
        .arg(&bin)
        .args(["report", "--json"])
        .output()
        .expect("qemu-aarch64-static runs");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        out.status.code(),
        Some(1),
        "not ready, and not an agent error"
    );
    assert_eq!(r["agent"]["build_arch"], "aarch64", "the binary is aarch64");
    let uname =
        String::from_utf8(Command::new("uname").arg("-m").output().unwrap().stdout).unwrap();
    assert_eq!(
        r["facts"]["kernel"]["arch"],
        uname.trim(),
        "the facts are the host's"
    );
    let c = common::check(&r, "bpf.syscall");
    assert_eq!(c["verdict"], "fail");
    assert_eq!(
        c["message"],
        "eBPF cannot be probed here: the bpf() syscall is not available (ENOSYS)"
    );
    assert_eq!(
        common::verdict(&r, "bpf.prog.sched_cls"),
        "warn",
        "not probed, never a pass"
    );
    // File-based checks are still evaluated from the real /proc.
    assert_eq!(common::verdict(&r, "kernel.version"), "pass");
    assert_eq!(r["facts"]["kernel_config"]["source"], "/proc/config.gz");
    assert!(common::message(&r, "kernel.config.BPF").contains("CONFIG_BPF=y"));
    assert!(r["facts"]["sysctls"]["net.ipv4.ip_forward"]["state"] == "value");
}
