//! Backups to an S3-compatible bucket on the test bed, against a real S3 server: `moto` in
//! server mode (PyPI `moto[server]`, installed by scripts/test.sh into `.venv`), started by
//! the test with IAM authentication on, so every request `cairn` signs is checked (a wrong
//! secret is refused with `SignatureDoesNotMatch`). The bucket is read back with `boto3`
//! (moto's own dependency), an independent S3 client.
//!
//! Scheduled backups land as objects with the recorded sha256 and size, retention deletes
//! objects with their Backups, a Cluster restored from an S3 backup answers the source's
//! HashKV, a wrong checksum stops the restore, and bad credentials fail a Backup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_operator::crd::{Backup, BackupPhase, Cluster};
use kube::ResourceExt;
use kube::api::Api;

use crate::bed::{self, Bed, wait_for};
use crate::daytwo::{
    assert_hash_kv, backups_of, checksum_refusal, create, kept_names, phase_of, put_numbered,
    report_first_backup, restored, settle_after_pruning, sha256_of, succeeded,
};
use crate::operator::{STEP_TIMEOUT, client_url, etcd, events, manifest, operator, status};

/// The bucket every test object goes to.
const BUCKET: &str = "cairn-backups";

/// `moto_server`: `MOTO_SERVER_BIN`, else the workspace's `.venv`.
fn moto_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    anyhow::ensure!(
        venv.is_file(),
        "moto_server is missing: run scripts/test.sh (it installs moto[server] into .venv) or `pip install 'moto[server]'` and set MOTO_SERVER_BIN"
    );
    Ok(venv)
}

/// A running moto server with one IAM user allowed `s3:*` and the bucket.
struct Moto {
    _child: tokio::process::Child,
    endpoint: String,
    python: PathBuf,
    key_id: String,
    secret: String,
    /// The CA of an `https://` server (`AWS_CA_BUNDLE` for boto3 and cairn).
    ca: Option<PathBuf>,
}

impl Moto {
    async fn start(bed: &Bed) -> Moto {
        Moto::start_with(bed, false).await
    }

    /// With `tls`, the server speaks https with the bed's serving certificate for 127.0.0.1
    /// (issued by the bed's own CA, which no system trusts).
    async fn start_with(bed: &Bed, tls: bool) -> Moto {
        let bin = moto_bin().unwrap();
        let python = bin.parent().unwrap().join("python");
        let port = bed::free_port().unwrap();
        let log =
            std::fs::File::create(bed.dir().join("logs").join(format!("moto-{port}.log"))).unwrap();
        // The first three requests (creating the user, its key and its policy) go
        // unauthenticated; every later one must carry a valid signature of that user.
        let pki = bed.dir().join("pki");
        let mut args = vec!["-H".to_owned(), "127.0.0.1".into(), "-p".into(), port.to_string()];
        if tls {
            for (flag, file) in [("--ssl-cert", "apiserver.crt"), ("--ssl-key", "apiserver.key")] {
                args.extend([flag.to_owned(), pki.join(file).display().to_string()]);
            }
        }
        let child = bed
            .command(&bin)
            .args(&args)
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting moto_server");
        let endpoint = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
        wait_for("moto_server listening", Duration::from_secs(60), || async move {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()))
        })
        .await
        .unwrap();
        let ca = tls.then(|| pki.join("ca.crt"));
        let mut m =
            Moto { _child: child, endpoint, python, key_id: "x".into(), secret: "x".into(), ca };
        let out = m.py(&format!(
            r#"
iam = boto3.client("iam", endpoint_url=E, aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
iam.create_user(UserName="backup")
k = iam.create_access_key(UserName="backup")["AccessKey"]
iam.put_user_policy(UserName="backup", PolicyName="s3", PolicyDocument=json.dumps(
    {{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}}]}}))
s3 = boto3.client("s3", endpoint_url=E, aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"], region_name="us-east-1")
s3.create_bucket(Bucket="{BUCKET}")
print(json.dumps([k["AccessKeyId"], k["SecretAccessKey"]]))
"#
        ));
        let [id, secret]: [String; 2] = serde_json::from_str(out.trim()).unwrap();
        m.key_id = id;
        m.secret = secret;
        m
    }

    /// Runs Python with boto3, `json` and `E` (the endpoint) in scope, as the IAM user.
    fn py(&self, body: &str) -> String {
        let script = format!(
            "import boto3, json, os\nE = {:?}\nK = os.environ.get('K')\nS = os.environ.get('S')\n{body}",
            self.endpoint
        );
        let mut py = std::process::Command::new(&self.python);
        py.args(["-c", &script]).env("K", &self.key_id).env("S", &self.secret);
        if let Some(ca) = &self.ca {
            py.env("AWS_CA_BUNDLE", ca);
        }
        let out = py.output().unwrap();
        assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every object in the bucket: key → size.
    fn objects(&self) -> BTreeMap<String, u64> {
        let out = self.py(&format!(
            r#"
s3 = boto3.client("s3", endpoint_url=E, aws_access_key_id=K, aws_secret_access_key=S, region_name="us-east-1")
print(json.dumps({{o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="{BUCKET}").get("Contents", [])}}))
"#
        ));
        serde_json::from_str(out.trim()).unwrap()
    }

    /// The spec text of an s3 destination with prefix `prefix` and Secret `secret`.
    fn destination(&self, prefix: &str, secret: &str) -> String {
        format!(
            "{{s3: {{endpoint: \"{}\", bucket: {BUCKET}, prefix: {prefix}, region: us-east-1, forcePathStyle: true, credentialsSecretRef: {{name: {secret}}}}}}}",
            self.endpoint
        )
    }

    /// `cairn snapshot <args>` with this server and user in the environment.
    fn cairn(&self, secret: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.cairn_without_ca(secret, args);
        if let Some(ca) = &self.ca {
            cmd.env("AWS_CA_BUNDLE", ca);
        }
        cmd.output().unwrap()
    }

    /// `cairn snapshot <args>` as [`Moto::cairn`], but trusting only the system's roots.
    fn cairn_without_ca(&self, secret: &str, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(bed::cairn_bin().unwrap());
        cmd.arg("snapshot")
            .args(args)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("CAIRN_S3_FORCE_PATH_STYLE", "true")
            .env_remove("AWS_CA_BUNDLE");
        cmd
    }
}

async fn secret(bed: &Bed, ns: &str, name: &str, id: &str, key: &str) {
    bed.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData: {{accessKeyId: \"{id}\", secretAccessKey: \"{key}\"}}\n"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_go_to_a_bucket_with_retention_and_restore_from_it() {
    let bed = bed::shared();
    operator(bed).await;
    let moto = Moto::start(bed).await;
    let ns = bed.namespace("op-s3").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    secret(bed, &ns, "s3-creds", &moto.key_id, &moto.secret).await;
    secret(bed, &ns, "s3-wrong", &moto.key_id, "not-the-secret").await;

    // The signature is checked: the same upload with a wrong secret is refused.
    let work = tempfile::tempdir().unwrap();
    let probe = work.path().join("probe");
    std::fs::write(&probe, b"probe").unwrap();
    let url = format!("s3://{BUCKET}/probe");
    let bad = moto.cairn("wrong", &["upload", probe.to_str().unwrap(), &url]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SignatureDoesNotMatch"), "{bad:?}");
    let ok = moto.cairn(&moto.secret, &["upload", probe.to_str().unwrap(), &url]);
    assert!(ok.status.success(), "{ok:?}");
    let ok = moto.cairn(&moto.secret, &["delete", &url]);
    assert!(ok.status.success(), "{ok:?}");

    let src = create(bed, &ns, "s3src", 1, "").await;
    let mut c = etcd(&[client_url(&ns, "s3src", 0)]).await.unwrap();
    let written = put_numbered(&mut c, "s3", 300).await;
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    c.put("s3/leased", "x", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();

    // Scheduled backups every 3 s into the bucket, keeping the newest 2.
    let started = Instant::now();
    let patch = serde_json::json!({"spec": {"backup": {
        "schedule": "@every 3s", "keep": {"count": 2},
        "destination": {"s3": {"endpoint": moto.endpoint, "bucket": BUCKET, "prefix": "clusters/s3src",
            "region": "us-east-1", "forcePathStyle": true, "credentialsSecretRef": {"name": "s3-creds"}}}}}});
    bed.kubectl(&["patch", "cc", "s3src", "-n", &ns, "--type=merge", "-p", &patch.to_string()])
        .await
        .unwrap();
    let first = wait_for("a successful backup to the bucket", STEP_TIMEOUT, || async {
        let all = backups_of(&backups, "s3src").await?;
        if let Some(f) = all.iter().find(|b| phase_of(b) == Some(BackupPhase::Failed)) {
            anyhow::bail!("a backup failed: {:?}", f.status);
        }
        Ok(all.into_iter().find(|b| phase_of(b) == Some(BackupPhase::Succeeded)))
    })
    .await
    .unwrap();
    let st = first.status.clone().unwrap();
    report_first_backup("s3 backup", started, &st);
    assert!(st.revision.unwrap() >= written, "{st:?} misses writes up to {written}");
    let key = format!("clusters/s3src/{}.db", first.name_any());
    assert_eq!(st.location.as_deref(), Some(format!("s3://{BUCKET}/{key}").as_str()));
    // The object, fetched by `cairn snapshot download` with the recorded checksum, is the
    // snapshot the status describes.
    let file = work.path().join("first.db");
    let out = moto.cairn(
        &moto.secret,
        &[
            "download",
            st.location.as_deref().unwrap(),
            file.to_str().unwrap(),
            "--sha256",
            st.checksum.as_deref().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(st.checksum.clone().unwrap(), format!("sha256:{}", sha256_of(&file)));
    assert_eq!(st.size.unwrap() as u64, std::fs::metadata(&file).unwrap().len());
    let zero = format!("sha256:{}", "0".repeat(64));
    let out = moto.cairn(
        &moto.secret,
        &["download", st.location.as_deref().unwrap(), file.to_str().unwrap(), "--sha256", &zero],
    );
    assert!(!out.status.success(), "a wrong checksum must fail the download");

    // Retention: once older backups are pruned, slow the schedule down and let it settle:
    // exactly the two kept Backups' objects remain in the bucket.
    settle_after_pruning(bed, &ns, "s3src").await;
    let kept = wait_for("two backups kept, objects matching", STEP_TIMEOUT, || async {
        let all = backups_of(&backups, "s3src").await?;
        let good = kept_names(&all);
        let objects: Vec<String> = moto.objects().into_keys().collect();
        let want: Vec<String> = good.iter().map(|n| format!("clusters/s3src/{n}.db")).collect();
        Ok((all.len() == 2 && good.len() == 2 && objects == want).then_some(good))
    })
    .await
    .unwrap();
    eprintln!("s3 backup: retention kept {kept:?}, the bucket holds exactly their objects");

    // Restore a new 3-member Cluster from the newest kept backup (its destination, with the
    // credentials Secret, is recorded in the Backup).
    let newest = kept.iter().max().unwrap().clone();
    let snap = succeeded(&backups, &newest).await;
    let revision = snap.revision.unwrap();
    let urls = restored(bed, &ns, "s3dst", &newest, &src, ("s3/", 301), lease).await;
    let want = c.hash_kv(revision).await.unwrap().hash();
    assert_hash_kv(&urls, revision, want).await;
    eprintln!(
        "s3 restore: HashKV at revision {revision} equal on 3 members and the source: {want:x}"
    );

    // A wrong checksum for an S3 location stops the restore with a condition.
    let source = moto.destination("x", "s3-creds");
    bed.apply(&manifest(
        &ns,
        "s3bad",
        1,
        &format!(
            "  bootstrap: {{fromBackup: {{location: \"{}\", checksum: \"{zero}\", source: {source}}}}}\n",
            snap.location.as_deref().unwrap()
        ),
    ))
    .await
    .unwrap();
    let cond = wait_for("RestoreFailed condition", STEP_TIMEOUT, || async {
        let s = status(&api, "s3bad").await?;
        Ok(checksum_refusal(&s))
    })
    .await
    .unwrap();
    eprintln!("s3 restore: bad checksum reported: {}", cond.message);

    // Wrong credentials fail a one-shot Backup with a reason, and it never counts as good.
    bed.apply(&format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: badkey, namespace: {ns}}}\nspec:\n  clusterName: s3src\n  destination: {}\n",
        moto.destination("bad", "s3-wrong")
    ))
    .await
    .unwrap();
    let failed = wait_for("backup badkey Failed", STEP_TIMEOUT, || async {
        let s = backups.get("badkey").await?.status.unwrap_or_default();
        Ok((s.phase == Some(BackupPhase::Failed)).then_some(s))
    })
    .await
    .unwrap();
    assert!(failed.reason.clone().unwrap_or_default().contains("upload"), "{failed:?}");
    let last = status(&api, "s3src").await.unwrap().last_backup.unwrap();
    assert_ne!(last.name, "badkey");
    let ev = events(bed, &ns).await;
    assert!(ev.contains("BackupSucceeded") && ev.contains("BackupFailed"), "{ev}");
    for name in ["s3dst", "s3bad", "s3src"] {
        bed.kubectl(&["delete", "cc", name, "-n", &ns, "--wait=false"]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_travel_to_an_https_bucket_whose_ca_is_given_in_aws_ca_bundle() {
    let bed = bed::shared();
    let moto = Moto::start_with(bed, true).await;
    assert!(moto.endpoint.starts_with("https://"), "{}", moto.endpoint);
    let work = tempfile::tempdir().unwrap();
    // 6 MiB of varied bytes in 5 MiB parts: a multipart upload over TLS.
    let file = work.path().join("snap.db");
    let bytes: Vec<u8> =
        (0..6u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let sum = sha256_of(&file);
    let url = format!("s3://{BUCKET}/tls/snap.db");

    // The server's certificate is checked: without its CA the upload is refused.
    let untrusted = moto
        .cairn_without_ca(&moto.secret, &["upload", file.to_str().unwrap(), &url])
        .output()
        .unwrap();
    assert!(!untrusted.status.success(), "{untrusted:?}");
    let why = String::from_utf8_lossy(&untrusted.stderr);
    assert!(why.contains("UnknownIssuer") || why.contains("certificate"), "{why}");
    assert!(moto.objects().is_empty(), "{:?}", moto.objects());

    let part = (5u64 << 20).to_string();
    let up =
        moto.cairn(&moto.secret, &["upload", file.to_str().unwrap(), &url, "--part-size", &part]);
    assert!(up.status.success(), "{up:?}");
    assert!(String::from_utf8_lossy(&up.stdout).contains("2 parts"), "{up:?}");
    assert_eq!(moto.objects().get("tls/snap.db"), Some(&(bytes.len() as u64)));

    let back = work.path().join("back.db");
    let down = moto.cairn(
        &moto.secret,
        &["download", &url, back.to_str().unwrap(), "--sha256", &format!("sha256:{sum}")],
    );
    assert!(down.status.success(), "{down:?}");
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    let gone = moto.cairn(&moto.secret, &["delete", &url]);
    assert!(gone.status.success(), "{gone:?}");
    assert!(moto.objects().is_empty());
}
