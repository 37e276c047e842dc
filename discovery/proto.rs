//! The wire format (switchboard.registry.v1) at the edge: conversions
//! between the discovery vocabulary and the registry's protobuf messages.

use super::{Delta, Endpoint, EndpointState, Update, Versioned};
use crate::proto::registry as pb;

impl From<pb::Endpoint> for Endpoint {
    fn from(endpoint: pb::Endpoint) -> Self {
        Self {
            state: if endpoint.state == pb::EndpointState::Draining as i32 {
                EndpointState::Draining
            } else {
                EndpointState::Serving
            },
            address: endpoint.address,
            metadata: endpoint.metadata,
        }
    }
}

impl From<&Endpoint> for pb::Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        Self {
            address: endpoint.address.clone(),
            metadata: endpoint.metadata.clone(),
            state: match endpoint.state {
                EndpointState::Serving => pb::EndpointState::Serving,
                EndpointState::Draining => pb::EndpointState::Draining,
            } as i32,
        }
    }
}

impl From<&Update> for pb::watch_response::Event {
    fn from(update: &Update) -> Self {
        use pb::watch_response::Event;
        match update {
            Update::Reset(endpoints) => Event::Reset(pb::Snapshot {
                endpoints: endpoints.iter().map(pb::Endpoint::from).collect(),
            }),
            Update::Delta(delta) => Event::Delta(pb::Delta {
                added: delta.added.iter().map(pb::Endpoint::from).collect(),
                updated: delta.updated.iter().map(pb::Endpoint::from).collect(),
                removed: delta.removed.clone(),
            }),
        }
    }
}

impl From<&Versioned> for pb::WatchResponse {
    fn from(versioned: &Versioned) -> Self {
        Self {
            epoch: versioned.epoch,
            version: versioned.version,
            event: Some((&versioned.update).into()),
            service_config: None,
        }
    }
}

/// A watch message that carries no event: one that only brings the
/// service's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a watch message without an event")]
pub struct NoEvent;

impl TryFrom<pb::WatchResponse> for Versioned {
    type Error = NoEvent;

    fn try_from(message: pb::WatchResponse) -> Result<Self, NoEvent> {
        use pb::watch_response::Event;
        let update = match message.event.ok_or(NoEvent)? {
            Event::Reset(snapshot) => {
                Update::Reset(snapshot.endpoints.into_iter().map(Into::into).collect())
            }
            Event::Delta(delta) => Update::Delta(Delta {
                added: delta.added.into_iter().map(Into::into).collect(),
                updated: delta.updated.into_iter().map(Into::into).collect(),
                removed: delta.removed,
            }),
        };
        Ok(Self {
            epoch: message.epoch,
            version: message.version,
            update,
        })
    }
}
