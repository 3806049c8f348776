//! Probes: one file per family of facts. Each reads the node (files through
//! [`crate::host::HostPaths`], live state through syscalls and netlink) and
//! returns typed facts; none of them judges or prints.

pub mod bpf;
pub mod cni_files;
pub mod iptables;
pub mod k3s;
pub mod kconfig;
pub mod kernel;
pub mod modules;
pub mod network;
pub mod resources;
pub mod sysctl;

use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

/// Everything the probes found. Serialised as the report's `facts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Facts {
    pub kernel: kernel::KernelFacts,
    pub kernel_config: kconfig::KernelConfigFacts,
    pub bpf: bpf::BpfFacts,
    pub modules: modules::ModuleFacts,
    pub sysctls: std::collections::BTreeMap<String, sysctl::SysctlValue>,
    pub network: network::NetworkFacts,
    pub cni: cni_files::CniFacts,
    pub k3s: k3s::K3sFacts,
    pub iptables: iptables::IptablesFacts,
    pub resources: resources::ResourceFacts,
    /// Cilium's own health answer (`/v1/healthz` on its API socket).
    pub cilium: crate::cilium::CiliumHealth,
    /// k3s's embedded etcd member on this node, as etcdctl would see it.
    #[serde(default)]
    pub etcd: crate::etcd::EtcdFacts,
}

/// What to look for: the policy's lists, handed in so probes never depend
/// on the policy.
pub struct Wanted<'a> {
    pub config_options: &'a [&'a str],
    pub modules: &'a [modules::Wanted<'a>],
}

/// Runs every probe. The live ones (bpf syscalls, netlink, iptables-save)
/// run on their own threads while the file probes read; `live = false`
/// skips them (fixture trees).
pub fn collect(host: &HostPaths, live: bool, wanted: &Wanted) -> Facts {
    std::thread::scope(|s| {
        let bpf = s.spawn(|| bpf::probe(host, live));
        // Cilium's socket belongs to another program: ask it on a thread of
        // its own, so its deadline runs beside the other probes.
        let cilium = s.spawn(|| crate::cilium::probe(host));
        // etcd's client port is a network service with its own deadlines too.
        let etcd = s.spawn(|| crate::etcd::probe(host));
        let iptables = s.spawn(|| iptables::probe(live));
        let network = s.spawn(|| {
            if live {
                network::probe()
            } else {
                network::NetworkFacts {
                    not_probed: Some("live probes disabled (--no-live-probes)".into()),
                    ..Default::default()
                }
            }
        });

        let kernel = kernel::probe(host);
        let release = kernel.release.as_deref();
        let kernel_config = kconfig::probe(host, release, wanted.config_options);
        let modules = modules::probe(host, release, &kernel_config, wanted.modules);
        let sysctls = sysctl::probe(host);
        let cni = cni_files::probe(host);
        let k3s = k3s::probe(host);
        let resources = resources::probe(host);

        let panicked =
            |what: &str| format!("the {what} probe crashed; this is a bug in cnishift-agent");
        Facts {
            bpf: bpf.join().unwrap_or_else(|_| bpf::BpfFacts {
                syscall: bpf::SyscallState::Failed(panicked("bpf")),
                programs: Default::default(),
                maps: Default::default(),
                jit: Default::default(),
                mounts: Default::default(),
            }),
            iptables: iptables.join().unwrap_or_else(|_| {
                let unknown = iptables::FamilyChains {
                    unknown: Some(panicked("iptables")),
                    ..Default::default()
                };
                iptables::IptablesFacts {
                    ipv4: unknown.clone(),
                    ipv6: unknown,
                }
            }),
            network: network.join().unwrap_or_else(|_| network::NetworkFacts {
                not_probed: Some(panicked("network")),
                ..Default::default()
            }),
            kernel,
            kernel_config,
            modules,
            sysctls,
            cni,
            k3s,
            resources,
            cilium: cilium
                .join()
                .unwrap_or_else(|_| crate::cilium::CiliumHealth {
                    error: Some(panicked("cilium")),
                    ..Default::default()
                }),
            etcd: etcd.join().unwrap_or_else(|_| crate::etcd::EtcdFacts {
                present: true,
                error: Some(panicked("etcd")),
                ..Default::default()
            }),
        }
    })
}

/// Which probe families a narrowed report needs (see
/// [`crate::policy::Family`]); everything else is left empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct Only {
    /// The k3s process, unit and config files, and the CNI files
    /// (containerd's generated config among them).
    pub k3s: bool,
    /// The netlink dump (live only).
    pub network: bool,
}

/// Runs the probes `only` names and no other: no kernel config, BPF
/// syscall, module, sysctl, iptables or Cilium-socket probe. The facts not
/// probed are empty, and the caller must judge only the checks that read
/// the probed ones ([`crate::policy::evaluate_families`]).
pub fn collect_only(host: &HostPaths, live: bool, only: Only) -> Facts {
    let not_asked = || "not asked for (a narrowed report)".to_string();
    Facts {
        kernel: Default::default(),
        kernel_config: Default::default(),
        bpf: bpf::BpfFacts {
            syscall: bpf::SyscallState::Skipped(not_asked()),
            programs: Default::default(),
            maps: Default::default(),
            jit: Default::default(),
            mounts: Default::default(),
        },
        modules: Default::default(),
        sysctls: Default::default(),
        network: match (only.network, live) {
            (true, true) => network::probe(),
            (true, false) => network::NetworkFacts {
                not_probed: Some("live probes disabled (--no-live-probes)".into()),
                ..Default::default()
            },
            (false, _) => network::NetworkFacts {
                not_probed: Some(not_asked()),
                ..Default::default()
            },
        },
        cni: if only.k3s {
            cni_files::probe(host)
        } else {
            Default::default()
        },
        k3s: if only.k3s {
            k3s::probe(host)
        } else {
            Default::default()
        },
        iptables: Default::default(),
        resources: Default::default(),
        cilium: Default::default(),
        // No etcd check is in a narrowed family: its client is not dialled.
        etcd: Default::default(),
    }
}
