//! Every gateway configuration the project ships — the Kubernetes ConfigMaps and
//! the README's complete examples — is one `check-config` accepts, so that an
//! operator who copies one starts from a configuration that works.

use m2m_gateway::settings::Settings;

/// The README's ```toml blocks that are whole configurations (they register
/// clients).
fn readme_configs() -> Vec<String> {
    let readme = std::fs::read_to_string("README.md").unwrap();
    readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split_once("```").map(|(toml, _)| toml.to_owned()))
        .filter(|toml| toml.contains("[[clients]]"))
        .collect()
}

/// With `cache.encryption_key` as the deployment's Secret sets it.
fn with_secret_key(toml: &str) -> String {
    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    toml.replace(
        "[cache]\n",
        &format!("[cache]\nencryption_key = \"{key}\"\n"),
    )
}

#[test]
fn the_kubernetes_configurations_are_accepted() {
    for (path, backend_redis) in [
        ("deploy/kubernetes/base/gateway.toml", false),
        ("deploy/kubernetes/redis/gateway.toml", true),
        ("deploy/kubernetes/overlays/production/gateway.toml", true),
    ] {
        let mut toml = with_secret_key(&std::fs::read_to_string(path).unwrap());
        // The files the pod mounts from Secrets, here from a scratch directory.
        let dir = tempfile::tempdir().unwrap();
        if toml.contains("/etc/m2m-gateway/tls/") {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
            std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
            toml = toml.replace(
                "/etc/m2m-gateway/tls/",
                &format!("{}/", dir.path().display()),
            );
        }
        if toml.contains("/etc/m2m-gateway/redis/") {
            std::fs::write(dir.path().join("redis-password"), "s3cret\n").unwrap();
            toml = toml.replace(
                "/etc/m2m-gateway/redis/",
                &format!("{}/", dir.path().display()),
            );
        }
        let settings = Settings::from_toml_str(&toml, path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.pools.len(), 1, "{path}");
        assert!(!settings.config.clients.is_empty(), "{path}");
        assert_eq!(settings.fleet.is_some(), backend_redis, "{path}");
        // Every one of them drains in the order a rollout needs.
        assert!(!settings.server.drain_delay.is_zero(), "{path}");
    }
}

#[test]
fn the_readmes_whole_configurations_are_accepted() {
    let configs = readme_configs();
    assert!(
        configs.len() >= 2,
        "the first-screen example and the pools one"
    );
    assert!(
        configs.iter().any(|c| c.contains("[[pools]]")),
        "the several-pools example is among them"
    );
    for (i, toml) in configs.iter().enumerate() {
        let origin = format!("README.md toml block {i}");
        Settings::from_toml_str(toml, &origin).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    }
}
