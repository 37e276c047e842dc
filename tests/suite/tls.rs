//! TLS and mutual TLS: the registry and echo servers serve TLS, refuse
//! plaintext and clients without the right certificates, and the echo lease
//! keeper, the client library and the CLIs connect with a CA, a client
//! certificate and key. Every certificate is made here, for this run, by a
//! throwaway CA.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::cases::{self, case, expect_status, Case};
use crate::common::*;
use futures_util::StreamExt;
use switchboard::client::error::status_chain;
use switchboard::client::transport;
use switchboard::client::{BackoffConfig, BalancedChannel, ConnectivityState, PolicyKind};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{watch_response, RegisterRequest, ResolveRequest, WatchRequest};
use switchboard::registry::RegistryConfig;
use switchboard::tls::{ClientTls, ServerTls};
use tonic::transport::Channel;
use tonic::Code;

/// The certificates of one test, as files in a directory of its own:
///
/// - `ca.crt`: the CA everyone trusts;
/// - `server.crt`/`.key`: for `127.0.0.1` and `localhost`, signed by it;
/// - `client.crt`/`.key`: a client certificate signed by it;
/// - `wrong-ca.crt`, and `wrong-client.crt`/`.key` signed by that one.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        crate::common::pki::write_files(&dir);
        Self { dir }
    }

    /// A file of this test's PKI.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file's path as a command-line argument.
    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// The server's TLS settings, demanding client certificates signed by
    /// the CA if `mutual`.
    fn server(&self, mutual: bool) -> ServerTls {
        let ca = self.path("ca.crt");
        ServerTls::from_files(
            &self.path("server.crt"),
            &self.path("server.key"),
            mutual.then_some(ca.as_path()),
        )
        .unwrap()
    }

    /// A client trusting `ca`, presenting `identity` (`client` or
    /// `wrong-client`) if given.
    fn client(&self, ca: &str, identity: Option<&str>) -> ClientTls {
        let cert = identity.map(|name| {
            (
                self.path(&format!("{name}.crt")),
                self.path(&format!("{name}.key")),
            )
        });
        ClientTls::from_files(
            &self.path(ca),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap()
    }

    /// The right CA and the right client certificate.
    fn good_client(&self) -> ClientTls {
        self.client("ca.crt", Some("client"))
    }

    /// The flags that make a server binary serve TLS (mutual if `mutual`).
    fn server_flags(&self, mutual: bool) -> Vec<String> {
        let mut flags = vec![
            "--tls-cert".into(),
            self.arg("server.crt"),
            "--tls-key".into(),
            self.arg("server.key"),
        ];
        if mutual {
            flags.extend(["--tls-client-ca".into(), self.arg("ca.crt")]);
        }
        flags
    }
}

impl Drop for Pki {
    /// The servers read their files at startup, so they can go now.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the registry binary serving TLS (mutual if `mutual`), without a
/// warm-up; returns its address and process.
async fn tls_registry(pki: &Pki, mutual: bool) -> (String, Proc) {
    let address = local(free_port().expect("free port"));
    let mut args = vec![
        "--listen".to_owned(),
        address.clone(),
        "--warmup-ms".into(),
        "0".into(),
    ];
    args.extend(pki.server_flags(mutual));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::sub("registry", &args);
    proc.wait_line("registry listening on", STARTUP).await;
    (address, proc)
}

/// A registry client on a new connection, over TLS with `tls`; any failure
/// as one line (certificate problems included).
async fn connect(
    address: &str,
    tls: Option<&ClientTls>,
) -> Result<RegistryClient<Channel>, String> {
    let channel = transport::channel(address, tls, Duration::from_secs(5)).await?;
    Ok(RegistryClient::new(channel))
}

/// The addresses `service` resolves to, over a new connection; any failure
/// (at connect or at the call) as one line.
async fn resolve_over(address: &str, tls: Option<&ClientTls>) -> Result<Vec<String>, String> {
    let mut client = connect(address, tls).await?;
    let mut request = tonic::Request::new(ResolveRequest {
        service: SERVICE.into(),
    });
    request.set_timeout(Duration::from_secs(5));
    let reply = client
        .resolve(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status_chain(&status)))?;
    let mut addresses: Vec<String> = reply
        .into_inner()
        .endpoints
        .into_iter()
        .map(|e| e.address)
        .collect();
    addresses.sort();
    Ok(addresses)
}

/// Asserts that a failed connection's error names the certificate problem.
fn names_certificate_problem(error: &str) {
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error should say what is wrong with the certificate: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_registry_serves_watch_and_register_to_clients_that_trust_its_ca() {
    let pki = Pki::new();
    let (address, _registry) = tls_registry(&pki, false).await;
    let trusting = pki.client("ca.crt", None);

    // Watch, then Register: the watcher sees the new endpoint.
    let mut client = connect(&address, Some(&trusting)).await.expect("connects");
    let mut watch = client
        .watch(WatchRequest {
            service: SERVICE.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("a reset").expect("a reset");
    assert!(matches!(first.event, Some(watch_response::Event::Reset(_))));
    client
        .register(RegisterRequest {
            service: SERVICE.into(),
            address: "127.0.0.1:4000".into(),
            ..RegisterRequest::default()
        })
        .await
        .expect("register over TLS");
    let next = tokio::time::timeout(STARTUP, watch.next())
        .await
        .expect("a delta in time")
        .expect("a delta")
        .expect("a delta");
    match next.event {
        Some(watch_response::Event::Delta(delta)) => {
            assert_eq!(delta.added[0].address, "127.0.0.1:4000")
        }
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// The client side of a TLS connection attempt.
#[derive(Debug, Clone, Copy)]
enum Client {
    Plaintext,
    /// Trusting this CA file, presenting this certificate (`client` or
    /// `wrong-client`) if any.
    Tls(&'static str, Option<&'static str>),
}

/// What a connection attempt must come to: served, refused, or refused
/// with an error that names the certificate problem.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Served,
    Refused,
    CertificateRefused,
}

/// Each kind of client against a TLS registry (`false`) and a mutual-TLS
/// one (`true`).
fn connection_cases() -> Vec<Case<(bool, Client), Verdict>> {
    use Client::*;
    use Verdict::*;
    vec![
        case("TLS: plaintext", (false, Plaintext), Refused),
        case(
            "TLS: trusting another CA",
            (false, Tls("wrong-ca.crt", None)),
            CertificateRefused,
        ),
        case("TLS: trusting its CA", (false, Tls("ca.crt", None)), Served),
        case(
            "mutual TLS: no client certificate",
            (true, Tls("ca.crt", None)),
            CertificateRefused,
        ),
        case(
            "mutual TLS: a client certificate from another CA",
            (true, Tls("ca.crt", Some("wrong-client"))),
            CertificateRefused,
        ),
        case(
            "mutual TLS: a client certificate from its CA",
            (true, Tls("ca.crt", Some("client"))),
            Served,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registries_refuse_clients_without_the_right_certificates() {
    let pki = Pki::new();
    let mut registries = Vec::new();
    for mutual in [false, true] {
        let address = serve_registry(RegistryConfig {
            tls: Some(pki.server(mutual)),
            ..RegistryConfig::default()
        })
        .await;
        let good = pki.good_client();
        wait_for("the TLS registry to serve", STARTUP, || {
            let (address, good) = (address.clone(), good.clone());
            async move { resolve_over(&address, Some(&good)).await.ok() }
        })
        .await;
        registries.push(address);
    }
    cases::together(connection_cases(), |attempt| {
        let (mutual, client) = attempt.input;
        let address = registries[usize::from(mutual)].clone();
        let tls = match client {
            Client::Plaintext => None,
            Client::Tls(ca, identity) => Some(pki.client(ca, identity)),
        };
        async move {
            let outcome = resolve_over(&address, tls.as_ref()).await;
            match (attempt.expected, outcome) {
                (Verdict::Served, outcome) => assert_eq!(outcome, Ok(Vec::new())),
                (Verdict::Refused, outcome) => assert!(outcome.is_err(), "served: {outcome:?}"),
                (Verdict::CertificateRefused, Ok(served)) => panic!("served: {served:?}"),
                (Verdict::CertificateRefused, Err(error)) => names_certificate_problem(&error),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_caps_still_see_the_peer_over_tls() {
    let pki = Pki::new();
    let address = serve_registry(RegistryConfig {
        tls: Some(pki.server(true)),
        max_watch_streams_per_connection: 1,
        ..RegistryConfig::default()
    })
    .await;
    let tls = pki.good_client();
    let mut client = wait_for("the TLS registry", STARTUP, || {
        let (address, tls) = (address.clone(), tls.clone());
        async move { connect(&address, Some(&tls)).await.ok() }
    })
    .await;
    let _held = open_watch(&mut client).await.expect("the first watch");
    expect_status(
        open_watch(&mut client).await,
        Code::ResourceExhausted,
        "per connection",
    );
    // Another TLS connection is another peer.
    let mut other = connect(&address, Some(&tls)).await.unwrap();
    let _other = open_watch(&mut other).await.expect("another connection");
}

/// A mutual-TLS registry and one echo process with two mutual-TLS
/// backends registered through TLS.
struct TlsCluster {
    pki: Pki,
    registry: String,
    backends: Vec<String>,
    _procs: [Proc; 2],
}

impl TlsCluster {
    async fn start() -> Self {
        let pki = Pki::new();
        let (registry, registry_proc) = tls_registry(&pki, true).await;
        let ports = [
            free_port().expect("free port"),
            free_port().expect("free port"),
        ];
        let mut extra = pki.server_flags(true);
        extra.extend([
            "--registry-ca".into(),
            pki.arg("ca.crt"),
            "--registry-cert".into(),
            pki.arg("client.crt"),
            "--registry-key".into(),
            pki.arg("client.key"),
        ]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let echo = start_echo(&registry, SERVICE, &ports, &extra).await;
        let mut backends: Vec<String> = ports.iter().map(|p| local(*p)).collect();
        backends.sort();
        let tls = pki.good_client();
        wait_for("both backends to register over TLS", STARTUP, || {
            let (registry, tls, backends) = (registry.clone(), tls.clone(), backends.clone());
            async move { (resolve_over(&registry, Some(&tls)).await.ok()? == backends).then_some(()) }
        })
        .await;
        Self {
            pki,
            registry,
            backends,
            _procs: [registry_proc, echo],
        }
    }

    /// A round_robin channel to the service, with `backends` and
    /// `registry` TLS settings.
    fn channel(&self, backends: ClientTls, registry: ClientTls) -> BalancedChannel {
        BalancedChannel::builder(&registry_target(&self.registry))
            .unwrap()
            .policy(PolicyKind::RoundRobin)
            .backoff(BackoffConfig::fast())
            .tls(backends)
            .registry_tls(registry)
            .build()
    }

    /// Runs the client binary with `args` to its end; returns its exit code
    /// and output.
    async fn run_client(&self, args: &[String]) -> (Option<i32>, Vec<String>) {
        let mut all = vec!["--target".to_owned(), registry_target(&self.registry)];
        all.extend(args.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut client = Proc::sub("client", &all);
        let code = client.wait_exit(STARTUP).await;
        let output = client.output();
        (code, output)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_registers_over_mutual_tls_and_clients_balance_over_it() {
    let cluster = TlsCluster::start().await;
    let good = cluster.pki.good_client();
    let channel = cluster.channel(good.clone(), good);
    wait_ready_set(&channel, &cluster.backends, STARTUP).await;
    let mut client = EchoClient::new(channel);
    let served: Vec<String> = served_by(&mut client, 6).await.into_iter().collect();
    assert_eq!(served, cluster.backends);

    // The CLI, with the same certificates for the registry and backends.
    let pki = &cluster.pki;
    let (code, output) = cluster
        .run_client(&[
            "--ca".into(),
            pki.arg("ca.crt"),
            "--cert".into(),
            pki.arg("client.crt"),
            "--key".into(),
            pki.arg("client.key"),
            "--policy".into(),
            "round_robin".into(),
            "--count".into(),
            "4".into(),
        ])
        .await;
    assert_eq!(code, Some(0), "{output:#?}");
    // The CLI starts calling once one backend is Ready, so which ones answer
    // is up to timing; that every call is answered by one is not.
    let replies = output
        .iter()
        .filter(|l| {
            cluster
                .backends
                .iter()
                .any(|b| l.ends_with(&format!("(from {b})")))
        })
        .count();
    assert_eq!(replies, 4, "{output:#?}");
}

/// Waits until `channel` fails fast, then checks that an RPC gets
/// UNAVAILABLE at once, naming the certificate problem.
async fn fails_fast_naming_the_certificate(channel: BalancedChannel) {
    let mut state = channel.watch_state();
    tokio::time::timeout(
        STARTUP,
        state.wait_for(|s| s.connectivity == ConnectivityState::TransientFailure),
    )
    .await
    .expect("the channel gives up connecting")
    .unwrap();
    let mut client = EchoClient::new(channel.clone());
    // One that waited would end DEADLINE_EXCEEDED, not UNAVAILABLE.
    let status = echo_once(&mut client, Duration::from_secs(120))
        .await
        .expect_err("no backend can be trusted");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    names_certificate_problem(status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_wrong_certificates_fail_fast_saying_why() {
    let cluster = TlsCluster::start().await;
    let pki = &cluster.pki;
    let good = pki.good_client();
    // The TLS settings a channel uses for the backends, then the registry.
    let wrong_settings = vec![
        case(
            "backends whose certificate the client does not trust",
            (pki.client("wrong-ca.crt", Some("client")), good.clone()),
            (),
        ),
        case(
            "backends that do not accept the client's certificate",
            (pki.client("ca.crt", Some("wrong-client")), good.clone()),
            (),
        ),
        case(
            "a registry whose certificate the client does not trust",
            (good, pki.client("wrong-ca.crt", Some("client"))),
            (),
        ),
    ];
    cases::together(wrong_settings, |wrong| {
        let (backends, registry) = wrong.input;
        fails_fast_naming_the_certificate(cluster.channel(backends, registry))
    })
    .await;

    // The CLI says so in one line and exits.
    let (code, output) = cluster
        .run_client(&[
            "--ca".into(),
            pki.arg("wrong-ca.crt"),
            "--cert".into(),
            pki.arg("client.crt"),
            "--key".into(),
            pki.arg("client.key"),
            "--fail-fast".into(),
        ])
        .await;
    assert_eq!(code, Some(1), "{output:#?}");
    let error = output
        .iter()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {output:#?}"));
    names_certificate_problem(error);
}
