//! Cairn: an etcd-compatible, strongly consistent key-value store.
//!
//! # Layout
//!
//! - `storage`: the state machine's ordered byte store behind the `Engine` trait (sled).
//! - `mvcc`: the revisioned keyspace: range, put, delete, txn, compaction.

pub mod mvcc;
pub mod storage;
