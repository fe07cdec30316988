//! Starts real `cairn` processes (and, for differential tests, real etcd) on loopback ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Picks a free loopback port for a server to listen on.
///
/// Ports come from below Linux's ephemeral range (32768..61000) and are handed out once per
/// test process: a port bound to 0 and released (the obvious way) can be taken again, before
/// the server binds it, as the local port of any outgoing connection, which is how a member
/// once failed to start under CI's load.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Start at a pid-dependent offset so two test processes rarely walk the same ports.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 97) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `cairn` member running as a child process; killed on drop.
pub struct Cairn {
    child: Option<Child>,
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    /// `--initial-cluster`; a single-member cluster of this member when empty.
    pub initial_cluster: String,
    /// `--initial-cluster-state`.
    pub cluster_state: String,
    /// Where the member listens for peers when that differs from its advertised peer URL
    /// (a fault-injecting proxy sits between them).
    pub listen_peer_url: Option<String>,
    /// The network namespace the member runs in (`ip netns exec`), if not the test's own.
    pub netns: Option<String>,
    /// Extra environment variables for the process (e.g. `LD_PRELOAD` for a fault shim).
    pub env: Vec<(String, String)>,
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
        let mut c = Cairn::new("it", tmp, extra);
        c.data_dir = data_dir;
        c.spawn().await;
        c
    }

    /// A member on fresh ports and a fresh data dir, not started yet.
    pub fn new(name: &str, tmp: tempfile::TempDir, extra: &[&str]) -> Cairn {
        Cairn {
            child: None,
            name: name.to_owned(),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            data_dir: tmp.path().join("data"),
            initial_cluster: String::new(),
            cluster_state: "new".to_owned(),
            listen_peer_url: None,
            netns: None,
            env: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the program, so the child's pid is cairn's own.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), env!("CARGO_BIN_EXE_cairn")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_cairn")),
        };
        let initial_cluster = if self.initial_cluster.is_empty() {
            format!("{}={}", self.name, self.peer_url)
        } else {
            self.initial_cluster.clone()
        };
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&self.client_url)
            .arg("--advertise-client-urls")
            .arg(&self.client_url)
            .arg("--listen-peer-urls")
            .arg(self.listen_peer_url.as_ref().unwrap_or(&self.peer_url))
            .arg("--initial-advertise-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg(&self.cluster_state)
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Adds flags for the next start.
    pub fn add_flags(&mut self, flags: &[&str]) {
        self.extra.extend(flags.iter().map(|s| s.to_string()));
    }

    /// Spawns the process and waits until it answers `Status`.
    pub async fn spawn(&mut self) {
        self.spawn_only();
        wait_ready(&self.client_url).await;
    }

    /// Spawns the process without waiting (a cluster member cannot serve before a quorum).
    pub fn spawn_only(&mut self) {
        let child = self.command().spawn().expect("spawn cairn");
        self.child = Some(child);
    }

    /// Runs the member in the foreground until it exits; returns (success, stderr).
    pub fn run_to_exit(&self) -> (bool, String) {
        let out = self.command().stderr(Stdio::piped()).output().expect("run cairn");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs the member in the foreground for at most `limit`; returns its exit status (None
    /// when it was still running and was killed) and its stderr.
    pub fn run_for(&self, limit: Duration) -> (Option<bool>, String) {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = self.command().stderr(log.reopen().unwrap()).spawn().expect("run cairn");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status.success());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, std::fs::read_to_string(log.path()).unwrap_or_default())
    }

    /// Deletes the data dir (the member must be stopped).
    pub fn wipe(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits at most `limit` for the process to exit; returns its status (None if it runs on).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the process, as `kill -SIGNAL pid` does.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{signal} failed");
        }
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
        Some(Self::cluster(1).await?.remove(0))
    }

    /// Starts an `n`-member etcd cluster on fresh ports and waits until every member serves;
    /// None as [`Etcd::start`] says.
    pub async fn cluster(n: usize) -> Option<Vec<Etcd>> {
        Self::cluster_with(n, &[]).await
    }

    /// Starts etcd with extra flags; None as [`Etcd::start`] says.
    pub async fn start_with(extra: &[&str]) -> Option<Etcd> {
        Some(Self::cluster_with(1, extra).await?.remove(0))
    }

    /// Starts an `n`-member etcd cluster with extra flags on every member.
    pub async fn cluster_with(n: usize, extra: &[&str]) -> Option<Vec<Etcd>> {
        let Some(bin) = etcd_binary() else {
            assert!(
                std::env::var_os("CAIRN_REQUIRE_ETCD").is_none(),
                "CAIRN_REQUIRE_ETCD is set but no etcd binary was found"
            );
            eprintln!("no etcd binary; skipping the differential part");
            return None;
        };
        let urls: Vec<(String, String)> = (0..n)
            .map(|_| {
                let client = format!("http://127.0.0.1:{}", free_port());
                (client, format!("http://127.0.0.1:{}", free_port()))
            })
            .collect();
        let initial: Vec<String> =
            urls.iter().enumerate().map(|(i, (_, peer))| format!("ref{i}={peer}")).collect();
        let mut members = Vec::new();
        for (i, (client_url, peer_url)) in urls.into_iter().enumerate() {
            let tmp = tempfile::tempdir().unwrap();
            let child = Command::new(&bin)
                .arg("--name")
                .arg(format!("ref{i}"))
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
                .arg(initial.join(","))
                .arg("--log-level")
                .arg("error")
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            members.push(Etcd { child, client_url, _tmp: tmp });
        }
        for m in &members {
            wait_ready(&m.client_url).await;
        }
        Some(members)
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

/// A TCP proxy in front of a member's peer port that can cut every connection through it
/// (a partition of the member's inbound peer traffic) and heal.
pub struct Proxy {
    /// The proxy's URL, advertised as the member's peer URL.
    pub url: String,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a fresh port and forwards to `target` (host:port).
    pub async fn start(target: String) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (b, c) = (blocked.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if b.load(Ordering::SeqCst) {
                    continue; // dropped: the peer sees a reset
                }
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = out.set_nodelay(true);
                        let _ = inbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy { url, blocked, conns, task }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn block(&self) {
        self.blocked.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.blocked.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.block();
    }
}

/// Every etcdctl on this machine worth testing: Debian's (3.4, `$ETCDCTL_BIN` or PATH) and the
/// 3.5 one shipped next to the reference etcd (`$ETCD_BIN`), when present.
pub fn etcdctls() -> Vec<PathBuf> {
    let beside_etcd = std::env::var("ETCD_BIN")
        .ok()
        .and_then(|etcd| Path::new(&etcd).parent().map(|d| d.join("etcdctl")))
        .filter(|p| p.exists());
    let mut all: Vec<PathBuf> = etcdctl_binary().into_iter().chain(beside_etcd).collect();
    all.dedup();
    all
}

/// A small xorshift generator: deterministic for a seed, no dependency (workload choices,
/// random input).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}
