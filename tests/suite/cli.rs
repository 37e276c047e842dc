//! Every binary's command line: bad flags, bad values and bad certificate
//! files stop it before it serves anything, with exit status 1 and one line,
//! `error: ...`, that says what is wrong.

use std::path::PathBuf;

use crate::common::cases::{self, case, Case};
use crate::common::*;

/// A binary and its arguments, which it must refuse at startup.
type CommandLine = (&'static str, Vec<String>);

/// Where this run's certificates are written (they are made fresh by a
/// throwaway CA, see `crate::common::pki`).
fn pki_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    crate::common::pki::write_files(&dir);
    // Service configs for the client's --service-config cases.
    for (name, text) in [
        ("syntax.json", "{\"methodConfig\": ["),
        (
            "codes.json",
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 3,
                "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "SOMETIMES"]}}]}"#,
        ),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// Every refused command line: the binary, its arguments, and a fragment
/// of its `error:` line. Servers get a `--listen` port of their own, so
/// none could clash with another case or test if it did start.
fn command_lines(pki: &std::path::Path) -> Vec<Case<CommandLine, &'static str>> {
    // `name.crt`/`name.key` become paths into the PKI (`missing.crt` is
    // never written); anything else is passed as it is.
    let args = |items: &[&str]| -> Vec<String> {
        items
            .iter()
            .map(|item| match *item {
                file if [".crt", ".key", ".json"].iter().any(|e| file.ends_with(e)) => {
                    pki.join(file).to_string_lossy().into_owned()
                }
                other => other.to_owned(),
            })
            .collect()
    };
    let listening = |items: &[&str]| {
        let mut all = args(items);
        all.extend(["--listen".into(), local(free_port().expect("free port"))]);
        all
    };
    let port = || free_port().expect("free port").to_string();
    vec![
        // Flags every binary parses.
        case(
            "registry: unknown flag",
            ("registry", listening(&["--bogus"])),
            "unexpected argument '--bogus'",
        ),
        case(
            "registry: --max-message-bytes not a number",
            ("registry", listening(&["--max-message-bytes", "lots"])),
            "invalid value 'lots' for '--max-message-bytes",
        ),
        case(
            "client: unknown flag",
            ("client", args(&["--bogus"])),
            "unexpected argument '--bogus'",
        ),
        case(
            "client: --service-config not JSON",
            ("client", args(&["--service-config", "syntax.json"])),
            "service config: line 1 column 18: not valid JSON: EOF while parsing a list",
        ),
        case(
            "client: --service-config with an unknown status code",
            ("client", args(&["--service-config", "codes.json"])),
            "methodConfig[0].retryPolicy.retryableStatusCodes[1]: \"SOMETIMES\" is not a gRPC status code",
        ),
        case(
            "client: --service-config missing",
            ("client", args(&["--service-config", "missing.json"])),
            "missing.json: No such file",
        ),
        case(
            "demo: unknown flag",
            ("demo", args(&["--bogus"])),
            "see switchboard demo --help",
        ),
        case(
            "demo: --ha with --scenario",
            ("demo", args(&["--ha", "--scenario", "gray"])),
            "cannot be used with '--scenario",
        ),
        // The default build has no etcd store: `--ha` says what it needs
        // before it starts anything.
        #[cfg(not(feature = "etcd"))]
        case(
            "demo: --ha without the etcd feature",
            ("demo", args(&["--ha"])),
            "demo --ha: it needs a build with `--features etcd`",
        ),
        case(
            "echo: --listen not IP:PORT",
            ("echo", args(&["--listen", "nonsense"])),
            "invalid --listen \"nonsense\"",
        ),
        case(
            "echo: --listen port 99999",
            ("echo", args(&["--listen", "127.0.0.1:99999"])),
            "invalid --listen \"127.0.0.1:99999\"",
        ),
        case(
            "echo: --advertise with a space",
            ("echo", listening(&["--advertise", "bad host:1"])),
            "--advertise: invalid address",
        ),
        case(
            "echo: --advertise port 0",
            ("echo", listening(&["--advertise", "h:0"])),
            "has port 0",
        ),
        case(
            "echo: one --advertise for two ports",
            ("echo", args(&[&port(), &port(), "--advertise", "h:1"])),
            "1 --advertise for 2 servers",
        ),
        case(
            "echo: --meta without =",
            ("echo", listening(&["--meta", "novalue"])),
            "invalid --meta \"novalue\"",
        ),
        case(
            "echo: --meta with an empty key",
            ("echo", listening(&["--meta", "=v"])),
            "the key is empty",
        ),
        case(
            "echo: --ttl-ms 10",
            ("echo", listening(&["--ttl-ms", "10"])),
            "invalid ttl_ms",
        ),
        case(
            "echo: --ttl-ms not a number",
            ("echo", listening(&["--ttl-ms", "abc"])),
            "invalid value 'abc' for '--ttl-ms",
        ),
        case(
            "echo: --service with spaces",
            ("echo", listening(&["--service", "not a service"])),
            "--service: invalid service",
        ),
        case(
            "echo: --registry without a port",
            ("echo", listening(&["--registry", "127.0.0.1"])),
            "--registry: invalid address",
        ),
        case(
            "echo: unknown flag",
            ("echo", listening(&["--bogus"])),
            "unexpected argument '--bogus'",
        ),
        case(
            "echo: ports and --listen together",
            ("echo", listening(&[&port()])),
            "cannot be used with '--listen",
        ),
        // TLS flags and files.
        case(
            "registry: missing certificate file",
            (
                "registry",
                listening(&["--tls-cert", "missing.crt", "--tls-key", "server.key"]),
            ),
            "cannot read the server certificate file",
        ),
        case(
            "registry: a key that is not the certificate's",
            (
                "registry",
                listening(&["--tls-cert", "server.crt", "--tls-key", "client.key"]),
            ),
            "does not fit the certificate",
        ),
        case(
            "registry: --tls-key alone",
            ("registry", listening(&["--tls-key", "server.key"])),
            "--tls-key needs --tls-cert",
        ),
        case(
            "registry: a client CA file that is not PEM",
            (
                "registry",
                listening(&[
                    "--tls-cert",
                    "server.crt",
                    "--tls-key",
                    "server.key",
                    "--tls-client-ca",
                    "garbage.crt",
                ]),
            ),
            "holds no certificate",
        ),
        case(
            "echo: a certificate file that is not PEM",
            (
                "echo",
                listening(&["--tls-cert", "garbage.crt", "--tls-key", "server.key"]),
            ),
            "holds no certificate",
        ),
        case(
            "echo: a certificate given as the key",
            (
                "echo",
                listening(&["--tls-cert", "server.crt", "--tls-key", "server.crt"]),
            ),
            "holds no private key",
        ),
        case(
            "echo: --registry-cert without --registry-key",
            (
                "echo",
                listening(&["--registry-cert", "client.crt", "--registry-ca", "ca.crt"]),
            ),
            "--registry-cert needs --registry-key",
        ),
        case(
            "echo: missing registry CA file",
            ("echo", listening(&["--registry-ca", "missing.crt"])),
            "cannot read the CA file",
        ),
        case(
            "client: missing CA file",
            ("client", args(&["--ca", "missing.crt"])),
            "cannot read the CA file",
        ),
        case(
            "client: --cert without --ca",
            (
                "client",
                args(&["--cert", "client.crt", "--key", "client.key"]),
            ),
            "--cert needs --ca",
        ),
        case(
            "client: --tls-server-name not a name",
            (
                "client",
                args(&["--ca", "ca.crt", "--tls-server-name", "not a name"]),
            ),
            "invalid TLS server name",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_lines_stop_every_binary_with_one_error_line() {
    let pki = pki_dir();
    cases::together(command_lines(&pki), |line| async move {
        let (bin_name, args) = line.input;
        refused_at_startup(bin_name, &args, line.expected).await;
    })
    .await;
    let _ = std::fs::remove_dir_all(&pki);
}
