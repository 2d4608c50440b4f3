//! # m2m-gateway
//!
//! A gRPC machine-to-machine auth gateway in front of Amazon Cognito: a caching,
//! coalescing broker for the OAuth 2.0 `client_credentials` grant (`GetToken`) and
//! an RS256 access-token validator (`Validate`) that follows AWS's verification
//! steps and RFC 8725.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod calls;
pub mod config;
pub mod demo;
pub mod dev;
pub mod edge;
pub mod emulator;
pub mod histogram;
mod http;

pub use http::EndpointError;
pub mod jwt;
pub mod proto;
pub mod registry;
pub mod server;
pub mod service;
pub mod settings;
pub mod telemetry;
