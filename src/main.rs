//! The `cairn` binary: parse etcd-style configuration, start a member, serve until a signal.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use cairn::config::Config;
use clap::{Parser, Subcommand};

/// An etcd-compatible, strongly consistent key-value store.
#[derive(Debug, Parser)]
#[command(name = "cairn", disable_version_flag = true, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load-test an etcd-compatible endpoint (modeled on etcd's benchmark tool).
    Bench(cairn::bench::Args),
    /// Save, inspect and restore snapshots (etcdutl's `snapshot` commands).
    Snapshot(cairn::snapshot::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.version {
        println!("cairn Version: {}", cairn::server::VERSION);
        println!("etcd API Version: {}", cairn::server::ETCD_VERSION);
        return std::process::ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Bench(args)) => run_bench(&args),
        Some(Command::Snapshot(args)) => cairn::snapshot::run(&args).map_err(anyhow::Error::from),
        None => run_server(&cli.config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn-worker")
        .build()
        .context("tokio runtime")
}

fn run_bench(args: &cairn::bench::Args) -> anyhow::Result<()> {
    let summary = runtime()?.block_on(cairn::bench::run(args))?;
    summary.print();
    Ok(())
}

fn run_server(config: &Config) -> anyhow::Result<()> {
    // Everything is validated before anything is written.
    let cfg = config.validate()?;
    init_logging(&cfg.log_filter, &cfg.raw.log_outputs)?;
    // Installed before the member starts, so that recovery's fsyncs and applies are counted.
    let level =
        if cfg.metrics_extensive { cairn::metrics::Level::Extensive } else { Default::default() };
    cairn::metrics::install(level).context("metrics registry")?;
    runtime()?.block_on(async move {
        // TLS material is loaded (or generated) before any port is bound, so a bad file
        // fails the start with its name.
        let tls = cfg.client_tls.as_ref().map(cairn::grpc::Acceptor::new).transpose()?;
        let peer_tls = match &cfg.peer_tls {
            Some(peer) => {
                let acceptor = cairn::grpc::Acceptor::new(&peer.server)?;
                let connector =
                    cairn::grpc::tls::Connector::new(acceptor.clone(), peer.skip_verify)?;
                cairn::grpc::peer::use_tls(connector);
                Some(acceptor)
            }
            None => None,
        };
        let listeners = cairn::grpc::bind(&cfg.listen_client_urls).await?;
        let metrics_listeners = cairn::grpc::bind(&cfg.listen_metrics_urls).await?;
        let peer_listeners = cairn::grpc::bind(&cfg.listen_peer_urls).await?;
        let mine: Vec<String> = cfg.advertise_peer_urls.iter().map(|u| u.raw.clone()).collect();
        let all: Vec<String> = cfg.initial_cluster.values().flatten().cloned().collect();
        let join = if cairn::server::Server::needs_join(&cfg) {
            Some(cairn::grpc::peer::fetch_cluster(&mine, &all).await.map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        if !cfg.new_cluster {
            // A data dir from another cluster must not join this one (etcd checks the same
            // when a member starts with --initial-cluster-state existing).
            let local = cairn::server::Server::recorded_cluster_id(&cfg);
            let remote = cairn::grpc::peer::remote_cluster_id(&mine, &all).await;
            if let (Some(local), Some(remote)) = (local, remote) {
                anyhow::ensure!(
                    local == remote,
                    "etcdserver: cluster ID mismatch (local {local:x}, remote {remote:x})"
                );
            }
        }
        let transport = Arc::new(cairn::grpc::peer::PeerTransport::new());
        let mut told_removed = transport.removed();
        let server = cairn::server::Server::start(cfg.clone(), transport, join)?;
        for l in &listeners {
            if let Ok(addr) = l.tcp.local_addr() {
                tracing::info!(%addr, "serving client traffic");
            }
        }
        let corrupt_check = cairn::grpc::corrupt::spawn(server.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let http = cairn::gateway::router(&server);
        let serving =
            tokio::spawn(cairn::grpc::serve(server.clone(), listeners, tls.clone(), http, async {
                let _ = stop_rx.await;
            }));
        for l in &metrics_listeners {
            if let Ok(addr) = l.tcp.local_addr() {
                tracing::info!(%addr, "serving /metrics and health endpoints");
            }
        }
        let metrics_serving = (!metrics_listeners.is_empty()).then(|| {
            let router = cairn::gateway::metrics_router(&server);
            tokio::spawn(cairn::gateway::serve_http(
                router,
                metrics_listeners,
                tls,
                std::future::pending(),
            ))
        });
        let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let peers = tokio::spawn(cairn::grpc::serve_peers(
            server.clone(),
            peer_listeners,
            peer_tls,
            async {
                let _ = peer_stop_rx.await;
            },
        ));
        // A member whose raft or apply task failed (full disk, failed fdatasync, lost log)
        // does not exit: it stays up refusing requests, with /health, /livez, /readyz and
        // cairn_server_fatal_error saying why, until a signal ends it (raft::Fatal's doc).
        let watch_raft = {
            let server = server.clone();
            tokio::spawn(async move {
                server.raft().stopped().await;
                server
                    .raft()
                    .fatal()
                    .set(cairn::raft::Cause::Other, "the raft task stopped unexpectedly".into());
            })
        };
        let mut removed = server.removed();
        // `Ok` only: a closed channel (its owner gone with a failed raft task) is no removal.
        tokio::select! {
            () = shutdown_signal() => {}
            Ok(_) = removed.wait_for(|r| *r) => {}
            Ok(_) = told_removed.wait_for(|r| *r) => {}
        }
        watch_raft.abort();
        let failure = server.failure();
        if let Some(task) = corrupt_check {
            task.abort();
        }
        let _ = peer_stop_tx.send(());
        peers.abort();
        tracing::info!("shutting down");
        let _ = stop_tx.send(());
        if let Some(task) = metrics_serving {
            // Scrapes hold no state worth draining.
            task.abort();
        }
        // Clients that keep connections open must not hold the process hostage.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), serving).await;
        if let Some(f) = failure {
            // A failed member that is told to stop exits non-zero, so a supervisor sees it,
            // and without running destructors: nothing may flush to the failed disk again
            // (fsyncgate, raft::Fatal), and sled's Drop unwraps a final fsync.
            eprintln!("cairn: member failed ({}): {}", f.cause.as_str(), f.message);
            std::process::exit(1);
        }
        server.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Where log lines go: etcd's `--log-outputs` (default/stderr, stdout, or file paths).
#[derive(Clone)]
struct Outputs(Arc<Mutex<Vec<Box<dyn Write + Send>>>>);

impl Write for Outputs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut outs) = self.0.lock() {
            for o in outs.iter_mut() {
                o.write_all(buf)?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Ok(mut outs) = self.0.lock() {
            for o in outs.iter_mut() {
                o.flush()?;
            }
        }
        Ok(())
    }
}

fn init_logging(level: &str, outputs: &str) -> anyhow::Result<()> {
    let mut sinks: Vec<Box<dyn Write + Send>> = Vec::new();
    for out in outputs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match out {
            "default" | "stderr" => sinks.push(Box::new(std::io::stderr())),
            "stdout" => sinks.push(Box::new(std::io::stdout())),
            path => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--log-outputs: cannot open {path}"))?;
                sinks.push(Box::new(f));
            }
        }
    }
    let outputs = Outputs(Arc::new(Mutex::new(sinks)));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || outputs.clone())
        .init();
    Ok(())
}
