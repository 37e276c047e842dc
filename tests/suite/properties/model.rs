//! The model: what the test knows about every lease it was granted.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fate {
    /// Nothing ended it; it lives until its TTL runs out.
    Live,
    /// It heartbeated on a KeepAlive stream that has since closed: the
    /// registry ends it as the stream goes away.
    Doomed,
    /// Deregistered or taken over: gone before that call answered.
    Revoked,
    /// The registry said NOT_FOUND (it expired); its endpoint may take a
    /// moment more to leave.
    Gone,
}

#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) id: u128,
    pub(super) metadata: Metadata,
    pub(super) ttl: Duration,
    /// Before Register was sent: the lease ends no earlier than `sent + ttl`
    /// unless something ends it.
    pub(super) sent: Instant,
    /// After Register answered: unrefreshed, it ends by `answered + ttl`.
    pub(super) answered: Instant,
    pub(super) fate: Fate,
    pub(super) draining: bool,
}

impl Lease {
    /// Whether the registry must still hold it at `at`.
    pub(super) fn surely_live(&self, at: Instant) -> bool {
        self.fate == Fate::Live && self.sent + self.ttl > at
    }

    /// Whether the registry must have let it go by `at` (allowing for
    /// asynchronous removal by polling).
    pub(super) fn surely_ended(&self, at: Instant) -> bool {
        match self.fate {
            Fate::Live => self.answered + self.ttl < at,
            Fate::Doomed | Fate::Revoked | Fate::Gone => true,
        }
    }

    pub(super) fn state(&self) -> i32 {
        if self.draining {
            EndpointState::Draining as i32
        } else {
            EndpointState::Serving as i32
        }
    }
}

#[derive(Default)]
pub(super) struct Model {
    pub(super) leases: Vec<Lease>,
    /// Index into `leases` of the lease holding each (service, address).
    pub(super) holders: HashMap<(String, String), usize>,
    /// The status codes seen, for the summary.
    pub(super) outcomes: BTreeMap<String, usize>,
}

impl Model {
    pub(super) fn find(&self, id: u128) -> Option<usize> {
        self.leases.iter().position(|l| l.id == id)
    }

    pub(super) fn count(&mut self, what: String) {
        *self.outcomes.entry(what).or_default() += 1;
    }
}

/// What the registry must answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expect {
    Ok,
    /// INVALID_ARGUMENT naming this field.
    Invalid(&'static str),
    /// NOT_FOUND naming this lease (lower-case hex).
    NotFound(String),
    /// The lease may or may not have ended (its TTL is running out, or its
    /// KeepAlive stream just closed).
    OkOrNotFound(String),
    /// RESOURCE_EXHAUSTED naming the message size cap.
    TooLarge,
}

impl Expect {
    pub(super) fn allows_ok(&self) -> bool {
        matches!(self, Expect::Ok | Expect::OkOrNotFound(_))
    }
}

/// A string for failure messages: long ones are cut.
pub(super) fn short(s: &str) -> String {
    if s.len() <= 80 {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(40).collect();
        format!("{cut:?}... ({} bytes)", s.len())
    }
}

pub(super) fn check_refusal(
    what: &str,
    status: &Status,
    expect: &Expect,
) -> Result<(), TestCaseError> {
    let message = status.message();
    let fine = match expect {
        Expect::Invalid(field) => {
            status.code() == Code::InvalidArgument
                && message.starts_with(&format!("invalid {field}: "))
        }
        Expect::NotFound(id) | Expect::OkOrNotFound(id) => {
            status.code() == Code::NotFound && message.contains(&format!("lease {id} not found"))
        }
        Expect::TooLarge => {
            status.code() == Code::ResourceExhausted
                && message.contains(&format!("message size limit of {MAX_MESSAGE_BYTES} bytes"))
        }
        Expect::Ok => false,
    };
    if fine {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: expected {expect:?}, got {:?} {:?}",
            status.code(),
            short(message)
        )))
    }
}

pub(super) async fn within<T>(
    what: &str,
    call: impl std::future::Future<Output = T>,
) -> Result<T, TestCaseError> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .map_err(|_| TestCaseError::fail(format!("{what}: no answer within {CALL_DEADLINE:?}")))
}

// ---------------------------------------------------------------------------
// Watchers: a task per watch stream building the view a client would.
// ---------------------------------------------------------------------------
