//! The lab: a k3s-shaped cluster on one machine, for the end-to-end tests
//! and `cnishift-lab`. Hosts are network namespaces cabled to a bridge in a
//! namespace of its own; each runs the real `cnishift-agent`. Nothing here is
//! linked into the shipped binaries.

pub mod apiserver;
pub mod cluster;
pub mod etcd;
pub mod harness;
pub mod hostroot;
pub mod k3s;
pub mod labnet;
pub mod loopback;
pub mod netns;
pub mod record;
pub mod rehearse;
pub mod supervisor;

/// True when the caller may create namespaces; prints a loud SKIPPED line
/// otherwise, and refuses to skip under CI=true.
pub fn require_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not root: {what} must run in CI"
    );
    eprintln!("SKIPPED (needs root): {what}");
    false
}
