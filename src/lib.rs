//! m2m-gateway
#![forbid(unsafe_code)]
