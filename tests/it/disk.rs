//! Disk faults on real `cairn` processes: a member whose data dir fills up, or whose
//! `fdatasync` fails, never acknowledges a write it could not persist; it stays up in a
//! failed state that refuses requests and says why (log, `/health`, `/livez`, `/readyz`,
//! `cairn_server_fatal_error`); after the fault clears, a restart brings every acknowledged
//! write back and the member rejoins.
//!
//! The full disk is a small tmpfs mounted by the test (root needed, as for the partition
//! tests); growing it stands for an operator freeing space. The failing `fdatasync` is a
//! tiny `LD_PRELOAD` shim compiled by the test with `cc`: once a trigger file exists, libc's
//! `fdatasync` and `fsync` return `EIO` (Rust's std calls them through libc).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_proto::grpc::health::v1::health_check_response::ServingStatus;
use cairn_proto::grpc::health::v1::{
    HealthCheckRequest, HealthCheckResponse, health_client::HealthClient,
};

use crate::cluster::{Acked, Cluster, assert_acked_readable, time_until_writable, writers};
use crate::gateway::get;
use crate::harness::Cairn;

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let opts = format!("size={size}");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn grow(&self, size: &str) {
        let opts = format!("remount,size={size}");
        let ok = Command::new("mount").args(["-o", &opts]).arg(self.path()).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_up_reports_why_and_a_restart_with_space_keeps_every_acknowledged_write()
 {
    let fs = Tmpfs::mount("160m");
    let mut srv = Cairn::new("disk", tempfile::tempdir().unwrap(), &[]);
    srv.data_dir = PathBuf::from(fs.path()).join("data");
    srv.spawn().await;
    let mut c = srv.client().await;
    let mut watch = c.watch("quiet", None).await.unwrap();
    assert!(watch.message().await.unwrap().unwrap().created());
    let channel = tonic::transport::Endpoint::from_shared(srv.client_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let server = || HealthCheckRequest { service: String::new() };
    let mut health_watch = health.watch(server()).await.unwrap().into_inner();
    let status = |m: HealthCheckResponse| m.status();
    let first = health_watch.message().await.unwrap().map(status);
    assert_eq!(first, Some(ServingStatus::Serving));
    let value = vec![b'x'; 100_000];
    let mut acked = Vec::new();
    let mut failed = false;
    for i in 0..4000 {
        let key = format!("big/{i:05}");
        match tokio::time::timeout(Duration::from_secs(15), c.put(key.clone(), value.clone(), None))
            .await
        {
            Ok(Ok(_)) => acked.push(key),
            _ => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "160 MiB took 400 MB of writes");
    let first_failure = Instant::now();
    assert!(acked.len() > 100, "only {} writes before the disk was full", acked.len());
    // The member stays up, refuses requests and says why, until it is restarted.
    let reason = wait_failed(&srv.client_url).await;
    eprintln!(
        "DISK FULL: reported on /readyz {:?} after the first failed write",
        first_failure.elapsed()
    );
    assert!(
        reason.contains("disk_full: ") && reason.contains("No space left on device"),
        "{reason}"
    );
    assert!(srv.is_running(), "a failed member stays up to report why");
    assert_metric(&srv.client_url, "cairn_server_fatal_error{cause=\"disk_full\"} 1").await;
    assert!(c.put("refused", "x", None).await.is_err(), "a failed member took a write");
    // A watch opened before the failure ends, so its client moves to another member.
    let ended = tokio::time::timeout(Duration::from_secs(20), watch.message()).await;
    match ended.expect("the watch stayed open on a failed member") {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            let got = format!("{:?}: {}", s.code(), s.message());
            assert_eq!(got, "Unavailable: etcdserver: server stopped");
        }
        other => panic!("the watch did not end with \"server stopped\": {other:?}"),
    }
    // gRPC health probes see it too: Check, and the Watch opened while it served.
    let checked = health.check(server()).await.unwrap().into_inner();
    assert_eq!(checked.status(), ServingStatus::NotServing);
    let changed = tokio::time::timeout(Duration::from_secs(20), health_watch.message()).await;
    assert_eq!(changed.unwrap().unwrap().map(status), Some(ServingStatus::NotServing));
    drop(c);
    // Told to stop, a failed member exits non-zero (1: no panic, no signal death).
    srv.signal("TERM");
    let status = srv.wait_exit(Duration::from_secs(20)).expect("a failed member exits on SIGTERM");
    assert_eq!(status.code(), Some(1), "{status:?}");

    fs.grow("600m");
    srv.spawn().await;
    let mut c = srv.client().await;
    let got = c
        .get("big/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    let found: std::collections::HashSet<String> =
        got.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect();
    for key in &acked {
        assert!(found.contains(key), "acknowledged {key} is gone");
    }
    c.put("after-space", "ok", None).await.unwrap();
    assert_eq!(get(&srv.client_url, "/readyz").await.status, 200);
}

/// Waits until the member at `url` reports a fatal failure on `/readyz`, `/livez` and
/// `/health` alike; returns the reason `/readyz` gives (`<cause>: <error>`).
async fn wait_failed(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let ready = get(url, "/readyz").await;
        if let Some(line) = ready.body.lines().find(|l| l.starts_with("[-]fatal_error failed: ")) {
            assert_eq!(ready.status, 503);
            break line.trim_start_matches("[-]fatal_error failed: ").to_owned();
        }
        assert!(Instant::now() < deadline, "the member never reported a failure: {}", ready.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let live = get(url, "/livez").await;
    assert_eq!(live.status, 503, "{}", live.body);
    assert!(live.body.contains(&format!("[-]fatal_error failed: {reason}\n")), "{}", live.body);
    let health = get(url, "/health?serializable=true").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["reason"], format!("MEMBER FAILED:{reason}"));
    reason
}

async fn assert_metric(url: &str, line: &str) {
    let metrics = get(url, "/metrics").await;
    assert!(metrics.body.lines().any(|l| l == line), "no `{line}` in\n{}", metrics.body);
}

/// The `LD_PRELOAD` shim: `fdatasync` and `fsync` fail with `EIO` while the file named by
/// `CAIRN_TEST_FAIL_SYNC_IF` exists, and call libc's otherwise.
const FAIL_SYNC_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int armed(void) {
    const char *trigger = getenv("CAIRN_TEST_FAIL_SYNC_IF");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (armed()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (armed()) { errno = EIO; return -1; }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"#;

/// Compiles [`FAIL_SYNC_SHIM`] into `dir`; returns the shared object's path.
fn build_fail_sync_shim(dir: &Path) -> PathBuf {
    let src = dir.join("failsync.c");
    std::fs::write(&src, FAIL_SYNC_SHIM).unwrap();
    let so = dir.join("failsync.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("run cc (gcc is needed to build the fault shim)");
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    so
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_fdatasync_fails_acknowledges_nothing_reports_why_and_rejoins_after_a_restart()
 {
    fdatasync_fails_on(Role::Leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_fdatasync_fails_acknowledges_nothing_reports_why_and_rejoins_after_a_restart()
 {
    fdatasync_fails_on(Role::Follower).await;
}

/// Which member's disk fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

/// Three members, writers on all of them; `fdatasync` starts failing on the member of
/// `role`. That member acknowledges nothing more and reports why; the other two go on; once
/// the fault clears a restart brings every acknowledged write back and the member rejoins.
async fn fdatasync_fails_on(role: Role) {
    let shim_dir = tempfile::tempdir().unwrap();
    let shim = build_fail_sync_shim(shim_dir.path());
    let trigger = |i: usize| shim_dir.path().join(format!("fail-m{i}"));
    let members: Vec<Cairn> = (0..3)
        .map(|i| {
            let mut m = Cairn::new(&format!("m{i}"), tempfile::tempdir().unwrap(), &[]);
            m.env = vec![
                ("LD_PRELOAD".into(), shim.display().to_string()),
                ("CAIRN_TEST_FAIL_SYNC_IF".into(), trigger(i).display().to_string()),
            ];
            m
        })
        .collect();
    let mut cluster = Cluster::start_members(members, Vec::new()).await;
    let leader = cluster.leader().await;
    let victim = if role == Role::Leader { leader } else { (leader + 1) % 3 };
    let others: Vec<String> =
        (0..3).filter(|&i| i != victim).map(|i| cluster.members[i].client_url.clone()).collect();
    let acked: Acked = Default::default();
    let (stop, handles) = writers(&cluster.endpoints(), 3, &acked);
    // Writes that go to the victim alone: after it failed, none may be acknowledged.
    let mut vc = cluster.members[victim].client().await;
    for i in 0..50 {
        vc.put(format!("v/{i}"), "before", None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    std::fs::write(trigger(victim), b"").unwrap();
    // How long the cluster goes without a write from the fault on: the other two must
    // notice the dead leader and elect one of themselves.
    let probe = tokio::spawn(async move { time_until_writable(&others).await });
    let fault = Instant::now();
    let reason = wait_failed(&cluster.members[victim].client_url).await;
    let reported = fault.elapsed();
    assert!(
        reason.contains("disk_io: ") && reason.contains("Input/output error"),
        "the reason names the failed sync: {reason}"
    );
    let metric = "cairn_server_fatal_error{cause=\"disk_io\"} 1";
    assert_metric(&cluster.members[victim].client_url, metric).await;
    assert!(cluster.members[victim].is_running(), "a failed member stays up to report why");
    for i in 0..20 {
        let put = vc.put(format!("v/after/{i}"), "x", None);
        let put = tokio::time::timeout(Duration::from_secs(10), put).await;
        assert!(!matches!(put, Ok(Ok(_))), "the failed member acknowledged a write");
    }
    let serializable = etcd_client::GetOptions::new().with_serializable();
    assert!(vc.get("v/0", Some(serializable)).await.is_err(), "a failed member served a read");
    drop(vc);
    let unavailable = probe.await.unwrap();
    eprintln!(
        "FDATASYNC EIO ON THE {role:?}: reported on /readyz after {reported:?}; the others took writes again {unavailable:?} after the fault"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }

    // The fault clears; a restart (what the failing liveness probe gets from Kubernetes)
    // replays what the disk durably holds and the member rejoins.
    std::fs::remove_file(trigger(victim)).unwrap();
    cluster.members[victim].kill9();
    let restarted = Instant::now();
    cluster.members[victim].spawn().await;
    eprintln!(
        "FDATASYNC EIO ON THE {role:?}: restarted, served again after {:?}",
        restarted.elapsed()
    );
    assert_eq!(get(&cluster.members[victim].client_url, "/readyz").await.status, 200);
    assert_acked_readable(&mut cluster, &acked).await;
    let mut c = cluster.members[victim].client().await;
    for i in 0..50 {
        let got = c.get(format!("v/{i}"), None).await.unwrap();
        assert_eq!(got.kvs().len(), 1, "acknowledged v/{i} is gone");
    }
    c.put("after-restart", "ok", None).await.unwrap();
    cluster.assert_hashes_equal().await;
}
