//! A Cognito-compatible local issuer for `m2m-gateway dev` and for tests.

mod keys;

pub use keys::SigningKey;
