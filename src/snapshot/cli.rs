//! `cairn snapshot save | status | restore`, with etcdutl's (and etcdctl's) flags and
//! output.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use cairn_proto::etcdserverpb::{SnapshotRequest, maintenance_client::MaintenanceClient};
use sha2::{Digest, Sha256};

use super::{Error, RestoreOptions, image, s3};

/// The `cairn snapshot` subcommands.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Stores a snapshot of a running member's state in a file.
    Save {
        /// The file to write.
        path: PathBuf,
        /// The member to ask (`host:port` or `http://host:port`; the first one is used).
        #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
        endpoints: Vec<String>,
        /// CA bundle that verifies an `https://` member (etcdctl's `--cacert`).
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Client certificate to present (etcdctl's `--cert`; needs `--key`).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The client certificate's key (etcdctl's `--key`).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Prints a snapshot file's hash, revision, total keys and size.
    Status {
        /// The snapshot file.
        path: PathBuf,
        /// Output format: simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Builds a new member's data dir from a snapshot (Cairn's own or etcd's).
    Restore {
        /// The snapshot file.
        path: PathBuf,
        /// The new member's name.
        #[arg(long, default_value = "default")]
        name: String,
        /// The data dir to create (default `<name>.etcd`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The new cluster's founding members, `name=peer-url,...`.
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        /// The new cluster's token (member and cluster ids derive from it).
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs.
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Accept a snapshot without a SHA-256 trailer (a database file copied directly).
        #[arg(long)]
        skip_hash_check: bool,
    },
    /// Uploads a snapshot file to an S3-compatible bucket (multipart above the part size).
    Upload {
        /// The file to upload.
        path: PathBuf,
        /// Where: `s3://bucket/key`.
        url: String,
        #[command(flatten)]
        s3: s3::S3Args,
        /// Bytes per part of a multipart upload (at least 5 MiB).
        #[arg(long, default_value_t = 64 << 20)]
        part_size: u64,
    },
    /// Downloads a snapshot from an S3-compatible bucket, checking its sha256 if given.
    Download {
        /// What: `s3://bucket/key`.
        url: String,
        /// The file to write (appears only when complete and verified).
        path: PathBuf,
        #[command(flatten)]
        s3: s3::S3Args,
        /// The expected `sha256:<hex>` (or bare hex) of the object.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Deletes a snapshot from an S3-compatible bucket.
    Delete {
        /// What: `s3://bucket/key`.
        url: String,
        #[command(flatten)]
        s3: s3::S3Args,
    },
}

/// Runs one `cairn snapshot` subcommand.
///
/// # Errors
/// Whatever the subcommand failed at, worded for the operator.
pub fn run(args: &Args) -> Result<(), Error> {
    match &args.command {
        Command::Save { path, endpoints, cacert, cert, key } => {
            let endpoint = endpoints.first().map_or("127.0.0.1:2379", String::as_str);
            let tls = match cacert {
                Some(ca) => Some(
                    crate::grpc::tls::Connector::client(ca, cert.as_deref().zip(key.as_deref()))
                        .map_err(|e| Error::Remote(e.to_string()))?,
                ),
                None => None,
            };
            runtime()?.block_on(save(endpoint, tls, path))?;
            println!("Snapshot saved at {}", path.display());
            Ok(())
        }
        Command::Status { path, write_out } => {
            let status = status(path)?;
            println!("{}", status.render(write_out)?);
            Ok(())
        }
        Command::Restore {
            path,
            name,
            data_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check,
        } => {
            let data_dir =
                data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{name}.etcd")));
            let restored = super::restore(&RestoreOptions {
                snapshot: path.clone(),
                name: name.clone(),
                data_dir: data_dir.clone(),
                initial_cluster: initial_cluster.clone(),
                initial_cluster_token: initial_cluster_token.clone(),
                initial_advertise_peer_urls: initial_advertise_peer_urls.clone(),
                skip_hash_check: *skip_hash_check,
            })?;
            println!(
                "restored snapshot {} at revision {} into {} (member {:x}, cluster {:x})",
                path.display(),
                restored.revision,
                data_dir.display(),
                restored.member_id,
                restored.cluster_id
            );
            Ok(())
        }
        Command::Upload { path, url, s3, part_size } => {
            let object = s3::Object::parse(url)?;
            let client = s3::Client::new(s3)?;
            let up = runtime()?.block_on(client.upload(path, &object, *part_size))?;
            println!(
                "uploaded {} to {object} ({} bytes, {} parts)",
                path.display(),
                up.size,
                up.parts
            );
            Ok(())
        }
        Command::Download { url, path, s3, sha256 } => {
            let object = s3::Object::parse(url)?;
            let client = s3::Client::new(s3)?;
            let (sum, size) =
                runtime()?.block_on(client.download(&object, path, sha256.as_deref()))?;
            println!("downloaded {object} to {} ({size} bytes, {sum})", path.display());
            Ok(())
        }
        Command::Delete { url, s3 } => {
            let object = s3::Object::parse(url)?;
            runtime()?.block_on(s3::Client::new(s3)?.delete(&object))?;
            println!("deleted {object}");
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Remote(format!("tokio runtime: {e}")))
}

/// Streams a snapshot from `endpoint` into `path` (through `path.part`, renamed when the
/// trailer checked out and the file is fsynced, as etcdctl does); over TLS through `tls`
/// (a bare `host:port` is then dialled as `https://`).
async fn save(
    endpoint: &str,
    tls: Option<std::sync::Arc<crate::grpc::tls::Connector>>,
    path: &Path,
) -> Result<(), Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("{scheme}://{endpoint}")
    };
    let remote = |e: &dyn std::fmt::Display| Error::Remote(format!("{endpoint}: {e}"));
    let channel = match tls {
        Some(tls) => crate::grpc::tls::Connector::endpoint(&url)
            .map_err(|e| remote(&e))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_with_connector(crate::grpc::tls::Dial(tls))
            .await
            .map_err(|e| remote(&e))?,
        None => tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| remote(&e))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| remote(&e))?,
    };
    let mut client = MaintenanceClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut stream =
        client.snapshot(SnapshotRequest {}).await.map_err(|e| remote(&e.message()))?.into_inner();
    let part = path.with_extension(format!(
        "{}part",
        path.extension().map(|e| format!("{}.", e.to_string_lossy())).unwrap_or_default()
    ));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| Error::Io { path: p, source }
    };
    let mut file = std::fs::File::create(&part).map_err(io(&part))?;
    let result = async {
        while let Some(msg) = stream.message().await.map_err(|e| remote(&e.message()))? {
            file.write_all(&msg.blob).map_err(io(&part))?;
        }
        file.sync_all().map_err(io(&part))?;
        verify_trailer(&part)
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, path).map_err(io(path))?;
    Ok(())
}

/// Checks that the file's last 32 bytes are the SHA-256 of the rest (any snapshot stream,
/// Cairn's or etcd's, ends so).
fn verify_trailer(path: &Path) -> Result<(), Error> {
    let io = |source| Error::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let body = len.checked_sub(image::SHA_LEN as u64).ok_or_else(|| Error::Invalid {
        path: path.to_owned(),
        reason: "the stream ended before its sha256 trailer".into(),
    })?;
    let mut sha = Sha256::new();
    let mut left = body;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..want).unwrap_or_default();
        f.read_exact(chunk).map_err(io)?;
        sha.update(&*chunk);
        left -= want as u64;
    }
    let mut trailer = [0u8; image::SHA_LEN];
    f.read_exact(&mut trailer).map_err(io)?;
    let actual: [u8; image::SHA_LEN] = sha.finalize().into();
    if actual != trailer {
        return Err(Error::HashMismatch {
            path: path.to_owned(),
            expected: image::hex(&trailer),
            actual: image::hex(&actual),
        });
    }
    Ok(())
}

/// etcdutl's snapshot status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Status {
    pub hash: u32,
    pub revision: i64,
    pub total_key: u64,
    pub total_size: u64,
}

/// Reads the status of a snapshot file (Cairn's image or etcd's database).
fn status(path: &Path) -> Result<Status, Error> {
    if image::is_cairn_image(path)? {
        // A present trailer is checked; a missing one is accepted (a data file copied
        // directly has none, and etcdutl's status reads those too).
        let s = match image::read_image(path, false, &mut |_, _, _| Ok(())) {
            Err(Error::Invalid { reason, .. }) if reason.starts_with(image::MISSING_HASH) => {
                image::read_image(path, true, &mut |_, _, _| Ok(()))?
            }
            other => other?,
        };
        Ok(Status {
            hash: s.hash,
            revision: s.header.revision,
            total_key: s.records,
            total_size: s.size,
        })
    } else {
        super::bbolt::status(path)
    }
}

impl Status {
    /// Formats as etcdutl does for `-w simple|table|json`.
    fn render(&self, format: &str) -> Result<String, Error> {
        let size = humanize_bytes(self.total_size);
        match format {
            "simple" => {
                Ok(format!("{:x}, {}, {}, {size}", self.hash, self.revision, self.total_key))
            }
            "json" => Ok(serde_json::json!({
                "hash": self.hash,
                "revision": self.revision,
                "totalKey": self.total_key,
                "totalSize": self.total_size,
            })
            .to_string()),
            "table" => Ok(table(
                &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
                &[
                    format!("{:x}", self.hash),
                    self.revision.to_string(),
                    self.total_key.to_string(),
                    size,
                ],
            )),
            other => {
                Err(Error::Config(format!("unknown output format {other:?} (simple, table, json)")))
            }
        }
    }
}

/// An etcdctl-style table (tablewriter): centered headers, right-aligned cells.
fn table(headers: &[&str], row: &[String]) -> String {
    let widths: Vec<usize> =
        headers.iter().zip(row).map(|(h, c)| h.len().max(c.len()) + 2).collect();
    let rule: String =
        widths.iter().map(|w| format!("+{}", "-".repeat(*w))).collect::<String>() + "+";
    let head: String = headers
        .iter()
        .zip(&widths)
        .map(|(h, w)| {
            let pad = w - h.len();
            format!("|{}{h}{}", " ".repeat(pad / 2), " ".repeat(pad - pad / 2))
        })
        .collect::<String>()
        + "|";
    let cells: String = row
        .iter()
        .zip(&widths)
        .map(|(c, w)| format!("|{c:>width$} ", width = w - 1))
        .collect::<String>()
        + "|";
    [rule.clone(), head, rule.clone(), cells, rule].join("\n")
}

/// go-humanize's `Bytes`: SI units, one decimal below 10.
fn humanize_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 10 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let v = n as f64;
    let e = (v.ln() / 1000f64.ln()).floor();
    let unit = UNITS.get(e as usize).copied().unwrap_or("EB");
    let val = (v / 1000f64.powf(e) * 10.0 + 0.5).floor() / 10.0;
    if val < 10.0 { format!("{val:.1} {unit}") } else { format!("{val:.0} {unit}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_go_humanize_does() {
        assert_eq!(humanize_bytes(5), "5 B");
        assert_eq!(humanize_bytes(20480), "20 kB");
        assert_eq!(humanize_bytes(2_100_000), "2.1 MB");
    }

    #[test]
    fn the_table_looks_like_etcdutls() {
        let s = Status { hash: 0xfe01_cf57, revision: 10, total_key: 7, total_size: 2_100_000 };
        let t = s.render("table").unwrap();
        assert_eq!(
            t,
            "+----------+----------+------------+------------+\n\
             |   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n\
             +----------+----------+------------+------------+\n\
             | fe01cf57 |       10 |          7 |     2.1 MB |\n\
             +----------+----------+------------+------------+"
        );
    }
}
