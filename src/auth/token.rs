//! Simple tokens (etcd's `--auth-token simple`, server/auth/simple_token.go).
//!
//! A token is 16 random letters chosen by the member that checked the password, then `.`
//! and the raft index of the `Authenticate` entry that assigned it. The entry is applied on
//! every member, so each member holds every token and a token works on any member: a
//! member asked with a token whose index it has not applied yet waits for it first.
//!
//! The token table is member-local and is not part of the replicated state: each member
//! counts a token's TTL (`--auth-token-ttl`, renewed on every use, as etcd's TTL keeper
//! does) on its own clock. This is the one clock reading on the apply path, and it decides
//! nothing apply writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The token table of one member.
#[derive(Debug, Clone)]
pub struct SimpleTokens {
    ttl: Duration,
    table: Arc<Mutex<HashMap<String, Entry>>>,
}

#[derive(Debug)]
struct Entry {
    user: String,
    deadline: Instant,
}

impl SimpleTokens {
    /// Creates an empty table whose tokens live `ttl` past their last use.
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, table: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Assigns `token` to `user` (applied `Authenticate`).
    pub fn assign(&self, token: String, user: &str) {
        let now = Instant::now();
        let mut table = self.lock();
        // Expired tokens are dropped here, so the table stays bounded by the live ones.
        if table.len() >= 1024 {
            table.retain(|_, e| e.deadline > now);
        }
        table.insert(token, Entry { user: user.to_owned(), deadline: now + self.ttl });
    }

    /// The user `token` was assigned to, renewing its TTL; `None` when unknown or expired.
    pub fn user(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut table = self.lock();
        match table.get_mut(token) {
            Some(e) if e.deadline > now => {
                e.deadline = now + self.ttl;
                Some(e.user.clone())
            }
            Some(_) => {
                table.remove(token);
                None
            }
            None => None,
        }
    }

    /// Drops every token of `user` (deleted, or its password changed).
    pub fn invalidate_user(&self, user: &str) {
        self.lock().retain(|_, e| e.user != user);
    }

    /// Drops every token (auth disabled).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// The raft index a simple token was assigned at, `None` when `token` is not one.
pub fn token_index(token: &str) -> Option<u64> {
    let (prefix, index) = token.split_once('.')?;
    if prefix.is_empty() || index.contains('.') {
        return None;
    }
    index.parse().ok()
}

/// 16 random ASCII letters: the member-chosen part of a simple token.
///
/// # Errors
/// The OS random source failed.
pub fn new_prefix() -> Result<String, getrandom::Error> {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(LETTERS.get(usize::from(*b) % LETTERS.len()).copied().unwrap_or(b'a')))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_unless_used_and_go_with_their_user() {
        let t = SimpleTokens::new(Duration::from_millis(50));
        t.assign("abc.5".into(), "alice");
        t.assign("def.6".into(), "bob");
        assert_eq!(t.user("abc.5").as_deref(), Some("alice"));
        t.invalidate_user("bob");
        assert_eq!(t.user("def.6"), None);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.user("abc.5"), None);
    }

    #[test]
    fn a_token_names_its_index() {
        assert_eq!(token_index("QyiUoglznBVVjhtU.120"), Some(120));
        assert_eq!(token_index("nodot"), None);
        assert_eq!(token_index("a.b"), None);
        assert_eq!(token_index("a.1.2"), None);
        let p = new_prefix().unwrap();
        assert_eq!(p.len(), 16);
        assert!(p.chars().all(|c| c.is_ascii_alphabetic()));
    }
}
