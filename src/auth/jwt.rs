//! JWT tokens (etcd's `--auth-token jwt,...`, server/auth/jwt.go).
//!
//! A JWT carries the user name, the auth revision it was issued at and its expiry
//! (`{"username", "revision", "exp"}`), signed with the private key. Any member holding the
//! public key verifies it without shared state, so nothing is kept per token; an auth
//! change makes every earlier token "revision of auth store is old" for writes, and the
//! client authenticates again, as with etcd.
//!
//! Options (etcd's): `sign-method` (RS256/384/512, PS256/384/512, ES256/384, EdDSA,
//! HS256/384/512), `pub-key` and `priv-key` (PEM files; HMAC methods use the private key
//! file's bytes as the secret), `ttl` (a Go duration, default 5m). Without `priv-key` the
//! member only verifies tokens. ES512 is refused (the crypto provider lacks P-521 signing).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

use super::{AuthInfo, Error};

/// Signs and verifies JWT auth tokens.
pub struct JwtProvider {
    algorithm: Algorithm,
    signing: Option<EncodingKey>,
    verifying: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for JwtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtProvider")
            .field("algorithm", &self.algorithm)
            .field("signs", &self.signing.is_some())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM key of one kind.
type KeyReader<K> = fn(&[u8]) -> jsonwebtoken::errors::Result<K>;

fn bad(reason: impl Into<String>) -> Error {
    Error::Storage(format!("--auth-token jwt: {}", reason.into()))
}

fn read(path: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(Path::new(path)).map_err(|e| bad(format!("cannot read {path}: {e}")))
}

impl JwtProvider {
    /// Builds the provider from etcd's option string after `jwt,`
    /// (`sign-method=RS256,pub-key=...,priv-key=...,ttl=10m`), reading the key files.
    ///
    /// # Errors
    /// An unknown option or method, a missing key, or an unreadable or malformed key.
    pub fn from_options(options: &str) -> Result<Self, Error> {
        let (mut method, mut pub_key, mut priv_key, mut ttl) = (None, None, None, None);
        for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (k, v) =
                opt.split_once('=').ok_or_else(|| bad(format!("option {opt:?} has no value")))?;
            match k {
                "sign-method" => method = Some(v),
                "pub-key" => pub_key = Some(v),
                "priv-key" => priv_key = Some(v),
                "ttl" => {
                    let d = crate::config::parse_go_duration(v);
                    ttl = Some(d.ok_or_else(|| bad(format!("bad ttl {v:?}")))?);
                }
                other => return Err(bad(format!("unknown option {other:?}"))),
            }
        }
        let method = method.ok_or_else(|| bad("sign-method is required"))?;
        let algorithm = match method {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => return Err(bad(format!("unsupported sign-method {other:?}"))),
        };
        let pem = |e: jsonwebtoken::errors::Error| bad(format!("bad key: {e}"));
        let (signing, verifying) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = read(priv_key.ok_or_else(|| bad("HMAC needs priv-key"))?)?;
                (Some(EncodingKey::from_secret(&secret)), DecodingKey::from_secret(&secret))
            }
            _ => {
                let public = read(pub_key.ok_or_else(|| bad("pub-key is required"))?)?;
                let private = priv_key.map(read).transpose()?;
                let (enc, dec): (KeyReader<EncodingKey>, KeyReader<DecodingKey>) = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => {
                        (EncodingKey::from_ec_pem, DecodingKey::from_ec_pem)
                    }
                    Algorithm::EdDSA => (EncodingKey::from_ed_pem, DecodingKey::from_ed_pem),
                    _ => (EncodingKey::from_rsa_pem, DecodingKey::from_rsa_pem),
                };
                (private.map(|p| enc(&p)).transpose().map_err(pem)?, dec(&public).map_err(pem)?)
            }
        };
        Ok(JwtProvider {
            algorithm,
            signing,
            verifying,
            ttl: ttl.unwrap_or(Duration::from_secs(300)),
        })
    }

    /// Signs a token for `username` at auth `revision`, valid for the ttl.
    ///
    /// # Errors
    /// A verify-only provider (no `priv-key`), or a signing failure.
    pub fn sign(&self, username: &str, revision: u64) -> Result<String, Error> {
        let key = self.signing.as_ref().ok_or_else(|| {
            Error::Storage("auth: token signing attempted with verify-only key".into())
        })?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // The claims etcd puts in its tokens.
        let claims = serde_json::json!({
            "username": username,
            "revision": revision,
            "exp": (now + self.ttl).as_secs(),
        });
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| Error::Storage(format!("jwt: {e}")))
    }

    /// The user and revision a valid, unexpired token names.
    ///
    /// # Errors
    /// [`Error::InvalidToken`].
    pub fn verify(&self, token: &str) -> Result<AuthInfo, Error> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.verifying, &validation)
            .map_err(|_| Error::InvalidToken)?;
        let claims = data.claims;
        let username =
            claims.get("username").and_then(|v| v.as_str()).ok_or(Error::InvalidToken)?;
        // Go's JSON numbers are floats: etcd's own tokens may carry "revision": 7.0.
        let revision = claims
            .get("revision")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or(Error::InvalidToken)?;
        Ok(AuthInfo { username: username.to_owned(), revision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hmac_token_round_trips_and_a_forged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, b"a secret of some length").unwrap();
        let opts = format!("sign-method=HS256,priv-key={},ttl=60s", key.display());
        let p = JwtProvider::from_options(&opts).unwrap();
        let token = p.sign("alice", 7).unwrap();
        assert_eq!(p.verify(&token).unwrap(), AuthInfo { username: "alice".into(), revision: 7 });
        let mut forged = token.clone();
        forged.pop();
        assert_eq!(p.verify(&forged), Err(Error::InvalidToken));
        assert!(JwtProvider::from_options("sign-method=ES512,pub-key=x").is_err());
        assert!(JwtProvider::from_options("sign-method=RS256").is_err());
        assert!(JwtProvider::from_options("colour=blue").is_err());
    }
}
