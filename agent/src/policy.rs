//! The one place verdicts are made.
//!
//! The requirements are data (the tables below, from Cilium's system
//! requirements page and the migration runbook); `evaluate` turns facts into
//! checks. The coordinator never re-derives a verdict: it shows these.
//! Anything that could not be read becomes a `warn` that says so — never a
//! `pass`.

use serde::{Deserialize, Serialize};

use crate::probe::bpf::{Support, SyscallState};
use crate::probe::kconfig::OptionValue;
use crate::probe::modules::{ModuleState, Wanted};
use crate::probe::network::FLANNEL_INTERFACES;
use crate::probe::sysctl::SysctlValue;
use crate::probe::{cni_files, Facts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One judged requirement. `id` is stable and dotted; automation keys on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub id: String,
    pub verdict: Verdict,
    pub message: String,
    /// What to do about it, NixOS first. `None` on a pass.
    pub remediation: Option<String>,
}

/// Why a kernel option is on Cilium's list, and what is lost without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Cilium does not start without it.
    Base,
    /// VXLAN/Geneve tunnelling and policy routing.
    Tunnel,
    /// iptables-based masquerading.
    Masquerade,
    /// The L7 / FQDN proxy.
    L7,
}

impl Group {
    fn missing(self) -> Verdict {
        match self {
            Group::Base => Verdict::Fail,
            _ => Verdict::Warn,
        }
    }
    fn loss(self) -> &'static str {
        match self {
            Group::Base => "Cilium cannot run without it",
            Group::Tunnel => "tunnel (VXLAN/Geneve) routing mode will not work",
            Group::Masquerade => "iptables masquerading will not work",
            Group::L7 => "the L7/FQDN proxy will not work",
        }
    }
}

pub struct ConfigRequirement {
    /// Without the `CONFIG_` prefix.
    pub option: &'static str,
    pub group: Group,
    /// The module an `=m` build produces.
    pub module: Option<&'static str>,
}

const fn req(
    option: &'static str,
    group: Group,
    module: Option<&'static str>,
) -> ConfigRequirement {
    ConfigRequirement {
        option,
        group,
        module,
    }
}

/// Cilium's kernel configuration requirements.
pub const KERNEL_CONFIG: &[ConfigRequirement] = &[
    req("BPF", Group::Base, None),
    req("BPF_SYSCALL", Group::Base, None),
    req("NET_CLS_BPF", Group::Base, Some("cls_bpf")),
    req("BPF_JIT", Group::Base, None),
    req("NET_CLS_ACT", Group::Base, None),
    req("NET_SCH_INGRESS", Group::Base, Some("sch_ingress")),
    req("CRYPTO_SHA1", Group::Base, Some("sha1_generic")),
    req("CRYPTO_USER_API_HASH", Group::Base, Some("algif_hash")),
    req("CGROUPS", Group::Base, None),
    req("CGROUP_BPF", Group::Base, None),
    req("PERF_EVENTS", Group::Base, None),
    req("SCHEDSTATS", Group::Base, None),
    req("VXLAN", Group::Tunnel, Some("vxlan")),
    req("GENEVE", Group::Tunnel, Some("geneve")),
    req("FIB_RULES", Group::Tunnel, None),
    req("NETFILTER_XT_SET", Group::Masquerade, Some("xt_set")),
    req("IP_SET", Group::Masquerade, Some("ip_set")),
    req("IP_SET_HASH_IP", Group::Masquerade, Some("ip_set_hash_ip")),
    req(
        "NETFILTER_XT_MATCH_COMMENT",
        Group::Masquerade,
        Some("xt_comment"),
    ),
    req("NETFILTER_XT_TARGET_TPROXY", Group::L7, Some("xt_TPROXY")),
    req("NETFILTER_XT_TARGET_MARK", Group::L7, Some("xt_mark")),
    req("NETFILTER_XT_TARGET_CT", Group::L7, Some("xt_CT")),
    req("NETFILTER_XT_MATCH_MARK", Group::L7, Some("xt_mark")),
    req("NETFILTER_XT_MATCH_SOCKET", Group::L7, Some("xt_socket")),
];

/// The runbook's modules (Phase 2), with the option that builds each.
pub const RUNBOOK_MODULES: &[(&str, &str)] = &[
    ("xt_socket", "NETFILTER_XT_MATCH_SOCKET"),
    ("xt_mark", "NETFILTER_XT_MARK"),
    ("xt_conntrack", "NETFILTER_XT_MATCH_CONNTRACK"),
    ("br_netfilter", "BRIDGE_NETFILTER"),
    ("overlay", "OVERLAY_FS"),
];

pub const MIN_KERNEL: (u32, u32) = (5, 10);
/// Cilium's multicast support needs 6.0 on aarch64.
pub const MIN_KERNEL_AARCH64_MULTICAST: (u32, u32) = (6, 0);
/// Cilium agent memory limit (512 MiB) plus Hubble's share (128 MiB).
pub const CILIUM_MEMORY_BYTES: u64 = (512 + 128) * 1024 * 1024;
/// At or below this total, a node is a 4 GB Pi: warn about headroom.
pub const SMALL_NODE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The config options the probes should report on.
pub fn wanted_options() -> Vec<&'static str> {
    let mut v: Vec<&str> = KERNEL_CONFIG.iter().map(|r| r.option).collect();
    v.extend(RUNBOOK_MODULES.iter().map(|(_, o)| *o));
    v.push("MODULES");
    v
}

/// Every module the module probe should classify (runbook + `=m`-capable options).
pub fn wanted_modules() -> Vec<Wanted<'static>> {
    let mut v: Vec<Wanted> = RUNBOOK_MODULES
        .iter()
        .map(|(m, o)| Wanted {
            module: m,
            option: Some(o),
        })
        .collect();
    for r in KERNEL_CONFIG {
        if let Some(m) = r.module {
            if !v.iter().any(|w| w.module == m) {
                v.push(Wanted {
                    module: m,
                    option: Some(r.option),
                });
            }
        }
    }
    v
}

fn check(
    id: impl Into<String>,
    verdict: Verdict,
    message: impl Into<String>,
    remediation: Option<String>,
) -> Check {
    Check {
        id: id.into(),
        verdict,
        message: message.into(),
        remediation,
    }
}
fn pass(id: impl Into<String>, message: impl Into<String>) -> Check {
    check(id, Verdict::Pass, message, None)
}

/// Judges every fact. The order of the result is the order of the report.
/// Which network the node is expected to be on, so the same facts get the
/// right verdicts at either time (the wire's `Expectation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Readiness for Cilium only (the preflight): Cilium's absence is fine.
    #[default]
    Unspecified,
    /// Not migrated yet: k3s must still run Flannel here.
    Flannel,
    /// Migrated: Cilium must be the CNI containerd loads, and healthy.
    Cilium,
}

/// A family of checks that can be judged alone (the wire's `CheckFamily`):
/// the questions the coordinator asks between every two migration steps,
/// which need a few file reads, not every kernel and BPF probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// `k3s.flags`, `k3s.network`: from the k3s facts and containerd's
    /// generated config (the CNI facts).
    K3s,
    /// `cilium.pods`: from the network facts; judged only when Cilium is
    /// expected, as in a full report.
    PodNetwork,
}

/// The checks of `families` alone, judged exactly as a full report judges
/// them (the same functions, so a narrowed answer never disagrees with a
/// full one).
pub fn evaluate_families(f: &Facts, expect: Expect, families: &[Family]) -> Vec<Check> {
    let mut out = Vec::new();
    if families.contains(&Family::K3s) {
        k3s(f, expect, &mut out);
        k3s_network_check(f, expect, &mut out);
    }
    if families.contains(&Family::PodNetwork) && expect == Expect::Cilium {
        pods_on_cni0(f, &mut out);
    }
    out
}

pub fn evaluate(f: &Facts) -> Vec<Check> {
    evaluate_expecting(f, Expect::Unspecified)
}

pub fn evaluate_expecting(f: &Facts, expect: Expect) -> Vec<Check> {
    let mut out = Vec::new();
    kernel(f, &mut out);
    kernel_config(f, &mut out);
    bpf(f, &mut out);
    modules(f, &mut out);
    sysctls(f, &mut out);
    network(f, &mut out);
    cni(f, &mut out);
    k3s(f, expect, &mut out);
    k3s_network_check(f, expect, &mut out);
    etcd(f, &mut out);
    cilium(f, expect, &mut out);
    iptables(f, &mut out);
    resources(f, &mut out);
    out
}

fn kernel(f: &Facts, out: &mut Vec<Check>) {
    let k = &f.kernel;
    let Some(v) = k.version else {
        // Without the release nothing else can be judged (which config, which
        // modules): an empty or wrong host root must not come out "ready".
        out.push(check(
            "kernel.version",
            Verdict::Fail,
            format!(
                "cannot read the kernel version, so readiness cannot be judged: {}",
                k.errors.join("; ")
            ),
            Some(
                "check --host-root; the agent must be able to read /proc/sys/kernel/osrelease"
                    .into(),
            ),
        ));
        return;
    };
    let arch = k.arch.as_deref().unwrap_or("unknown arch");
    if (v.major, v.minor) < MIN_KERNEL {
        out.push(check(
            "kernel.version",
            Verdict::Fail,
            format!(
                "kernel {v} is older than {}.{}, the oldest Cilium supports",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            Some("boot.kernelPackages = pkgs.linuxPackages_latest;".into()),
        ));
    } else if arch == "aarch64" && (v.major, v.minor) < MIN_KERNEL_AARCH64_MULTICAST {
        out.push(check(
            "kernel.version",
            Verdict::Warn,
            format!(
                "kernel {v} on aarch64: Cilium multicast needs 6.0 or newer and is unavailable"
            ),
            Some("boot.kernelPackages = pkgs.linuxPackages_6_6; (or newer)".into()),
        ));
    } else {
        out.push(pass("kernel.version", format!("kernel {v} ({arch})")));
    }
}

fn nixos_kernel_option(option: &str) -> String {
    format!(
        "rebuild the kernel with CONFIG_{option}: boot.kernelPatches = [ {{ name = \"cilium-{o}\"; patch = null; \
         extraStructuredConfig.{option} = lib.kernel.yes; }} ];",
        o = option.to_lowercase()
    )
}

fn kernel_config(f: &Facts, out: &mut Vec<Check>) {
    let c = &f.kernel_config;
    match (&c.source, &c.error) {
        (Some(src), _) if c.malformed_count > 0 => {
            let first: Vec<String> = c
                .malformed_lines
                .iter()
                .map(|(n, l)| format!("line {n}: {l:?}"))
                .collect();
            out.push(check(
                "kernel.config.file",
                Verdict::Warn,
                format!(
                    "{src}: {} lines are not kernel config syntax ({})",
                    c.malformed_count,
                    first.join(", ")
                ),
                Some("the config file looks damaged; compare it with the kernel package's".into()),
            ));
        }
        (Some(src), _) => out.push(pass("kernel.config.file", format!("read from {src}"))),
        (None, err) => out.push(check(
            "kernel.config.file",
            Verdict::Warn,
            format!(
                "cannot verify kernel options: {}",
                err.as_deref().unwrap_or("no config")
            ),
            Some(
                "enable CONFIG_IKCONFIG_PROC (/proc/config.gz) or install /boot/config-<release>"
                    .into(),
            ),
        )),
    }
    for r in KERNEL_CONFIG {
        let id = format!("kernel.config.{}", r.option);
        let Some(value) = c.value(r.option) else {
            out.push(check(
                id,
                Verdict::Warn,
                format!(
                    "cannot verify CONFIG_{}: no readable kernel config",
                    r.option
                ),
                None,
            ));
            continue;
        };
        let src = c.source.as_deref().unwrap_or("?");
        out.push(match value {
            OptionValue::Y => pass(id, format!("CONFIG_{}=y ({src})", r.option)),
            OptionValue::M => match (r.module, r.module.and_then(|m| f.modules.modules.get(m))) {
                (Some(m), Some(state)) if state.is_available() => {
                    pass(id, format!("CONFIG_{}=m, module {m} {}", r.option, describe_module(state)))
                }
                (Some(m), Some(ModuleState::Missing(why))) => check(
                    id,
                    r.group.missing(),
                    format!("CONFIG_{}=m but module {m} is missing ({why}): {}", r.option, r.group.loss()),
                    Some(format!("install the kernel's modules package, or boot.kernelModules = [ \"{m}\" ];")),
                ),
                (Some(m), Some(ModuleState::Unknown(why))) => check(
                    id,
                    Verdict::Warn,
                    format!("CONFIG_{}=m: cannot verify that module {m} can be loaded ({why})", r.option),
                    Some(format!("boot.kernelModules = [ \"{m}\" ];")),
                ),
                _ => check(
                    id,
                    Verdict::Warn,
                    format!("CONFIG_{}=m: cannot verify that its module is available", r.option),
                    None,
                ),
            },
            OptionValue::Unset => check(
                id,
                r.group.missing(),
                format!("CONFIG_{} is not set ({src}): {}", r.option, r.group.loss()),
                Some(nixos_kernel_option(r.option)),
            ),
            OptionValue::Value(v) => check(
                id,
                Verdict::Warn,
                format!("CONFIG_{}={v} is not y or m", r.option),
                Some(nixos_kernel_option(r.option)),
            ),
        });
    }
}

fn describe_module(state: &ModuleState) -> String {
    match state {
        ModuleState::Loaded => "is loaded".into(),
        ModuleState::BuiltIn(how) => format!("is built in ({how})"),
        ModuleState::Loadable(path) => format!("is loadable ({path})"),
        ModuleState::Missing(why) => format!("is missing ({why})"),
        ModuleState::Unknown(why) => format!("cannot be classified ({why})"),
    }
}

fn support_check(id: String, what: &str, s: &Support) -> Check {
    match s {
        Support::Supported => pass(id, format!("{what}: supported")),
        Support::Unsupported => check(
            id,
            Verdict::Fail,
            format!("{what}: the kernel refuses them"),
            Some("use a kernel built with Cilium's options (see the kernel.config checks)".into()),
        ),
        Support::Unknown(e) => check(
            id,
            Verdict::Warn,
            format!("{what}: the probe failed ({e})"),
            None,
        ),
        Support::Skipped(why) => check(
            id,
            Verdict::Warn,
            format!("{what}: not probed ({why})"),
            None,
        ),
    }
}

fn bpf(f: &Facts, out: &mut Vec<Check>) {
    let b = &f.bpf;
    out.push(match &b.syscall {
        SyscallState::Available => pass("bpf.syscall", "bpf() works: a test program was loaded"),
        SyscallState::NotImplemented(why) => check(
            "bpf.syscall",
            Verdict::Fail,
            format!("eBPF cannot be probed here: {why}"),
            Some("run the agent on the node itself, not under emulation or a sandbox that filters bpf()".into()),
        ),
        SyscallState::NotPermitted(why) => check(
            "bpf.syscall",
            Verdict::Fail,
            format!("eBPF cannot be probed here: {why}"),
            Some("run cnishift-agent as root (the NixOS module does)".into()),
        ),
        SyscallState::Failed(why) => check("bpf.syscall", Verdict::Fail, why.clone(), None),
        SyscallState::Skipped(why) => check("bpf.syscall", Verdict::Warn, format!("not probed ({why})"), None),
    });
    for (name, s) in &b.programs {
        out.push(support_check(
            format!("bpf.prog.{name}"),
            &format!("{name} programs"),
            s,
        ));
    }
    for (name, s) in &b.maps {
        out.push(support_check(
            format!("bpf.map.{name}"),
            &format!("{name} maps"),
            s,
        ));
    }
    let enable = b.jit.bpf_jit_enable;
    let jit_fix = Some("boot.kernel.sysctl.\"net.core.bpf_jit_enable\" = 1;".to_string());
    out.push(match (b.jit.jited_len, enable) {
        (Some(n), _) if n > 0 => pass(
            "bpf.jit",
            format!(
                "the JIT compiled a test program to {n} bytes of machine code (bpf_jit_enable={})",
                fmt_opt(enable)
            ),
        ),
        (Some(_), _) => check(
            "bpf.jit",
            Verdict::Fail,
            format!(
                "a test program was left to the interpreter: the JIT is off (bpf_jit_enable={})",
                fmt_opt(enable)
            ),
            jit_fix,
        ),
        (None, Some(0)) => check(
            "bpf.jit",
            Verdict::Fail,
            "net.core.bpf_jit_enable=0: the JIT is off",
            jit_fix,
        ),
        (None, _) => check(
            "bpf.jit",
            Verdict::Warn,
            format!(
                "cannot verify the JIT: {}",
                if b.jit.errors.is_empty() {
                    "not measured".to_string()
                } else {
                    b.jit.errors.join("; ")
                }
            ),
            None,
        ),
    });
    let m = &b.mounts;
    out.push(if m.bpffs_at_sys_fs_bpf {
        pass("bpf.fs", "bpffs is mounted at /sys/fs/bpf")
    } else {
        let elsewhere = if m.bpffs_mounts.is_empty() {
            String::new()
        } else {
            format!("; bpffs is mounted at {}", m.bpffs_mounts.join(", "))
        };
        check(
            "bpf.fs",
            Verdict::Warn,
            format!(
                "{}{elsewhere}: Cilium's maps will not survive an agent restart",
                m.sys_fs_bpf_detail
                    .as_deref()
                    .unwrap_or("/sys/fs/bpf is not bpffs")
            ),
            Some("fileSystems.\"/sys/fs/bpf\" = { device = \"bpffs\"; fsType = \"bpf\"; };".into()),
        )
    });
    out.push(if let Some(first) = m.cgroup2_mounts.first() {
        pass("bpf.cgroup2", format!("cgroup2 is mounted at {first}"))
    } else {
        check(
            "bpf.cgroup2",
            Verdict::Warn,
            format!(
                "no cgroup2 mount found{}: Cilium's socket load-balancing needs cgroup v2",
                errs_suffix(&m.errors)
            ),
            Some("systemd.enableUnifiedCgroupHierarchy = true; (the NixOS default)".into()),
        )
    });
}

fn fmt_opt(v: Option<i64>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

fn errs_suffix(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" ({})", errors.join("; "))
    }
}

fn modules(f: &Facts, out: &mut Vec<Check>) {
    let m = &f.modules;
    if !m.malformed_lines.is_empty() {
        let shown: Vec<String> = m
            .malformed_lines
            .iter()
            .take(3)
            .map(|(n, l)| format!("line {n}: {l:?}"))
            .collect();
        out.push(check(
            "module.list",
            Verdict::Warn,
            format!(
                "/proc/modules has {} malformed lines ({}); module states may be incomplete",
                m.malformed_lines.len(),
                shown.join(", ")
            ),
            None,
        ));
    }
    for w in wanted_modules() {
        let runbook = RUNBOOK_MODULES.iter().any(|(n, _)| *n == w.module);
        let base = KERNEL_CONFIG
            .iter()
            .any(|r| r.module == Some(w.module) && r.group == Group::Base);
        // Only the runbook's modules and those behind `=m` options are
        // reported; a `=y` option is already covered by its config check.
        let is_m = w.option.and_then(|o| f.kernel_config.value(o)) == Some(OptionValue::M);
        if !runbook && !is_m && f.kernel_config.full.is_some() {
            continue;
        }
        let id = format!("module.{}", w.module);
        let severity = if runbook || base {
            Verdict::Fail
        } else {
            Verdict::Warn
        };
        let fix = Some(format!("boot.kernelModules = [ \"{}\" ];", w.module));
        out.push(match m.modules.get(w.module) {
            Some(s) if s.is_available() => pass(id, format!("{} {}", w.module, describe_module(s))),
            Some(ModuleState::Missing(why)) => {
                check(id, severity, format!("{} is missing: {why}", w.module), fix)
            }
            Some(ModuleState::Unknown(why)) => check(
                id,
                Verdict::Warn,
                format!("cannot verify {}: {why}", w.module),
                fix,
            ),
            _ => check(
                id,
                Verdict::Warn,
                format!("cannot verify {}: not probed", w.module),
                fix,
            ),
        });
    }
}

fn sysctl_fix(key: &str, value: &str) -> Option<String> {
    Some(format!(
        "boot.kernel.sysctl.\"{key}\" = {value}; (now: sysctl -w {key}={value})"
    ))
}

fn sysctls(f: &Facts, out: &mut Vec<Check>) {
    let get = |k: &str| f.sysctls.get(k).cloned().unwrap_or(SysctlValue::Absent);
    for key in ["net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding"] {
        let id = format!("sysctl.{key}");
        out.push(match get(key) {
            SysctlValue::Value(v) if v == "1" => pass(id, format!("{key}=1")),
            SysctlValue::Value(v) => check(id, Verdict::Warn, format!("{key}={v}: nodes will not forward pod traffic until Cilium turns it on; make it permanent"), sysctl_fix(key, "1")),
            SysctlValue::Absent => check(id, Verdict::Warn, format!("{key} does not exist on this kernel"), None),
            SysctlValue::Unreadable(e) => check(id, Verdict::Warn, format!("cannot verify: {e}"), None),
        });
    }
    let key = "net.bridge.bridge-nf-call-iptables";
    let br_loaded = f
        .modules
        .modules
        .get("br_netfilter")
        .is_some_and(|s| matches!(s, ModuleState::Loaded | ModuleState::BuiltIn(_)));
    out.push(match get(key) {
        SysctlValue::Value(v) if v == "1" => pass(format!("sysctl.{key}"), format!("{key}=1")),
        SysctlValue::Value(v) => check(
            format!("sysctl.{key}"),
            Verdict::Warn,
            format!("{key}={v}: bridged traffic bypasses iptables"),
            sysctl_fix(key, "1"),
        ),
        SysctlValue::Absent if !br_loaded => check(
            format!("sysctl.{key}"),
            Verdict::Warn,
            format!("{key} is absent because br_netfilter is not loaded"),
            Some(format!(
                "boot.kernelModules = [ \"br_netfilter\" ]; boot.kernel.sysctl.\"{key}\" = 1;"
            )),
        ),
        SysctlValue::Absent => check(
            format!("sysctl.{key}"),
            Verdict::Warn,
            format!("{key} is absent although br_netfilter is present"),
            sysctl_fix(key, "1"),
        ),
        SysctlValue::Unreadable(e) => check(
            format!("sysctl.{key}"),
            Verdict::Warn,
            format!("cannot verify: {e}"),
            None,
        ),
    });
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    ] {
        let id = format!("sysctl.{key}");
        out.push(match get(key) {
            SysctlValue::Value(v) if v == "0" => pass(id, format!("{key}=0")),
            SysctlValue::Value(v) if v == "2" => check(
                id,
                Verdict::Warn,
                format!("{key}=2 (systemd's default, loose mode) makes the kernel drop Cilium's pod traffic on lxc interfaces"),
                sysctl_fix(key, "0"),
            ),
            SysctlValue::Value(v) => check(id, Verdict::Warn, format!("{key}={v}: reverse-path filtering drops Cilium's pod traffic"), sysctl_fix(key, "0")),
            SysctlValue::Absent => check(id, Verdict::Warn, format!("{key} does not exist on this kernel"), None),
            SysctlValue::Unreadable(e) => check(id, Verdict::Warn, format!("cannot verify: {e}"), None),
        });
    }
    let key = "net.core.bpf_jit_enable";
    let id = format!("sysctl.{key}");
    out.push(match get(key) {
        SysctlValue::Value(v) if v == "1" || v == "2" => pass(id, format!("{key}={v}")),
        SysctlValue::Value(v) => check(
            id,
            Verdict::Fail,
            format!("{key}={v}: eBPF runs in the interpreter"),
            sysctl_fix(key, "1"),
        ),
        SysctlValue::Absent => check(
            id,
            Verdict::Warn,
            format!("{key} does not exist: this kernel may have no BPF JIT"),
            None,
        ),
        SysctlValue::Unreadable(e) => check(id, Verdict::Warn, format!("cannot verify: {e}"), None),
    });
}

const CLEANUP_FIX: &str = "after Cilium runs on this node: cnishift-agent cleanup --apply";

fn network(f: &Facts, out: &mut Vec<Check>) {
    let n = &f.network;
    for name in FLANNEL_INTERFACES {
        let id = format!("flannel.interface.{name}");
        if let Some(why) = &n.not_probed {
            out.push(check(
                id,
                Verdict::Warn,
                format!("not probed ({why})"),
                None,
            ));
            continue;
        }
        out.push(match n.flannel_interfaces.get(*name) {
            None => pass(id, format!("{name} is absent")),
            Some(i) => {
                let extra = if *name == "cni0" {
                    format!(" with {} attached pod interfaces", n.cni0_members.len())
                } else {
                    String::new()
                };
                check(
                    id,
                    Verdict::Warn,
                    format!(
                        "{name} ({}) is present{extra}: Flannel's datapath is still plumbed in",
                        i.kind.as_deref().unwrap_or("no kind")
                    ),
                    Some(CLEANUP_FIX.into()),
                )
            }
        });
    }
    if n.not_probed.is_none() {
        out.push(if n.flannel_routes.is_empty() {
            pass("flannel.routes", "no routes through Flannel's interfaces")
        } else {
            let shown: Vec<&str> = n
                .flannel_routes
                .iter()
                .take(4)
                .map(String::as_str)
                .collect();
            check(
                "flannel.routes",
                Verdict::Warn,
                format!(
                    "{} routes through Flannel's interfaces ({})",
                    n.flannel_routes.len(),
                    shown.join(", ")
                ),
                Some(CLEANUP_FIX.into()),
            )
        });
    }
}

/// Which CNI directory containerd reads, and how we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniDirSource {
    /// k3s's generated containerd config (what the *running* k3s uses).
    Containerd,
    /// k3s's flags (process, config, unit): what k3s uses when it starts.
    Flags,
    /// Nothing says: k3s's own directory (Flannel's) when it exists.
    Default,
}

/// Whether the running k3s uses Flannel, as far as the node shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum K3sNetwork {
    Flannel,
    NoFlannel,
    Unknown,
}

/// THE rule for which CNI directory containerd reads — the report's
/// `cni.active` and cleanup's interlocks both use it, so they can never
/// judge different directories.
///
/// k3s writes containerd's config each time it starts: with Flannel its
/// `conf_dir` is `<data-dir>/agent/etc/cni/net.d`, with
/// `--flannel-backend=none` containerd's default `/etc/cni/net.d` (bin
/// `/opt/cni/bin`). That generated file is the best witness (it is also the
/// only one on an agent, which takes the backend from its server); without
/// it, the flags k3s runs (or will start) with; without those, k3s's own
/// directory when it exists (Flannel is k3s's default).
pub fn active_cni_dir(f: &Facts) -> (&cni_files::CniDir, CniDirSource) {
    let etc = format!("/{}", cni_files::ETC_CNI_DIR);
    let k3s = format!("/{}", cni_files::K3S_CNI_DIR);
    let c = &f.cni.containerd;
    if c.error.is_none() {
        match c.conf_dir.as_deref().map(|d| d.trim_end_matches('/')) {
            Some(d) if d == etc => return (&f.cni.etc, CniDirSource::Containerd),
            Some(d) if d == k3s => return (&f.cni.k3s, CniDirSource::Containerd),
            _ => {}
        }
    }
    let flags = f.k3s.effective.as_ref().or(f.k3s.after_restart.as_ref());
    match flags {
        Some(fl) if fl.flannel_backend == "none" => (&f.cni.etc, CniDirSource::Flags),
        Some(_) => (&f.cni.k3s, CniDirSource::Flags),
        None if f.cni.k3s.exists => (&f.cni.k3s, CniDirSource::Default),
        None => (&f.cni.etc, CniDirSource::Default),
    }
}

/// What the running k3s uses, from its generated containerd config (the
/// flags of a k3s *server* when that file is not there).
pub fn k3s_network(f: &Facts) -> (K3sNetwork, String) {
    let c = &f.cni.containerd;
    if let Some(e) = &c.error {
        return (K3sNetwork::Unknown, e.clone());
    }
    let etc = format!("/{}", cni_files::ETC_CNI_DIR);
    let k3s = format!("/{}", cni_files::K3S_CNI_DIR);
    match c.conf_dir.as_deref().map(|d| d.trim_end_matches('/')) {
        Some(d) if d == etc => {
            return (
                K3sNetwork::NoFlannel,
                format!("k3s's containerd reads {etc} ({})", c.path),
            )
        }
        Some(d) if d == k3s => {
            return (
                K3sNetwork::Flannel,
                format!("k3s's containerd reads {k3s}, Flannel's ({})", c.path),
            )
        }
        Some(d) => {
            return (
                K3sNetwork::Unknown,
                format!(
                    "k3s's containerd reads {d}, a directory k3s does not use by itself ({})",
                    c.path
                ),
            )
        }
        None if c.present => {
            return (
                K3sNetwork::Unknown,
                format!("{} has no CNI conf_dir", c.path),
            )
        }
        None => {}
    }
    use crate::probe::k3s::Role;
    match (f.k3s.role, f.k3s.effective.as_ref()) {
        (Some(Role::Server), Some(e)) if e.flannel_backend == "none" => (
            K3sNetwork::NoFlannel,
            "the k3s server process runs with flannel-backend=none".into(),
        ),
        (Some(Role::Server), Some(e)) => (
            K3sNetwork::Flannel,
            format!(
                "the k3s server process runs with flannel-backend={}",
                e.flannel_backend
            ),
        ),
        _ => (
            K3sNetwork::Unknown,
            format!(
                "{} does not exist and the running k3s's backend cannot be seen",
                c.path
            ),
        ),
    }
}

fn cni(f: &Facts, out: &mut Vec<Check>) {
    let (dir, _) = active_cni_dir(f);
    out.push(match (&dir.winner, &dir.error) {
        (_, Some(e)) => check(
            "cni.active",
            Verdict::Warn,
            format!("cannot list the CNI config directory: {e}"),
            None,
        ),
        (Some(w), _) => {
            let file = dir
                .files
                .iter()
                .find(|x| &x.name == w)
                .expect("winner is listed");
            let who = if file.is_flannel() {
                "Flannel"
            } else if file.is_cilium() {
                "Cilium"
            } else {
                "another CNI"
            };
            pass(
                "cni.active",
                format!(
                    "containerd loads {}/{w} ({who}: {})",
                    dir.path,
                    file.plugins.join(", ")
                ),
            )
        }
        (None, _) => check(
            "cni.active",
            Verdict::Warn,
            format!(
                "no valid CNI config in {}: new pods on this node cannot get a network",
                dir.path
            ),
            None,
        ),
    });
    let mut flannel_files: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    flannel_files
        .entry("10-flannel.conflist".into())
        .or_default();
    for d in [&f.cni.etc, &f.cni.k3s] {
        for file in &d.files {
            if let Some(e) = &file.error {
                out.push(check(
                    format!("cni.file.{}", file.name),
                    Verdict::Warn,
                    e.clone(),
                    None,
                ));
            }
            if file.is_flannel() {
                flannel_files
                    .entry(file.name.clone())
                    .or_default()
                    .push(file.path.clone());
            }
        }
    }
    for (name, paths) in flannel_files {
        let id = format!("flannel.file.{name}");
        out.push(if paths.is_empty() {
            pass(id, format!("{name} is absent"))
        } else {
            check(
                id,
                Verdict::Warn,
                format!("Flannel's CNI config is present: {}", paths.join(", ")),
                Some(CLEANUP_FIX.into()),
            )
        });
    }
    for st in &f.cni.flannel_state {
        let id = format!("flannel.file.{}", st.name);
        out.push(match (&st.error, st.present) {
            (Some(e), _) => check(id, Verdict::Warn, format!("cannot verify: {e}"), None),
            (None, true) => check(
                id,
                Verdict::Warn,
                format!("{} is present", st.path),
                Some(CLEANUP_FIX.into()),
            ),
            (None, false) => pass(id, format!("{} is absent", st.path)),
        });
    }
}

fn k3s(f: &Facts, expect: Expect, out: &mut Vec<Check>) {
    use crate::probe::k3s::Role;
    let k = &f.k3s;
    // Migrated, a server must run without Flannel: a warning before is a failure after.
    let not_yet = if expect == Expect::Cilium {
        Verdict::Fail
    } else {
        Verdict::Warn
    };
    let flags_fix = Some("services.k3s.extraFlags = [ \"--flannel-backend=none\" \"--disable-network-policy\" ]; (or services.cnishift.ciliumPrerequisites.enable = true;)".to_string());
    let errs = errs_suffix(&k.errors);
    let msg = match (k.role, k.effective.as_ref().or(k.after_restart.as_ref())) {
        (None, _) => check("k3s.flags", Verdict::Warn, format!("k3s was not found on this node (no process, unit or config file){errs}"), Some("run the agent on a k3s node, or point --host-root at one".into())),
        (Some(Role::Agent), _) => pass("k3s.flags", format!("k3s agent: --flannel-backend and --disable-network-policy are server flags; this node follows its server{errs}")),
        (Some(Role::Server), None) => check("k3s.flags", Verdict::Warn, format!("k3s server: cannot tell which flags are in effect{errs}"), None),
        (Some(Role::Server), Some(e)) if e.cilium_ready() => {
            let pending = match &k.after_restart {
                Some(a) if !a.cilium_ready() => " — but the systemd unit would bring Flannel back on restart",
                _ => "",
            };
            if pending.is_empty() {
                pass("k3s.flags", format!("k3s server runs with --flannel-backend=none --disable-network-policy{errs}"))
            } else {
                check("k3s.flags", not_yet, format!("k3s server runs without Flannel{pending}{errs}"), flags_fix)
            }
        }
        (Some(Role::Server), Some(e)) => {
            let pending = match &k.after_restart {
                Some(a) if a.cilium_ready() && k.effective.is_some() => " (the unit already has the new flags: restart k3s to apply them)",
                _ => "",
            };
            check(
                "k3s.flags",
                not_yet,
                format!(
                    "k3s server still runs Flannel (flannel-backend={}, network policy controller {}){pending}{errs}",
                    e.flannel_backend,
                    if e.disable_network_policy { "disabled" } else { "enabled" }
                ),
                flags_fix,
            )
        }
    };
    out.push(msg);
}

/// `k3s.network`: does the running k3s use Flannel? Before its turn a node
/// must (a k3s agent that restarted while the servers disagreed may have come
/// up without it); after, it must not.
fn k3s_network_check(f: &Facts, expect: Expect, out: &mut Vec<Check>) {
    let (net, how) = k3s_network(f);
    let id = "k3s.network";
    out.push(match (net, expect) {
        (K3sNetwork::Unknown, _) => check(id, Verdict::Warn, format!("cannot tell whether k3s runs Flannel: {how}"), None),
        (K3sNetwork::Flannel, Expect::Cilium) => check(
            id,
            Verdict::Fail,
            format!("k3s still runs Flannel: {how}"),
            Some("deploy the node with --flannel-backend=none (servers) and restart k3s".into()),
        ),
        (K3sNetwork::NoFlannel, Expect::Flannel) => check(
            id,
            Verdict::Fail,
            format!("k3s on this node runs without Flannel before its migration: {how}; a k3s agent takes the backend from the server that answered when it started, so it came up while the servers disagreed"),
            Some("migrate this node next (its pods have no network until Cilium runs here), or restart k3s once every server agrees".into()),
        ),
        (K3sNetwork::Flannel, _) => pass(id, format!("k3s runs Flannel: {how}")),
        (K3sNetwork::NoFlannel, _) => pass(id, format!("k3s runs without Flannel: {how}")),
    });
}

/// `etcd.*`, on k3s servers only (a worker has no etcd member): the local
/// member of k3s's embedded etcd as `etcdctl endpoint health`, `member list`
/// and `endpoint status` would show it. An unhealthy member, an unreadable
/// member list or no leader is a failure: the coordinator must not take a
/// controller down then (its quorum gate combines every controller's answer).
fn etcd(f: &Facts, out: &mut Vec<Check>) {
    use crate::probe::k3s::Role;
    if f.k3s.role != Some(Role::Server) {
        return;
    }
    let e = &f.etcd;
    if !e.present {
        out.push(check(
            "etcd.member",
            Verdict::Warn,
            format!(
                "{}: this k3s server keeps its datastore elsewhere (SQLite or an external database), which cnishift neither checks nor snapshots",
                e.absent_why.as_deref().unwrap_or("no embedded etcd")
            ),
            Some("back the datastore up yourself before migrating (with embedded etcd, `k3s server --cluster-init`, cnishift checks the member and takes a snapshot)".into()),
        ));
        return;
    }
    let how = match &e.client_cert {
        Some(c) => format!("{}, client certificate {c}", e.endpoint),
        None => e.endpoint.clone(),
    };
    let no_connection = e.client_cert.is_none();
    let unit_fix = "on the node: `systemctl status k3s` and `journalctl -u k3s | grep -i etcd` (the member's data is in /var/lib/rancher/k3s/server/db/etcd)";
    out.push(if e.healthy {
        pass(
            "etcd.health",
            format!(
                "healthy: a linearizable read answered in {} ms ({how})",
                e.took_ms
            ),
        )
    } else {
        let err = e.error.as_deref().unwrap_or("no answer");
        let fix = if no_connection && e.attempts.iter().all(|a| a.error.is_some()) {
            format!("{unit_fix}; k3s writes the certificates under /var/lib/rancher/k3s/server/tls/etcd when it starts with embedded etcd, and the agent must be able to read them")
        } else {
            unit_fix.to_string()
        };
        check(
            "etcd.health",
            Verdict::Fail,
            format!("the local etcd member is not healthy: {err} ({how})"),
            Some(fix),
        )
    });
    let not_read = |what: &str, err: &Option<String>| match (err, no_connection) {
        (Some(err), _) => format!("{what} could not be read: {err}"),
        (None, true) => {
            format!("{what} not read: the local member did not answer (see etcd.health)")
        }
        (None, false) => format!("{what} is empty"),
    };
    out.push(if e.members.is_empty() {
        check(
            "etcd.members",
            Verdict::Fail,
            not_read("the member list", &e.members_error),
            Some(unit_fix.into()),
        )
    } else {
        let list: Vec<String> = e
            .members
            .iter()
            .map(|m| {
                let name = if m.name.is_empty() { "(not started)" } else { &m.name };
                format!(
                    "{name} ({:x}{}{})",
                    m.id,
                    if m.is_learner { ", learner" } else { "" },
                    m.peer_urls
                        .first()
                        .map(|u| format!(", {u}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let voters = e.members.iter().filter(|m| !m.is_learner).count();
        let unstarted = e.members.iter().filter(|m| m.name.is_empty()).count();
        let text = format!("{voters} voting of {} members: {}", e.members.len(), list.join(", "));
        if unstarted > 0 {
            check(
                "etcd.members",
                Verdict::Warn,
                format!("{text}; {unstarted} never started"),
                Some("a member that joined but never started counts against the quorum: start it or remove it (`etcdctl member remove ID`)".into()),
            )
        } else {
            pass("etcd.members", text)
        }
    });
    out.push(match &e.status {
        None => check(
            "etcd.leader",
            Verdict::Fail,
            not_read("the member's status", &e.status_error),
            Some(unit_fix.into()),
        ),
        Some(s) if s.leader_id == 0 => check(
            "etcd.leader",
            Verdict::Fail,
            format!(
                "member {} sees no leader (raft term {}): the cluster has no quorum from here",
                e.name_of(s.member_id),
                s.raft_term
            ),
            Some(format!("{unit_fix}; check that the other controllers' k3s run and that their peer port 2380 is reachable")),
        ),
        Some(s) => pass(
            "etcd.leader",
            format!(
                "leader {}, raft term {}; this member {}{}, etcd {}, database {} bytes{}",
                e.name_of(s.leader_id),
                s.raft_term,
                e.name_of(s.member_id),
                if s.is_learner { " (learner)" } else { "" },
                s.version,
                s.db_size,
                if s.errors.is_empty() {
                    String::new()
                } else {
                    format!("; the member notes: {}", s.errors.join("; "))
                }
            ),
        ),
    });
}

/// What a migrated node looks like: Cilium's conflist is what containerd
/// loads, its devices are up, Cilium itself says Ok, no pod is left on cni0.
fn cilium(f: &Facts, expect: Expect, out: &mut Vec<Check>) {
    let after = expect == Expect::Cilium;
    let h = &f.cilium;
    let sock = &h.socket;
    out.push(match (&h.cilium, &h.error) {
        (_, Some(e)) => check("cilium.health", Verdict::Fail, format!("{e} ({sock})"), Some("look at the cilium pod on this node: kubectl -n kube-system logs ds/cilium".into())),
        (Some(c), None) => {
            let cluster = h
                .cluster_health
                .as_ref()
                .filter(|c| c.state != "Ok")
                .map(|c| format!("; cluster health: {} {}", c.state, c.msg))
                .unwrap_or_default();
            let msg = |what: &str| {
                format!("Cilium says {what}{}{cluster} (GET /v1/healthz on {sock}, {} ms)", if c.msg.is_empty() { String::new() } else { format!(": {}", c.msg) }, h.elapsed_ms)
            };
            match c.state.as_str() {
                "Ok" if cluster.is_empty() => pass("cilium.health", msg("Ok")),
                "Ok" => check("cilium.health", Verdict::Warn, msg("Ok"), Some("cilium-health status on this node shows which peers it cannot reach".into())),
                "Failure" => check("cilium.health", Verdict::Fail, msg("Failure"), Some("look at the cilium pod on this node: kubectl -n kube-system logs ds/cilium".into())),
                other => check("cilium.health", Verdict::Warn, msg(other), Some("cilium status --verbose on this node says which subsystem is degraded".into())),
            }
        }
        (None, None) if !h.present && after => check("cilium.health", Verdict::Fail, format!("Cilium's API socket {sock} does not exist: the Cilium agent does not run on this node"), Some("wait for the cilium pod on this node, or look at why it is not scheduled".into())),
        (None, None) => check("cilium.health", Verdict::Warn, format!("Cilium does not run here yet (no {sock})"), Some("nothing to do before the migration: the Cilium agent starts on this node once it is switched".into())),
    });
    if !after {
        return;
    }
    let (dir, _) = active_cni_dir(f);
    let winner = dir
        .winner
        .as_ref()
        .and_then(|w| dir.files.iter().find(|x| &x.name == w));
    out.push(match winner {
        Some(w) if w.is_cilium() => pass("cilium.cni", format!("containerd loads Cilium's {}", w.path)),
        Some(w) => check("cilium.cni", Verdict::Fail, format!("containerd loads {} ({}), not Cilium's conflist", w.path, w.plugins.join(", ")), Some("the Cilium agent writes 05-cilium.conflist when it starts: check cni.confPath in the Helm values".into())),
        None => check("cilium.cni", Verdict::Fail, format!("no valid CNI config in {}, the directory containerd reads", dir.path), Some("the Cilium agent writes 05-cilium.conflist when it starts: check cni.confPath in the Helm values".into())),
    });
    let n = &f.network;
    out.push(if let Some(why) = &n.not_probed {
        check("cilium.interfaces", Verdict::Fail, format!("cannot see the network interfaces ({why})"), None)
    } else {
        let bad: Vec<String> = ["cilium_host", "cilium_net"]
            .iter()
            .filter_map(|name| match n.cilium_interfaces.get(*name) {
                Some(i) if i.up => None,
                Some(_) => Some(format!("{name} is down")),
                None => Some(format!("{name} is missing")),
            })
            .collect();
        if bad.is_empty() {
            pass("cilium.interfaces", "cilium_host and cilium_net are up")
        } else {
            check("cilium.interfaces", Verdict::Fail, bad.join(", "), Some("the Cilium agent creates them when it starts: look at the cilium pod on this node".into()))
        }
    });
    pods_on_cni0(f, out);
}

/// `cilium.pods`: a pod whose veth is still on `cni0` has no Cilium endpoint.
fn pods_on_cni0(f: &Facts, out: &mut Vec<Check>) {
    let n = &f.network;
    if n.not_probed.is_none() {
        out.push(if n.cni0_members.is_empty() {
            pass("cilium.pods", "no pod interface is left on Flannel's cni0")
        } else {
            check(
                "cilium.pods",
                Verdict::Fail,
                format!(
                    "{} pod interfaces are still on Flannel's cni0 ({}): those pods have no Cilium endpoint",
                    n.cni0_members.len(),
                    n.cni0_members.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
                Some("delete those pods so their controllers recreate them on Cilium".into()),
            )
        });
    }
}

fn iptables(f: &Facts, out: &mut Vec<Check>) {
    let t = &f.iptables;
    let both = |v4: &[String], v6: &[String]| -> Vec<String> {
        v4.iter()
            .map(|c| format!("ipv4 {c}"))
            .chain(v6.iter().map(|c| format!("ipv6 {c}")))
            .collect()
    };
    let unknown: Vec<&str> = [&t.ipv4.unknown, &t.ipv6.unknown]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    for (id, what, found) in [
        (
            "iptables.flannel",
            "FLANNEL-*",
            both(&t.ipv4.flannel, &t.ipv6.flannel),
        ),
        (
            "iptables.kube-router",
            "KUBE-ROUTER-*",
            both(&t.ipv4.kube_router, &t.ipv6.kube_router),
        ),
    ] {
        out.push(if !found.is_empty() {
            check(
                id,
                Verdict::Warn,
                format!("{} {what} chains remain: {}", found.len(), found.join(", ")),
                Some(CLEANUP_FIX.into()),
            )
        } else if unknown.len() == 2 {
            check(
                id,
                Verdict::Warn,
                format!("cannot verify {what} chains: {}", unknown.join("; ")),
                Some("install iptables (environment.systemPackages = [ pkgs.iptables ];)".into()),
            )
        } else if !unknown.is_empty() {
            check(
                id,
                Verdict::Warn,
                format!(
                    "no {what} chains in one family; the other is unknown: {}",
                    unknown.join("; ")
                ),
                None,
            )
        } else {
            pass(id, format!("no {what} chains"))
        });
    }
}

fn resources(f: &Facts, out: &mut Vec<Check>) {
    let r = &f.resources;
    let mib = |b: u64| b / (1024 * 1024);
    out.push(match (r.mem_total_bytes, r.mem_available_bytes) {
        (Some(_), Some(avail)) if avail < CILIUM_MEMORY_BYTES => check(
            "resources.memory",
            Verdict::Fail,
            format!("{} MiB available, less than the {} MiB Cilium's agent and Hubble may use", mib(avail), mib(CILIUM_MEMORY_BYTES)),
            Some("free memory on this node (drain heavy pods) before switching it".into()),
        ),
        (Some(total), Some(avail)) if total <= SMALL_NODE_BYTES || avail < 2 * CILIUM_MEMORY_BYTES => check(
            "resources.memory",
            Verdict::Warn,
            format!("{} MiB total, {} MiB available: thin headroom for Cilium's {} MiB", mib(total), mib(avail), mib(CILIUM_MEMORY_BYTES)),
            Some("consider hubble.enabled=false on this node class, or lower the agent's memory limit".into()),
        ),
        (Some(total), Some(avail)) => pass("resources.memory", format!("{} MiB total, {} MiB available", mib(total), mib(avail))),
        _ => check("resources.memory", Verdict::Warn, format!("cannot verify memory: {}", r.error.as_deref().unwrap_or("MemAvailable missing")), None),
    });
}
