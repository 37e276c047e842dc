//! The client library: resolvers, subchannels and balancers behind a
//! tower service that any tonic-generated client accepts.

pub mod backoff;
