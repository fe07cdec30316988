//! Auth: the replicated users, roles and range permissions, the auth revision, and the
//! member-local simple tokens (etcd's server/auth/store.go).
//!
//! Every change arrives through an applied raft entry: the methods that change the store
//! take the apply group's storage [`Batch`], so the records commit atomically with the
//! entry's applied index and travel in snapshots with the rest of the state machine
//! (`Keyspace::Auth`). Each change that etcd counts bumps the auth revision by one; a
//! request checked against a newer store than the one its caller's token was resolved
//! against is refused with [`Error::OldRevision`], and the merged-permission cache is
//! dropped on every bump, on every member.
//!
//! The store keeps etcd's rules: auth can only be enabled once a `root` user holding the
//! `root` role exists; while enabled, `root` cannot be deleted, lose the `root` role, and
//! the `root` role cannot be deleted; a user holding the `root` role may do everything.
//! Passwords are bcrypt hashes computed before proposing (the clear password never enters
//! the raft log); `no_password` users authenticate only by client certificate.
//!
//! Records (`Keyspace::Auth`): `enabled` (one byte), `revision` (8 bytes big-endian, absent
//! means 1 as in a fresh etcd), `user/<name>` (an `authpb.User`), `role/<name>` (an
//! `authpb.Role`): the bytes etcd keeps in its auth buckets. `authpb` is etcd's auth data
//! model, not an RPC message, so it serves as this module's domain type.
//!
//! Files: [`perms`] merges a user's grants and answers coverage (DESIGN's `perm_cache.rs`:
//! the cache itself is the per-revision map here); [`token`] holds the simple tokens;
//! [`jwt`] signs and verifies JWT tokens (DESIGN's `token.rs` split in two).

pub mod jwt;
pub mod perms;
pub mod token;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cairn_proto::authpb::{Permission, Role, User, UserAddOptions};
use prost::Message as _;

pub use self::jwt::JwtProvider;
pub use self::perms::{Access, UserPerms};
pub use self::token::SimpleTokens;
use crate::storage::{Batch, Engine, Keyspace, Scan};

/// The name of the all-powerful user and role.
pub const ROOT: &str = "root";

const ENABLED_KEY: &[u8] = b"enabled";
const REVISION_KEY: &[u8] = b"revision";
const USER_PREFIX: &[u8] = b"user/";
const ROLE_PREFIX: &[u8] = b"role/";

/// Refusals of the auth store; the messages are etcd's, without the "etcdserver: " prefix
/// the edge adds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Enabling auth without a `root` user.
    #[error("root user does not exist")]
    RootUserNotExist,
    /// Enabling auth while `root` lacks the `root` role.
    #[error("root user does not have root role")]
    RootRoleNotExist,
    /// An empty user name, or no user at all on a request that needs one.
    #[error("user name is empty")]
    UserEmpty,
    /// UserAdd of an existing user.
    #[error("user name already exists")]
    UserAlreadyExist,
    /// A user that does not exist.
    #[error("user name not found")]
    UserNotFound,
    /// An empty role name.
    #[error("role name is empty")]
    RoleEmpty,
    /// RoleAdd of an existing role.
    #[error("role name already exists")]
    RoleAlreadyExist,
    /// A role that does not exist.
    #[error("role name not found")]
    RoleNotFound,
    /// Unknown user, wrong password, or a password for a user without one; the same
    /// answer for each, so a caller cannot learn which users exist.
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    /// The caller lacks the permission.
    #[error("permission denied")]
    PermissionDenied,
    /// RoleGrantPermission without a permission.
    #[error("permission not given")]
    PermissionNotGiven,
    /// UserRevokeRole of a role the user does not hold.
    #[error("role is not granted to the user")]
    RoleNotGranted,
    /// RoleRevokePermission of a permission the role does not hold.
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    /// Authenticate while auth is disabled.
    #[error("authentication is not enabled")]
    NotEnabled,
    /// A token that is unknown, expired or malformed.
    #[error("invalid auth token")]
    InvalidToken,
    /// Deleting `root`, revoking its `root` role or deleting the `root` role while enabled.
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    /// The request was checked against an auth store older than the current one.
    #[error("revision of auth store is old")]
    OldRevision,
    /// Storage failed or holds a malformed record.
    #[error("auth storage: {0}")]
    Storage(String),
}

impl From<crate::storage::Error> for Error {
    fn from(e: crate::storage::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Who is asking: a user name and the auth revision their credentials were resolved at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthInfo {
    /// The user name (empty: nobody).
    pub username: String,
    /// The auth revision when the caller's token was resolved (0: nobody).
    pub revision: u64,
}

#[derive(Debug, Clone)]
struct State {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

impl Default for State {
    fn default() -> Self {
        State { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new() }
    }
}

/// Merged permissions per user, and the auth revision they were built at.
type PermCache = (u64, HashMap<String, Arc<UserPerms>>);

/// The auth store shared by apply (which changes it) and the server (which checks
/// passwords and permissions against it); clones share one store.
#[derive(Debug, Clone)]
pub struct AuthStore {
    state: Arc<RwLock<State>>,
    /// Merged permissions per user, valid for the revision they were built at.
    cache: Arc<Mutex<PermCache>>,
    tokens: SimpleTokens,
    /// Signs and verifies tokens with `--auth-token jwt` (simple tokens otherwise).
    jwt: Option<Arc<JwtProvider>>,
}

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

fn has_root_role(u: &User) -> bool {
    u.roles.iter().any(|r| r == ROOT)
}

fn no_password(u: &User) -> bool {
    u.options.as_ref().is_some_and(|o| o.no_password)
}

/// A bcrypt hash compared against when the user does not exist, so that an unknown user
/// costs as long as a wrong password (the answer must not tell them apart).
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| bcrypt::hash("", bcrypt::DEFAULT_COST).unwrap_or_default())
}

impl AuthStore {
    /// Loads the store recorded in `engine`; tokens live `token_ttl` past their last use.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn load(engine: &dyn Engine, token_ttl: std::time::Duration) -> Result<Self, Error> {
        let store = AuthStore {
            state: Arc::default(),
            cache: Arc::default(),
            tokens: SimpleTokens::new(token_ttl),
            jwt: None,
        };
        store.reload(engine)?;
        Ok(store)
    }

    /// Replaces the store with what `engine` records (after a snapshot was installed).
    ///
    /// # Errors
    /// [`Error::Storage`]; the store is unchanged then.
    pub fn reload(&self, engine: &dyn Engine) -> Result<(), Error> {
        let mut state = State::default();
        let mut bad = None;
        engine.scan(Keyspace::Auth, b"", None, &mut |k, v| {
            if k == ENABLED_KEY {
                state.enabled = v == [1];
            } else if k == REVISION_KEY {
                match <[u8; 8]>::try_from(v) {
                    Ok(b) => state.revision = u64::from_be_bytes(b),
                    Err(_) => bad = Some("auth revision record is not 8 bytes".to_owned()),
                }
            } else if let Some(name) = k.strip_prefix(USER_PREFIX) {
                match User::decode(v) {
                    Ok(u) => {
                        state.users.insert(String::from_utf8_lossy(name).into_owned(), u);
                    }
                    Err(e) => bad = Some(format!("user record: {e}")),
                }
            } else if let Some(name) = k.strip_prefix(ROLE_PREFIX) {
                match Role::decode(v) {
                    Ok(r) => {
                        state.roles.insert(String::from_utf8_lossy(name).into_owned(), r);
                    }
                    Err(e) => bad = Some(format!("role record: {e}")),
                }
            }
            Scan::Continue
        })?;
        if let Some(reason) = bad {
            return Err(Error::Storage(reason));
        }
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Issues JWT tokens with `provider` instead of simple tokens.
    pub fn with_jwt(mut self, provider: JwtProvider) -> Self {
        self.jwt = Some(Arc::new(provider));
        self
    }

    /// The JWT provider, with `--auth-token jwt`.
    pub fn jwt(&self) -> Option<&JwtProvider> {
        self.jwt.as_deref()
    }

    /// The member's simple tokens.
    pub fn tokens(&self) -> &SimpleTokens {
        &self.tokens
    }

    /// True when auth is enabled.
    pub fn is_enabled(&self) -> bool {
        self.read().enabled
    }

    /// The auth revision: bumped by every change of users, roles or permissions.
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Bumps the revision and records it; the permission cache is dropped by its revision.
    fn commit_revision(state: &mut State, batch: &mut Batch) {
        state.revision += 1;
        batch.put(Keyspace::Auth, REVISION_KEY.to_vec(), state.revision.to_be_bytes().to_vec());
    }

    fn put_user(batch: &mut Batch, u: &User) {
        let name = String::from_utf8_lossy(&u.name).into_owned();
        batch.put(Keyspace::Auth, user_key(&name), u.encode_to_vec());
    }

    fn put_role(batch: &mut Batch, r: &Role) {
        let name = String::from_utf8_lossy(&r.name).into_owned();
        batch.put(Keyspace::Auth, role_key(&name), r.encode_to_vec());
    }

    /// Enables auth (a no-op when enabled; does not bump the revision, as in etcd).
    ///
    /// # Errors
    /// [`Error::RootUserNotExist`], [`Error::RootRoleNotExist`].
    pub fn enable(&self, batch: &mut Batch) -> Result<(), Error> {
        let mut s = self.write();
        if s.enabled {
            return Ok(());
        }
        let root = s.users.get(ROOT).ok_or(Error::RootUserNotExist)?;
        if !has_root_role(root) {
            return Err(Error::RootRoleNotExist);
        }
        s.enabled = true;
        batch.put(Keyspace::Auth, ENABLED_KEY.to_vec(), vec![1]);
        Ok(())
    }

    /// Disables auth and drops every token (a no-op when disabled).
    pub fn disable(&self, batch: &mut Batch) {
        let mut s = self.write();
        if !s.enabled {
            return;
        }
        s.enabled = false;
        batch.put(Keyspace::Auth, ENABLED_KEY.to_vec(), vec![0]);
        Self::commit_revision(&mut s, batch);
        self.tokens.clear();
    }

    /// Adds a user with a bcrypt `hash` (ignored for a `no_password` user).
    ///
    /// # Errors
    /// [`Error::UserEmpty`], [`Error::UserAlreadyExist`].
    pub fn user_add(
        &self,
        batch: &mut Batch,
        name: &str,
        hash: &[u8],
        no_password: bool,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::UserEmpty);
        }
        let mut s = self.write();
        if s.users.contains_key(name) {
            return Err(Error::UserAlreadyExist);
        }
        let u = User {
            name: name.as_bytes().to_vec(),
            password: if no_password { Vec::new() } else { hash.to_vec() },
            roles: Vec::new(),
            options: Some(UserAddOptions { no_password }),
        };
        Self::put_user(batch, &u);
        s.users.insert(name.to_owned(), u);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// Deletes a user and its tokens.
    ///
    /// # Errors
    /// [`Error::InvalidAuthMgmt`] for `root` while enabled, [`Error::UserNotFound`].
    pub fn user_delete(&self, batch: &mut Batch, name: &str) -> Result<(), Error> {
        let mut s = self.write();
        if s.enabled && name == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        if s.users.remove(name).is_none() {
            return Err(Error::UserNotFound);
        }
        batch.delete(Keyspace::Auth, user_key(name));
        Self::commit_revision(&mut s, batch);
        self.tokens.invalidate_user(name);
        Ok(())
    }

    /// Replaces a user's password hash and drops its tokens.
    ///
    /// # Errors
    /// [`Error::UserNotFound`].
    pub fn user_change_password(
        &self,
        batch: &mut Batch,
        name: &str,
        hash: &[u8],
    ) -> Result<(), Error> {
        let mut s = self.write();
        let u = s.users.get_mut(name).ok_or(Error::UserNotFound)?;
        u.password = hash.to_vec();
        let u = u.clone();
        Self::put_user(batch, &u);
        Self::commit_revision(&mut s, batch);
        self.tokens.invalidate_user(name);
        Ok(())
    }

    /// Grants `role` to `user` (a no-op, without a revision bump, when already held). The
    /// `root` role may be granted before it exists, as in etcd.
    ///
    /// # Errors
    /// [`Error::UserNotFound`], [`Error::RoleNotFound`].
    pub fn user_grant_role(&self, batch: &mut Batch, user: &str, role: &str) -> Result<(), Error> {
        let mut s = self.write();
        if !s.users.contains_key(user) {
            return Err(Error::UserNotFound);
        }
        if role != ROOT && !s.roles.contains_key(role) {
            return Err(Error::RoleNotFound);
        }
        let Some(u) = s.users.get_mut(user) else { return Err(Error::UserNotFound) };
        let Err(at) = u.roles.binary_search_by(|r| r.as_str().cmp(role)) else {
            return Ok(());
        };
        u.roles.insert(at, role.to_owned());
        let u = u.clone();
        Self::put_user(batch, &u);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// Revokes `role` from `user`.
    ///
    /// # Errors
    /// [`Error::InvalidAuthMgmt`] for `root`'s `root` role while enabled,
    /// [`Error::UserNotFound`], [`Error::RoleNotGranted`].
    pub fn user_revoke_role(&self, batch: &mut Batch, user: &str, role: &str) -> Result<(), Error> {
        let mut s = self.write();
        if s.enabled && user == ROOT && role == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        let u = s.users.get_mut(user).ok_or(Error::UserNotFound)?;
        let at = u.roles.iter().position(|r| r == role).ok_or(Error::RoleNotGranted)?;
        u.roles.remove(at);
        let u = u.clone();
        Self::put_user(batch, &u);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// A user's roles, sorted.
    ///
    /// # Errors
    /// [`Error::UserNotFound`].
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, Error> {
        self.read().users.get(name).map(|u| u.roles.clone()).ok_or(Error::UserNotFound)
    }

    /// Every user name, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.read().users.keys().cloned().collect()
    }

    /// Adds a role without permissions.
    ///
    /// # Errors
    /// [`Error::RoleEmpty`], [`Error::RoleAlreadyExist`].
    pub fn role_add(&self, batch: &mut Batch, name: &str) -> Result<(), Error> {
        if name.is_empty() {
            return Err(Error::RoleEmpty);
        }
        let mut s = self.write();
        if s.roles.contains_key(name) {
            return Err(Error::RoleAlreadyExist);
        }
        let r = Role { name: name.as_bytes().to_vec(), key_permission: Vec::new() };
        Self::put_role(batch, &r);
        s.roles.insert(name.to_owned(), r);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// Deletes a role and revokes it from every user holding it.
    ///
    /// # Errors
    /// [`Error::InvalidAuthMgmt`] for `root` while enabled, [`Error::RoleNotFound`].
    pub fn role_delete(&self, batch: &mut Batch, name: &str) -> Result<(), Error> {
        let mut s = self.write();
        if s.enabled && name == ROOT {
            return Err(Error::InvalidAuthMgmt);
        }
        if s.roles.remove(name).is_none() {
            return Err(Error::RoleNotFound);
        }
        batch.delete(Keyspace::Auth, role_key(name));
        for u in s.users.values_mut() {
            if let Some(at) = u.roles.iter().position(|r| r == name) {
                u.roles.remove(at);
                Self::put_user(batch, u);
            }
        }
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// Grants `perm` to a role; a permission on the same key and range end changes its
    /// type. Permissions stay sorted by key.
    ///
    /// # Errors
    /// [`Error::PermissionNotGiven`], [`Error::RoleNotFound`].
    pub fn role_grant_permission(
        &self,
        batch: &mut Batch,
        name: &str,
        perm: Option<Permission>,
    ) -> Result<(), Error> {
        let mut s = self.write();
        let r = s.roles.get_mut(name).ok_or(Error::RoleNotFound)?;
        let perm = perm.ok_or(Error::PermissionNotGiven)?;
        match r
            .key_permission
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(p) => p.perm_type = perm.perm_type,
            None => {
                r.key_permission.push(perm);
                r.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        let r = r.clone();
        Self::put_role(batch, &r);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// Revokes the permission on exactly `key` and `range_end` from a role.
    ///
    /// # Errors
    /// [`Error::RoleNotFound`], [`Error::PermissionNotGranted`].
    pub fn role_revoke_permission(
        &self,
        batch: &mut Batch,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), Error> {
        let mut s = self.write();
        let r = s.roles.get_mut(name).ok_or(Error::RoleNotFound)?;
        let at = r
            .key_permission
            .iter()
            .position(|p| p.key == key && p.range_end == range_end)
            .ok_or(Error::PermissionNotGranted)?;
        r.key_permission.remove(at);
        let r = r.clone();
        Self::put_role(batch, &r);
        Self::commit_revision(&mut s, batch);
        Ok(())
    }

    /// A role's permissions, sorted by key.
    ///
    /// # Errors
    /// [`Error::RoleNotFound`].
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>, Error> {
        self.read().roles.get(name).map(|r| r.key_permission.clone()).ok_or(Error::RoleNotFound)
    }

    /// Every role name, sorted.
    pub fn role_list(&self) -> Vec<String> {
        self.read().roles.keys().cloned().collect()
    }

    /// True when `user` holds `role`.
    pub fn user_has_role(&self, user: &str, role: &str) -> bool {
        self.read().users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// Checks `name`'s password against its hash (slow: bcrypt) and returns the auth
    /// revision it was checked at. An unknown user, a wrong password and a user without
    /// password all give [`Error::AuthFailed`], after the same bcrypt work.
    ///
    /// # Errors
    /// [`Error::NotEnabled`], [`Error::AuthFailed`].
    pub fn check_password(&self, name: &str, password: &str) -> Result<u64, Error> {
        let (hash, revision) = {
            let s = self.read();
            if !s.enabled {
                return Err(Error::NotEnabled);
            }
            match s.users.get(name) {
                Some(u) if !no_password(u) => (Some(u.password.clone()), s.revision),
                _ => (None, s.revision),
            }
        };
        let Some(hash) = hash else {
            let _ = bcrypt::verify(password, dummy_hash());
            return Err(Error::AuthFailed);
        };
        let hash = String::from_utf8_lossy(&hash);
        match bcrypt::verify(password, &hash) {
            Ok(true) => Ok(revision),
            _ => Err(Error::AuthFailed),
        }
    }

    /// Checks, when applying an `Authenticate`, that `name` may still hold a token.
    ///
    /// # Errors
    /// [`Error::NotEnabled`], [`Error::AuthFailed`].
    pub fn check_authenticate(&self, name: &str) -> Result<(), Error> {
        let s = self.read();
        if !s.enabled {
            return Err(Error::NotEnabled);
        }
        match s.users.get(name) {
            Some(u) if !no_password(u) => Ok(()),
            _ => Err(Error::AuthFailed),
        }
    }

    /// Refuses `info` unless auth is disabled or it names a user with the `root` role
    /// (etcd's IsAdminPermitted; the revision is not checked).
    ///
    /// # Errors
    /// [`Error::UserEmpty`], [`Error::UserNotFound`], [`Error::PermissionDenied`].
    pub fn is_admin_permitted(&self, info: &AuthInfo) -> Result<(), Error> {
        let s = self.read();
        if !s.enabled {
            return Ok(());
        }
        if info.username.is_empty() {
            return Err(Error::UserEmpty);
        }
        let u = s.users.get(&info.username).ok_or(Error::UserNotFound)?;
        if has_root_role(u) { Ok(()) } else { Err(Error::PermissionDenied) }
    }

    /// Refuses `info` unless auth is disabled or the user may `access` `[key, range_end)`
    /// (etcd's isOpPermitted: the `root` role may do everything).
    ///
    /// # Errors
    /// [`Error::UserEmpty`] without a user, [`Error::OldRevision`] when `info` was
    /// resolved against an older store, [`Error::PermissionDenied`].
    pub fn is_permitted(
        &self,
        info: &AuthInfo,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), Error> {
        let perms = {
            let s = self.read();
            if !s.enabled {
                return Ok(());
            }
            if info.revision == 0 {
                return Err(Error::UserEmpty);
            }
            if info.revision < s.revision {
                return Err(Error::OldRevision);
            }
            let Some(u) = s.users.get(&info.username) else {
                return Err(Error::PermissionDenied);
            };
            if has_root_role(u) {
                return Ok(());
            }
            self.user_perms(&s, u)
        };
        if perms.permits(access, key, range_end) { Ok(()) } else { Err(Error::PermissionDenied) }
    }

    /// The merged permissions of `u`, cached until the next revision.
    fn user_perms(&self, s: &State, u: &User) -> Arc<UserPerms> {
        let name = String::from_utf8_lossy(&u.name).into_owned();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.0 != s.revision {
            *cache = (s.revision, HashMap::new());
        }
        cache
            .1
            .entry(name)
            .or_insert_with(|| {
                let perms = u
                    .roles
                    .iter()
                    .filter_map(|r| s.roles.get(r))
                    .flat_map(|r| r.key_permission.iter());
                Arc::new(UserPerms::new(perms))
            })
            .clone()
    }

    /// The user `token` names and the current revision, waiting for nothing: the caller
    /// first makes sure the token's index is applied.
    ///
    /// # Errors
    /// [`Error::InvalidToken`].
    pub fn info_from_token(&self, token: &str) -> Result<AuthInfo, Error> {
        let username = self.tokens.user(token).ok_or(Error::InvalidToken)?;
        Ok(AuthInfo { username, revision: self.revision() })
    }

    /// The caller named by a verified client certificate's CN, at the current revision.
    pub fn info_from_cert(&self, common_name: &str) -> AuthInfo {
        AuthInfo { username: common_name.to_owned(), revision: self.revision() }
    }
}

/// The storage record of a user from etcd's `authUsers` bucket (an `authpb.User`, the bytes
/// Cairn keeps too), for restoring an etcd snapshot.
pub fn etcd_user_record(name: &[u8], user: &[u8]) -> (Vec<u8>, Vec<u8>) {
    ([USER_PREFIX, name].concat(), user.to_vec())
}

/// The storage record of a role from etcd's `authRoles` bucket (an `authpb.Role`).
pub fn etcd_role_record(name: &[u8], role: &[u8]) -> (Vec<u8>, Vec<u8>) {
    ([ROLE_PREFIX, name].concat(), role.to_vec())
}

/// The storage record of an entry of etcd's `auth` bucket (`authEnabled`, one byte;
/// `authRevision`, 8 bytes big-endian), `None` for any other key.
pub fn etcd_auth_record(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    match key {
        b"authEnabled" => Some((ENABLED_KEY.to_vec(), vec![u8::from(value == [1])])),
        b"authRevision" if value.len() == 8 => Some((REVISION_KEY.to_vec(), value.to_vec())),
        _ => None,
    }
}

/// Hashes `password` with bcrypt at `cost` (slow; run it off the async workers).
///
/// # Errors
/// An out-of-range cost or a failed random source.
pub fn hash_password(password: &str, cost: u32) -> Result<Vec<u8>, Error> {
    bcrypt::hash(password, cost)
        .map(String::into_bytes)
        .map_err(|e| Error::Storage(format!("bcrypt: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemEngine;
    use cairn_proto::authpb::permission::Type;

    fn store() -> (AuthStore, MemEngine) {
        let e = MemEngine::new();
        (AuthStore::load(&e, std::time::Duration::from_secs(300)).unwrap(), e)
    }

    fn apply(e: &MemEngine, f: impl FnOnce(&mut Batch) -> Result<(), Error>) -> Result<(), Error> {
        let mut b = Batch::new();
        let r = f(&mut b);
        e.write(b).unwrap();
        r
    }

    #[test]
    fn enabling_needs_root_with_the_root_role_and_root_is_then_protected() {
        let (a, e) = store();
        assert_eq!(a.revision(), 1);
        assert_eq!(apply(&e, |b| a.enable(b)), Err(Error::RootUserNotExist));
        apply(&e, |b| a.user_add(b, ROOT, b"h", false)).unwrap();
        assert_eq!(apply(&e, |b| a.enable(b)), Err(Error::RootRoleNotExist));
        apply(&e, |b| a.user_grant_role(b, ROOT, ROOT)).unwrap();
        apply(&e, |b| a.user_grant_role(b, ROOT, ROOT)).unwrap();
        assert_eq!(a.revision(), 3, "a repeated grant changes nothing");
        apply(&e, |b| a.enable(b)).unwrap();
        assert_eq!(a.revision(), 3, "enabling does not bump the revision");
        assert_eq!(apply(&e, |b| a.user_delete(b, ROOT)), Err(Error::InvalidAuthMgmt));
        assert_eq!(apply(&e, |b| a.user_revoke_role(b, ROOT, ROOT)), Err(Error::InvalidAuthMgmt));
        assert_eq!(apply(&e, |b| a.role_delete(b, ROOT)), Err(Error::InvalidAuthMgmt));
        apply(&e, |b| {
            a.disable(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(a.revision(), 4);
        let reloaded = AuthStore::load(&e, std::time::Duration::from_secs(1)).unwrap();
        assert_eq!((reloaded.is_enabled(), reloaded.revision()), (false, 4));
        assert_eq!(reloaded.user_get(ROOT).unwrap(), [ROOT]);
    }

    #[test]
    fn permissions_follow_roles_and_an_old_revision_is_refused() {
        let (a, e) = store();
        apply(&e, |b| a.user_add(b, ROOT, b"h", false)).unwrap();
        apply(&e, |b| a.user_grant_role(b, ROOT, ROOT)).unwrap();
        apply(&e, |b| a.user_add(b, "u", b"h", false)).unwrap();
        apply(&e, |b| a.role_add(b, "r")).unwrap();
        let p = Permission { perm_type: Type::Read as i32, key: b"k".to_vec(), range_end: vec![] };
        apply(&e, |b| a.role_grant_permission(b, "r", Some(p))).unwrap();
        apply(&e, |b| a.user_grant_role(b, "u", "r")).unwrap();
        apply(&e, |b| a.enable(b)).unwrap();
        let info = AuthInfo { username: "u".into(), revision: a.revision() };
        assert_eq!(a.is_permitted(&info, Access::Read, b"k", b""), Ok(()));
        assert_eq!(a.is_permitted(&info, Access::Write, b"k", b""), Err(Error::PermissionDenied));
        assert_eq!(
            a.is_permitted(&AuthInfo::default(), Access::Read, b"k", b""),
            Err(Error::UserEmpty)
        );
        apply(&e, |b| a.role_delete(b, "r")).unwrap();
        assert_eq!(a.is_permitted(&info, Access::Read, b"k", b""), Err(Error::OldRevision));
        let fresh = AuthInfo { revision: a.revision(), ..info };
        assert_eq!(a.is_permitted(&fresh, Access::Read, b"k", b""), Err(Error::PermissionDenied));
        assert!(a.user_get("u").unwrap().is_empty(), "deleting a role revokes it");
        let root = AuthInfo { username: ROOT.into(), revision: a.revision() };
        assert_eq!(a.is_admin_permitted(&root), Ok(()));
        assert_eq!(a.is_admin_permitted(&fresh), Err(Error::PermissionDenied));
    }

    #[test]
    fn wrong_passwords_unknown_users_and_passwordless_users_fail_alike() {
        let (a, e) = store();
        let hash = hash_password("pw", 4).unwrap();
        apply(&e, |b| a.user_add(b, ROOT, &hash, false)).unwrap();
        apply(&e, |b| a.user_add(b, "np", b"", true)).unwrap();
        apply(&e, |b| a.user_grant_role(b, ROOT, ROOT)).unwrap();
        assert_eq!(a.check_password(ROOT, "pw"), Err(Error::NotEnabled));
        apply(&e, |b| a.enable(b)).unwrap();
        assert_eq!(a.check_password(ROOT, "pw"), Ok(a.revision()));
        assert_eq!(a.check_password(ROOT, "bad"), Err(Error::AuthFailed));
        assert_eq!(a.check_password("nobody", "pw"), Err(Error::AuthFailed));
        assert_eq!(a.check_password("np", ""), Err(Error::AuthFailed));
    }
}
