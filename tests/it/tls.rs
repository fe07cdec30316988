//! Client TLS through real clients: etcdctl 3.4 and 3.5 with `--cacert/--cert/--key`, the
//! etcd-client crate over rustls, curl on the gateway and `/metrics`, with certificates the
//! test makes with openssl (two CAs, server, client and a rogue client). Also rotation of
//! the server certificate under a connected client, `--auto-tls`, cipher suites and
//! versions, and the refusals of bad TLS settings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::cluster::Cluster;
use crate::etcdctl::have_etcdctl;
use crate::harness::{Cairn, etcdctls, free_port};

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates made by the test: `ca` and `ca2` (independent CAs), `server` (CA 1, for
/// 127.0.0.1 and localhost), `server2` (the same names, CA 2), `client` (CA 1, CN `root`),
/// `rogue` (CA 2, CN `root`), `peer` (CA 1, CN `member`), `peer-rogue` and `peer2` (CA 2,
/// CN `member`) and `intruder` (CA 1, CN `intruder`); every leaf names 127.0.0.1 and
/// localhost.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("leaf.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        std::fs::write(
            d.join("elsewhere.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:db.example.com\n",
        )
        .unwrap();
        for ca in ["ca", "ca2"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "3",
                    "-subj",
                    &format!("/CN=cairn test {ca}"),
                    "-keyout",
                    &format!("{ca}-key.pem"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        for (name, ca, cn) in [
            ("server", "ca", "server"),
            ("server2", "ca2", "server"),
            ("client", "ca", "root"),
            ("rogue", "ca2", "root"),
            ("peer", "ca", "member"),
            ("peer-rogue", "ca2", "member"),
            ("peer2", "ca2", "member"),
            ("intruder", "ca", "intruder"),
            ("peer-revoked", "ca", "member"),
            ("peer-elsewhere", "ca", "member"),
        ] {
            // Every leaf names 127.0.0.1 and localhost, but peer-elsewhere only another host.
            let ext = if name == "peer-elsewhere" { "elsewhere.ext" } else { "leaf.ext" };
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}-key.pem"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}-key.pem"),
                    "-set_serial",
                    &format!("{}", free_port()),
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        Pki { dir }
    }

    /// The path of `name`.pem (`name`-key.pem with `key`).
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(format!("{name}.pem")).to_string_lossy().into_owned()
    }

    /// The path of `name`'s private key.
    pub fn key(&self, name: &str) -> String {
        self.path(&format!("{name}-key"))
    }

    /// The server flags for `server`'s certificate with CA 1 as the trusted CA, then `more`.
    pub fn server_flags(&self, more: &[&str]) -> Vec<String> {
        let mut flags = vec![
            "--cert-file".to_owned(),
            self.path("server"),
            "--key-file".to_owned(),
            self.key("server"),
            "--trusted-ca-file".to_owned(),
            self.path("ca"),
        ];
        flags.extend(more.iter().map(|s| s.to_string()));
        flags
    }

    /// curl's flags trusting CA 1 and presenting `identity` when given.
    pub fn curl_args(&self, identity: Option<&str>) -> Vec<String> {
        let mut args = vec!["--cacert".to_owned(), self.path("ca")];
        if let Some(id) = identity {
            args.extend(["--cert".to_owned(), self.path(id), "--key".to_owned(), self.key(id)]);
        }
        args
    }

    /// etcd-client TLS options trusting `ca`, presenting `identity` when given.
    pub fn client_tls(&self, ca: &str, identity: Option<&str>) -> TlsOptions {
        let read = |p: String| std::fs::read(p).unwrap();
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(self.path(ca))));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(read(self.path(id)), read(self.key(id))));
        }
        tls
    }
}

/// A member whose client URL is `https://` with `flags`, not yet started.
fn tls_member<S: AsRef<str>>(flags: &[S]) -> Cairn {
    let tmp = tempfile::tempdir().unwrap();
    let flags: Vec<&str> = flags.iter().map(AsRef::as_ref).collect();
    let mut c = Cairn::new("tls", tmp, &flags);
    c.client_url = c.client_url.replace("http://", "https://");
    c
}

async fn tls_client(url: &str, tls: TlsOptions) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    Client::connect([url], Some(opts)).await
}

/// Starts `c` and waits until a TLS client with `tls` reads through raft.
async fn start_tls(c: &mut Cairn, tls: &TlsOptions) {
    c.spawn_only();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = tls_client(&c.client_url, tls.clone()).await
            && client.get("probe", None).await.is_ok()
        {
            return;
        }
        assert!(c.is_running(), "cairn exited");
        assert!(Instant::now() < deadline, "{} did not become ready over TLS", c.client_url);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `etcdctl` (binary `bin`) against `url` with TLS `flags`; returns (success, stdout,
/// stderr).
fn etcdctl(bin: &PathBuf, url: &str, flags: &[String], args: &[&str]) -> (bool, String, String) {
    let out = run(Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(flags)
        .args(args));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let out = run(Command::new("curl").args(["-sS", "--max-time", "5"]).args(args));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn base64(s: &str) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_certificates_use_grpc_gateway_and_metrics_over_mutual_tls() {
    let pki = Pki::new();
    let metrics_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let ca = pki.path("ca");
    let mut c = tls_member(&pki.server_flags(&[
        "--client-cert-auth",
        "--listen-metrics-urls",
        &metrics_url,
    ]));
    let tls = pki.client_tls("ca", Some("client"));
    start_tls(&mut c, &tls).await;
    let url = c.client_url.clone();

    // The etcd-client crate over rustls.
    let mut client = tls_client(&url, tls).await.unwrap();
    client.put("crate-key", "crate-value", None).await.unwrap();
    let got = client.get("crate-key", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"crate-value");

    // A client without a certificate, or with one from another CA, is refused.
    assert!(
        tls_client(&url, pki.client_tls("ca", None)).await.is_err()
            || tls_client(&url, pki.client_tls("ca", None))
                .await
                .unwrap()
                .get("crate-key", None)
                .await
                .is_err()
    );

    if have_etcdctl() {
        let with_cert: Vec<String> = [
            format!("--cacert={ca}"),
            format!("--cert={}", pki.path("client")),
            format!("--key={}", pki.key("client")),
        ]
        .into();
        let rogue: Vec<String> = [
            format!("--cacert={ca}"),
            format!("--cert={}", pki.path("rogue")),
            format!("--key={}", pki.key("rogue")),
        ]
        .into();
        let no_cert: Vec<String> = vec![format!("--cacert={ca}")];
        for bin in etcdctls() {
            let key = format!("ctl-{}", bin.display());
            let (ok, _, err) = etcdctl(&bin, &url, &with_cert, &["put", &key, "v1"]);
            assert!(ok, "{} put over mTLS: {err}", bin.display());
            let (ok, out, err) =
                etcdctl(&bin, &url, &with_cert, &["get", &key, "--print-value-only"]);
            assert!(ok, "{}: {err}", bin.display());
            assert_eq!(out.trim(), "v1");
            let (ok, _, _) = etcdctl(&bin, &url, &no_cert, &["get", &key]);
            assert!(!ok, "{}: a client without a certificate was served", bin.display());
            let (ok, _, _) = etcdctl(&bin, &url, &rogue, &["get", &key]);
            assert!(!ok, "{}: a certificate of another CA was accepted", bin.display());
            // Plain gRPC to the TLS port is no substitute either.
            let plain = url.replace("https://", "http://");
            let (ok, _, _) = etcdctl(&bin, &plain, &[], &["get", &key]);
            assert!(!ok, "{}: plain text was served on the TLS port", bin.display());
        }
    }

    // The JSON gateway and /metrics share the TLS listener.
    let tls_args = pki.curl_args(Some("client"));
    let body = format!("{{\"key\":\"{}\"}}", base64("crate-key"));
    let (ok, out) = curl(
        &[
            tls_args.clone(),
            vec!["-X".into(), "POST".into(), format!("{url}/v3/kv/range"), "-d".into(), body],
        ]
        .concat(),
    );
    assert!(ok, "{out}");
    assert!(out.contains(&base64("crate-value")), "{out}");
    let (ok, out) = curl(&[tls_args.clone(), vec![format!("{url}/metrics")]].concat());
    assert!(ok && out.contains("etcd_server_has_leader 1"), "{out}");
    // HTTP/1.1 clients (ALPN http/1.1) are served on the same TLS listener.
    let (ok, out) =
        curl(&[tls_args, vec!["--http1.1".into(), "-i".into(), format!("{url}/version")]].concat());
    assert!(ok && out.starts_with("HTTP/1.1 200") && out.contains("etcdserver"), "{out}");
    let (ok, _) = curl(&["--cacert", &ca, &format!("{url}/metrics")]);
    assert!(!ok, "/metrics was served to a client without a certificate");
    // The separate plain metrics listener stays plain.
    let (ok, out) = curl(&[&format!("{metrics_url}/metrics")]);
    assert!(ok && out.contains("etcd_server_has_leader 1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_ca_alone_requires_client_certificates_as_etcd_does_also_for_https_metrics() {
    let pki = Pki::new();
    let metrics_url = format!("https://127.0.0.1:{}", free_port());
    let mut c = tls_member(&pki.server_flags(&["--listen-metrics-urls", &metrics_url]));
    start_tls(&mut c, &pki.client_tls("ca", Some("client"))).await;
    for url in [c.client_url.clone(), metrics_url] {
        let health = format!("{url}/health");
        let with =
            |identity: Option<&str>| [pki.curl_args(identity), vec![health.clone()]].concat();
        let (ok, out) = curl(&with(Some("client")));
        assert!(ok && out.contains("\"health\":\"true\""), "{out}");
        let (ok, _) = curl(&with(None));
        assert!(!ok, "{url}: served without a client certificate");
        let (ok, _) = curl(&with(Some("rogue")));
        assert!(!ok, "{url}: served to a certificate of another CA");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem").to_string_lossy().into_owned();
    let key = dir.path().join("server-key.pem").to_string_lossy().into_owned();
    std::fs::copy(pki.path("server"), &cert).unwrap();
    std::fs::copy(pki.key("server"), &key).unwrap();
    let mut c = tls_member(&["--cert-file", &cert, "--key-file", &key]);
    let old_ca = pki.client_tls("ca", None);
    start_tls(&mut c, &old_ca).await;
    let url = c.client_url.clone();
    let mut connected = tls_client(&url, old_ca.clone()).await.unwrap();
    connected.put("before", "1", None).await.unwrap();

    // Rotate to a certificate of the second CA, as a secret update would: new files are
    // renamed over the old ones.
    std::fs::copy(pki.path("server2"), dir.path().join("next.pem")).unwrap();
    std::fs::copy(pki.key("server2"), dir.path().join("next-key.pem")).unwrap();
    std::fs::rename(dir.path().join("next-key.pem"), &key).unwrap();
    std::fs::rename(dir.path().join("next.pem"), &cert).unwrap();

    // New connections get the new certificate: clients trusting CA 2 now connect...
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fresh = loop {
        if let Ok(mut client) = tls_client(&url, pki.client_tls("ca2", None)).await
            && client.get("before", None).await.is_ok()
        {
            break client;
        }
        assert!(Instant::now() < deadline, "the rotated certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    fresh.put("after", "2", None).await.unwrap();
    // ...clients trusting only CA 1 no longer do...
    let refused = match tls_client(&url, old_ca).await {
        Err(_) => true,
        Ok(mut client) => client.get("after", None).await.is_err(),
    };
    assert!(refused, "a new connection still got the old certificate");
    // ...and the client connected before the rotation keeps working on its session.
    let got = connected.get("after", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"2");
    assert!(c.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls_serves_a_generated_certificate_with_the_chosen_suites_and_versions() {
    let mut c = tls_member(&[
        "--auto-tls",
        "--tls-max-version",
        "TLS1.2",
        "--cipher-suites",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ]);
    c.spawn_only();
    let url = c.client_url.clone();
    let health = format!("{url}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !curl(&["-k", &health]).1.contains("\"health\":\"true\"") {
        assert!(c.is_running(), "cairn exited");
        assert!(Instant::now() < deadline, "{url} did not become healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.data_dir.join("fixtures/client/cert.pem").exists());
    assert!(c.data_dir.join("fixtures/client/key.pem").exists());
    let (ok, out) =
        curl(&["-k", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256", &health]);
    assert!(ok, "{out}");
    let (ok, _) =
        curl(&["-k", "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384", &health]);
    assert!(!ok, "a suite outside --cipher-suites was negotiated");
    let (ok, _) = curl(&["-k", "--tlsv1.3", &health]);
    assert!(!ok, "TLS 1.3 was negotiated above --tls-max-version TLS1.2");
    if have_etcdctl() {
        for bin in etcdctls() {
            // etcdctl skips verification only with TLS forced on (a client-side rule).
            let skip: Vec<String> =
                vec!["--insecure-skip-tls-verify".into(), "--insecure-transport=false".into()];
            let (ok, _, err) = etcdctl(&bin, &url, &skip, &["put", "auto", "tls"]);
            assert!(ok, "{} over --auto-tls: {err}", bin.display());
            // Without skipping verification the self-signed certificate is not trusted.
            let strict = vec!["--insecure-transport=false".to_owned()];
            let (ok, _, _) = etcdctl(&bin, &url, &strict, &["get", "auto"]);
            assert!(!ok, "{}: an untrusted self-signed certificate was accepted", bin.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_start_with_a_clear_error() {
    let pki = Pki::new();
    let (cert, key, rogue_key) = (pki.path("server"), pki.key("server"), pki.key("rogue"));
    let missing = pki.dir.path().join("missing.pem").to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--cert-file, --key-file"),
        (vec!["--cert-file", &cert], "--cert-file needs --key-file"),
        (vec!["--cert-file", &missing, "--key-file", &key], "missing.pem"),
        (vec!["--cert-file", &cert, "--key-file", &rogue_key], "TLS configuration"),
        (
            vec!["--cert-file", &cert, "--key-file", &key, "--tls-min-version", "TLS1.1"],
            "not supported",
        ),
        (
            vec!["--cert-file", &cert, "--key-file", &key, "--cipher-suites", "BOGUS"],
            // etcd 3.5.1's message for the same flag.
            "unexpected TLS cipher suite",
        ),
        (
            vec![
                "--cert-file",
                &cert,
                "--key-file",
                &key,
                "--cipher-suites",
                "TLS_RSA_WITH_RC4_128_SHA",
            ],
            "not supported by Cairn's TLS library",
        ),
        (
            vec!["--cert-file", &cert, "--key-file", &key, "--client-cert-auth"],
            "needs --trusted-ca-file",
        ),
    ];
    for (flags, expected) in cases {
        let c = tls_member(&flags);
        let (ok, stderr) = c.run_to_exit();
        assert!(!ok, "{flags:?} started");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
}

/// Peer flags for a member presenting `cert` and trusting CA 1, with client-cert auth and
/// the allowed CN `member`.
fn peer_flags(pki: &Pki, cert: &str) -> Vec<String> {
    peer_flags_at(&pki.path(cert), &pki.key(cert), &pki.path("ca"), ALLOWED_CN)
}

/// The peer identity check of most tests: the CN `member`.
const ALLOWED_CN: [&str; 2] = ["--peer-cert-allowed-cn", "member"];

/// Peer flags with the given certificate, key and CA files, client-cert auth and the
/// identity check `allowed` (a flag and its value).
fn peer_flags_at(cert: &str, key: &str, ca: &str, allowed: [&str; 2]) -> Vec<String> {
    [
        "--peer-cert-file",
        cert,
        "--peer-key-file",
        key,
        "--peer-trusted-ca-file",
        ca,
        "--peer-client-cert-auth",
        allowed[0],
        allowed[1],
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Waits until `client`'s member accepts writes (a fresh cluster's first election may
/// still be settling when reads already pass).
async fn wait_writable(client: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.put("cairn-probe", "", None).await.is_err() {
        assert!(Instant::now() < deadline, "the cluster never accepted a write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn peer_member(name: &str, flags: &[String]) -> Cairn {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut m = Cairn::new(name, tempfile::tempdir().unwrap(), &flags);
    m.peer_url = m.peer_url.replace("http://", "https://");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_peer_mutual_tls_admits_only_members_with_the_right_certificate() {
    let pki = Pki::new();
    let flags = peer_flags(&pki, "peer");
    let members = (0..3).map(|i| peer_member(&format!("m{i}"), &flags)).collect();
    let cluster = Cluster::start_members(members, Vec::new()).await;
    let members = &cluster.members;
    let mut first = members[0].client().await;
    wait_writable(&mut first).await;
    first.put("over-peer-tls", "replicated", None).await.unwrap();
    for m in members {
        let got = m.client().await.get("over-peer-tls", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"replicated", "{}", m.name);
    }
    let list = first.member_list().await.unwrap();
    assert_eq!(list.members().len(), 3);
    assert!(list.members().iter().all(|m| m.peer_urls()[0].starts_with("https://")));

    // A member whose certificate another CA signed, and one of the right CA with the wrong
    // CN, are added to the member list but cannot join: the members refuse their
    // connections, so they never learn the cluster.
    refuse_joiners(&cluster, ["peer-rogue", "intruder"], |cert| peer_flags(&pki, cert)).await;
}

/// Adds a member for each of `certs` (two) to the three-member `cluster` and starts it with
/// `flags(cert)`: none may join, because the members refuse its peer certificate at the TLS
/// layer, and the cluster keeps taking writes (two unstarted members of five leave a quorum
/// of three).
async fn refuse_joiners(cluster: &Cluster, certs: [&str; 2], flags: impl Fn(&str) -> Vec<String>) {
    let members = &cluster.members;
    let mut initial: Vec<String> =
        members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
    let mut first = members[0].client().await;
    let mut leader = None;
    for m in members {
        let mut c = m.client().await;
        let status = c.status().await.unwrap();
        if status.leader() == status.header().unwrap().member_id() {
            leader = Some(c);
        }
    }
    let mut leader = leader.expect("a leader");
    for cert in certs {
        let mut joiner = peer_member(cert, &flags(cert));
        leader.member_add([joiner.peer_url.as_str()], None).await.unwrap();
        initial.push(format!("{}={}", joiner.name, joiner.peer_url));
        joiner.initial_cluster = initial.join(",");
        joiner.cluster_state = "existing".into();
        let (ok, stderr) = joiner.run_to_exit();
        assert!(!ok, "{cert}: the member started");
        assert!(stderr.contains("cannot join the cluster"), "{cert}: {stderr}");
        // Refused at the TLS layer, not for want of a member record.
        assert!(!stderr.contains("add it with MemberAdd first"), "{cert}: {stderr}");
        first.put(format!("after-{cert}"), "ok", None).await.unwrap();
    }
    let list = first.member_list().await.unwrap();
    let unstarted = list.members().iter().filter(|m| m.name().is_empty()).count();
    assert_eq!(unstarted, 2, "{:?}", list.members());
    for m in members {
        let got = m.client().await.get(format!("after-{}", certs[1]), None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"ok", "{}", m.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_refuse_a_revoked_certificate_and_one_not_valid_for_the_allowed_hostname() {
    let pki = Pki::new();
    let crl = revoke(&pki, "peer-revoked");
    // The right CA and CN everywhere; what differs is the CRL and the host the certificate
    // is valid for (--peer-cert-allowed-hostname instead of --peer-cert-allowed-cn).
    let flags = |cert: &str| {
        let allowed = ["--peer-cert-allowed-hostname", "localhost"];
        let mut f = peer_flags_at(&pki.path(cert), &pki.key(cert), &pki.path("ca"), allowed);
        f.extend(["--peer-crl-file".to_owned(), crl.clone()]);
        f
    };
    let members = (0..3).map(|i| peer_member(&format!("m{i}"), &flags("peer"))).collect();
    let cluster = Cluster::start_members(members, Vec::new()).await;
    let mut first = cluster.members[0].client().await;
    wait_writable(&mut first).await;
    refuse_joiners(&cluster, ["peer-revoked", "peer-elsewhere"], flags).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_auto_tls_members_form_a_cluster() {
    let flags = vec!["--peer-auto-tls".to_owned()];
    let members = (0..2).map(|i| peer_member(&format!("a{i}"), &flags)).collect();
    let cluster = Cluster::start_members(members, Vec::new()).await;
    let members = &cluster.members;
    let mut first = members[0].client().await;
    wait_writable(&mut first).await;
    first.put("auto", "peer", None).await.unwrap();
    let got = members[1].client().await.get("auto", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"peer");
    assert!(members[1].data_dir.join("fixtures/peer/cert.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_take_rotated_peer_certificates_and_ca_without_a_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (cert, key, ca) = (at("peer.pem"), at("peer-key.pem"), at("ca.pem"));
    std::fs::copy(pki.path("peer"), &cert).unwrap();
    std::fs::copy(pki.key("peer"), &key).unwrap();
    std::fs::copy(pki.path("ca"), &ca).unwrap();
    let flags = peer_flags_at(&cert, &key, &ca, ALLOWED_CN);
    let members = (0..2).map(|i| peer_member(&format!("r{i}"), &flags)).collect();
    let mut cluster = Cluster::start_members(members, Vec::new()).await;
    let mut first = cluster.members[0].client().await;
    wait_writable(&mut first).await;
    first.put("before-rotation", "1", None).await.unwrap();

    // Every member's files move to CA 2 (certificate, key and trusted CA), then member 1
    // restarts: it presents and trusts only CA 2 now, so member 0, which keeps running,
    // must have reloaded its files for the two to talk again (a two-member cluster
    // commits nothing without both).
    for (from, to) in [(pki.path("peer2"), &cert), (pki.key("peer2"), &key), (pki.path("ca2"), &ca)]
    {
        std::fs::copy(from, at("next.pem")).unwrap();
        std::fs::rename(at("next.pem"), to).unwrap();
    }
    cluster.members[1].restart().await;
    let mut second = cluster.members[1].client().await;
    wait_writable(&mut second).await;
    second.put("after-rotation", "2", None).await.unwrap();
    let got = first.get("after-rotation", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"2");
    assert!(cluster.members[0].is_running());
}

/// Revokes `revoked` (a leaf of CA 1) and writes CA 1's CRL to `crl.pem`; returns its path.
fn revoke(pki: &Pki, revoked: &str) -> String {
    let d = pki.dir.path();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\ndefault_ca = ca1\n[ca1]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
         default_md = sha256\ndefault_crl_days = 2\ncertificate = ca.pem\nprivate_key = ca-key.pem\n",
    )
    .unwrap();
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("crlnumber"), "01\n").unwrap();
    openssl(d, &["ca", "-config", "ca.cnf", "-revoke", &format!("{revoked}.pem")]);
    openssl(d, &["ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem"]);
    pki.path("crl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_on_the_crl_is_refused_and_others_are_served() {
    let pki = Pki::new();
    let crl = revoke(&pki, "intruder");
    let mut c = tls_member(&pki.server_flags(&["--client-cert-auth", "--client-crl-file", &crl]));
    start_tls(&mut c, &pki.client_tls("ca", Some("client"))).await;
    let mut good = tls_client(&c.client_url, pki.client_tls("ca", Some("client"))).await.unwrap();
    good.put("k", "v", None).await.unwrap();
    let revoked = match tls_client(&c.client_url, pki.client_tls("ca", Some("intruder"))).await {
        Ok(mut client) => client.get("k", None).await.is_err(),
        Err(_) => true,
    };
    assert!(revoked, "a revoked certificate was served");
    // A CRL without a CA to verify against, or an unreadable one, stops the start.
    let (ok, out) = Cairn::new("x", tempfile::tempdir().unwrap(), &["--client-crl-file", &crl])
        .run_for(Duration::from_secs(10));
    assert_eq!(ok, Some(false), "{out}");
    assert!(out.contains("client-crl-file"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_client_certificates_valid_for_the_allowed_hostname_are_served() {
    let pki = Pki::new();
    // Every test certificate names localhost and 127.0.0.1.
    let mut ok = tls_member(&pki.server_flags(&[
        "--client-cert-auth",
        "--client-cert-allowed-hostname",
        "localhost",
    ]));
    start_tls(&mut ok, &pki.client_tls("ca", Some("client"))).await;
    let mut other = tls_member(&pki.server_flags(&[
        "--client-cert-auth",
        "--client-cert-allowed-hostname",
        "db.example.com",
    ]));
    other.spawn_only();
    let mut probe = Client::connect([ok.client_url.as_str()], None).await;
    assert!(probe.is_err() || probe.as_mut().unwrap().get("k", None).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    // The member runs, and refuses the certificate at every try.
    while Instant::now() < deadline {
        assert!(other.is_running(), "cairn exited");
        let refused =
            match tls_client(&other.client_url, pki.client_tls("ca", Some("client"))).await {
                Ok(mut c) => c.get("k", None).await.is_err(),
                Err(_) => true,
            };
        assert!(refused, "a certificate not valid for the allowed hostname was served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (started, out) = Cairn::new(
        "x",
        tempfile::tempdir().unwrap(),
        &["--peer-cert-allowed-hostname", "localhost", "--peer-cert-allowed-cn", "member"],
    )
    .run_for(Duration::from_secs(10));
    assert_eq!(started, Some(false), "{out}");
    assert!(out.contains("peer-cert-allowed-hostname"), "{out}");
}
