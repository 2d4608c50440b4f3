//! Every gateway configuration the project ships — the Kubernetes ConfigMaps and
//! the README's complete examples — is one `check-config` accepts, so that an
//! operator who copies one starts from a configuration that works.

use m2m_gateway::settings::Settings;

/// The `gateway.toml: |` block of a ConfigMap, unindented.
fn configmap_toml(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let (_, rest) = text
        .split_once("gateway.toml: |\n")
        .unwrap_or_else(|| panic!("{path}: no gateway.toml block"));
    rest.lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

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
fn the_kubernetes_configmaps_are_accepted() {
    for path in [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/redis/configmap.yaml",
    ] {
        let toml = with_secret_key(&configmap_toml(path));
        let settings = Settings::from_toml_str(&toml, path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.pools.len(), 1, "{path}");
        assert!(!settings.config.clients.is_empty(), "{path}");
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
