//! Lease stores ("subnet managers"): etcd now, the Kubernetes API later. Each
//! hands the reconcile loop full snapshots of the lease set. `kube_annotations`
//! holds Kubernetes mode's formats (the API client is not written yet).

pub mod etcd;
pub mod kube_annotations;
