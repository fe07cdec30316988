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
//! What a wrapper needs to know of an op comes from a classifier here, so ops stay matched
//! in this file only: [`kind`] for the alarm wrapper, [`needs`] (the key ranges read and
//! written, leases, admin-only ops) for the auth wrapper.
//!
//! A wrapper that must switch on and off (etcd swaps the capped applier in while a NOSPACE
//! alarm is raised) stays installed and consults the replicated alarm state itself.

use cairn_proto::etcdserverpb::{AlarmRequest, RequestOp, TxnRequest, request_op};
use cairn_proto::internal::InternalRequest;
use cairn_proto::internal::internal_request::Op;

use super::members::Members;
use super::{ApplyResult, Error, Response, convert};
use crate::auth::{self, AuthStore};
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
    /// Users, roles, permissions and the simple tokens.
    pub auth: &'a AuthStore,
    /// The raft index of the entry being applied (names the simple token it assigns).
    pub index: u64,
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

/// What a wrapper needs to know of a request's op (ops are matched only in this file).
#[derive(Debug)]
pub enum Kind<'a> {
    /// An alarm request (served by the alarm wrapper).
    Alarm(&'a AlarmRequest),
    /// A lease checkpoint (records remaining TTLs; never refused).
    LeaseCheckpoint,
    /// A request that may grow the database: a put, a txn with a put in either branch
    /// (nested txns included), a lease grant (what etcd's quota cost counts).
    GrowsDatabase,
    /// Any other request.
    Other,
}

/// Classifies `req`'s op for the wrappers.
pub fn kind(req: &InternalRequest) -> Kind<'_> {
    match &req.op {
        Some(Op::Alarm(a)) => Kind::Alarm(a),
        Some(Op::LeaseCheckpoint(_)) => Kind::LeaseCheckpoint,
        Some(Op::Put(_) | Op::LeaseGrant(_)) => Kind::GrowsDatabase,
        Some(Op::Txn(t)) if txn_puts(t) => Kind::GrowsDatabase,
        _ => Kind::Other,
    }
}

/// True when `txn` puts a key in either branch, nested txns included.
fn txn_puts(txn: &TxnRequest) -> bool {
    let puts = |ops: &[RequestOp]| {
        ops.iter().any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_)) => true,
            Some(request_op::Request::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
    };
    puts(&txn.success) || puts(&txn.failure)
}

/// What the auth wrapper checks before a request applies (etcd's authApplierV3).
#[derive(Debug, PartialEq, Eq)]
pub enum Needs<'a> {
    /// Nothing: Authenticate, lease grants and checkpoints, compactions, alarms and member
    /// records, which etcd does not check at apply.
    Nothing,
    /// The `root` role: auth management, status and listings.
    Admin,
    /// UserGet: the `root` role, or being that user.
    UserGet(&'a str),
    /// RoleGet: the `root` role, or holding that role.
    RoleGet(&'a str),
    /// Access to key ranges (`key`, `range_end` with etcd's conventions), and write access
    /// to every key attached to each lease named (a put's lease, a revoked lease).
    Keys {
        /// The ranges read or written.
        ranges: Vec<(auth::Access, &'a [u8], &'a [u8])>,
        /// Leases whose attached keys must be writable.
        leases: Vec<i64>,
    },
}

/// Classifies `req` for the auth wrapper.
pub fn needs(req: &InternalRequest) -> Needs<'_> {
    use auth::Access::{Read, Write};
    let mut ranges = Vec::new();
    let mut leases = Vec::new();
    match &req.op {
        Some(Op::Put(p)) => {
            ranges.push((Write, p.key.as_slice(), &[][..]));
            if p.prev_kv {
                ranges.push((Read, p.key.as_slice(), &[][..]));
            }
            if p.lease != 0 {
                leases.push(p.lease);
            }
        }
        Some(Op::DeleteRange(d)) => {
            ranges.push((Write, d.key.as_slice(), d.range_end.as_slice()));
            if d.prev_kv {
                ranges.push((Read, d.key.as_slice(), d.range_end.as_slice()));
            }
        }
        Some(Op::Txn(t)) => txn_ranges(t, &mut ranges),
        Some(Op::LeaseRevoke(r)) => leases.push(r.id),
        Some(Op::UserGet(u)) => return Needs::UserGet(&u.name),
        Some(Op::RoleGet(r)) => return Needs::RoleGet(&r.role),
        Some(
            Op::AuthEnable(_)
            | Op::AuthDisable(_)
            | Op::AuthStatus(_)
            | Op::UserAdd(_)
            | Op::UserList(_)
            | Op::UserDelete(_)
            | Op::UserChangePassword(_)
            | Op::UserGrantRole(_)
            | Op::UserRevokeRole(_)
            | Op::RoleAdd(_)
            | Op::RoleList(_)
            | Op::RoleDelete(_)
            | Op::RoleGrantPermission(_)
            | Op::RoleRevokePermission(_),
        ) => return Needs::Admin,
        Some(
            Op::Authenticate(_)
            | Op::Compaction(_)
            | Op::LeaseGrant(_)
            | Op::LeaseCheckpoint(_)
            | Op::MemberUpdate(_)
            | Op::MemberPublish(_)
            | Op::Alarm(_),
        )
        | None => return Needs::Nothing,
    }
    Needs::Keys { ranges, leases }
}

/// The ranges a txn reads (its compares, ranges and `prev_kv` deletes) and writes, in both
/// branches and nested txns (etcd's checkTxnAuth).
fn txn_ranges<'a>(t: &'a TxnRequest, out: &mut Vec<(auth::Access, &'a [u8], &'a [u8])>) {
    use auth::Access::{Read, Write};
    for c in &t.compare {
        out.push((Read, c.key.as_slice(), c.range_end.as_slice()));
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                out.push((Read, r.key.as_slice(), r.range_end.as_slice()));
            }
            Some(request_op::Request::RequestPut(p)) => {
                out.push((Write, p.key.as_slice(), &[][..]));
                if p.prev_kv {
                    out.push((Read, p.key.as_slice(), &[][..]));
                }
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                out.push((Write, d.key.as_slice(), d.range_end.as_slice()));
                if d.prev_kv {
                    out.push((Read, d.key.as_slice(), d.range_end.as_slice()));
                }
            }
            Some(request_op::Request::RequestTxn(inner)) => txn_ranges(inner, out),
            None => {}
        }
    }
}

/// The base applier: routes `req`'s op to the state machine that owns it.
///
/// # Errors
/// The state machines' refusals; [`super::ConvertError::EmptyOp`] for a request without op.
pub fn base(ctx: &mut Ctx<'_, '_>, req: InternalRequest) -> ApplyResult {
    let Ctx { txn, leases, members, auth, index } = ctx;
    let auth: &AuthStore = auth;
    let index = *index;
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
        Some(Op::AuthEnable(_)) => {
            auth.enable(txn.batch_mut())?;
            Ok(Response::AuthDone)
        }
        Some(Op::AuthDisable(_)) => {
            auth.disable(txn.batch_mut());
            Ok(Response::AuthDone)
        }
        Some(Op::AuthStatus(_)) => {
            Ok(Response::AuthStatus { enabled: auth.is_enabled(), revision: auth.revision() })
        }
        Some(Op::Authenticate(a)) => {
            auth.check_authenticate(&a.name)?;
            // With JWT the proposer signs the token itself once this entry applied.
            if a.simple_token.is_empty() {
                return Ok(Response::AuthToken(String::new()));
            }
            let token = format!("{}.{}", a.simple_token, index);
            auth.tokens().assign(token.clone(), &a.name);
            Ok(Response::AuthToken(token))
        }
        Some(Op::UserAdd(u)) => {
            let no_password = u.options.is_some_and(|o| o.no_password);
            auth.user_add(txn.batch_mut(), &u.name, u.hashed_password.as_bytes(), no_password)?;
            Ok(Response::AuthDone)
        }
        Some(Op::UserGet(u)) => Ok(Response::Names(auth.user_get(&u.name)?)),
        Some(Op::UserList(_)) => Ok(Response::Names(auth.user_list())),
        Some(Op::UserDelete(u)) => {
            auth.user_delete(txn.batch_mut(), &u.name)?;
            Ok(Response::AuthDone)
        }
        Some(Op::UserChangePassword(u)) => {
            auth.user_change_password(txn.batch_mut(), &u.name, u.hashed_password.as_bytes())?;
            Ok(Response::AuthDone)
        }
        Some(Op::UserGrantRole(g)) => {
            auth.user_grant_role(txn.batch_mut(), &g.user, &g.role)?;
            Ok(Response::AuthDone)
        }
        Some(Op::UserRevokeRole(r)) => {
            auth.user_revoke_role(txn.batch_mut(), &r.name, &r.role)?;
            Ok(Response::AuthDone)
        }
        Some(Op::RoleAdd(r)) => {
            auth.role_add(txn.batch_mut(), &r.name)?;
            Ok(Response::AuthDone)
        }
        Some(Op::RoleGet(r)) => Ok(Response::Permissions(auth.role_get(&r.role)?)),
        Some(Op::RoleList(_)) => Ok(Response::Names(auth.role_list())),
        Some(Op::RoleDelete(r)) => {
            auth.role_delete(txn.batch_mut(), &r.role)?;
            Ok(Response::AuthDone)
        }
        Some(Op::RoleGrantPermission(g)) => {
            auth.role_grant_permission(txn.batch_mut(), &g.name, g.perm)?;
            Ok(Response::AuthDone)
        }
        Some(Op::RoleRevokePermission(r)) => {
            auth.role_revoke_permission(txn.batch_mut(), &r.role, &r.key, &r.range_end)?;
            Ok(Response::AuthDone)
        }
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
