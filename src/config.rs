//! Configuration: etcd's flags and `ETCD_*` environment variables, parsed into typed values.
//!
//! Flag names, defaults and validation messages follow etcd (server/embed/config.go and
//! server/etcdmain/config.go), so Cairn drops into an existing etcd deployment. A flag given
//! on the command line wins over its environment variable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// etcd's default `--max-request-bytes`: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 1_572_864;

/// Extra bytes the gRPC receive limit allows above `--max-request-bytes`, as etcd's
/// `grpcOverheadBytes`, so an oversized request reaches our check and gets etcd's message.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Errors found while validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A URL flag holds something that is not `http(s)://host:port`.
    #[error("invalid URL {url:?} in --{flag}: {reason}")]
    BadUrl {
        /// The flag.
        flag: &'static str,
        /// The offending value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A flag's value is out of range or malformed.
    #[error("invalid value {value:?} for --{flag}: {reason}")]
    BadValue {
        /// The flag.
        flag: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--initial-cluster` is inconsistent with this member's name or peer URLs.
    #[error("{0}")]
    Cluster(String),
}

/// The `cairn` server's configuration, one field per etcd flag.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,

    /// Path to the data directory (default: "<name>.etcd").
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// List of URLs to listen on for client traffic (comma-separated).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub listen_client_urls: String,

    /// List of this member's client URLs to advertise to the public.
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,

    /// List of URLs to listen on for peer traffic.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,

    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS", default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,

    /// Initial cluster configuration for bootstrapping: name=peerURL,...
    #[arg(long, env = "ETCD_INITIAL_CLUSTER", default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,

    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,

    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    pub initial_cluster_token: String,

    /// Force to create a new one member cluster: restart this member from its data dir as
    /// the only member, keeping its data and dropping every other member (disaster recovery
    /// after a quorum loss). Ignored when the data dir holds no member yet.
    #[arg(
        long,
        env = "ETCD_FORCE_NEW_CLUSTER",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub force_new_cluster: bool,

    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,

    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,

    /// Number of committed transactions to trigger a snapshot (a state-machine checkpoint
    /// and raft log compaction).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: u32,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,

    /// Raise alarms when backend size exceeds the given quota (0 defaults to low space quota).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,

    /// Interpret 'auto-compaction-retention' one of: periodic|revision.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,

    /// Auto compaction retention for mvcc key value store. 0 means disable auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,

    /// Duration of periodic watch progress notifications.
    #[arg(
        long,
        env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m",
        value_parser = parse_positive_duration
    )]
    pub watch_progress_notify_interval: Duration,

    /// Enable leader to send regular checkpoints to other members to prevent reset of
    /// remaining TTL on leader change (Cairn: on by default).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", default_value_t = true, action = clap::ArgAction::Set)]
    pub experimental_enable_lease_checkpoint: bool,

    /// Duration of periodic lease checkpoints (a Go duration such as "5m").
    #[arg(long, env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL", default_value = "5m")]
    pub experimental_lease_checkpoint_interval: String,

    /// Duration between corruption checks: the leader compares its HashKV with every
    /// member's and raises a CORRUPT alarm on a mismatch (a Go duration; 0 disables).
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s")]
    pub experimental_corrupt_check_time: String,

    /// Sets the maximum number of revisions deleted in each compaction batch.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", default_value_t = 1000)]
    pub experimental_compaction_batch_limit: usize,

    /// Sets the sleep interval between each compaction batch (a Go duration such as "10ms").
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_SLEEP_INTERVAL", default_value = "10ms")]
    pub experimental_compaction_sleep_interval: String,

    /// Sets the maximum number of learners that can be available in the cluster membership.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_MAX_LEARNERS",
        alias = "experimental-max-learners",
        default_value_t = 1
    )]
    pub max_learners: usize,

    /// Configures log level. Only supports debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Currently only supports 'zap' for structured logging.
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,

    /// Specify 'stdout' or 'stderr' to skip journald logging even when running under
    /// systemd, or list of comma separated output targets.
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,

    /// Set level of detail for exported metrics, specify 'extensive' to include server side
    /// grpc histogram metrics.
    #[arg(long, env = "ETCD_METRICS", default_value = "basic")]
    pub metrics: String,

    /// List of URLs to listen on for the metrics and health endpoints.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,

    /// Specify a v3 authentication token type and its options ('simple' or 'jwt').
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// Time (in seconds) of the auth-token-ttl.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,

    /// Specify the cost / strength of the bcrypt algorithm for hashing auth passwords.
    /// Valid values are between 4 and 31.
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,

    /// Client TLS flags.
    #[command(flatten)]
    pub tls: TlsFlags,

    /// Peer TLS flags.
    #[command(flatten)]
    pub peer_tls: PeerTlsFlags,
}

/// etcd's peer-TLS flags (`--peer-cert-file` and friends); versions and cipher suites come
/// from the client flags, which etcd applies to both.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PeerTlsFlags {
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE", default_value = "")]
    pub peer_cert_file: String,

    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE", default_value = "")]
    pub peer_key_file: String,

    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub peer_client_cert_auth: bool,

    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", default_value = "")]
    pub peer_trusted_ca_file: String,

    /// Path to the peer certificate revocation list file.
    #[arg(long, env = "ETCD_PEER_CRL_FILE", default_value = "")]
    pub peer_crl_file: String,

    /// Allowed TLS hostname for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME", default_value = "")]
    pub peer_cert_allowed_hostname: String,

    /// Required CN for client certs connecting to the peer endpoint.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN", default_value = "")]
    pub peer_cert_allowed_cn: String,

    /// Peer TLS using self-generated certificates if --peer-key-file and --peer-cert-file
    /// are not provided.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub peer_auto_tls: bool,
}

/// etcd's client-TLS flags (`--cert-file` and friends).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE", default_value = "")]
    pub cert_file: String,

    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE", default_value = "")]
    pub key_file: String,

    /// Enable client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub client_cert_auth: bool,

    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", default_value = "")]
    pub trusted_ca_file: String,

    /// Path to the client certificate revocation list file.
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE", default_value = "")]
    pub client_crl_file: String,

    /// Allowed TLS hostname for client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME", default_value = "")]
    pub client_cert_allowed_hostname: String,

    /// Client TLS using generated certificates.
    #[arg(long, env = "ETCD_AUTO_TLS", default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub auto_tls: bool,

    /// The validity period of automatically generated certificates, in years.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,

    /// Comma-separated list of supported TLS cipher suites between client/server and peers
    /// (empty: the TLS library's defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,

    /// Minimum TLS version supported by the server: TLS1.2 or TLS1.3.
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,

    /// Maximum TLS version supported by the server (empty: the highest supported).
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,
}

/// A TLS protocol version Cairn can speak (rustls has no TLS 1.0 or 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// The TLS 1.2 cipher suites of Go's list (etcd's `--cipher-suites` names) that Cairn's TLS
/// library implements; TLS 1.3 suites are not configurable, as in Go.
pub const CIPHER_SUITES: [&str; 6] = [
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Go's TLS 1.3 suite names: accepted, and like Go not configurable (always on).
pub const TLS13_SUITES: [&str; 3] =
    ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"];

/// Suites Go (and so etcd) knows but rustls does not implement (CBC, RC4, 3DES, RSA key
/// exchange); refused with a message that says so.
const GO_UNSUPPORTED_SUITES: [&str; 16] = [
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// Where a listener's certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files, re-read when they change.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// A self-signed certificate generated at start (`--auto-tls`) in this directory.
    Auto {
        /// Where the generated `cert.pem` and `key.pem` are kept.
        dir: PathBuf,
        /// Host names and IPs the certificate names.
        hosts: Vec<String>,
        /// Validity in years.
        years: u32,
    },
}

/// Validated server-side TLS settings for the client listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The certificate and key.
    pub source: TlsSource,
    /// CA bundle that client certificates must chain to; when given, a client certificate
    /// is required, with or without `client_cert_auth` (as in etcd).
    pub trusted_ca: Option<PathBuf>,
    /// `--client-crl-file` / `--peer-crl-file`: revoked client certificates (PEM CRLs,
    /// checked against the end-entity certificate), re-read when the file changes.
    pub crl: Option<PathBuf>,
    /// `--client-cert-auth`: require and verify a client certificate (needs `trusted_ca`).
    pub client_cert_auth: bool,
    /// Lowest accepted version.
    pub min_version: TlsVersion,
    /// Highest accepted version.
    pub max_version: TlsVersion,
    /// `--cipher-suites` as Go names ([`CIPHER_SUITES`], [`TLS13_SUITES`]); empty = the
    /// library's defaults. Only the TLS 1.2 ones restrict anything (TLS 1.3 suites are
    /// always on, as in Go); a list of TLS 1.3 names only leaves TLS 1.2 without suites.
    pub cipher_suites: Vec<String>,
    /// The only client-certificate CN accepted (`--peer-cert-allowed-cn`; peers only).
    pub allowed_cn: Option<String>,
    /// The hostname a client certificate must be valid for (its DNS or IP SANs;
    /// `--client-cert-allowed-hostname`, `--peer-cert-allowed-hostname`).
    pub allowed_hostname: Option<String>,
}

/// Validated peer TLS: the peer listener's settings, which also give the certificate a
/// member presents and the CA it trusts when it dials other members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// The listener side (and the client identity and roots).
    pub server: ServerTls,
    /// Skip verifying other members' certificates (`--peer-auto-tls`, as etcd does).
    pub skip_verify: bool,
}

/// An `http(s)://host:port` URL as etcd accepts in its URL flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The URL as given (used verbatim in member records and ids, as etcd does).
    pub raw: String,
}

impl Url {
    /// Parses one URL of flag `flag`.
    ///
    /// # Errors
    /// Fails unless the URL is `http(s)://host:port` with no path.
    pub fn parse(flag: &'static str, raw: &str) -> Result<Url, ConfigError> {
        let bad = |reason: &str| ConfigError::BadUrl {
            flag,
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = raw.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("URL scheme must be http or https"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(bad("URL must not contain a path"));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, port) =
                    v6.split_once("]:").ok_or_else(|| bad("expected [ipv6]:port"))?;
                (host, port)
            }
            None => rest.rsplit_once(':').ok_or_else(|| bad("missing port"))?,
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = port.parse::<u16>().map_err(|_| bad("invalid port"))?;
        Ok(Url { scheme: scheme.to_owned(), host: host.to_owned(), port, raw: raw.to_owned() })
    }

    /// Parses a comma-separated list of URLs; the list must not be empty.
    ///
    /// # Errors
    /// Fails on the first bad URL, or when the list is empty.
    pub fn parse_list(flag: &'static str, raw: &str) -> Result<Vec<Url>, ConfigError> {
        let urls: Vec<Url> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Url::parse(flag, s))
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(ConfigError::BadValue {
                flag,
                value: raw.to_owned(),
                reason: "no URL given".into(),
            });
        }
        Ok(urls)
    }

    /// Returns `host:port` suitable for binding or dialing (`localhost` stays a name).
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How auto-compaction picks the revision to compact to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Off (retention "0").
    Disabled,
    /// Keep the history of the last `Duration`.
    Periodic(Duration),
    /// Keep the last N revisions.
    Revision(i64),
}

/// A validated configuration with derived values.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The raw flags.
    pub raw: Config,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Client listen URLs.
    pub listen_client_urls: Vec<Url>,
    /// Client URLs advertised in member records.
    pub advertise_client_urls: Vec<Url>,
    /// Peer listen URLs.
    pub listen_peer_urls: Vec<Url>,
    /// This member's advertised peer URLs.
    pub advertise_peer_urls: Vec<Url>,
    /// `--initial-cluster` as name → peer URLs, ordered by name.
    pub initial_cluster: BTreeMap<String, Vec<String>>,
    /// True for `--initial-cluster-state new`.
    pub new_cluster: bool,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout in heartbeat ticks.
    pub election_ticks: usize,
    /// Auto-compaction policy.
    pub auto_compaction: AutoCompaction,
    /// The backend quota in bytes (etcd's default 2 GiB when the flag is 0).
    pub quota_backend_bytes: u64,
    /// Log filter directive for `tracing`.
    pub log_filter: String,
    /// How often remaining lease TTLs are checkpointed through raft; `None` = never.
    pub lease_checkpoint_interval: Option<Duration>,
    /// How often the leader compares members' HashKV (`None` = never).
    pub corrupt_check_interval: Option<Duration>,
    /// Most revisions one compaction batch deletes (at least 1).
    pub compaction_batch_limit: usize,
    /// Pause between two compaction batches.
    pub compaction_sleep_interval: Duration,
    /// `--metrics extensive`: export the gRPC handling-time histogram.
    pub metrics_extensive: bool,
    /// Extra listeners for `/metrics` and the health endpoints (empty: client URLs only).
    pub listen_metrics_urls: Vec<Url>,
    /// TLS for the `https://` client and metrics listeners (`None`: no TLS material given).
    pub client_tls: Option<ServerTls>,
    /// TLS for the peer listeners and peer connections (`None`: no peer TLS material).
    pub peer_tls: Option<PeerTls>,
}

/// etcd's default backend quota, 2 GiB.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// etcd's maximum election timeout, 50 s.
const MAX_ELECTION_TIMEOUT_MS: u64 = 50_000;

impl Config {
    /// Validates the flags and derives typed values, writing nothing.
    ///
    /// # Errors
    /// Returns the first problem found, with etcd's wording where etcd has one.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let bad = |flag: &'static str, value: &dyn ToString, reason: &str| ConfigError::BadValue {
            flag,
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        if self.name.is_empty() {
            return Err(bad("name", &self.name, "must not be empty"));
        }
        let listen_client_urls = Url::parse_list("listen-client-urls", &self.listen_client_urls)?;
        let advertise_client_urls =
            Url::parse_list("advertise-client-urls", &self.advertise_client_urls)?;
        let listen_peer_urls = Url::parse_list("listen-peer-urls", &self.listen_peer_urls)?;
        let advertise_peer_urls =
            Url::parse_list("initial-advertise-peer-urls", &self.initial_advertise_peer_urls)?;

        if self.heartbeat_interval == 0 {
            return Err(bad("heartbeat-interval", &self.heartbeat_interval, "must be positive"));
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError::BadValue {
                flag: "election-timeout",
                value: self.election_timeout.to_string(),
                reason: format!(
                    "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                    self.election_timeout, self.heartbeat_interval
                ),
            });
        }
        if self.election_timeout > MAX_ELECTION_TIMEOUT_MS {
            return Err(bad(
                "election-timeout",
                &self.election_timeout,
                "is too long, and should be set less than 50 seconds",
            ));
        }
        if self.snapshot_count == 0 {
            return Err(bad("snapshot-count", &self.snapshot_count, "must be positive"));
        }
        if self.max_request_bytes == 0 {
            return Err(bad("max-request-bytes", &self.max_request_bytes, "must be positive"));
        }
        if self.max_txn_ops == 0 {
            return Err(bad("max-txn-ops", &self.max_txn_ops, "must be positive"));
        }
        let quota_backend_bytes = match self.quota_backend_bytes {
            q if q < 0 => return Err(bad("quota-backend-bytes", &q, "must not be negative")),
            0 => DEFAULT_QUOTA_BACKEND_BYTES,
            q => q.unsigned_abs(),
        };
        let new_cluster = match self.initial_cluster_state.as_str() {
            "new" => true,
            "existing" => false,
            other => {
                return Err(bad("initial-cluster-state", &other, "must be 'new' or 'existing'"));
            }
        };
        let auto_compaction =
            parse_auto_compaction(&self.auto_compaction_mode, &self.auto_compaction_retention)?;
        let log_filter = match self.log_level.as_str() {
            "debug" => "debug",
            "info" => "info",
            "warn" => "warn",
            "error" | "dpanic" | "panic" | "fatal" => "error",
            other => {
                return Err(bad(
                    "log-level",
                    &other,
                    "only supports debug, info, warn, error, panic, or fatal",
                ));
            }
        };
        let metrics_extensive = match self.metrics.as_str() {
            "basic" => false,
            "extensive" => true,
            other => {
                return Err(bad("metrics", &other, "must be 'basic' or 'extensive'"));
            }
        };
        let listen_metrics_urls = if self.listen_metrics_urls.trim().is_empty() {
            Vec::new()
        } else {
            Url::parse_list("listen-metrics-urls", &self.listen_metrics_urls)?
        };
        if self.logger != "zap" {
            return Err(bad("logger", &self.logger, "only 'zap' is supported"));
        }

        let data_dir =
            self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)));
        let client_tls = self.tls.validate(&data_dir, &listen_client_urls)?;
        for url in listen_client_urls.iter().chain(&listen_metrics_urls) {
            if url.scheme == "https" && client_tls.is_none() {
                return Err(ConfigError::BadUrl {
                    flag: "listen-client-urls",
                    url: url.raw.clone(),
                    reason: "TLS key/cert (--cert-file, --key-file) must be provided for client url with HTTPS scheme".to_owned(),
                });
            }
        }

        let peer_tls = self.peer_tls.validate(&self.tls, &data_dir, &listen_peer_urls)?;
        for url in listen_peer_urls.iter().chain(&advertise_peer_urls) {
            if url.scheme == "https" && peer_tls.is_none() {
                return Err(ConfigError::BadUrl {
                    flag: "listen-peer-urls",
                    url: url.raw.clone(),
                    reason: "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url with HTTPS scheme".to_owned(),
                });
            }
        }

        let initial_cluster = parse_initial_cluster(&self.initial_cluster)?;
        let mine = initial_cluster.get(&self.name).ok_or_else(|| {
            ConfigError::Cluster(format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                self.name
            ))
        })?;
        let mut mine_sorted = mine.clone();
        mine_sorted.sort();
        let mut adv: Vec<String> = advertise_peer_urls.iter().map(|u| u.raw.clone()).collect();
        adv.sort();
        if new_cluster && mine_sorted != adv {
            return Err(ConfigError::Cluster(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (resolved urls: {:?} != {:?})",
                self.name,
                mine.join(","),
                self.initial_advertise_peer_urls,
                adv,
                mine_sorted
            )));
        }

        let interval = parse_go_duration(&self.experimental_lease_checkpoint_interval)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                bad(
                    "experimental-lease-checkpoint-interval",
                    &self.experimental_lease_checkpoint_interval,
                    "must be a positive duration such as 5m",
                )
            })?;
        let lease_checkpoint_interval =
            self.experimental_enable_lease_checkpoint.then_some(interval);

        let corrupt_check_interval = parse_go_duration(&self.experimental_corrupt_check_time)
            .or((self.experimental_corrupt_check_time == "0").then_some(Duration::ZERO))
            .ok_or_else(|| {
                bad(
                    "experimental-corrupt-check-time",
                    &self.experimental_corrupt_check_time,
                    "must be a Go duration such as 5m (0 disables)",
                )
            })?;
        let corrupt_check_interval =
            (!corrupt_check_interval.is_zero()).then_some(corrupt_check_interval);
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(bad("bcrypt-cost", &self.bcrypt_cost, "must be between 4 and 31"));
        }
        if self.auth_token != "simple"
            && self.auth_token != "jwt"
            && !self.auth_token.starts_with("jwt,")
        {
            // The jwt options themselves (keys, sign method) are checked when the member
            // starts and reads the key files.
            return Err(bad("auth-token", &self.auth_token, "must be 'simple' or 'jwt,<options>'"));
        }
        if self.auth_token_ttl == 0 {
            return Err(bad("auth-token-ttl", &self.auth_token_ttl, "must be positive"));
        }
        if self.experimental_compaction_batch_limit == 0 {
            return Err(bad(
                "experimental-compaction-batch-limit",
                &self.experimental_compaction_batch_limit,
                "must be positive",
            ));
        }
        let compaction_sleep_interval =
            parse_go_duration(&self.experimental_compaction_sleep_interval)
                .or((self.experimental_compaction_sleep_interval == "0").then_some(Duration::ZERO))
                .ok_or_else(|| {
                    bad(
                        "experimental-compaction-sleep-interval",
                        &self.experimental_compaction_sleep_interval,
                        "must be a duration such as 10ms",
                    )
                })?;
        Ok(Validated {
            raw: self.clone(),
            data_dir,
            listen_client_urls,
            advertise_client_urls,
            listen_peer_urls,
            advertise_peer_urls,
            initial_cluster,
            new_cluster,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election_ticks: usize::try_from(self.election_timeout / self.heartbeat_interval)
                .unwrap_or(10),
            auto_compaction,
            quota_backend_bytes,
            log_filter: log_filter.to_owned(),
            lease_checkpoint_interval,
            corrupt_check_interval,
            compaction_batch_limit: self.experimental_compaction_batch_limit,
            compaction_sleep_interval,
            metrics_extensive,
            listen_metrics_urls,
            client_tls,
            peer_tls,
        })
    }
}

impl TlsFlags {
    /// Validates the client TLS flags; `None` when no certificate source is given.
    ///
    /// # Errors
    /// A lone cert or key file, a client-cert-auth without a trusted CA, an unknown or
    /// unsupported version or cipher suite, or inconsistent versions.
    pub fn validate(
        &self,
        data_dir: &std::path::Path,
        urls: &[Url],
    ) -> Result<Option<ServerTls>, ConfigError> {
        let material = Material {
            names: ["cert-file", "key-file", "client-cert-auth"],
            cert: &self.cert_file,
            key: &self.key_file,
            ca: &self.trusted_ca_file,
            crl: &self.client_crl_file,
            allowed_hostname: &self.client_cert_allowed_hostname,
            client_cert_auth: self.client_cert_auth,
            auto: self.auto_tls,
            fixtures: data_dir.join("fixtures").join("client"),
        };
        material.validate(self, urls, None)
    }

    /// Versions and TLS 1.2 suites, shared by client and peer TLS.
    fn protocol(&self) -> Result<(TlsVersion, TlsVersion, Vec<String>), ConfigError> {
        let bad = |flag: &'static str, value: &str, reason: &str| ConfigError::BadValue {
            flag,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let version = |flag: &'static str, v: &str| match v {
            "TLS1.2" => Ok(TlsVersion::Tls12),
            "TLS1.3" => Ok(TlsVersion::Tls13),
            "TLS1.0" | "TLS1.1" => Err(bad(flag, v, "TLS 1.0 and 1.1 are not supported by Cairn")),
            _ => Err(bad(flag, v, "unexpected TLS version (expected TLS1.2 or TLS1.3)")),
        };
        let min_version = version("tls-min-version", &self.tls_min_version)?;
        let max_version = if self.tls_max_version.is_empty() {
            TlsVersion::Tls13
        } else {
            version("tls-max-version", &self.tls_max_version)?
        };
        if min_version > max_version {
            return Err(bad(
                "tls-max-version",
                &self.tls_max_version,
                "min version (--tls-min-version) is greater than max version (--tls-max-version)",
            ));
        }
        let mut cipher_suites = Vec::new();
        for name in self.cipher_suites.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            // etcd's tlsutil also takes Go's pre-1.14 ChaCha20 names.
            let name = match name {
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
                    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
                }
                "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
                    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
                }
                other => other,
            };
            if GO_UNSUPPORTED_SUITES.contains(&name) {
                return Err(bad(
                    "cipher-suites",
                    name,
                    "not supported by Cairn's TLS library (only ECDHE with AES-GCM or ChaCha20-Poly1305)",
                ));
            }
            if !CIPHER_SUITES.contains(&name) && !TLS13_SUITES.contains(&name) {
                return Err(bad("cipher-suites", name, "unexpected TLS cipher suite"));
            }
            cipher_suites.push(name.to_owned());
        }
        if !cipher_suites.is_empty() && min_version == TlsVersion::Tls13 {
            return Err(bad(
                "cipher-suites",
                &self.cipher_suites,
                "cipher suites cannot be configured when only TLS1.3 is enabled",
            ));
        }
        Ok((min_version, max_version, cipher_suites))
    }
}

impl PeerTlsFlags {
    /// Validates the peer TLS flags (with versions and suites from `common`); `None` when
    /// no peer certificate source is given.
    ///
    /// # Errors
    /// As [`TlsFlags::validate`], plus certificate files without `--peer-trusted-ca-file`
    /// (Cairn verifies other members only against it).
    pub fn validate(
        &self,
        common: &TlsFlags,
        data_dir: &std::path::Path,
        urls: &[Url],
    ) -> Result<Option<PeerTls>, ConfigError> {
        let material = Material {
            names: ["peer-cert-file", "peer-key-file", "peer-client-cert-auth"],
            cert: &self.peer_cert_file,
            key: &self.peer_key_file,
            ca: &self.peer_trusted_ca_file,
            crl: &self.peer_crl_file,
            allowed_hostname: &self.peer_cert_allowed_hostname,
            client_cert_auth: self.peer_client_cert_auth,
            auto: self.peer_auto_tls,
            fixtures: data_dir.join("fixtures").join("peer"),
        };
        let allowed_cn =
            (!self.peer_cert_allowed_cn.is_empty()).then(|| self.peer_cert_allowed_cn.clone());
        let Some(server) = material.validate(common, urls, allowed_cn)? else {
            return Ok(None);
        };
        let skip_verify = matches!(server.source, TlsSource::Auto { .. });
        if !skip_verify && server.trusted_ca.is_none() {
            return Err(ConfigError::BadValue {
                flag: "peer-trusted-ca-file",
                value: String::new(),
                reason: "peer TLS with --peer-cert-file needs the CA that signs the other members' certificates".into(),
            });
        }
        Ok(Some(PeerTls { server, skip_verify }))
    }
}

/// One side's certificate flags (client or peer), before validation.
struct Material<'a> {
    /// Flag names: cert file, key file, client-cert-auth.
    names: [&'static str; 3],
    cert: &'a str,
    key: &'a str,
    ca: &'a str,
    /// The certificate revocation list file (PEM).
    crl: &'a str,
    /// The hostname client certificates must be valid for.
    allowed_hostname: &'a str,
    client_cert_auth: bool,
    auto: bool,
    fixtures: PathBuf,
}

impl Material<'_> {
    fn validate(
        self,
        common: &TlsFlags,
        urls: &[Url],
        allowed_cn: Option<String>,
    ) -> Result<Option<ServerTls>, ConfigError> {
        let [cert_flag, key_flag, auth_flag] = self.names;
        let bad = |flag: &'static str, reason: String| ConfigError::BadValue {
            flag,
            value: String::new(),
            reason,
        };
        let peer = auth_flag.starts_with("peer");
        let ca_flag = if peer { "--peer-trusted-ca-file" } else { "--trusted-ca-file" };
        if !self.crl.is_empty() && self.ca.is_empty() {
            let crl_flag = if peer { "peer-crl-file" } else { "client-crl-file" };
            let reason = format!("needs {ca_flag} (only verified certificates can be revoked)");
            return Err(bad(crl_flag, reason));
        }
        let host_flag =
            if peer { "peer-cert-allowed-hostname" } else { "client-cert-allowed-hostname" };
        if !self.allowed_hostname.is_empty() {
            if self.ca.is_empty() {
                return Err(bad(host_flag, format!("needs {ca_flag}")));
            }
            if allowed_cn.is_some() {
                // As etcd: "AllowedCN and AllowedHostname are mutually exclusive".
                return Err(bad(
                    host_flag,
                    "cannot be combined with --peer-cert-allowed-cn".into(),
                ));
            }
        }
        let source = match (self.cert.is_empty(), self.key.is_empty()) {
            (false, false) => {
                TlsSource::Files { cert: PathBuf::from(self.cert), key: PathBuf::from(self.key) }
            }
            (true, false) => {
                return Err(bad(cert_flag, format!("--{key_flag} needs --{cert_flag}")));
            }
            (false, true) => {
                return Err(bad(key_flag, format!("--{cert_flag} needs --{key_flag}")));
            }
            (true, true) if self.auto => {
                if common.self_signed_cert_validity == 0 {
                    return Err(bad("self-signed-cert-validity", "must be at least 1".into()));
                }
                let mut hosts: Vec<String> = urls.iter().map(|u| u.host.clone()).collect();
                hosts.sort();
                hosts.dedup();
                TlsSource::Auto {
                    dir: self.fixtures,
                    hosts,
                    years: common.self_signed_cert_validity,
                }
            }
            (true, true) => return Ok(None),
        };
        let (min_version, max_version, cipher_suites) = common.protocol()?;
        let trusted_ca = (!self.ca.is_empty()).then(|| PathBuf::from(self.ca));
        if self.client_cert_auth && trusted_ca.is_none() {
            let ca_flag = if auth_flag.starts_with("peer") {
                "--peer-trusted-ca-file"
            } else {
                "--trusted-ca-file"
            };
            return Err(bad(auth_flag, format!("needs {ca_flag}")));
        }
        let crl = (!self.crl.is_empty()).then(|| PathBuf::from(self.crl));
        let allowed_hostname =
            (!self.allowed_hostname.is_empty()).then(|| self.allowed_hostname.to_owned());
        Ok(Some(ServerTls {
            source,
            trusted_ca,
            crl,
            client_cert_auth: self.client_cert_auth,
            min_version,
            max_version,
            cipher_suites,
            allowed_cn,
            allowed_hostname,
        }))
    }
}

/// Parses `--initial-cluster` (`name=url,...`) into each name's peer URLs.
///
/// # Errors
/// [`ConfigError::BadValue`] for an empty list or a part that is not `name=URL`.
pub fn parse_initial_cluster(raw: &str) -> Result<BTreeMap<String, Vec<String>>, ConfigError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, url) = part.split_once('=').ok_or_else(|| ConfigError::BadValue {
            flag: "initial-cluster",
            value: raw.to_owned(),
            reason: format!("{part:?} is not name=URL"),
        })?;
        let url = Url::parse("initial-cluster", url)?;
        out.entry(name.to_owned()).or_default().push(url.raw);
    }
    if out.is_empty() {
        return Err(ConfigError::BadValue {
            flag: "initial-cluster",
            value: raw.to_owned(),
            reason: "empty".into(),
        });
    }
    Ok(out)
}

/// Parses etcd's retention: for periodic mode an integer is hours, otherwise a Go-style
/// duration ("30m", "1h30m", "90s"); for revision mode an integer count.
fn parse_auto_compaction(mode: &str, retention: &str) -> Result<AutoCompaction, ConfigError> {
    let bad = |reason: &str| ConfigError::BadValue {
        flag: "auto-compaction-retention",
        value: retention.to_owned(),
        reason: reason.to_owned(),
    };
    match mode {
        "periodic" => {
            let d = match retention.parse::<u64>() {
                Ok(hours) => Duration::from_secs(hours * 3600),
                Err(_) => parse_go_duration(retention)
                    .ok_or_else(|| bad("not an integer of hours or a duration"))?,
            };
            Ok(if d.is_zero() { AutoCompaction::Disabled } else { AutoCompaction::Periodic(d) })
        }
        "revision" => {
            let n = retention
                .parse::<i64>()
                .map_err(|_| bad("revision retention must be an integer"))?;
            if n < 0 {
                return Err(bad("must not be negative"));
            }
            Ok(if n == 0 { AutoCompaction::Disabled } else { AutoCompaction::Revision(n) })
        }
        other => Err(ConfigError::BadValue {
            flag: "auto-compaction-mode",
            value: other.to_owned(),
            reason: "must be 'periodic' or 'revision'".into(),
        }),
    }
}

/// Parses a flag holding a positive Go duration ("10m", "1m30s", "500ms").
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_go_duration(s) {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err("must be positive".into()),
        None => Err("not a duration (e.g. 10m, 1m30s, 500ms)".into()),
    }
}

/// Parses a Go `time.Duration` string made of h, m, s and ms parts.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let secs = match unit {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1000.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
        rest = next;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: Config,
    }

    fn parse(args: &[&str]) -> Result<Validated, ConfigError> {
        let mut argv = vec!["cairn"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().cfg.validate()
    }

    #[test]
    fn defaults_match_etcd() {
        let v = parse(&[]).unwrap();
        assert_eq!(v.data_dir, PathBuf::from("default.etcd"));
        assert_eq!(v.listen_client_urls[0].host_port(), "localhost:2379");
        assert_eq!(v.election_ticks, 10);
        assert_eq!(v.quota_backend_bytes, DEFAULT_QUOTA_BACKEND_BYTES);
        assert_eq!(v.auto_compaction, AutoCompaction::Disabled);
        assert_eq!(v.raw.watch_progress_notify_interval, Duration::from_secs(600));
    }

    #[test]
    fn watch_progress_notify_interval_takes_a_positive_go_duration() {
        let v = parse(&["--watch-progress-notify-interval", "1m30s"]).unwrap();
        assert_eq!(v.raw.watch_progress_notify_interval, Duration::from_secs(90));
        for bad in ["0s", "soon"] {
            let argv = ["cairn", "--watch-progress-notify-interval", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
    }

    #[test]
    fn force_new_cluster_is_a_go_style_bool_flag() {
        assert!(!parse(&[]).unwrap().raw.force_new_cluster);
        assert!(parse(&["--force-new-cluster"]).unwrap().raw.force_new_cluster);
        assert!(parse(&["--force-new-cluster=true"]).unwrap().raw.force_new_cluster);
        assert!(!parse(&["--force-new-cluster=false"]).unwrap().raw.force_new_cluster);
    }

    #[test]
    fn corrupt_check_time_is_off_by_default_and_takes_a_go_duration() {
        assert_eq!(parse(&[]).unwrap().corrupt_check_interval, None);
        for off in ["0", "0s"] {
            let v = parse(&["--experimental-corrupt-check-time", off]).unwrap();
            assert_eq!(v.corrupt_check_interval, None, "{off}");
        }
        let v = parse(&["--experimental-corrupt-check-time", "5m"]).unwrap();
        assert_eq!(v.corrupt_check_interval, Some(Duration::from_secs(300)));
        assert!(parse(&["--experimental-corrupt-check-time", "soon"]).is_err());
    }

    #[test]
    fn election_timeout_must_be_five_heartbeats() {
        let err = parse(&["--heartbeat-interval", "100", "--election-timeout", "400"]).unwrap_err();
        assert!(err.to_string().contains("should be at least as 5 times"));
    }

    #[test]
    fn bad_urls_and_states_are_rejected() {
        assert!(parse(&["--listen-client-urls", "localhost:2379"]).is_err());
        assert!(parse(&["--listen-client-urls", "ftp://a:1"]).is_err());
        assert!(parse(&["--initial-cluster-state", "maybe"]).is_err());
        assert!(parse(&["--initial-cluster", "other=http://localhost:2380"]).is_err());
    }

    #[test]
    fn auto_compaction_retention_parses_like_etcd() {
        assert_eq!(
            parse_auto_compaction("periodic", "1").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_auto_compaction("periodic", "30m").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(1800))
        );
        assert_eq!(
            parse_auto_compaction("revision", "1000").unwrap(),
            AutoCompaction::Revision(1000)
        );
        assert!(parse_auto_compaction("revision", "1h").is_err());
        assert!(parse_auto_compaction("sometimes", "1").is_err());
    }

    #[test]
    fn metrics_flags_parse_like_etcd() {
        let v = parse(&[]).unwrap();
        assert!(!v.metrics_extensive);
        assert!(v.listen_metrics_urls.is_empty());
        let v =
            parse(&["--metrics", "extensive", "--listen-metrics-urls", "http://127.0.0.1:2381"])
                .unwrap();
        assert!(v.metrics_extensive);
        assert_eq!(v.listen_metrics_urls[0].port, 2381);
        assert!(parse(&["--metrics", "verbose"]).is_err());
        assert!(parse(&["--listen-metrics-urls", "127.0.0.1:2381"]).is_err());
    }

    #[test]
    fn peer_tls_flags_validate_like_etcd() {
        let https = [
            "--listen-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-cluster",
            "default=https://127.0.0.1:2380",
        ];
        let err = parse(&https).unwrap_err().to_string();
        assert!(err.contains("--peer-cert-file, --peer-key-file"), "{err}");
        assert!(parse(&[]).unwrap().peer_tls.is_none());
        let files = ["--peer-cert-file", "p.pem", "--peer-key-file", "pk.pem"];
        let err = parse(&[&https[..], &files[..]].concat()).unwrap_err().to_string();
        assert!(err.contains("peer-trusted-ca-file"), "{err}");
        let full = [
            &https[..],
            &files[..],
            &["--peer-trusted-ca-file", "ca.pem", "--peer-cert-allowed-cn", "member"],
        ]
        .concat();
        let peer = parse(&full).unwrap().peer_tls.unwrap();
        assert_eq!(peer.server.allowed_cn.as_deref(), Some("member"));
        assert!(!peer.skip_verify);
        assert!(parse(&[&https[..], &["--peer-client-cert-auth"]].concat()).is_err());
        let auto = parse(&[&https[..], &["--peer-auto-tls", "--data-dir", "/d"]].concat());
        let auto = auto.unwrap().peer_tls.unwrap();
        assert!(auto.skip_verify);
        assert!(matches!(auto.server.source, TlsSource::Auto { ref dir, .. }
            if dir == std::path::Path::new("/d/fixtures/peer")));
        // Versions and suites are shared with the client side.
        let bad = [&https[..], &files[..], &["--peer-trusted-ca-file", "ca.pem"]].concat();
        assert!(parse(&[&bad[..], &["--tls-max-version", "TLS1.1"]].concat()).is_err());
    }

    #[test]
    fn tls_flags_validate_like_etcd() {
        let https = ["--listen-client-urls", "https://127.0.0.1:2379"];
        let err = parse(&https).unwrap_err().to_string();
        assert!(err.contains("--cert-file, --key-file"), "{err}");
        assert!(parse(&[]).unwrap().client_tls.is_none());
        let files = ["--cert-file", "c.pem", "--key-file", "k.pem"];
        let v = parse(&[&https[..], &files[..]].concat()).unwrap();
        let tls = v.client_tls.unwrap();
        assert_eq!((tls.min_version, tls.max_version), (TlsVersion::Tls12, TlsVersion::Tls13));
        assert!(parse(&["--cert-file", "c.pem"]).is_err());
        assert!(parse(&[&files[..], &["--client-cert-auth"]].concat()).is_err());
        let ok =
            parse(&[&files[..], &["--client-cert-auth", "--trusted-ca-file", "ca.pem"]].concat())
                .unwrap();
        assert!(ok.client_tls.unwrap().client_cert_auth);
        for bad in [
            &["--tls-min-version", "TLS1.1"][..],
            &["--tls-min-version", "SSL3"],
            &["--tls-min-version", "TLS1.3", "--tls-max-version", "TLS1.2"],
            &["--cipher-suites", "TLS_RSA_WITH_RC4_128_SHA"],
            &["--cipher-suites", "BOGUS"],
            &["--tls-min-version", "TLS1.3", "--cipher-suites", CIPHER_SUITES[0]],
        ] {
            assert!(parse(&[&files[..], bad].concat()).is_err(), "{bad:?}");
        }
        let named =
            ["--cipher-suites", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,TLS_AES_128_GCM_SHA256"];
        let suites = parse(&[&files[..], &named[..]].concat()).unwrap().client_tls.unwrap();
        assert_eq!(
            suites.cipher_suites,
            ["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"]
        );
        let rc4 = ["--cipher-suites", "TLS_RSA_WITH_RC4_128_SHA"];
        let err = parse(&[&files[..], &rc4[..]].concat()).unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
        let auto = parse(&[&https[..], &["--auto-tls", "--data-dir", "/d"]].concat()).unwrap();
        assert!(matches!(
            auto.client_tls.unwrap().source,
            TlsSource::Auto { ref dir, ref hosts, years: 1 }
                if dir == std::path::Path::new("/d/fixtures/client") && hosts == &["127.0.0.1"]
        ));
    }

    #[test]
    fn ipv6_urls_keep_their_brackets_for_binding() {
        let u = Url::parse("listen-client-urls", "http://[::1]:2379").unwrap();
        assert_eq!(u.host_port(), "[::1]:2379");
    }
}
