//! Generated protobuf and gRPC code for every `.proto` in this folder.

/// `grpc.examples.echo`: the echo service the client balances across.
pub mod echo {
    tonic::include_proto!("grpc.examples.echo");
}

/// `helloworld`: grpc's greeter example, served by `examples/greeter.rs`.
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// `switchboard.registry.v1`: the registry API.
pub mod registry {
    tonic::include_proto!("switchboard.registry.v1");
}

/// Encoded descriptors of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));
