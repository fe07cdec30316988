//! Backups: the Job a `Backup` runs, the report it leaves, and the pure decisions of the
//! schedule (when the next scheduled Backup is due, which ones retention deletes, whether
//! `BackupHealthy` holds).
//!
//! A backup is a Job with the store's image: `cairn snapshot save` straight into the
//! destination claim, or into scratch space when the destination is an S3-compatible bucket
//! (the file appears under its final name only once its sha256 trailer checked out and it
//! is fsynced), `cairn snapshot status` for the revision, `sha256sum`, for a bucket
//! `cairn snapshot upload` (multipart for large files, credentials from the Secret the
//! destination names), and a one-line JSON report written to the container's termination message, which the
//! operator reads back into the Backup's status. Deleting a Backup deletes its file first
//! (a finalizer and a small cleanup Job), so retention removes objects and files together.
//!
//! The reconciler of `Backup` objects lives in `backup_run`; the Cluster's own pass uses
//! the schedule decisions here.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};
use serde::Deserialize;

use crate::crd::{
    Backup, BackupDestination, BackupPhase, BackupRetention, BackupSpec, Cluster, LastBackup,
    S3Destination,
};
use crate::schedule::{Schedule, parse_duration};
use crate::{Error, Result};

/// Finalizer that keeps a Backup until its file is deleted.
pub const FINALIZER: &str = "cairn.dev/backup-file";
/// Label naming the Cluster a Backup belongs to.
pub const CLUSTER_LABEL: &str = "cairn.dev/cluster";
/// Label on Backups the schedule created (retention only deletes these).
pub const SCHEDULED_LABEL: &str = "cairn.dev/scheduled";
/// Label naming the Backup a Job works for.
pub const BACKUP_LABEL: &str = "cairn.dev/backup";
/// Where the destination claim is mounted in backup Jobs.
const MOUNT: &str = "/backup";

/// Saves, inspects and checksums the snapshot, uploads it when the destination is a bucket,
/// then reports (see the module doc). Every failure writes `{"error": ...}` as the
/// termination message and exits non-zero.
const SAVE_SCRIPT: &str = r#"set -u
report() { printf '%s' "$1" > /dev/termination-log; }
fail() { echo "backup failed: $1" >&2; report "{\"error\":\"$1\"}"; exit 1; }
mkdir -p "$DEST" || fail "cannot create $DEST in the destination volume"
saved=""
for ep in $(echo "$ENDPOINTS" | tr ',' ' '); do
  # TLS_ARGS (client TLS): --cacert/--cert/--key, words split on purpose.
  if cairn snapshot save "$DEST/$FILE" --endpoints "$ep" ${TLS_ARGS:-}; then saved="$ep"; break; fi
done
[ -n "$saved" ] || fail "no member could stream a snapshot (tried $ENDPOINTS)"
status=$(cairn snapshot status "$DEST/$FILE" -w json) || fail "cairn snapshot status failed on the saved file"
sum=$(sha256sum "$DEST/$FILE" | cut -d' ' -f1) || fail "sha256sum failed"
size=$(wc -c < "$DEST/$FILE" | tr -d ' ')
case "$LOCATION" in
  s3://*)
    cairn snapshot upload "$DEST/$FILE" "$LOCATION" || fail "the upload to $LOCATION failed (see the Job's log)"
    rm -f "$DEST/$FILE" ;;
  *) echo "$sum  $FILE" > "$DEST/$FILE.sha256" || fail "cannot write $FILE.sha256" ;;
esac
report "{\"location\":\"$LOCATION\",\"checksum\":\"sha256:$sum\",\"size\":$size,\"endpoint\":\"$saved\",\"snapshot\":$status}"
echo "backup $FILE: $size bytes, sha256:$sum, from $saved, at $LOCATION"
"#;

/// Deletes a backup's file and checksum, or its object.
const DELETE_SCRIPT: &str = r#"set -eu
case "$LOCATION" in
  s3://*) cairn snapshot delete "$LOCATION" ;;
  *) rm -f "$DEST/$FILE" "$DEST/$FILE.sha256" "$DEST/$FILE.part"; echo "deleted $DEST/$FILE" ;;
esac
"#;

/// What a successful backup Job reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// Where the snapshot was written (`pvc://claim/path`).
    pub location: String,
    /// `sha256:<hex>` of the file.
    pub checksum: String,
    /// File size in bytes.
    pub size: i64,
    /// The member that streamed it.
    #[serde(default)]
    pub endpoint: String,
    /// `cairn snapshot status -w json` of the file.
    pub snapshot: SnapshotStatus,
}

/// `cairn snapshot status -w json` (etcdutl's field names).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// The store revision the snapshot holds.
    pub revision: i64,
    /// Keys in it.
    #[serde(default)]
    pub total_key: u64,
}

/// Reads a backup Job's termination message: the report, or the error it names.
///
/// # Errors
/// The Job's own error text, or a message saying the report could not be read.
pub fn parse_report(message: &str) -> Result<Report, String> {
    #[derive(Deserialize)]
    struct Failed {
        error: String,
    }
    let message = message.trim();
    if let Ok(f) = serde_json::from_str::<Failed>(message) {
        return Err(f.error);
    }
    serde_json::from_str::<Report>(message).map_err(|e| {
        let shown: String = message.chars().take(300).collect();
        format!("the backup Job's report is unreadable ({e}): {shown:?}")
    })
}

/// The file name of a Backup's snapshot.
pub fn file_name(backup: &str) -> String {
    format!("{backup}.db")
}

/// The directory the Job writes the file to (in the mounted claim, or scratch space before
/// an upload), and the location string of a Backup's file.
fn paths(dest: &BackupDestination, backup: &str) -> Result<(String, String)> {
    if let Some(pvc) = &dest.pvc {
        let sub = pvc.sub_path.as_deref().unwrap_or("").trim_matches('/');
        let dir = if sub.is_empty() { MOUNT.to_owned() } else { format!("{MOUNT}/{sub}") };
        let rel =
            if sub.is_empty() { file_name(backup) } else { format!("{sub}/{}", file_name(backup)) };
        return Ok((dir, format!("pvc://{}/{rel}", pvc.claim_name)));
    }
    let s3 =
        dest.s3.as_ref().ok_or(Error::MissingObjectKey("destination.pvc or destination.s3"))?;
    Ok((MOUNT.to_owned(), s3_location(s3, &file_name(backup))))
}

/// `s3://bucket/<prefix>/<file>`.
pub fn s3_location(s3: &S3Destination, file: &str) -> String {
    let prefix = s3.prefix.as_deref().unwrap_or("").trim_matches('/');
    if prefix.is_empty() {
        format!("s3://{}/{file}", s3.bucket)
    } else {
        format!("s3://{}/{prefix}/{file}", s3.bucket)
    }
}

/// The environment `cairn snapshot upload | download | delete` reads: endpoint, region,
/// addressing style, and the keys from the credentials Secret (`accessKeyId`,
/// `secretAccessKey`).
pub fn s3_env(s3: &S3Destination) -> Vec<EnvVar> {
    let secret = |var: &str, key: &str| EnvVar {
        name: var.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s3.credentials_secret_ref.name.clone(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = vec![
        env("AWS_REGION", s3.region.clone().unwrap_or_else(|| "us-east-1".into())),
        env("CAIRN_S3_FORCE_PATH_STYLE", s3.force_path_style.to_string()),
        secret("AWS_ACCESS_KEY_ID", "accessKeyId"),
        secret("AWS_SECRET_ACCESS_KEY", "secretAccessKey"),
    ];
    if let Some(e) = &s3.endpoint {
        out.push(env("AWS_ENDPOINT_URL", e.clone()));
    }
    out
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value), ..Default::default() }
}

/// Name of the Job that saves Backup `backup`.
pub fn save_job_name(backup: &str) -> String {
    format!("{backup}-save")
}

/// Name of the Job that deletes Backup `backup`'s file.
pub fn delete_job_name(backup: &str) -> String {
    format!("{backup}-delete")
}

/// The Job that saves a snapshot of `cluster` for `backup` into `pvc`, trying `endpoints`
/// (client URLs) in order.
///
/// # Errors
/// [`Error::MissingObjectKey`] for objects not read from the API.
pub fn save_job(
    b: &Backup,
    cluster: &Cluster,
    dest: &BackupDestination,
    endpoints: &[String],
    default_repository: &str,
) -> Result<Job> {
    let name = b.name_any();
    let (dir, location) = paths(dest, &name)?;
    job(
        b,
        cluster,
        dest,
        save_job_name(&name),
        SAVE_SCRIPT,
        vec![
            env("ENDPOINTS", endpoints.join(",")),
            env("DEST", dir),
            env("FILE", file_name(&name)),
            env("LOCATION", location),
        ],
        default_repository,
    )
    .map(|j| with_client_tls(j, cluster))
}

/// With client TLS, the save Job presents the client Secret's certificate: the Secret
/// mounted read-only and `TLS_ARGS` (`--cacert`, `--cert`, `--key`) for `cairn snapshot save`.
fn with_client_tls(mut job: Job, cluster: &Cluster) -> Job {
    if cluster.spec.client_tls().is_none() {
        return job;
    }
    let (volumes, mounts) = super::resources::tls_volumes(cluster, false);
    let dir = super::resources::CLIENT_TLS_DIR;
    let args = format!("--cacert={dir}/ca.crt --cert={dir}/tls.crt --key={dir}/tls.key");
    if let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        pod.volumes.get_or_insert_with(Vec::new).extend(volumes);
        for c in &mut pod.containers {
            c.volume_mounts.get_or_insert_with(Vec::new).extend(mounts.clone());
            c.env.get_or_insert_with(Vec::new).push(env("TLS_ARGS", args.clone()));
        }
    }
    job
}

/// The Job that deletes `backup`'s file from `dest`.
///
/// # Errors
/// [`Error::MissingObjectKey`] for objects not read from the API.
pub fn delete_job(
    b: &Backup,
    cluster: &Cluster,
    dest: &BackupDestination,
    default_repository: &str,
) -> Result<Job> {
    let name = b.name_any();
    let (dir, location) = paths(dest, &name)?;
    job(
        b,
        cluster,
        dest,
        delete_job_name(&name),
        DELETE_SCRIPT,
        vec![env("DEST", dir), env("FILE", file_name(&name)), env("LOCATION", location)],
        default_repository,
    )
}

fn job(
    b: &Backup,
    cluster: &Cluster,
    dest: &BackupDestination,
    name: String,
    script: &str,
    mut env: Vec<EnvVar>,
    default_repository: &str,
) -> Result<Job> {
    // A claim is the destination itself; a bucket gets scratch space for the file before
    // the upload.
    let volume = match (&dest.pvc, &dest.s3) {
        (Some(pvc), _) => Volume {
            name: "destination".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        },
        (None, Some(s3)) => {
            env.extend(s3_env(s3));
            Volume {
                name: "destination".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }
        }
        (None, None) => return Err(Error::MissingObjectKey("destination.pvc or destination.s3")),
    };
    let backup = b.name_any();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "cairn-backup".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), b.spec.cluster_name.clone()),
        ("app.kubernetes.io/managed-by".to_owned(), "cairn-operator".to_owned()),
        (BACKUP_LABEL.to_owned(), backup),
    ]);
    let owner = b.controller_owner_ref(&()).ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let container = Container {
        name: "backup".into(),
        // The image the members run (a refused or half-rolled upgrade's image may not work).
        image: Some(
            cluster
                .status
                .as_ref()
                .and_then(|s| s.current_image.clone())
                .unwrap_or_else(|| cluster.image(default_repository)),
        ),
        image_pull_policy: cluster.spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        env: Some(env),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: "destination".into(),
            mount_path: MOUNT.into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(b.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // One attempt: a failed backup is reported, and the schedule makes the next one.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    containers: vec![container],
                    image_pull_secrets: (!cluster.spec.image_pull_secrets.is_empty())
                        .then(|| cluster.spec.image_pull_secrets.clone()),
                    volumes: Some(vec![volume]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// A scheduled Backup of `cluster` created at `now`, named `<cluster>-<yyyymmddhhmmss>`.
///
/// # Errors
/// [`Error::MissingObjectKey`] for a Cluster not read from the API.
pub fn scheduled_backup(cluster: &Cluster, now: Timestamp) -> Result<Backup> {
    let name = cluster.name_any();
    let stamp = now.strftime("%Y%m%d%H%M%S").to_string();
    let mut b = Backup::new(
        &format!("{name}-{stamp}"),
        // The destination is recorded in the Backup, so it can be restored and deleted
        // after its Cluster's spec changed or the Cluster is gone.
        BackupSpec {
            cluster_name: name.clone(),
            destination: cluster.spec.backup.as_ref().map(|s| s.destination.clone()),
        },
    );
    b.metadata.namespace =
        Some(cluster.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?);
    b.metadata.labels = Some(BTreeMap::from([
        (CLUSTER_LABEL.to_owned(), name),
        (SCHEDULED_LABEL.to_owned(), "true".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "cairn-operator".to_owned()),
    ]));
    Ok(b)
}

fn time(s: Option<&String>) -> Option<Timestamp> {
    s.and_then(|s| super::parse_time(s))
}

fn created(b: &Backup) -> Option<Timestamp> {
    super::created(&b.metadata)
}

fn phase(b: &Backup) -> Option<BackupPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

/// The newest successful backup among `backups`, as `status.lastBackup` shows it.
pub fn last_good(backups: &[Backup]) -> Option<LastBackup> {
    backups
        .iter()
        .filter(|b| phase(b) == Some(BackupPhase::Succeeded))
        .filter_map(|b| {
            let s = b.status.as_ref()?;
            let done = time(s.completion_time.as_ref())?;
            Some((done, b, s))
        })
        .max_by_key(|(done, _, _)| *done)
        .map(|(done, b, s)| LastBackup {
            name: b.name_any(),
            time: done.to_string(),
            revision: s.revision.unwrap_or_default(),
            size: s.size.unwrap_or_default(),
            checksum: s.checksum.clone().unwrap_or_default(),
        })
}

/// What the schedule decides in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulePlan {
    /// Create a scheduled Backup now.
    pub create: bool,
    /// When the next one is due (for the requeue).
    pub next_tick: Option<Timestamp>,
    /// Names of scheduled Backups retention deletes.
    pub delete: Vec<String>,
}

/// Decides the schedule's step: a new Backup when a tick is due and none is in flight (the
/// first one at once), and what `keep` lets go. Retention counts successful scheduled
/// Backups newest first, never deletes the newest successful one, and drops failed
/// scheduled Backups older than it.
///
/// # Errors
/// A message when the schedule or `maxAge` cannot be parsed.
pub fn plan_schedule(
    schedule: &str,
    keep: Option<&BackupRetention>,
    backups: &[Backup],
    now: Timestamp,
) -> Result<SchedulePlan, String> {
    let schedule = Schedule::parse(schedule)?;
    let scheduled: Vec<&Backup> = backups
        .iter()
        .filter(|b| b.labels().get(SCHEDULED_LABEL).is_some_and(|v| v == "true"))
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .collect();
    let newest = scheduled.iter().filter_map(|b| created(b)).max();
    let in_flight = scheduled
        .iter()
        .any(|b| matches!(phase(b), None | Some(BackupPhase::Pending | BackupPhase::Running)));
    let due = newest.is_none_or(|t| schedule.next_after(t).is_some_and(|n| n <= now));
    let create = due && !in_flight;
    let next_tick =
        if create { schedule.next_after(now) } else { newest.and_then(|t| schedule.next_after(t)) };

    let mut good: Vec<(Timestamp, &Backup)> = scheduled
        .iter()
        .filter(|b| phase(b) == Some(BackupPhase::Succeeded))
        .filter_map(|b| Some((time(b.status.as_ref()?.completion_time.as_ref())?, *b)))
        .collect();
    good.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    let max_age = match keep.and_then(|k| k.max_age.as_deref()) {
        Some(a) => Some(parse_duration(a).map_err(|e| format!("backup.keep.maxAge: {e}"))?),
        None => None,
    };
    let count = keep.and_then(|k| k.count).and_then(|c| usize::try_from(c).ok());
    let too_old = |t: Timestamp, age: Duration| {
        SignedDuration::try_from(age)
            .ok()
            .and_then(|a| now.checked_sub(a).ok())
            .is_some_and(|cutoff| t < cutoff)
    };
    let mut delete = Vec::new();
    for (i, (t, b)) in good.iter().enumerate() {
        // The newest good backup stays whatever the limits say.
        if i == 0 {
            continue;
        }
        if count.is_some_and(|c| i >= c) || max_age.is_some_and(|a| too_old(*t, a)) {
            delete.push(b.name_any());
        }
    }
    if let Some((newest_good, _)) = good.first() {
        for b in &scheduled {
            if phase(b) == Some(BackupPhase::Failed) && created(b).is_some_and(|c| c < *newest_good)
            {
                delete.push(b.name_any());
            }
        }
    }
    Ok(SchedulePlan { create, next_tick, delete })
}

/// `BackupHealthy`: (status, reason, message). True while the newest successful backup is
/// at most two schedule periods old.
pub fn health(
    schedule: &str,
    last: Option<&LastBackup>,
    last_failure: Option<&str>,
    now: Timestamp,
) -> (bool, &'static str, String) {
    let Ok(schedule) = Schedule::parse(schedule) else {
        return (false, "InvalidSchedule", format!("spec.backup.schedule {schedule:?} is invalid"));
    };
    let failure = last_failure.map(|f| format!("; the last failure: {f}")).unwrap_or_default();
    let Some(last) = last else {
        return (false, "NoSuccessfulBackup", format!("no backup has succeeded yet{failure}"));
    };
    let Some(done) = time(Some(&last.time)) else {
        return (
            false,
            "NoSuccessfulBackup",
            format!("backup {} has no completion time", last.name),
        );
    };
    let period = schedule.period(done).unwrap_or(Duration::MAX);
    let limit = period.saturating_mul(2);
    let age = Duration::try_from(now.duration_since(done)).unwrap_or(Duration::ZERO);
    if age <= limit {
        (
            true,
            "BackupRecent",
            format!("backup {} at revision {} completed {}", last.name, last.revision, last.time),
        )
    } else {
        (
            false,
            "BackupStale",
            format!(
                "the newest successful backup ({}, {}) is older than two schedule periods{failure}",
                last.name, last.time
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BackupStatus, ClusterSpec, PvcDestination};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn backup(name: &str, created: &str, phase: Option<BackupPhase>, done: Option<&str>) -> Backup {
        let mut b = Backup::new(name, BackupSpec { cluster_name: "c".into(), destination: None });
        b.metadata.creation_timestamp = Some(Time(at(created)));
        b.metadata.labels = Some(BTreeMap::from([(SCHEDULED_LABEL.to_owned(), "true".to_owned())]));
        b.status = Some(BackupStatus {
            phase,
            completion_time: done.map(Into::into),
            revision: Some(7),
            ..Default::default()
        });
        b
    }

    #[test]
    fn reports_parse_and_errors_carry_the_jobs_words() {
        let r = parse_report(r#"{"location":"pvc://b/x.db","checksum":"sha256:ab","size":12,"endpoint":"e","snapshot":{"hash":1,"revision":42,"totalKey":3,"totalSize":12}}"#).unwrap();
        assert_eq!((r.location.as_str(), r.size, r.snapshot.revision), ("pvc://b/x.db", 12, 42));
        assert_eq!(
            parse_report(r#"{"error":"no member could stream"}"#).unwrap_err(),
            "no member could stream"
        );
        assert!(parse_report("sh: cairn: not found").unwrap_err().contains("unreadable"));
    }

    #[test]
    fn the_first_backup_is_due_at_once_and_one_runs_at_a_time() {
        let now = at("2026-12-03T10:00:30Z");
        let p = plan_schedule("@every 1m", None, &[], now).unwrap();
        assert!(p.create);
        let running = backup("a", "2026-12-03T09:00:00Z", Some(BackupPhase::Running), None);
        assert!(!plan_schedule("@every 1m", None, &[running], now).unwrap().create);
        let recent = backup(
            "a",
            "2026-12-03T10:00:00Z",
            Some(BackupPhase::Succeeded),
            Some("2026-12-03T10:00:05Z"),
        );
        let p = plan_schedule("@every 1m", None, &[recent], now).unwrap();
        assert!(!p.create);
        assert_eq!(p.next_tick, Some(at("2026-12-03T10:01:00Z")));
    }

    #[test]
    fn retention_keeps_the_newest_count_and_drops_older_failures() {
        let now = at("2026-12-03T10:10:00Z");
        let ok = |n: &str, m: u32| {
            let t = format!("2026-12-03T10:0{m}:00Z");
            backup(n, &t, Some(BackupPhase::Succeeded), Some(&t))
        };
        let failed = backup("f", "2026-12-03T10:00:30Z", Some(BackupPhase::Failed), None);
        let all = [ok("b1", 1), ok("b2", 2), ok("b3", 3), ok("b4", 4), failed];
        let keep = BackupRetention { count: Some(2), max_age: None };
        let mut d = plan_schedule("@every 1m", Some(&keep), &all, now).unwrap().delete;
        d.sort();
        assert_eq!(d, ["b1", "b2", "f"]);
        let keep = BackupRetention { count: None, max_age: Some("7m30s".into()) };
        let mut d = plan_schedule("@every 1m", Some(&keep), &all, now).unwrap().delete;
        d.sort();
        assert_eq!(d, ["b1", "b2", "f"]);
        // Even when every backup is too old, the newest good one stays.
        let keep = BackupRetention { count: None, max_age: Some("1s".into()) };
        let d = plan_schedule("@every 1m", Some(&keep), &all, now).unwrap().delete;
        assert!(!d.contains(&"b4".to_owned()));
    }

    #[test]
    fn backup_health_goes_false_after_two_periods() {
        let last = LastBackup {
            name: "b".into(),
            time: "2026-12-03T10:00:00Z".into(),
            ..Default::default()
        };
        assert!(health("@every 1m", Some(&last), None, at("2026-12-03T10:01:59Z")).0);
        let (ok, reason, _) = health("@every 1m", Some(&last), None, at("2026-12-03T10:02:01Z"));
        assert_eq!((ok, reason), (false, "BackupStale"));
        let (ok, reason, msg) =
            health("@hourly", None, Some("disk full"), at("2026-12-03T10:00:00Z"));
        assert_eq!((ok, reason), (false, "NoSuccessfulBackup"));
        assert!(msg.contains("disk full"));
    }

    #[test]
    fn the_save_job_mounts_the_claim_and_names_the_file() {
        let mut c = Cluster::new("main", ClusterSpec::default());
        c.metadata.namespace = Some("db".into());
        c.metadata.uid = Some("u1".into());
        let mut b =
            Backup::new("main-1", BackupSpec { cluster_name: "main".into(), destination: None });
        b.metadata.namespace = Some("db".into());
        b.metadata.uid = Some("u2".into());
        let pvc = PvcDestination { claim_name: "backups".into(), sub_path: Some("/main/".into()) };
        let dest = BackupDestination { pvc: Some(pvc), s3: None };
        let j = save_job(&b, &c, &dest, &["http://a:2379".into()], "cairn").unwrap();
        assert_eq!(j.metadata.name.as_deref(), Some("main-1-save"));
        let pod = j.spec.unwrap().template.spec.unwrap();
        let env: BTreeMap<String, String> = pod.containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        assert_eq!(env["DEST"], "/backup/main");
        assert_eq!(env["LOCATION"], "pvc://backups/main/main-1.db");
        assert_eq!(
            pod.volumes.unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name,
            "backups"
        );
        assert_eq!(pod.containers[0].image.as_deref(), Some("cairn:latest"));
        assert!(!env.contains_key("TLS_ARGS"));

        // With client TLS the Job presents the client Secret; the delete Job does not dial.
        c.spec.tls = Some(crate::crd::TlsSpec {
            client: Some(crate::crd::TlsSecret {
                secret_ref: crate::crd::SecretRef { name: "cli".into() },
            }),
            peer: None,
        });
        let j = save_job(&b, &c, &dest, &["https://a:2379".into()], "cairn").unwrap();
        let pod = j.spec.unwrap().template.spec.unwrap();
        let tls_args =
            pod.containers[0].env.as_ref().unwrap().iter().find(|e| e.name == "TLS_ARGS");
        assert_eq!(
            tls_args.and_then(|e| e.value.as_deref()),
            Some(
                "--cacert=/etc/cairn/tls/client/ca.crt --cert=/etc/cairn/tls/client/tls.crt --key=/etc/cairn/tls/client/tls.key"
            )
        );
        let secret = pod.volumes.as_ref().unwrap().iter().find_map(|v| v.secret.as_ref()).unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("cli"));
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "tls-client");
        assert_eq!(mount.map(|m| m.mount_path.as_str()), Some("/etc/cairn/tls/client"));
        let delete =
            delete_job(&b, &c, &dest, "cairn").unwrap().spec.unwrap().template.spec.unwrap();
        assert!(delete.volumes.unwrap().iter().all(|v| v.secret.is_none()));
    }

    #[test]
    fn an_s3_job_uses_scratch_space_and_the_secrets_keys() {
        let mut c = Cluster::new("main", ClusterSpec::default());
        c.metadata.namespace = Some("db".into());
        let mut b =
            Backup::new("main-1", BackupSpec { cluster_name: "main".into(), destination: None });
        b.metadata.namespace = Some("db".into());
        b.metadata.uid = Some("u2".into());
        let s3 = S3Destination {
            endpoint: Some("http://s3.local:9000".into()),
            bucket: "bk".into(),
            prefix: Some("/nightly/".into()),
            credentials_secret_ref: k8s_openapi::api::core::v1::LocalObjectReference {
                name: "creds".into(),
            },
            force_path_style: true,
            ..Default::default()
        };
        let dest = BackupDestination { pvc: None, s3: Some(s3) };
        for j in [
            save_job(&b, &c, &dest, &["http://a:2379".into()], "cairn").unwrap(),
            delete_job(&b, &c, &dest, "cairn").unwrap(),
        ] {
            let pod = j.spec.unwrap().template.spec.unwrap();
            assert!(pod.volumes.unwrap()[0].empty_dir.is_some());
            let env = pod.containers[0].env.clone().unwrap();
            let get = |n: &str| env.iter().find(|e| e.name == n).unwrap().clone();
            assert_eq!(get("LOCATION").value.unwrap(), "s3://bk/nightly/main-1.db");
            assert_eq!(get("AWS_ENDPOINT_URL").value.unwrap(), "http://s3.local:9000");
            assert_eq!(get("CAIRN_S3_FORCE_PATH_STYLE").value.unwrap(), "true");
            let key = get("AWS_SECRET_ACCESS_KEY").value_from.unwrap().secret_key_ref.unwrap();
            assert_eq!((key.name.as_str(), key.key.as_str()), ("creds", "secretAccessKey"));
        }
    }
}
