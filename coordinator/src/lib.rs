//! cnishift, the coordinator: reads the inventory, asks every agent over
//! mutual TLS, and (as the migration issues land) walks the nodes from
//! Flannel to Cilium one at a time.

pub mod agents;
pub mod backup;
pub mod certs;
pub mod inventory;
pub mod kube;
pub mod migrate;
pub mod render;
pub mod values;
