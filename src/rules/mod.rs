//! Rules shared by the configuration, the client registry, the validator builder
//! and the emulator: what a scope, a client id, a Region and a user pool id look
//! like, and how a pool's issuer and JWKS URI are derived. Leaves: nothing here
//! imports the rest of the crate, so every part that needs a rule uses this one
//! and no two parts can disagree.

pub mod cognito;
pub mod scope;
