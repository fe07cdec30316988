//! Alarms: the replicated set of raised alarms and the wrapper applier that enforces them
//! (etcd's alarm store plus its capped and corrupt appliers, apply/uber_applier.go).
//!
//! An alarm is a `(member id, type)` pair raised and cleared through raft (an
//! `AlarmRequest` entry), so every member agrees on the set. While a NOSPACE alarm is
//! raised, requests that grow the database (a put, a txn with a put in either branch, a
//! lease grant) are refused with [`Error::NoSpace`]; reads, deletes, compactions and lease
//! revokes go through, so an operator can free space. While a CORRUPT alarm is raised,
//! every write is refused with [`Error::Corrupt`]. Alarm requests themselves always pass.
//!
//! What raises NOSPACE is not here: the member whose backend would exceed
//! `--quota-backend-bytes` proposes the alarm (server `quota.rs`), because the size on disk
//! is member-local and apply must stay deterministic (etcd's quota applier, which compares
//! the size inside apply, has no counterpart).
//!
//! Records: `Keyspace::Meta` keys `alarm/` + member id (8 bytes big-endian) + type (4 bytes
//! big-endian), empty values.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock};

use cairn_proto::etcdserverpb::{
    AlarmType, RequestOp, TxnRequest, alarm_request::AlarmAction, request_op,
};
use cairn_proto::internal::InternalRequest;
use cairn_proto::internal::internal_request::Op;

use super::dispatch::{Ctx, Next, Wrapper};
use super::{ALARM_KEY_PREFIX, ApplyResult, Error, Response};
use crate::storage::{Engine, Keyspace, Scan};

/// One raised alarm: the member it concerns and etcd's `AlarmType` number.
pub type Alarm = (u64, i32);

/// The raised alarms as of the applied index, shared by apply and the server.
#[derive(Debug, Clone, Default)]
pub struct Alarms {
    set: Arc<RwLock<BTreeSet<Alarm>>>,
}

fn record_key(alarm: Alarm) -> Vec<u8> {
    let mut k = ALARM_KEY_PREFIX.to_vec();
    k.extend_from_slice(&alarm.0.to_be_bytes());
    k.extend_from_slice(&alarm.1.to_be_bytes());
    k
}

impl Alarms {
    /// Loads the alarms recorded in `engine`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn load(engine: &dyn Engine) -> Result<Self, crate::storage::Error> {
        let alarms = Self::default();
        alarms.reload(engine)?;
        Ok(alarms)
    }

    /// Replaces the set with what `engine` records (after a snapshot was installed).
    ///
    /// # Errors
    /// Storage errors; the set is unchanged then.
    pub fn reload(&self, engine: &dyn Engine) -> Result<(), crate::storage::Error> {
        let mut set = BTreeSet::new();
        let mut end = ALARM_KEY_PREFIX.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        engine.scan(Keyspace::Meta, ALARM_KEY_PREFIX, Some(&end), &mut |k, _| {
            let rest = k.get(ALARM_KEY_PREFIX.len()..).unwrap_or_default();
            if let (Some(id), Some(kind)) = (rest.get(..8), rest.get(8..12))
                && let (Ok(id), Ok(kind)) = (<[u8; 8]>::try_from(id), <[u8; 4]>::try_from(kind))
            {
                set.insert((u64::from_be_bytes(id), i32::from_be_bytes(kind)));
            }
            Scan::Continue
        })?;
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = set;
        Ok(())
    }

    /// Every raised alarm, ordered by member then type.
    pub fn list(&self) -> Vec<Alarm> {
        self.set.read().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }

    /// True when some member has an alarm of `kind` raised.
    pub fn has(&self, kind: AlarmType) -> bool {
        self.set.read().unwrap_or_else(PoisonError::into_inner).iter().any(|a| a.1 == kind as i32)
    }

    fn insert(&self, alarm: Alarm) -> bool {
        self.set.write().unwrap_or_else(PoisonError::into_inner).insert(alarm)
    }

    fn remove(&self, alarm: Alarm) -> bool {
        self.set.write().unwrap_or_else(PoisonError::into_inner).remove(&alarm)
    }
}

/// True when `txn` puts a key in either branch, nested txns included (etcd's `costTxn`
/// is then above zero).
pub fn txn_puts(txn: &TxnRequest) -> bool {
    let puts = |ops: &[RequestOp]| {
        ops.iter().any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_)) => true,
            Some(request_op::Request::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
    };
    puts(&txn.success) || puts(&txn.failure)
}

/// True when `op` may grow the database: what a NOSPACE alarm refuses.
pub fn grows_database(op: &Op) -> bool {
    match op {
        Op::Put(_) | Op::LeaseGrant(_) => true,
        Op::Txn(t) => txn_puts(t),
        _ => false,
    }
}

/// The wrapper applier that applies alarm requests and enforces raised alarms.
#[derive(Debug)]
pub struct AlarmWrapper {
    alarms: Alarms,
}

impl AlarmWrapper {
    /// Creates the wrapper over the shared alarm set.
    pub fn new(alarms: Alarms) -> Self {
        Self { alarms }
    }
}

impl Wrapper for AlarmWrapper {
    fn name(&self) -> &'static str {
        "alarm"
    }

    fn apply(
        &mut self,
        ctx: &mut Ctx<'_, '_>,
        req: InternalRequest,
        next: Next<'_>,
    ) -> ApplyResult {
        match &req.op {
            Some(Op::Alarm(a)) => {
                let alarm = (a.member_id, a.alarm);
                match AlarmAction::try_from(a.action) {
                    Ok(AlarmAction::Activate) if a.alarm != AlarmType::None as i32 => {
                        if self.alarms.insert(alarm) {
                            ctx.txn.batch_mut().put(Keyspace::Meta, record_key(alarm), Vec::new());
                            tracing::warn!(member = %format!("{:x}", alarm.0), alarm = alarm.1, "alarm raised");
                        }
                        Ok(Response::Alarms(vec![alarm]))
                    }
                    Ok(AlarmAction::Deactivate) => {
                        if self.alarms.remove(alarm) {
                            ctx.txn.batch_mut().delete(Keyspace::Meta, record_key(alarm));
                            tracing::info!(member = %format!("{:x}", alarm.0), alarm = alarm.1, "alarm cleared");
                            Ok(Response::Alarms(vec![alarm]))
                        } else {
                            Ok(Response::Alarms(Vec::new()))
                        }
                    }
                    // GET (and an ACTIVATE of NONE, which etcd ignores) lists every alarm.
                    _ => Ok(Response::Alarms(self.alarms.list())),
                }
            }
            Some(op)
                if self.alarms.has(AlarmType::Corrupt) && !matches!(op, Op::LeaseCheckpoint(_)) =>
            {
                Err(Error::Corrupt)
            }
            Some(op) if self.alarms.has(AlarmType::Nospace) && grows_database(op) => {
                Err(Error::NoSpace)
            }
            _ => next.run(ctx, req),
        }
    }
}
