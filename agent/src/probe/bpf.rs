//! eBPF, tried for real: can this kernel load what Cilium loads?
//!
//! Program and map types are probed with aya's feature probes (a trivial
//! program or a one-entry map per type). The JIT is checked by loading a
//! two-instruction socket filter and asking the kernel how many bytes of
//! machine code it produced: `jited_prog_len > 0` is proof the JIT ran, which
//! `net.core.bpf_jit_enable` alone is not (it can be forced on by
//! `CONFIG_BPF_JIT_ALWAYS_ON`, or be 1 while the arch has no JIT).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::maps::MapType;
use aya::programs::ProgramType;
use serde::{Deserialize, Serialize};

use crate::host::HostPaths;

/// The program types Cilium's datapath loads, by the name bpftool uses.
pub const PROGRAM_TYPES: &[&str] = &[
    "sched_cls",
    "sched_act",
    "socket_filter",
    "cgroup_sock_addr",
    "cgroup_sock",
    "cgroup_skb",
    "xdp",
];

/// The map types Cilium's datapath creates, by the name bpftool uses.
pub const MAP_TYPES: &[&str] = &[
    "hash",
    "lru_hash",
    "lpm_trie",
    "percpu_hash",
    "lru_percpu_hash",
    "array",
    "percpu_array",
    "prog_array",
    "perf_event_array",
];

fn program_type(name: &str) -> Option<ProgramType> {
    Some(match name {
        "sched_cls" => ProgramType::SchedClassifier,
        "sched_act" => ProgramType::SchedAction,
        "socket_filter" => ProgramType::SocketFilter,
        "cgroup_sock_addr" => ProgramType::CgroupSockAddr,
        "cgroup_sock" => ProgramType::CgroupSock,
        "cgroup_skb" => ProgramType::CgroupSkb,
        "xdp" => ProgramType::Xdp,
        _ => return None,
    })
}

fn map_type(name: &str) -> Option<MapType> {
    Some(match name {
        "hash" => MapType::Hash,
        "lru_hash" => MapType::LruHash,
        "lpm_trie" => MapType::LpmTrie,
        "percpu_hash" => MapType::PerCpuHash,
        "lru_percpu_hash" => MapType::LruPerCpuHash,
        "array" => MapType::Array,
        "percpu_array" => MapType::PerCpuArray,
        "prog_array" => MapType::ProgramArray,
        "perf_event_array" => MapType::PerfEventArray,
        _ => return None,
    })
}

/// The outcome of one live probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Support {
    Supported,
    Unsupported,
    /// The probe itself failed in a way that says nothing about support.
    Unknown(String),
    /// Not tried (`--no-live-probes`, or the bpf() syscall is unavailable).
    Skipped(String),
}

/// Whether the `bpf()` syscall itself works here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum SyscallState {
    Available,
    /// ENOSYS: qemu-user, gVisor, some seccomp profiles.
    NotImplemented(String),
    /// EPERM/EACCES: not root, or no CAP_BPF.
    NotPermitted(String),
    Failed(String),
    Skipped(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JitFacts {
    /// Bytes of machine code the JIT produced for a trivial program; 0 means
    /// the interpreter runs it. `None` when not measured.
    pub jited_len: Option<u32>,
    /// Bytes of translated eBPF for the same program (sanity: should be 16).
    pub xlated_len: Option<u32>,
    pub bpf_jit_enable: Option<i64>,
    pub bpf_jit_harden: Option<i64>,
    pub unprivileged_bpf_disabled: Option<i64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountFacts {
    /// True when `/sys/fs/bpf` is a bpffs (checked by filesystem magic).
    pub bpffs_at_sys_fs_bpf: bool,
    /// What `/sys/fs/bpf` is instead, when it is not bpffs.
    pub sys_fs_bpf_detail: Option<String>,
    /// Mountpoints of every bpffs and cgroup2 in `/proc/mounts`.
    pub bpffs_mounts: Vec<String>,
    pub cgroup2_mounts: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BpfFacts {
    pub syscall: SyscallState,
    pub programs: BTreeMap<String, Support>,
    pub maps: BTreeMap<String, Support>,
    pub jit: JitFacts,
    pub mounts: MountFacts,
}

pub fn probe(host: &HostPaths, live: bool) -> BpfFacts {
    let mut jit = JitFacts::default();
    let sysctl = |rel: &str, errors: &mut Vec<String>| match host.read_trimmed(rel) {
        Ok(v) => match v.parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => {
                errors.push(format!("/{rel} holds {v:?}, not a number"));
                None
            }
        },
        Err(e) if e.is_missing() => None,
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    jit.bpf_jit_enable = sysctl("proc/sys/net/core/bpf_jit_enable", &mut jit.errors);
    jit.bpf_jit_harden = sysctl("proc/sys/net/core/bpf_jit_harden", &mut jit.errors);
    jit.unprivileged_bpf_disabled =
        sysctl("proc/sys/kernel/unprivileged_bpf_disabled", &mut jit.errors);

    let skipped = |why: &str| -> BTreeMap<String, Support> {
        PROGRAM_TYPES
            .iter()
            .map(|n| (n.to_string(), Support::Skipped(why.into())))
            .collect()
    };
    let skipped_maps = |why: &str| -> BTreeMap<String, Support> {
        MAP_TYPES
            .iter()
            .map(|n| (n.to_string(), Support::Skipped(why.into())))
            .collect()
    };

    let (syscall, programs, maps) = if !live {
        let why = "live probes disabled (--no-live-probes)";
        (
            SyscallState::Skipped(why.into()),
            skipped(why),
            skipped_maps(why),
        )
    } else {
        match load_trivial_socket_filter() {
            Ok((jited, xlated)) => {
                jit.jited_len = Some(jited);
                jit.xlated_len = Some(xlated);
                (SyscallState::Available, probe_programs(), probe_maps())
            }
            Err(e) => {
                let state = match e.raw_os_error() {
                    Some(libc::ENOSYS) => SyscallState::NotImplemented(
                        "the bpf() syscall is not available (ENOSYS)".into(),
                    ),
                    Some(libc::EPERM) | Some(libc::EACCES) => SyscallState::NotPermitted(format!(
                        "bpf() was refused ({e}); run the agent as root or with CAP_BPF and CAP_PERFMON"
                    )),
                    _ => SyscallState::Failed(format!("loading a trivial program failed: {e}")),
                };
                let why = "the bpf() syscall is unusable here";
                jit.errors.push(format!("JIT not measured: {e}"));
                (state, skipped(why), skipped_maps(why))
            }
        }
    };

    BpfFacts {
        syscall,
        programs,
        maps,
        jit,
        mounts: probe_mounts(host),
    }
}

fn probe_programs() -> BTreeMap<String, Support> {
    PROGRAM_TYPES
        .iter()
        .map(|&name| {
            let ty = program_type(name).expect("every listed program type is mapped");
            let s = match aya::sys::is_program_supported(ty) {
                Ok(true) => Support::Supported,
                Ok(false) => Support::Unsupported,
                Err(e) => Support::Unknown(e.to_string()),
            };
            (name.to_string(), s)
        })
        .collect()
}

fn probe_maps() -> BTreeMap<String, Support> {
    MAP_TYPES
        .iter()
        .map(|&name| {
            let ty = map_type(name).expect("every listed map type is mapped");
            let s = match aya::sys::is_map_supported(ty) {
                Ok(true) => Support::Supported,
                Ok(false) => Support::Unsupported,
                Err(e) => Support::Unknown(e.to_string()),
            };
            (name.to_string(), s)
        })
        .collect()
}

// --- the JIT probe: two raw bpf() calls -------------------------------------
//
// aya loads programs only from an object file and keeps its raw loader
// private, so the two commands we need are spelled out here with the prefix of
// the uapi structs they use. A shorter attr is valid: the kernel zero-fills
// the fields it does not receive (bpf_check_uarg_tail_zero only rejects
// non-zero bytes *beyond* its own struct).

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info`, up to the two lengths we read.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized repr(C) struct for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads `r0 = 0; exit` as a socket filter and returns (jited, xlated) lengths.
fn load_trivial_socket_filter() -> io::Result<(u32, u32)> {
    let insns = [
        BpfInsn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 0,
        }, // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 0
        BpfInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        }, // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = ProgInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfoHead>() as u32,
        info: &mut info as *mut ProgInfoHead as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.jited_prog_len, info.xlated_prog_len))
}

// --- mounts -------------------------------------------------------------------

fn probe_mounts(host: &HostPaths) -> MountFacts {
    let mut facts = MountFacts::default();
    let bpf_dir = host.path("sys/fs/bpf");
    match nix::sys::statfs::statfs(&bpf_dir) {
        Ok(st) => {
            let magic = st.filesystem_type();
            facts.bpffs_at_sys_fs_bpf = magic == nix::sys::statfs::BPF_FS_MAGIC;
            if !facts.bpffs_at_sys_fs_bpf {
                facts.sys_fs_bpf_detail = Some(format!(
                    "/sys/fs/bpf is not a bpf filesystem (statfs magic {:#x})",
                    magic.0
                ));
            }
        }
        Err(nix::errno::Errno::ENOENT) => {
            facts.sys_fs_bpf_detail = Some("/sys/fs/bpf does not exist".into());
        }
        Err(e) => {
            facts.sys_fs_bpf_detail = Some(format!("/sys/fs/bpf cannot be examined: {e}"));
        }
    }
    match host.read_string("proc/mounts") {
        Ok(text) => {
            for line in text.lines() {
                let mut f = line.split_whitespace();
                let (_dev, Some(mnt), Some(fstype)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                let mnt = mnt.replace("\\040", " ");
                match fstype {
                    "bpf" => facts.bpffs_mounts.push(mnt),
                    "cgroup2" => facts.cgroup2_mounts.push(mnt),
                    _ => {}
                }
            }
        }
        Err(e) => facts.errors.push(e.to_string()),
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_type_has_an_aya_mapping() {
        for p in PROGRAM_TYPES {
            assert!(program_type(p).is_some(), "{p}");
        }
        for m in MAP_TYPES {
            assert!(map_type(m).is_some(), "{m}");
        }
        assert!(program_type("nonsense").is_none());
    }

    #[test]
    fn struct_layouts_match_the_uapi() {
        // Offsets from include/uapi/linux/bpf.h; a wrong layout would make
        // the kernel read garbage, so pin them.
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(std::mem::offset_of!(ProgInfoHead, jited_prog_len), 16);
        assert_eq!(std::mem::offset_of!(InfoByFdAttr, info), 8);
    }
}
