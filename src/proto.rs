//! Generated protobuf and gRPC code, and the descriptor sets served by reflection.

/// `m2m.gateway.v1`: the gateway's contract.
pub mod gateway {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.gateway.v1");
    }
}

/// `m2m.demo.v1`: the demo service of the protected-server example.
pub mod demo {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.demo.v1");
    }
}

/// Encoded `FileDescriptorSet` of `m2m.gateway.v1` (with its imports).
pub const GATEWAY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gateway_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `m2m.demo.v1`.
pub const DEMO_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/demo_descriptor.bin"));
