//! Section 2, failover: a round_robin client on a `registry://` target
//! sends a constant rate over three echo child processes; one of them is
//! SIGKILLed, SIGTERMed (a graceful drain) or SIGSTOPped (hung). For each:
//! the RPCs that failed, the RPCs in flight on the victim at the signal, when
//! the client stopped using it, and when the registry told watchers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::client::{BalancedChannel, PolicyKind};
use switchboard::discovery::{EndpointSet, Versioned};
use switchboard::proto::echo::echo_client::EchoClient;
use switchboard::proto::echo::EchoRequest;
use switchboard::proto::registry::registry_client::RegistryClient;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fanout::open_watch;
use crate::procs::Proc;
use crate::stats::{ms, Table};
use crate::BoxError;

/// The load and how long to watch around each fault.
pub struct Config {
    /// RPCs per second, sent open-loop (not waiting for replies).
    pub rate: f64,
    /// Load before the signal.
    pub before: Duration,
    /// Load after the client has stopped using the victim.
    pub after: Duration,
}

/// Each RPC's deadline.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// What one RPC did.
pub(crate) struct Shot {
    /// When it was started.
    pub(crate) sent: Instant,
    /// When it finished.
    pub(crate) done: Instant,
    /// The backend that answered, or the error.
    pub(crate) result: Result<String, tonic::Status>,
}

/// The `RPCs/s` cell: how many of `shots` finished per second, over the
/// time from the first to finish to the last.
pub(crate) fn rate(shots: &[Shot]) -> String {
    let elapsed = shots
        .iter()
        .map(|s| s.done)
        .max()
        .zip(shots.iter().map(|s| s.done).min())
        .map_or(Duration::ZERO, |(a, b)| a - b);
    format!(
        "{:.0}",
        shots.len() as f64 / elapsed.as_secs_f64().max(1e-9)
    )
}

/// The `failed RPCs` cell: `0`, or how many of `shots` failed and their
/// distinct codes, e.g. `3 (Unavailable)`.
pub(crate) fn failures<'a>(shots: impl IntoIterator<Item = &'a Shot>) -> String {
    let mut codes: Vec<String> = shots
        .into_iter()
        .filter_map(|s| s.result.as_ref().err())
        .map(|e| format!("{:?}", e.code()))
        .collect();
    let failed = codes.len();
    if failed == 0 {
        return "0".to_owned();
    }
    codes.sort();
    codes.dedup();
    format!("{failed} ({})", codes.join(", "))
}

/// Waits until `channel` sends RPCs to all `n` backends, for up to 20 s.
pub(crate) async fn wait_all_ready(channel: &BalancedChannel, n: usize) -> Result<(), BoxError> {
    let mut state = channel.watch_state();
    let all_ready = state.wait_for(|s| s.ready.len() == n);
    if tokio::time::timeout(Duration::from_secs(20), all_ready)
        .await
        .is_err()
    {
        return Err(format!(
            "the client never used all {n} backends: {:?}",
            channel.state()
        )
        .into());
    }
    Ok(())
}

/// Open-loop load: RPCs are started on a schedule, whatever the replies do.
pub(crate) struct Load {
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: Arc<AtomicBool>,
    /// RPCs started and not finished.
    outstanding: Arc<AtomicUsize>,
    driver: JoinHandle<()>,
}

impl Load {
    pub(crate) fn start(channel: &BalancedChannel, rate: f64) -> Self {
        let shots = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let outstanding = Arc::new(AtomicUsize::new(0));
        let client = EchoClient::new(channel.clone());
        let driver = tokio::spawn({
            let (shots, stop, outstanding) = (shots.clone(), stop.clone(), outstanding.clone());
            async move {
                let start = Instant::now();
                let mut started = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    // As many RPCs as the schedule says are due by now.
                    let due = (start.elapsed().as_secs_f64() * rate) as u64;
                    while started < due {
                        started += 1;
                        let mut client = client.clone();
                        let (shots, outstanding) = (shots.clone(), outstanding.clone());
                        outstanding.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(async move {
                            let mut request = tonic::Request::new(EchoRequest {
                                message: "failover".into(),
                            });
                            request.set_timeout(RPC_TIMEOUT);
                            let sent = Instant::now();
                            let result = client
                                .unary_echo(request)
                                .await
                                .map(|reply| backend_of(&reply.into_inner().message));
                            shots.lock().unwrap().push(Shot {
                                sent,
                                done: Instant::now(),
                                result,
                            });
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                }
            }
        });
        Self {
            shots,
            stop,
            outstanding,
            driver,
        }
    }

    /// Stops starting RPCs, waits for the started ones, returns every shot.
    pub(crate) async fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.driver.await;
        let deadline = Instant::now() + RPC_TIMEOUT * 3;
        while self.outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::mem::take(&mut *self.shots.lock().unwrap())
    }
}

/// The backend named at the end of an echo reply, `"... (from <addr>)"`.
pub(crate) fn backend_of(reply: &str) -> String {
    reply
        .rsplit_once("(from ")
        .map(|(_, rest)| rest.trim_end_matches(')').to_owned())
        .unwrap_or_default()
}

/// When the registry's watchers learned that `victim` is draining or gone.
#[derive(Default)]
struct RegistrySaw {
    draining: Option<Instant>,
    removed: Option<Instant>,
}

/// Watches `service` and notes when `victim` turns DRAINING and leaves.
async fn watch_registry(
    registry: &str,
    service: &str,
    victim: String,
) -> Result<(JoinHandle<()>, Arc<Mutex<RegistrySaw>>), BoxError> {
    let mut client = RegistryClient::connect(format!("http://{registry}")).await?;
    let mut stream = open_watch(&mut client, service).await?;
    let saw = Arc::new(Mutex::new(RegistrySaw::default()));
    let task = tokio::spawn({
        let saw = saw.clone();
        async move {
            let mut set = EndpointSet::new();
            while let Ok(Some(message)) = stream.message().await {
                let Ok(versioned) = Versioned::try_from(message) else {
                    continue;
                };
                let now = Instant::now();
                let applied = set.apply(versioned.update);
                let mut saw = saw.lock().unwrap();
                if applied.updated.contains(&victim)
                    && set.get(&victim).is_some_and(|e| e.is_draining())
                {
                    saw.draining.get_or_insert(now);
                }
                if applied.removed.contains(&victim) {
                    saw.removed.get_or_insert(now);
                }
            }
        }
    });
    Ok((task, saw))
}

/// The three faults.
#[derive(Clone, Copy)]
enum Fault {
    Kill,
    Term,
    Stop,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::Term => "SIGTERM (drain)",
            Fault::Stop => "SIGSTOP (hang)",
        }
    }

    fn signal(self) -> i32 {
        match self {
            Fault::Kill => libc::SIGKILL,
            Fault::Term => libc::SIGTERM,
            Fault::Stop => libc::SIGSTOP,
        }
    }
}

/// One fault against a fresh set of three backends and a fresh client.
async fn scenario(
    config: &Config,
    registry: &str,
    fault: Fault,
    table: &mut Table,
) -> Result<(), BoxError> {
    let service = format!("bench.failover-{}", fault.signal());
    let mut backends: Vec<(Proc, String)> = (0..3)
        .map(|_| Proc::echo(registry, &service, &[]))
        .collect();
    let channel = BalancedChannel::builder(&format!("registry://{registry}/{service}"))?
        .policy(PolicyKind::RoundRobin)
        .keepalive(Duration::from_secs(1), Duration::from_secs(1))
        .build();
    wait_all_ready(&channel, 3).await?;
    let victim = backends[1].1.clone();
    let (watcher, saw) = watch_registry(registry, &service, victim.clone()).await?;

    let load = Load::start(&channel, config.rate);
    tokio::time::sleep(config.before).await;
    let in_flight = channel
        .in_flight()
        .into_iter()
        .find(|(address, _)| *address == victim)
        .map_or(0, |(_, n)| n);
    let signalled = Instant::now();
    backends[1].0.signal(fault.signal());

    let mut state = channel.watch_state();
    let moved = state.wait_for(|s| !s.is_ready(&victim));
    let moved = match tokio::time::timeout(Duration::from_secs(15), moved).await {
        Ok(Ok(_)) => Some(signalled.elapsed()),
        _ => None,
    };
    if let Fault::Stop = fault {
        // Wait for the TTL to run out in the registry too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while saw.lock().unwrap().removed.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Keep the load on for `after`, noting when a drained victim exits.
    let mut exited = None;
    let until = Instant::now() + config.after;
    while Instant::now() < until {
        if let (Fault::Term, None) = (fault, exited) {
            if backends[1].0.exited() {
                exited = Some(signalled.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shots = load.stop().await;
    if let Fault::Stop = fault {
        backends[1].0.signal(libc::SIGCONT);
    }
    let drained_exit = if let Fault::Term = fault {
        let deadline = Instant::now() + Duration::from_secs(15);
        while exited.is_none() && Instant::now() < deadline {
            if backends[1].0.exited() {
                exited = Some(signalled.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(exited.map_or(", still running after 15 s".to_owned(), |t| {
            format!(", process exited after {}", ms(t))
        }))
    } else {
        None
    };
    watcher.abort();

    let last_answer = shots
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|b| *b == victim))
        .map(|s| s.done)
        .max()
        .map_or("-".to_owned(), |t| {
            if t >= signalled {
                format!("+{}", ms(t - signalled))
            } else {
                "before the signal".to_owned()
            }
        });
    let saw = saw.lock().unwrap();
    let since = |t: Option<Instant>| {
        t.map_or("-".to_owned(), |t| {
            ms(t.saturating_duration_since(signalled))
        })
    };
    table.row(vec![
        fault.name().to_owned(),
        shots.len().to_string(),
        rate(&shots),
        failures(&shots),
        in_flight.to_string(),
        moved.map_or("never (15 s)".to_owned(), ms),
        last_answer,
        format!(
            "draining {}, removed {}{}",
            since(saw.draining),
            since(saw.removed),
            drained_exit.unwrap_or_default()
        ),
    ]);
    Ok(())
}

pub async fn run(config: &Config) -> Result<(), BoxError> {
    println!("## 2. Failover under load\n");
    let (_registry, registry) = Proc::registry();
    let mut table = Table::new(&[
        "fault",
        "RPCs",
        "RPC/s",
        "failed RPCs",
        "in flight on victim at signal",
        "client stops using it after",
        "last reply from victim",
        "registry watchers saw (after signal)",
    ]);
    for fault in [Fault::Kill, Fault::Term, Fault::Stop] {
        scenario(config, &registry, fault, &mut table).await?;
    }
    println!(
        "{:.0} RPC/s open-loop, round_robin over 3 echo processes via `registry://`, \
         RPC deadline {RPC_TIMEOUT:?}, client keepalive 1 s / 1 s; {:?} of load before the \
         signal and {:?} after the client stopped using the victim.\n",
        config.rate, config.before, config.after
    );
    table.print();
    Ok(())
}
