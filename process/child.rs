//! One child process, watched and always cleaned up.
//!
//! A [`Child`] starts a command with stdin closed and its stdout and stderr
//! each read by a thread of its own: as lines, kept for the parent to wait
//! on and print ([`Stream::Lines`]), copied to a log file
//! ([`Stream::LogIn`]), or thrown away ([`Stream::Discard`]). Threads rather
//! than tasks, so that a child is read the same in a test's current-thread
//! runtime, a benchmark's blocking setup code and the demo; and reading
//! every pipe to its end means no child ever blocks on a full one.
//!
//! A child is stopped by its pid: [`Child::signal`] sends any signal (a
//! drain, a hang, a crash) and [`Child::kill`] SIGKILLs it and reaps it.
//! Dropping a `Child` kills it, so every way out of the parent, a panic or
//! an early `return` included, leaves no process behind. (`std::process::
//! exit` runs no destructors: drop children before calling it.)

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A free TCP port on 127.0.0.1, for a child that must be told its port
/// before it starts (etcd's ports, a backend started again on the same
/// address). The kernel picks it by binding port 0; the listener is closed
/// before this returns, so another process could take the port in between,
/// which is rare in practice.
pub fn free_port() -> io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
}

/// Where one of a child's output streams goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// Read as lines and kept: for [`Child::wait_for_line`], [`Child::lines`]
    /// and [`Child::dump`]. Lines of both streams share one list, in the
    /// order they arrived.
    Lines,
    /// Appended to `<dir>/<name>-<pid>.log` (the directory is created): for
    /// output too long to keep in memory, read after the run. The pid in
    /// the name keeps every start's log apart.
    LogIn(PathBuf),
    /// Thrown away.
    Discard,
}

/// A running child process, killed (SIGKILL) and reaped when dropped.
pub struct Child {
    /// What the parent calls it, for messages and log file names.
    name: String,
    /// Kept after the child is reaped, for messages.
    pid: u32,
    /// The child until it is reaped; `None` after. Signals go only to an
    /// unreaped child: once reaped, its pid may be another process's.
    process: Option<std::process::Child>,
    /// How it exited, once reaped.
    exit: Option<ExitStatus>,
    /// What the reader threads have read.
    output: Arc<Output>,
    /// The log file of a [`Stream::LogIn`] stream.
    log_file: Option<PathBuf>,
}

impl Child {
    /// Starts `command` as `name`, with stdout and stderr kept as lines.
    pub fn spawn(name: impl Into<String>, command: Command) -> io::Result<Self> {
        Self::spawn_with(name, command, Stream::Lines, Stream::Lines)
    }

    /// Starts `command` as `name`, with stdin closed and stdout and stderr
    /// sent where `stdout` and `stderr` say. The command's own environment,
    /// arguments and directory are used as they are.
    pub fn spawn_with(
        name: impl Into<String>,
        mut command: Command,
        stdout: Stream,
        stderr: Stream,
    ) -> io::Result<Self> {
        let piped = |stream: &Stream| match stream {
            Stream::Discard => Stdio::null(),
            Stream::Lines | Stream::LogIn(_) => Stdio::piped(),
        };
        let mut process = command
            .stdin(Stdio::null())
            .stdout(piped(&stdout))
            .stderr(piped(&stderr))
            .spawn()?;
        let pipes: [(Option<Box<dyn Read + Send>>, Stream); 2] = [
            (process.stdout.take().map(|p| Box::new(p) as _), stdout),
            (process.stderr.take().map(|p| Box::new(p) as _), stderr),
        ];
        // Owned from here on: an error below drops it, which kills it.
        let mut child = Self {
            name: name.into(),
            pid: process.id(),
            process: Some(process),
            exit: None,
            output: Arc::default(),
            log_file: None,
        };
        for (pipe, stream) in pipes {
            let Some(pipe) = pipe else { continue };
            match stream {
                Stream::Lines => child.output.read_lines(pipe),
                Stream::LogIn(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    let path = dir.join(format!("{}-{}.log", child.name, child.pid));
                    let file = OpenOptions::new().create(true).append(true).open(&path)?;
                    child.output.copy(pipe, file);
                    child.log_file = Some(path);
                }
                Stream::Discard => {}
            }
        }
        Ok(child)
    }

    /// The name it was started as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id (still known after it was reaped, for messages).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The log file of a stream sent to [`Stream::LogIn`].
    pub fn log_file(&self) -> Option<&Path> {
        self.log_file.as_deref()
    }

    /// Sends `signal` (`libc::SIGTERM`, `SIGSTOP`, ...) to the child, unless
    /// it has been reaped already: its pid may be another process's by then.
    pub fn signal(&self, signal: i32) {
        if self.process.is_some() {
            // SAFETY: kill(2) on our own child, not yet reaped (so its pid
            // is still its own, a zombie's at worst); no memory is touched.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// SIGKILLs the child and waits until it has exited (a stopped child
    /// dies of SIGKILL too). Nothing happens once it has been reaped.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            self.exit = process.wait().ok();
        }
    }

    /// Whether the child has not exited yet (it is reaped if it has).
    pub fn is_running(&mut self) -> bool {
        self.reap().is_none()
    }

    /// Waits up to `timeout` for the child to exit and returns how it
    /// exited, `None` if it still runs. Its output is complete by then: the
    /// readers are waited for (up to `timeout` again) to reach the end of
    /// the pipes, which follows the exit at once unless a process the
    /// child started holds them.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.reap() {
                break status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let deadline = Instant::now() + timeout;
        let ended = |captured: &Captured| (captured.open == 0).then_some(());
        self.output.wait_until(Some(deadline), ended).await;
        Some(status)
    }

    /// Whether some line read so far contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.output.lock().find(needle).is_some()
    }

    /// The first line that contains `needle`, waiting for it until
    /// `deadline`; `None` if none came by then, or if the output ended
    /// without one.
    pub async fn wait_for_line(&self, needle: &str, deadline: Instant) -> Option<String> {
        let found = |captured: &Captured| captured.find(needle);
        self.output.wait_until(Some(deadline), found).await
    }

    /// As [`wait_for_line`](Self::wait_for_line), blocking the thread: for
    /// a caller outside async code, or one that blocks on purpose.
    pub fn wait_for_line_blocking(
        &self,
        needle: &str,
        deadline: std::time::Instant,
    ) -> Option<String> {
        let found = |captured: &Captured| captured.find(needle);
        self.output.wait_until_blocking(deadline, found)
    }

    /// Every line read so far.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().lines.clone()
    }

    /// The lines from the first one on, each as it arrives: for a parent
    /// that follows a child's output as it runs.
    pub fn lines(&self) -> Lines {
        Lines {
            output: self.output.clone(),
            next: 0,
        }
    }

    /// Every line read so far, one per line, for a failure message.
    pub fn dump(&self) -> String {
        self.output.lock().lines.join("\n")
    }

    /// Its exit status if it has exited; reaps it then. An error from
    /// waitpid (only a parent that ignores SIGCHLD gets one) reads as
    /// still running.
    fn reap(&mut self) -> Option<ExitStatus> {
        if let Some(process) = &mut self.process {
            if let Ok(Some(status)) = process.try_wait() {
                self.process = None;
                self.exit = Some(status);
            }
        }
        self.exit
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

/// A child's lines in order, each as it arrives (from [`Child::lines`]).
/// It outlives the child: the lines read before the end stay readable.
pub struct Lines {
    /// The child's output.
    output: Arc<Output>,
    /// The index of the next line to return.
    next: usize,
}

impl Lines {
    /// The next line, waiting for it; `None` once the output has ended
    /// (the child exited, or closed its stdout and stderr).
    pub async fn next_line(&mut self) -> Option<String> {
        let next = self.next;
        let line = |captured: &Captured| captured.lines.get(next).cloned();
        let line = self.output.wait_until(None, line).await?;
        self.next += 1;
        Some(line)
    }
}

/// What a child's reader threads share with it: the lines, and a wake-up
/// for each waiter kind. A std mutex: nothing awaits while holding it, and
/// a reader holds it only to push a line.
#[derive(Default)]
struct Output {
    captured: Mutex<Captured>,
    /// Wakes [`Child::wait_for_line_blocking`].
    grew_blocking: Condvar,
    /// Wakes the async waiters.
    grew: Notify,
}

/// The lines read so far, and how many streams are still being read.
#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    /// Readers that have not reached the end of their pipe.
    open: usize,
}

impl Captured {
    fn find(&self, needle: &str) -> Option<String> {
        self.lines.iter().find(|l| l.contains(needle)).cloned()
    }
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A reader that panicked has pushed whole lines only.
        self.captured.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `pipe` line by line into the list, on a thread of its own.
    fn read_lines(self: &Arc<Self>, pipe: Box<dyn Read + Send>) {
        let output = self.clone();
        self.reader(move || {
            let mut pipe = BufReader::new(pipe);
            let mut line = Vec::new();
            // Bytes, not `lines()`: a line that is not UTF-8 must not stop
            // the reading, or the child would block on a full pipe.
            while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                let text = String::from_utf8_lossy(text).into_owned();
                output.changed(|captured| captured.lines.push(text));
                line.clear();
            }
        });
    }

    /// Copies `pipe` into `file`, on a thread of its own.
    fn copy(self: &Arc<Self>, mut pipe: Box<dyn Read + Send>, mut file: std::fs::File) {
        self.reader(move || {
            let _ = io::copy(&mut pipe, &mut file);
        });
    }

    /// Runs `read` on a thread, counted as an open stream until it returns.
    fn reader(self: &Arc<Self>, read: impl FnOnce() + Send + 'static) {
        self.lock().open += 1;
        let output = self.clone();
        std::thread::spawn(move || {
            read();
            output.changed(|captured| captured.open -= 1);
        });
    }

    /// Applies `change` and wakes every waiter.
    fn changed(&self, change: impl FnOnce(&mut Captured)) {
        change(&mut self.lock());
        self.grew_blocking.notify_all();
        self.grew.notify_waiters();
    }

    /// Waits until `check` returns `Some`, or the output ends (`None`), or
    /// `deadline` passes (`None`; no deadline waits for the end).
    async fn wait_until<T>(
        &self,
        deadline: Option<Instant>,
        check: impl Fn(&Captured) -> Option<T>,
    ) -> Option<T> {
        loop {
            // Registered before the check, so a change right after it
            // still wakes this waiter.
            let mut grew = std::pin::pin!(self.grew.notified());
            grew.as_mut().enable();
            {
                let captured = self.lock();
                if let Some(found) = check(&captured) {
                    return Some(found);
                }
                if captured.open == 0 {
                    return None;
                }
            }
            match deadline {
                Some(deadline) if Instant::now() >= deadline => return None,
                Some(deadline) => {
                    let _ = tokio::time::timeout_at(deadline, grew).await;
                }
                None => grew.await,
            }
        }
    }

    /// As [`wait_until`](Self::wait_until), blocking the thread.
    fn wait_until_blocking<T>(
        &self,
        deadline: std::time::Instant,
        check: impl Fn(&Captured) -> Option<T>,
    ) -> Option<T> {
        let mut captured = self.lock();
        loop {
            if let Some(found) = check(&captured) {
                return Some(found);
            }
            let now = std::time::Instant::now();
            if captured.open == 0 || now >= deadline {
                return None;
            }
            captured = self
                .grew_blocking
                .wait_timeout(captured, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[tokio::test]
    async fn lines_of_both_streams_are_kept_and_complete_at_exit() {
        let mut child = Child::spawn("sh", shell("echo out; echo err >&2; exit 3")).unwrap();
        let status = child.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        let mut lines = child.output();
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
        assert!(child.has_line("ou"));
        assert!(!child.is_running());
    }

    #[tokio::test]
    async fn a_wait_for_a_line_ends_with_the_output() {
        let child = Child::spawn("sh", shell("echo one")).unwrap();
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(child.wait_for_line("on", far).await.as_deref(), Some("one"));
        // The line never comes: the wait ends with the output, not at the deadline.
        assert_eq!(child.wait_for_line("two", far).await, None);
        let far = std::time::Instant::now() + Duration::from_secs(30);
        assert_eq!(child.wait_for_line_blocking("two", far), None);
    }

    #[tokio::test]
    async fn lines_follow_the_output_to_its_end() {
        let child = Child::spawn_with(
            "sh",
            shell("echo a; printf 'b\\r\\n\\377\\n'; echo hidden >&2"),
            Stream::Lines,
            Stream::Discard,
        )
        .unwrap();
        let mut lines = child.lines();
        let mut got = Vec::new();
        while let Some(line) = lines.next_line().await {
            got.push(line);
        }
        assert_eq!(got, ["a", "b", "\u{fffd}"]);
    }

    #[tokio::test]
    async fn a_signalled_child_exits_and_a_killed_one_is_reaped() {
        let mut child = Child::spawn("sleep", {
            let mut command = Command::new("sleep");
            command.arg("30");
            command
        })
        .unwrap();
        assert!(child.is_running());
        child.signal(libc::SIGTERM);
        let status = child.wait_exit(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );

        let mut child = Child::spawn("sh", shell("sleep 30")).unwrap();
        child.signal(libc::SIGSTOP);
        child.kill();
        assert!(!child.is_running());
        child.signal(libc::SIGCONT); // reaped: nothing is sent
    }

    #[tokio::test]
    async fn a_log_file_gets_the_stream() {
        let dir = std::env::temp_dir().join(format!("switchboard-child-{}", std::process::id()));
        let mut child = Child::spawn_with(
            "logged",
            shell("echo to-the-log >&2"),
            Stream::Discard,
            Stream::LogIn(dir.clone()),
        )
        .unwrap();
        child.wait_exit(Duration::from_secs(30)).await.unwrap();
        let path = child.log_file().unwrap().to_owned();
        assert_eq!(path, dir.join(format!("logged-{}.log", child.pid())));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "to-the-log\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}
