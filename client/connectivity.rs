//! The connectivity states every layer of the client speaks: a
//! subchannel's, a policy's aggregate, the channel's. Its own module so
//! that errors, subchannels, health checking and policies all depend on it
//! and not on each other.

/// The aggregate or per-subchannel connectivity state, as in gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectivityState {
    /// Not connected and not trying to.
    Idle,
    /// A connection attempt is under way.
    Connecting,
    /// Connected; RPCs can be sent.
    Ready,
    /// The last attempt failed; waiting out the backoff.
    TransientFailure,
}
