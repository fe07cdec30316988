//! The member's fatal-failure latch: the first unrecoverable error of the raft task or the
//! apply task (a raft log write or fdatasync that failed, a full disk, a state-machine write
//! or checkpoint that failed, a raft log that lost acknowledged entries).
//!
//! # Why a failed member stays up instead of exiting
//!
//! Once the latch is set, the raft task stops (no more votes, appends or acknowledgements)
//! and apply stops applying. The process itself keeps running in a clearly failed state:
//! every client request is refused, and `/health`, `/livez` and `/readyz` fail with the
//! reason, and the metric `cairn_server_fatal_error{cause}` is 1. An orchestrator (the
//! Kubernetes liveness probe) restarts it; a restart replays the raft log from what the
//! disk really holds, and rejoins. Exiting at once would say nothing on the endpoints
//! operators and Kubernetes read, and a crash loop on a full disk would hide the reason in
//! old logs. `kill -9` stays safe at every moment: nothing acknowledged depends on this
//! process staying up.
//!
//! # Why never retry
//!
//! After a failed `fdatasync` the kernel may have dropped the dirty pages and marked them
//! clean, so a retried sync can report success for data that never reached the disk
//! (PostgreSQL's "fsyncgate", 2018). The only honest answer is to stop and let the next
//! start replay the log the disk durably holds; the latch is therefore set once and never
//! cleared.

use std::io;
use std::sync::{Arc, OnceLock};

/// The cause of a fatal failure, for the metric's `cause` label (few, fixed values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The disk is full (`ENOSPC`, or `EDQUOT`).
    DiskFull,
    /// Any other I/O error from the disk (`EIO` from a failed fdatasync, for one).
    DiskIo,
    /// The raft log lost entries this member had acknowledged (wiped or old data dir).
    LogLost,
    /// Anything else (a state-machine error that is not an I/O error).
    Other,
}

impl Cause {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::DiskFull => "disk_full",
            Cause::DiskIo => "disk_io",
            Cause::LogLost => "raft_log_lost",
            Cause::Other => "other",
        }
    }

    /// Classifies `error` by the first [`io::Error`] in its source chain; the message is
    /// the fallback for layers that keep only the text of the I/O error.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Cause {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Cause::of_io(io);
            }
            next = e.source();
        }
        let text = error.to_string();
        if names_full_disk(&text) {
            Cause::DiskFull
        } else if text.contains("os error") {
            Cause::DiskIo
        } else {
            Cause::Other
        }
    }

    fn of_io(io: &io::Error) -> Cause {
        match io.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Cause::DiskFull,
            // Some layers rewrap the OS error as text (`io::Error::other`).
            _ if names_full_disk(&io.to_string()) => Cause::DiskFull,
            _ => Cause::DiskIo,
        }
    }
}

/// True when an error text is the OS's message for a full disk or an exceeded quota.
fn names_full_disk(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("Disk quota exceeded")
}

/// The first fatal failure: what it was and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The cause class.
    pub cause: Cause,
    /// The error as logged, with the failing path when the layer reported one.
    pub message: String,
}

/// A cheap-clone, set-once latch shared by the raft and apply tasks and read by health
/// checks, metrics and the request paths; long-lived streams wait on [`Fatal::failed`].
#[derive(Debug, Clone)]
pub struct Fatal(Arc<Latch>);

#[derive(Debug)]
struct Latch {
    failure: OnceLock<Failure>,
    /// Becomes true when `failure` is set.
    failed: tokio::sync::watch::Sender<bool>,
}

impl Default for Fatal {
    fn default() -> Self {
        Fatal(Arc::new(Latch {
            failure: OnceLock::new(),
            failed: tokio::sync::watch::Sender::new(false),
        }))
    }
}

impl Fatal {
    /// Records `failure` unless an earlier one is recorded (the first cause is the real
    /// one: the others follow from it), logs it and sets the metric; returns true when this
    /// call recorded it.
    pub fn set(&self, cause: Cause, message: String) -> bool {
        let recorded = self.0.failure.set(Failure { cause, message }).is_ok();
        if let Some(f) = self.0.failure.get().filter(|_| recorded) {
            tracing::error!(
                cause = f.cause.as_str(),
                error = %f.message,
                "member failed: it refuses every request until restarted (a restart replays the durable raft log)"
            );
            if let Some(m) = crate::metrics::get() {
                m.cairn.fatal_error.with_label_values(&[f.cause.as_str()]).set(1);
            }
            self.0.failed.send_replace(true);
        }
        recorded
    }

    /// Records `error`, classified by [`Cause::of`].
    pub fn set_error(&self, context: &str, error: &(dyn std::error::Error + 'static)) -> bool {
        self.set(Cause::of(error), format!("{context}: {error}"))
    }

    /// The recorded failure, if any.
    pub fn get(&self) -> Option<&Failure> {
        self.0.failure.get()
    }

    /// True once a failure is recorded.
    pub fn is_set(&self) -> bool {
        self.0.failure.get().is_some()
    }

    /// Completes once a failure is recorded (at once when one is); streams that outlive a
    /// request (Watch, LeaseKeepAlive) end on it, so their clients move to another member.
    pub fn failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.failed.subscribe();
        async move {
            // The sender lives as long as any clone of the latch; when the last one is gone
            // the member is gone too, and nothing will fail any more.
            if rx.wait_for(|failed| *failed).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("raft log: {0}")]
    struct Wrapper(#[source] io::Error);

    #[test]
    fn causes_come_from_the_io_error_in_the_source_chain() {
        let full = Wrapper(io::Error::from_raw_os_error(28));
        assert_eq!(Cause::of(&full), Cause::DiskFull);
        let eio = Wrapper(io::Error::from_raw_os_error(5));
        assert_eq!(Cause::of(&eio), Cause::DiskIo);
        let text = io::Error::other("write: No space left on device (os error 28)");
        assert_eq!(Cause::of(&text), Cause::DiskFull);
        let fmt = std::fmt::Error;
        assert_eq!(Cause::of(&fmt), Cause::Other);
    }

    #[test]
    fn the_first_failure_wins_and_is_never_cleared() {
        let fatal = Fatal::default();
        assert!(!fatal.is_set());
        assert!(fatal.set(Cause::DiskIo, "fdatasync: Input/output error".into()));
        assert!(!fatal.clone().set(Cause::Other, "apply channel closed".into()));
        assert_eq!(fatal.get().map(|f| f.cause), Some(Cause::DiskIo));
        assert!(fatal.get().is_some_and(|f| f.message.contains("fdatasync")));
    }

    #[tokio::test]
    async fn waiters_wake_on_the_failure_and_later_ones_complete_at_once() {
        let fatal = Fatal::default();
        let waiter = tokio::spawn(fatal.failed());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        fatal.set(Cause::DiskFull, "wal: No space left on device".into());
        waiter.await.unwrap();
        fatal.failed().await;
    }
}
