//! Leader election over a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! reconcile at once (kube 5 ships no elector).
//!
//! The holder renews `spec.renewTime` every `renew` period; another candidate takes the
//! Lease only once `renewTime + leaseDurationSeconds` has passed. Every write carries the
//! Lease's `resourceVersion`, so two candidates racing for an expired Lease cannot both win:
//! the API server rejects the second write with a conflict (optimistic concurrency).
//! A leader that fails to renew before its own lease runs out steps down before anyone
//! else may take over (it stops at `duration - renew` without a successful renewal).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Elector settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Lease name.
    pub name: String,
    /// This candidate's identity (pod name or hostname plus pid).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews and candidates retry.
    pub renew: Duration,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds the Lease (newly or renewed).
    Leading,
    /// Someone else holds an unexpired Lease.
    Following(String),
}

/// Campaigns for and keeps a Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    cfg: Config,
}

impl Elector {
    /// An elector over Leases in `api`'s namespace.
    pub fn new(api: Api<Lease>, cfg: Config) -> Self {
        Self { api, cfg }
    }

    /// One acquire-or-renew attempt.
    ///
    /// # Errors
    /// Fails on API errors, including a conflict when another candidate wrote first.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            self.api.create(&PostParams::default(), &lease).await?;
            return Ok(Attempt::Leading);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.cfg.identity;
        if !mine && !holder.is_empty() && !expired(spec, now) {
            return Ok(Attempt::Following(holder));
        }
        if !mine {
            spec.holder_identity = Some(self.cfg.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(now));
        // replace() sends metadata.resourceVersion: a concurrent writer makes this fail.
        self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await?;
        Ok(Attempt::Leading)
    }

    /// Gives the Lease up if this candidate holds it, so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self.api.replace(&self.cfg.name, &PostParams::default(), &lease).await {
            tracing::warn!(error = %e, "releasing the leader lease failed");
        }
    }

    /// Campaigns until `stop` fires, publishing `true` while this candidate leads.
    ///
    /// A leader that cannot renew within `duration - renew` publishes `false` before its
    /// Lease can expire, so there is never a moment with two leaders acting.
    pub async fn run(self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        let grace = self.cfg.duration.saturating_sub(self.cfg.renew);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "became leader");
                    }
                    last_renewal = Some(tokio::time::Instant::now());
                    leading.send_replace(true);
                }
                Ok(Attempt::Following(holder)) => {
                    if *leading.borrow() {
                        tracing::warn!(%holder, "lost the leader lease");
                    }
                    last_renewal = None;
                    leading.send_replace(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election attempt failed");
                    if last_renewal.is_none_or(|t| t.elapsed() >= grace) && *leading.borrow() {
                        tracing::warn!("could not renew the leader lease in time; stepping down");
                        leading.send_replace(false);
                        last_renewal = None;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.cfg.renew) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        leading.send_replace(false);
        // Best effort: an unreachable API server must not hold up shutdown (the Lease then
        // simply expires).
        if tokio::time::timeout(Duration::from_secs(3), self.release()).await.is_err() {
            tracing::warn!("releasing the leader lease timed out; it will expire instead");
        }
    }
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref() else { return true };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    renewed.0.checked_add(SignedDuration::from_secs(secs)).map_or(true, |until| until < now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some("other".into()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(
                now.checked_sub(SignedDuration::from_secs(renewed_secs_ago)).unwrap(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_expires_only_after_its_duration() {
        let now = Timestamp::now();
        assert!(!expired(&spec(5, 15), now));
        assert!(expired(&spec(16, 15), now));
        assert!(expired(&LeaseSpec::default(), now));
    }
}
