//! Table-driven tests: one test runs a table of named cases, and when some
//! fail it fails once, naming every failed case and why, so one broken case
//! neither hides the others nor needs the table rerun case by case.

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use tonic::{Code, Status};

/// One row of a table: its name (what a failure is reported as), what goes
/// in and what must come out.
#[derive(Debug, Clone)]
pub struct Case<I, E> {
    /// Names the case in failure messages.
    pub name: String,
    /// What the test sends or runs.
    pub input: I,
    /// What must come back.
    pub expected: E,
}

/// A [`Case`] named `name`.
pub fn case<I, E>(name: impl Into<String>, input: I, expected: E) -> Case<I, E> {
    Case {
        name: name.into(),
        input,
        expected,
    }
}

/// How many cases [`together`] runs at once: enough to overlap processes
/// that spend their time starting up, few enough for a loaded 2-core box.
const AT_ONCE: usize = 8;

/// Runs `check` on each case, one after another: for cases that share
/// state, such as one registry whose state every refusal must leave as it
/// was. A panicking case does not stop the others.
pub async fn in_turn<I, E, F, Fut>(cases: Vec<Case<I, E>>, mut check: F)
where
    F: FnMut(Case<I, E>) -> Fut,
    Fut: Future<Output = ()>,
{
    let total = cases.len();
    let mut failed = Vec::new();
    for case in cases {
        let name = case.name.clone();
        if let Err(panic) = AssertUnwindSafe(check(case)).catch_unwind().await {
            failed.push(format!("{name}: {}", panic_message(&*panic)));
        }
    }
    report(total, failed);
}

/// Runs `check` on the cases, up to [`AT_ONCE`] at a time: for cases that
/// share nothing, such as processes that must refuse to start.
pub async fn together<I, E, F, Fut>(cases: Vec<Case<I, E>>, check: F)
where
    F: Fn(Case<I, E>) -> Fut,
    Fut: Future<Output = ()>,
{
    let total = cases.len();
    let failed: Vec<String> = futures_util::stream::iter(cases)
        .map(|case| {
            let name = case.name.clone();
            AssertUnwindSafe(check(case))
                .catch_unwind()
                .map(move |outcome| {
                    outcome
                        .err()
                        .map(|panic| format!("{name}: {}", panic_message(&*panic)))
                })
        })
        .buffer_unordered(AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await;
    report(total, failed);
}

/// Fails the test if any case failed, listing each one.
fn report(total: usize, mut failed: Vec<String>) {
    failed.sort();
    assert!(
        failed.is_empty(),
        "{} of {total} cases failed:\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}

/// What a caught panic said.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Asserts that `outcome` is a refusal with `code` whose message contains
/// `fragment`, and returns the status.
pub fn expect_status<T: Debug>(outcome: Result<T, Status>, code: Code, fragment: &str) -> Status {
    let status = match outcome {
        Ok(reply) => panic!("accepted, answered {reply:?}; expected {code:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "wrong code; message {:?}",
        status.message()
    );
    assert!(
        status.message().contains(fragment),
        "the message {:?} does not contain {fragment:?}",
        status.message()
    );
    status
}
