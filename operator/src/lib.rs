//! `cairn-operator`: a kube-rs controller that runs Cairn clusters on Kubernetes.
//!
//! It talks to the store only through the etcd v3 API (the `cairn-proto` stubs), so it
//! would manage a real etcd as well.
