//! `cairn-operator`: a kube-rs controller that runs Cairn clusters on Kubernetes.
//!
//! It talks to the store only through the etcd v3 API (the `cairn-proto` stubs), so it
//! would manage a real etcd as well.
//!
//! Layout:
//! - [`crd`]: the `Cluster` and `Backup` resources and their schema rules.
//! - [`controller`]: the reconciler (observe → decide → act → status), its pure builders
//!   and the membership decision.
//! - [`etcd`]: the thin etcd v3 client (member list/add/remove/promote, status, move leader).
//! - [`election`]: leader election over a `coordination.k8s.io` Lease.
//! - [`metrics`]: the Prometheus registry and the operator's metrics.
//! - [`schedule`]: cron, `@every` and Go-duration parsing for the day-two schedules.

pub mod controller;
pub mod crd;
pub mod election;
pub mod etcd;
pub mod metrics;
pub mod schedule;

/// The one field manager of every server-side apply this operator makes.
pub const FIELD_MANAGER: &str = "cairn-operator";

/// Everything that can fail in a reconcile pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An etcd API call to a member failed.
    #[error("etcd API: {0}")]
    Etcd(#[from] etcd::Error),
    /// An object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// The spec cannot be turned into objects; the message says what to fix.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The Cluster CRD cannot be listed (not installed, or no permission).
    #[error(
        "the Cluster CRD is not queryable ({0}); install it with `kubectl apply -f crds/cluster.yaml`"
    )]
    CrdNotInstalled(kube::Error),
    /// A serialization of a built object failed.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
}

impl Error {
    /// A short label naming the failure kind in metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Etcd(_) => "etcd",
            Error::MissingObjectKey(_) => "missing_key",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Serialization(_) => "serialization",
            Error::CrdNotInstalled(_) => "crd_not_installed",
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Server-side applies the CRDs this operator serves (the same objects `crd_yaml` renders),
/// so that a new operator version brings its schema along (`--apply-crds`; Helm never
/// upgrades a chart's `crds/`).
///
/// # Errors
/// The first API error (for example no `patch` permission on the CRD).
pub async fn apply_crds(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{Api, Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for crd in [crd::Cluster::crd(), crd::Backup::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
        tracing::info!(crd = %name, "CRD applied");
    }
    Ok(())
}

/// Renders the CRDs this operator serves as one multi-document YAML, `kind` selecting one
/// (`cluster` or `backup`) or all.
///
/// # Errors
/// Fails only if serialization fails (the types are static, so a test covers it).
pub fn crd_yaml(kind: Option<&str>) -> Result<String, String> {
    use kube::CustomResourceExt;
    let mut docs = Vec::new();
    if kind.is_none_or(|k| k == "cluster") {
        docs.push(crd::Cluster::crd());
    }
    if kind.is_none_or(|k| k == "backup") {
        docs.push(crd::Backup::crd());
    }
    if docs.is_empty() {
        return Err(format!("unknown kind {kind:?}: expected cluster or backup"));
    }
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(d).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(file: &str) -> String {
        let path = format!("{}/../crds/{file}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn committed_crds_match_the_types() {
        for (kind, file) in [("cluster", "cluster.yaml"), ("backup", "backup.yaml")] {
            let generated = crd_yaml(Some(kind)).unwrap();
            assert!(
                generated == committed(file),
                "crds/{file} is stale: run `cargo run -p cairn-operator --bin crdgen -- {kind} > crds/{file}`"
            );
        }
    }

    #[test]
    fn unknown_kind_is_an_error() {
        assert!(crd_yaml(Some("pod")).is_err());
    }
}
