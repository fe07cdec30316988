//! The test bed's control plane: a real `cairn` as storage, a real kube-apiserver on it, a
//! real kube-controller-manager, and the test kubelet (`kubelet.rs`) as the only node.
//!
//! `shared()` starts one bed per run of the test binary (on first use; it takes seconds) and
//! hands the same bed to every test; tests keep apart by working in their own namespaces
//! (`Bed::namespace`). The bed runs its background work (the kubelet's watchers and pod
//! workers) on a tokio runtime of its own, so tests may use any runtime they like and build
//! their own clients with `Bed::client`.
//!
//! Teardown: every process the bed starts joins one process group whose leader is a small
//! watchdog shell holding a pipe from this process. When the test process exits, however it
//! exits (a `static` bed is never dropped), the pipe closes and the watchdog kills the whole
//! group, removes the bed's `/etc/hosts` block and deletes the bed directory (kept when
//! `CAIRN_BED_KEEP=1`). Dropping a `Bed` does the same at once.
//!
//! Binaries: `kube-apiserver`, `kube-controller-manager` and `kubectl` from
//! `CAIRN_KUBE_BIN_DIR`, else `${CAIRN_CACHE_DIR:-$HOME/.cache/cairn}/kubernetes/<version>/`
//! (`scripts/k8s.sh build` fills it); `cairn` and `cairn-operator` from `CAIRN_BIN` /
//! `CAIRN_OPERATOR_BIN`, else the target directory this test binary was built into. The
//! second build of `cairn` the rolling-upgrade test runs as image `cairn:0.2.0`
//! ([`NEXT_VERSION`]) from `CAIRN_BIN_NEXT`, else `<target>/debug/cairn-0.2.0/cairn`
//! (`scripts/cairn-next.sh` builds it); without it that image runs the normal `cairn`, and
//! the upgrade test fails at its start saying so.
//!
//! Security setup: the bed makes its own CA (openssl), a serving certificate for 127.0.0.1,
//! a client certificate in `system:masters` for the admin kubeconfig (used by tests, the
//! kubelet and kube-controller-manager alike) and an ECDSA service-account signing key.
//! RBAC is on, so the operator's own ServiceAccount and Roles are enforced when it runs
//! with a token of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fmt::Write as _;
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::kubelet;

/// The Kubernetes version the bed runs unless `CAIRN_KUBE_VERSION` says otherwise.
pub const DEFAULT_KUBE_VERSION: &str = "v1.34.4";

/// How long the bed waits for each control-plane component to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);

static SHARED: OnceLock<Result<Bed, String>> = OnceLock::new();

/// The bed shared by every test of this binary, started on first use.
///
/// Panics (failing the calling test) with the reason when the bed cannot start.
pub fn shared() -> &'static Bed {
    let started = SHARED.get_or_init(|| {
        // Started on a thread of its own: the caller may be inside a tokio runtime, where
        // blocking on another runtime is not allowed.
        std::thread::spawn(|| Bed::start_blocking().map_err(|e| format!("{e:#}")))
            .join()
            .unwrap_or_else(|_| Err("the bed's start-up thread panicked".to_owned()))
    });
    match started {
        Ok(bed) => bed,
        Err(e) => panic!("the Kubernetes test bed did not start: {e}"),
    }
}

/// A running control plane with its kubelet.
pub struct Bed {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl_bin: PathBuf,
    store_url: String,
    apiserver_url: String,
    suffix: String,
    pgid: u32,
    kubelet: kubelet::Handle,
    children: Mutex<Vec<(String, Child)>>,
    watchdog: Mutex<Option<Watchdog>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Bed {
    /// Starts a bed on a runtime of its own; blocks until the control plane is ready.
    pub fn start_blocking() -> anyhow::Result<Bed> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bed")
            .enable_all()
            .build()
            .context("building the bed's tokio runtime")?;
        let mut bed = runtime.block_on(Bed::start())?;
        bed.runtime = Some(runtime);
        Ok(bed)
    }

    async fn start() -> anyhow::Result<Bed> {
        let started = Instant::now();
        let kube_dir = kube_bin_dir();
        let apiserver_bin = kube_bin(&kube_dir, "kube-apiserver")?;
        let controller_manager_bin = kube_bin(&kube_dir, "kube-controller-manager")?;
        let kubectl_bin = kube_bin(&kube_dir, "kubectl")?;
        let cairn = cairn_bin()?;
        let next = cairn_next_bin().ok().map(|b| (format!("cairn:{NEXT_VERSION}"), b));
        let images = kubelet::ImageMap::from_env(&cairn, operator_bin().ok().as_deref(), next)?;

        let dir = tempfile::Builder::new()
            .prefix("cairn-bed-")
            .tempdir()
            .context("creating the bed directory")?
            .keep();
        for sub in ["logs", "pki", "pvc", "pods", "store"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let net = kubelet::NetBlock::claim()?;
        let bed_id = format!("{}-{}", net.octet(), std::process::id());
        let hosts = kubelet::HostsFile::new(&bed_id);
        let watchdog = Watchdog::spawn(&dir, &hosts)?;
        let pgid = watchdog.pid;

        let mut bed = Bed {
            dir: dir.clone(),
            kubeconfig: dir.join("kubeconfig"),
            kubectl_bin,
            store_url: String::new(),
            apiserver_url: String::new(),
            suffix: format!("b{}", net.octet()),
            pgid,
            kubelet: kubelet::Handle::default(),
            children: Mutex::new(Vec::new()),
            watchdog: Mutex::new(Some(watchdog)),
            runtime: None,
        };
        let pki = Pki::generate(&dir.join("pki"))?;

        // 1. The store.
        let client_port = free_port()?;
        let peer_port = free_port()?;
        bed.store_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut store = Command::new(&cairn);
        store
            .arg("--name=bed-store")
            .arg(format!("--data-dir={}", dir.join("store").display()))
            .arg(format!("--listen-client-urls={}", bed.store_url))
            .arg(format!("--advertise-client-urls={}", bed.store_url))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bed-store={peer_url}"));
        bed.spawn("cairn-store", store)?;
        let store_readyz = format!("{}/readyz", bed.store_url);
        let store_readyz = &store_readyz;
        bed.wait_up("the bed's cairn", move || async move {
            let (status, body) =
                kubelet::http_get("127.0.0.1", client_port, "/readyz", Duration::from_secs(2))
                    .await?;
            (status == 200).then_some(()).ok_or_else(|| anyhow!("{store_readyz}: {status} {body}"))
        })
        .await?;

        // 2. kube-apiserver, storing in that cairn.
        let api_port = free_port()?;
        bed.apiserver_url = format!("https://127.0.0.1:{api_port}");
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver
            .arg(format!("--etcd-servers={}", bed.store_url))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--tls-cert-file={}", pki.apiserver_crt.display()))
            .arg(format!("--tls-private-key-file={}", pki.apiserver_key.display()))
            .arg(format!("--client-ca-file={}", pki.ca_crt.display()))
            .arg(format!("--service-account-key-file={}", pki.sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", pki.sa_key.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--api-audiences=https://kubernetes.default.svc.cluster.local")
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .arg("--v=1");
        bed.spawn("kube-apiserver", apiserver)?;
        bed.write_kubeconfig(&pki, "admin", &pki.admin_crt, &pki.admin_key, &bed.kubeconfig)?;
        let b = &bed;
        b.wait_up("kube-apiserver /readyz", move || async move {
            let out = b.kubectl(&["get", "--raw=/readyz"]).await?;
            (out.trim() == "ok").then_some(()).ok_or_else(|| anyhow!("readyz said {out}"))
        })
        .await?;

        // 3. kube-controller-manager (runs as system:masters through the admin certificate;
        //    a real cluster gives it its own identity and per-controller service accounts).
        let mut controller_manager = Command::new(&controller_manager_bin);
        controller_manager
            .arg(format!("--kubeconfig={}", bed.kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", bed.kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", bed.kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?))
            .arg(format!("--service-account-private-key-file={}", pki.sa_key.display()))
            .arg(format!("--root-ca-file={}", pki.ca_crt.display()))
            .arg(format!("--cluster-signing-cert-file={}", pki.ca_crt.display()))
            .arg(format!("--cluster-signing-key-file={}", pki.ca_key.display()))
            .arg("--use-service-account-credentials=false")
            .arg("--controllers=*")
            .arg("--profiling=false")
            .arg("--v=1");
        bed.spawn("kube-controller-manager", controller_manager)?;

        // 4. The kubelet, on the bed's runtime (this future runs on it).
        let client = bed.client().await?;
        bed.kubelet = kubelet::start(kubelet::Config {
            client,
            dir: dir.clone(),
            images,
            net,
            hosts,
            pgid,
            apiserver_port: api_port,
        })
        .await?;

        // The control plane is usable once the controllers have made the default
        // ServiceAccount (pods cannot be created before) and the node is Ready.
        let b = &bed;
        b.wait_up("the default ServiceAccount (kube-controller-manager)", move || async move {
            b.kubectl(&["get", "serviceaccount", "default", "-n", "default", "-o", "name"])
                .await
                .map(|_| ())
        })
        .await?;
        eprintln!(
            "test bed up in {:.1}s: {} (store {}), dir {}",
            started.elapsed().as_secs_f64(),
            bed.apiserver_url,
            bed.store_url,
            bed.dir.display()
        );
        Ok(bed)
    }

    /// Starts a process of the bed (in its process group, output to `logs/<name>.log`).
    fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let program = cmd.get_program().to_owned();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(self.pgid as i32)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.to_string_lossy()))?;
        self.children.lock().unwrap().push((name.to_owned(), child));
        Ok(())
    }

    /// Polls `check` until it succeeds; on timeout, or when a bed process has died, fails
    /// with the last error and the tail of that process's log.
    async fn wait_up<F, Fut>(&self, what: &str, mut check: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let err = match check().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some((name, status)) = self.dead_child() {
                bail!(
                    "{name} exited ({status}) while waiting for {what}; its log ends:\n{}",
                    tail(&self.dir.join("logs").join(format!("{name}.log")), 40)
                );
            }
            if Instant::now() > deadline {
                bail!("timed out after {START_TIMEOUT:?} waiting for {what}: {err:#}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn dead_child(&self) -> Option<(String, String)> {
        let mut children = self.children.lock().unwrap();
        children.iter_mut().find_map(|(name, child)| match child.try_wait() {
            Ok(Some(status)) => Some((name.clone(), status.to_string())),
            _ => None,
        })
    }

    fn write_kubeconfig(
        &self,
        pki: &Pki,
        user: &str,
        crt: &Path,
        key: &Path,
        path: &Path,
    ) -> anyhow::Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: bed\n  context:\n    cluster: bed\n    user: {user}\ncurrent-context: bed\n",
            server = self.apiserver_url,
            ca = pki.ca_crt.display(),
            crt = crt.display(),
            key = key.display(),
        );
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }

    #[allow(dead_code)] // for the operator's end-to-end tests (operator.rs)
    /// The admin kubeconfig (system:masters); give it to the operator as `KUBECONFIG`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    #[allow(dead_code)] // for the operator's end-to-end tests (operator.rs)
    /// The bed's directory (logs, PVC directories, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client URL of the `cairn` that stores the API server's data.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    #[allow(dead_code)] // for the operator's end-to-end tests (operator.rs)
    /// The API server's URL.
    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// A kube client for the calling runtime, authenticated as the admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs `kubectl` with the admin kubeconfig; returns stdout, or an error with stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_with_stdin(args, None).await
    }

    /// `kubectl apply -f -` of a YAML or JSON manifest.
    pub async fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.kubectl_with_stdin(&["apply", "-f", "-"], Some(manifest)).await
    }

    /// Runs `kubectl` with `stdin` (when given) on its standard input.
    pub async fn kubectl_with_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = tokio::process::Command::new(&self.kubectl_bin);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting kubectl")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
            drop(pipe);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .map_err(|_| anyhow!("kubectl {} did not finish in 120s", args.join(" ")))??;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    /// Creates a namespace named `<prefix>-<bed suffix>` and returns its name.
    ///
    /// The suffix keeps two beds running at once on this machine (two engineers' test runs)
    /// from writing the same DNS names into `/etc/hosts`.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let name = format!("{prefix}-{}", self.suffix);
        let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
        self.apply(&manifest).await?;
        Ok(name)
    }

    /// Crashes the containers of a pod (SIGKILL, the API is not told); the kubelet restarts
    /// them as its restart policy says.
    pub fn kill_container(&self, namespace: &str, pod: &str) -> anyhow::Result<()> {
        self.kubelet.kill_container(namespace, pod)
    }

    /// Empties a PVC's directory, as if the disk had been lost.
    pub fn wipe_pvc(&self, namespace: &str, claim: &str) -> anyhow::Result<()> {
        self.kubelet.wipe_pvc(namespace, claim)
    }

    /// The host directory that backs a PVC.
    pub fn pvc_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.kubelet.pvc_dir(namespace, claim)
    }

    /// The pod IP the kubelet gave a running pod.
    pub fn pod_ip(&self, namespace: &str, pod: &str) -> Option<String> {
        self.kubelet.pod_ip(namespace, pod)
    }

    #[allow(dead_code)] // for the operator's end-to-end tests (operator.rs)
    /// A command that joins the bed's process group, so it dies with the bed (use it to
    /// start the operator: `bed.command(operator_bin()?)`), with `KUBECONFIG` set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env("KUBECONFIG", &self.kubeconfig).process_group(self.pgid as i32).kill_on_drop(true);
        cmd
    }

    /// The logs of every container in a namespace plus the control plane's last lines.
    pub fn logs(&self, namespace: &str) -> String {
        let mut out = String::new();
        let logs = self.dir.join("logs");
        let mut names: Vec<_> = std::fs::read_dir(&logs)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        names.sort();
        for name in names {
            let name = name.to_string_lossy().into_owned();
            let (lines, wanted) = if name.starts_with(&format!("{namespace}_")) {
                (200, true)
            } else {
                (30, !name.contains('_'))
            };
            if wanted {
                let _ = writeln!(out, "----- {name} (last {lines} lines)");
                out.push_str(&tail(&logs.join(&name), lines));
            }
        }
        out
    }

    /// A guard that prints `logs(namespace)` if the test panics while it is alive.
    pub fn dump_on_failure<'a>(&'a self, namespace: &'a str) -> DumpOnFailure<'a> {
        DumpOnFailure { bed: self, namespace }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        for (_, child) in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(watchdog) = self.watchdog.lock().unwrap().take() {
            watchdog.finish();
        }
    }
}

/// Prints a namespace's logs when dropped during a panic.
pub struct DumpOnFailure<'a> {
    bed: &'a Bed,
    namespace: &'a str,
}

impl Drop for DumpOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== test bed logs for namespace {}\n{}",
                self.namespace,
                self.bed.logs(self.namespace)
            );
            eprintln!(
                "===== bed directory: {} (set CAIRN_BED_KEEP=1 to keep it)",
                self.bed.dir.display()
            );
        }
    }
}

/// Polls `check` every 250 ms until it returns `Ok(Some(value))`; fails after `timeout`
/// with `what` and the last error or `None`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The process-group leader: a shell that, once its stdin (a pipe from this process) reaches
/// end of file, cleans up after the bed and kills the group.
struct Watchdog {
    pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The watchdog's script. `$1` bed dir, `$2` hosts file, `$3` hosts lock, `$4` bed id,
/// `$5` keep the dir (1) or not. Once stdin closes it becomes (exec) `setsid`, which forks
/// a child in a session of its own: outside the group, so it can kill the whole group and
/// then clean up; /etc/hosts is edited under the same lock the kubelet takes.
const WATCHDOG: &str = r#"
cat >/dev/null
exec setsid sh -c '
  kill -KILL "-$6" 2>/dev/null; sleep 0.3; kill -KILL "-$6" 2>/dev/null
  (
    flock 9
    tmp="$(mktemp)"
    sed "/^# cairn-bed $4 begin\$/,/^# cairn-bed $4 end\$/d" "$2" > "$tmp" && cat "$tmp" > "$2"
    rm -f "$tmp"
  ) 9>"$3"
  [ "$5" = 1 ] || rm -rf "$1"
' sh "$1" "$2" "$3" "$4" "$5" "$$" </dev/null >/dev/null 2>&1
"#;

impl Watchdog {
    fn spawn(dir: &Path, hosts: &kubelet::HostsFile) -> anyhow::Result<Watchdog> {
        let keep = std::env::var("CAIRN_BED_KEEP").is_ok_and(|v| v == "1");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(dir)
            .arg(hosts.path())
            .arg(hosts.lock_path())
            .arg(hosts.id())
            .arg(if keep { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the bed's watchdog shell")?;
        let stdin = child.stdin.take();
        Ok(Watchdog { pid: child.id(), child, stdin })
    }

    /// Closes the pipe and waits (up to 10 s) until the group is gone.
    fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let alive = Command::new("kill")
                .args(["-0", "--", &format!("-{}", self.pid)])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Certificates and keys of one bed.
struct Pki {
    ca_crt: PathBuf,
    ca_key: PathBuf,
    apiserver_crt: PathBuf,
    apiserver_key: PathBuf,
    admin_crt: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> anyhow::Result<Pki> {
        let p = |name: &str| dir.join(name);
        let pki = Pki {
            ca_crt: p("ca.crt"),
            ca_key: p("ca.key"),
            apiserver_crt: p("apiserver.crt"),
            apiserver_key: p("apiserver.key"),
            admin_crt: p("admin.crt"),
            admin_key: p("admin.key"),
            sa_key: p("sa.key"),
            sa_pub: p("sa.pub"),
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            dir,
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=cairn-test-bed-ca",
                ],
            ]
            .concat(),
        )?;
        let leaf = |name: &str, subject: &str, ext: &str| -> anyhow::Result<()> {
            std::fs::write(dir.join(format!("{name}.ext")), ext)?;
            openssl(
                dir,
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &format!("{name}.key"),
                        "-out",
                        &format!("{name}.csr"),
                        "-subj",
                        subject,
                    ],
                ]
                .concat(),
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "3650",
                    "-out",
                    &format!("{name}.crt"),
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            )
        };
        leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
        )?;
        leaf(
            "admin",
            "/O=system:masters/CN=cairn-bed-admin",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )?;
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        Ok(pki)
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (the bed makes its certificates with the openssl command)")?;
    if !out.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 for a server to listen on, each handed out once.
///
/// Taken from 10000..20000, below the ephemeral range: a port bound to 0 and released can be
/// reused as the local port of an outgoing connection before the server binds it.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 0..10_000 {
        let port = 10_000 + NEXT.fetch_add(1, Ordering::SeqCst) % 10_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in 10000..20000")
}

/// The last `n` lines of a file (empty when it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    let text =
        std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// Where the kube binaries are: `CAIRN_KUBE_BIN_DIR`, else the `scripts/k8s.sh` cache.
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAIRN_KUBE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let version =
        std::env::var("CAIRN_KUBE_VERSION").unwrap_or_else(|_| DEFAULT_KUBE_VERSION.to_owned());
    let cache = std::env::var_os("CAIRN_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/cairn")
    });
    cache.join("kubernetes").join(version)
}

fn kube_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} is missing: run `scripts/k8s.sh build` (it builds kube-apiserver, kube-controller-manager and kubectl into {}), or point CAIRN_KUBE_BIN_DIR at a directory holding them",
            path.display(),
            dir.display()
        )
    }
}

/// The `cairn` binary: `CAIRN_BIN`, else next to this test binary's target directory.
pub fn cairn_bin() -> anyhow::Result<PathBuf> {
    built_bin(
        "CAIRN_BIN",
        "cairn",
        "`cargo build -p cairn --bin cairn` (scripts/test.sh runs `cargo build --bins`)",
    )
}

/// The version of the second `cairn` build ([`cairn_next_bin`]), and the tag of the image
/// the bed runs it as.
pub const NEXT_VERSION: &str = "0.2.0";

/// The second `cairn` build, reporting [`NEXT_VERSION`]: `CAIRN_BIN_NEXT`, else
/// `debug/cairn-<version>/cairn` in the target directory (named `cairn`: the kubelet runs a
/// container's `command: [cairn]` with its image's binary only when the names match).
pub fn cairn_next_bin() -> anyhow::Result<PathBuf> {
    built_bin(
        "CAIRN_BIN_NEXT",
        &format!("cairn-{NEXT_VERSION}/cairn"),
        "`scripts/cairn-next.sh` (scripts/test.sh runs it; it builds cairn with CAIRN_BUILD_VERSION=0.2.0)",
    )
}

/// The `cairn-operator` binary: `CAIRN_OPERATOR_BIN`, else from the target directory.
pub fn operator_bin() -> anyhow::Result<PathBuf> {
    built_bin(
        "CAIRN_OPERATOR_BIN",
        "cairn-operator",
        "`cargo build -p cairn-operator --bin cairn-operator` (scripts/test.sh runs `cargo build --bins`)",
    )
}

fn built_bin(var: &str, name: &str, build: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{var}={} does not exist", path.display());
    }
    let mut candidates = Vec::new();
    // This binary is <target>/<profile>/deps/e2e-<hash>.
    if let Some(profile) =
        std::env::current_exe().ok().and_then(|e| Some(e.parent()?.parent()?.to_owned()))
    {
        candidates.push(profile.join(name));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace.join(t))
        .unwrap_or_else(|| workspace.join("target"));
    candidates.push(target.join("debug").join(name));
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    bail!(
        "the {name} binary is missing (looked at {}); build it first with {build} or set {var}",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}
