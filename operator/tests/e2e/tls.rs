//! `spec.tls` on the test bed: a CA and a member certificate made with openssl (serverAuth
//! and clientAuth, wildcard SANs for the pod DNS names the bed resolves, 127.0.0.1 and the
//! bed's pod IP blocks), put in `kubernetes.io/tls` Secrets with `ca.crt`; a 3-member Cluster with
//! client and peer TLS becomes Available (the operator reaching its members over mutual TLS,
//! the probes answered by the plain metrics listener); then etcdctl with the certificate
//! writes and reads through every member's https client URL, a client without a certificate
//! and a plain-http one are refused, the member list's peer URLs are https, `/metrics` is
//! scraped over plain http on 2381, the cluster grows by one member (a learner added and
//! promoted over TLS) and a Backup Job saves a snapshot over TLS. Bad input: a Secret that
//! does not exist, one without `ca.crt` and one whose `ca.crt` holds no certificate each give
//! a Degraded `TLSSecretInvalid` condition and an Event, and no store pod.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_operator::crd::{Backup, Cluster};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::Api;

use crate::bed::{self, Bed, wait_for};
use crate::operator::{STEP_TIMEOUT, condition, events, manifest, operator, settled, status};

/// The files a client presents: CA, certificate, key.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and one certificate for every member of `cluster` in `ns` (server and client use).
fn make_certs(dir: &Path, ns: &str, cluster: &str) -> Certs {
    std::fs::create_dir_all(dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=cairn-e2e-ca"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=cairn-member"]);
    openssl(dir, &req);
    // A wildcard for the member names (as README and operator/examples/cluster-tls.yaml
    // recommend), so any ordinal a scale-up adds is covered.
    let mut sans = vec![
        format!("DNS:*.{cluster}-peer.{ns}.svc"),
        format!("DNS:*.{cluster}-peer.{ns}.svc.cluster.local"),
    ];
    sans.push(format!("DNS:{cluster}-client.{ns}.svc"));
    sans.push("IP:127.0.0.1".into());
    // The bed's pod IPs: 127.0.<block>.<n> (block 1, or 2 when another bed holds 1).
    for block in 1..=2 {
        for n in 2..=40 {
            sans.push(format!("IP:127.0.{block}.{n}"));
        }
    }
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
            sans.join(",")
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    Certs { ca: dir.join("ca.crt"), cert: dir.join("tls.crt"), key: dir.join("tls.key") }
}

/// Creates Secret `name` (type kubernetes.io/tls) from `files` (key, path).
async fn secret(bed: &Bed, ns: &str, name: &str, files: &[(&str, &Path)]) {
    let mut args = vec![
        "create".to_owned(),
        "secret".into(),
        "generic".into(),
        name.into(),
        "-n".into(),
        ns.into(),
        "--type=kubernetes.io/tls".into(),
    ];
    for (k, p) in files {
        args.push(format!("--from-file={k}={}", p.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bed.kubectl(&args).await.unwrap();
}

fn etcdctl_bin() -> String {
    std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".into())
}

/// Runs etcdctl against `endpoint` with `tls` flags; (success, stdout + stderr).
async fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=3s", "--command-timeout=8s"])
        .args(tls)
        .args(args)
        .output()
        .await
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn https(ns: &str, cluster: &str, ordinal: u32) -> String {
    format!("https://{cluster}-{ordinal}.{cluster}-peer.{ns}.svc:2379")
}

/// A Degraded condition with reason TLSSecretInvalid whose message contains `want`.
async fn tls_refused(api: &Api<Cluster>, name: &str, want: &str) {
    let c = wait_for(&format!("{name}: Degraded TLSSecretInvalid"), STEP_TIMEOUT, || async {
        let s = status(api, name).await?;
        Ok(condition(&s, "Degraded")
            .filter(|c| c.status == "True" && c.reason == "TLSSecretInvalid")
            .cloned())
    })
    .await
    .unwrap();
    assert!(c.message.contains(want), "{c:?} does not say {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_client_and_peer_tls_serves_only_certified_clients() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-tls").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let certs = make_certs(&bed.dir().join("certs").join(&ns), &ns, "tls");
    let all = [("tls.crt", certs.cert.as_path()), ("tls.key", &certs.key), ("ca.crt", &certs.ca)];
    secret(bed, &ns, "tls-client", &all).await;
    secret(bed, &ns, "tls-peer", &all).await;
    secret(bed, &ns, "no-ca", &all[..2]).await;
    let key_as_ca = [all[0], all[1], ("ca.crt", certs.key.as_path())];
    secret(bed, &ns, "bad-ca", &key_as_ca).await;
    let tls_spec = |client: &str, peer: &str| {
        format!(
            "  tls:\n    client: {{secretRef: {{name: {client}}}}}\n    peer: {{secretRef: {{name: {peer}}}}}\n"
        )
    };

    // Bad input first: no pod is started, the condition says what to fix.
    bed.apply(&manifest(&ns, "absent", 1, &tls_spec("nosuch", "tls-peer"))).await.unwrap();
    bed.apply(&manifest(&ns, "noca", 1, &tls_spec("tls-client", "no-ca"))).await.unwrap();
    bed.apply(&manifest(&ns, "badca", 1, &tls_spec("tls-client", "bad-ca"))).await.unwrap();
    tls_refused(&api, "absent", "spec.tls.client: Secret nosuch does not exist").await;
    tls_refused(&api, "noca", "spec.tls.peer: Secret no-ca has no ca.crt").await;
    tls_refused(&api, "badca", "spec.tls.peer: Secret bad-ca: ca.crt: no PEM certificate").await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    assert!(sts.get_opt("absent").await.unwrap().is_none(), "pods made without their Secret");
    assert!(sts.get_opt("noca").await.unwrap().is_none(), "pods made without a CA");
    assert!(sts.get_opt("badca").await.unwrap().is_none(), "pods made with a CA that is no CA");
    let ev = events(bed, &ns).await;
    assert!(ev.contains("TLSSecretInvalid"), "{ev}");
    // spec.tls is immutable.
    let err = bed
        .kubectl(&[
            "patch",
            "cc",
            "noca",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"tls":null}}"#,
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.tls is immutable"), "{err}");
    bed.kubectl(&["delete", "cc", "absent", "noca", "badca", "-n", &ns, "--wait=false"])
        .await
        .unwrap();

    // Three members on client and peer TLS.
    let started = Instant::now();
    bed.apply(&manifest(&ns, "tls", 3, &tls_spec("tls-client", "tls-peer"))).await.unwrap();
    wait_for("tls: 3 voters, Available", STEP_TIMEOUT, || settled(&api, "tls", 3)).await.unwrap();
    eprintln!("tls: 3 members Available over TLS after {:.1}s", started.elapsed().as_secs_f64());

    let with_cert: Vec<String> = vec![
        format!("--cacert={}", certs.ca.display()),
        format!("--cert={}", certs.cert.display()),
        format!("--key={}", certs.key.display()),
    ];
    for o in 0..3 {
        let (ok, out) =
            etcdctl(&https(&ns, "tls", o), &with_cert, &["put", &format!("k{o}"), "v"]).await;
        assert!(ok, "put through member {o}: {out}");
    }
    for o in 0..3 {
        let (ok, out) =
            etcdctl(&https(&ns, "tls", o), &with_cert, &["get", "k", "--prefix", "--keys-only"])
                .await;
        assert!(ok, "get through member {o}: {out}");
        for k in ["k0", "k1", "k2"] {
            assert!(out.lines().any(|l| l == k), "member {o} lacks {k}: {out}");
        }
    }
    // No certificate: refused; plain http on the https port: refused.
    let ca_only = vec![format!("--cacert={}", certs.ca.display())];
    let (ok, out) = etcdctl(&https(&ns, "tls", 0), &ca_only, &["put", "nocert", "v"]).await;
    assert!(!ok, "a client without a certificate wrote: {out}");
    let plain = https(&ns, "tls", 1).replacen("https", "http", 1);
    let (ok, out) = etcdctl(&plain, &[], &["put", "plain", "v"]).await;
    assert!(!ok, "a plain-http client wrote: {out}");
    let (_, out) = etcdctl(&https(&ns, "tls", 2), &with_cert, &["get", "nocert", "--prefix"]).await;
    assert!(!out.contains("nocert"), "{out}");

    // Peer URLs are https in the store's own member list.
    let (ok, out) =
        etcdctl(&https(&ns, "tls", 0), &with_cert, &["member", "list", "-w", "json"]).await;
    assert!(ok, "{out}");
    // One JSON line on stdout (stderr follows in `out`).
    let list: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let peer_urls: Vec<&str> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["peerURLs"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()))
        .collect();
    assert_eq!(peer_urls.len(), 3, "{out}");
    assert!(peer_urls.iter().all(|u| u.starts_with("https://")), "{peer_urls:?}");
    let s = status(&api, "tls").await.unwrap();
    assert!(
        s.members
            .iter()
            .all(|m| m.client_url.as_deref().is_some_and(|u| u.starts_with("https://"))),
        "{:?}",
        s.members
    );

    // Metrics (what the PodMonitor scrapes) over plain http, no certificate.
    let ip = bed.pod_ip(&ns, "tls-0").unwrap();
    let scraped = tokio::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", &format!("http://{ip}:2381/metrics")])
        .output()
        .await
        .unwrap();
    assert!(scraped.status.success(), "{}", String::from_utf8_lossy(&scraped.stderr));
    assert!(String::from_utf8_lossy(&scraped.stdout).contains("etcd_server_has_leader 1"));

    // A fourth member joins over peer TLS (learner added and promoted by the operator).
    let grown = Instant::now();
    bed.kubectl(&["scale", "cc", "tls", "-n", &ns, "--replicas=4"]).await.unwrap();
    wait_for("tls: 4 voters", STEP_TIMEOUT, || settled(&api, "tls", 4)).await.unwrap();
    eprintln!("tls: grew to 4 members in {:.1}s", grown.elapsed().as_secs_f64());
    let (ok, out) = etcdctl(&https(&ns, "tls", 3), &with_cert, &["get", "k1"]).await;
    assert!(ok && out.contains("k1"), "the new member does not serve k1: {out}");

    // A Backup Job saves a snapshot over client TLS.
    bed.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: backups, namespace: {ns}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n---\napiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: snap, namespace: {ns}}}\nspec:\n  clusterName: tls\n  destination: {{pvc: {{claimName: backups}}}}\n"
    ))
    .await
    .unwrap();
    let backups: Api<Backup> = Api::namespaced(client.clone(), &ns);
    let b = crate::daytwo::succeeded(&backups, "snap").await;
    assert!(b.revision.unwrap_or(0) >= 4, "{b:?}");
    eprintln!("tls: backup over TLS, {} bytes at revision {:?}", b.size.unwrap_or(0), b.revision);
    bed.kubectl(&["delete", "cc", "tls", "-n", &ns, "--wait=false"]).await.unwrap();
}
