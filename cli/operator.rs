//! The operator's subcommands: `services`, `endpoints`, `watch`, `drain`,
//! `deregister`, `config` and `clients`. Each talks to a live registry, prints a table (or one
//! JSON document, or one JSON line per change, with `-o json`), and turns
//! every failure into one `error:` line and exit status 1.

use std::path::PathBuf;
use std::time::Duration;

use crate::flags::ClientTlsFlags;
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::client::transport;
use switchboard::discovery::{Endpoint, Update, Versioned};
use switchboard::process;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::proto::registry::{
    DeleteServiceConfigRequest, DeregisterEndpointRequest, DrainEndpointRequest,
    GetServiceConfigRequest, ListClientsRequest, ListEndpointsRequest, ListServicesRequest,
    SetServiceConfigRequest, WatchRequest,
};
use switchboard::registry::auth::{Bearer, Token};
use switchboard::registry::fleet::stream_json;
use switchboard::registry::validate;
use switchboard::service_config::ServiceConfig;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long connecting to one registry address may take before the next
/// one in `--registry` is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one operator RPC may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (`watch`: one object per line).
    Json,
}

/// Where the registry is and how to reach it: shared by every operator
/// subcommand.
#[derive(clap::Args, Debug)]
pub struct Connection {
    /// The registry's HOST:PORT; a comma-separated list is tried in order
    /// and the first reachable one is used.
    #[arg(
        long,
        value_name = "HOST:PORT[,...]",
        default_value = "127.0.0.1:50050"
    )]
    registry: String,
    /// File whose first line is the registry token (the read token, or the
    /// write token for drain and deregister).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientTlsFlags,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `switchboard services`: lists the services a registry holds.
#[derive(clap::Parser, Debug)]
pub struct ServicesArgs {
    #[command(flatten)]
    connection: Connection,
}

/// `switchboard endpoints|watch <service>`.
#[derive(clap::Parser, Debug)]
pub struct ServiceArgs {
    /// The service, e.g. lb.example.grpc.io.
    service: String,
    #[command(flatten)]
    connection: Connection,
}

/// `switchboard clients [<service>]`.
#[derive(clap::Parser, Debug)]
pub struct ClientsArgs {
    /// Only the streams following this service.
    service: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

/// `switchboard drain|deregister <service> <address>`.
#[derive(clap::Parser, Debug)]
pub struct EndpointArgs {
    /// The service, e.g. lb.example.grpc.io.
    service: String,
    /// The endpoint's HOST:PORT as registered.
    address: String,
    #[command(flatten)]
    connection: Connection,
}

/// A registry client presenting the token, if any.
type Client = RegistryClient<InterceptedService<Channel, Bearer>>;

impl Connection {
    /// Checks every flag, then connects to the first reachable registry.
    async fn connect(&self) -> Result<(Client, String), String> {
        let addresses: Vec<&str> = self.registry.split(',').map(str::trim).collect();
        for address in &addresses {
            validate::address(address).map_err(|e| format!("--registry {address:?}: {e}"))?;
        }
        let token = self
            .token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let tls = self.tls.load()?;
        let mut failures = Vec::new();
        for address in addresses {
            match transport::channel(address, tls.as_ref(), CONNECT_TIMEOUT).await {
                Ok(channel) => {
                    let client = RegistryClient::with_interceptor(channel, Bearer(token));
                    return Ok((client, address.to_owned()));
                }
                Err(error) => failures.push(format!("{address}: {error}")),
            }
        }
        Err(format!(
            "no registry reachable ({}); check --registry",
            failures.join("; ")
        ))
    }
}

/// A request bounded by [`CALL_TIMEOUT`].
fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// One line for a refused or failed call.
fn refused(registry: &str, status: &tonic::Status) -> String {
    let hint = match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            "; pass the right --token-file"
        }
        _ => "",
    };
    format!(
        "registry {registry}: {:?}: {}{hint}",
        status.code(),
        status.message().replace('\n', " ")
    )
}

/// Checks a service argument before anything connects.
fn check_service(service: &str) -> Result<(), String> {
    validate::service_name(service).map_err(|e| format!("service {service:?}: {e}"))
}

/// Runs `body`, exiting with one `error:` line if it fails.
async fn or_exit(body: impl std::future::Future<Output = Result<(), String>>) {
    if let Err(error) = body.await {
        process::exit_with(&error);
    }
}

/// `switchboard services`.
pub async fn services(args: ServicesArgs) {
    or_exit(async {
        let (mut client, registry) = args.connection.connect().await?;
        let services = client
            .list_services(timed(ListServicesRequest {}))
            .await
            .map_err(|s| refused(&registry, &s))?
            .into_inner()
            .services;
        match args.connection.output {
            Output::Json => {
                let list: Vec<Value> = services
                    .iter()
                    .map(|s| json!({"service": s.service, "endpoints": s.endpoints}))
                    .collect();
                println!("{}", json!({ "services": list }));
            }
            Output::Table => {
                let rows = services
                    .iter()
                    .map(|s| vec![s.service.clone(), s.endpoints.to_string()])
                    .collect();
                print_table(&["SERVICE", "ENDPOINTS"], rows);
            }
        }
        Ok(())
    })
    .await
}

/// `switchboard clients [<service>]`: who follows the registry replica,
/// one row per stream and type (sent, ACKed, NACKs, the last NACK).
pub async fn clients(args: ClientsArgs) {
    or_exit(async {
        if let Some(service) = &args.service {
            check_service(service)?;
        }
        let (mut client, registry) = args.connection.connect().await?;
        let streams = client
            .list_clients(timed(ListClientsRequest {
                service: args.service.clone().unwrap_or_default(),
            }))
            .await
            .map_err(|s| refused(&registry, &s))?
            .into_inner()
            .streams;
        match args.connection.output {
            Output::Json => {
                let list: Vec<Value> = streams.iter().map(stream_json).collect();
                println!("{}", json!({ "registry": registry, "clients": list }));
            }
            Output::Table => {
                let dash = |s: &str| match s.is_empty() {
                    true => "-".to_owned(),
                    false => s.to_owned(),
                };
                let mut rows = Vec::new();
                for stream in &streams {
                    let services = dash(&stream.services.join(","));
                    let first = |name: &str| {
                        vec![
                            stream.id.to_string(),
                            stream.kind.clone(),
                            dash(&stream.peer),
                            dash(&stream.node),
                            services.clone(),
                            name.to_owned(),
                        ]
                    };
                    if stream.types.is_empty() {
                        let mut row = first("-");
                        row.extend(["-", "-", "0", "-"].map(String::from));
                        rows.push(row);
                    }
                    for t in &stream.types {
                        let mut row = first(&t.r#type);
                        let nack = match t.nacks {
                            0 => "-".to_owned(),
                            _ => format!("{}: {}", dash(&t.nack_version), t.nack_detail),
                        };
                        row.extend([dash(&t.sent), dash(&t.acked), t.nacks.to_string(), nack]);
                        rows.push(row);
                    }
                }
                print_table(
                    &[
                        "ID",
                        "KIND",
                        "PEER",
                        "NODE",
                        "SERVICES",
                        "TYPE",
                        "SENT",
                        "ACKED",
                        "NACKS",
                        "LAST NACK",
                    ],
                    rows,
                );
            }
        }
        Ok(())
    })
    .await
}

/// `switchboard endpoints <service>`.
pub async fn endpoints(args: ServiceArgs) {
    or_exit(async {
        check_service(&args.service)?;
        let (mut client, registry) = args.connection.connect().await?;
        let reply = client
            .list_endpoints(timed(ListEndpointsRequest {
                service: args.service.clone(),
            }))
            .await
            .map_err(|s| refused(&registry, &s))?
            .into_inner();
        let rows: Vec<(Endpoint, u64, u64)> = reply
            .endpoints
            .into_iter()
            .filter_map(|leased| {
                let endpoint = Endpoint::from(leased.endpoint?);
                Some((endpoint, leased.lease_age_ms, leased.ttl_ms))
            })
            .collect();
        match args.connection.output {
            Output::Json => {
                let list: Vec<Value> = rows
                    .iter()
                    .map(|(endpoint, age, ttl)| {
                        let mut value = endpoint_json(endpoint);
                        value["lease_age_ms"] = json!(age);
                        value["ttl_ms"] = json!(ttl);
                        value
                    })
                    .collect();
                println!(
                    "{}",
                    json!({
                        "service": args.service,
                        "epoch": reply.epoch,
                        "version": reply.version,
                        "endpoints": list,
                    })
                );
            }
            Output::Table => {
                let rows = rows
                    .iter()
                    .map(|(endpoint, age, ttl)| {
                        vec![
                            endpoint.address.clone(),
                            endpoint.state.to_string(),
                            endpoint
                                .metadata
                                .get(switchboard::client::zone_aware::ZONE_KEY)
                                .cloned()
                                .unwrap_or_else(|| "-".into()),
                            seconds(*age),
                            seconds(*ttl),
                            metadata_text(endpoint),
                        ]
                    })
                    .collect();
                print_table(
                    &["ADDRESS", "STATE", "ZONE", "LEASE AGE", "TTL", "METADATA"],
                    rows,
                );
            }
        }
        Ok(())
    })
    .await
}

/// `switchboard watch <service>`: runs until Ctrl-C; a broken stream is an
/// error.
pub async fn watch(args: ServiceArgs) {
    or_exit(async {
        check_service(&args.service)?;
        let (mut client, registry) = args.connection.connect().await?;
        let mut stream = client
            .watch(WatchRequest {
                service: args.service.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| refused(&registry, &s))?
            .into_inner();
        let shutdown = process::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                _ = &mut shutdown => return Ok(()),
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(status)) => return Err(refused(&registry, &status)),
                None => return Err(format!("registry {registry} ended the watch")),
            };
            let Ok(versioned) = Versioned::try_from(message) else {
                continue;
            };
            match args.connection.output {
                Output::Json => println!("{}", change_json(&versioned)),
                Output::Table => println!("{}", change_line(&versioned)),
            }
        }
    })
    .await
}

/// `switchboard drain <service> <address>`.
pub async fn drain(args: EndpointArgs) {
    or_exit(async {
        check_endpoint(&args)?;
        let (mut client, registry) = args.connection.connect().await?;
        client
            .drain_endpoint(timed(DrainEndpointRequest {
                service: args.service.clone(),
                address: args.address.clone(),
            }))
            .await
            .map_err(|s| refused(&registry, &s))?;
        report(&args, "drained", "DRAINING");
        Ok(())
    })
    .await
}

/// `switchboard deregister <service> <address>`.
pub async fn deregister(args: EndpointArgs) {
    or_exit(async {
        check_endpoint(&args)?;
        let (mut client, registry) = args.connection.connect().await?;
        client
            .deregister_endpoint(timed(DeregisterEndpointRequest {
                service: args.service.clone(),
                address: args.address.clone(),
            }))
            .await
            .map_err(|s| refused(&registry, &s))?;
        report(&args, "deregistered", "REMOVED");
        Ok(())
    })
    .await
}

fn check_endpoint(args: &EndpointArgs) -> Result<(), String> {
    check_service(&args.service)?;
    validate::address(&args.address).map_err(|e| format!("address {:?}: {e}", args.address))
}

/// What drain and deregister print on success.
fn report(args: &EndpointArgs, verb: &str, state: &str) {
    match args.connection.output {
        Output::Json => println!(
            "{}",
            json!({"service": args.service, "address": args.address, "state": state})
        ),
        Output::Table => println!("{verb} {} from {}", args.address, args.service),
    }
}

/// An endpoint as JSON; metadata keys sorted for stable output.
fn endpoint_json(endpoint: &Endpoint) -> Value {
    let metadata: std::collections::BTreeMap<_, _> = endpoint.metadata.iter().collect();
    json!({
        "address": endpoint.address,
        "state": endpoint.state.to_string(),
        "metadata": metadata,
    })
}

/// `k=v,k=v`, sorted; `-` when empty.
fn metadata_text(endpoint: &Endpoint) -> String {
    let mut pairs: Vec<String> = endpoint
        .metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if pairs.is_empty() {
        return "-".into();
    }
    pairs.sort();
    pairs.join(",")
}

/// Milliseconds as seconds with one decimal, e.g. `12.3s`.
fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// One line per watch message: its version, then what changed.
fn change_line(versioned: &Versioned) -> String {
    let show = |e: &Endpoint| format!("{}({})", e.address, e.state);
    let head = format!("epoch={} version={}", versioned.epoch, versioned.version);
    match &versioned.update {
        Update::Reset(endpoints) => {
            let all: Vec<String> = endpoints.iter().map(show).collect();
            format!("{head} reset [{}]", all.join(" "))
        }
        Update::Delta(delta) => {
            let mut parts = Vec::new();
            parts.extend(delta.added.iter().map(|e| format!("+{}", show(e))));
            parts.extend(delta.updated.iter().map(|e| format!("~{}", show(e))));
            parts.extend(delta.removed.iter().map(|a| format!("-{a}")));
            format!("{head} {}", parts.join(" "))
        }
    }
}

/// One JSON object per watch message.
fn change_json(versioned: &Versioned) -> Value {
    let list = |endpoints: &[Endpoint]| endpoints.iter().map(endpoint_json).collect::<Vec<_>>();
    match &versioned.update {
        Update::Reset(endpoints) => json!({
            "epoch": versioned.epoch,
            "version": versioned.version,
            "reset": list(endpoints),
        }),
        Update::Delta(delta) => json!({
            "epoch": versioned.epoch,
            "version": versioned.version,
            "added": list(&delta.added),
            "updated": list(&delta.updated),
            "removed": delta.removed,
        }),
    }
}

/// Prints rows under headers, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `switchboard config set|get|delete`: a service's traffic policy.
#[derive(clap::Parser, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

/// What `switchboard config` does.
#[derive(clap::Subcommand, Debug)]
enum ConfigAction {
    /// Set a service's gRPC service config from a JSON file (needs the
    /// write token).
    Set {
        /// The service, e.g. lb.example.grpc.io.
        service: String,
        /// The JSON service config.
        file: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a service's service config.
    Get {
        /// The service, e.g. lb.example.grpc.io.
        service: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove a service's service config (needs the write token).
    Delete {
        /// The service, e.g. lb.example.grpc.io.
        service: String,
        #[command(flatten)]
        connection: Connection,
    },
}

/// `switchboard config ...`.
pub async fn config(args: ConfigArgs) {
    or_exit(async {
        match args.action {
            ConfigAction::Set {
                service,
                file,
                connection,
            } => {
                check_service(&service)?;
                let json = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                // Checked here first, so a bad file never reaches the wire.
                ServiceConfig::from_json(&json).map_err(|e| format!("{}: {e}", file.display()))?;
                let (mut client, registry) = connection.connect().await?;
                let reply = client
                    .set_service_config(timed(SetServiceConfigRequest {
                        service: service.clone(),
                        json,
                    }))
                    .await
                    .map_err(|s| refused(&registry, &s))?
                    .into_inner();
                match connection.output {
                    Output::Json => {
                        println!("{}", json!({"service": service, "version": reply.version}))
                    }
                    Output::Table => println!(
                        "set the service config of {service} (version {})",
                        reply.version
                    ),
                }
            }
            ConfigAction::Get {
                service,
                connection,
            } => {
                check_service(&service)?;
                let (mut client, registry) = connection.connect().await?;
                let reply = client
                    .get_service_config(timed(GetServiceConfigRequest {
                        service: service.clone(),
                    }))
                    .await
                    .map_err(|s| refused(&registry, &s))?
                    .into_inner();
                let config: Value = serde_json::from_str(&reply.json)
                    .map_err(|e| format!("{registry} sent a config that is not JSON: {e}"))?;
                match connection.output {
                    Output::Json => println!(
                        "{}",
                        json!({"service": service, "version": reply.version, "config": config})
                    ),
                    Output::Table => println!(
                        "{}",
                        serde_json::to_string_pretty(&config).unwrap_or(reply.json)
                    ),
                }
            }
            ConfigAction::Delete {
                service,
                connection,
            } => {
                check_service(&service)?;
                let (mut client, registry) = connection.connect().await?;
                client
                    .delete_service_config(timed(DeleteServiceConfigRequest {
                        service: service.clone(),
                    }))
                    .await
                    .map_err(|s| refused(&registry, &s))?;
                match connection.output {
                    Output::Json => println!("{}", json!({"service": service, "deleted": true})),
                    Output::Table => println!("deleted the service config of {service}"),
                }
            }
        }
        Ok(())
    })
    .await
}
