//! The migration: the order of the nodes ([`plan`]-to-come), one function per
//! step ([`steps`]), and the driver that walks them.
//!
//! `cnishift node …` and `cnishift migrate` call the same step functions.

pub mod etcd;
pub mod hooks;
pub mod journal;
pub mod live;
pub mod plan;
pub mod prerun;
pub mod run;
pub mod steps;
pub mod storage;
