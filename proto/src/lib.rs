//! The wire contract between `cnishift-agent` and `cnishift`, package
//! `cnishift.v1`. Generated from `cnishift/v1/agent.proto`.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("cnishift.v1");
}

/// gRPC method paths, for authorisation by method (the agent allows the
/// changing ones only to the coordinator identity).
pub mod methods {
    pub const GET_REPORT: &str = "/cnishift.v1.NodeAgent/GetReport";
    pub const REMEDIATE: &str = "/cnishift.v1.NodeAgent/Remediate";

    /// Methods that change the node. Everything not listed here is read-only.
    pub const CHANGING: &[&str] = &[REMEDIATE];
}
