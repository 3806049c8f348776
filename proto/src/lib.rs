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
    pub const PLAN_CLEANUP: &str = "/cnishift.v1.NodeAgent/PlanCleanup";
    pub const APPLY_CLEANUP: &str = "/cnishift.v1.NodeAgent/ApplyCleanup";

    /// Methods that change the node (or plan to). Everything else is read-only.
    pub const CHANGING: &[&str] = &[REMEDIATE, PLAN_CLEANUP, APPLY_CLEANUP];
}
