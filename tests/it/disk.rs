//! A full disk: a member whose data dir runs out of space stops (it never acknowledges a
//! write it could not persist, and says why in its log), and once space is back a restart
//! brings every acknowledged write back.
//!
//! The data dir is a small tmpfs mounted by the test (root needed, as for the partition
//! tests); growing it stands for an operator freeing space.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
async fn a_member_whose_disk_fills_up_stops_and_a_restart_with_space_keeps_every_acknowledged_write()
 {
    let fs = Tmpfs::mount("160m");
    let mut srv = Cairn::new("disk", tempfile::tempdir().unwrap(), &[]);
    srv.data_dir = PathBuf::from(fs.path()).join("data");
    srv.spawn().await;
    let mut c = srv.client().await;
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
    assert!(acked.len() > 100, "only {} writes before the disk was full", acked.len());
    // The member does not linger half-alive: it stops.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while srv.is_running() {
        assert!(std::time::Instant::now() < deadline, "a member with a full disk kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);

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
}
