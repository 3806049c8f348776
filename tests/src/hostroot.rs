//! A lab node's files: what a k3s node running Flannel looks like on disk,
//! for the agent's `--host-root`. Kernel configs are the real Armbian ones
//! from ../shared when present (Pi 4 for workers, RK3588 for controllers).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cnishift::inventory::Role;

pub const PI4_RELEASE: &str = "6.6.64-current-bcm2711";
pub const RK3588_RELEASE: &str = "6.12.0-rc3-edge-rockchip-rk3588";

/// Modules a node with its kernel's modules package installed can load.
const MODULES: &[&str] = &[
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

/// A config with Cilium's whole list built in, for when ../shared is absent.
const FALLBACK_CONFIG: &str = "CONFIG_MODULES=y\nCONFIG_BPF=y\nCONFIG_BPF_SYSCALL=y\nCONFIG_NET_CLS_BPF=y\nCONFIG_BPF_JIT=y\n\
CONFIG_NET_CLS_ACT=y\nCONFIG_NET_SCH_INGRESS=y\nCONFIG_CRYPTO_SHA1=y\nCONFIG_CRYPTO_USER_API_HASH=y\nCONFIG_CGROUPS=y\n\
CONFIG_CGROUP_BPF=y\nCONFIG_PERF_EVENTS=y\nCONFIG_SCHEDSTATS=y\nCONFIG_VXLAN=m\nCONFIG_GENEVE=m\nCONFIG_FIB_RULES=y\n\
CONFIG_NETFILTER_XT_SET=m\nCONFIG_IP_SET=m\nCONFIG_IP_SET_HASH_IP=m\nCONFIG_NETFILTER_XT_MATCH_COMMENT=m\n\
CONFIG_NETFILTER_XT_TARGET_TPROXY=m\nCONFIG_NETFILTER_XT_TARGET_MARK=m\nCONFIG_NETFILTER_XT_TARGET_CT=m\n\
CONFIG_NETFILTER_XT_MATCH_MARK=m\nCONFIG_NETFILTER_XT_MATCH_SOCKET=m\nCONFIG_NETFILTER_XT_MARK=m\n\
CONFIG_NETFILTER_XT_MATCH_CONNTRACK=m\nCONFIG_BRIDGE_NETFILTER=m\nCONFIG_OVERLAY_FS=m\n";

/// `../shared/fixtures/kernel-configs` beside the repository, or `$CNISHIFT_SHARED/fixtures/...`.
pub fn shared_configs() -> Option<PathBuf> {
    let base = std::env::var_os("CNISHIFT_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let p = base.join("fixtures/kernel-configs");
    p.is_dir().then_some(p)
}

fn write(root: &Path, rel: &str, content: impl AsRef<[u8]>) -> Result<()> {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("has a parent"))?;
    fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
}

fn gzip(text: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text)?;
    Ok(enc.finish()?)
}

/// Writes a Flannel-era k3s node's tree under `root`.
pub fn build(root: &Path, name: &str, role: Role) -> Result<()> {
    build_node(
        root,
        name,
        role,
        &NodeFiles {
            pod_cidr: "10.42.0.0/16".into(),
            pod_subnet: "10.42.1.1/24".into(),
            kernel_config: None,
        },
    )
}

/// What differs between lab nodes' trees.
pub struct NodeFiles {
    /// The cluster's pod CIDR (Flannel's `Network`).
    pub pod_cidr: String,
    /// This node's subnet as Flannel writes it (`FLANNEL_SUBNET`, the cni0 address).
    pub pod_subnet: String,
    /// The kernel config to ship in `/proc/config.gz` (default: the role's fixture).
    pub kernel_config: Option<Vec<u8>>,
}

/// The kernel config file name of a role's board in the fixtures.
pub fn fixture_name(role: Role) -> &'static str {
    match role {
        Role::Controller => "opi5plus-rk3588-armbian-6.12.config",
        Role::Worker => "rpi4-bcm2711-armbian-6.6.64.config",
    }
}

/// The kernel release a role's board runs.
pub fn release(role: Role) -> &'static str {
    match role {
        Role::Controller => RK3588_RELEASE,
        Role::Worker => PI4_RELEASE,
    }
}

/// The role's fixture config with the fix preflight suggests applied (what
/// its `boot.kernelPatches` would build): `CONFIG_SCHEDSTATS=y`, which the
/// RK3588 config lacks. Returns the config and the options it changed.
pub fn fixed_fixture(role: Role) -> Result<(Vec<u8>, Vec<&'static str>)> {
    let Some(dir) = shared_configs() else {
        return Ok((FALLBACK_CONFIG.as_bytes().to_vec(), vec![]));
    };
    let name = fixture_name(role);
    let text =
        fs::read_to_string(dir.join(name)).with_context(|| format!("reading fixture {name}"))?;
    let mut changed = vec![];
    let mut out = String::with_capacity(text.len() + 32);
    let mut seen = false;
    for line in text.lines() {
        if line == "# CONFIG_SCHEDSTATS is not set" || line.starts_with("CONFIG_SCHEDSTATS=") {
            seen = true;
            if line != "CONFIG_SCHEDSTATS=y" {
                changed.push("CONFIG_SCHEDSTATS=y");
            }
            out.push_str("CONFIG_SCHEDSTATS=y\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !seen {
        changed.push("CONFIG_SCHEDSTATS=y");
        out.push_str("CONFIG_SCHEDSTATS=y\n");
    }
    Ok((out.into_bytes(), changed))
}

/// Writes a Flannel-era k3s node's tree under `root` with `files`' specifics.
pub fn build_node(root: &Path, name: &str, role: Role, files: &NodeFiles) -> Result<()> {
    let (release, config_file, mem_kib) = match role {
        Role::Controller => (
            RK3588_RELEASE,
            "opi5plus-rk3588-armbian-6.12.config",
            16_000_000u64,
        ),
        Role::Worker => (
            PI4_RELEASE,
            "rpi4-bcm2711-armbian-6.6.64.config",
            3_884_000u64,
        ),
    };
    let config = match &files.kernel_config {
        Some(c) => c.clone(),
        None => default_config(config_file)?,
    };
    write(root, "etc/hostname", format!("{name}\n"))?;
    write(root, "proc/sys/kernel/osrelease", format!("{release}\n"))?;
    write(root, "proc/sys/kernel/arch", "aarch64\n")?;
    write(root, "proc/config.gz", gzip(&config)?)?;
    let dep: String = MODULES
        .iter()
        .map(|m| format!("kernel/net/{m}.ko.xz:\n"))
        .collect();
    write(root, &format!("lib/modules/{release}/modules.dep"), dep)?;
    write(
        root,
        "proc/meminfo",
        format!(
            "MemTotal: {mem_kib} kB\nMemFree: {} kB\nMemAvailable: {} kB\n",
            mem_kib / 2,
            mem_kib * 3 / 4
        ),
    )?;
    for (k, v) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/forwarding", "1"),
        ("net/bridge/bridge-nf-call-iptables", "1"),
        ("net/ipv4/conf/all/rp_filter", "2"),
        ("net/ipv4/conf/default/rp_filter", "2"),
        ("net/core/bpf_jit_enable", "1"),
    ] {
        write(root, &format!("proc/sys/{k}"), format!("{v}\n"))?;
    }
    let sub = match role {
        Role::Controller => "server",
        Role::Worker => "agent",
    };
    write(
        root,
        "proc/1/cmdline",
        format!("/usr/local/bin/k3s\0{sub}\0"),
    )?;
    write(
        root,
        "etc/rancher/k3s/config.yaml",
        "write-kubeconfig-mode: \"0644\"\n",
    )?;
    write(
        root,
        "var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist",
        r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"forceAddress":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}},{"type":"bandwidth","capabilities":{"bandwidth":true}}]}"#,
    )?;
    write(
        root,
        "var/lib/rancher/k3s/agent/etc/flannel/net-conf.json",
        format!(
            r#"{{"Network":"{}","EnableIPv6":false,"Backend":{{"Type":"vxlan"}}}}"#,
            files.pod_cidr
        ),
    )?;
    write(
        root,
        "run/flannel/subnet.env",
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            files.pod_cidr, files.pod_subnet
        ),
    )?;
    fs::create_dir_all(root.join("var/lib/cni/networks/cbr0"))?;
    fs::create_dir_all(root.join("etc/cni/net.d"))?;
    // Where bpffs is mounted on a real node (the lab mounts one there).
    fs::create_dir_all(root.join("sys/fs/bpf"))?;
    fs::create_dir_all(root.join("run"))?;
    if fs::symlink_metadata(root.join("var/run")).is_err() {
        std::os::unix::fs::symlink("../run", root.join("var/run"))?;
    }
    write(root, "proc/mounts", "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\nbpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n")?;
    Ok(())
}

fn default_config(config_file: &str) -> Result<Vec<u8>> {
    match shared_configs() {
        Some(dir) => fs::read(dir.join(config_file))
            .with_context(|| format!("reading fixture {config_file}")),
        None => Ok(FALLBACK_CONFIG.as_bytes().to_vec()),
    }
}
