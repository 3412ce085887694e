//! Subnet leases: the vocabulary the subnet managers (etcd, kube) and the
//! backends share. A lease says "this node owns this subnet and is reachable
//! at this public IP, with this VTEP".

use std::net::Ipv4Addr;

use flannel_net::MacAddr;
use ipnet::Ipv4Net;

/// A node's lease on a subnet of the cluster network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node's subnet (`10.244.1.0/24`).
    pub subnet: Ipv4Net,
    /// The node's underlay address, the VXLAN/UDP tunnel endpoint.
    pub public_ip: Ipv4Addr,
    /// `vxlan`, `udp`, `host-gw`.
    pub backend_type: String,
    /// VXLAN backend data, when the lease has it.
    pub vxlan: Option<VxlanData>,
    /// Where the lease came from, for messages (`/coreos.com/network/subnets/10.244.1.0-24`).
    pub source: String,
}

/// `BackendData` of a VXLAN lease: `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// VXLAN network identifier.
    pub vni: u32,
    /// The node's VTEP MAC.
    pub vtep_mac: MacAddr,
}

/// What a node advertises about itself when it acquires or renews a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// The node's underlay address.
    pub public_ip: Ipv4Addr,
    /// Backend type.
    pub backend_type: String,
    /// VXLAN data (the VTEP MAC this node uses).
    pub vxlan: Option<VxlanData>,
}

/// What the lease watcher hands the reconcile loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The complete, current set of valid leases (ours included). Entries that
    /// failed to parse are not in it (they were logged with key and value).
    Snapshot(Vec<Lease>),
    /// Our own lease disappeared from the store: it was revoked.
    Revoked(String),
}
