//! The auth wrapper applier (etcd's authApplierV3, apply_auth.go): every write is checked
//! at apply, against the auth store as of the entry's place in the log, with the caller the
//! proposer recorded in the request's [`AuthHeader`](cairn_proto::internal::AuthHeader).
//!
//! Checking at apply rather than at the edge closes the race of a permission revoked
//! between a request's check and its commit: the header carries the auth revision the
//! caller was resolved at, and a write resolved against an older store is refused with
//! "revision of auth store is old" (the client re-authenticates and retries). Reads that
//! do not go through raft (Range, Watch) are checked by the server when served.
//!
//! What each request needs comes from [`dispatch::needs`]: the `root` role for auth
//! management, READ or WRITE on each key range a put, delete or txn touches (every compare
//! and both branches, nested txns included), and WRITE on every key attached to a lease a
//! put names or a revoke ends. A request without a header is the member's own (lease
//! expiry, checkpoints, alarms, publishing itself) and is never refused.

use cairn_proto::internal::InternalRequest;

use super::dispatch::{self, Ctx, Needs, Next, Wrapper};
use super::{ApplyResult, Error};
use crate::auth::{Access, AuthInfo, AuthStore};

/// The wrapper applier that enforces users' permissions.
#[derive(Debug)]
pub struct AuthWrapper {
    store: AuthStore,
}

impl AuthWrapper {
    /// Creates the wrapper over the shared auth store.
    pub fn new(store: AuthStore) -> Self {
        Self { store }
    }

    fn check(&self, ctx: &Ctx<'_, '_>, info: &AuthInfo, needs: Needs<'_>) -> Result<(), Error> {
        let store = &self.store;
        match needs {
            Needs::Nothing => {}
            Needs::Admin => store.is_admin_permitted(info)?,
            Needs::UserGet(name) => {
                if store.is_admin_permitted(info).is_err() && name != info.username {
                    return Err(crate::auth::Error::PermissionDenied.into());
                }
            }
            Needs::RoleGet(role) => {
                if store.is_admin_permitted(info).is_err()
                    && !store.user_has_role(&info.username, role)
                {
                    return Err(crate::auth::Error::PermissionDenied.into());
                }
            }
            Needs::Keys { ranges, leases } => {
                for (access, key, range_end) in ranges {
                    store.is_permitted(info, access, key, range_end)?;
                }
                for id in leases {
                    let keys = ctx.leases.get(id).map(|l| l.keys).unwrap_or_default();
                    for key in keys {
                        store.is_permitted(info, Access::Write, &key, &[])?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Wrapper for AuthWrapper {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn apply(
        &mut self,
        ctx: &mut Ctx<'_, '_>,
        req: InternalRequest,
        next: Next<'_>,
    ) -> ApplyResult {
        // With auth off every check passes: skip working out what the request needs (for a
        // put with a lease, that lists every key attached to the lease).
        if let Some(h) = req.auth.as_ref().filter(|_| self.store.is_enabled()) {
            let info = AuthInfo { username: h.username.clone(), revision: h.revision };
            self.check(ctx, &info, dispatch::needs(&req))?;
        }
        next.run(ctx, req)
    }
}
