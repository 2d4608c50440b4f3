//! `[[clients]]`: each client checked and placed in its pool once; the registry
//! every component reads is built from the result.

use std::collections::HashSet;

use super::{At, PoolSettings};
use crate::{
    config::{ClientConfig, Config, ConfigError},
    registry::Registry,
    rules::scope::{ScopeError, is_valid_client_id, validate_scope},
};

/// Checks every client and resolves its pool (`[cognito]`'s, or the one it
/// names among several `[[pools]]`).
pub(super) fn check(
    config: &Config,
    pools: &[PoolSettings],
    at: &At<'_>,
) -> Result<Registry, ConfigError> {
    if config.clients.is_empty() {
        return Err(at.invalid("clients", "at least one [[clients]] entry is required"));
    }
    let mut seen = HashSet::new();
    let mut names = HashSet::new();
    let mut clients = Vec::with_capacity(config.clients.len());
    for (i, client) in config.clients.iter().enumerate() {
        let key = |k: &str| format!("clients[{i}].{k}");
        if !is_valid_client_id(&client.client_id) {
            return Err(at.invalid(
                &key("client_id"),
                "must be 1-128 characters of [A-Za-z0-9_+-]",
            ));
        }
        if !seen.insert(client.client_id.as_str()) {
            return Err(at.invalid(
                &key("client_id"),
                format!("{:?} is registered twice", client.client_id),
            ));
        }
        let pool = match (&client.pool, pools) {
            (Some(pool), _) => match pools.iter().find(|p| &p.endpoints.pool == pool) {
                Some(p) => p,
                None => {
                    return Err(at.invalid(
                        &key("pool"),
                        format!(
                            "{pool:?} is not a pool; pools: {}",
                            pools
                                .iter()
                                .map(|p| format!("{:?}", p.endpoints.pool))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            },
            (None, [only]) => only,
            (None, _) => {
                return Err(at.invalid(
                    &key("pool"),
                    "missing: with several [[pools]], name the client's pool",
                ));
            }
        };
        if client.name.trim().is_empty() || client.name.len() > 128 {
            return Err(at.invalid(&key("name"), "must be 1-128 characters"));
        }
        if !names.insert(client.name.as_str()) {
            return Err(at.invalid(
                &key("name"),
                format!(
                    "{:?} names two clients: their logs and metrics would merge; give each its own name",
                    client.name
                ),
            ));
        }
        if client.allowed_scopes.is_empty() {
            return Err(at.invalid(&key("allowed_scopes"), "must list at least one scope"));
        }
        for scope in &client.allowed_scopes {
            validate_scope(scope).map_err(|e: ScopeError| {
                let words: Vec<&str> = scope.split_whitespace().collect();
                let message = if words.len() > 1 {
                    format!(
                        "{scope:?} is several scopes in one string: list each on its own, allowed_scopes = [{}]",
                        words
                            .iter()
                            .map(|w| format!("{w:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!("{scope:?}: {e}")
                };
                at.invalid(&key("allowed_scopes"), message)
            })?;
        }
        clients.push(ClientConfig {
            pool: Some(pool.endpoints.pool.clone()),
            ..client.clone()
        });
    }
    Ok(Registry::new(&clients, config.limits.max_scopes))
}
