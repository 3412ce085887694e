//! flanneld-rs: the per-node daemon of flannel-rs, as a library so that its
//! parts can be tested one by one; `main.rs` is the thin binary.
//!
//! One lease, from the store to the kernel: `subnet/` (the [`subnet::LeaseStore`]
//! interface: etcd, Kubernetes) watches the lease set in the wire format of
//! `lease`; `reconcile/driver.rs` turns each snapshot into the desired state
//! of the `backend/` in use, plans it against the kernel and applies it.

pub mod backend;
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

/// The udp backend's data path (at `backend::udp`; kept at this path for
/// the benchmarks and tests that drive it by hand).
pub use backend::udp;
