//! Cairn's integration tests: real `cairn` processes on loopback ports, driven by real
//! third-party clients (the `etcd-client` crate and `etcdctl`), plus a differential run
//! against real etcd and a kill -9 crash test.

// Test helpers (harness, clients, parsers) are test code even outside `#[test]` functions,
// where `.clippy.toml`'s allow-*-in-tests does not reach: a failure there should panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod auth;
mod cluster;
mod compaction;
mod compat;
mod crash;
mod diff;
mod disk;
mod etcdctl;
mod garbage;
mod gateway;
mod harness;
mod kv;
mod lease;
mod linearizability;
mod lock;
mod maintenance;
mod metrics;
mod partition;
mod server;
mod tls;
mod watch;
mod watch_cli;
mod watch_diff;
mod watch_faults;
mod watch_load;
