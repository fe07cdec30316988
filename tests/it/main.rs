//! Cairn's integration tests: real `cairn` processes on loopback ports, driven by real
//! third-party clients (the `etcd-client` crate and `etcdctl`), plus a differential run
//! against real etcd and a kill -9 crash test.

mod crash;
mod diff;
mod etcdctl;
mod harness;
mod kv;
mod server;
mod watch;
mod watch_cli;
mod watch_diff;
mod watch_load;
