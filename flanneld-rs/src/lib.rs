//! flanneld-rs: the per-node daemon of flannel-rs, as a library so that its
//! parts can be tested one by one; `main.rs` is the thin binary.

pub mod config;
pub mod daemon;
pub mod diagnose;
pub mod firewall;
pub mod flags;
pub mod health;
pub mod iface;
pub mod lease;
pub mod logger;
pub mod netpol;
pub mod policy;
pub mod reconcile;
pub mod subnet;
pub mod udp;
