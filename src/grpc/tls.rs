//! TLS on the client and peer listeners and on connections between members: etcd's
//! `--cert-file` and `--peer-cert-file` families turned into rustls configurations, the
//! stream of accepted connections tonic serves ([`incoming`]) and the dialer members use
//! to reach each other ([`Connector`]).
//!
//! The certificate, key, trusted CA and CRL files are re-read when any of them changes (size,
//! modification time or inode), checked at each accepted connection, so a rotated
//! certificate takes effect for new connections without a restart while established ones
//! keep their session. A half-written set that does not load keeps the previous one in
//! service and is logged. With `--auto-tls` a self-signed certificate is generated into
//! `<data-dir>/fixtures/client` (kept across restarts), as etcd does.
//!
//! Handshakes run on their own tasks so a slow or silent client cannot hold up the accept
//! loop; a failed handshake is logged and the connection dropped ("rejected connection",
//! as etcd logs it); so is a client whose certificate is on the `--client-crl-file` /
//! `--peer-crl-file` list, a peer whose certificate CN is not `--peer-cert-allowed-cn`, and
//! a client whose certificate is not valid for `--*-cert-allowed-hostname`. A connection's
//! verified client certificate CN travels to the services in [`ConnInfo`] (the user, with
//! auth on and no token).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::{ServerTls, TlsSource, TlsVersion};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the configuration (for example a key that does not match the cert).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Generating the `--auto-tls` certificate failed.
    #[error("generating a self-signed certificate in {dir}: {reason}")]
    AutoTls {
        /// The fixtures directory.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// What identifies one version of a file: size, modification time and inode.
type Stamp = Option<(u64, SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

fn stamps(files: Files<'_>) -> Vec<Stamp> {
    let (cert, key, ca, crl) = files;
    [cert, key].into_iter().chain(ca).chain(crl).map(stamp).collect()
}

/// The files a TLS configuration is built from: certificate, key, trusted CA, CRL.
type Files<'a> = (&'a Path, &'a Path, Option<&'a Path>, Option<&'a Path>);

/// The TLS material in service and the file versions it was built from.
struct Loaded<T> {
    config: Arc<T>,
    stamps: Vec<Stamp>,
}

impl<T> Loaded<T> {
    /// Loads with `build`, stamping the files first so that a change during the build is
    /// seen at the next connection.
    fn new(
        files: Files<'_>,
        build: impl FnOnce() -> Result<T, TlsError>,
    ) -> Result<Mutex<Loaded<T>>, TlsError> {
        let stamps = stamps(files);
        Ok(Mutex::new(Loaded { config: Arc::new(build()?), stamps }))
    }

    /// The configuration in service, rebuilt first with `build` if a file changed. A set
    /// that does not load keeps the previous one (a rotation may be half-written).
    fn current(
        this: &Mutex<Loaded<T>>,
        files: Files<'_>,
        build: impl FnOnce() -> Result<T, TlsError>,
    ) -> Arc<T> {
        let now = stamps(files);
        let mut loaded = this.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.stamps != now {
            match build() {
                Ok(config) => {
                    tracing::info!(cert = %files.0.display(), "reloaded TLS certificate files");
                    loaded.config = Arc::new(config);
                    loaded.stamps = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                }
            }
        }
        loaded.config.clone()
    }
}

/// Builds server TLS sessions from the configured files, reloading them when they change.
pub struct Acceptor {
    settings: ServerTls,
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Loads (or, for `--auto-tls`, generates) the material; fails on anything unusable.
    ///
    /// # Errors
    /// [`TlsError`] naming the file or setting at fault.
    pub fn new(settings: &ServerTls) -> Result<Arc<Acceptor>, TlsError> {
        let (cert, key) = match &settings.source {
            TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
            TlsSource::Auto { dir, hosts, years } => self_signed(dir, hosts, *years)?,
        };
        let files = (
            cert.as_path(),
            key.as_path(),
            settings.trusted_ca.as_deref(),
            settings.crl.as_deref(),
        );
        let loaded = Loaded::new(files, || build_config(settings, &cert, &key))?;
        Ok(Arc::new(Acceptor { settings: settings.clone(), cert, key, loaded }))
    }

    fn files(&self) -> Files<'_> {
        (&self.cert, &self.key, self.settings.trusted_ca.as_deref(), self.settings.crl.as_deref())
    }

    /// The configuration for the next handshake, rebuilt first if a file changed.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Loaded::current(&self.loaded, self.files(), || {
            build_config(&self.settings, &self.cert, &self.key)
        })
    }

    /// Whether a session's client certificate passes `--peer-cert-allowed-cn`.
    fn allows(&self, session: &rustls::ServerConnection) -> bool {
        let leaf = session.peer_certificates().and_then(|c| c.first());
        if let Some(host) = &self.settings.allowed_hostname {
            let valid = leaf.is_some_and(|der| valid_for_hostname(der, host));
            if !valid {
                return false;
            }
        }
        let Some(allowed) = &self.settings.allowed_cn else { return true };
        let cn = leaf.and_then(|c| common_name(c));
        cn.as_deref() == Some(allowed.as_str())
    }
}

/// Builds client TLS sessions: to other members (the member's own peer certificate as
/// client identity, other members verified against the peer CA, or not at all under
/// `--peer-auto-tls` as etcd; files reloaded when they change), or for a tool such as
/// `cairn bench` (fixed CA and identity).
pub struct Connector {
    peer: Option<(Arc<Acceptor>, bool)>,
    loaded: Mutex<Loaded<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("peer", &self.peer.is_some()).finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector to other members presenting `acceptor`'s certificate.
    ///
    /// # Errors
    /// [`TlsError`] when the material does not make a client configuration.
    pub fn new(acceptor: Arc<Acceptor>, skip_verify: bool) -> Result<Arc<Connector>, TlsError> {
        let loaded = Loaded::new(acceptor.files(), || peer_client_config(&acceptor, skip_verify))?;
        Ok(Arc::new(Connector { peer: Some((acceptor, skip_verify)), loaded }))
    }

    /// A client connector trusting `ca` and presenting `identity` (cert, key) if given.
    ///
    /// # Errors
    /// [`TlsError`] naming an unreadable file.
    pub fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<Connector>, TlsError> {
        let provider = Arc::new(provider(&[]));
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certs(cert)?, private_key(key)?)
                .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let loaded = Mutex::new(Loaded { config: Arc::new(config), stamps: Vec::new() });
        Ok(Arc::new(Connector { peer: None, loaded }))
    }

    /// The configuration for the next connection, rebuilt first if a file changed.
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        match &self.peer {
            Some((acceptor, skip_verify)) => {
                Loaded::current(&self.loaded, acceptor.files(), || {
                    peer_client_config(acceptor, *skip_verify)
                })
            }
            None => self.loaded.lock().unwrap_or_else(|p| p.into_inner()).config.clone(),
        }
    }

    /// Dials `host:port` and completes a TLS handshake verifying `host`.
    ///
    /// # Errors
    /// The TCP or TLS failure.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio_rustls::TlsConnector::from(self.current()).connect(name, tcp).await
    }

    /// A lazily connecting tonic channel to `url` (`https://host:port`) over this
    /// connector; tonic itself is asked for plain HTTP/2 and the TLS happens here.
    ///
    /// # Errors
    /// A URL that is not `https://host:port`.
    pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url}: not https://"))?;
        tonic::transport::Endpoint::from_shared(format!("http://{rest}")).map_err(|e| e.to_string())
    }
}

/// tonic's connector for TLS URLs: dials through a [`Connector`].
#[derive(Clone, Debug)]
pub struct Dial(pub Arc<Connector>);

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for Dial {
    type Response = Dialed;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = self.0.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let stream = connector.connect(&host, port).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

fn peer_client_config(
    acceptor: &Acceptor,
    skip_verify: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let settings = &acceptor.settings;
    let provider = Arc::new(provider(&settings.cipher_suites));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(settings.min_version, settings.max_version))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&settings.trusted_ca, skip_verify) {
        (_, true) => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        }
        (Some(ca), false) => builder.with_root_certificates(roots(ca)?),
        (None, false) => {
            return Err(TlsError::Config("peer TLS needs --peer-trusted-ca-file".into()));
        }
    };
    let chain = certs(&acceptor.cert)?;
    let key = private_key(&acceptor.key)?;
    let mut config = builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", acceptor.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts any server certificate (`--peer-auto-tls`: etcd skips verification there too);
/// signatures are still checked, so the session is encrypted to whoever holds the key.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_owned(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// Maps etcd's (Go's) TLS 1.2 cipher suite names to rustls's.
fn suite(name: &str) -> Option<rustls::CipherSuite> {
    use rustls::CipherSuite as C;
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// The ring provider restricted to the configured TLS 1.2 suites (TLS 1.3 suites are not
/// configurable, as in Go).
pub fn provider(cipher_suites: &[String]) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !cipher_suites.is_empty() {
        let wanted: Vec<rustls::CipherSuite> =
            cipher_suites.iter().filter_map(|n| suite(n)).collect();
        provider
            .cipher_suites
            .retain(|s| s.version() == &rustls::version::TLS13 || wanted.contains(&s.suite()));
    }
    provider
}

/// The protocol versions between `min` and `max`.
pub fn versions(
    min: TlsVersion,
    max: TlsVersion,
) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static V12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    static V13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match (min, max) {
        (TlsVersion::Tls12, TlsVersion::Tls12) => &V12,
        (TlsVersion::Tls13, _) => &V13,
        (TlsVersion::Tls12, TlsVersion::Tls13) => &BOTH,
    }
}

/// True when the certificate `der` is valid for `host` (a DNS name or IP address matched
/// against its subject alternative names, as Go's `VerifyHostname` does for etcd's
/// `--*-cert-allowed-hostname`).
fn valid_for_hostname(der: &rustls_pki_types::CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = rustls_pki_types::ServerName::try_from(host) else { return false };
    webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// Reads the PEM certificate revocation lists in `path`.
///
/// # Errors
/// [`TlsError`] naming the file when it cannot be read or holds no CRL.
pub fn crls(
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Config(format!("{}: {reason}", path.display()));
    let crls = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no certificate revocation list found".into()));
    }
    Ok(crls)
}

/// Reads a CA bundle into a root store.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })?;
    }
    Ok(roots)
}

fn build_config(
    settings: &ServerTls,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certs(cert)?;
    let key_der = private_key(key)?;
    let provider = Arc::new(provider(&settings.cipher_suites));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(settings.min_version, settings.max_version))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // As etcd (transport.TLSInfo.ServerConfig): a trusted CA, with or without
    // --client-cert-auth, makes a client certificate required and verified against it.
    let builder = match &settings.trusted_ca {
        Some(ca) => {
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider,
            );
            if let Some(crl) = &settings.crl {
                // Only the client's own certificate is checked, as etcd's checkCRL does.
                verifier = verifier.with_crls(crls(crl)?).only_check_end_entity_revocation();
            }
            let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub(crate) fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, u8::try_from(month).unwrap_or(1), u8::try_from(day).unwrap_or(1))
}

/// Returns `dir/cert.pem` and `dir/key.pem`, generating a self-signed pair valid for
/// `years` for `hosts` unless both exist (etcd's `SelfCert`).
fn self_signed(dir: &Path, hosts: &[String], years: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let fail = |reason: String| TlsError::AutoTls { dir: dir.to_owned(), reason };
    let mut params =
        rcgen::CertificateParams::new(hosts.to_vec()).map_err(|e| fail(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "etcd");
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0))
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let year = |y: i64| i32::try_from(y).unwrap_or(9999);
    params.not_before = rcgen::date_time_ymd(year(y), m, d);
    params.not_after = rcgen::date_time_ymd(year(y + i64::from(years)), m, d.min(28));
    params.key_usages =
        vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| fail(e.to_string()))?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Reads one DER TLV with `tag`; returns (contents, rest).
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), rest)
    };
    rest.split_at_checked(len)
}

/// The subject common name of a DER certificate (the user name under client-cert auth).
pub fn common_name(der: &[u8]) -> Option<String> {
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    let (cert, _) = tlv(der, 0x30)?;
    let (tbs, _) = tlv(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest, 0xa0)?.1;
    }
    rest = tlv(rest, 0x02)?.1; // serial number
    rest = tlv(rest, 0x30)?.1; // signature algorithm
    rest = tlv(rest, 0x30)?.1; // issuer
    rest = tlv(rest, 0x30)?.1; // validity
    let (mut rdns, _) = tlv(rest, 0x30)?; // subject
    let mut found = None;
    while !rdns.is_empty() {
        let (mut set, next) = tlv(rdns, 0x31)?;
        rdns = next;
        while !set.is_empty() {
            let (atv, next) = tlv(set, 0x30)?;
            set = next;
            let (oid, value) = tlv(atv, 0x06)?;
            if oid == CN {
                // Any string type (UTF8String, PrintableString, ...): take its contents.
                let tag = *value.first()?;
                let (text, _) = tlv(value, tag)?;
                // Go's pkix keeps the last CN of the subject.
                found = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    found
}

/// What the services learn about a connection.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's common name (TLS with client-cert auth only).
    pub common_name: Option<String>,
}

/// An accepted client connection, plain or TLS.
#[derive(Debug)]
pub enum Conn {
    /// A plain TCP connection.
    Plain(TcpStream),
    /// A TLS session over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(s) => ConnInfo { remote: s.peer_addr().ok(), common_name: None },
            Conn::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let common_name = session
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|c| common_name(c.as_ref()));
                ConnInfo { remote: tcp.peer_addr().ok(), common_name }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A bound listener and whether it speaks TLS (`https://` URL).
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub tcp: TcpListener,
    /// True for an `https://` URL.
    pub tls: bool,
}

/// Accepted connections of all `listeners`, TLS ones handshaken with `acceptor`; ends when
/// the stream is dropped. Connections whose handshake fails, or whose certificate CN is
/// not the allowed one, are logged and never yielded.
pub fn incoming(
    listeners: Vec<Listener>,
    acceptor: Option<Arc<Acceptor>>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    for l in listeners {
        let tx = tx.clone();
        let acceptor = if l.tls { acceptor.clone() } else { None };
        tokio::spawn(accept_loop(l.tcp, acceptor, tx));
    }
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<Arc<Acceptor>>,
    tx: mpsc::Sender<Conn>,
) {
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // `serve_with_incoming` ignores the builder's TCP_NODELAY (DEPENDENCIES.md).
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            if tx.send(Conn::Plain(tcp)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(acceptor.current());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) if acceptor.allows(stream.get_ref().1) => {
                    let _ = tx.send(Conn::Tls(Box::new(stream))).await;
                }
                Ok(Ok(_)) => tracing::warn!(
                    %remote,
                    "rejected connection: client certificate CN is not --peer-cert-allowed-cn, or the certificate is not valid for the allowed hostname"
                ),
                Ok(Err(e)) => tracing::warn!(%remote, error = %e, "rejected connection"),
                Err(_) => tracing::warn!(%remote, "rejected connection: TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_is_read_from_the_subject() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "cairn");
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let anonymous = params.self_signed(&key).unwrap();
        assert_eq!(common_name(anonymous.der()), None);
        assert_eq!(common_name(b"\x30\x05garbage"), None);
        assert_eq!(common_name(&[]), None);
    }

    #[test]
    fn dates_come_from_days_since_the_epoch() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn auto_tls_generates_once_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ServerTls {
            source: TlsSource::Auto {
                dir: dir.path().join("fixtures"),
                hosts: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
                years: 1,
            },
            trusted_ca: None,
            crl: None,
            client_cert_auth: false,
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            cipher_suites: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_owned()],
            allowed_cn: None,
            allowed_hostname: None,
        };
        let a = Acceptor::new(&settings).unwrap();
        let cert = std::fs::read(dir.path().join("fixtures/cert.pem")).unwrap();
        let first = a.current();
        assert!(Arc::ptr_eq(&first, &a.current()), "unchanged files are not reloaded");
        // A second start keeps the generated pair.
        let _b = Acceptor::new(&settings).unwrap();
        assert_eq!(cert, std::fs::read(dir.path().join("fixtures/cert.pem")).unwrap());
        // A broken rewrite keeps the old configuration in service.
        std::fs::write(dir.path().join("fixtures/cert.pem"), b"not a cert").unwrap();
        assert!(Arc::ptr_eq(&first, &a.current()));
        // A good rewrite is taken.
        std::fs::write(dir.path().join("fixtures/cert.pem"), &cert).unwrap();
        assert!(!Arc::ptr_eq(&first, &a.current()));
    }

    #[test]
    fn cipher_suites_restrict_tls12_only() {
        let all = provider(&[]).cipher_suites.len();
        let one = provider(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_owned()]);
        let tls12: Vec<_> =
            one.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS12).collect();
        assert_eq!(tls12.len(), 1);
        assert!(one.cipher_suites.len() < all);
        // TLS 1.3 names only: TLS 1.3 stays, TLS 1.2 has no suite left (as in Go).
        let only13 = provider(&["TLS_AES_128_GCM_SHA256".to_owned()]);
        assert!(only13.cipher_suites.iter().all(|s| s.version() == &rustls::version::TLS13));
        assert!(!only13.cipher_suites.is_empty());
        for name in crate::config::CIPHER_SUITES {
            assert!(suite(name).is_some(), "{name}");
        }
    }
}
