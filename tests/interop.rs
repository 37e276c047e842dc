//! Wire compatibility: a Python grpcio client, with stubs generated from
//! `proto/echo.proto`, calls all four RPC shapes of a real echo process.
//! When grpcio is missing the test installs it (pinned) under the target
//! directory, so nothing outside the checkout changes.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_every_rpc_shape() {
    let Some(python_path) = python_with_grpcio() else {
        eprintln!("python3 not found: skipping the grpcio interop test");
        return;
    };
    let port = free_port();
    let _echo = start_echo(&local(free_port()), SERVICE, &[port], &[]).await;
    let address = local(port);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/echo_client.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &address])
        .env("PYTHONPATH", &python_path)
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from = format!("(from {address})");
    let expected = [
        format!("unary: py {from}"),
        format!("server-streaming: py {from}"),
        format!("server-streaming: py {from}"),
        format!("server-streaming: py {from}"),
        format!("client-streaming: a, b, c {from}"),
        format!("bidi: x {from}"),
        format!("bidi: y {from}"),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "python client output:\n{stdout}");
}

/// The PYTHONPATH under which `python3` imports grpcio and grpc_tools,
/// installing them under the target directory if needed; `None` without
/// python3 at all.
fn python_with_grpcio() -> Option<PathBuf> {
    let imports = |path: &PathBuf| {
        Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .env("PYTHONPATH", path)
            .status()
    };
    let local = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
    match imports(&local) {
        Err(_) => return None,
        Ok(status) if status.success() => return Some(local),
        Ok(_) => {}
    }
    let install = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&local)
        .arg("grpcio-tools==1.85.1")
        .output()
        .expect("run pip");
    assert!(
        install.status.success(),
        "installing grpcio-tools under {} failed:\n{}",
        local.display(),
        String::from_utf8_lossy(&install.stderr)
    );
    Some(local)
}
