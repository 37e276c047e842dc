//! `switchboard registry`: runs the switchboard control plane.

use crate::flags::ServerTlsFlags;
use clap::Parser;
use switchboard::process;
use switchboard::registry::auth::{AccessTokens, Token};
use switchboard::registry::{self, RegistryConfig};

/// switchboard registry: leased endpoint registrations and live watches.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = registry::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// Most endpoints a single service may hold.
    #[arg(long, default_value_t = RegistryConfig::default().max_endpoints_per_service)]
    max_endpoints_per_service: usize,
    /// How many changes a watcher may lag before it gets a fresh snapshot.
    #[arg(long, default_value_t = RegistryConfig::default().watch_buffer)]
    watch_buffer: usize,
    /// Milliseconds a fresh registry holds back the first snapshot of each
    /// Watch, so backends re-register before clients are told the set.
    #[arg(long, default_value_t = registry::server::DEFAULT_WARMUP.as_millis() as u64)]
    warmup_ms: u64,
    /// Most services with endpoints at once.
    #[arg(long, default_value_t = RegistryConfig::default().max_services)]
    max_services: usize,
    /// Most Watch streams open at once, in all.
    #[arg(long, default_value_t = RegistryConfig::default().max_watch_streams)]
    max_watch_streams: usize,
    /// Most Watch streams open at once on one client connection.
    #[arg(long, default_value_t = RegistryConfig::default().max_watch_streams_per_connection)]
    max_watch_streams_per_connection: usize,
    /// Most Register calls per second on one client connection; 0 turns
    /// the cap off.
    #[arg(long, default_value_t = registry::server::DEFAULT_REGISTRATIONS_PER_SECOND)]
    max_registrations_per_second: u32,
    /// Largest request message, in bytes.
    #[arg(long, default_value_t = RegistryConfig::default().max_message_bytes)]
    max_message_bytes: usize,
    /// File whose first line is the token writers (Register, KeepAlive,
    /// Drain, Deregister, their by-address forms, and setting or deleting
    /// service configs) must present; without it anyone may write.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// File whose first line is the token readers (Watch, Resolve,
    /// ListServices, ListEndpoints) must present; without it anyone may read.
    #[arg(long, value_name = "PATH")]
    read_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: ServerTlsFlags,
    /// Serve the status page, /metrics and /healthz on this HOST:PORT
    /// (port 0 picks a free port); off by default.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Keep service configs as `<service>.json` files in DIR: read at
    /// start and on every change, written by `switchboard config set`.
    #[arg(long, value_name = "DIR")]
    service_config_dir: Option<std::path::PathBuf>,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = process::LogFormat::Text)]
    log_format: process::LogFormat,
    /// Where the state lives: `memory` (this process, the default) or
    /// `etcd` (shared by every replica on the same etcd; needs a build with
    /// `--features etcd`).
    #[arg(long, default_value = "memory", value_parser = ["memory", "etcd"])]
    store: String,
    /// etcd client URLs, comma-separated, for `--store etcd`.
    #[arg(
        long,
        value_name = "URL[,URL]",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: String,
    /// Key prefix of this registry's state in etcd.
    #[arg(long, default_value = "/switchboard/")]
    etcd_prefix: String,
}

/// Runs this subcommand until it is told to stop.
pub async fn run(args: Args) {
    process::init_logging(args.log_format);
    let load = |path: &Option<std::path::PathBuf>| {
        path.as_deref()
            .map(Token::from_file)
            .transpose()
            .unwrap_or_else(|e| process::exit_with(&e))
    };
    let tokens = AccessTokens {
        write: load(&args.token_file),
        read: load(&args.read_token_file),
    };
    let tls = args.tls.load().unwrap_or_else(|e| process::exit_with(&e));
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => process::exit_with(&format!(
            "cannot listen on {}: {err}; pick another --listen address",
            args.listen
        )),
    };
    let local = listener.local_addr().map_or(args.listen, |a| a);
    println!("registry listening on {local}");
    let config = RegistryConfig {
        max_endpoints_per_service: args.max_endpoints_per_service,
        watch_buffer: args.watch_buffer,
        warmup: std::time::Duration::from_millis(args.warmup_ms),
        tokens,
        tls,
        max_services: args.max_services,
        max_watch_streams: args.max_watch_streams,
        max_watch_streams_per_connection: args.max_watch_streams_per_connection,
        max_registrations_per_second: std::num::NonZeroU32::new(args.max_registrations_per_second),
        max_message_bytes: args.max_message_bytes,
        metrics: registry::RegistryMetrics::default(),
        fleet: Default::default(),
    };
    let service = match args.store.as_str() {
        "etcd" => etcd_registry(&args, &config).await,
        _ => registry::Registry::new(&config),
    };
    let _config_dir = args.service_config_dir.as_ref().map(|dir| {
        let dir = registry::config_dir::ConfigDir::open(dir).unwrap_or_else(|e| {
            process::exit_with(&format!(
                "invalid --service-config-dir {}: {e}",
                dir.display()
            ))
        });
        service.follow_config_dir(std::sync::Arc::new(dir))
    });
    let status = match args.metrics_listen {
        Some(addr) => {
            let listener = process::bind_metrics(addr).await;
            Some(tokio::spawn(registry::status::serve(
                listener,
                service.store().clone(),
                config.metrics.clone(),
                service.fleet().clone(),
                std::future::pending(),
            )))
        }
        None => None,
    };
    let served =
        registry::serve_registry(listener, service, config, process::shutdown_signal()).await;
    if let Some(status) = status {
        status.abort();
    }
    if let Err(err) = served {
        process::exit_with(&format!("registry failed: {err}"));
    }
    tracing::info!("registry stopped");
}

/// A registry on the etcd store, or a one-line error and exit.
#[cfg(feature = "etcd")]
async fn etcd_registry(args: &Args, config: &RegistryConfig) -> registry::Registry {
    let endpoints: Vec<String> = args
        .etcd_endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    match registry::etcd::EtcdStore::connect(&endpoints, &args.etcd_prefix, config).await {
        Ok(store) => registry::Registry::with_store(std::sync::Arc::new(store), config),
        Err(err) => process::exit_with(&format!(
            "{err} (--etcd-endpoints {}); start etcd or point at it",
            args.etcd_endpoints
        )),
    }
}

/// Without the feature, `--store etcd` is a one-line error.
#[cfg(not(feature = "etcd"))]
async fn etcd_registry(_args: &Args, _config: &RegistryConfig) -> registry::Registry {
    process::exit_with(
        "--store etcd needs a registry built with `cargo build --release --features etcd` (and protoc installed)",
    )
}
