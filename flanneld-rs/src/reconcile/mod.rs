//! The reconcile loop's parts: desired state from leases ([`desired`]), a pure
//! [`plan`], and the thin [`kernel`] side that observes and applies.

pub mod desired;
pub mod kernel;
pub mod plan;
