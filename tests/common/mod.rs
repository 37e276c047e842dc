//! Helpers shared by the integration tests: real child processes that are
//! killed when the test ends (even when it fails), free loopback ports, and
//! waiting on conditions with deadlines instead of sleeps.
#![allow(dead_code)]

pub mod cases;
pub mod faulty;
pub mod pki;
pub mod python;
pub mod refusing;
pub mod watcher;
#[allow(unused_imports)]
pub use watcher::{View, Watcher};

use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::client::{BackoffConfig, BalancedChannel, PolicyKind};
/// Free ports for the processes a test starts; see the library's docs.
pub use switchboard::process::free_port;
use switchboard::process::Child;
use switchboard::proto::echo::{echo_client::EchoClient, EchoRequest};
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{ResolveRequest, WatchRequest, WatchResponse};
use tokio::time::Instant;
use tonic::transport::Channel;

/// `127.0.0.1:<port>`.
pub fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// For a test that looks at the whole test process (its sockets, say),
/// which other tests share while they run beside it: `true` inside a run of
/// this test binary limited to `test` (`module::name`) alone, where the
/// test does its work; otherwise it starts that run, fails if the run
/// failed, and returns `false` so the caller returns at once.
pub fn in_a_process_of_its_own(test: &str) -> bool {
    const ALONE: &str = "SWITCHBOARD_TEST_ALONE";
    if std::env::var(ALONE).is_ok_and(|t| t == test) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, test)
        .output()
        .expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test} failed in a process of its own:\n{text}"
    );
    assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
    false
}

/// A child process killed (SIGKILL) and reaped when dropped; its output
/// lines are kept for assertions, and printed when the test fails. The
/// mechanism is the library's [`Child`]; this adds what tests want: the
/// `switchboard` binary, `RUST_LOG=info`, and waits that fail the test.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `bin` with `args`, capturing stdout and stderr.
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        Self::spawn_env(bin, args, &[])
    }

    /// Starts `bin` with `args` and extra environment variables.
    pub fn spawn_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let name = std::path::Path::new(bin)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::start(name, bin, args, env)
    }

    fn start(name: String, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(bin);
        command.args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command.envs(env.iter().copied());
        let child = Child::spawn(name, command).unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Self { child }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.pid() as i32
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        self.child.signal(signal)
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        self.child.kill()
    }

    /// Waits (up to `timeout`) for the process to exit and returns its code.
    /// Its output is complete by then: the readers have reached EOF (unless
    /// a child of its own still holds the pipes, which is not waited for).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = self.child.wait_exit(timeout).await;
        status
            .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for process exit"))
            .code()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Whether some output line contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.child.has_line(needle)
    }

    /// Waits for an output line containing `needle` and returns it.
    pub async fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        match self.child.wait_for_line(needle, deadline).await {
            Some(line) => line,
            None if Instant::now() < deadline => panic!(
                "{} ended its output without printing {needle:?}",
                self.child.name()
            ),
            None => panic!(
                "timed out after {timeout:?} waiting for {} to print {needle:?}",
                self.child.name()
            ),
        }
    }

    /// Every output line so far.
    pub fn output(&self) -> Vec<String> {
        self.child.output()
    }

    /// The output lines from the first on, each as it arrives: for a test
    /// that follows a long-running child without re-reading all of it.
    pub fn lines(&self) -> switchboard::process::Lines {
        self.child.lines()
    }

    /// All output so far, for failure messages.
    pub fn dump(&self) -> String {
        self.child.dump()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.child.name(), self.dump());
        }
        // Dropping the child kills it.
    }
}

/// Path of the `switchboard` binary; every process is one of its
/// subcommands.
pub fn switchboard() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

impl Proc {
    /// Starts `switchboard <subcommand> <args>`, named after the subcommand.
    pub fn sub(subcommand: &str, args: &[&str]) -> Self {
        Self::sub_env(subcommand, args, &[])
    }

    /// Starts `switchboard <subcommand> <args>` with extra environment
    /// variables.
    pub fn sub_env(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let all: Vec<&str> = std::iter::once(subcommand)
            .chain(args.iter().copied())
            .collect();
        Self::start(subcommand.to_owned(), switchboard(), &all, env)
    }
}

/// Starts the registry binary on `port` and waits until it serves.
pub async fn start_registry(port: u16) -> Proc {
    let listen = local(port);
    let proc = Proc::sub("registry", &["--listen", &listen]);
    proc.wait_line("registry listening on", Duration::from_secs(20))
        .await;
    proc
}

/// Starts `switchboard <sub> <args>` and returns it with the address in
/// its first line starting `prefix`.
pub async fn start_with_address(sub: &str, args: &[&str], prefix: &str) -> (Proc, String) {
    let proc = Proc::sub(sub, args);
    let line = proc.wait_line(prefix, STARTUP).await;
    let address = line.trim_start_matches(prefix).trim().to_owned();
    (proc, address)
}

/// The address a process printed as `metrics listening on <addr>`.
pub async fn metrics_address(proc: &Proc) -> String {
    let prefix = "metrics listening on ";
    let line = proc.wait_line(prefix, STARTUP).await;
    line.trim_start_matches(prefix).trim().to_owned()
}

/// A registry process on free ports with its status page (metrics).
pub struct StatusRegistry {
    /// The process, killed when the test ends.
    pub proc: Proc,
    /// Its gRPC address.
    pub address: String,
    /// Its status page / metrics address.
    pub status: String,
}

impl StatusRegistry {
    /// Starts a registry without warm-up, with `extra` flags, and waits
    /// until both its ports listen.
    pub async fn start(extra: &[&str]) -> Self {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--warmup-ms",
            "0",
        ];
        args.extend_from_slice(extra);
        let (proc, address) = start_with_address("registry", &args, "registry listening on ").await;
        let status = metrics_address(&proc).await;
        Self {
            proc,
            address,
            status,
        }
    }
}

impl StatusRegistry {
    /// See [`assert_removals`]: `n` removed by a broken stream, none by TTL.
    pub async fn assert_removed_by_stream_break(&self, n: usize) {
        assert_removals(&self.status, n, 0).await;
    }
}

/// Waits until the registry whose metrics are at `status` has removed
/// `stream_breaks` endpoints because their KeepAlive stream broke (the
/// backend died and its connection closed), then checks that exactly
/// `expiries` leases ran out their TTL (a hung backend, its stream open):
/// each removal had the cause the test means, whatever the timing.
pub async fn assert_removals(status: &str, stream_breaks: usize, expiries: usize) {
    let (breaks, expired) = (
        "switchboard_registry_stream_break_removals_total",
        "switchboard_registry_lease_expiries_total",
    );
    let want = |n: usize| move |v: f64| v == n as f64;
    if stream_breaks > 0 {
        wait_sample(status, breaks, want(stream_breaks)).await;
    }
    if expiries > 0 {
        wait_sample(status, expired, want(expiries)).await;
    }
    let text = get(status, "/metrics").await.1;
    let got = |name| sample(&text, name).unwrap_or(0.0);
    assert_eq!(
        (got(breaks), got(expired)),
        (stream_breaks as f64, expiries as f64),
        "(stream-break removals, TTL expiries):\n{text}"
    );
}

/// Runs `switchboard <args>` to its end; returns the exit code and output.
pub async fn run(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let mut proc = Proc::sub(args[0], &args[1..]);
    let code = proc.wait_exit(STARTUP).await;
    let lines = proc.output();
    (code, lines)
}

/// Runs an operator command that must succeed; returns its output lines.
pub async fn run_ok(args: &[&str]) -> Vec<String> {
    let (code, lines) = run(args).await;
    assert_eq!(code, Some(0), "{args:?}: {lines:#?}");
    lines
}

/// Connects a registry client to `addr`, retrying until `timeout`.
pub async fn registry_client(addr: &str, timeout: Duration) -> RegistryClient<Channel> {
    let uri = format!("http://{addr}");
    wait_for(&format!("registry at {addr}"), timeout, || {
        let uri = uri.clone();
        async move { RegistryClient::connect(uri).await.ok() }
    })
    .await
}

/// The sorted addresses registered for `service` (draining ones included).
pub async fn resolve(client: &mut RegistryClient<Channel>, service: &str) -> Option<Vec<String>> {
    let reply = client
        .resolve(ResolveRequest {
            service: service.into(),
        })
        .await
        .ok()?
        .into_inner();
    let mut addresses: Vec<String> = reply.endpoints.into_iter().map(|e| e.address).collect();
    addresses.sort();
    Some(addresses)
}

/// Waits until `service` resolves to exactly `expected` (any order).
pub async fn wait_registered(
    registry: &str,
    service: &str,
    expected: &[String],
    timeout: Duration,
) {
    let mut expected = expected.to_vec();
    expected.sort();
    let registry = registry.to_owned();
    wait_for(
        &format!("{service} to resolve to {expected:?}"),
        timeout,
        || {
            let registry = registry.clone();
            let expected = expected.clone();
            async move {
                let mut client = RegistryClient::connect(format!("http://{registry}"))
                    .await
                    .ok()?;
                (resolve(&mut client, service).await? == expected).then_some(())
            }
        },
    )
    .await
}

/// Opens a watch on `service`.
pub async fn watch(
    client: &mut RegistryClient<Channel>,
    service: &str,
) -> tonic::Streaming<WatchResponse> {
    client
        .watch(WatchRequest {
            service: service.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// An address the test can use for a server it starts itself.
pub fn socket(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts one echo process serving `ports` on 127.0.0.1, registered as
/// `service` at `registry`, and waits until every server says it serves.
pub async fn start_echo(registry: &str, service: &str, ports: &[u16], extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--registry".into(),
        registry.into(),
        "--service".into(),
        service.into(),
    ];
    for port in ports {
        args.push("--listen".into());
        args.push(local(*port));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::sub("echo", &args);
    for port in ports {
        proc.wait_line(
            &format!("echo serving on {}", local(*port)),
            Duration::from_secs(20),
        )
        .await;
    }
    proc
}

/// The backend address at the end of an echo reply, `"... (from <addr>)"`.
pub fn backend_of(reply: &str) -> String {
    reply
        .rsplit_once("(from ")
        .map(|(_, rest)| rest.trim_end_matches(')').to_owned())
        .unwrap_or_default()
}

/// What one RPC of a [`Load`] did.
#[derive(Debug, Clone)]
pub struct Shot {
    /// When the RPC was sent.
    pub sent: Instant,
    /// When it finished.
    pub done: Instant,
    /// The backend that answered, or the failure.
    pub result: Result<String, tonic::Status>,
}

/// Continuous client load: `concurrency` workers, each sending one unary
/// echo after another (paced to `per_worker_interval`), recording every
/// outcome.
pub struct Load {
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// One load worker's RPC: its own client, and what one call does with it.
pub type Call<T> = for<'a> fn(
    &'a mut T,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, tonic::Status>> + Send + 'a>,
>;

impl Load {
    /// Starts unary echo workers on `channel`.
    pub fn start(
        channel: switchboard::client::BalancedChannel,
        concurrency: usize,
        per_worker_interval: Duration,
        rpc_timeout: Duration,
    ) -> Self {
        Self::start_with(
            concurrency,
            per_worker_interval,
            || (EchoClient::new(channel.clone()), rpc_timeout),
            |(client, rpc_timeout)| {
                Box::pin(async move {
                    let mut request = tonic::Request::new(EchoRequest {
                        message: "load".into(),
                    });
                    request.set_timeout(*rpc_timeout);
                    client
                        .unary_echo(request)
                        .await
                        .map(|r| backend_of(&r.into_inner().message))
                })
            },
        )
    }

    /// Starts `concurrency` workers, each with a client from `client`,
    /// making `call` one after another (paced to `per_worker_interval`).
    pub fn start_with<T: Send + 'static>(
        concurrency: usize,
        per_worker_interval: Duration,
        client: impl Fn() -> T,
        call: Call<T>,
    ) -> Self {
        let shots = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = (0..concurrency)
            .map(|_| {
                let mut client = client();
                let shots = shots.clone();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let mut pace = tokio::time::interval(per_worker_interval);
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !*stopped.borrow() {
                        pace.tick().await;
                        let sent = Instant::now();
                        let result = call(&mut client).await;
                        shots.lock().unwrap().push(Shot {
                            sent,
                            done: Instant::now(),
                            result,
                        });
                    }
                })
            })
            .collect();
        Self {
            shots,
            stop,
            workers,
        }
    }

    /// Outcomes so far.
    pub fn shots(&self) -> Vec<Shot> {
        self.shots.lock().unwrap().clone()
    }

    /// How many RPCs have finished.
    pub fn count(&self) -> usize {
        self.shots.lock().unwrap().len()
    }

    /// Waits until `n` more RPCs have finished after this call.
    pub async fn wait_more(&self, n: usize, timeout: Duration) {
        let target = self.count() + n;
        let shots = self.shots.clone();
        wait_for(&format!("{n} more RPCs"), timeout, || {
            let done = shots.lock().unwrap().len() >= target;
            async move { done.then_some(()) }
        })
        .await
    }

    /// Stops the workers, lets in-flight RPCs finish, returns every outcome.
    pub async fn stop(self) -> Vec<Shot> {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        let shots = self.shots.lock().unwrap().clone();
        shots
    }
}

/// Failed outcomes, for assertions and messages.
pub fn failures(shots: &[Shot]) -> Vec<&Shot> {
    shots.iter().filter(|s| s.result.is_err()).collect()
}

/// Stops `load` and asserts that no RPC failed; returns how many ran.
pub async fn assert_no_failed_rpc(load: Load, what: &str) -> usize {
    let shots = load.stop().await;
    let failed = failures(&shots);
    assert!(
        failed.is_empty(),
        "{what}: {} of {} RPCs failed, the first: {:?}",
        failed.len(),
        shots.len(),
        failed.first()
    );
    shots.len()
}

/// Starts `n` echo backends (one process each) registered as [`SERVICE`]
/// through `registry` (one address or a replica list) with `extra` flags;
/// returns them sorted by address.
pub async fn start_backends(registry: &str, n: usize, extra: &[&str]) -> Vec<(String, Proc)> {
    let mut backends = Vec::new();
    for _ in 0..n {
        let port = free_port().expect("free port");
        let proc = start_echo(registry, SERVICE, &[port], extra).await;
        backends.push((local(port), proc));
    }
    backends.sort_by(|a, b| a.0.cmp(&b.0));
    wait_keepers(&backends).await;
    backends
}

/// Waits until each backend says its lease keeper holds its lease: granted
/// and bound to a KeepAlive stream the registry has answered. Being listed
/// is not that: the registry lists an endpoint when Register returns,
/// before the keeper's stream is open, and a backend killed in between
/// leaves when its TTL runs out, not when its stream breaks.
pub async fn wait_keepers(backends: &[(String, Proc)]) {
    for (address, proc) in backends {
        proc.wait_line(&format!(": registered address={address} "), STARTUP)
            .await;
    }
}

/// The addresses of `backends`, in their order.
pub fn addresses_of(backends: &[(String, Proc)]) -> Vec<String> {
    backends.iter().map(|(a, _)| a.clone()).collect()
}

/// A round_robin client of [`SERVICE`] through `registry` (one address or
/// a replica list) under load (4 workers, an RPC each per 10 ms), once it
/// uses every one of `expected` and 100 RPCs have run.
pub async fn load_through(registry: &str, expected: &[String]) -> (BalancedChannel, Load) {
    let channel = channel(&registry_target(registry), PolicyKind::RoundRobin);
    wait_ready_set(&channel, expected, STARTUP).await;
    // A slow RPC on a loaded machine is no failure.
    let load = Load::start(
        channel.clone(),
        4,
        Duration::from_millis(10),
        Duration::from_secs(10),
    );
    load.wait_more(100, STARTUP).await;
    (channel, load)
}

/// The service every test registers.
pub const SERVICE: &str = "lb.example.grpc.io";
/// Deadline for processes to start on a loaded machine.
pub const STARTUP: Duration = Duration::from_secs(30);

/// A channel with test-friendly reconnect backoff and keepalive: a hung
/// backend with RPCs in flight is dropped within seconds, and a healthy one
/// on a loaded machine still answers its pings in time.
pub fn channel(target: &str, policy: PolicyKind) -> BalancedChannel {
    BalancedChannel::builder(target)
        .expect("valid target")
        .policy(policy)
        .backoff(BackoffConfig::fast())
        .keepalive(Duration::from_millis(500), Duration::from_secs(2))
        .build()
}

pub fn registry_target(registry: &str) -> String {
    format!("registry://{registry}/{SERVICE}")
}

pub async fn echo_once(
    client: &mut EchoClient<BalancedChannel>,
    timeout: Duration,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest {
        message: "hi".into(),
    });
    request.set_timeout(timeout);
    client
        .unary_echo(request)
        .await
        .map(|reply| backend_of(&reply.into_inner().message))
}

/// Waits until the channel sends RPCs to exactly `expected`.
pub async fn wait_ready_set(channel: &BalancedChannel, expected: &[String], timeout: Duration) {
    let mut expected = expected.to_vec();
    expected.sort();
    let deadline = Instant::now() + timeout;
    loop {
        let state = channel.state();
        let mut ready: Vec<String> = state.ready.iter().map(|a| a.to_string()).collect();
        ready.sort();
        if ready == expected {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for ready set {expected:?}; channel state: {state:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A registry process and one echo process per backend.
pub struct Cluster {
    pub registry: String,
    /// The registry's metrics address (for [`assert_removals`]).
    pub metrics: String,
    pub registry_proc: Proc,
    pub backends: Vec<(String, Proc)>,
}

impl Cluster {
    pub async fn start(backends: usize) -> Self {
        Self::start_with(backends, &[]).await
    }

    /// As [`Cluster::start`], with `echo_args` passed to every backend.
    pub async fn start_with(backends: usize, echo_args: &[&str]) -> Self {
        let port = free_port().expect("free port");
        let registry = local(port);
        let registry_proc = Proc::sub(
            "registry",
            &["--listen", &registry, "--metrics-listen", "127.0.0.1:0"],
        );
        registry_proc
            .wait_line("registry listening on", STARTUP)
            .await;
        let metrics = metrics_address(&registry_proc).await;
        let mut cluster = Self {
            registry,
            metrics,
            registry_proc,
            backends: Vec::new(),
        };
        for _ in 0..backends {
            let port = free_port().expect("free port");
            let proc = start_echo(&cluster.registry, SERVICE, &[port], echo_args).await;
            cluster.backends.push((local(port), proc));
        }
        wait_keepers(&cluster.backends).await;
        let addresses = cluster.addresses();
        wait_registered(&cluster.registry, SERVICE, &addresses, STARTUP).await;
        cluster
    }

    /// Starts one more backend; it may be unregistered yet (the registry may
    /// be down): see [`wait_keepers`].
    pub async fn add_backend(&mut self) -> String {
        let port = free_port().expect("free port");
        let proc = start_echo(&self.registry, SERVICE, &[port], &[]).await;
        self.backends.push((local(port), proc));
        local(port)
    }

    pub fn addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self.backends.iter().map(|(a, _)| a.clone()).collect();
        addresses.sort();
        addresses
    }

    /// The process serving `address`.
    pub fn backend(&self, address: &str) -> &Proc {
        &self
            .backends
            .iter()
            .find(|(a, _)| a == address)
            .expect("known backend")
            .1
    }

    pub fn kill(&mut self, address: &str) -> Proc {
        let index = self
            .backends
            .iter()
            .position(|(a, _)| a == address)
            .expect("known backend");
        let (_, mut proc) = self.backends.remove(index);
        proc.kill();
        proc
    }
}

/// The distinct backends that served `n` sequential RPCs.
pub async fn served_by(
    client: &mut EchoClient<BalancedChannel>,
    n: usize,
) -> std::collections::BTreeSet<String> {
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..n {
        served.insert(
            echo_once(client, Duration::from_secs(5))
                .await
                .expect("rpc"),
        );
    }
    served
}

/// A cluster with a round_robin channel that uses every backend, under
/// continuous load: the starting point of each fault test.
pub struct Loaded {
    pub cluster: Cluster,
    /// The backends' addresses, sorted.
    pub addresses: Vec<String>,
    pub channel: BalancedChannel,
    pub load: Load,
}

impl Loaded {
    /// Starts `backends` backends and `concurrency` load workers, each
    /// sending one RPC per `pace`, and waits for `warmup` RPCs.
    pub async fn start(
        backends: usize,
        concurrency: usize,
        pace: Duration,
        rpc_timeout: Duration,
        warmup: usize,
    ) -> Self {
        Self::start_with(backends, &[], concurrency, pace, rpc_timeout, warmup).await
    }

    /// As [`Loaded::start`], with `echo_args` passed to every backend.
    pub async fn start_with(
        backends: usize,
        echo_args: &[&str],
        concurrency: usize,
        pace: Duration,
        rpc_timeout: Duration,
        warmup: usize,
    ) -> Self {
        let cluster = Cluster::start_with(backends, echo_args).await;
        let addresses = cluster.addresses();
        let channel = channel(&registry_target(&cluster.registry), PolicyKind::RoundRobin);
        wait_ready_set(&channel, &addresses, STARTUP).await;
        let load = Load::start(channel.clone(), concurrency, pace, rpc_timeout);
        load.wait_more(warmup, STARTUP).await;
        Self {
            cluster,
            addresses,
            channel,
            load,
        }
    }
}

/// Every address but `victim`.
pub fn all_but(addresses: &[String], victim: &str) -> Vec<String> {
    addresses.iter().filter(|a| *a != victim).cloned().collect()
}

/// Serves an in-process registry with `config` on a free port until the
/// test ends; returns its address.
pub async fn serve_registry(config: switchboard::registry::RegistryConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(switchboard::registry::serve(
        listener,
        config,
        std::future::pending(),
    ));
    address
}

/// Runs `switchboard <bin_name> <args>`, which must fail at startup: exit status 1 and
/// one line, `error: ...` containing `expected`.
pub async fn refused_at_startup(bin_name: &str, args: &[String], expected: &str) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::sub(bin_name, &args);
    let code = proc.wait_exit(STARTUP).await;
    let line = proc.wait_line("error: ", STARTUP).await;
    let output = proc.output();
    assert_eq!(code, Some(1), "{bin_name} {args:?}: {output:#?}");
    assert_eq!(output.len(), 1, "{bin_name} {args:?}: {output:#?}");
    assert!(
        line.starts_with("error: ") && line.contains(expected),
        "{bin_name} {args:?}: {line:?} does not say {expected:?}"
    );
}

/// GETs `path` from `address` over HTTP/1.1 (connection closed after one
/// reply); returns the status line's code and the body.
pub async fn get(address: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a full reply");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// The value of the sample `name` (with its labels, exactly as rendered),
/// or `None` while it is absent.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Waits until the sample `name` (labels exactly as rendered) scraped from
/// `address` satisfies `ok` (`None` while absent); returns its value.
/// On timeout it shows every sample of the metric, so a failure says what
/// the value was, not only that it was not the one awaited.
pub async fn wait_sample(address: &str, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + STARTUP;
    loop {
        let (_, body) = get(address, "/metrics").await;
        if let Some(value) = sample(&body, name).filter(|v| ok(*v)) {
            return value;
        }
        if Instant::now() >= deadline {
            let family = name.split('{').next().unwrap_or(name);
            let seen: Vec<&str> = body.lines().filter(|l| l.starts_with(family)).collect();
            panic!("timed out after {STARTUP:?} waiting for {name} at {address}; its samples: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens a Watch of [`SERVICE`] and reads its first message, which proves
/// the stream is really open (a refused one fails here).
pub async fn open_watch(
    client: &mut RegistryClient<Channel>,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    let mut stream = client
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    stream.message().await?.expect("a first message");
    Ok(stream)
}
