//! The configuration pipeline end to end: TOML in, [`Settings`] or an error
//! naming the key out.

use super::{
    pools::{self, redact_userinfo_text},
    *,
};
use crate::config::*;

/// A parsed and checked configuration, as written.
fn settings(toml: &str, origin: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml_str(toml, origin)
}

fn parse(toml: &str, origin: &str) -> Result<Config, ConfigError> {
    crate::settings::Settings::from_toml_str(toml, origin).map(|s| s.config)
}

/// A minimal valid configuration (other tests add sections to it).
pub(crate) const BASE: &str = r#"
[cognito]
region = "us-east-1"
user_pool_id = "us-east-1_AbCdEf123"
domain = "https://example.auth.us-east-1.amazoncognito.com"

[[clients]]
client_id = "k6h0hnjenh7auvi2as"
name = "acme-billing"
allowed_scopes = ["orders/read", "orders/write"]
"#;

impl Config {
    /// The first pool's endpoints, checked alone.
    fn endpoints(&self) -> Result<Endpoints, (String, String)> {
        let (prefix, c) = &pools::entries(self)[0];
        pools::check_pool(prefix, c, self.cognito.is_some())
    }
}

const TWO_POOLS: &str = r#"
[[pools]]
name = "us"
region = "us-east-1"
user_pool_id = "us-east-1_AbCdEf123"
domain = "https://us.auth.us-east-1.amazoncognito.com"
issuer_type = "updated"
accept_previous_issuer = true

[[pools]]
name = "eu"
region = "eu-west-1"
user_pool_id = "eu-west-1_XyZ987654"
domain = "https://eu.auth.eu-west-1.amazoncognito.com"

[[clients]]
client_id = "usclient1"
name = "us-billing"
pool = "us"
allowed_scopes = ["orders/read"]

[[clients]]
client_id = "euclient1"
name = "eu-billing"
pool = "eu"
allowed_scopes = ["orders/read"]
"#;

fn check(toml: &str) -> Result<Vec<Endpoints>, ConfigError> {
    let settings = crate::settings::Settings::from_toml_str(toml, "t.toml")?;
    Ok(settings.pools.into_iter().map(|p| p.endpoints).collect())
}

fn refused(toml: &str) -> String {
    check(toml).unwrap_err().to_string()
}

#[test]
fn several_pools_each_derive_their_endpoints() {
    let pools = check(TWO_POOLS).unwrap();
    assert_eq!(pools.len(), 2);
    let (us, eu) = (&pools[0], &pools[1]);
    assert_eq!(us.pool, "us");
    assert_eq!(
        us.issuer,
        "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
    );
    assert_eq!(
        us.accepted_issuers,
        [AcceptedIssuer {
            issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123".into(),
            jwks_uri: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
                .parse()
                .unwrap(),
        }]
    );
    assert_eq!(
        us.token_endpoint.to_string(),
        "https://us.auth.us-east-1.amazoncognito.com/oauth2/token"
    );
    assert_eq!(eu.pool, "eu");
    assert_eq!(
        eu.jwks_uri.to_string(),
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_XyZ987654/.well-known/jwks.json"
    );
    assert!(eu.accepted_issuers.is_empty());
    let checked = settings(TWO_POOLS, "t.toml").unwrap();
    let config = &checked.config;
    let pools_of: Vec<&str> = config
        .clients
        .iter()
        .map(|c| &*checked.registry.get(&c.client_id).unwrap().pool)
        .collect();
    assert_eq!(pools_of, ["us", "eu"]);
    // check-config shows each pool's derived endpoints.
    let shown = checked.redacted_json();
    assert!(shown.contains("\"accepted_issuers\""), "{shown}");
    assert!(
        shown.contains("https://eu.auth.eu-west-1.amazoncognito.com/oauth2/token"),
        "{shown}"
    );
    // The written form reads back the same.
    let again = parse(&config.to_toml(), "again.toml").unwrap();
    assert_eq!(check(&again.to_toml()).unwrap(), pools);
}

#[test]
fn pools_and_clients_that_cannot_work_are_refused_by_key() {
    let cases: [(String, &str); 8] = [
        (
            format!("{BASE}{}", TWO_POOLS.split("[[clients]]").next().unwrap()),
            "`pools`",
        ),
        (TWO_POOLS.replace("name = \"eu\"\n", ""), "`pools[1].name`"),
        (TWO_POOLS.replace("name = \"eu\"", "name = \"us\""), "described twice"),
        (TWO_POOLS.replace("pool = \"eu\"", "pool = \"asia\""), "`clients[1].pool`"),
        (TWO_POOLS.replace("pool = \"eu\"\n", ""), "`clients[1].pool`"),
        (TWO_POOLS.replace("name = \"eu\"", "name = \"e u\""), "`pools[1].name`"),
        (
            // Pool eu claims pool us's previous issuer.
            TWO_POOLS.replace(
                "domain = \"https://eu.auth",
                "issuer = \"https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"\ndomain = \"https://eu.auth",
            ),
            "is already pool \"us\"'s",
        ),
        (
            TWO_POOLS.replace("region = \"eu-west-1\"", "region = \"us-east-1\""),
            "`pools[1].region`",
        ),
    ];
    for (toml, expected) in cases {
        let err = refused(&toml);
        assert!(err.contains(expected), "{expected}: {err}");
    }
    let none = BASE.replace("[cognito]\nregion = \"us-east-1\"\nuser_pool_id = \"us-east-1_AbCdEf123\"\ndomain = \"https://example.auth.us-east-1.amazoncognito.com\"\n", "");
    assert!(refused(&none).contains("`cognito`"), "{}", refused(&none));
}

#[test]
fn accept_previous_issuer_forms() {
    // An explicit list: those issuers exactly, each with its JWKS.
    let list = BASE.replace(
        "[cognito]",
        "[cognito]\naccept_previous_issuer = [\"https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"]",
    );
    let pools = check(&list).unwrap();
    assert_eq!(
        pools[0].accepted_issuers[0].jwks_uri.to_string(),
        "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
    );
    assert_eq!(pools[0].pool, "default");
    // Off by default.
    assert!(check(BASE).unwrap()[0].accepted_issuers.is_empty());
    // `true` cannot derive the other form of a hand-set issuer.
    let by_hand = BASE.replace(
        "[cognito]",
        "[cognito]\naccept_previous_issuer = true\nissuer = \"https://idp.example.com/p\"",
    );
    assert!(refused(&by_hand).contains("`cognito.accept_previous_issuer`"));
    // Its own issuer, or clear text, are refused.
    let own = BASE.replace(
        "[cognito]",
        "[cognito]\naccept_previous_issuer = [\"https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"]",
    );
    assert!(refused(&own).contains("pool's own issuer"));
    let clear = BASE.replace(
        "[cognito]",
        "[cognito]\naccept_previous_issuer = [\"http://idp.example.com/p\"]",
    );
    assert!(
        refused(&clear).contains("`cognito.accept_previous_issuer`"),
        "{}",
        refused(&clear)
    );
}

#[test]
fn derives_cognito_urls() {
    let c = parse(BASE, "t.toml").unwrap();
    let e = c.endpoints().unwrap();
    assert_eq!(
        e.token_endpoint.to_string(),
        "https://example.auth.us-east-1.amazoncognito.com/oauth2/token"
    );
    assert_eq!(
        e.issuer,
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
    );
    assert_eq!(
        e.jwks_uri.to_string(),
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
    );
    assert_eq!(c.server.listen.port(), 50051);
    assert_eq!(c.cache.refresh_ratio, 0.75);

    // The updated issuer form (IssuerConfigurationType UPDATED).
    let updated = BASE.replace("[cognito]", "[cognito]\nissuer_type = \"updated\"");
    let e = parse(&updated, "t.toml").unwrap().endpoints().unwrap();
    assert_eq!(
        e.issuer,
        "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
    );
    assert_eq!(
        e.jwks_uri.to_string(),
        "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
    );
    let typo = BASE.replace("[cognito]", "[cognito]\nissuer_type = \"new\"");
    let err = parse(&typo, "t.toml").unwrap_err().to_string();
    assert!(
        err.contains("issuer_type") && err.contains("original"),
        "{err}"
    );
}

#[test]
fn bad_listen_names_the_key() {
    let toml = format!("[server]\nlisten = \"not-an-address\"\n{BASE}");
    let err = parse(&toml, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("gw.toml"), "{err}");
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn missing_user_pool_id_names_the_key() {
    let toml = BASE.replace("user_pool_id = \"us-east-1_AbCdEf123\"\n", "");
    let err = parse(&toml, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("user_pool_id"), "{err}");
}

#[test]
fn plain_http_refused_except_loopback() {
    let remote = BASE.replace(
        "domain = \"https://example.auth.us-east-1.amazoncognito.com\"",
        "domain = \"http://example.com\"",
    );
    let err = parse(&remote, "gw.toml").unwrap_err().to_string();
    // Blamed on the key written (the token endpoint is derived from it).
    assert!(
        err.contains("cognito.domain") && err.contains("https"),
        "{err}"
    );

    let jwks = BASE.replace(
        "[cognito]\n",
        "[cognito]\njwks_uri = \"http://10.0.0.1/jwks.json\"\n",
    );
    let err = parse(&jwks, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("cognito.jwks_uri"), "{err}");

    for host in ["127.0.0.1:9000", "localhost:9000", "[::1]:9000"] {
        let local = BASE.replace(
            "domain = \"https://example.auth.us-east-1.amazoncognito.com\"",
            &format!(
                "domain = \"http://{host}\"\njwks_uri = \"http://{host}/p/.well-known/jwks.json\"\nissuer = \"http://{host}/p\""
            ),
        );
        parse(&local, "gw.toml").unwrap();
    }
}

#[test]
fn unknown_keys_and_bad_scopes_are_refused() {
    let typo = BASE.replace("[cognito]\n", "[cognito]\nregoin = \"x\"\n");
    let err = parse(&typo, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("regoin"), "{err}");

    let bad_scope = BASE.replace("\"orders/write\"", "\"orders write\"");
    let err = parse(&bad_scope, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("clients[0].allowed_scopes"), "{err}");
}

#[test]
fn redis_tls_credentials_and_iam_are_checked() {
    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let cache = |extra: &str| {
        format!("{BASE}\n[cache]\nbackend = \"redis\"\nencryption_key = \"{key}\"\n{extra}\n")
    };
    let err = |extra: &str| parse(&cache(extra), "gw.toml").unwrap_err().to_string();

    let e = err("redis_url = \"rediss://cache.example:6379/#insecure\"");
    assert!(
        e.contains("cache.redis_url") && e.contains("#insecure"),
        "{e}"
    );
    let e = err("redis_url = \"redis://cache.example:6379\"\nredis_ca_file = \"/ca.pem\"");
    assert!(
        e.contains("cache.redis_ca_file") && e.contains("not rediss://"),
        "{e}"
    );
    let e =
        err("redis_url = \"rediss://cache.example:6379\"\nredis_ca_file = \"/nonexistent/ca.pem\"");
    assert!(
        e.contains("cache.redis_ca_file") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let e = err(&format!(
        "redis_url = \"rediss://cache.example:6379\"\nredis_ca_file = \"{}\"",
        not_pem.display()
    ));
    assert!(e.contains("no PEM certificate"), "{e}");
    let empty = dir.path().join("password");
    std::fs::write(&empty, "\n").unwrap();
    let e = err(&format!(
        "redis_url = \"rediss://cache.example:6379\"\nredis_password_file = \"{}\"",
        empty.display()
    ));
    assert!(
        e.contains("cache.redis_password_file") && e.contains("empty"),
        "{e}"
    );
    let e = err(
        "redis_url = \"rediss://cache.example:6379\"\nredis_password = \"a\"\nredis_password_file = \"/p\"",
    );
    assert!(e.contains("keep one"), "{e}");

    // IAM: a user and a cache name, no password, TLS, and the `aws` feature.
    let iam = "redis_url = \"rediss://cache.example:6379\"\nredis_auth = \"iam\"";
    let e = err(iam);
    assert!(e.contains("cache.redis_user"), "{e}");
    let e = err(&format!("{iam}\nredis_user = \"gw\""));
    assert!(e.contains("cache.redis_cache_name"), "{e}");
    let e = err(&format!(
        "{iam}\nredis_user = \"gw\"\nredis_cache_name = \"c\"\nredis_password = \"x\""
    ));
    assert!(e.contains("makes its own passwords"), "{e}");
    let full =
        format!("{iam}\nredis_user = \"gw\"\nredis_cache_name = \"my-cache\"\nserverless = true");
    let result = parse(&cache(&full), "gw.toml");
    if cfg!(feature = "aws") {
        let c = result.unwrap();
        assert!(c.cache.redis_serverless);
    } else {
        let e = result.unwrap_err().to_string();
        assert!(e.contains("`aws` cargo feature"), "{e}");
    }
    let plain = full.replace("rediss://", "redis://");
    let e = err(&plain);
    assert!(
        e.contains("needs TLS") || e.contains("`aws` cargo feature"),
        "{e}"
    );

    // The password never shows.
    let ok = settings(
        &cache(
            "redis_url = \"rediss://gw@cache.example:6379\"\nredis_password = \"hunter2-secret\"",
        ),
        "gw.toml",
    )
    .unwrap();
    let shown = ok.redacted_json();
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    assert!(!format!("{ok:?}").contains("hunter2-secret"));
}

#[test]
fn redis_requires_a_32_byte_key_and_it_is_redacted() {
    let redis = format!(
        "{BASE}\n[cache]\nbackend = \"redis\"\nredis_url = \"redis://:pw@127.0.0.1:6379\"\n"
    );
    let err = parse(&redis, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("cache.encryption_key"), "{err}");

    let short = format!("{redis}encryption_key = \"AAAA\"\n");
    let err = parse(&short, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("need 32"), "{err}");

    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let ok = format!("{redis}encryption_key = \"{key}\"\n");
    let c = settings(&ok, "gw.toml").unwrap();
    let shown = c.redacted_json();
    assert!(!shown.contains(key), "{shown}");
    assert!(!shown.contains(":pw@"), "{shown}");
    assert!(!format!("{c:?}").contains(key));
    // Nor the decoded bytes (the key is 0x30 0x31 ...: "48, 49").
    assert!(!format!("{c:?}").contains("48, 49"), "{c:?}");
}

#[test]
fn urls_with_user_info_are_refused_without_echoing_the_password() {
    let mut c = parse(BASE, "t.toml").unwrap();
    c.cognito.as_mut().unwrap().token_endpoint =
        Some("https://user:hunter2@example.com/oauth2/token".into());
    let (key, message) = c.endpoints().unwrap_err();
    assert_eq!(key, "cognito.token_endpoint");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("user name or password"), "{message}");
    c.cognito.as_mut().unwrap().token_endpoint = Some("https://user:hunter2@exa mple.com/".into());
    let (_, message) = c.endpoints().unwrap_err();
    assert!(!message.contains("hunter2"), "{message}");
    assert_eq!(
        redact_userinfo_text("https://a:b@host/p@q"),
        "https://<redacted>@host/p@q"
    );
}

#[test]
fn region_must_match_the_pool_and_domain_must_have_no_path() {
    let wrong_region = BASE.replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
    let err = parse(&wrong_region, "t.toml").unwrap_err().to_string();
    assert!(
        err.contains("cognito.region") && err.contains("us-east-1"),
        "{err}"
    );
    let with_path = BASE.replace("amazoncognito.com\"", "amazoncognito.com/oauth2/token\"");
    let err = parse(&with_path, "t.toml").unwrap_err().to_string();
    assert!(
        err.contains("cognito.domain") && err.contains("has a path"),
        "{err}"
    );
    let trailing_slash = BASE.replace("amazoncognito.com\"", "amazoncognito.com/\"");
    assert!(parse(&trailing_slash, "t.toml").is_ok());
}

#[test]
fn duplicate_client_refused() {
    let dup = format!(
        "{BASE}\n[[clients]]\nclient_id = \"k6h0hnjenh7auvi2as\"\nname = \"again\"\nallowed_scopes = [\"a/b\"]\n"
    );
    let err = parse(&dup, "gw.toml").unwrap_err().to_string();
    assert!(
        err.contains("clients[1].client_id") && err.contains("twice"),
        "{err}"
    );
}

#[test]
fn check_config_says_what_is_wrong_and_how_to_fix_it() {
    // A domain of another Region than the pool's.
    let other_region = BASE.replace(
        "example.auth.us-east-1.amazoncognito.com",
        "example.auth.eu-west-1.amazoncognito.com",
    );
    let err = parse(&other_region, "gw.toml").unwrap_err().to_string();
    assert!(
        err.contains("cognito.domain") && err.contains("eu-west-1") && err.contains("us-east-1"),
        "{err}"
    );
    // A custom domain says nothing of a Region: accepted.
    let custom = BASE.replace(
        "https://example.auth.us-east-1.amazoncognito.com",
        "https://auth.example.com",
    );
    assert!(parse(&custom, "gw.toml").is_ok());
    // Two clients under one name.
    let same_name = format!(
        "{BASE}\n[[clients]]\nclient_id = \"other1234\"\nname = \"acme-billing\"\nallowed_scopes = [\"orders/read\"]\n"
    );
    let err = parse(&same_name, "gw.toml").unwrap_err().to_string();
    assert!(
        err.contains("clients[1].name") && err.contains("merge"),
        "{err}"
    );
    // Several scopes in one string: named, and the list suggested.
    let one_string = BASE.replace(
        "[\"orders/read\", \"orders/write\"]",
        "[\"orders/read orders/write\"]",
    );
    let err = parse(&one_string, "gw.toml").unwrap_err().to_string();
    assert!(
        err.contains("allowed_scopes = [\"orders/read\", \"orders/write\"]"),
        "{err}"
    );
    // A pasted client secret: callers present their own.
    let secret = BASE.replace(
        "name = \"acme-billing\"",
        "name = \"acme-billing\"\nclient_secret = \"s3cr3t\"",
    );
    let err = parse(&secret, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("each caller presents its own"), "{err}");
    assert!(!err.contains("s3cr3t"), "{err}");
    // A hex key where base64 is wanted: how to make one.
    let hex = format!(
        "{BASE}\n[cache]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nencryption_key = \"{}\"\n",
        "ab".repeat(32)
    );
    let err = parse(&hex, "gw.toml").unwrap_err().to_string();
    assert!(err.contains("openssl rand -base64 32"), "{err}");
}
