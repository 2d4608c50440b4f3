//! Generated protobuf and gRPC code, and the descriptor sets served by reflection.

use std::sync::{Arc, OnceLock};

use crate::jwt::Rejection;

/// `m2m.gateway.v1`: the gateway's contract.
pub mod gateway {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.gateway.v1");
    }
}

/// `m2m.auth.v1`: the access options declared in `.proto` files, and the view of
/// descriptor sets that reads them.
pub mod auth {
    /// The options' extension messages (google/protobuf/descriptor.proto parts).
    pub(crate) mod internal {
        #![allow(missing_docs, unreachable_pub, clippy::all, dead_code)]
        tonic::include_proto!("m2m.auth.internal");
    }
}

/// `proto/m2m/auth/v1/options.proto`: import it in your `.proto` files to declare
/// the scopes each method needs (see `AuthPolicy::from_descriptors`).
pub const AUTH_OPTIONS_PROTO: &str = include_str!("../proto/m2m/auth/v1/options.proto");

/// `m2m.demo.v1`: the demo service of the protected-server example.
pub mod demo {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.demo.v1");
    }
}

/// `google.protobuf.Struct` as the generated gateway types hold it (`Claims.all`):
/// shared, so that the claims of a verified token, converted once, are answered
/// any number of times without copying the Struct (a clone is a reference count).
/// Decoding is prost's own `Struct` code, delegated. Encoding too, once: the bytes
/// prost wrote are remembered and written again for every later answer (the Struct
/// is immutable while shared; decoding into a value forgets them).
#[derive(Clone, Default)]
pub struct SharedStruct(Arc<(prost_types::Struct, OnceLock<Vec<u8>>)>);

impl SharedStruct {
    /// The Struct, owned (copied only if shared).
    pub fn into_inner(self) -> prost_types::Struct {
        Arc::unwrap_or_clone(self.0).0
    }

    /// prost's encoding of the Struct, computed on first use.
    fn encoded(&self) -> &[u8] {
        self.0.1.get_or_init(|| {
            use prost::Message as _;
            self.0.0.encode_to_vec()
        })
    }
}

impl From<prost_types::Struct> for SharedStruct {
    fn from(s: prost_types::Struct) -> Self {
        Self(Arc::new((s, OnceLock::new())))
    }
}

impl std::ops::Deref for SharedStruct {
    type Target = prost_types::Struct;
    fn deref(&self) -> &prost_types::Struct {
        &self.0.0
    }
}

impl PartialEq for SharedStruct {
    fn eq(&self, other: &Self) -> bool {
        self.0.0 == other.0.0
    }
}

impl std::fmt::Debug for SharedStruct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.0.fmt(f)
    }
}

impl prost::Message for SharedStruct {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(self.encoded());
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let (inner, encoded) = Arc::make_mut(&mut self.0);
        encoded.take();
        inner.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.encoded().len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The proto value of a [`Rejection`].
pub fn rejection_to_proto(r: Rejection) -> gateway::v1::Rejection {
    use gateway::v1 as pb;
    match r {
        Rejection::Malformed => pb::Rejection::Malformed,
        Rejection::UnsupportedAlgorithm => pb::Rejection::UnsupportedAlgorithm,
        Rejection::UnknownKey => pb::Rejection::UnknownKey,
        Rejection::BadSignature => pb::Rejection::BadSignature,
        Rejection::Expired => pb::Rejection::Expired,
        Rejection::NotYetValid => pb::Rejection::NotYetValid,
        Rejection::WrongIssuer => pb::Rejection::WrongIssuer,
        Rejection::WrongTokenUse => pb::Rejection::WrongTokenUse,
        Rejection::ClientNotAllowed => pb::Rejection::ClientNotAllowed,
        Rejection::InsufficientScope => pb::Rejection::InsufficientScope,
        Rejection::KeysUnavailable => pb::Rejection::KeysUnavailable,
    }
}

/// The [`Rejection`] of a proto value (`None` for UNSPECIFIED or unknown values).
pub fn rejection_from_proto(value: i32) -> Option<Rejection> {
    Rejection::ALL
        .into_iter()
        .find(|r| rejection_to_proto(*r) as i32 == value)
}

/// Encoded `FileDescriptorSet` of `m2m.gateway.v1` (with its imports).
pub const GATEWAY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gateway_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `m2m.demo.v1`.
pub const DEMO_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/demo_descriptor.bin"));

/// A protobuf message that is already encoded, sent as its bytes: for load
/// generators and clients that send one request many times (the gateway's own
/// answers are plain generated messages).
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

    use super::{Encoded, SharedStruct, gateway::v1 as pb};

    #[test]
    fn shared_struct_is_prost_struct_on_the_wire() {
        use prost_types::{Struct, Value, value::Kind};
        let all = Struct {
            fields: [
                ("client_id", Kind::StringValue("c1".into())),
                ("exp", Kind::NumberValue(1.8e9)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value { kind: Some(v) }))
            .collect(),
        };
        let shared = SharedStruct::from(all.clone());
        assert_eq!(shared.encode_to_vec(), all.encode_to_vec());
        assert_eq!(shared.encoded_len(), all.encoded_len());
        // Nested in the generated Claims, and read back.
        let claims = pb::Claims {
            client_id: "c1".into(),
            all: Some(shared.clone()),
            ..Default::default()
        };
        let back = pb::Claims::decode(claims.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.all.unwrap().into_inner(), all);
        // Decoding into a shared value changes only the decoded copy, and its
        // remembered length follows.
        let mut other = shared.clone();
        let more = Struct {
            fields: [(
                "jti".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("j".into())),
                },
            )]
            .into_iter()
            .collect(),
        };
        other.merge(more.encode_to_vec().as_slice()).unwrap();
        assert_eq!(shared.fields.len(), 2);
        assert_eq!(other.fields.len(), 3);
        let mut merged = all.clone();
        merged.merge(more.encode_to_vec().as_slice()).unwrap();
        assert_eq!(other.encoded_len(), merged.encoded_len());
        // The remembered bytes were taken before the merge (`shared` was encoded
        // above): the decoded copy encodes what it now holds, the original what it
        // held.
        assert_eq!(other.encode_to_vec(), merged.encode_to_vec());
        assert_eq!(shared.encode_to_vec(), all.encode_to_vec());
    }

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
