//! A thin etcd v3 client over the `cairn-proto` tonic stubs: the membership calls
//! (MemberList/Add/Remove/Promote), Status, MoveLeader, HashKV, Compact, Defragment and Alarm, each with a deadline,
//! over channels with HTTP/2 keepalive.
//!
//! `https://` endpoints are dialled over TLS ([`Tls`]: rustls with the ring provider,
//! through tokio-rustls; tonic itself speaks plain HTTP/2 over the TLS stream): the member
//! is verified against the CA given and the client certificate given is presented.
//!
//! It knows nothing of Kubernetes; it speaks to one endpoint per client, so it manages a
//! real etcd as well as Cairn.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cairn_proto::etcdserverpb as pb;
use pb::{
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
};
use tonic::transport::{Channel, Endpoint};

/// How long one call may take before it fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a defragmentation may take.
pub const DEFRAG_TIMEOUT: Duration = Duration::from_secs(600);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A failed etcd call, naming the endpoint and the operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint could not be reached.
    #[error("{endpoint}: connect: {message}")]
    Connect {
        /// The endpoint URL.
        endpoint: String,
        /// The transport's reason.
        message: String,
    },
    /// The member answered with an error status.
    #[error("{endpoint}: {op}: {status}", status = .status.message())]
    Rpc {
        /// The endpoint URL.
        endpoint: String,
        /// The RPC name.
        op: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
}

impl Error {
    /// True when a promote failed only because the learner is not yet caught up or not yet
    /// seen as started by the leader (both pass with time).
    pub fn learner_not_ready(&self) -> bool {
        matches!(self, Error::Rpc { status, .. }
            if status.message().contains("in sync with leader")
                || status.message().contains("not enough started members"))
    }

    /// True when the leader refused a change because too few members are seen as started
    /// (a just-promoted or just-restarted member; it passes with time).
    pub fn not_enough_started(&self) -> bool {
        matches!(self, Error::Rpc { status, .. } if status.message().contains("not enough started members"))
    }

    /// True when the revision asked for is at or below the compacted revision.
    pub fn compacted(&self) -> bool {
        matches!(self, Error::Rpc { status, .. } if status.message().contains("required revision has been compacted"))
    }

    /// True when the member or id the call named is not in the member list.
    pub fn member_not_found(&self) -> bool {
        matches!(self, Error::Rpc { status, .. } if status.code() == tonic::Code::NotFound)
    }
}

/// One member of the member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Member id.
    pub id: u64,
    /// Name (empty until the member has started and published it).
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Client URLs (empty until started).
    pub client_urls: Vec<String>,
    /// A non-voting learner.
    pub is_learner: bool,
}

/// A member's answer to Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Who answered.
    pub member_id: u64,
    /// The cluster it belongs to.
    pub cluster_id: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Raft applied index.
    pub applied_index: u64,
    /// Current store revision.
    pub revision: i64,
    /// Whether it is a learner.
    pub is_learner: bool,
    /// The etcd API version it reports.
    pub version: String,
    /// Size of its database file in bytes.
    pub db_size: i64,
    /// Bytes of the database in use (the rest is free space a defragmentation returns).
    pub db_size_in_use: i64,
    /// Raised alarms, as etcd lists them (`memberID:<id> alarm:NOSPACE `).
    pub errors: Vec<String>,
}

/// Client TLS towards the members: the CA that verifies them and the certificate (with its
/// key) the operator presents, from PEM.
#[derive(Clone)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

impl Tls {
    /// Builds the configuration from PEM `ca` (one or more certificates), `cert` (the
    /// chain) and `key`.
    ///
    /// # Errors
    /// Names the part that does not parse or the mismatch rustls found.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| format!("ca.crt: {e}"))?;
            roots.add(c).map_err(|e| format!("ca.crt: {e}"))?;
        }
        if roots.is_empty() {
            return Err("ca.crt: no PEM certificate".into());
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.crt: {e}"))?;
        if chain.is_empty() {
            return Err("tls.crt: no PEM certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("tls.crt/tls.key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self(Arc::new(config)))
    }
}

type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// tonic's connector for `https://` endpoints: TCP, then a TLS handshake verifying the
/// URI's host name.
impl tower_service::Service<http::Uri> for Tls {
    type Response = Dialed;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.0.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A client of one member's etcd API.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: String,
    channel: Channel,
}

impl Client {
    /// Connects to `endpoint` (`http://host:2379`, or `https://` with `tls`).
    ///
    /// # Errors
    /// [`Error::Connect`] when the URL is bad or the member is unreachable.
    pub async fn connect(endpoint: &str, tls: Option<&Tls>) -> Result<Self, Error> {
        Self::connect_with_deadline(endpoint, CALL_TIMEOUT, tls).await
    }

    /// Connects to `endpoint` with `deadline` for every call (long calls: Defragment);
    /// an `https://` endpoint needs `tls`.
    ///
    /// # Errors
    /// [`Error::Connect`] when the URL is bad or the member is unreachable.
    pub async fn connect_with_deadline(
        endpoint: &str,
        deadline: Duration,
        tls: Option<&Tls>,
    ) -> Result<Self, Error> {
        let fail = |message: String| Error::Connect { endpoint: endpoint.to_owned(), message };
        // Over TLS tonic is asked for plain HTTP/2 and the connector does the TLS.
        let (url, dial) = match endpoint.strip_prefix("https://") {
            Some(rest) => {
                let tls = tls.ok_or_else(|| fail("https endpoint but no client TLS".into()))?;
                (format!("http://{rest}"), Some(tls.clone()))
            }
            None => (endpoint.to_owned(), None),
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|e| fail(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(deadline)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let connect = async {
            match dial {
                Some(dial) => channel.connect_with_connector(dial).await,
                None => channel.connect().await,
            }
        };
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| fail("timed out".to_owned()))?
            .map_err(|e| fail(format!("{e}: {}", source_chain(&e))))?;
        Ok(Self { endpoint: endpoint.to_owned(), channel })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn rpc(&self, op: &'static str) -> impl FnOnce(tonic::Status) -> Error + '_ {
        move |status| Error::Rpc { endpoint: self.endpoint.clone(), op, status }
    }

    fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel.clone())
    }

    fn maintenance(&self) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel.clone())
    }

    /// The member list and the cluster id from the response header.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the member refuses.
    pub async fn member_list(&self) -> Result<(u64, Vec<Member>), Error> {
        self.member_list_with(true).await
    }

    /// The member list as this member knows it, without asking a quorum (it answers while
    /// quorum is lost, possibly stale).
    ///
    /// # Errors
    /// [`Error::Rpc`] when the member refuses.
    pub async fn local_member_list(&self) -> Result<(u64, Vec<Member>), Error> {
        self.member_list_with(false).await
    }

    async fn member_list_with(&self, linearizable: bool) -> Result<(u64, Vec<Member>), Error> {
        let r = self
            .cluster()
            .member_list(pb::MemberListRequest { linearizable })
            .await
            .map_err(self.rpc("MemberList"))?
            .into_inner();
        let cluster_id = r.header.map_or(0, |h| h.cluster_id);
        Ok((cluster_id, r.members.into_iter().map(member).collect()))
    }

    /// Adds a member with `peer_url`, as a learner when `learner`; returns its id.
    ///
    /// # Errors
    /// [`Error::Rpc`], for example "too many learner members" or "Peer URLs already exists".
    pub async fn member_add(&self, peer_url: &str, learner: bool) -> Result<u64, Error> {
        let r = self
            .cluster()
            .member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![peer_url.to_owned()],
                is_learner: learner,
            })
            .await
            .map_err(self.rpc("MemberAdd"))?
            .into_inner();
        Ok(r.member.map_or(0, |m| m.id))
    }

    /// Removes member `id`.
    ///
    /// # Errors
    /// [`Error::Rpc`], for example when the removal would lose quorum.
    pub async fn member_remove(&self, id: u64) -> Result<(), Error> {
        self.cluster()
            .member_remove(pb::MemberRemoveRequest { id })
            .await
            .map_err(self.rpc("MemberRemove"))?;
        Ok(())
    }

    /// Promotes learner `id` to voter.
    ///
    /// # Errors
    /// [`Error::Rpc`]; [`Error::learner_not_ready`] tells a lagging learner apart.
    pub async fn member_promote(&self, id: u64) -> Result<(), Error> {
        self.cluster()
            .member_promote(pb::MemberPromoteRequest { id })
            .await
            .map_err(self.rpc("MemberPromote"))?;
        Ok(())
    }

    /// This member's Status.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the member refuses or times out.
    pub async fn status(&self) -> Result<Status, Error> {
        let r = self
            .maintenance()
            .status(pb::StatusRequest {})
            .await
            .map_err(self.rpc("Status"))?
            .into_inner();
        let h = r.header.unwrap_or_default();
        Ok(Status {
            member_id: h.member_id,
            cluster_id: h.cluster_id,
            leader: r.leader,
            applied_index: r.raft_applied_index,
            revision: h.revision,
            is_learner: r.is_learner,
            version: r.version,
            db_size: r.db_size,
            db_size_in_use: r.db_size_in_use,
            errors: r.errors,
        })
    }

    /// Asks this member (which must be the leader) to hand leadership to `target`.
    ///
    /// # Errors
    /// [`Error::Rpc`] when this member does not lead or the transfer times out.
    pub async fn move_leader(&self, target: u64) -> Result<(), Error> {
        self.maintenance()
            .move_leader(pb::MoveLeaderRequest { target_id: target })
            .await
            .map_err(self.rpc("MoveLeader"))?;
        Ok(())
    }

    /// Compacts the key space's history up to `revision` (physical: the call returns once
    /// the compaction is applied, as `etcdctl compact --physical`).
    ///
    /// # Errors
    /// [`Error::Rpc`]; [`Error::compacted`] tells apart a revision already compacted.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        KvClient::new(self.channel.clone())
            .compact(pb::CompactionRequest { revision, physical: true })
            .await
            .map_err(self.rpc("Compact"))?;
        Ok(())
    }

    /// Defragments this member's database (connect with [`DEFRAG_TIMEOUT`]: it may take
    /// long).
    ///
    /// # Errors
    /// [`Error::Rpc`] when the member refuses or the defragmentation fails.
    pub async fn defragment(&self) -> Result<(), Error> {
        self.maintenance()
            .defragment(pb::DefragmentRequest {})
            .await
            .map_err(self.rpc("Defragment"))?;
        Ok(())
    }

    /// Clears the NOSPACE alarm of every member (etcdctl alarm disarm).
    ///
    /// # Errors
    /// [`Error::Rpc`] when the cluster refuses.
    pub async fn disarm_nospace(&self) -> Result<(), Error> {
        self.maintenance()
            .alarm(pb::AlarmRequest {
                action: pb::alarm_request::AlarmAction::Deactivate as i32,
                member_id: 0,
                alarm: pb::AlarmType::Nospace as i32,
            })
            .await
            .map_err(self.rpc("Alarm"))?;
        Ok(())
    }

    /// HashKV at `revision` (0: the latest): (hash, the revision it covers).
    ///
    /// # Errors
    /// [`Error::Rpc`] when the member refuses.
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64), Error> {
        let r = self
            .maintenance()
            .hash_kv(pb::HashKvRequest { revision })
            .await
            .map_err(self.rpc("HashKV"))?
            .into_inner();
        Ok((r.hash, r.header.map_or(0, |h| h.revision)))
    }
}

fn member(m: pb::Member) -> Member {
    Member {
        id: m.id,
        name: m.name,
        peer_urls: m.peer_ur_ls,
        client_urls: m.client_ur_ls,
        is_learner: m.is_learner,
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// Formats a member or cluster id as etcdctl prints it (lower-case hex).
pub fn hex_id(id: u64) -> String {
    format!("{id:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_etcdctl_hex() {
        assert_eq!(hex_id(0x8e9e_05c5_2164_694d), "8e9e05c52164694d");
    }

    #[test]
    fn a_lagging_learner_is_told_apart_from_other_failures() {
        let e = |code, msg: &str| Error::Rpc {
            endpoint: "x".into(),
            op: "MemberPromote",
            status: tonic::Status::new(code, msg),
        };
        let lag = e(
            tonic::Code::FailedPrecondition,
            "etcdserver: can only promote a learner member which is in sync with leader",
        );
        assert!(lag.learner_not_ready());
        let unstarted = e(
            tonic::Code::FailedPrecondition,
            "etcdserver: re-configuration failed due to not enough started members",
        );
        assert!(unstarted.learner_not_ready());
        assert!(unstarted.not_enough_started());
        assert!(!e(tonic::Code::NotFound, "etcdserver: member not found").learner_not_ready());
        assert!(e(tonic::Code::NotFound, "etcdserver: member not found").member_not_found());
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_fails_with_its_name() {
        let err = Client::connect("http://127.0.0.1:1", None).await.unwrap_err();
        assert!(err.to_string().starts_with("http://127.0.0.1:1: connect"), "{err}");
        assert!(Client::connect("not a url", None).await.is_err());
        let err = Client::connect("https://127.0.0.1:1", None).await.unwrap_err();
        assert!(err.to_string().contains("no client TLS"), "{err}");
    }

    #[test]
    fn tls_material_that_does_not_parse_is_named() {
        let err = Tls::from_pem(b"", b"", b"").unwrap_err();
        assert!(err.starts_with("ca.crt"), "{err}");
    }
}
