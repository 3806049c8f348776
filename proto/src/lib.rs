//! The wire contract between `cnishift-agent` and `cnishift`, package
//! `cnishift.v1`. Generated from `cnishift/v1/agent.proto`.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("cnishift.v1");
}

/// The part of etcd's own API (package `etcdserverpb`, etcd 3.4/3.5) that the
/// agent's client for k3s's embedded etcd uses; client only. See
/// `etcd/rpc.proto`.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// gRPC method paths, for authorisation by method (the agent allows the
/// changing ones only to the coordinator identity).
pub mod methods {
    pub const GET_REPORT: &str = "/cnishift.v1.NodeAgent/GetReport";
    pub const REMEDIATE: &str = "/cnishift.v1.NodeAgent/Remediate";
    pub const PLAN_CLEANUP: &str = "/cnishift.v1.NodeAgent/PlanCleanup";
    pub const APPLY_CLEANUP: &str = "/cnishift.v1.NodeAgent/ApplyCleanup";
    pub const ARM_ROLLBACK: &str = "/cnishift.v1.NodeAgent/ArmRollback";
    pub const CONFIRM: &str = "/cnishift.v1.NodeAgent/Confirm";
    pub const DISARM: &str = "/cnishift.v1.NodeAgent/Disarm";
    pub const GET_ARM_STATE: &str = "/cnishift.v1.NodeAgent/GetArmState";
    pub const DIAL_FROM_NODE: &str = "/cnishift.v1.NodeAgent/DialFromNode";
    pub const GET_ETCD_STATUS: &str = "/cnishift.v1.NodeAgent/GetEtcdStatus";
    pub const ETCD_SNAPSHOT: &str = "/cnishift.v1.NodeAgent/EtcdSnapshot";

    /// Methods that change the node (or plan to, or make it open
    /// connections). Everything else is read-only.
    pub const CHANGING: &[&str] = &[
        REMEDIATE,
        PLAN_CLEANUP,
        APPLY_CLEANUP,
        ARM_ROLLBACK,
        CONFIRM,
        DISARM,
        DIAL_FROM_NODE,
        ETCD_SNAPSHOT,
    ];
}
