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

/// A protobuf message that is already encoded: sent as its bytes, with no encoding
/// work per call. The gateway answers Validate for a token it has verified before
/// with the same `ValidateResponse` every time, so it keeps those answers encoded;
/// load generators use it to send one request many times.
///
/// It is for sending only: decoding into it skips every field and keeps nothing.
/// `Debug` shows the length, never the bytes (a request may hold a token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Encoded(pub bytes::Bytes);

impl Encoded {
    /// Encodes `message` once.
    pub fn of(message: &impl prost::Message) -> Self {
        Self(message.encode_to_vec().into())
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.0.len())
    }
}

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::{Encoded, gateway::v1 as pb};

    #[test]
    fn encoded_sends_exactly_the_message_it_was_made_from() {
        let message = pb::ValidateRequest {
            token: "a.b.c".into(),
            required_scopes: vec!["orders/read".into()],
        };
        let encoded = Encoded::of(&message);
        assert_eq!(encoded.encoded_len(), message.encoded_len());
        // As a top-level message and as a field of another one.
        assert_eq!(encoded.encode_to_vec(), message.encode_to_vec());
        assert_eq!(
            pb::ValidateRequest::decode(encoded.encode_to_vec().as_slice()).unwrap(),
            message
        );
        assert_eq!(
            encoded.encode_length_delimited_to_vec(),
            message.encode_length_delimited_to_vec()
        );
        assert_eq!(format!("{encoded:?}"), "Encoded(20 bytes)");
        // Decoding into it keeps nothing.
        let decoded = Encoded::decode(message.encode_to_vec().as_slice()).unwrap();
        assert!(decoded.0.is_empty());
    }
}
