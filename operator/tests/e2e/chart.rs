//! The Helm chart (`charts/cairn-operator/`) end to end, plus the checks that keep it in step
//! with the code:
//! - the chart's `crds/` are byte-identical to the generated `crds/`; its appVersion is
//!   this crate's version; `operator/rbac.yaml` holds the chart's RBAC rules (one source:
//!   `files/rbac/`);
//! - on a test bed of its own (so that the shared bed's operator process does not reconcile
//!   the same Clusters): `helm install` with a Cluster from values; the operator pod from the
//!   chart (in-cluster config, its own ServiceAccount token, so the chart's RBAC is what it
//!   gets) applies its CRDs and reconciles the Cluster to Available; `helm test` writes and
//!   reads a key through the Cluster (its pod run by the test kubelet); every metric an
//!   alert or a dashboard panel uses is in what the running stores and operator export;
//!   `helm upgrade` to a new operator tag makes a stale CRD current again (the new operator
//!   pods apply their CRDs; Helm never upgrades `crds/`); the chart rendered with defaults
//!   and with every optional part on passes the API server's dry run; `helm uninstall`
//!   leaves the Cluster and the CRDs in place.
//!
//! What the bed cannot check: the monitoring.coreos.com objects (ServiceMonitor, PodMonitor,
//! PrometheusRule) are left out of the dry run, since no prometheus-operator CRDs can be
//! had here; the rules inside are checked by `promtool` (scripts/test.sh, when cached).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use cairn_operator::crd::Cluster;
use kube::api::Api;
use serde_json::Value;

use crate::bed::{Bed, wait_for};

/// The helm version scripts/helm.sh builds by default.
const DEFAULT_HELM_VERSION: &str = "v4.3.2";

/// Long enough for three members to start, join and be promoted on two shared cores.
const FORM_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn chart_dir() -> PathBuf {
    repo().join("charts/cairn-operator")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// The cache of scripts/k8s.sh and scripts/helm.sh: `CAIRN_CACHE_DIR`, else ~/.cache/cairn.
fn cache_root() -> PathBuf {
    std::env::var_os("CAIRN_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/cairn")
    })
}

/// `CAIRN_HELM_BIN`, else the scripts/helm.sh cache.
fn helm_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAIRN_HELM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let version =
        std::env::var("CAIRN_HELM_VERSION").unwrap_or_else(|_| DEFAULT_HELM_VERSION.to_owned());
    let cache = cache_root();
    let path = cache.join("helm").join(version).join("helm");
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{} is missing: run `scripts/helm.sh build` or set CAIRN_HELM_BIN", path.display())
    }
}

async fn helm(bed: &Bed, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(360),
        tokio::process::Command::new(helm_bin()?)
            .arg(format!("--kubeconfig={}", bed.kubeconfig().display()))
            .args(args)
            .env("HELM_CACHE_HOME", bed.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", bed.dir().join("helm/config"))
            .env("HELM_DATA_HOME", bed.dir().join("helm/data"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("helm {} did not finish in 360s", args.join(" ")))??;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "helm {} failed ({}): {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )
    }
}

/// `helm template` of the chart with `args` (no cluster needed), as YAML documents.
fn render(args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(helm_bin().unwrap())
        .args(["template", "t", chart_dir().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

/// promtool from `CAIRN_PROMTOOL_BIN` or the scripts/helm.sh cache, if built.
fn promtool_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAIRN_PROMTOOL_BIN") {
        return Some(PathBuf::from(p));
    }
    let cache = cache_root();
    let path = cache.join("promtool/v0.316.0/promtool");
    path.is_file().then_some(path)
}

#[test]
fn rendered_prometheus_rule_takes_the_selector_and_leaves_out_disabled_alerts() {
    let file: Value =
        serde_saphyr::from_str(&read(&chart_dir().join("files/monitoring/alerts.yaml"))).unwrap();
    let in_file: usize = file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    let docs = render(&[
        "--set=metrics.prometheusRule.enabled=true",
        r#"--set=metrics.prometheusRule.storeSelector=job="etcd-main""#,
        "--set=metrics.prometheusRule.disabled={etcdNoLeader}",
        "--set=metrics.prometheusRule.additionalRules[0].alert=Extra",
        "--set=metrics.prometheusRule.additionalRules[0].expr=vector(1)",
    ]);
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("no PrometheusRule");
    let groups = rule["spec"]["groups"].as_array().unwrap();
    let alerts: Vec<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(alerts.len(), in_file, "one disabled, one added: {alerts:?}");
    assert!(!alerts.contains(&"etcdNoLeader") && alerts.contains(&"Extra"), "{alerts:?}");
    let text = serde_json::to_string(&rule["spec"]).unwrap();
    assert!(!text.contains(".*cairn.*") && text.contains(r#"job=\"etcd-main\""#), "{text}");

    // The rendered groups are a valid Prometheus rule file (JSON is YAML).
    match promtool_bin() {
        Some(promtool) => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("rules.yaml");
            std::fs::write(&path, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
            let out = std::process::Command::new(promtool)
                .arg("check")
                .arg("rules")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool check rules: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        None => eprintln!(
            "promtool not built (scripts/helm.sh build-promtool): rendered rules not checked by promtool"
        ),
    }
}

/// Every key of `values.yaml` is typed by `values.schema.json` (down to where the schema
/// deliberately leaves an object free-form, such as `resources` or `cluster.spec`'s
/// Kubernetes fields).
#[test]
fn values_schema_types_every_value() {
    fn walk(path: &str, value: &Value, schema: &Value, missing: &mut Vec<String>) {
        let Some(map) = value.as_object() else { return };
        let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
        for (k, v) in map {
            let here = format!("{path}.{k}");
            match props.get(k) {
                Some(sub) => {
                    assert!(sub.get("type").is_some(), "{here} has no type in values.schema.json");
                    walk(&here, v, sub, missing);
                }
                None => missing.push(here),
            }
        }
    }
    let values: Value = serde_saphyr::from_str(&read(&chart_dir().join("values.yaml"))).unwrap();
    let schema: Value =
        serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).unwrap();
    assert_eq!(
        schema["additionalProperties"],
        Value::Bool(false),
        "unknown top-level keys must fail"
    );
    let mut missing = Vec::new();
    walk("", &values, &schema, &mut missing);
    assert!(missing.is_empty(), "values without a schema entry: {missing:?}");
}

#[test]
fn defaults_render_only_the_operator_hardened_and_electing_a_leader() {
    let docs = render(&[]);
    let kinds: BTreeSet<String> =
        docs.iter().filter_map(|d| d["kind"].as_str().map(str::to_owned)).collect();
    let want: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds, want);
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for want in [
        "--leader-election=true",
        "--apply-crds=true",
        "--default-repository=ghcr.io/cairn-dev/cairn",
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    assert_eq!(
        c["image"],
        format!("ghcr.io/cairn-dev/cairn-operator:{}", env!("CARGO_PKG_VERSION"))
    );
}

/// Every optional part of the chart switched on.
const ALL_ON: &[&str] = &[
    "--set=metrics.serviceMonitor.enabled=true",
    "--set=metrics.podMonitor.enabled=true",
    "--set=metrics.prometheusRule.enabled=true",
    "--set=grafanaDashboard.enabled=true",
    "--set=cluster.create=true",
    "--set=replicaCount=2",
];

#[test]
fn chart_crds_are_the_generated_crds() {
    for file in ["cluster.yaml", "backup.yaml"] {
        assert!(
            read(&chart_dir().join("crds").join(file)) == read(&repo().join("crds").join(file)),
            "charts/cairn-operator/crds/{file} differs from crds/{file}: cp crds/{file} charts/cairn-operator/crds/"
        );
    }
}

#[test]
fn chart_app_version_is_the_operator_crate_version() {
    let chart: Value = serde_saphyr::from_str(&read(&chart_dir().join("Chart.yaml"))).unwrap();
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));
}

#[test]
fn operator_rbac_yaml_holds_the_chart_rules() {
    let docs = yaml_docs(&read(&repo().join("operator/rbac.yaml")));
    let rules = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in operator/rbac.yaml"))["rules"]
            .clone()
    };
    let file = |name: &str| -> Value {
        serde_saphyr::from_str(&read(&chart_dir().join("files/rbac").join(name))).unwrap()
    };
    assert_eq!(rules("ClusterRole"), file("operator-rules.yaml"), "ClusterRole rules differ");
    assert_eq!(rules("Role"), file("leader-election-rules.yaml"), "leader-election rules differ");
}

/// The metric names a PromQL expression reads (label names, functions, keywords, label
/// values and durations left out).
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Drop string literals, label matchers and range/subquery brackets first.
    let mut flat = String::new();
    let mut chars = expr.chars().peekable();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                flat.push(' ');
            }
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => flat.push(c),
        }
    }
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan", // operators and literals
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio", // aggregations: `max by (x) (...)`
    ];
    let mut names = BTreeSet::new();
    let bytes: Vec<char> = flat.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() || c == '.' {
            // A number (or a duration such as 5m): skip it whole.
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len()
            && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':')
        {
            i += 1;
        }
        let word: String = bytes[start..i].iter().collect();
        let mut j = i;
        while j < bytes.len() && bytes[j].is_whitespace() {
            j += 1;
        }
        let called = j < bytes.len() && bytes[j] == '(';
        if GROUPING.contains(&word.as_str()) {
            // Skip the label list that follows.
            if called {
                while j < bytes.len() && bytes[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            }
            continue;
        }
        if called || KEYWORDS.contains(&word.as_str()) {
            continue;
        }
        names.insert(word);
    }
    names
}

#[test]
fn promql_metric_names_are_found() {
    let names = promql_metrics(
        r#"histogram_quantile(0.99, sum(rate(grpc_server_handling_seconds_bucket{job=~".*", grpc_type="unary"}[5m])) without(grpc_type)) > 0.15 and on (namespace) up == bool 0 or 0*absent(etcd_x{a="b"})[15m:1m] or max without (endpoint) (count by (To) (etcd_y))"#,
    );
    let want: BTreeSet<String> = ["grpc_server_handling_seconds_bucket", "up", "etcd_x", "etcd_y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
}

/// Every expression of the alert rules and the dashboard panels.
fn monitoring_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let rules: Value =
        serde_saphyr::from_str(&read(&chart_dir().join("files/monitoring/alerts.yaml"))).unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read(&chart_dir().join("files/monitoring/dashboard.json"))).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or_default()),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(out.len() > 20, "too few expressions found: {out:?}");
    out
}

/// The metric names a Prometheus text exposition offers: sample names, plus the series a
/// declared histogram or summary family yields even before its first sample.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            names.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", url])
        .output()
        .await
        .context("running curl")?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a bed of this test's own (not the shared one: its operator process watches every
/// namespace and would reconcile the chart's Cluster too).
fn own_bed() -> Bed {
    std::thread::spawn(Bed::start_blocking).join().unwrap().expect("starting a test bed")
}

fn condition_true(c: &Cluster, type_: &str) -> bool {
    c.status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|x| x.type_ == type_ && x.status == "True"))
}

/// The holder of the chart's leader-election Lease (release `cairn`).
async fn lease_holder(bed: &Bed, ns: &str) -> anyhow::Result<String> {
    let args =
        ["-n", ns, "get", "lease", "cairn-cairn-operator", "-o", "jsonpath={.spec.holderIdentity}"];
    Ok(bed.kubectl(&args).await?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_the_operator_that_makes_a_cluster_available() {
    let helm_path = helm_bin().unwrap();
    eprintln!("chart: using {}", helm_path.display());
    let bed = own_bed();
    let ns = bed.namespace("chart").await.unwrap();
    let _dump = bed.dump_on_failure(&ns);
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();

    // Install: the operator (2 replicas, one leads) and a 3-member Cluster from values.
    // POD_IP: on the bed every pod shares the host network (bed-contract.md).
    let install = helm(
        &bed,
        &[
            "install",
            "cairn",
            chart,
            "--namespace",
            &ns,
            "--set=cluster.create=true",
            "--set=cluster.spec.storage.size=1Gi",
            "--set=cluster.spec.backup.schedule=0 * * * *",
            "--set=cluster.spec.backup.destination.pvc.claimName=backups",
            "--set=replicaCount=2",
            "--set=operator.listenAddress=$(POD_IP)",
            "--set=logFormat=text",
        ],
    )
    .await
    .unwrap();
    eprintln!("chart: helm install:\n{install}");
    assert!(install.contains("helm test cairn"), "NOTES.txt does not say what to do next");

    let client = bed.client().await.unwrap();
    let clusters: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    wait_for("Cluster main to be Available", FORM_TIMEOUT, || async {
        let c = clusters.get("main").await?;
        let ready = c.status.as_ref().map_or(0, |s| s.ready_replicas);
        Ok((condition_true(&c, "Available") && ready == 3).then_some(()))
    })
    .await
    .unwrap();

    // The operator pod applied its CRDs (--apply-crds) with its own, chart-made RBAC.
    let managers = bed
        .kubectl(&[
            "get",
            "crd",
            "clusters.cairn.dev",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ])
        .await
        .unwrap();
    assert!(managers.contains("cairn-operator"), "CRD managers: {managers}");
    let holder = lease_holder(&bed, &ns).await.unwrap();
    assert!(holder.starts_with("cairn-cairn-operator-"), "Lease holder {holder:?}");

    // helm test: the hook pod writes and reads a key through the Cluster.
    let test = helm(&bed, &["test", "cairn", "--namespace", &ns, "--timeout=5m"]).await.unwrap();
    eprintln!("chart: helm test:\n{test}");
    assert!(test.contains("Succeeded"), "helm test did not report success: {test}");
    let test_log = std::fs::read_to_string(
        bed.dir().join("logs").join(format!("{ns}_cairn-cairn-operator-test_put-get.log")),
    )
    .unwrap();
    assert!(test_log.contains("wrote and read back a key through"), "helm test pod: {test_log}");

    // Metrics: every series an alert or a panel reads is exported. The backup gauge needs a
    // successful backup: a one-shot Backup into a claim, run by the chart's operator as a Job.
    bed.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: backups, namespace: {ns}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n---\napiVersion: cairn.dev/v1alpha1\nkind: Backup\nmetadata: {{name: first, namespace: {ns}}}\nspec:\n  clusterName: main\n  destination: {{pvc: {{claimName: backups}}}}\n"
    ))
    .await
    .unwrap();
    let pods = bed
        .kubectl(&[
            "-n",
            &ns,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=cairn-operator",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .await
        .unwrap();
    let operator_pod = holder.clone();
    assert!(pods.split_whitespace().any(|p| p == operator_pod), "{operator_pod} not in {pods}");
    let operator_ip = bed.pod_ip(&ns, &operator_pod).unwrap();
    let operator_text =
        wait_for("the operator to export the backup gauge", Duration::from_secs(90), || async {
            let text = scrape(&format!("http://{operator_ip}:8080/metrics")).await?;
            Ok(text.contains("cairn_operator_backup_last_success_timestamp{").then_some(text))
        })
        .await
        .unwrap();
    assert!(
        operator_text
            .contains(r#"cairn_operator_backup_last_success_timestamp{cluster="main",namespace=""#),
        "no backup gauge for the Cluster after its backup:\n{operator_text}"
    );
    let store_ip = bed.pod_ip(&ns, "main-0").unwrap();
    // The port the PodMonitor scrapes (`metrics`, the plain --listen-metrics-urls listener).
    let store_text = scrape(&format!("http://{store_ip}:2381/metrics")).await.unwrap();
    let mut exported = exported_names(&store_text);
    exported.extend(exported_names(&operator_text));
    // `up` is Prometheus's own series for every target.
    exported.insert("up".to_owned());
    let mut missing = Vec::new();
    for (what, expr) in monitoring_exprs() {
        for name in promql_metrics(&expr) {
            if !exported.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "metrics used but not exported:\n{}", missing.join("\n"));

    // helm upgrade brings the CRDs along: a stale CRD (printer columns removed by someone
    // else) is made current again by the new operator pods (--apply-crds), since Helm itself
    // never upgrades crds/. The new tag maps to the same binary on the bed.
    bed.kubectl(&[
        "patch",
        "crd",
        "clusters.cairn.dev",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/versions/0/additionalPrinterColumns"}]"#,
    ])
    .await
    .unwrap();
    let columns = || async {
        bed.kubectl(&[
            "get",
            "crd",
            "clusters.cairn.dev",
            "-o",
            "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}",
        ])
        .await
    };
    assert_eq!(columns().await.unwrap().trim(), "", "the CRD was not made stale");
    helm(
        &bed,
        &[
            "upgrade",
            "cairn",
            chart,
            "--namespace",
            &ns,
            "--reuse-values",
            "--set=image.tag=0.1.0-upgrade",
        ],
    )
    .await
    .unwrap();
    wait_for("the upgraded operator to re-apply the CRD", Duration::from_secs(120), || async {
        let names = columns().await?;
        Ok(names.contains("Phase").then_some(()))
    })
    .await
    .unwrap();
    wait_for("the upgraded operator to hold the Lease", Duration::from_secs(120), || async {
        let holder = lease_holder(&bed, &ns).await?;
        let image = bed
            .kubectl(&[
                "-n",
                &ns,
                "get",
                "pod",
                &holder,
                "-o",
                "jsonpath={.spec.containers[0].image}",
            ])
            .await
            .unwrap_or_default();
        Ok(image.ends_with(":0.1.0-upgrade").then_some(()))
    })
    .await
    .unwrap();
    assert!(condition_true(&clusters.get("main").await.unwrap(), "Available"));

    // The chart rendered with defaults and with every optional part on passes the API
    // server's dry run (under other release names and namespaces, so nothing clashes with
    // the installed release).
    for (release, extra) in [("defaults", &[][..]), ("all-on", ALL_ON)] {
        let target = bed.namespace(release).await.unwrap();
        let mut args = vec!["template", release, chart, "--namespace", target.as_str()];
        args.extend(extra.iter().copied());
        let rendered = helm(&bed, &args).await.unwrap();
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        for doc in yaml_docs(&rendered) {
            let api = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
            if api.starts_with("monitoring.coreos.com/") {
                skipped.push(doc["kind"].as_str().unwrap_or_default().to_owned());
            } else {
                kept.push(doc);
            }
        }
        if release == "all-on" {
            skipped.sort();
            assert_eq!(skipped, ["PodMonitor", "PrometheusRule", "ServiceMonitor"]);
            let kinds: Vec<&str> = kept.iter().filter_map(|d| d["kind"].as_str()).collect();
            for kind in [
                "Deployment",
                "ClusterRole",
                "Role",
                "ServiceAccount",
                "Service",
                "ConfigMap",
                "Cluster",
                "Pod",
            ] {
                assert!(kinds.contains(&kind), "{kind} not rendered: {kinds:?}");
            }
        }
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": kept});
        let out = bed
            .kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&list.to_string()))
            .await
            .unwrap_or_else(|e| panic!("dry run of the {release} rendering: {e:#}"));
        eprintln!("chart: dry run ({release}):\n{out}");
    }

    // Uninstall keeps the Cluster (helm.sh/resource-policy: keep) and the CRDs (crds/).
    helm(&bed, &["uninstall", "cairn", "--namespace", &ns, "--wait", "--timeout=2m"])
        .await
        .unwrap();
    wait_for("the operator Deployment to go", Duration::from_secs(60), || async {
        let out = bed.kubectl(&["-n", &ns, "get", "deploy", "-o", "name"]).await?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await
    .unwrap();
    assert!(
        clusters.get_opt("main").await.unwrap().is_some(),
        "helm uninstall deleted the Cluster"
    );
    bed.kubectl(&["get", "crd", "clusters.cairn.dev", "backups.cairn.dev"]).await.unwrap();
    drop(_dump);
}
