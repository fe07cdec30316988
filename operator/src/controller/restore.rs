//! Restore at creation (`spec.bootstrap.fromBackup`): where the snapshot is, the init
//! container that puts it into the seed's empty data dir, and reading its failure back.
//!
//! The init container runs in every store pod (one template) but acts only in the seed
//! (ordinal 0) and only while its data dir is empty, so it is idempotent: a restarted seed
//! keeps its data, and the other members join empty as learners. A snapshot in a claim is
//! read from the claim mounted read-only; one in an S3-compatible bucket is downloaded
//! (`cairn snapshot download`, credentials from the Secret of the destination) into the
//! data volume beside the data dir. Either way the file's sha256 is checked against the
//! expected checksum before `cairn snapshot restore`, which itself verifies the snapshot's
//! trailer and builds the data dir atomically.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PersistentVolumeClaimVolumeSource, Pod, Volume, VolumeMount,
};
use kube::ResourceExt;

use super::resources::{DATA_DIR, DATA_MOUNT, pod_name};
use crate::crd::{Backup, BackupDestination, BackupPhase, Cluster, FromBackup, S3Destination};

/// Name of the restore init container.
pub const CONTAINER: &str = "restore";
/// Where the backup claim is mounted (read-only) in store pods.
const MOUNT: &str = "/var/lib/cairn-restore";

/// A snapshot to restore: a file in a claim or an object in a bucket, and its checksum.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Where the file is.
    pub from: Place,
    /// `sha256:<hex>`.
    pub checksum: String,
}

/// Where a snapshot to restore is.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// A file in a claim.
    Claim {
        /// The claim holding the file.
        claim: String,
        /// The file's path inside the claim.
        path: String,
    },
    /// An object in an S3-compatible bucket.
    Bucket {
        /// `s3://bucket/key`.
        url: String,
        /// Endpoint, region and credentials of the bucket.
        s3: S3Destination,
    },
}

/// Parses `pvc://claim/path` or `s3://bucket/key`; a bucket needs the S3 settings of the
/// first of `candidates` that names the same bucket.
fn parse_location(
    location: &str,
    candidates: &[Option<&BackupDestination>],
) -> Result<Place, String> {
    if let Some(rest) = location.strip_prefix("s3://") {
        let Some((bucket, _)) =
            rest.split_once('/').filter(|(b, k)| !b.is_empty() && !k.is_empty())
        else {
            return Err(format!("location {location:?} is not s3://<bucket>/<key>"));
        };
        let s3 = candidates
            .iter()
            .flatten()
            .filter_map(|d| d.s3.as_ref())
            .find(|s| s.bucket == bucket)
            .ok_or_else(|| {
                format!(
                    "location {location:?}: no S3 settings for bucket {bucket} (set bootstrap.fromBackup.source.s3 with its endpoint and credentials)"
                )
            })?;
        return Ok(Place::Bucket { url: location.to_owned(), s3: s3.clone() });
    }
    let rest = location.strip_prefix("pvc://").ok_or_else(|| {
        format!("location {location:?}: only pvc://<claim>/<path> and s3://<bucket>/<key> locations can be restored")
    })?;
    match rest.split_once('/') {
        Some((claim, path))
            if !claim.is_empty() && !path.is_empty() && !path.split('/').any(|p| p == "..") =>
        {
            Ok(Place::Claim { claim: claim.to_owned(), path: path.to_owned() })
        }
        _ => Err(format!("location {location:?} is not pvc://<claim>/<path>")),
    }
}

/// Resolves `fromBackup` against the namespace's Backups. The S3 settings of a bucket come
/// from `fromBackup.source`, else the Backup's destination, else the new Cluster's own
/// backup destination (`own`).
///
/// # Errors
/// What the user must fix: a missing or unfinished Backup, an unsupported location.
pub fn resolve(
    from: &FromBackup,
    backups: &[Backup],
    own: Option<&BackupDestination>,
) -> Result<Source, String> {
    if let Some(name) = &from.name {
        let b = backups
            .iter()
            .find(|b| b.name_any() == *name)
            .ok_or_else(|| format!("bootstrap.fromBackup: Backup {name} not found"))?;
        let s = b.status.clone().unwrap_or_default();
        if s.phase != Some(BackupPhase::Succeeded) {
            return Err(format!(
                "bootstrap.fromBackup: Backup {name} has not succeeded ({:?})",
                s.phase
            ));
        }
        let location = s.location.ok_or_else(|| format!("Backup {name} records no location"))?;
        let place =
            parse_location(&location, &[from.source.as_ref(), b.spec.destination.as_ref(), own])?;
        let checksum = s.checksum.ok_or_else(|| format!("Backup {name} records no checksum"))?;
        return Ok(Source { from: place, checksum });
    }
    let location =
        from.location.as_deref().ok_or("bootstrap.fromBackup needs a name or a location")?;
    let place = parse_location(location, &[from.source.as_ref(), own])?;
    let checksum = from.checksum.clone().ok_or("bootstrap.fromBackup.location needs a checksum")?;
    Ok(Source { from: place, checksum })
}

/// Checks the file, then restores it into the seed's empty data dir (see the module doc).
const SCRIPT: &str = r#"set -u
fail() { echo "restore failed: $1" >&2; printf '%s' "$1" > /dev/termination-log; exit 1; }
if [ "$POD_NAME" != "$SEED" ]; then echo "not the seed: joins empty"; exit 0; fi
if [ -d "$DATA_DIR" ] && [ -n "$(ls -A "$DATA_DIR")" ]; then echo "data dir holds a member: restore skipped"; exit 0; fi
if [ -n "${LOCATION:-}" ]; then
  rm -f "$SNAPSHOT"
  cairn snapshot download "$LOCATION" "$SNAPSHOT" || fail "cannot download $LOCATION (see the container log)"
fi
[ -f "$SNAPSHOT" ] || fail "snapshot $SNAPSHOT not found in the backup claim"
sum="sha256:$(sha256sum "$SNAPSHOT" | cut -d' ' -f1)"
[ "$sum" = "$CHECKSUM" ] || fail "checksum mismatch: the snapshot is $sum, expected $CHECKSUM"
cairn snapshot restore "$SNAPSHOT" --name "$POD_NAME" --data-dir "$DATA_DIR" \
  --initial-cluster "$INITIAL_CLUSTER" --initial-cluster-token "$INITIAL_CLUSTER_TOKEN" \
  --initial-advertise-peer-urls "$PEER_URL" || fail "cairn snapshot restore failed (see the container log)"
if [ -n "${LOCATION:-}" ]; then rm -f "$SNAPSHOT"; fi
"#;

fn env(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value), ..Default::default() }
}

/// Adds the restore init container and the read-only backup volume to the store pods.
pub fn add_to(sts: &mut StatefulSet, c: &Cluster, src: &Source, image: String) {
    let Some(pod) = sts.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else { return };
    let Some(store) = pod.containers.first() else { return };
    // The store container's own env (POD_NAME, INITIAL_CLUSTER, ...) plus the restore's.
    let mut vars = store.env.clone().unwrap_or_default();
    let name = c.name_any();
    let mut mounts = vec![VolumeMount {
        name: "data".into(),
        mount_path: DATA_MOUNT.into(),
        ..Default::default()
    }];
    let snapshot = match &src.from {
        Place::Claim { claim, path } => {
            pod.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: "restore".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "restore".into(),
                mount_path: MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            });
            format!("{MOUNT}/{path}")
        }
        Place::Bucket { url, s3 } => {
            vars.push(env("LOCATION", url.clone()));
            vars.extend(super::backup::s3_env(s3));
            // Beside the data dir, in the same volume (never inside it: it must stay empty
            // until the restore builds it).
            format!("{DATA_MOUNT}/restore-snapshot.db")
        }
    };
    vars.extend([
        env("SEED", pod_name(&name, 0)),
        env("DATA_DIR", DATA_DIR.to_owned()),
        env("SNAPSHOT", snapshot),
        env("CHECKSUM", src.checksum.clone()),
        env(
            "PEER_URL",
            format!(
                "{}://$(POD_NAME).{}.$(POD_NAMESPACE).svc:{}",
                super::resources::scheme(c.spec.peer_tls().is_some()),
                super::resources::peer_service_name(&name),
                super::resources::PEER_PORT
            ),
        ),
    ]);
    let init = Container {
        name: CONTAINER.into(),
        image: Some(image),
        image_pull_policy: store.image_pull_policy.clone(),
        command: Some(vec!["sh".into(), "-c".into(), SCRIPT.into()]),
        env: Some(vars),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    pod.init_containers = Some(vec![init]);
}

/// Why the seed's restore failed, if its init container ended with an error.
pub fn failure(seed: &Pod) -> Option<String> {
    let statuses = seed.status.as_ref()?.init_container_statuses.as_ref()?;
    let s = statuses.iter().find(|s| s.name == CONTAINER)?;
    [s.state.as_ref(), s.last_state.as_ref()].into_iter().flatten().find_map(|st| {
        let t = st.terminated.as_ref()?;
        (t.exit_code != 0).then(|| {
            t.message.clone().filter(|m| !m.trim().is_empty()).unwrap_or_else(|| {
                format!("the restore init container exited with {}", t.exit_code)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BackupSpec, BackupStatus};

    #[test]
    fn sources_resolve_from_a_backup_or_a_location() {
        let mut b =
            Backup::new("nightly", BackupSpec { cluster_name: "c".into(), destination: None });
        let from = FromBackup { name: Some("nightly".into()), ..Default::default() };
        assert!(resolve(&from, &[b.clone()], None).unwrap_err().contains("has not succeeded"));
        b.status = Some(BackupStatus {
            phase: Some(BackupPhase::Succeeded),
            location: Some("pvc://backups/main/nightly.db".into()),
            checksum: Some("sha256:ab".into()),
            ..Default::default()
        });
        let s = resolve(&from, &[b], None).unwrap();
        assert_eq!(
            s.from,
            Place::Claim { claim: "backups".into(), path: "main/nightly.db".into() }
        );
        assert!(resolve(&from, &[], None).unwrap_err().contains("not found"));
        let loc = FromBackup {
            location: Some("s3://bucket/x.db".into()),
            checksum: Some("sha256:ab".into()),
            ..Default::default()
        };
        assert!(resolve(&loc, &[], None).unwrap_err().contains("no S3 settings for bucket"));
        let s3 = S3Destination { bucket: "bucket".into(), ..Default::default() };
        let own = BackupDestination { pvc: None, s3: Some(s3.clone()) };
        let s = resolve(&loc, &[], Some(&own)).unwrap();
        assert_eq!(s.from, Place::Bucket { url: "s3://bucket/x.db".into(), s3 });
        let loc = FromBackup {
            location: Some("pvc://b/../x".into()),
            checksum: Some("sha256:ab".into()),
            ..Default::default()
        };
        assert!(resolve(&loc, &[], None).is_err());
        let loc = FromBackup {
            location: Some("ftp://b/x".into()),
            checksum: Some("sha256:ab".into()),
            ..Default::default()
        };
        assert!(resolve(&loc, &[], None).unwrap_err().contains("only pvc://"));
    }
}
