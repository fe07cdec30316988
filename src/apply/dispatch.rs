//! The apply router: the one place where a replicated request's op is matched and sent to
//! the state machine that owns it, behind a chain of wrapper appliers.
//!
//! # The chain
//!
//! Every request decoded from a normal entry goes through [`Router::apply`]: first through
//! each [`Wrapper`] in the order they were added (the outermost first), then to the base
//! applier ([`base`]), which matches the op and calls mvcc, the lessor or the member
//! records. This is etcd's chain of appliers (server/etcdserver/apply/uber_applier.go:
//! corrupt → capped → auth → quota → backend): a check that concerns many ops is one
//! wrapper, not an `if` in every arm below.
//!
//! # Adding a wrapper
//!
//! 1. Implement [`Wrapper`] in its own file under `apply/` (e.g. `apply/quota.rs`). Its
//!    `apply` looks at the request (`req.op`, and whatever the request carries for it,
//!    such as an auth header), and either refuses it by returning an [`Error`] variant of
//!    its own (add one to `apply::Error`; the server maps it to a server error and
//!    `grpc/status.rs` to etcd's status) or passes it on with `next.run(ctx, req)`. It may
//!    also act after the inner appliers returned (e.g. raise an alarm on a result).
//! 2. Keep it deterministic: a wrapper runs on every member for every entry, so it may read
//!    only the replicated state (through [`Ctx`] or handles it holds to replicated stores)
//!    and the request, never a clock, randomness, the network or member-local settings
//!    that could differ between members.
//! 3. Install it where the server builds the applier, with
//!    [`Applier::with_wrapper`](super::Applier::with_wrapper), in the chain order etcd uses:
//!    alarm/capacity checks first, then auth, then quota. Wrappers added earlier run
//!    outside wrappers added later.
//!
//! A wrapper that must switch on and off (etcd swaps the capped applier in while a NOSPACE
//! alarm is raised) stays installed and consults the replicated alarm state itself.

use cairn_proto::internal::InternalRequest;
use cairn_proto::internal::internal_request::Op;

use super::members::Members;
use super::{ApplyResult, Error, Response, convert};
use crate::lease::{LeaseId, Lessor};
use crate::mvcc::{self, LeaseLookup, WriteTxn};

/// The replicated state one request may change, lent to the chain for that request.
pub struct Ctx<'a, 'txn> {
    /// The open write group: mvcc changes and every other record of this entry go into its
    /// batch, committed atomically with the applied index.
    pub txn: &'a mut WriteTxn<'txn>,
    /// The lessor.
    pub leases: &'a Lessor,
    /// The member records.
    pub members: &'a mut Members,
}

/// One link of the applier chain (see the module docs for how to add one).
pub trait Wrapper: Send {
    /// Names the wrapper in logs.
    fn name(&self) -> &'static str;

    /// Applies `req`: refuses it with an error, or hands it on with `next.run(ctx, req)`.
    ///
    /// # Errors
    /// The wrapper's own refusal, or the inner appliers' errors.
    fn apply(&mut self, ctx: &mut Ctx<'_, '_>, req: InternalRequest, next: Next<'_>)
    -> ApplyResult;
}

/// The rest of the chain after the current wrapper.
pub struct Next<'a> {
    rest: &'a mut [Box<dyn Wrapper>],
}

impl Next<'_> {
    /// Runs the remaining wrappers, then the base applier.
    ///
    /// # Errors
    /// The first refusal of an inner wrapper, or the state machines' errors.
    pub fn run(self, ctx: &mut Ctx<'_, '_>, req: InternalRequest) -> ApplyResult {
        match self.rest.split_first_mut() {
            Some((wrapper, rest)) => wrapper.apply(ctx, req, Next { rest }),
            None => base(ctx, req),
        }
    }
}

/// The applier chain: wrappers, outermost first, around [`base`].
#[derive(Default)]
pub struct Router {
    wrappers: Vec<Box<dyn Wrapper>>,
}

impl Router {
    /// Adds `wrapper` inside the wrappers already added.
    pub fn push(&mut self, wrapper: Box<dyn Wrapper>) {
        tracing::debug!(wrapper = wrapper.name(), "applier wrapper installed");
        self.wrappers.push(wrapper);
    }

    /// Applies `req` through the whole chain.
    pub fn apply(&mut self, ctx: &mut Ctx<'_, '_>, req: InternalRequest) -> ApplyResult {
        Next { rest: &mut self.wrappers }.run(ctx, req)
    }
}

/// True when `req` must start a write group of its own: a lease revoke deletes the keys
/// attached to its lease, and keys attach when their puts commit, so what came before it
/// in the group must be committed first.
pub(super) fn needs_fresh_group(req: &InternalRequest) -> bool {
    matches!(req.op, Some(Op::LeaseRevoke(_)))
}

/// The base applier: routes `req`'s op to the state machine that owns it.
///
/// # Errors
/// The state machines' refusals; [`super::ConvertError::EmptyOp`] for a request without op.
pub fn base(ctx: &mut Ctx<'_, '_>, req: InternalRequest) -> ApplyResult {
    let Ctx { txn, leases, members } = ctx;
    let leases: &Lessor = leases;
    let lookup = Leases(leases);
    match req.op {
        Some(Op::LeaseGrant(r)) => {
            let ttl = leases.grant(r.id, r.ttl, txn.batch_mut())?;
            Ok(Response::LeaseGrant { id: r.id, ttl })
        }
        Some(Op::LeaseRevoke(r)) => {
            let keys = leases.revoke(r.id, txn.batch_mut())?;
            // Every attached key goes at one revision, one DELETE event each.
            let deletes = keys
                .into_iter()
                .map(|key| {
                    mvcc::TxnOp::DeleteRange(mvcc::DeleteRangeRequest { key, ..Default::default() })
                })
                .collect();
            txn.txn(
                &mvcc::TxnRequest { compare: vec![], success: deletes, failure: vec![] },
                &lookup,
            )?;
            Ok(Response::LeaseRevoke)
        }
        Some(Op::LeaseCheckpoint(r)) => {
            for cp in r.checkpoints {
                leases.checkpoint(cp.id, cp.remaining_ttl, txn.batch_mut());
            }
            Ok(Response::LeaseCheckpoint)
        }
        Some(Op::Put(r)) => Ok(Response::Put(txn.put(&convert::put_request(&r), &lookup)?)),
        Some(Op::DeleteRange(r)) => {
            Ok(Response::DeleteRange(txn.delete_range(&convert::delete_range_request(&r))?))
        }
        Some(Op::Txn(r)) => Ok(Response::Txn(txn.txn(&convert::txn_request(&r)?, &lookup)?)),
        Some(Op::Compaction(r)) => {
            txn.compact(r.revision)?;
            Ok(Response::Compact)
        }
        Some(Op::MemberPublish(m)) => members.publish_member(txn.batch_mut(), m.into()),
        Some(Op::MemberUpdate(u)) => members.update_member(txn.batch_mut(), u.id, u.peer_ur_ls),
        // Alarm requests belong to the alarm wrapper (`alarm.rs`), which never hands them on.
        Some(Op::Alarm(_)) => Err(Error::NoApplier { op: "alarm" }),
        None => Err(Error::Convert(convert::ConvertError::EmptyOp)),
    }
}

/// mvcc's view of the lessor: whether a put may name a lease. Declared by mvcc, answered
/// here so that neither state machine imports the other.
pub(super) struct Leases<'a>(pub(super) &'a Lessor);

impl LeaseLookup for Leases<'_> {
    fn lease_exists(&self, id: LeaseId) -> bool {
        self.0.exists(id)
    }
}
