//! A throwaway single-member etcd for the HA demo, the tests and the
//! benchmarks: `etcd` from PATH (or `$SWITCHBOARD_ETCD`) on free loopback
//! ports with a data directory of its own, stopped by its pid and the
//! directory removed when dropped. Production runs point the registry at
//! their own etcd cluster instead.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

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

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
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
        let mut etcd = Self {
            binary,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            metrics_port: free_port()?,
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
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL) and reaps it; its data stays for [`resume`](Self::resume).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (after
    /// [`kill`](Self::kill)), and waits until it answers.
    pub async fn resume(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log"))
            .map_err(|e| format!("cannot create etcd's log: {e}"))?;
        let child = Command::new(&self.binary)
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
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.binary))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
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
