//! `switchboard client`: the classic load-balancing example, and a live mode
//! that shows traffic moving between backends as they come and go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::flags::ClientTlsFlags;
use clap::Parser;
use switchboard::client::{
    BackoffConfig, BalancedChannel, ClientMetrics, ConnectivityState, LeastRequestConfig,
    OutlierDetectionConfig, PolicyKind,
};
use switchboard::process;
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use switchboard::registry::auth::Token;
use switchboard::registry::DEFAULT_SERVICE;
use switchboard::service_config::{LbPolicyConfig, ServiceConfig};
use switchboard::tls::ClientTls;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

/// switchboard client: calls the echo service through a balanced channel.
///
/// Without --rate it runs the classic example: 10 UnaryEcho calls with
/// pick_first, then 10 with round_robin. With --rate it runs live, printing
/// the traffic per backend every second until --duration or Ctrl-C.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Where endpoints come from: registry://<host:port>/<service>,
    /// static:///<host:port>,<host:port> or dns:///<host:port>. Defaults to
    /// --registry/--service.
    #[arg(long)]
    target: Option<String>,
    /// The registry to watch when --target is not given.
    #[arg(long, default_value = "127.0.0.1:50050")]
    registry: String,
    /// The service to watch when --target is not given.
    #[arg(long, default_value = DEFAULT_SERVICE)]
    service: String,
    /// Balancing policy: pick_first, round_robin, least_request,
    /// weighted_round_robin or ring_hash (keyed by --hash-header). The
    /// classic run uses pick_first then round_robin unless this is given.
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Keyed traffic: every RPC carries this header with a key from
    /// --key-from, and --policy ring_hash hashes it (a service config's
    /// ring_hash_experimental names its own requestHashHeader).
    #[arg(long, value_name = "NAME")]
    hash_header: Option<String>,
    /// With --hash-header: the keys, `seq` (0, 1, 2... wrapping at --keys)
    /// or `random` (any of the --keys keys).
    #[arg(long, value_enum, default_value_t = KeyFrom::Seq)]
    key_from: KeyFrom,
    /// With --hash-header: how many distinct keys there are.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// With --policy least_request: weigh each backend's outstanding RPCs
    /// by a peak-EWMA of its latency (linkerd's balancer), so slow backends
    /// are avoided too, not only hung ones.
    #[arg(long)]
    peak_ewma: bool,
    /// Wrap the policy in outlier detection (gRFC A50, default settings):
    /// backends that fail most of their calls are ejected for 30 s and more.
    #[arg(long)]
    outlier_detection: bool,
    /// Live mode: RPCs per second.
    #[arg(long)]
    rate: Option<u32>,
    /// Live mode: stop after this long (e.g. 30s, 500ms); default: Ctrl-C.
    #[arg(long, value_parser = process::parse_duration)]
    duration: Option<Duration>,
    /// Classic mode: calls per policy.
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// The message to echo.
    #[arg(long, default_value = "this is examples/load_balancing")]
    message: String,
    /// Deadline of each RPC.
    #[arg(long, default_value = "1s", value_parser = process::parse_duration)]
    timeout: Duration,
    /// Client-side health checking: watch grpc.health.v1 on every backend
    /// and send no RPC to one that is not SERVING. The value is the service
    /// to ask about; without one, the server as a whole ("").
    #[arg(long, value_name = "SERVICE", num_args = 0..=1, default_missing_value = "")]
    health_check: Option<String>,
    /// How often a dns:/// target is resolved again (it is also resolved
    /// again when a connection fails).
    #[arg(long, value_name = "DURATION", value_parser = process::parse_duration)]
    dns_refresh: Option<Duration>,
    /// Exit with an error if no backend is reachable at startup, instead of
    /// waiting and retrying.
    #[arg(long)]
    fail_fast: bool,
    /// First reconnect delay to a failed backend (gRPC's default is 1s).
    #[arg(long, default_value = "1s", value_parser = process::parse_duration)]
    backoff_initial: Duration,
    /// Longest reconnect delay to a failed backend.
    #[arg(long, default_value = "120s", value_parser = process::parse_duration)]
    backoff_max: Duration,
    /// HTTP/2 keepalive: with RPCs in flight, ping a backend after this much
    /// silence (idle connections are never pinged).
    #[arg(long, default_value = "10s", value_parser = process::parse_duration)]
    keepalive_interval: Duration,
    /// HTTP/2 keepalive: drop a backend whose ping goes unanswered this long.
    #[arg(long, default_value = "5s", value_parser = process::parse_duration)]
    keepalive_timeout: Duration,
    /// File whose first line is the registry's read token, when it demands
    /// one.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: ClientTlsFlags,
    /// Log lines as text or as JSON objects.
    #[arg(long, value_enum, default_value_t = process::LogFormat::Text)]
    log_format: process::LogFormat,
    /// Serve the channel's metrics (connections, picks and RPCs per
    /// backend, ready backends, resolver updates) on /metrics, and
    /// /healthz, at this HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// A gRPC service config (JSON): per-method timeouts, wait-for-ready,
    /// retry or hedging policies, retry throttling, and the balancing
    /// policy when --policy names none. See docs/service-config.md.
    #[arg(long, value_name = "FILE")]
    service_config: Option<std::path::PathBuf>,
    /// The zone this client runs in: calls prefer backends registered in
    /// it (`echo --zone`) and spill to others as it loses capacity
    /// (round_robin, weighted_round_robin, least_request).
    #[arg(long, value_name = "ZONE")]
    zone: Option<String>,
    /// Ignore the service config the registry pushes for the service:
    /// keep --service-config (or the defaults) whatever the registry holds.
    #[arg(long)]
    disable_service_config_lookup: bool,
}

/// Where the keys of `--hash-header` come from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFrom {
    /// 0, 1, 2... wrapping at --keys, so every key recurs in turn.
    Seq,
    /// A random one of the --keys keys for each RPC.
    Random,
}

/// The key each RPC carries in `--hash-header`.
struct Keys {
    header: tonic::metadata::AsciiMetadataKey,
    from: KeyFrom,
    count: u64,
    next: AtomicU64,
}

impl Keys {
    /// From the flags; `None` without --hash-header. A bad name ends the
    /// process with a one-line error.
    fn from_args(args: &Args) -> Option<Self> {
        let name = args.hash_header.as_deref()?;
        if args.keys == 0 {
            process::exit_with("--keys must be at least 1");
        }
        let header =
            tonic::metadata::AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                .unwrap_or_else(|err| {
                    process::exit_with(&format!("--hash-header {name:?}: {err}"))
                });
        Some(Self {
            header,
            from: args.key_from,
            count: args.keys,
            next: AtomicU64::new(0),
        })
    }

    /// The next RPC's key.
    fn next(&self) -> u64 {
        match self.from {
            KeyFrom::Seq => self.next.fetch_add(1, Ordering::Relaxed) % self.count,
            KeyFrom::Random => rand::random_range(0..self.count),
        }
    }

    /// Puts the next key on `request`; returns it.
    fn stamp<T>(&self, request: &mut tonic::Request<T>) -> u64 {
        let key = self.next();
        request
            .metadata_mut()
            .insert(self.header.clone(), key.into());
        key
    }
}

/// Reads and checks `--service-config`; a bad file ends the process with a
/// one-line error naming the field.
fn load_service_config(path: &std::path::Path) -> ServiceConfig {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| {
        process::exit_with(&format!("--service-config {}: {err}", path.display()))
    });
    ServiceConfig::from_json(&text).unwrap_or_else(|err| {
        process::exit_with(&format!("--service-config {}: {err}", path.display()))
    })
}

/// Runs this subcommand until it is told to stop.
pub async fn run(args: Args) {
    process::init_logging(args.log_format);
    let target = args
        .target
        .clone()
        .unwrap_or_else(|| format!("registry://{}/{}", args.registry, args.service));
    // Fail on a bad target before anything runs.
    if let Err(err) = BalancedChannel::builder(&target) {
        process::exit_with(&err.to_string());
    }
    let tls = args
        .tls
        .load()
        .unwrap_or_else(|err| process::exit_with(&err));
    let policy = match (args.policy, args.peak_ewma) {
        (Some(PolicyKind::LeastRequest(_)), true) => {
            Some(PolicyKind::LeastRequest(LeastRequestConfig::peak_ewma()))
        }
        (_, true) => process::exit_with("--peak-ewma needs --policy least_request"),
        (policy, false) => policy,
    };
    // --policy ring_hash hashes the header the traffic carries.
    let policy = match (policy, &args.hash_header) {
        (Some(PolicyKind::RingHash(config)), Some(name)) => Some(PolicyKind::RingHash(
            config.with_hash_header(name).unwrap_or_else(|err| {
                process::exit_with(&format!("--hash-header {name:?}: {err}"))
            }),
        )),
        (policy, _) => policy,
    };

    if args.rate == Some(0) {
        process::exit_with("--rate must be at least 1");
    }
    let config = args.service_config.as_deref().map(load_service_config);
    // Served before any channel exists, so a client still waiting for a
    // backend or a registry shows why.
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = process::bind_metrics(addr).await;
            let metrics = ClientMetrics::new();
            let mut registry = prometheus_client::registry::Registry::default();
            metrics.register(&mut registry);
            switchboard::metrics::http::spawn_metrics(listener, move || {
                switchboard::metrics::render(&registry)
            });
            Some(metrics)
        }
        None => None,
    };
    let metrics = metrics.as_ref();
    match args.rate {
        Some(rate) => {
            // round_robin unless a flag or a service config says: as the
            // default config's policy, so the registry's config can
            // still name another.
            let config = match config {
                Some(config) if config.lb_policy().is_some() => config,
                config => config
                    .unwrap_or_default()
                    .with_load_balancing(vec![LbPolicyConfig {
                        name: "round_robin".into(),
                        config: serde_json::json!({}),
                    }])
                    .expect("round_robin is a valid policy"),
            };
            let config = Some(config);
            let channel = connect(
                &args,
                &target,
                policy,
                tls.as_ref(),
                metrics,
                config.as_ref(),
            )
            .await;
            live(&args, channel, rate).await;
        }
        None => {
            let policies = match policy {
                Some(policy) => vec![policy],
                None => vec![PolicyKind::PickFirst, PolicyKind::RoundRobin],
            };
            for policy in policies {
                println!("==== Calling grpc.examples.echo.Echo/UnaryEcho with {policy} ====");
                let channel = connect(
                    &args,
                    &target,
                    Some(policy),
                    tls.as_ref(),
                    metrics,
                    config.as_ref(),
                )
                .await;
                classic(&args, channel).await;
                println!();
            }
        }
    }
}

/// Builds the channel and waits until a backend is Ready, reporting why not
/// meanwhile (or exiting, with --fail-fast).
async fn connect(
    args: &Args,
    target: &str,
    policy: Option<PolicyKind>,
    tls: Option<&ClientTls>,
    metrics: Option<&ClientMetrics>,
    config: Option<&ServiceConfig>,
) -> BalancedChannel {
    let backoff = BackoffConfig {
        initial: args.backoff_initial,
        max: args.backoff_max,
        ..BackoffConfig::default()
    };
    let mut builder =
        BalancedChannel::builder(target).unwrap_or_else(|err| process::exit_with(&err.to_string()));
    if let Some(path) = &args.token_file {
        let token = Token::from_file(path).unwrap_or_else(|err| process::exit_with(&err));
        builder = builder.registry_token(token);
    }
    if let Some(tls) = tls {
        builder = builder.tls(tls.clone()).registry_tls(tls.clone());
    }
    if let Some(service) = &args.health_check {
        builder = builder.health_check(service.clone());
    }
    if let Some(refresh) = args.dns_refresh {
        builder = builder.dns_refresh(refresh);
    }
    if args.outlier_detection {
        builder = builder.outlier_detection(OutlierDetectionConfig::default());
    }
    if let Some(metrics) = metrics {
        builder = builder.with_metrics(metrics);
    }
    if let Some(config) = config {
        builder = builder.service_config(config.clone());
    }
    if let Some(policy) = policy {
        builder = builder.policy(policy);
    }
    if args.disable_service_config_lookup {
        builder = builder.disable_service_config_lookup();
    }
    if let Some(zone) = &args.zone {
        builder = builder.zone(zone.clone());
    }
    let channel = builder
        .backoff(backoff)
        .keepalive(args.keepalive_interval, args.keepalive_timeout)
        .build();
    let mut state = channel.watch_state();
    let mut reported = None;
    loop {
        let current = state.borrow_and_update().clone();
        match current.connectivity {
            ConnectivityState::Ready => return channel,
            // ring_hash connects only where RPCs land: waiting for Ready
            // before the first RPC would wait forever.
            ConnectivityState::Idle if current.policy == "ring_hash" => return channel,
            ConnectivityState::TransientFailure => {
                let why = current
                    .last_error
                    .map_or_else(|| "no backend is reachable".into(), |e| e.to_string());
                if args.fail_fast {
                    process::exit_with(&format!("{why} (target {target})"));
                }
                if reported.as_ref() != Some(&why) {
                    eprintln!(
                        "waiting for a backend: {why}; retrying (use --fail-fast to exit instead)"
                    );
                    reported = Some(why);
                }
            }
            _ => {}
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { process::exit_with("the balancer stopped") },
            _ = process::shutdown_signal() => std::process::exit(130),
        }
    }
}

/// The backend address at the end of an echo reply, `"... (from <addr>)"`.
fn backend_of(reply: &str) -> &str {
    reply
        .rsplit_once("(from ")
        .map_or("?", |(_, rest)| rest.trim_end_matches(')'))
}

async fn classic(args: &Args, channel: BalancedChannel) {
    let mut client = EchoClient::new(channel);
    let keys = Keys::from_args(args);
    for _ in 0..args.count {
        let mut request = tonic::Request::new(EchoRequest {
            message: args.message.clone(),
        });
        request.set_timeout(args.timeout);
        if let Some(keys) = &keys {
            let key = keys.stamp(&mut request);
            print!("key {key}: ");
        }
        match client.unary_echo(request).await {
            Ok(reply) => println!("{}", reply.into_inner().message),
            Err(status) => println!("error: {:?}: {}", status.code(), status.message()),
        }
    }
}

/// One RPC's outcome in live mode.
enum Outcome {
    /// Served by this backend; with --hash-header, for this key.
    Served(String, Option<u64>),
    Failed(String),
}

async fn live(args: &Args, channel: BalancedChannel, rate: u32) {
    let started = Instant::now();
    println!(
        "live: {rate} RPC/s with {}{} to {}; Ctrl-C to stop",
        match (args.policy, args.outlier_detection) {
            (Some(policy), _) => policy.name(),
            (None, false) => channel.policy(),
            // The channel names the wrapper; the wrapped one is the default.
            (None, true) => "round_robin",
        },
        if args.outlier_detection {
            " and outlier_detection"
        } else {
            ""
        },
        args.target
            .clone()
            .unwrap_or_else(|| format!("registry://{}/{}", args.registry, args.service))
    );
    let mut state = channel.watch_state();
    let (mut ready_now, mut policy_now) = {
        let now = state.borrow_and_update();
        (now.ready.clone(), now.policy)
    };
    let client = EchoClient::new(channel);
    let keys = Keys::from_args(args).map(std::sync::Arc::new);
    // With --hash-header: the backends each key reached, for the summary's
    // stickiness line.
    let mut reached: HashMap<u64, BTreeSet<String>> = HashMap::new();
    let (outcomes, mut results) = mpsc::unbounded_channel();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    println!(
        "t={:.3}s ready: {}",
        started.elapsed().as_secs_f64(),
        ready_now.join(", ")
    );
    let stop = async {
        match args.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let shutdown = process::shutdown_signal();
    tokio::pin!(shutdown);
    let mut second: BTreeMap<String, u64> = BTreeMap::new();
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed_second = 0u64;
    let mut failed_total = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut in_flight = 0u64;
    let mut record = |outcome: Outcome,
                      second: &mut BTreeMap<String, u64>,
                      failed_second: &mut u64| match outcome {
        Outcome::Served(backend, key) => {
            if let Some(key) = key {
                reached.entry(key).or_default().insert(backend.clone());
            }
            *second.entry(backend.clone()).or_default() += 1;
            *total.entry(backend).or_default() += 1;
        }
        Outcome::Failed(error) => {
            *failed_second += 1;
            failed_total += 1;
            *errors.entry(error).or_default() += 1;
        }
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let mut client = client.clone();
                let outcomes = outcomes.clone();
                let mut request = tonic::Request::new(EchoRequest { message: args.message.clone() });
                request.set_timeout(args.timeout);
                let key = keys.as_ref().map(|keys| keys.stamp(&mut request));
                in_flight += 1;
                tokio::spawn(async move {
                    let outcome = match client.unary_echo(request).await {
                        Ok(reply) => Outcome::Served(backend_of(&reply.into_inner().message).to_owned(), key),
                        Err(status) => Outcome::Failed(format!("{:?}: {}", status.code(), status.message())),
                    };
                    let _ = outcomes.send(outcome);
                });
            }
            Some(outcome) = results.recv() => {
                in_flight -= 1;
                record(outcome, &mut second, &mut failed_second);
            }
            _ = report.tick() => {
                let per_backend: Vec<String> = second.iter().map(|(b, n)| format!("{b}={n}")).collect();
                println!(
                    "t={:>3}s ok={} failed={} {}",
                    started.elapsed().as_secs(),
                    second.values().sum::<u64>(),
                    failed_second,
                    per_backend.join(" ")
                );
                second.clear();
                failed_second = 0;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let (ready, policy) = {
                    let now = state.borrow_and_update();
                    (now.ready.clone(), now.policy)
                };
                if policy != policy_now {
                    println!("t={:.3}s policy: {policy_now} -> {policy}", started.elapsed().as_secs_f64());
                    policy_now = policy;
                }
                if ready != ready_now {
                    println!("t={:.3}s ready: {}", started.elapsed().as_secs_f64(), ready.join(", "));
                    ready_now = ready;
                }
            }
            _ = &mut stop => break,
            _ = &mut shutdown => break,
        }
    }
    // Let the RPCs already sent finish so the summary counts them.
    let drain_deadline = Instant::now() + args.timeout + Duration::from_millis(500);
    while in_flight > 0 {
        match tokio::time::timeout_at(drain_deadline, results.recv()).await {
            Ok(Some(outcome)) => {
                in_flight -= 1;
                record(outcome, &mut second, &mut failed_second);
            }
            _ => break,
        }
    }
    let served: u64 = total.values().sum();
    println!(
        "==== summary after {:.1}s ====",
        started.elapsed().as_secs_f64()
    );
    for (backend, count) in &total {
        println!("  {backend}: {count}");
    }
    println!("  total ok={served} failed={failed_total}");
    if keys.is_some() {
        // How sticky the keys were: a key that reached more than one
        // backend moved (a backend came or went, or no policy hashes it).
        let moved = reached.values().filter(|b| b.len() > 1).count();
        println!(
            "  keys: {} seen, {moved} reached more than one backend",
            reached.len()
        );
    }
    for (error, count) in &errors {
        println!("  failure x{count}: {error}");
    }
}
