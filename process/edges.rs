//! What a service binary does at its edges: one-line errors for bad flags,
//! logging, the shutdown signal, and one-line fatal errors. The
//! `switchboard` binary and the greeter example both use it; any service
//! built on [`registration`](crate::registration) can.

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logs text lines to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_logging(LogFormat::Text)
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

/// Binds the `--metrics-listen` address, or exits with one line.
pub async fn bind_metrics(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let local = listener.local_addr().map_or(addr, |a| a);
            println!("metrics listening on {local}");
            listener
        }
        Err(err) => exit_with(&format!(
            "cannot listen on {addr}: {err}; pick another --metrics-listen address"
        )),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Parses the command line; a bad flag prints one `error:` line naming
/// it and exits with status 1 (clap's own errors span several lines).
/// `--help` and `--version` print as usual.
pub fn parse_args<A: clap::Parser>() -> A {
    match A::try_parse() {
        Ok(args) => args,
        Err(error) => match error.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                error.exit()
            }
            _ => exit_with(&flag_error(&error, &invoked::<A>())),
        },
    }
}

/// How the user invoked the command, for "see ... --help": the binary's
/// name and, when the first argument names a subcommand, that too.
fn invoked<A: clap::Parser>() -> String {
    let mut argv = std::env::args_os();
    let binary = argv
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| A::command().get_name().to_owned());
    let command = A::command();
    match argv.next().and_then(|a| a.into_string().ok()) {
        Some(sub) if command.find_subcommand(&sub).is_some() => format!("{binary} {sub}"),
        _ => binary,
    }
}

/// The first line of a clap error and where to read more.
pub fn flag_error(error: &clap::Error, binary: &str) -> String {
    let rendered = error.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    format!(
        "{}; see {binary} --help",
        first.strip_prefix("error: ").unwrap_or(first)
    )
}

/// Parses a duration flag: `1500ms`, `2s`, `1m` or a bare number of
/// seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 500ms, 2s or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {text:?}: use ms, s or m")),
    };
    std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Prints `error: <message>` on one line and exits with status 1.
pub fn exit_with(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
