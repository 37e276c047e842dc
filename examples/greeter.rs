//! grpc's helloworld Greeter as a switchboard backend: it registers itself,
//! stays registered through registry outages, and drains on SIGTERM or
//! SIGINT without failing an RPC. The switchboard part is the ten lines of
//! `main` from `bind` to `shutdown`; the rest is an ordinary tonic service.
//!
//! ```text
//! cargo run --release -- registry &
//! cargo run --release --example greeter -- --listen 127.0.0.1:50061 &
//! cargo run --release --example greeter -- --listen 127.0.0.1:50062 &
//! ```
//!
//! Clients then use the target `registry://127.0.0.1:50050/helloworld.Greeter`.

use std::net::SocketAddr;

use clap::Parser;
use switchboard::process;
use switchboard::proto::helloworld::greeter_server::{Greeter, GreeterServer};
use switchboard::proto::helloworld::{HelloReply, HelloRequest};
use switchboard::registration::{self, RegistrationError, Server};
use tonic::{Request, Response, Status};

/// greeter: a helloworld.Greeter backend that registers itself with the
/// switchboard registry and drains on SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The IP:PORT to listen on (port 0 picks a free one).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// The HOST:PORT to register, when clients reach the server at another
    /// address than it listens on [default: the listener's address].
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// The registry's HOST:PORT, or several replicas' as HOST:PORT,HOST:PORT
    /// (a broken stream moves to the next one, keeping the lease).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]", default_value = switchboard::registry::DEFAULT_LISTEN)]
    registry: String,
    /// The service to register under.
    #[arg(long, default_value = "helloworld.Greeter")]
    service: String,
    /// Who to greet when a request names no one.
    #[arg(long, default_value = "world")]
    name: String,
}

/// The Greeter service: replies `"Hello <name> (from <addr>)"`, so a client
/// can tell which backend its balancer picked.
struct Greeting {
    /// The advertised address, named in every reply.
    from: String,
    /// Who to greet when the request names no one.
    fallback_name: String,
}

#[tonic::async_trait]
impl Greeter for Greeting {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        let name = if name.is_empty() {
            &self.fallback_name
        } else {
            &name
        };
        Ok(Response::new(HelloReply {
            message: format!("Hello {name} (from {})", self.from),
        }))
    }
}

#[tokio::main]
async fn main() {
    let args: Args = process::parse_args();
    process::init_tracing();
    if let Err(error) = run(args).await {
        process::exit_with(&error.to_string());
    }
}

async fn run(args: Args) -> Result<(), RegistrationError> {
    let listener = registration::bind(args.listen).await?;
    let local = listener
        .local_addr()
        .map_err(RegistrationError::LocalAddr)?;
    let from = registration::advertised(args.advertise.as_deref(), local)?;
    let mut builder = Server::builder()
        .registry(args.registry)
        .service_name(args.service)
        .add_service(GreeterServer::new(Greeting {
            from: from.clone(),
            fallback_name: args.name,
        }));
    if let Some(advertise) = args.advertise {
        builder = builder.advertise(advertise);
    }
    let server = builder.serve(listener).await?;
    println!("greeter serving on {}", server.address());

    process::shutdown_signal().await;
    tokio::select! {
        report = server.shutdown() => {
            tracing::info!(deregistered = report.deregistered, in_flight_finished = report.in_flight_finished, "greeter stopped");
        }
        _ = process::shutdown_signal() => {
            process::exit_with("second shutdown signal: stopped without finishing the drain")
        }
    }
    Ok(())
}
