//! Starts real `cairn` processes (and, for differential tests, real etcd) on loopback ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Picks a free loopback port (bound then released; the OS does not reuse it at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `cairn` member running as a child process; killed on drop.
pub struct Cairn {
    child: Option<Child>,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Cairn {
    /// Starts a single member on fresh ports with a fresh data dir.
    pub async fn start() -> Cairn {
        Self::start_with(&[]).await
    }

    /// Starts a single member with extra flags.
    pub async fn start_with(extra: &[&str]) -> Cairn {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut c = Cairn {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        };
        c.spawn().await;
        c
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.arg("--name")
            .arg("it")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&self.client_url)
            .arg("--advertise-client-urls")
            .arg(&self.client_url)
            .arg("--listen-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-cluster")
            .arg(format!("it={}", self.peer_url))
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Spawns the process and waits until it answers `Status`.
    pub async fn spawn(&mut self) {
        let child = self.command().spawn().expect("spawn cairn");
        self.child = Some(child);
        wait_ready(&self.client_url).await;
    }

    /// `kill -9`s the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts the process on the same data dir and ports.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// A connected etcd-client.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.client_url.as_str()], None).await.unwrap()
    }

    /// The host:port of the client URL (for etcdctl).
    pub fn endpoint(&self) -> String {
        self.client_url.clone()
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until a member at `url` serves `Status` (or panics after 30 s).
pub async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([url], None).await {
            // A fresh member elects itself within a tick; wait until reads through raft work.
            if c.status().await.is_ok() && c.get("cairn-probe", None).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real etcd server (reference for differential tests); killed on drop.
pub struct Etcd {
    child: Child,
    pub client_url: String,
    _tmp: tempfile::TempDir,
}

/// Finds the reference etcd binary: `$ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join("etcd")).find(|p| Path::new(p).exists())
    })
}

impl Etcd {
    /// Starts etcd on fresh ports, or returns None when no etcd binary exists and
    /// `CAIRN_REQUIRE_ETCD` is unset (the test script sets it, so CI never skips).
    pub async fn start() -> Option<Etcd> {
        let Some(bin) = etcd_binary() else {
            assert!(
                std::env::var_os("CAIRN_REQUIRE_ETCD").is_none(),
                "CAIRN_REQUIRE_ETCD is set but no etcd binary was found"
            );
            eprintln!("no etcd binary; skipping the differential part");
            return None;
        };
        let tmp = tempfile::tempdir().unwrap();
        let client_url = format!("http://127.0.0.1:{}", free_port());
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let child = Command::new(bin)
            .arg("--name")
            .arg("ref")
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("ref={peer_url}"))
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        wait_ready(&client_url).await;
        Some(Etcd { child, client_url, _tmp: tmp })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `etcdctl`: `$ETCDCTL_BIN`, else on PATH.
pub fn etcdctl_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ETCDCTL_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join("etcdctl")).find(|p| Path::new(p).exists())
    })
}
