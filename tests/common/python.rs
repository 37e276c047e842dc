//! Python with a pinned grpcio, for the tests that talk to stock gRPC
//! (`interop.rs`, `xds.rs`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The grpcio version the tests pin (with grpcio-tools 1.85.1).
pub const GRPCIO: &str = "1.85.3";

/// The PYTHONPATH under which `python3` imports grpcio and grpc_tools,
/// installing them under the target directory if needed; `None` without
/// python3 at all.
pub fn python_with_grpcio() -> Option<PathBuf> {
    let imports = |path: &PathBuf| {
        Command::new("python3")
            .args([
                "-c",
                &format!("import grpc, grpc_tools, sys; sys.exit(grpc.__version__ != '{GRPCIO}')"),
            ])
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
            "--upgrade",
            "--target",
        ])
        .arg(&local)
        .arg(format!("grpcio=={GRPCIO}"))
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
