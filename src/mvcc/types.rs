//! Domain types of the mvcc layer: what a key-value is, what happened to it, and the shapes
//! of range, put, delete and txn requests and results. No wire types appear here; `grpc/`
//! and `apply/` convert at the edges.

/// A key's state at one revision, as etcd's `mvccpb.KeyValue` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// The key bytes.
    pub key: Vec<u8>,
    /// The revision of the put that created the key's current generation.
    pub create_revision: i64,
    /// The revision of the last modification (put or, for a tombstone, the delete).
    pub mod_revision: i64,
    /// Number of puts in the current generation; 1 on creation, 0 for a deleted key.
    pub version: i64,
    /// The value bytes (empty for a tombstone or a keys-only read).
    pub value: Vec<u8>,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// The kind of an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change to one key at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// For a put, the new key-value; for a delete, the key with `mod_revision` set to the
    /// deletion revision and every other field zero/empty.
    pub kv: KeyValue,
    /// The key-value just before this change, when the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// Sort direction of a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortOrder {
    /// Keep the default order (ascending by key).
    #[default]
    None,
    /// Ascending by the sort target.
    Ascend,
    /// Descending by the sort target.
    Descend,
}

/// The field a range is sorted by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortTarget {
    /// The key bytes.
    #[default]
    Key,
    /// `version`.
    Version,
    /// `create_revision`.
    Create,
    /// `mod_revision`.
    Mod,
    /// The value bytes.
    Value,
}

/// A range read over `[key, range_end)` with etcd's options.
///
/// `range_end` empty means the single key `key`; `range_end == [0]` means every key
/// `>= key` (and `key == [0]` too means all keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range (exclusive); see the type docs for the special values.
    pub range_end: Vec<u8>,
    /// Maximum number of key-values returned; 0 means no limit.
    pub limit: i64,
    /// The revision to read at; `<= 0` means the newest.
    pub revision: i64,
    /// Sort direction.
    pub sort_order: SortOrder,
    /// Sort field.
    pub sort_target: SortTarget,
    /// Return keys without values.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Drop key-values whose `mod_revision` is below this (0 = no bound).
    pub min_mod_revision: i64,
    /// Drop key-values whose `mod_revision` is above this (0 = no bound).
    pub max_mod_revision: i64,
    /// Drop key-values whose `create_revision` is below this (0 = no bound).
    pub min_create_revision: i64,
    /// Drop key-values whose `create_revision` is above this (0 = no bound).
    pub max_create_revision: i64,
}

/// The answer to a [`RangeRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResult {
    /// The key-values, sorted and limited as asked (empty when `count_only`).
    pub kvs: Vec<KeyValue>,
    /// True when more key-values than `limit` matched.
    pub more: bool,
    /// Number of keys in the range at the read revision, ignoring `limit` and the min/max
    /// revision filters.
    pub count: i64,
    /// The store's current revision when the read ran (the header revision).
    pub revision: i64,
}

/// A put of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutRequest {
    /// The key (non-empty; validated at the edge).
    pub key: Vec<u8>,
    /// The new value (ignored when `ignore_value`).
    pub value: Vec<u8>,
    /// The lease to attach, 0 for none (ignored when `ignore_lease`).
    pub lease: i64,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Keep the current value; the key must exist.
    pub ignore_value: bool,
    /// Keep the current lease; the key must exist.
    pub ignore_lease: bool,
}

/// The answer to a [`PutRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutResult {
    /// The previous key-value, when asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
    /// The store's revision after the put.
    pub revision: i64,
}

/// A delete of the keys in `[key, range_end)` (same conventions as [`RangeRequest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRangeRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range (exclusive).
    pub range_end: Vec<u8>,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

/// The answer to a [`DeleteRangeRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRangeResult {
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
    /// The store's revision after the delete.
    pub revision: i64,
}

/// How a [`Compare`] relates the key's field to the given operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// field == operand
    Equal,
    /// field > operand
    Greater,
    /// field < operand
    Less,
    /// field != operand
    NotEqual,
}

/// The field a [`Compare`] reads, with its operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// `version` against the operand.
    Version(i64),
    /// `create_revision` against the operand.
    Create(i64),
    /// `mod_revision` against the operand.
    Mod(i64),
    /// The value bytes against the operand (lexicographic).
    Value(Vec<u8>),
    /// The lease id against the operand.
    Lease(i64),
}

/// One condition of a txn, over one key or every key of `[key, range_end)`.
///
/// A missing key has version, create and mod revision 0 and lease 0, so `Mod == 0` tests
/// absence. A value compare on a missing key is false. With a range, every key in it must
/// satisfy the condition; a range holding no key is compared like one missing key (so a
/// value compare fails and `version > 0` is false), as etcd does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// The end of the range; empty for the single key.
    pub range_end: Vec<u8>,
    /// The relation.
    pub result: CompareResult,
    /// The field and operand.
    pub target: CompareTarget,
}

/// One operation inside a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// A read; it sees the branch's earlier writes.
    Range(RangeRequest),
    /// A put.
    Put(PutRequest),
    /// A delete.
    DeleteRange(DeleteRangeRequest),
    /// A nested txn.
    Txn(TxnRequest),
}

/// A transaction: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnRequest {
    /// The conditions, a conjunction.
    pub compare: Vec<Compare>,
    /// Ops run when every compare holds.
    pub success: Vec<TxnOp>,
    /// Ops run otherwise.
    pub failure: Vec<TxnOp>,
}

/// The result of one [`TxnOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    /// Result of a range.
    Range(RangeResult),
    /// Result of a put.
    Put(PutResult),
    /// Result of a delete.
    DeleteRange(DeleteRangeResult),
    /// Result of a nested txn.
    Txn(TxnResult),
}

/// The answer to a [`TxnRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResult {
    /// True when the compares held and `success` ran.
    pub succeeded: bool,
    /// One result per op of the branch that ran, in order.
    pub responses: Vec<TxnOpResult>,
    /// The store's revision after the txn.
    pub revision: i64,
}
