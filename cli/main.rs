//! The `switchboard` command: every process of the system and the
//! operator's tools, as subcommands of one binary (so `cargo install`
//! puts one unambiguous name on the PATH).

mod client;
mod demo;
mod echo;
mod flags;
mod operator;
mod registry;

use clap::{Parser, Subcommand};
use switchboard::process;

/// switchboard: live service discovery and client-side load balancing for
/// gRPC.
#[derive(Parser, Debug)]
#[command(name = "switchboard", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What to run.
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the registry: leased endpoint registrations and live watches.
    Registry(registry::Args),
    /// Run echo backends that register themselves and drain on shutdown.
    Echo(echo::Args),
    /// Call the echo service through a balanced channel.
    Client(client::Args),
    /// Run the failover scenario end to end with real processes.
    Demo(demo::Args),
    /// List the services a registry holds.
    Services(operator::ServicesArgs),
    /// List one service's endpoints: state, metadata, lease age and TTL.
    Endpoints(operator::ServiceArgs),
    /// Print one line per change of a service's endpoints.
    Watch(operator::ServiceArgs),
    /// Mark one endpoint DRAINING by address.
    Drain(operator::EndpointArgs),
    /// Remove one endpoint by address.
    Deregister(operator::EndpointArgs),
    /// Set, print or remove a service's service config (its traffic policy).
    Config(operator::ConfigArgs),
    /// List who follows a registry replica: its Watch and xDS streams, what
    /// each was sent and accepted, and the last NACK.
    Clients(operator::ClientsArgs),
}

#[tokio::main]
async fn main() {
    let cli: Cli = process::parse_args();
    match cli.command {
        Command::Registry(args) => registry::run(args).await,
        Command::Echo(args) => echo::run(args).await,
        Command::Client(args) => client::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Services(args) => operator::services(args).await,
        Command::Endpoints(args) => operator::endpoints(args).await,
        Command::Watch(args) => operator::watch(args).await,
        Command::Drain(args) => operator::drain(args).await,
        Command::Deregister(args) => operator::deregister(args).await,
        Command::Config(args) => operator::config(args).await,
        Command::Clients(args) => operator::clients(args).await,
    }
}
