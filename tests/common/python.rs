//! Python with a pinned grpcio, for the tests that talk to stock gRPC
//! (`interop.rs`, `xds.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The grpcio version the tests pin (with grpcio-tools 1.85.1).
pub const GRPCIO: &str = "1.85.3";

/// The PYTHONPATH under which `python3` imports grpcio and grpc_tools,
/// installing them under the target directory if needed; `None` without
/// python3 at all.
///
/// Tests run in parallel: the first caller installs, the others wait for
/// it, and the install goes to a staging directory renamed into place, so
/// no test (in this process or another) imports a half-written package.
pub fn python_with_grpcio() -> Option<PathBuf> {
    static READY: OnceLock<Option<PathBuf>> = OnceLock::new();
    READY.get_or_init(install).clone()
}

fn imports(path: &Path) -> std::io::Result<bool> {
    Command::new("python3")
        .args([
            "-c",
            &format!("import grpc, grpc_tools, sys; sys.exit(grpc.__version__ != '{GRPCIO}')"),
        ])
        .env("PYTHONPATH", path)
        .status()
        .map(|status| status.success())
}

fn install() -> Option<PathBuf> {
    let local = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
    match imports(&local) {
        Err(_) => return None,
        Ok(true) => return Some(local),
        Ok(false) => {}
    }
    let staging = local.with_file_name(format!("pydeps.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let install = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&staging)
        .arg(format!("grpcio=={GRPCIO}"))
        .arg("grpcio-tools==1.85.1")
        .output()
        .expect("run pip");
    assert!(
        install.status.success(),
        "installing grpcio-tools under {} failed:\n{}",
        staging.display(),
        String::from_utf8_lossy(&install.stderr)
    );
    // Another process may have finished first; its tree is as good as ours.
    if imports(&local).unwrap_or(false) {
        let _ = std::fs::remove_dir_all(&staging);
        return Some(local);
    }
    let _ = std::fs::remove_dir_all(&local);
    std::fs::rename(&staging, &local).expect("move the grpcio install into place");
    Some(local)
}
