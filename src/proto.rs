//! Generated protobuf and gRPC code, and the descriptor sets served by reflection.

use std::sync::{Arc, OnceLock};

/// `m2m.gateway.v1`: the gateway's contract.
pub mod gateway {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.gateway.v1");
        pub use super::message::Claims;
    }

    /// `m2m.gateway.admin.v1`: the kill switch's admin API (the gateway's).
    #[cfg(feature = "gateway")]
    pub mod admin {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, clippy::all)]
            tonic::include_proto!("m2m.gateway.admin.v1");
        }
    }

    /// The same file generated again without the extern path: the `Claims`
    /// message that [`SharedClaims`](crate::proto::SharedClaims) holds. The other
    /// messages here are unused copies.
    mod message {
        #![allow(missing_docs, unreachable_pub, clippy::all, dead_code)]
        include!(concat!(env!("OUT_DIR"), "/claims/m2m.gateway.v1.rs"));
    }
}

/// `m2m.auth.v1`: the access options declared in `.proto` files, and the view of
/// descriptor sets that reads them.
pub(crate) mod auth {
    /// The options' extension messages (google/protobuf/descriptor.proto parts).
    pub(crate) mod internal {
        #![allow(missing_docs, unreachable_pub, clippy::all, dead_code)]
        tonic::include_proto!("m2m.auth.internal");
    }
}

/// `m2m.demo.v1`: the demo service of the protected-server example.
#[cfg_attr(not(any(feature = "gateway", feature = "emulator")), doc(hidden))]
pub mod demo {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        tonic::include_proto!("m2m.demo.v1");
    }
}

/// A message shared by reference count, written as the bytes prost encoded for
/// it the first time: the claims of a verified token are converted once and
/// answered by every later Validate of that token (`ValidateResponse.claims` is a
/// [`SharedClaims`]). Encoding and decoding are prost's own code for `M`; the
/// message is immutable while shared (decoding into it works on a private copy
/// and forgets the remembered bytes).
pub struct Shared<M>(Arc<(M, OnceLock<Vec<u8>>)>);

/// `m2m.gateway.v1.Claims` as `ValidateResponse.claims` holds it. Read its fields
/// through `Deref`; [`Shared::into_inner`] gives the message.
pub type SharedClaims = Shared<gateway::v1::Claims>;

impl<M: prost::Message + Clone> Shared<M> {
    /// The message, owned (copied only if shared).
    pub fn into_inner(self) -> M {
        Arc::unwrap_or_clone(self.0).0
    }

    /// prost's encoding of the message, computed on first use.
    fn encoded(&self) -> &[u8] {
        self.0.1.get_or_init(|| self.0.0.encode_to_vec())
    }
}

impl<M> Clone for Shared<M> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<M: Default> Default for Shared<M> {
    fn default() -> Self {
        Self(Arc::new((M::default(), OnceLock::new())))
    }
}

impl<M> From<M> for Shared<M> {
    fn from(message: M) -> Self {
        Self(Arc::new((message, OnceLock::new())))
    }
}

impl<M> std::ops::Deref for Shared<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.0.0
    }
}

impl<M: PartialEq> PartialEq for Shared<M> {
    fn eq(&self, other: &Self) -> bool {
        self.0.0 == other.0.0
    }
}

impl<M: std::fmt::Debug> std::fmt::Debug for Shared<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.0.fmt(f)
    }
}

impl<M: prost::Message + Clone + Default> prost::Message for Shared<M> {
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

/// Encoded `FileDescriptorSet` of `m2m.gateway.v1` (with its imports).
#[cfg(feature = "gateway")]
pub const GATEWAY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gateway_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `m2m.demo.v1`.
#[cfg_attr(not(any(feature = "gateway", feature = "emulator")), doc(hidden))]
pub const DEMO_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/demo_descriptor.bin"));

/// A protobuf message that is already encoded, sent as its bytes: for load
/// generators and clients that send one request many times (the gateway's own
/// answers are plain generated messages).
///
/// It is for sending only: decoding into it skips every field and keeps nothing.
/// `Debug` shows the length, never the bytes (a request may hold a token).
#[derive(Clone, Default, PartialEq, Eq)]
#[cfg(any(feature = "gateway", test))]
pub struct Encoded(pub bytes::Bytes);

#[cfg(any(feature = "gateway", test))]
impl Encoded {
    /// Encodes `message` once.
    pub fn of(message: &impl prost::Message) -> Self {
        Self(message.encode_to_vec().into())
    }
}

#[cfg(any(feature = "gateway", test))]
impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.0.len())
    }
}

#[cfg(any(feature = "gateway", test))]
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

    use super::{Encoded, SharedClaims, gateway::v1 as pb};

    #[test]
    fn shared_claims_are_the_generated_claims_on_the_wire() {
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
        let claims = pb::Claims {
            client_id: "c1".into(),
            scopes: vec!["orders/read".into()],
            expires_at: 1_800_000_000,
            all: Some(all),
            ..Default::default()
        };
        let shared = SharedClaims::from(claims.clone());
        assert_eq!(shared.encode_to_vec(), claims.encode_to_vec());
        assert_eq!(shared.encoded_len(), claims.encoded_len());
        // Nested in the generated answer: the same bytes as the message itself
        // would give there, and read back.
        let answer = pb::ValidateResponse {
            valid: true,
            claims: Some(shared.clone()),
            ..Default::default()
        };
        let bytes = answer.encode_to_vec();
        let mut expected = pb::ValidateResponse {
            valid: true,
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::message::encode(4, &claims, &mut expected);
        assert_eq!(bytes, expected);
        let back = pb::ValidateResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, answer);
        assert_eq!(back.claims.unwrap().into_inner(), claims);
        // Decoding into a shared value changes only the decoded copy, and what it
        // encodes follows.
        let mut other = shared.clone();
        let more = pb::Claims {
            jti: "j".into(),
            ..Default::default()
        };
        other.merge(more.encode_to_vec().as_slice()).unwrap();
        assert_eq!(shared.jti, "");
        assert_eq!(other.jti, "j");
        let mut merged = claims.clone();
        merged.merge(more.encode_to_vec().as_slice()).unwrap();
        assert_eq!(other.encoded_len(), merged.encoded_len());
        // The remembered bytes were taken before the merge (`shared` was encoded
        // above): the decoded copy encodes what it now holds, the original what it
        // held.
        assert_eq!(other.encode_to_vec(), merged.encode_to_vec());
        assert_eq!(shared.encode_to_vec(), claims.encode_to_vec());
        assert_eq!(SharedClaims::default().encode_to_vec(), Vec::<u8>::new());
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
