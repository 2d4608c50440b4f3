//! # m2m-gateway
//!
//! A gRPC machine-to-machine auth gateway in front of Amazon Cognito: a caching,
//! coalescing broker for the OAuth 2.0 `client_credentials` grant (`GetToken`) and
//! an RS256 access-token validator (`Validate`) that follows AWS's verification
//! steps and RFC 8725.
//!
//! ## Features
//!
//! - `gateway` (default): the whole gateway — broker, Redis fleet cache, admin
//!   endpoints, configuration files, the emulator's server, the `m2m-gateway`
//!   binary.
//! - `auth`: only what a tonic service protecting itself needs — [`auth`]
//!   (`AuthLayer`, `AuthInterceptor`, `RemoteValidator`, `TokenSource`, `claims`),
//!   the validator ([`jwt`]), the hardened serving of [`edge`], the generated
//!   [`proto`] types and the token-endpoint client ([`oauth`]). No Redis, axum,
//!   clap, figment, governor, tracing-subscriber, health or reflection; tonic
//!   without a TLS backend and tokio without `full` (use your own features):
//!
//!   ```toml
//!   m2m-gateway = { version = "0.1", default-features = false, features = ["auth"] }
//!   ```
//! - `emulator`: a local Cognito user pool in-process for tests (`emulator`),
//!   without the gateway.
//! - `otel`: W3C trace context through the global OpenTelemetry propagator:
//!   `TokenSource`'s interceptor sends the current span's `traceparent` on,
//!   `AuthLayer` opens the call's server span as the caller's child (spans are
//!   `debug` under [`trace_context::TARGET`]). The OpenTelemetry API and
//!   `tracing-opentelemetry` only; the application brings its own SDK.
//! - `tls`: tonic's rustls server (aws-lc-rs); the edge then also reads the
//!   peer of TLS connections.
//!
//! ## What a service uses
//!
//! The names a tonic service needs are here at the root:
//!
//! | to | use |
//! |---|---|
//! | check tokens on a server | [`AuthLayer`] with an [`AuthPolicy`] (or [`AuthPolicy::from_descriptors`] of your `.proto`), [`claims`] in handlers |
//! | build the validator | [`CognitoValidator::builder`] → [`CognitoValidator`]; [`Claims`], [`Invalid`], [`Rejection`], [`BuildError`] |
//! | ask a gateway instead | [`RemoteValidator`] |
//! | refuse revoked tokens in-process | [`RevocationWatcher`] with [`WatchOptions`] / [`WhenStale`], its [`Revocations`] given to the validator |
//! | attach tokens on a client | [`TokenSource`] and [`TokenSource::bearer_interceptor`]; [`UpstreamError`] |
//! | harden the server against strangers | [`Edge`] with [`EdgeSettings`] (`Edge::layers`) |
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Modules the gateway's binary, tests and benches reach into, which are not
/// an adopter's API: public with `gateway`, crate-private in the library alone
/// (`cargo doc --no-default-features --features auth` shows none of them).
macro_rules! gateway_internal {
    ($($(#[$meta:meta])* $name:ident;)*) => {$(
        $(#[$meta])*
        #[cfg(feature = "gateway")]
        pub mod $name;
        $(#[$meta])*
        #[cfg(not(feature = "gateway"))]
        #[allow(dead_code, unreachable_pub)]
        mod $name;
    )*};
}

/// One item the gateway's binary, tests, examples and benches reach (the
/// validator's plumbing), which is not an adopter's API: public with
/// `gateway`, crate-private in the library alone.
macro_rules! gateway_pub {
    ($(#[$meta:meta])* pub $($item:tt)*) => {
        $(#[$meta])*
        #[cfg(feature = "gateway")]
        pub $($item)*
        $(#[$meta])*
        #[cfg(not(feature = "gateway"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) $($item)*
    };
}

gateway_internal! {
    refusal_log;
    rules;
    status;
}

#[cfg(feature = "gateway")]
pub mod admin;
pub mod auth;
#[cfg(feature = "gateway")]
pub mod broker;
#[cfg(feature = "gateway")]
pub mod calls;
#[cfg(feature = "gateway")]
pub mod config;
mod counters;
/// The demo service of the examples and the README's tests (with `emulator`).
#[cfg(any(feature = "emulator", test))]
pub mod demo;
#[cfg(feature = "gateway")]
pub mod dev;
pub mod edge;
#[cfg(any(test, feature = "emulator"))]
pub mod emulator;
#[cfg(feature = "gateway")]
pub mod histogram;
mod http;
pub mod jwt;
pub mod oauth;
#[cfg(feature = "gateway")]
pub mod ops;
#[cfg(feature = "gateway")]
pub mod prometheus;
pub mod proto;
#[cfg(feature = "gateway")]
pub mod registry;
pub mod revocations;
#[cfg(feature = "gateway")]
pub mod server;
#[cfg(feature = "gateway")]
pub mod service;
#[cfg(feature = "gateway")]
pub mod settings;
#[cfg(feature = "gateway")]
pub mod telemetry;
#[cfg(feature = "gateway")]
pub mod tls;
pub mod trace_context;

pub use auth::{
    AuthLayer, AuthPolicy, RemoteValidator, RevocationWatcher, TokenSource, WatchOptions,
    WhenStale, claims,
};
pub use edge::{Edge, EdgeSettings};
pub use http::EndpointError;
pub use jwt::{BuildError, Claims, CognitoValidator, Invalid, Rejection};
pub use oauth::UpstreamError;
pub use revocations::Revocations;
