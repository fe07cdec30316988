//! The `Backup` reconciler: finalizer first, then the save Job (create-then-record: the Job
//! exists before status says Running), then the Job's report into status; on deletion,
//! the cleanup Job deletes the file before the finalizer is released.
//!
//! It decides nothing about schedules or retention (the Cluster's pass does); it runs one
//! Backup to its end.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;
use super::backup::{self, FINALIZER};
use crate::crd::{Backup, BackupDestination, BackupPhase, BackupStatus, Cluster};
use crate::{Error, FIELD_MANAGER, Result};

/// Requeue while a Job runs.
const POLL: Duration = Duration::from_secs(2);

/// One pass over a Backup.
///
/// # Errors
/// A failed API call; `error_policy` requeues.
pub async fn reconcile(b: Arc<Backup>, ctx: Arc<Context>) -> Result<Action> {
    let ns = b.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let run = Run { b: &b, ctx: &ctx, ns: &ns };
    run.pass().await
}

/// Requeue after a failed pass.
pub fn error_policy(b: Arc<Backup>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(backup = %b.name_any(), %error, "backup reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Creates a Job; one that exists already (a pass repeated after a crash) is fine.
async fn create_job(jobs: &Api<Job>, job: &Job) -> Result<()> {
    match jobs.create(&PostParams::default(), job).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

struct Run<'a> {
    b: &'a Backup,
    ctx: &'a Context,
    ns: &'a str,
}

/// Where a Backup goes: its own destination, else its Cluster's.
fn destination(b: &Backup, cluster: Option<&Cluster>) -> Option<BackupDestination> {
    b.spec
        .destination
        .clone()
        .or_else(|| cluster?.spec.backup.as_ref().map(|s| s.destination.clone()))
}

impl Run<'_> {
    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), self.ns)
    }

    async fn pass(&self) -> Result<Action> {
        let name = self.b.name_any();
        let cluster = self.api::<Cluster>().get_opt(&self.b.spec.cluster_name).await?;
        let dest = match destination(self.b, cluster.as_ref()) {
            Some(d) if d.pvc.is_some() || d.s3.is_some() => Ok(d),
            _ => Err(format!(
                "no destination: set spec.destination or spec.backup.destination of Cluster {}",
                self.b.spec.cluster_name
            )),
        };
        if self.b.meta().deletion_timestamp.is_some() {
            return self.finalize(cluster.as_ref(), dest.ok().as_ref()).await;
        }
        let status = self.b.status.clone().unwrap_or_default();
        if matches!(status.phase, Some(BackupPhase::Succeeded | BackupPhase::Failed)) {
            return Ok(Action::await_change());
        }
        let Some(cluster) = cluster else {
            return self
                .fail(format!("Cluster {} not found in {}", self.b.spec.cluster_name, self.ns))
                .await;
        };
        let dest = match dest {
            Ok(d) => d,
            Err(e) => return self.fail(e).await,
        };
        if !self.b.finalizers().iter().any(|f| f == FINALIZER) {
            // Before any file exists, so deleting the Backup always cleans it up.
            let patch = serde_json::json!({"metadata": {"finalizers": [FINALIZER]}});
            self.api::<Backup>()
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        let jobs = self.api::<Job>();
        let job_name = backup::save_job_name(&name);
        let Some(job) = jobs.get_opt(&job_name).await? else {
            if status.phase == Some(BackupPhase::Running) {
                return self.fail(format!("the backup Job {job_name} was deleted")).await;
            }
            let endpoints: Vec<String> = cluster
                .status
                .as_ref()
                .map(|s| {
                    s.members
                        .iter()
                        .filter(|m| m.healthy && !m.learner)
                        .filter_map(|m| m.client_url.clone())
                        .collect()
                })
                .unwrap_or_default();
            if endpoints.is_empty() {
                self.write(BackupStatus {
                    phase: Some(BackupPhase::Pending),
                    reason: Some(format!(
                        "waiting for a healthy voter of Cluster {}",
                        self.b.spec.cluster_name
                    )),
                    ..status
                })
                .await?;
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            let job = backup::save_job(
                self.b,
                &cluster,
                &dest,
                &endpoints,
                &self.ctx.settings.default_repository,
            )?;
            create_job(&jobs, &job).await?;
            self.write(BackupStatus {
                phase: Some(BackupPhase::Running),
                start_time: Some(Timestamp::now().to_string()),
                reason: None,
                ..status
            })
            .await?;
            return Ok(Action::requeue(POLL));
        };
        let js = job.status.clone().unwrap_or_default();
        let conditions = js.conditions.unwrap_or_default();
        let complete = conditions.iter().any(|c| c.type_ == "Complete" && c.status == "True");
        let failed = conditions.iter().find(|c| c.type_ == "Failed" && c.status == "True");
        if !complete && failed.is_none() {
            if status.phase != Some(BackupPhase::Running) {
                self.write(BackupStatus {
                    phase: Some(BackupPhase::Running),
                    start_time: status.start_time.clone().or(Some(Timestamp::now().to_string())),
                    ..status
                })
                .await?;
            }
            return Ok(Action::requeue(POLL));
        }
        let message = self.termination_message(&job_name).await?;
        if complete {
            match backup::parse_report(&message) {
                Ok(r) => {
                    let done = Timestamp::now().to_string();
                    self.write(BackupStatus {
                        phase: Some(BackupPhase::Succeeded),
                        location: Some(r.location.clone()),
                        size: Some(r.size),
                        revision: Some(r.snapshot.revision),
                        checksum: Some(r.checksum.clone()),
                        start_time: status.start_time.clone(),
                        completion_time: Some(done),
                        reason: None,
                    })
                    .await?;
                    self.event(
                        &cluster,
                        EventType::Normal,
                        "BackupSucceeded",
                        format!(
                            "backup {name}: revision {}, {} bytes, {} at {}",
                            r.snapshot.revision, r.size, r.checksum, r.location
                        ),
                    )
                    .await;
                    Ok(Action::await_change())
                }
                Err(e) => self.fail(e).await,
            }
        } else {
            let why = match backup::parse_report(&message) {
                Err(e) if !message.trim().is_empty() => e,
                _ => failed
                    .and_then(|c| c.message.clone())
                    .unwrap_or_else(|| "the backup Job failed".to_owned()),
            };
            self.fail(why).await
        }
    }

    /// The termination message of the Job's (newest) pod's container.
    async fn termination_message(&self, job: &str) -> Result<String> {
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await?;
        Ok(pods
            .items
            .iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .and_then(|p| p.status.as_ref()?.container_statuses.as_ref()?.first().cloned())
            .and_then(|c| c.state?.terminated?.message)
            .unwrap_or_default())
    }

    async fn fail(&self, reason: String) -> Result<Action> {
        let status = self.b.status.clone().unwrap_or_default();
        self.write(BackupStatus {
            phase: Some(BackupPhase::Failed),
            completion_time: Some(Timestamp::now().to_string()),
            reason: Some(reason.clone()),
            ..status
        })
        .await?;
        let cluster = self.api::<Cluster>().get_opt(&self.b.spec.cluster_name).await.ok().flatten();
        if let Some(c) = cluster {
            self.event(
                &c,
                EventType::Warning,
                "BackupFailed",
                format!("backup {}: {reason}", self.b.name_any()),
            )
            .await;
        }
        Ok(Action::await_change())
    }

    /// Deletes the file or object (a cleanup Job), then releases the finalizer. Without a
    /// destination or a Cluster to take the image from, the file cannot be reached: the
    /// finalizer goes with a Warning.
    async fn finalize(
        &self,
        cluster: Option<&Cluster>,
        dest: Option<&BackupDestination>,
    ) -> Result<Action> {
        let name = self.b.name_any();
        if !self.b.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let wrote = self.b.status.as_ref().is_some_and(|s| s.phase.is_some());
        if let (Some(cluster), Some(dest), true) = (cluster, dest, wrote) {
            let jobs = self.api::<Job>();
            let job_name = backup::delete_job_name(&name);
            match jobs.get_opt(&job_name).await? {
                None => {
                    let job = backup::delete_job(
                        self.b,
                        cluster,
                        dest,
                        &self.ctx.settings.default_repository,
                    )?;
                    create_job(&jobs, &job).await?;
                    return Ok(Action::requeue(POLL));
                }
                Some(j) => {
                    let conditions = j.status.and_then(|s| s.conditions).unwrap_or_default();
                    let done =
                        |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
                    if done("Failed") {
                        self.event(
                            cluster,
                            EventType::Warning,
                            "BackupFileNotDeleted",
                            format!(
                                "backup {name}: the cleanup Job failed; its file may remain at {}",
                                self.b
                                    .status
                                    .as_ref()
                                    .and_then(|s| s.location.clone())
                                    .unwrap_or_else(|| "its destination".into())
                            ),
                        )
                        .await;
                    } else if !done("Complete") {
                        return Ok(Action::requeue(POLL));
                    }
                }
            }
        }
        let rest: Vec<String> =
            self.b.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
        let patch = serde_json::json!({"metadata": {"finalizers": rest, "resourceVersion": self.b.resource_version()}});
        match self
            .api::<Backup>()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Action::await_change())
    }

    async fn write(&self, s: BackupStatus) -> Result<()> {
        let patch = serde_json::json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": "Backup",
            "status": s,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<Backup>().patch_status(&self.b.name_any(), &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }

    /// An Event on the Backup and on its Cluster.
    async fn event(&self, cluster: &Cluster, type_: EventType, reason: &str, note: String) {
        tracing::info!(backup = %self.b.name_any(), namespace = %self.ns, reason, %note, "event");
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        for r in [self.b.object_ref(&()), cluster.object_ref(&())] {
            if let Err(e) = self.ctx.recorder.publish(&ev, &r).await {
                tracing::warn!(error = %e, reason, "publishing an event failed");
            }
        }
    }
}
