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
    /// `--metrics extensive`: export the gRPC handling-time histogram.
    pub metrics_extensive: bool,
    /// Extra listeners for `/metrics` and the health endpoints (empty: client URLs only).
    pub listen_metrics_urls: Vec<Url>,
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

        let data_dir =
            self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)));
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
            metrics_extensive,
            listen_metrics_urls,
        })
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
    fn ipv6_urls_keep_their_brackets_for_binding() {
        let u = Url::parse("listen-client-urls", "http://[::1]:2379").unwrap();
        assert_eq!(u.host_port(), "[::1]:2379");
    }
}
