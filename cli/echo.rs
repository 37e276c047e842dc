//! `switchboard echo`: one process running several echo servers, each
//! registered with the registry and drained on SIGTERM or SIGINT. For
//! failure drills it can inject errors and latency into every call, and
//! SIGUSR1 flips its health between SERVING and NOT_SERVING.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::flags::{self, ServerTlsFlags};
use clap::Parser;
use switchboard::echo::{self, EchoMetrics, EchoServerHandle, Faults, ServerConfig};
use switchboard::process;
use switchboard::registry::auth::Token;
use switchboard::registry::{self, validate};

/// switchboard echo: grpc.examples.echo.Echo backends that register
/// themselves, stay registered, and drain gracefully.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Ports to serve on 127.0.0.1, one server each [default: 50051 50052].
    #[arg(value_name = "PORT", conflicts_with = "listen")]
    ports: Vec<u16>,
    /// A port to serve on 127.0.0.1 (repeatable); same as a positional PORT.
    #[arg(long = "port", value_name = "PORT", conflicts_with = "listen")]
    port_flags: Vec<u16>,
    /// An IP:PORT to listen on (repeatable), one server each, instead of ports.
    #[arg(long, value_name = "IP:PORT")]
    listen: Vec<String>,
    /// The HOST:PORT to register for each server, in order, when clients
    /// reach it at another address than it listens on.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// The registry's HOST:PORT, or several replicas' as HOST:PORT,HOST:PORT
    /// (a broken stream moves to the next one, keeping the lease).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]", default_value = echo::DEFAULT_REGISTRY)]
    registry: String,
    /// The service to register under.
    #[arg(long, default_value = registry::DEFAULT_SERVICE)]
    service: String,
    /// A KEY=VALUE label registered with every server (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// The zone every server registers in (the `zone` label): zone-aware
    /// clients in that zone prefer them.
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// Lease TTL in milliseconds (1000-300000; 0 for the registry's default).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    ttl_ms: u64,
    /// On shutdown, how long to keep accepting RPCs after leaving the
    /// registry, so clients have moved away before GOAWAY.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    drain_grace_ms: u64,
    /// On shutdown, how long in-flight RPCs get to finish before their
    /// connections are cut.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    shutdown_timeout_ms: u64,
    /// File whose first line is the registry's write token, when it
    /// demands one (never pass secrets on the command line).
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: ServerTlsFlags,
    /// PEM CA certificate to verify the registry's TLS certificate with;
    /// connects to the registry over TLS. Without it, plaintext.
    #[arg(long, value_name = "PATH")]
    registry_ca: Option<PathBuf>,
    /// PEM client certificate to present to a registry that demands mutual
    /// TLS; needs --registry-key and --registry-ca.
    #[arg(long, value_name = "PATH")]
    registry_cert: Option<PathBuf>,
    /// PEM private key of --registry-cert.
    #[arg(long, value_name = "PATH")]
    registry_key: Option<PathBuf>,
    /// Fault injection: the fraction of Echo calls (0 to 1) answered with
    /// --fail-code instead of a reply.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    fail_rate: f64,
    /// Fault injection: the status of injected failures, by gRPC name
    /// (UNAVAILABLE, INTERNAL, ...) or number.
    #[arg(long, value_name = "CODE", default_value = "UNAVAILABLE", value_parser = Faults::parse_code)]
    fail_code: tonic::Code,
    /// Fault injection: latency added to every Echo call (e.g. 50ms).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = process::parse_duration)]
    delay: Duration,
    /// Fault injection: turn grpc.health.v1 NOT_SERVING this long after
    /// start (e.g. 10s), while still serving RPCs. SIGUSR1 flips health
    /// between SERVING and NOT_SERVING at any time.
    #[arg(long, value_name = "DURATION", value_parser = process::parse_duration)]
    not_serving_after: Option<Duration>,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = process::LogFormat::Text)]
    log_format: process::LogFormat,
    /// Serve /metrics (RPCs by method and code, registration state) and
    /// /healthz on this HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

/// The servers to start, checked before anything starts.
#[derive(Debug)]
struct Plan {
    /// One listener per server.
    listen: Vec<SocketAddr>,
    /// The matching servers' settings.
    configs: Vec<ServerConfig>,
    /// What the servers count into, with --metrics-listen.
    metrics: Option<EchoMetrics>,
}

/// Turns the flags into a [`Plan`], or a one-line reason why not.
fn plan(args: &Args) -> Result<Plan, String> {
    let listen: Vec<SocketAddr> = if args.listen.is_empty() {
        let mut ports: Vec<u16> = args.ports.iter().chain(&args.port_flags).copied().collect();
        if ports.is_empty() {
            ports = echo::DEFAULT_PORTS.to_vec();
        }
        ports
            .into_iter()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect()
    } else {
        args.listen
            .iter()
            .map(|listen| {
                listen.parse().map_err(|_| {
                    format!("invalid --listen {listen:?}: expected IP:PORT, e.g. 127.0.0.1:50051")
                })
            })
            .collect::<Result<_, _>>()?
    };
    let mut seen = HashSet::new();
    if let Some(twice) = listen
        .iter()
        .find(|addr| addr.port() != 0 && !seen.insert(**addr))
    {
        return Err(format!("{twice} is given twice: one server per address"));
    }

    if !args.advertise.is_empty() && args.advertise.len() != listen.len() {
        return Err(format!(
            "{} --advertise for {} servers: give one per server, in order, or none",
            args.advertise.len(),
            listen.len()
        ));
    }
    for advertise in &args.advertise {
        validate::address(advertise).map_err(|e| format!("--advertise: {e}"))?;
    }
    let mut seen = HashSet::new();
    if let Some(twice) = args.advertise.iter().find(|a| !seen.insert(*a)) {
        return Err(format!(
            "--advertise {twice} is given twice: each server needs its own address"
        ));
    }
    validate::registry_addresses(&args.registry).map_err(|e| format!("--registry: {e}"))?;
    validate::service_name(&args.service).map_err(|e| format!("--service: {e}"))?;
    let mut metadata = parse_meta(&args.meta)?;
    if let Some(zone) = &args.zone {
        let key = switchboard::client::zone_aware::ZONE_KEY;
        if metadata.get(key).is_some_and(|z| z != zone) {
            return Err(format!(
                "--zone {zone} and --meta {key}={} disagree: give one",
                metadata[key]
            ));
        }
        metadata.insert(key.to_owned(), zone.clone());
    }
    validate::metadata(&metadata).map_err(|e| format!("--meta/--zone: {e}"))?;
    let ttl = validate::ttl(args.ttl_ms).map_err(|e| format!("--ttl-ms: {e}"))?;
    let faults = Faults {
        fail_rate: args.fail_rate,
        fail_code: args.fail_code,
        delay: args.delay,
    };
    faults.validate()?;
    let registry_token = args
        .token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    let tls = args.tls.load()?;
    let registry_tls = flags::client_tls(
        ["--registry-ca", "--registry-cert", "--registry-key"],
        args.registry_ca.as_deref(),
        args.registry_cert.as_deref(),
        args.registry_key.as_deref(),
    )?;

    let metrics = args.metrics_listen.map(|_| EchoMetrics::default());
    let mut configs = Vec::with_capacity(listen.len());
    for (index, addr) in listen.iter().enumerate() {
        let advertise = args.advertise.get(index).cloned();
        if advertise.is_none() && addr.ip().is_unspecified() {
            return Err(format!(
                "--listen {addr} is a wildcard address clients cannot connect to: add --advertise <reachable-host>:{}",
                addr.port()
            ));
        }
        let config = ServerConfig {
            advertise,
            registry: Some(args.registry.clone()),
            service: args.service.clone(),
            metadata: metadata.clone(),
            ttl,
            drain_grace: Duration::from_millis(args.drain_grace_ms),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            registry_backoff: echo::registry_backoff(),
            registry_token: registry_token.clone(),
            tls: tls.clone(),
            registry_tls: registry_tls.clone(),
            faults,
            metrics: metrics.clone(),
        };
        config.validate().map_err(|e| e.to_string())?;
        configs.push(config);
    }
    Ok(Plan {
        listen,
        configs,
        metrics,
    })
}

/// Parses `--meta KEY=VALUE` flags; a key given twice is a mistake.
fn parse_meta(flags: &[String]) -> Result<HashMap<String, String>, String> {
    let mut metadata = HashMap::new();
    for flag in flags {
        let (key, value) = flag
            .split_once('=')
            .ok_or_else(|| format!("invalid --meta {flag:?}: expected KEY=VALUE, e.g. zone=a"))?;
        if key.is_empty() {
            return Err(format!(
                "invalid --meta {flag:?}: the key is empty; expected KEY=VALUE"
            ));
        }
        if metadata.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("--meta key {key:?} is given twice"));
        }
    }
    Ok(metadata)
}

/// Runs this subcommand until it is told to stop.
pub async fn run(args: Args) {
    let plan = plan(&args).unwrap_or_else(|error| process::exit_with(&error));
    process::init_logging(args.log_format);
    // Before any server announces itself, so a drill's first SIGUSR1 cannot
    // meet the default action (terminate).
    let flip = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .unwrap_or_else(|e| process::exit_with(&format!("cannot handle SIGUSR1: {e}")));

    // Every listener first: a busy port must stop the process before any
    // server has registered.
    let mut listeners = Vec::with_capacity(plan.listen.len());
    for addr in &plan.listen {
        match echo::bind(*addr).await {
            Ok(listener) => listeners.push(listener),
            Err(error) => process::exit_with(&error.to_string()),
        }
    }
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(process::bind_metrics(addr).await),
        None => None,
    };
    let mut servers = Vec::with_capacity(listeners.len());
    for (listener, config) in listeners.into_iter().zip(plan.configs) {
        match EchoServerHandle::start(listener, config).await {
            Ok(server) => {
                println!("echo serving on {}", server.address());
                servers.push(server);
            }
            Err(error) => process::exit_with(&error.to_string()),
        }
    }

    let metrics_server = metrics_listener
        .zip(plan.metrics)
        .map(|(listener, metrics)| serve_metrics(listener, metrics, &servers, &args.service));
    serve_until_shutdown(&servers, flip, args.not_serving_after).await;
    tracing::info!(servers = servers.len(), "shutdown signal; draining");
    let drains =
        futures_util::future::join_all(servers.into_iter().map(EchoServerHandle::shutdown));
    tokio::select! {
        reports = drains => {
            let cut = reports.iter().filter(|r| !r.in_flight_finished).count();
            if cut > 0 {
                tracing::warn!(servers = cut, "some RPCs were cut at the shutdown timeout");
            }
        }
        _ = process::shutdown_signal() => {
            process::exit_with("second shutdown signal: stopped without finishing the drain")
        }
    }
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    tracing::info!("echo stopped");
}

/// Serves `metrics` on `listener`; each scrape first reads where every
/// server's lease stands.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: EchoMetrics,
    servers: &[EchoServerHandle],
    service: &str,
) -> tokio::task::JoinHandle<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let leases: Vec<_> = servers
        .iter()
        .map(|server| (server.address().to_owned(), server.lease_state()))
        .collect();
    let service = service.to_owned();
    let render = move || {
        for (address, lease) in &leases {
            metrics.set_lease(&service, address, &lease.borrow());
        }
        switchboard::metrics::render(&registry)
    };
    switchboard::metrics::http::spawn_metrics(listener, render)
}

/// Waits for SIGINT or SIGTERM, meanwhile switching health as asked: NOT_SERVING
/// once `not_serving_after` has passed, and flipped on every SIGUSR1.
async fn serve_until_shutdown(
    servers: &[EchoServerHandle],
    mut flip: tokio::signal::unix::Signal,
    not_serving_after: Option<Duration>,
) {
    let timed = async {
        match not_serving_after {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed);
    let mut timed_done = false;
    let shutdown = process::shutdown_signal();
    tokio::pin!(shutdown);
    let mut serving = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = flip.recv() => serving = !serving,
            _ = &mut timed, if !timed_done => {
                timed_done = true;
                serving = false;
            }
        }
        for server in servers {
            server.set_serving(serving).await;
        }
        let status = if serving { "SERVING" } else { "NOT_SERVING" };
        tracing::info!(servers = servers.len(), "health {status}");
        println!("echo health {status}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("echo").chain(argv.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_are_the_classic_two_servers() {
        let plan = plan(&args(&[])).unwrap();
        assert_eq!(
            plan.listen,
            vec![
                "127.0.0.1:50051".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:50052".parse().unwrap()
            ]
        );
        for config in &plan.configs {
            assert_eq!(config.registry.as_deref(), Some("127.0.0.1:50050"));
            assert_eq!(config.service, "lb.example.grpc.io");
            assert_eq!(config.advertise, None);
            assert_eq!(config.ttl, Duration::from_secs(5));
        }
    }

    #[test]
    fn ports_listen_advertise_and_meta() {
        let plan = plan(&args(&["1", "--port", "2"])).unwrap();
        assert_eq!(plan.listen.len(), 2);
        assert_eq!(plan.listen[1].port(), 2);
        let plan = plan_of(&[
            "--listen",
            "0.0.0.0:7",
            "--advertise",
            "backend:7",
            "--meta",
            "zone=a",
            "--meta",
            "v=",
        ]);
        assert_eq!(plan.configs[0].advertise.as_deref(), Some("backend:7"));
        assert_eq!(plan.configs[0].metadata["zone"], "a");
        assert_eq!(plan.configs[0].metadata["v"], "");
    }

    fn plan_of(argv: &[&str]) -> Plan {
        plan(&args(argv)).unwrap()
    }

    #[test]
    fn bad_flags_are_refused_in_one_line() {
        for argv in [
            &["--listen", "nonsense"][..],
            &["--listen", "0.0.0.0:7"],
            &["1", "2", "--advertise", "h:1"],
            &["--advertise", "a b:1", "--port", "1"],
            &["--meta", "novalue"],
            &["--meta", "=v"],
            &["--meta", "k=1", "--meta", "k=2"],
            &["--ttl-ms", "10"],
            &["--service", "not a service"],
            &["--registry", "127.0.0.1"],
            &["5", "5"],
            &[
                "--tls-cert",
                "/nonexistent.crt",
                "--tls-key",
                "/nonexistent.key",
            ],
            &["--tls-key", "/nonexistent.key"],
            &["--tls-client-ca", "/nonexistent.crt"],
            &["--registry-cert", "/c.crt", "--registry-key", "/c.key"],
            &["--registry-ca", "/nonexistent.crt"],
            &["--fail-rate", "1.5"],
            &["--fail-rate", "-0.5"],
        ] {
            let err = plan(&args(argv)).unwrap_err();
            assert!(!err.contains('\n'), "{argv:?}: {err}");
        }
    }

    #[test]
    fn clap_errors_shrink_to_one_line() {
        let err = Args::try_parse_from(["echo", "--ttl-ms", "abc"]).unwrap_err();
        let line = process::flag_error(&err, "echo");
        assert!(!line.contains('\n') && line.contains("--ttl-ms"), "{line}");
        assert!(Args::try_parse_from(["echo", "1", "--listen", "127.0.0.1:2"]).is_err());
        for argv in [
            &["echo", "--fail-code", "OK"][..],
            &["echo", "--fail-code", "SOMETIMES"],
            &["echo", "--delay", "fast"],
            &["echo", "--fail-rate", "half"],
            &["echo", "--not-serving-after", "soon"],
        ] {
            let err = Args::try_parse_from(argv).unwrap_err();
            let line = process::flag_error(&err, "echo");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn fault_flags_reach_every_server() {
        let plan = plan_of(&[
            "1",
            "2",
            "--fail-rate",
            "0.5",
            "--fail-code",
            "internal",
            "--delay",
            "50ms",
        ]);
        for config in &plan.configs {
            assert_eq!(config.faults.fail_rate, 0.5);
            assert_eq!(config.faults.fail_code, tonic::Code::Internal);
            assert_eq!(config.faults.delay, Duration::from_millis(50));
        }
    }
}
