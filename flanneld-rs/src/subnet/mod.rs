//! Lease stores ("subnet managers"): etcd, and the Kubernetes API. Each hands
//! the reconcile loop full snapshots of the lease set.

pub mod etcd;
pub mod kube;
pub mod kube_annotations;
