//! The Cluster controller: its shared [`Context`], [`run`] (the kube-runtime Controller with
//! the objects it owns and watches) and [`error_policy`] (requeue delay by error kind).
//!
//! - `reconcile`: one pass, observe → decide → act → status;
//! - `resources`: pure builders of the owned objects;
//! - `membership`: the pure one-step membership decision;
//! - `compaction`: the pure scheduled-compaction decision;
//! - `defrag`: the pure defragmentation order (followers first, the leader last);
//! - `backup`: the backup Job builders and the schedule/retention decisions;
//! - `backup_run`: the `Backup` reconciler (Job, report, file cleanup);
//! - `restore`: the seed's restore init container (`spec.bootstrap.fromBackup`);
//! - `upgrade`: the version check and the order of a rolling upgrade;
//! - `status`: conditions and phase;
//! - `tls`: the Secrets `spec.tls` names, and the operator's client TLS from them.

pub mod backup;
pub mod backup_run;
pub mod compaction;
pub mod defrag;
pub mod membership;
pub mod reconcile;
pub mod resources;
pub mod restore;
pub mod status;
pub mod tls;
pub mod upgrade;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::crd::{Backup, Cluster};
use crate::metrics::Metrics;
use crate::{Error, FIELD_MANAGER};

/// Tunables of the reconciler (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image repository for `spec.version`.
    pub default_repository: String,
    /// How long a started member may be unreachable with its pod missing or unready before
    /// it is replaced.
    pub failure_window: Duration,
    /// Raft entries a learner may trail the leader by and still be promoted.
    pub promote_lag: u64,
    /// How long one membership step may take before `DeadlineExceeded`.
    pub step_deadline: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_repository: crate::crd::DEFAULT_IMAGE_REPOSITORY.to_owned(),
            failure_window: Duration::from_secs(300),
            promote_lag: 1000,
            step_deadline: Duration::from_secs(300),
        }
    }
}

/// What every reconcile pass shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Events on Clusters.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Metrics,
    /// Tunables.
    pub settings: Settings,
}

impl Context {
    /// A context for `client`; `instance` names this replica in Events.
    pub fn new(client: Client, metrics: Metrics, settings: Settings, instance: String) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.to_owned(), instance: Some(instance) };
        Self { recorder: Recorder::new(client.clone(), reporter), client, metrics, settings }
    }
}

/// An RFC 3339 time as status fields hold it.
pub(crate) fn parse_time(s: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    s.parse().ok()
}

/// When an object was created.
pub(crate) fn created(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<k8s_openapi::jiff::Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

/// Requeue delay after a failed pass: short for transient store errors, longer for API
/// errors, long for a spec the user must fix (a spec edit triggers a pass anyway).
pub fn error_policy(c: Arc<Cluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(cluster = %c.name_any(), namespace = ?c.namespace(), %error, "reconcile failed");
    Action::requeue(match error {
        Error::Etcd(_) => Duration::from_secs(3),
        Error::Kube(_) | Error::Serialization(_) => Duration::from_secs(10),
        Error::InvalidSpec(_) | Error::MissingObjectKey(_) | Error::CrdNotInstalled(_) => {
            Duration::from_secs(60)
        }
    })
}

/// The Cluster a store pod belongs to (from its instance label).
fn cluster_of_pod(pod: Pod) -> Option<ObjectRef<Cluster>> {
    let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
    Some(ObjectRef::new(&instance).within(&pod.namespace()?))
}

/// The Cluster a Backup belongs to (a finished backup updates the Cluster's status).
fn cluster_of_backup(b: Backup) -> Option<ObjectRef<Cluster>> {
    Some(ObjectRef::new(&b.spec.cluster_name).within(&b.namespace()?))
}

/// Runs the controller until `shutdown` resolves, then drains in-flight passes.
///
/// # Errors
/// Fails when the Cluster CRD is not installed (checked first, with a message saying so).
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let client = ctx.client.clone();
    let clusters = Api::<Cluster>::all(client.clone());
    clusters
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotInstalled)?;
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=cairn-operator");
    let pods = watcher::Config::default().labels("app.kubernetes.io/name=cairn");
    let shutdown = shutdown.shared();
    let backups = Controller::new(Api::<Backup>::all(client.clone()), watcher::Config::default())
        .owns(Api::<Job>::all(client.clone()), owned.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(backup_run::reconcile, backup_run::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "backup controller event");
            }
        });
    let clusters = Controller::new(clusters, watcher::Config::default())
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned)
        .watches(Api::<Pod>::all(client.clone()), pods, cluster_of_pod)
        .watches(Api::<Backup>::all(client), watcher::Config::default(), cluster_of_backup)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    futures::future::join(clusters, backups).await;
    Ok(())
}
