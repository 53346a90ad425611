//! `prefixd`: the KV-cache sidecar. See `prefixd --help`.
//!
//! Start-up: configuration (defaults < file < environment < flags) → UCX context and worker on
//! the chosen transports → host pool, registered once → listeners (a bad address fails here,
//! clearly) → gRPC service + health, operations port, data-plane receiver, reaper.
//!
//! Shutdown: SIGTERM drains — readiness goes to 503 and health to NOT_SERVING, new work
//! (Connect, BeginPut, leasing Lookup) is refused while calls that finish work (CommitPut,
//! AbortPut, Fetch, Release) still go through; once no reservation or lease is left (or
//! `--drain-timeout` passes) the gRPC server stops accepting, finishes in-flight calls, and the
//! process exits 0. SIGINT exits at once (130).

mod auth;
mod bounce;
mod config;
mod dataplane;
mod errors;
mod gpu;
mod http;
mod metrics;
mod netdev;
mod pools;
mod service;
mod sessions;
mod shutdown;
mod state;
mod units;

use anyhow::Context as _;
use clap::Parser;
use config::{Cli, Config};
use prefixd_proto::v1::prefixd_server::PrefixdServer;
use shutdown::CancelToken;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list_metrics {
        print!("{}", metrics::markdown_table());
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::resolve(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("prefixd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter: tracing_subscriber::filter::Targets = match cfg.log.parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("prefixd: --log {:?}: {e}", cfg.log);
            return ExitCode::from(2);
        }
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();

    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("prefixd").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("prefixd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("prefixd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The rustls configuration of the metrics port, from the same PEM files as gRPC's.
fn metrics_tls(t: &config::TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(&t.cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", t.cert.display()))?;
    let key = rustls_pemfile::private_key(&mut read(&t.key)?.as_slice())
        .with_context(|| format!("{}: not a PEM private key", t.key.display()))?
        .with_context(|| format!("{}: no private key in it", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not go together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    // Handlers first: a signal that arrives once we say we are ready must not hit the default.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Clients connect their data endpoints to prefixd's UCX listener, which needs tcp for the
    // wire-up; data still takes the fastest lane both sides share.
    let list = ucx_bindings::TransportList::parse(&cfg.transports)?;
    let transports = match list.with_tcp() {
        Some(with) => {
            tracing::info!(asked = %cfg.transports, using = %with.to_ucx(), "tcp added: the data listener's wire-up needs it");
            with.to_ucx()
        }
        None => cfg.transports.clone(),
    };
    let mut b = ucx_bindings::ContextBuilder::new().transports(&transports)?.name("prefixd");
    // UCX's network devices: as configured, else the device of the address prefixd listens on
    // (loopback: lo), so the data path is reachable from no more places than the control path.
    let net_devices = cfg.net_devices.clone().or_else(|| netdev::devices_for(cfg.data_listen_addr().ip()));
    if let Some(d) = &net_devices {
        b = b.net_devices(d);
    }
    let ctx = b.build().context("cannot start UCX")?;
    // CUDA: required for --gpu-pool; otherwise used, where present, only to page-lock the host pool.
    let cuda = match cfg.gpu_pool {
        Some(size) => Some(Arc::new(gpu::Cuda::open(cfg.gpu).map_err(|e| {
            anyhow::anyhow!("--gpu-pool {size} on GPU {}: {e} (run without --gpu-pool for the host tier only)", cfg.gpu)
        })?)),
        None if gpu::driver_present() => gpu::Cuda::open(cfg.gpu).ok().map(Arc::new),
        None => None,
    };
    let worker = {
        // UCX's cuda transports work in the context current on the progress thread.
        let cuda = cuda.clone();
        ucx_bindings::Worker::with_thread_init(&ctx, "prefixd", move || {
            if let Some(c) = cuda {
                if let Err(e) = c.make_current() {
                    tracing::warn!(error = %e, "no CUDA context on the UCX progress thread");
                }
            }
        })
        .context("cannot start the UCX worker")?
    };
    let auth = match &cfg.auth_file {
        Some(p) => auth::Auth::load(p).map_err(anyhow::Error::msg)?,
        None => auth::Auth::default(),
    };
    if !auth.enabled() && !cfg.allow_insecure_remote {
        for (flag, ip) in [("--listen", cfg.listen.ip()), ("--data-listen", cfg.data_listen_addr().ip())] {
            if !ip.is_loopback() {
                anyhow::bail!(
                    "{flag} {ip} reaches beyond this host and no --auth-file is given: anyone who reaches it could \
                     read and write every namespace. Give --auth-file (README: Security), or --allow-insecure-remote \
                     if that is meant"
                );
            }
        }
    }
    let metrics = metrics::Metrics::new()?;
    let state = state::State::new(cfg.clone(), ctx, worker, metrics, cuda, auth)?;

    let grpc =
        TcpListener::bind(cfg.listen).await.with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let ops = TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--metrics-listen)", cfg.metrics_listen))?;
    let data_listen = cfg.data_listen_addr();
    let data = state
        .worker
        .listen(data_listen)
        .await
        .with_context(|| format!("cannot listen for UCX data connections on {data_listen} (--data-listen)"))?;
    let data_addr = data.local_addr();
    let (grpc_addr, ops_addr) = (grpc.local_addr()?, ops.local_addr()?);
    let info = state.ctx.info();
    tracing::info!(
        grpc = %grpc_addr, metrics = %ops_addr, data = %data_addr, tls = cfg.tls.is_some(),
        auth = %if state.auth.enabled() { state.auth.names().join(",") } else { "off (loopback only)".into() }, net_devices = net_devices.as_deref().unwrap_or("all"), host_pool = %cfg.host_pool, ucx = %info.version,
        transports = %state.transports.join(","), "prefixd ready"
    );
    // One machine-readable line on stdout, for scripts and tests that bind port 0.
    println!("prefixd listening grpc={grpc_addr} metrics={ops_addr} data={data_addr}");

    let background = CancelToken::default();
    let ops_tls = cfg.tls.as_ref().map(metrics_tls).transpose()?;
    tokio::spawn(http::serve(ops, state.clone(), background.clone(), ops_tls));
    tokio::spawn(dataplane::serve_connections(state.clone(), data, background.clone()));
    {
        let (state, stop) = (state.clone(), background.clone());
        tokio::spawn(async move {
            if let Err(e) = dataplane::serve_hellos(state, stop).await {
                tracing::error!(error = %e, "data-plane hello receiver stopped");
            }
        });
    }
    {
        let (state, stop) = (state.clone(), background.clone());
        tokio::spawn(async move {
            if let Err(e) = dataplane::serve_puts(state, stop).await {
                tracing::error!(error = %e, "data-plane receiver stopped");
            }
        });
    }
    let inflight = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_concurrent_rpcs));
    let service = service::Service { state: state.clone(), data_addr, inflight };
    {
        let (svc, stop) = (service.clone(), background.clone());
        tokio::spawn(async move {
            if let Err(e) = dataplane::serve_fetch_asks(svc, stop).await {
                tracing::error!(error = %e, "data-plane fetch receiver stopped");
            }
        });
    }
    {
        let (state, stop) = (state.clone(), background.clone());
        let period = (cfg.lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let session_idle = cfg.session_idle();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => state.reap(session_idle),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PrefixdServer<service::Service>>().await;
    let svc = PrefixdServer::new(service)
        .max_decoding_message_size(prefixd_proto::limits::MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(prefixd_proto::limits::MAX_GRPC_MESSAGE_BYTES);
    let stop_accepting = CancelToken::default();
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &cfg.tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?));
        if let Some(ca) = &t.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(tls).context("TLS configuration (--tls-cert, --tls-key, --tls-client-ca)")?;
    }
    let server = {
        let stop = stop_accepting.clone();
        builder.add_service(health_service).add_service(svc).serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            async move { stop.cancelled().await },
        )
    };
    let mut server = tokio::spawn(server);

    tokio::select! {
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: draining");
            let deadline = Instant::now() + cfg.drain_timeout;
            state.start_draining();
            health.set_not_serving::<PrefixdServer<service::Service>>().await;
            drain_work(&state, deadline).await;
            stop_accepting.cancel();
            match tokio::time::timeout_at(deadline.into(), &mut server).await {
                Ok(_) => tracing::info!("drained; exiting"),
                Err(_) => tracing::warn!("drain timeout passed with calls in flight; exiting"),
            }
            background.cancel();
            Ok(ExitCode::SUCCESS)
        }
        _ = sigint.recv() => {
            tracing::info!("SIGINT: exiting now");
            Ok(ExitCode::from(130))
        }
        r = &mut server => {
            background.cancel();
            match r {
                Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                Ok(Err(e)) => Err(anyhow::anyhow!("gRPC server failed: {e}")),
                Err(e) => Err(anyhow::anyhow!("gRPC server task failed: {e}")),
            }
        }
    }
}

/// Waits until no reservation or lease is left (producers committed or aborted, consumers
/// released), or the deadline.
async fn drain_work(state: &Arc<state::State>, deadline: Instant) {
    loop {
        let (puts, leases) = {
            let idx = state.index();
            (idx.active_reservations(), idx.active_leases())
        };
        if puts + leases == 0 {
            return;
        }
        if Instant::now() >= deadline {
            let holders: Vec<String> = state
                .index()
                .lease_holders()
                .into_iter()
                .map(|(id, inflight)| {
                    let name = state.sessions.name_of(id).unwrap_or_else(|| "closed".to_owned());
                    format!("{id:016x} ({name}, {inflight} sends in flight)")
                })
                .collect();
            tracing::warn!(puts, leases, lease_holders = ?holders, "drain timeout with work still open");
            return;
        }
        tracing::debug!(puts, leases, "waiting for open work");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
