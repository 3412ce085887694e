//! The reconcile loop: desired state from leases ([`desired`]), a pure
//! [`plan`], the thin [`kernel`] side that observes and applies, and the
//! [`driver`] that runs them on every trigger, in full or, for a few
//! changed leases, incrementally against a [`model`] of what it programmed.

pub mod desired;
pub mod driver;
pub mod kernel;
pub mod model;
pub mod plan;

/// The VTEP the unit tests of this module plan for.
#[cfg(test)]
pub(crate) fn test_vtep_spec() -> flannel_net::netlink::VxlanSpec {
    flannel_net::netlink::VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: "192.0.2.10".parse().unwrap(),
        dev: 2,
        port: 8472,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac: "02:00:00:00:00:10".parse().unwrap(),
        tx_checksum: Some(false),
    }
}
