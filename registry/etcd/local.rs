//! A throwaway single-member etcd for the HA demo, the tests and the
//! benchmarks: `etcd` from PATH (or `$SWITCHBOARD_ETCD`) on free loopback
//! ports with a data directory of its own, stopped by its pid and the
//! directory removed when dropped. Production runs point the registry at
//! their own etcd cluster instead.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::process::{free_port, Child, Stream};

/// How long a fresh or restarted etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One local etcd process.
#[derive(Debug)]
pub struct LocalEtcd {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

/// The `etcd` binary to run, if there is one: `$SWITCHBOARD_ETCD`, else
/// `etcd` on PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHBOARD_ETCD") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

impl LocalEtcd {
    /// Starts etcd and waits until it answers. `Err` says why (no binary, a
    /// failed start).
    pub async fn start() -> Result<Self, String> {
        let binary = etcd_binary().ok_or("no `etcd` on PATH (apt-get install etcd-server)")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchboard-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        let port = || free_port().map_err(|e| format!("cannot find a free port: {e}"));
        let mut etcd = Self {
            binary,
            dir,
            client_port: port()?,
            peer_port: port()?,
            metrics_port: port()?,
            child: None,
        };
        etcd.resume().await?;
        Ok(etcd)
    }

    /// The client URL, for `--etcd-endpoints`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Where etcd serves its Prometheus metrics.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::pid)
    }

    /// Kills etcd (SIGKILL) and reaps it; its data stays for [`resume`](Self::resume).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts etcd again on the same ports and data directory (after
    /// [`kill`](Self::kill)), and waits until it answers.
    pub async fn resume(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .arg("--name=switchboard")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=switchboard={peer}"))
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ));
        // etcd logs to stderr, a lot over a long run: to a file in its
        // directory, read only when it fails to start.
        let logs = Stream::LogIn(self.dir.clone());
        let child = Child::spawn_with("etcd", command, Stream::Discard, logs)
            .map_err(|e| format!("cannot start {:?}: {e}", self.binary))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(mut child) = self.child.take_if(|c| !c.is_running()) {
                // Its log is complete once the copy reaches the end.
                let status = child.wait_exit(READY_TIMEOUT).await;
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                let log = child.log_file().map(std::fs::read_to_string);
                let log = log.and_then(Result::ok).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!("etcd exited ({status}): {}", tail.join(" | ")));
            }
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500));
            if let Ok(mut client) = etcd_client::Client::connect([self.url()], Some(options)).await
            {
                if client.status().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("etcd did not answer within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
