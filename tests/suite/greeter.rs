//! Registration for any tonic service: the `greeter` example (grpc's
//! helloworld Greeter on `switchboard::registration`) as real processes
//! behind a round_robin `BalancedChannel`, drained by SIGTERM under load;
//! and the module's `Server` in-process (health, lease, drain report,
//! refused settings).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::*;
use switchboard::client::PolicyKind;
use switchboard::proto::helloworld::greeter_client::GreeterClient;
use switchboard::proto::helloworld::greeter_server::{Greeter, GreeterServer};
use switchboard::proto::helloworld::{HelloReply, HelloRequest};
use switchboard::registration::{self, LeaseState, RegistrationError, Server};
use switchboard::registry::RegistryConfig;
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The name the greeter registers under by default.
const GREETER: &str = "helloworld.Greeter";

/// Load workers, each sending one SayHello every [`PACE`].
const CONCURRENCY: usize = 4;
const PACE: Duration = Duration::from_millis(10);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The `greeter` example binary next to this test's profile directory
/// (`target/<profile>/examples/greeter`). A plain `cargo test` builds
/// examples, but `cargo test --test greeter` does not, so it is built (or
/// found fresh) once per run with the cargo that built this test.
fn greeter_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/greeter-<hash>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir");
        let mut build = Command::new(env!("CARGO"));
        build
            .args([
                "build",
                "--quiet",
                "--example",
                "greeter",
                "--manifest-path",
            ])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        // What cargo sets for a running test is not the shell's build
        // environment: build scripts that watch such variables (ring's
        // watches OUT_DIR) would otherwise rebuild, and the next
        // `cargo test` rebuild again.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "OUT_DIR"
                || [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                    "CARGO_PRIMARY_",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_",
                ]
                .iter()
                .any(|prefix| name.starts_with(prefix))
            {
                build.env_remove(name.as_ref());
            }
        }
        let status = build.status().expect("run cargo build --example greeter");
        assert!(status.success(), "cargo build --example greeter failed");
        let bin = profile_dir.join("examples").join("greeter");
        assert!(bin.exists(), "{} is missing", bin.display());
        bin.to_string_lossy().into_owned()
    })
}

/// Starts a greeter on a port of its choosing, registered at `registry`,
/// and returns it with the address it announced.
async fn start_greeter(registry: &str, extra: &[&str]) -> (String, Proc) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--registry", registry];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(greeter_bin(), &args);
    let line = proc.wait_line("greeter serving on ", STARTUP).await;
    let address = line
        .rsplit_once("greeter serving on ")
        .map(|(_, address)| address.trim().to_owned())
        .expect("an address");
    (address, proc)
}

/// One SayHello; `Ok` names the backend that answered.
async fn say_hello<T>(client: &mut GreeterClient<T>, name: &str) -> Result<String, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut request = tonic::Request::new(HelloRequest { name: name.into() });
    request.set_timeout(RPC_TIMEOUT);
    let reply = client.say_hello(request).await?.into_inner().message;
    assert!(
        reply.starts_with(&format!("Hello {name} (from ")),
        "{reply}"
    );
    Ok(backend_of(&reply))
}

/// Continuous SayHello load on `channel`, each outcome recorded.
fn greet_load(channel: switchboard::client::BalancedChannel) -> Load {
    Load::start_with(
        CONCURRENCY,
        PACE,
        || GreeterClient::new(channel.clone()),
        |client| Box::pin(say_hello(client, "load")),
    )
}

// ---------------------------------------------------------------------------
// The greeter example as processes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_greeters_share_the_load_and_a_sigterm_drain_fails_no_rpc() {
    let registry_port = free_port().expect("free port");
    let _registry = start_registry(registry_port).await;
    let registry = local(registry_port);
    let (leaving, mut leaving_proc) = start_greeter(&registry, &[]).await;
    let (staying, _staying_proc) = start_greeter(&registry, &["--name", "unused"]).await;
    let mut both = vec![leaving.clone(), staying.clone()];
    both.sort();
    wait_registered(&registry, GREETER, &both, STARTUP).await;

    let channel = channel(
        &format!("registry://{registry}/{GREETER}"),
        PolicyKind::RoundRobin,
    );
    wait_ready_set(&channel, &both, STARTUP).await;
    let mut client = GreeterClient::new(channel.clone());
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..10 {
        answered.insert(say_hello(&mut client, "you").await.expect("SayHello"));
    }
    assert_eq!(answered.into_iter().collect::<Vec<_>>(), both);

    let load = greet_load(channel.clone());
    load.wait_more(200, STARTUP).await;
    leaving_proc.signal(libc::SIGTERM);
    // The registry drops the endpoint first, so the channel moves away while
    // the greeter still serves.
    wait_registered(&registry, GREETER, std::slice::from_ref(&staying), STARTUP).await;
    wait_ready_set(&channel, std::slice::from_ref(&staying), STARTUP).await;
    let settled = Instant::now();
    assert_eq!(
        leaving_proc.wait_exit(STARTUP).await,
        Some(0),
        "the drained greeter did not exit cleanly:\n{}",
        leaving_proc.dump()
    );
    assert!(
        leaving_proc.has_line("deregistered"),
        "{}",
        leaving_proc.dump()
    );
    load.wait_more(200, STARTUP).await;
    let shots = load.stop().await;

    let failed = failures(&shots);
    let after: Vec<&Shot> = shots.iter().filter(|s| s.sent >= settled).collect();
    eprintln!(
        "greeter drain: {} RPCs, {} failed, {} after the channel settled",
        shots.len(),
        failed.len(),
        after.len()
    );
    assert!(
        failed.is_empty(),
        "{} RPCs failed during the drain: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(after.len() >= 200);
    for shot in after {
        assert_eq!(shot.result.as_ref().ok(), Some(&staying));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_refuses_bad_flags_and_a_busy_port_in_one_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = busy.local_addr().unwrap().to_string();
    for (args, expected) in [
        (vec!["--listen", "nonsense"], "--listen"),
        (vec!["--bogus"], "--bogus"),
        (
            vec!["--listen", "127.0.0.1:0", "--service", "not a service"],
            "service",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--registry", "127.0.0.1"],
            "registry address",
        ),
        (vec!["--listen", "0.0.0.0:0"], "--advertise"),
        (vec!["--listen", busy.as_str()], "already in use"),
    ] {
        let mut proc = Proc::spawn(greeter_bin(), &args);
        let code = proc.wait_exit(STARTUP).await;
        let line = proc.wait_line("error: ", STARTUP).await;
        let output = proc.output();
        assert_eq!(code, Some(1), "{args:?}: {output:#?}");
        assert_eq!(output.len(), 1, "{args:?}: {output:#?}");
        assert!(
            line.starts_with("error: ") && line.contains(expected),
            "{args:?}: {line}"
        );
    }
    let mut help = Proc::spawn(greeter_bin(), &["--help"]);
    assert_eq!(help.wait_exit(STARTUP).await, Some(0));
    help.wait_line("--registry", STARTUP).await;
}

// ---------------------------------------------------------------------------
// registration::Server in-process
// ---------------------------------------------------------------------------

/// A Greeter answering for `from`.
struct Greeting {
    from: String,
}

#[tonic::async_trait]
impl Greeter for Greeting {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        Ok(tonic::Response::new(HelloReply {
            message: format!("Hello {} (from {})", request.into_inner().name, self.from),
        }))
    }
}

async fn health(address: &str, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("a URI")
        .connect()
        .await
        .expect("health connects");
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(reply.status).expect("known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_tonic_service_registers_under_its_name_and_drains() {
    let registry = serve_registry(RegistryConfig::default()).await;
    let listener = registration::bind(socket(0)).await.expect("bind");
    let address = listener.local_addr().unwrap().to_string();
    let server = Server::builder()
        .registry(registry.clone())
        .metadata("zone", "a")
        // Long enough for the checks below to run inside it, however slow.
        .drain_grace(Duration::from_secs(10))
        .add_service(GreeterServer::new(Greeting {
            from: address.clone(),
        }))
        .serve(listener)
        .await
        .expect("serves");
    assert_eq!(server.address(), address);
    let mut lease = server.lease_state();
    tokio::time::timeout(STARTUP, lease.wait_for(LeaseState::is_registered))
        .await
        .expect("registered in time")
        .unwrap();
    // No service_name(): it registers under the added service's name.
    wait_registered(&registry, GREETER, std::slice::from_ref(&address), STARTUP).await;
    assert_eq!(health(&address, "").await, ServingStatus::Serving);
    assert_eq!(health(&address, GREETER).await, ServingStatus::Serving);
    let mut client = GreeterClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    assert_eq!(say_hello(&mut client, "me").await.unwrap(), address);

    let shutdown = tokio::spawn(server.shutdown());
    wait_registered(&registry, GREETER, &[], STARTUP).await;
    // Gone from the registry, still serving for the grace, saying it leaves.
    assert_eq!(health(&address, "").await, ServingStatus::NotServing);
    assert_eq!(health(&address, GREETER).await, ServingStatus::NotServing);
    say_hello(&mut client, "late")
        .await
        .expect("served in the grace");
    let report = tokio::time::timeout(STARTUP, shutdown)
        .await
        .expect("shutdown finishes")
        .unwrap();
    assert!(
        report.deregistered && report.in_flight_finished,
        "{report:?}"
    );
    assert_eq!(*lease.borrow(), LeaseState::Stopped);
}

#[tokio::test]
async fn settings_the_registry_would_refuse_stop_the_server_before_it_starts() {
    let greeter = || {
        GreeterServer::new(Greeting {
            from: String::new(),
        })
    };
    let cases = [
        (
            Server::builder().registry("127.0.0.1:50050"),
            "no service name",
        ),
        (
            Server::builder()
                .registry("127.0.0.1:50050")
                .service_name("a..b")
                .add_service(greeter()),
            "service",
        ),
        (
            Server::builder().registry("nope").add_service(greeter()),
            "registry address",
        ),
        (
            Server::builder()
                .add_service(greeter())
                .ttl(Duration::from_millis(10)),
            "lease TTL",
        ),
        (
            Server::builder()
                .add_service(greeter())
                .metadata("", "empty key"),
            "metadata",
        ),
    ];
    for (builder, expected) in cases {
        let listener = registration::bind(socket(0)).await.expect("bind");
        let error = builder.serve(listener).await.expect_err(expected);
        let message = error.to_string();
        assert!(
            message.starts_with(expected) && !message.contains('\n'),
            "{message}"
        );
    }
    let wildcard = registration::bind("0.0.0.0:0".parse().unwrap())
        .await
        .expect("bind");
    assert!(matches!(
        Server::builder().serve(wildcard).await,
        Err(RegistrationError::WildcardWithoutAdvertise(_))
    ));
    let taken = registration::bind(socket(0)).await.expect("bind");
    assert!(matches!(
        registration::bind(taken.local_addr().unwrap()).await,
        Err(RegistrationError::PortInUse { .. })
    ));
}
