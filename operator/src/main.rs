//! The `cairn-operator` binary: logging, the `/metrics`, `/healthz` and `/readyz` server,
//! leader election, the Cluster controller, and graceful shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use cairn_operator::controller::{self, Context, Settings};
use cairn_operator::election::{self, Elector};
use cairn_operator::metrics::Metrics;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;

/// How long a requested shutdown may take before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Runs Cairn clusters on Kubernetes (the cairn.dev/v1alpha1 Cluster resource).
#[derive(Debug, Parser)]
#[command(name = "cairn-operator", version)]
struct Args {
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "CAIRN_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Image repository used for `spec.version`.
    #[arg(long, default_value = cairn_operator::crd::DEFAULT_IMAGE_REPOSITORY)]
    default_repository: String,
    /// Seconds a started member may not answer before it is replaced.
    #[arg(long, default_value_t = 300)]
    failure_window_seconds: u64,
    /// Raft entries a learner may trail the leader by and still be promoted.
    #[arg(long, default_value_t = 1000)]
    promote_lag: u64,
    /// Seconds one membership step may take before Progressing=False/DeadlineExceeded.
    #[arg(long, default_value_t = 300)]
    step_deadline_seconds: u64,
    /// Campaign for a Lease before reconciling (needed when more than one replica runs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "cairn-operator")]
    lease_name: String,
    /// This replica's identity in the Lease and in Events (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format: `json` (one object per line) or `text`.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    /// Server-side apply the Cluster and Backup CRDs at start (keeps them current on upgrade;
    /// needs get and patch on those two CRDs).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    apply_crds: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `cairn_operator=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("bad --log-level {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(false).init();
    }
    Ok(())
}

#[derive(Clone)]
struct Http {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

fn router(state: Http) -> Router {
    Router::new()
        .route("/metrics", get(|State(s): State<Http>| async move { s.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Http>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not connected to the API server yet")
                }
            }),
        )
        .with_state(state)
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn identity(args: &Args) -> String {
    args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "cairn-operator".to_owned());
        format!("{host}-{}", std::process::id())
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args)?;
    let identity = identity(&args);
    let metrics = Metrics::new().context("metrics registry")?;
    let ready = Arc::new(AtomicBool::new(false));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested");
        stop_tx.send_replace(true);
        // In-flight passes get a bounded time to finish (each step is one etcd call with a
        // deadline); an API server that stopped answering must not keep the process alive.
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::error!(grace = ?SHUTDOWN_GRACE, "shutdown did not finish in time; exiting");
        std::process::exit(1);
    });

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
    let mut http_stop = stop_rx.clone();
    let app = router(Http { metrics: metrics.clone(), ready: ready.clone() });
    let http = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(stop).await
    });

    let client = Client::try_default()
        .await
        .context("building the Kubernetes client (KUBECONFIG or in-cluster)")?;
    client.apiserver_version().await.context("reaching the Kubernetes API server")?;
    if args.apply_crds {
        // A failure is reported, not fatal: the CRDs may be current already, and the wait
        // below tells the user what is missing.
        if let Err(e) = cairn_operator::apply_crds(&client).await {
            tracing::error!(error = %e, "applying the CRDs failed (--apply-crds)");
        }
    }
    // A missing CRD is the user's to fix: report it and wait, never exit into a crash loop.
    let clusters = Api::<cairn_operator::crd::Cluster>::all(client.clone());
    let mut stop = stop_rx.clone();
    while let Err(e) = clusters.list(&kube::api::ListParams::default().limit(1)).await {
        tracing::error!(error = %e, "the Cluster CRD is not queryable; install it with `kubectl apply -f crds/cluster.yaml` (retrying in 10s)");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
    ready.store(true, Ordering::Relaxed);
    let settings = Settings {
        default_repository: args.default_repository.clone(),
        failure_window: Duration::from_secs(args.failure_window_seconds),
        promote_lag: args.promote_lag,
        step_deadline: Duration::from_secs(args.step_deadline_seconds),
    };
    let ctx = Arc::new(Context::new(client.clone(), metrics, settings, identity.clone()));

    if args.leader_election {
        let elector = Elector::new(
            Api::<Lease>::namespaced(client, &args.lease_namespace),
            election::Config {
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(15),
                renew: Duration::from_secs(5),
            },
        );
        let (lead_tx, mut lead_rx) = watch::channel(false);
        let campaign = tokio::spawn(elector.run(lead_tx, stop_rx.clone()));
        tracing::info!(%identity, lease = %args.lease_name, "campaigning for leadership");
        let mut stop = stop_rx.clone();
        loop {
            tokio::select! {
                r = lead_rx.wait_for(|l| *l) => if r.is_err() { break },
                _ = stop.wait_for(|s| *s) => break,
            }
            let mut lost = lead_rx.clone();
            let mut stopping = stop_rx.clone();
            let shutdown = async move {
                tokio::select! {
                    _ = lost.wait_for(|l| !*l) => {}
                    _ = stopping.wait_for(|s| *s) => {}
                }
            };
            controller::run(ctx.clone(), shutdown).await?;
            if *stop_rx.borrow() {
                break;
            }
            tracing::warn!("leadership lost; controller stopped, campaigning again");
        }
        let _ = campaign.await;
    } else {
        let mut stop = stop_rx.clone();
        controller::run(ctx, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    }
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}
