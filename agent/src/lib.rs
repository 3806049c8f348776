//! cnishift-agent: the per-node half of cnishift.
//!
//! The flow of a fact is one way: [`probe`] reads the node, [`policy`] judges,
//! [`report`] assembles, and [`render`] (or the gRPC server) ships it.

pub mod cilium;
pub mod cleanup;
pub mod dial;
pub mod etcd;
pub mod host;
pub mod policy;
pub mod probe;
pub mod remediate;
pub mod render;
pub mod report;
pub mod rollback;
pub mod server;
pub mod state;
pub mod tls;
