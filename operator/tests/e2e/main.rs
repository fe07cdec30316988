//! End-to-end tests on the Kubernetes test bed (OPERATOR.md §4): a real kube-apiserver and
//! kube-controller-manager storing their data in a real `cairn`, plus a test kubelet that runs
//! Pods as local processes. One bed is started per run of this binary and shared by all tests
//! (`bed::shared()`); each test works in its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod bed;
mod chart;
mod daytwo;
mod kubelet;
mod operator;
mod s3;
mod smoke;
mod tls;
mod upgrade;
