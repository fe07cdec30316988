//! The Secrets `spec.tls` names: read every pass (so a rotated Secret is used from the next
//! pass on), checked for `tls.crt`, `tls.key` and `ca.crt` (each PEM that parses, the key
//! matching the certificate), and the client one turned into the operator's own client TLS
//! towards the members ([`etcd::Tls`]).
//!
//! A Secret that is missing or incomplete is a problem the user must fix, reported as a
//! message (the reconciler turns it into a Degraded condition and an Event); only a failing
//! API call is an error.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::crd::ClusterSpec;
use crate::{Result, etcd};

/// The keys every TLS Secret must hold (the `kubernetes.io/tls` shape with its CA).
pub const KEYS: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// What `spec.tls` gives this pass: the operator's client TLS when client TLS is on, or
/// why the Secrets cannot be used.
///
/// # Errors
/// A failed API call (other than the Secret not existing).
pub async fn load(
    client: &kube::Client,
    ns: &str,
    spec: &ClusterSpec,
) -> Result<Result<Option<etcd::Tls>, String>> {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    if let Some(name) = spec.peer_tls() {
        // Parsed too, so that a Secret the store could not load is reported here rather
        // than by members failing to start.
        let checked = read(&api, name, "spec.tls.peer").await?.and_then(|[cert, key, ca]| {
            etcd::Tls::from_pem(&ca, &cert, &key)
                .map_err(|e| format!("spec.tls.peer: Secret {name}: {e}"))
        });
        if let Err(why) = checked {
            return Ok(Err(why));
        }
    }
    let Some(name) = spec.client_tls() else { return Ok(Ok(None)) };
    let [cert, key, ca] = match read(&api, name, "spec.tls.client").await? {
        Ok(parts) => parts,
        Err(why) => return Ok(Err(why)),
    };
    Ok(etcd::Tls::from_pem(&ca, &cert, &key)
        .map(Some)
        .map_err(|e| format!("spec.tls.client: Secret {name}: {e}")))
}

/// The Secret's `tls.crt`, `tls.key` and `ca.crt`, or what is wrong with it.
async fn read(api: &Api<Secret>, name: &str, field: &str) -> Result<Result<[Vec<u8>; 3], String>> {
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(Err(format!("{field}: Secret {name} does not exist")));
    };
    Ok(parts(&secret).map_err(|missing| {
        format!(
            "{field}: Secret {name} has no {} (it needs {})",
            missing.join(", "),
            KEYS.join(", ")
        )
    }))
}

/// The three keys' bytes, or the keys that are missing or empty.
fn parts(secret: &Secret) -> std::result::Result<[Vec<u8>; 3], Vec<&'static str>> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |k: &str| data.get(k).map(|v| v.0.clone()).filter(|v| !v.is_empty());
    let missing: Vec<&'static str> = KEYS.into_iter().filter(|k| get(k).is_none()).collect();
    match (get("tls.crt"), get("tls.key"), get("ca.crt")) {
        (Some(cert), Some(key), Some(ca)) => Ok([cert, key, ca]),
        _ => Err(missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn missing_and_empty_keys_are_named() {
        let mut s = Secret::default();
        assert_eq!(parts(&s).unwrap_err(), KEYS.to_vec());
        s.data = Some(
            [("tls.crt", "c"), ("tls.key", "k"), ("ca.crt", "")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        assert_eq!(parts(&s).unwrap_err(), vec!["ca.crt"]);
    }
}
