//! A small S3 client for backups: put (multipart for large files), get and delete of one
//! object, signed with AWS Signature Version 4, over hyper's HTTP/1.1 client (TLS by
//! rustls with the system's roots for `https://` endpoints).
//!
//! Only what `cairn snapshot upload | download | delete` needs, so no SDK: the protocol
//! facts (canonical request, string to sign, the derived signing key, the multipart calls
//! and their XML) are AWS's public S3 API. Path-style (`endpoint/bucket/key`) and
//! virtual-hosted (`bucket.endpoint/key`) addressing are both offered; MinIO, moto and most
//! self-hosted servers want path style.
//!
//! Every request is retried twice on a connection error or a 5xx answer (bodies are held in
//! memory per request: at most one part, so a part size bounds the memory used).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use super::Error;
use super::image::hex;

/// The smallest part S3 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The most parts one multipart upload may have.
const MAX_PARTS: u64 = 10_000;

/// Where and as whom to reach the bucket.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// The S3 endpoint (`http://host:port` or `https://...`); unset means AWS's regional one.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// The bucket's region (part of every signature).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`.
    #[arg(long, env = "CAIRN_S3_FORCE_PATH_STYLE")]
    pub force_path_style: bool,
    /// Access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub access_key_id: String,
    /// Secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_access_key: String,
    /// Session token of temporary credentials.
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    pub session_token: Option<String>,
}

/// An object's address: `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The bucket.
    pub bucket: String,
    /// The key (no leading slash).
    pub key: String,
}

impl Object {
    /// Parses `s3://bucket/key`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the URL when it is not of that form.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = || Error::Config(format!("{url:?} is not s3://<bucket>/<key>"));
        let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, key) = rest.split_once('/').ok_or_else(bad)?;
        if bucket.is_empty() || key.is_empty() || bucket.contains(['?', '#', ' ']) {
            return Err(bad());
        }
        Ok(Self { bucket: bucket.to_owned(), key: key.to_owned() })
    }
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// A client bound to one endpoint and one set of credentials.
pub struct Client {
    args: S3Args,
    scheme: String,
    host: String,
    port: u16,
    /// The `Host` header for path style (`host[:port]` as the endpoint spells it).
    authority: String,
    /// Path prefix of the endpoint (usually empty).
    base: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes sent.
    pub size: u64,
    /// Parts (1 for a single PUT).
    pub parts: u64,
}

/// An HTTP answer read in full.
struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Client {
    /// A client for `args` (the endpoint is checked here).
    ///
    /// # Errors
    /// [`Error::Config`] for an endpoint that is not an `http(s)://host[:port]` URL.
    pub fn new(args: &S3Args) -> Result<Self, Error> {
        let endpoint = args
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", args.region));
        let bad = |why: &str| Error::Config(format!("S3 endpoint {endpoint:?}: {why}"));
        let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().unwrap_or_default().to_owned();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(default_port);
        let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or(host.clone());
        let base = uri.path().trim_end_matches('/').to_owned();
        let tls = (scheme == "https").then(tls_connector).transpose()?;
        Ok(Self { args: args.clone(), scheme, host, port, authority, base, tls })
    }

    /// The `Host` header and the encoded path of `key` in `bucket` (empty key: the bucket).
    fn address(&self, o: &Object) -> (String, String) {
        let key = uri_encode(&o.key, true);
        if self.args.force_path_style {
            (
                self.authority.clone(),
                format!("{}/{}/{key}", self.base, uri_encode(&o.bucket, false)),
            )
        } else {
            (format!("{}.{}", o.bucket, self.authority), format!("{}/{key}", self.base))
        }
    }

    /// Uploads `path` to `o`: one PUT up to `part_size`, a multipart upload above it
    /// (aborted when a part fails, so no orphaned parts stay behind).
    ///
    /// # Errors
    /// The file cannot be read, or the server refused (its code and message are kept).
    pub async fn upload(&self, path: &Path, o: &Object, part_size: u64) -> Result<Uploaded, Error> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let part_size = part_size.max(MIN_PART_SIZE).max(size.div_ceil(MAX_PARTS));
        if size <= part_size {
            let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut body).map_err(io)?;
            self.expect_ok(o, "PUT", "", Bytes::from(body), "upload").await?;
            return Ok(Uploaded { size, parts: 1 });
        }
        let started =
            self.expect_ok(o, "POST", "uploads=", Bytes::new(), "start a multipart upload").await?;
        let upload_id = xml_text(&started.body, "UploadId").ok_or_else(|| {
            Error::Remote(format!("{o}: the multipart upload's answer has no UploadId"))
        })?;
        let parts = async {
            let mut etags = Vec::new();
            let mut number = 1u64;
            loop {
                let mut chunk = Vec::with_capacity(usize::try_from(part_size).unwrap_or(0));
                (&mut file).take(part_size).read_to_end(&mut chunk).map_err(io)?;
                if chunk.is_empty() {
                    break;
                }
                let query =
                    format!("partNumber={number}&uploadId={}", uri_encode(&upload_id, false));
                let a =
                    self.expect_ok(o, "PUT", &query, Bytes::from(chunk), "upload a part").await?;
                let etag =
                    a.headers.get(http::header::ETAG).and_then(|v| v.to_str().ok()).ok_or_else(
                        || Error::Remote(format!("{o}: part {number} came back without an ETag")),
                    )?;
                etags.push((number, etag.to_owned()));
                number += 1;
            }
            Ok::<_, Error>(etags)
        }
        .await;
        let query = format!("uploadId={}", uri_encode(&upload_id, false));
        let etags = match parts {
            Ok(e) => e,
            Err(e) => {
                let _ = self.request(o, "DELETE", &query, Bytes::new()).await;
                return Err(e);
            }
        };
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in &etags {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                xml_escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        // S3 may answer 200 and still report an error in the body.
        let done = self.expect_ok(o, "POST", &query, Bytes::from(xml), "complete the upload").await;
        match done {
            Ok(a) if xml_text(&a.body, "Code").is_none() => {
                Ok(Uploaded { size, parts: etags.len() as u64 })
            }
            Ok(a) => {
                let _ = self.request(o, "DELETE", &query, Bytes::new()).await;
                Err(Error::Remote(format!("{o}: complete the upload: {}", describe(&a))))
            }
            Err(e) => {
                let _ = self.request(o, "DELETE", &query, Bytes::new()).await;
                Err(e)
            }
        }
    }

    /// Downloads `o` into `path` (through `path.part`, renamed once complete, fsynced and,
    /// when `expected` is given, its sha256 matched). Returns the `sha256:<hex>` and size.
    ///
    /// # Errors
    /// The server refused, the file cannot be written, or the checksum differs
    /// ([`Error::HashMismatch`]; nothing is left at `path` then).
    pub async fn download(
        &self,
        o: &Object,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<(String, u64), Error> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| Error::Io { path: p, source }
        };
        let (host, target) = self.address(o);
        let response = self.send_with_retries("GET", &host, &target, "", Bytes::new()).await?;
        let status = response.status();
        if !status.is_success() {
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let a = Answer { status: parts.status, headers: parts.headers, body };
            return Err(Error::Remote(format!("{o}: download: {}", describe(&a))));
        }
        let mut body = response.into_body();
        let mut file = std::fs::File::create(&part).map_err(io(&part))?;
        let mut sha = Sha256::new();
        let mut size = 0u64;
        let copied = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| Error::Remote(format!("{o}: download: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    sha.update(&data);
                    size += data.len() as u64;
                    file.write_all(&data).map_err(io(&part))?;
                }
            }
            file.sync_all().map_err(io(&part))
        }
        .await;
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let actual = format!("sha256:{}", hex(&sha.finalize()));
        if let Some(want) = expected {
            let want = if want.starts_with("sha256:") {
                want.to_owned()
            } else {
                format!("sha256:{want}")
            };
            if want != actual {
                let _ = std::fs::remove_file(&part);
                return Err(Error::HashMismatch { path: path.to_owned(), expected: want, actual });
            }
        }
        std::fs::rename(&part, path).map_err(io(path))?;
        Ok((actual, size))
    }

    /// Deletes `o` (a missing key is no error: S3 itself answers 204 for one).
    ///
    /// # Errors
    /// The server refused, or the bucket does not exist.
    pub async fn delete(&self, o: &Object) -> Result<(), Error> {
        let a = self.request(o, "DELETE", "", Bytes::new()).await?;
        let no_key = a.status == http::StatusCode::NOT_FOUND
            && xml_text(&a.body, "Code").as_deref() == Some("NoSuchKey");
        if a.status.is_success() || no_key {
            Ok(())
        } else {
            Err(Error::Remote(format!("{o}: delete: {}", describe(&a))))
        }
    }

    async fn expect_ok(
        &self,
        o: &Object,
        method: &str,
        query: &str,
        body: Bytes,
        what: &str,
    ) -> Result<Answer, Error> {
        let a = self.request(o, method, query, body).await?;
        if a.status.is_success() {
            Ok(a)
        } else {
            Err(Error::Remote(format!("{o}: {what}: {}", describe(&a))))
        }
    }

    /// One signed request with its whole answer.
    async fn request(
        &self,
        o: &Object,
        method: &str,
        query: &str,
        body: Bytes,
    ) -> Result<Answer, Error> {
        let (host, target) = self.address(o);
        let response = self.send_with_retries(method, &host, &target, query, body).await?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Error::Remote(format!("{o}: reading the answer: {e}")))?
            .to_bytes();
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }

    /// Sends, retrying twice (after 1 s, then 2 s) on a connection error or a 5xx.
    async fn send_with_retries(
        &self,
        method: &str,
        host: &str,
        target: &str,
        query: &str,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = self.send(method, host, target, query, body.clone()).await;
            let retry = match &result {
                Ok(r) => r.status().is_server_error(),
                Err(_) => true,
            };
            if !retry || attempt >= 3 {
                return result;
            }
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        }
    }

    async fn send(
        &self,
        method: &str,
        host: &str,
        target: &str,
        query: &str,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let remote = |what: &str, e: &dyn std::fmt::Display| {
            Error::Remote(format!("S3 {}://{host}{target}: {what}: {e}", self.scheme))
        };
        let payload = hex(&Sha256::digest(&body));
        let amz_date = amz_date(SystemTime::now());
        let mut signed = vec![
            ("host".to_owned(), host.to_owned()),
            ("x-amz-content-sha256".to_owned(), payload.clone()),
            ("x-amz-date".to_owned(), amz_date.clone()),
        ];
        if let Some(token) = &self.args.session_token {
            signed.push(("x-amz-security-token".to_owned(), token.clone()));
        }
        let authorization = authorization(
            &self.args,
            method,
            target,
            &canonical_query(query),
            &signed,
            &payload,
            &amz_date,
        );
        let uri = if query.is_empty() { target.to_owned() } else { format!("{target}?{query}") };
        let mut builder = http::Request::builder().method(method).uri(&uri);
        for (name, value) in &signed {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder
            .header(http::header::AUTHORIZATION, authorization)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .map_err(|e| remote("request", &e))?;
        // Virtual-hosted style still connects to the endpoint's host.
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|e| remote("connect", &e))?
        .map_err(|e| remote("connect", &e))?;
        match &self.tls {
            None => exchange(hyper_util::rt::TokioIo::new(tcp), request).await,
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(
                    host.split(':').next().unwrap_or(host).to_owned(),
                )
                .map_err(|e| remote("TLS name", &e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| remote("TLS", &e))?;
                exchange(hyper_util::rt::TokioIo::new(stream), request).await
            }
        }
        .map_err(|e| remote(method, &e))
    }
}

/// One HTTP/1.1 exchange on a fresh connection.
async fn exchange<I>(
    io: I,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "S3 connection ended with an error");
        }
    });
    sender.send_request(request).await
}

/// rustls with the system's trusted roots (plus `AWS_CA_BUNDLE`, a PEM file, when set).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Ok(bundle) = std::env::var("AWS_CA_BUNDLE") {
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&bundle)
            .map_err(|e| Error::Config(format!("AWS_CA_BUNDLE {bundle}: {e}")))?;
        for cert in certs {
            let cert = cert.map_err(|e| Error::Config(format!("AWS_CA_BUNDLE {bundle}: {e}")))?;
            roots.add(cert).map_err(|e| Error::Config(format!("AWS_CA_BUNDLE {bundle}: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The `Authorization` header of SigV4 for S3: `headers` are the signed ones, lower-case.
fn authorization(
    args: &S3Args,
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    headers: &[(String, String)],
    payload_sha256: &str,
    amz_date: &str,
) -> String {
    let mut headers: Vec<&(String, String)> = headers.iter().collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let canonical_headers: String =
        headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
    let signed_headers = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical_request = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_sha256}"
    );
    let day = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{day}/{}/s3/aws4_request", args.region);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac_sha256(format!("AWS4{}", args.secret_access_key).as_bytes(), day.as_bytes());
    let k_region = hmac_sha256(&k_date, args.region.as_bytes());
    let k_service = hmac_sha256(&k_region, b"s3");
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        args.access_key_id
    )
}

/// HMAC-SHA256 (RFC 2104) over sha2.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    let hashed;
    let key = if key.len() > block.len() {
        hashed = Sha256::digest(key);
        hashed.as_slice()
    } else {
        key
    };
    for (b, k) in block.iter_mut().zip(key) {
        *b = *k;
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// S3's URI encoding: everything but `A-Za-z0-9-._~` (and `/` in a key path) as `%XX`.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The canonical query string: `k=v` pairs (already encoded here) sorted by name; a bare
/// name gets an empty value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day) =
        crate::grpc::tls::civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    let rem = secs % 86_400;
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The text of the first `<tag>` in an XML answer.
fn xml_text(body: &[u8], tag: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let open = format!("<{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text.get(start..)?.find(&format!("</{tag}>"))? + start;
    Some(xml_unescape(text.get(start..end)?))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

/// An error answer in words: the HTTP status and S3's code and message when present.
fn describe(a: &Answer) -> String {
    match (xml_text(&a.body, "Code"), xml_text(&a.body, "Message")) {
        (Some(code), Some(msg)) => format!("{} {code}: {msg}", a.status),
        (Some(code), None) => format!("{} {code}", a.status),
        _ => {
            let text: String = String::from_utf8_lossy(&a.body).chars().take(200).collect();
            format!("{} {}", a.status, text.trim())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of the empty payload.
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn example_args() -> S3Args {
        S3Args {
            endpoint: None,
            region: "us-east-1".into(),
            force_path_style: false,
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// AWS's published SigV4 example for S3 ("GET Object", bucket `examplebucket`).
    #[test]
    fn signature_matches_the_aws_documentation_example() {
        let headers = [
            ("host".to_owned(), "examplebucket.s3.amazonaws.com".to_owned()),
            ("range".to_owned(), "bytes=0-9".to_owned()),
            ("x-amz-content-sha256".to_owned(), EMPTY_SHA256.to_owned()),
            ("x-amz-date".to_owned(), "20130524T000000Z".to_owned()),
        ];
        let auth = authorization(
            &example_args(),
            "GET",
            "/test.txt",
            "",
            &headers,
            EMPTY_SHA256,
            "20130524T000000Z",
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn dates_encoding_and_queries() {
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)), "20130524T000000Z");
        assert_eq!(
            amz_date(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3723)),
            "20000229T010203Z"
        );
        assert_eq!(uri_encode("a b/c~d+e", true), "a%20b/c~d%2Be");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(canonical_query("uploadId=x&partNumber=2"), "partNumber=2&uploadId=x");
        assert_eq!(canonical_query("uploads="), "uploads=");
        assert_eq!(
            xml_text(b"<a><UploadId>u&amp;1</UploadId></a>", "UploadId").as_deref(),
            Some("u&1")
        );
    }

    #[test]
    fn object_urls_parse() {
        let o = Object::parse("s3://bucket/a/b.db").unwrap();
        assert_eq!((o.bucket.as_str(), o.key.as_str()), ("bucket", "a/b.db"));
        assert_eq!(o.to_string(), "s3://bucket/a/b.db");
        for bad in ["s3://bucket", "s3:///k", "http://b/k", "s3://bucket/"] {
            assert!(Object::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addressing_styles() {
        let mut args = example_args();
        args.endpoint = Some("http://127.0.0.1:9000".into());
        let o = Object { bucket: "b".into(), key: "p/x y.db".into() };
        let virt = Client::new(&args).unwrap();
        assert_eq!(virt.address(&o), ("b.127.0.0.1:9000".into(), "/p/x%20y.db".into()));
        args.force_path_style = true;
        let path = Client::new(&args).unwrap();
        assert_eq!(path.address(&o), ("127.0.0.1:9000".into(), "/b/p/x%20y.db".into()));
        args.endpoint = Some("ftp://x".into());
        assert!(Client::new(&args).is_err());
    }
}
