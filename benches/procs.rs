//! The processes a benchmark runs and what it reads about them: registry and
//! echo children (killed when dropped, panics included), free ports, the
//! machine, and CPU and memory counters from `/proc` and `getrusage`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use switchboard::process::{Child, Stream};

/// A registry or echo child, SIGKILLed and reaped when dropped: every exit
/// path of the harness, a panic included, leaves no process behind. The
/// mechanism is the library's [`Child`]; this adds the subcommands the
/// benches start and what they read about them.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `switchboard <name> <args>`. Stdout is kept line by line (for
    /// the "listening" line); stderr goes to a log file under the target
    /// directory, `bench-logs/<name>-<pid>.log`, so a failed run can be
    /// diagnosed.
    fn spawn(name: &'static str, args: &[String]) -> Self {
        let bin = env!("CARGO_BIN_EXE_switchboard");
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-logs");
        let mut command = Command::new(bin);
        command.arg(name).args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = Child::spawn_with(name, command, Stream::Lines, Stream::LogIn(logs))
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Self { child }
    }

    /// Starts a registry on a free port (no warm-up, so watches answer at
    /// once) and waits until it listens; returns it and its address.
    pub fn registry() -> (Self, String) {
        Self::registry_with(&["--listen", "127.0.0.1:0"])
    }

    /// Starts a registry with `extra` flags (a `--listen` address among
    /// them; `--store etcd ...` for a replica) and waits until it listens;
    /// returns it and its address.
    pub fn registry_with(extra: &[&str]) -> (Self, String) {
        // The benches measure the registry's throughput, not its
        // per-connection flood protection.
        let mut args: Vec<String> = ["--warmup-ms", "0", "--max-registrations-per-second", "0"]
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        if !extra.contains(&"--listen") {
            args.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        let mut proc = Self::spawn("registry", &args);
        let address = proc.wait_line("registry listening on ");
        (proc, address)
    }

    /// Starts one echo server on a free port, registered as `service` at
    /// `registry`, and waits until it serves; returns it and its address.
    pub fn echo(registry: &str, service: &str, extra: &[&str]) -> (Self, String) {
        Self::echo_on("127.0.0.1:0", registry, service, extra)
    }

    /// [`Proc::echo`] on `listen`: a backend started again on the address
    /// it had (the port free once the old process is reaped).
    pub fn echo_on(listen: &str, registry: &str, service: &str, extra: &[&str]) -> (Self, String) {
        let mut args = vec![
            "--listen".to_owned(),
            listen.to_owned(),
            "--registry".to_owned(),
            registry.to_owned(),
            "--service".to_owned(),
            service.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Self::spawn("echo", &args);
        let address = proc.wait_line("echo serving on ");
        (proc, address)
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    /// Blocks the thread: the benches' setup code is synchronous.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let line = self.child.wait_for_line_blocking(prefix, deadline);
        match line.as_deref().and_then(|l| l.split_once(prefix)) {
            Some((_, rest)) => rest.trim().to_owned(),
            None => panic!(
                "{} (pid {}) never printed {prefix:?}",
                self.child.name(),
                self.child.pid()
            ),
        }
    }

    /// Sends `signal` (SIGTERM, SIGSTOP, ...) if the child still runs.
    pub fn signal(&self, signal: i32) {
        self.child.signal(signal)
    }

    /// Whether the child has exited (and reaps it if so).
    pub fn exited(&mut self) -> bool {
        !self.child.is_running()
    }

    /// SIGKILLs and reaps the child (the HA section's replicas and
    /// backends, section 10's victims before they start again).
    pub fn kill(&mut self) {
        self.child.kill()
    }

    /// User + system CPU time the child has used so far.
    pub fn cpu(&self) -> Duration {
        proc_cpu(self.pid())
    }

    /// The child's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn pid(&self) -> i32 {
        self.child.pid() as i32
    }
}

/// User + system CPU time of process `pid`, from `/proc/<pid>/stat`.
pub fn proc_cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields
    // after the last ')'. utime and stime are fields 14 and 15 (1-based).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// User + system CPU time this process has used so far (every thread).
pub fn self_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// CPU time the calling thread has used so far: the whole cost of a
/// current-thread runtime running on it. `CLOCK_THREAD_CPUTIME_ID` rather
/// than `getrusage(RUSAGE_THREAD)`, which lags the running thread by up to
/// a scheduler tick and so cannot time a ramp of a few milliseconds.
pub fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime fills the struct we hand it.
    let now = unsafe {
        let mut now: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now);
        now
    };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// User + system CPU time from `getrusage(who)`.
fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct we hand it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// `nproc` and the CPU model, as recorded with the results.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("nproc {cpus}, CPU {model}, Linux {}", kernel.trim())
}
