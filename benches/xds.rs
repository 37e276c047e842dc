//! Section 6, xDS next to Watch: N subscribers of one service, either
//! native Watch streams or ADS streams subscribed to its EDS resource (what
//! a stock gRPC xDS client holds), each kind against a fresh registry; for
//! each of a few registrations, the time from `Register` returning to each
//! subscriber holding the new endpoint.
//!
//! Subscribers run in this process on the registry's two cores, as in
//! [`fanout`](crate::fanout); an ADS subscriber also decodes the whole
//! assignment on every change (state-of-the-world) and ACKs it.

use std::collections::HashSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use switchboard::proto::registry::registry_client::RegistryClient;
use switchboard::registry::xds::resources::ENDPOINTS;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::fanout::{connect, register_and_collect, wait_opened, watcher, Seen, SERVICE};
use crate::procs::{self_cpu, Proc};
use crate::stats::{ms, Samples, Table};
use crate::BoxError;

pub struct Config {
    /// Subscriber counts; each runs once per kind.
    pub subscribers: Vec<usize>,
    /// HTTP/2 connections the subscribers share.
    pub connections: usize,
    /// Registrations timed per row.
    pub changes: usize,
}

/// How a subscriber follows the service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Watch,
    Ads,
}

/// Subscribes to the service's EDS over ADS, ACKs every response and
/// reports each address as it first appears, until aborted.
async fn ads_subscriber(channel: Channel, seen: mpsc::UnboundedSender<Seen>) {
    let (requests, outbound) = mpsc::unbounded_channel();
    let request = |version: &str, nonce: &str| DiscoveryRequest {
        version_info: version.into(),
        resource_names: vec![SERVICE.into()],
        type_url: ENDPOINTS.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let _ = requests.send(request("", ""));
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let Ok(response) = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(
            outbound,
        ))
        .await
    else {
        return;
    };
    let mut stream = response.into_inner();
    // Keyed by IP and port as decoded: like a client, this diffs every
    // assignment against the last, but formatting every address of every
    // assignment only spent the shared cores on the bench, not the registry.
    let mut known: HashSet<(String, u32)> = HashSet::new();
    let mut first = true;
    while let Ok(Some(message)) = stream.message().await {
        let now = Instant::now();
        for any in &message.resources {
            let Ok(assignment) = ClusterLoadAssignment::decode(&*any.value) else {
                continue;
            };
            for lb in assignment
                .endpoints
                .into_iter()
                .flat_map(|l| l.lb_endpoints)
            {
                let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = lb.host_identifier
                else {
                    continue;
                };
                let Some(address::Address::SocketAddress(socket)) =
                    endpoint.address.and_then(|a| a.address)
                else {
                    continue;
                };
                let Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port)) =
                    socket.port_specifier
                else {
                    continue;
                };
                let key = (socket.address, port);
                if !known.contains(&key) {
                    if !first {
                        let _ = seen.send(Seen::Added(format!("{}:{port}", key.0), now));
                    }
                    known.insert(key);
                }
            }
        }
        if first {
            first = false;
            let _ = seen.send(Seen::Snapshot);
        }
        let _ = requests.send(request(&message.version_info, &message.nonce));
    }
}

/// One subscriber count of one kind against a fresh registry; adds a row.
async fn measure(config: &Config, kind: Kind, n: usize, table: &mut Table) -> Result<(), BoxError> {
    let (registry_proc, registry) = Proc::registry();
    let mut registrar = RegistryClient::new(connect(&registry).await?);
    let mut channels = Vec::new();
    for _ in 0..config.connections {
        channels.push(connect(&registry).await?);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut subscribers = JoinSet::new();
    let opening = Instant::now();
    for i in 0..n {
        let channel = channels[i % channels.len()].clone();
        match kind {
            Kind::Watch => subscribers.spawn(watcher(RegistryClient::new(channel), tx.clone())),
            Kind::Ads => subscribers.spawn(ads_subscriber(channel, tx.clone())),
        };
    }
    drop(tx);
    wait_opened(&mut rx, n, "subscriptions", Duration::from_secs(60)).await?;
    let opened = opening.elapsed();

    let mut latency = Samples::default();
    let mut missed = 0;
    // CPU per change, beside the latency: on shared cores the latency
    // swings with the neighbours' load, the work each side does does not.
    let registry_cpu = registry_proc.cpu();
    let bench_cpu = self_cpu();
    for change in 0..config.changes {
        let address = format!("10.1.{}.{}:8080", change / 250, change % 250 + 1);
        let arrivals =
            register_and_collect(&mut registrar, &mut rx, address, n, Duration::from_secs(10))
                .await?;
        for &at in &arrivals.seen {
            latency.push(at.saturating_duration_since(arrivals.returned));
        }
        missed += n - arrivals.seen.len();
        // Lets the subscribers' ACKs settle before the next change.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_change = |cpu: Duration| cpu / config.changes.max(1) as u32;
    let registry_cpu = per_change(registry_proc.cpu().saturating_sub(registry_cpu));
    let bench_cpu = per_change(self_cpu().saturating_sub(bench_cpu));
    subscribers.abort_all();
    let rss = registry_proc.rss_kib();
    table.row(vec![
        match kind {
            Kind::Watch => "native Watch".into(),
            Kind::Ads => "xDS (ADS, EDS)".into(),
        },
        n.to_string(),
        ms(opened),
        latency.len().to_string(),
        missed.to_string(),
        ms(latency.quantile(0.5)),
        ms(latency.quantile(0.99)),
        ms(latency.max()),
        ms(registry_cpu),
        ms(bench_cpu),
        format!("{:.1} MiB", rss as f64 / 1024.0),
    ]);
    Ok(())
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 6. xDS next to Watch\n");
    let mut table = Table::new(&[
        "subscribers",
        "count",
        "all open after",
        "deliveries",
        "missed",
        "p50",
        "p99",
        "max",
        "registry CPU / change",
        "bench CPU / change",
        "registry RSS",
    ]);
    for &n in &config.subscribers {
        for kind in [Kind::Watch, Kind::Ads] {
            measure(config, kind, n, &mut table).await?;
        }
    }
    println!(
        "One service, subscribers spread over {} HTTP/2 connections, a fresh registry per row; \
         {} registrations timed per row (latency: from `Register` returning to a subscriber \
         holding the new endpoint; CPU: user + system time over the registrations and the \
         pauses after them, in which the ACKs settle, per registration).\n",
        config.connections, config.changes
    );
    table.print();
    Ok(())
}
