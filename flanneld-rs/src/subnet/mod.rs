//! Lease stores ("subnet managers"): etcd now, the Kubernetes API later. Each
//! hands the reconcile loop full snapshots of the lease set.

pub mod etcd;
