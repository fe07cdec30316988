//! Cairn: an etcd-compatible, strongly consistent key-value store.
//!
//! A request flows edge → server → raft → apply → state machines (DESIGN.md):
//!
//! # Layout
//!
//! - [`config`]: etcd's flags and `ETCD_*` variables, validated into typed values.
//! - [`storage`]: the state machine's ordered byte store behind the `Engine` trait (sled in
//!   one file, an in-memory engine for tests).
//! - [`mvcc`]: the revisioned keyspace: range, put, delete, txn, compaction.
//! - [`lease`]: leases: replicated lessor state and the leader's expiry clock (knows only
//!   storage).
//! - [`auth`]: users, roles, range permissions, the auth revision and simple tokens (knows
//!   only storage).
//! - [`raft`]: the raft-rs owner task and its durable, fdatasynced log.
//! - [`apply`]: applies committed entries in order, atomically with the applied index; one
//!   op router with a chain of wrapper appliers.
//! - [`server`]: the composition root and the edge's only door: typed methods, one error,
//!   propose-and-wait, linearizable reads, membership, compaction.
//! - [`grpc`]: etcd's gRPC services over `server`: validation, error mapping, conversions;
//!   the peer transport.
//! - [`watch`]: etcd's watchers: fed by apply, caught up from history, bounded per stream.
//! - [`gateway`]: HTTP on the client port: etcd's JSON gateway, health, version, metrics.
//! - [`metrics`]: the Prometheus registry with etcd's metric names.
//! - [`snapshot`]: Cairn's snapshot image format and `cairn snapshot save|status|restore`.
//! - [`bench`]: `cairn bench`, the load generator modeled on etcd's benchmark tool.
//! - `fuzz` (test builds only): deterministic fuzzing of the decoders of outside bytes.

pub mod apply;
pub mod auth;
pub mod bench;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod gateway;
pub mod grpc;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod snapshot;
pub mod storage;
pub mod watch;
