//! A Cognito-compatible local issuer for `m2m-gateway dev`, for this crate's tests
//! and for other teams' tests: the client-credentials token endpoint, the JWKS and
//! the OpenID configuration of one user pool, with RS256 tokens whose claims are
//! exactly those of a Cognito client-credentials access token.

mod keys;
#[cfg(feature = "emulator")]
mod server;

pub use keys::SigningKey;
#[cfg(feature = "emulator")]
pub use server::{ClientSpecError, Emulator, EmulatorClient, EmulatorConfig};
