//! Why a registry request was refused, mapped once onto gRPC status codes.

use tonic::{Code, Status};

use super::Cap;

/// A refused registry request. Every variant changes no state.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// A request field is malformed; `field` names it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The offending request field.
        field: &'static str,
        /// What is wrong with it and what is accepted.
        reason: String,
    },
    /// The lease does not exist: it expired, was revoked, or was never granted.
    #[error("lease {0} not found: it expired, was deregistered or belongs to another registry instance; register again")]
    LeaseNotFound(String),
    /// No endpoint has this address in this service.
    #[error("no endpoint {address} in service {service}")]
    EndpointNotFound {
        /// The service named.
        service: String,
        /// The address named.
        address: String,
    },
    /// An operator removed the lease's endpoint: its holder must not
    /// register it again until it restarts (see docs/operations.md).
    #[error(
        "lease {0} was removed by an operator; not registering again until this backend restarts"
    )]
    RemovedByOperator(String),
    /// The store cannot be reached (a distributed store's cluster is down).
    #[error("{0}")]
    Unavailable(String),
    /// The store in use does not offer this operation (yet).
    #[error("{0}")]
    Unsupported(String),
    /// A configured cap was reached.
    #[error("{cap}{} limit of {limit} reached", in_service(.service))]
    ResourceExhausted {
        /// Which cap.
        cap: Cap,
        /// The configured value of the cap.
        limit: usize,
        /// For a per-service cap, the service that is full; the message
        /// names it.
        service: Option<String>,
    },
}

/// ` (<service>)` after a per-service cap's words, nothing otherwise.
fn in_service(service: &Option<String>) -> String {
    service
        .as_ref()
        .map(|service| format!(" ({service})"))
        .unwrap_or_default()
}

impl RegistryError {
    /// Shorthand for an [`RegistryError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`RegistryError::ResourceExhausted`] of a cap that
    /// is not per service.
    pub fn exhausted(cap: Cap, limit: usize) -> Self {
        Self::ResourceExhausted {
            cap,
            limit,
            service: None,
        }
    }

    /// The cap this refusal ran into, if it is one.
    pub fn cap(&self) -> Option<Cap> {
        match self {
            Self::ResourceExhausted { cap, .. } => Some(*cap),
            _ => None,
        }
    }
}

impl From<RegistryError> for Status {
    /// The status a client reads; a cap's refusal also carries its [`Cap`]
    /// as the status's source, for the metrics layer.
    fn from(err: RegistryError) -> Self {
        if let Some(cap) = err.cap() {
            return cap.refusal(err.to_string());
        }
        let code = match err {
            RegistryError::InvalidArgument { .. } => Code::InvalidArgument,
            RegistryError::LeaseNotFound(_) | RegistryError::EndpointNotFound { .. } => {
                Code::NotFound
            }
            RegistryError::RemovedByOperator(_) => Code::FailedPrecondition,
            RegistryError::ResourceExhausted { .. } => Code::ResourceExhausted,
            RegistryError::Unavailable(_) => Code::Unavailable,
            RegistryError::Unsupported(_) => Code::Unimplemented,
        };
        Status::new(code, err.to_string())
    }
}
