//! The command line as an operator meets it: check-config, environment overrides,
//! the emulator command, JSON logs.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

mod support;

use support::DevProcess;

const BIN: &str = env!("CARGO_BIN_EXE_m2m-gateway");

const CONFIG: &str = r#"
[cognito]
region = "us-east-1"
user_pool_id = "us-east-1_AbCdEf123"
domain = "https://example.auth.us-east-1.amazoncognito.com"

[[clients]]
client_id = "k6h0hnjenh7auvi2as"
name = "acme-billing"
allowed_scopes = ["orders/read", "orders/write"]
"#;

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_prints_effective_settings_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, CONFIG);
    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env("M2M_GATEWAY__SERVER__LISTEN", "127.0.0.1:6001")
        .env("M2M_GATEWAY__CACHE__ENCRYPTION_KEY", key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("127.0.0.1:6001"),
        "environment override applied: {text}"
    );
    assert!(text.contains("https://example.auth.us-east-1.amazoncognito.com/oauth2/token"));
    assert!(text.contains(
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
    ));
    assert!(text.contains("<redacted>") && !text.contains(key), "{text}");
}

#[test]
fn check_config_prints_every_pools_issuers_and_key_urls() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        r#"
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
client_id = "k6h0hnjenh7auvi2as"
name = "acme-billing"
pool = "us"
allowed_scopes = ["orders/read"]
"#,
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json",
        // The previous (original) form, accepted during the migration.
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json",
        "https://eu.auth.eu-west-1.amazoncognito.com/oauth2/token",
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_XyZ987654\"",
    ] {
        assert!(text.contains(expected), "{expected} not in {text}");
    }
    // A client without its pool, with several pools: refused, naming the key.
    let unnamed = std::fs::read_to_string(&path)
        .unwrap()
        .replace("pool = \"us\"\n", "");
    let path = write(&dir, &unnamed);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clients[0].pool"), "{err}");
}

#[test]
fn check_config_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent/gateway.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/gateway.toml"));

    let bad = write(
        &dir,
        &format!("[server]\nlisten = \"not-an-address\"\n{CONFIG}"),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("gateway.toml") && err.contains("listen"),
        "{err}"
    );

    let no_pool = write(
        &dir,
        &CONFIG.replace("user_pool_id = \"us-east-1_AbCdEf123\"\n", ""),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&no_pool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("user_pool_id"));

    let env_bad = write(&dir, CONFIG);
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&env_bad)
        .env("M2M_GATEWAY__CACHE__REFRESH_RATIO", "2.5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache.refresh_ratio"));
}

#[tokio::test]
async fn emulator_command_serves_a_token_endpoint() {
    let mut child = Command::new(BIN)
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--pool-id",
            "us-east-1_Cli00001",
            "--client",
            "svc:svc-secret:orders/read,orders/write",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut endpoint = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.trim().strip_prefix("token endpoint:") {
            endpoint = Some(url.trim().to_owned());
            break;
        }
    }
    let endpoint = endpoint.expect("token endpoint printed");
    let resp = reqwest::Client::new()
        .post(&endpoint)
        .basic_auth("svc", Some("svc-secret"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "orders/read"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["level"], "INFO");
    assert!(
        v["message"].is_string() && v["timestamp"].is_string(),
        "{v}"
    );
    // Key ids: one plain field per line, never a list inside a string.
    let key_line = lines
        .map(|l| l.unwrap())
        .find(|l| l.contains("\"JWKS key\""))
        .expect("a JWKS key line");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&key_line).unwrap();
    let kid = v["kid"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        !kid.is_empty() && !kid.contains('[') && !kid.contains(' '),
        "{v}"
    );
}

#[tokio::test]
async fn dev_writes_a_config_that_check_config_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.toml");
    // The banner comes after the file is written and the keys are loaded.
    let dev = DevProcess::start(&["--write-config", path.to_str().unwrap()]).await;
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    drop(dev);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dev-client") && text.contains("us-east-1_DevPool01"),
        "{text}"
    );
}

#[test]
fn addresses_accept_localhost_and_say_what_they_expect() {
    // localhost:PORT is 127.0.0.1:PORT (nothing listens on port 1: the probe
    // fails to connect, it does not fail to parse).
    let out = Command::new(BIN)
        .args(["probe", "--addr", "localhost:1", "--timeout-ms", "300"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("invalid value"), "{stderr}");
    let out = Command::new(BIN)
        .args(["dev", "--listen", "example.com:50051"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not IP:PORT (e.g. 127.0.0.1:50051) or localhost:PORT"),
        "{stderr}"
    );
}

#[test]
fn check_config_reads_the_tls_files_as_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        &format!(
            "[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n{CONFIG}"
        ),
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check-config accepted a missing certificate"
    );
    assert!(
        stderr.contains("server.tls.cert") && stderr.contains("/nonexistent/cert.pem"),
        "{stderr}"
    );
}

#[test]
fn with_json_logs_a_fatal_error_is_json_too() {
    let out = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "check-config",
            "/nonexistent/gateway.toml",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["level"], "ERROR", "{line}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/gateway.toml"),
            "{line}"
        );
    }
}

#[test]
fn config_errors_name_the_key_written_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, env: &[(&str, &str)]| {
        let path = write(&dir, text);
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted: {text}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A typo: the key as written, once, no doubled quoting.
    let err = check(&CONFIG.replace("domain =", "domian ="), &[]);
    assert!(err.contains("unknown key `cognito.domian`"), "{err}");
    assert!(!err.contains("``") && !err.contains("default."), "{err}");
    // http in the domain: blamed on cognito.domain, the key the user wrote.
    let err = check(&CONFIG.replace("https://example", "http://example"), &[]);
    assert!(
        err.contains("`cognito.domain`") && !err.contains("token_endpoint"),
        "{err}"
    );
    // No scheme: says what to write.
    let err = check(&CONFIG.replace("https://example", "example"), &[]);
    assert!(
        err.contains("has no scheme: write it as https://example"),
        "{err}"
    );
    // A bad value from the environment: blamed on the variable, not the file.
    let err = check(CONFIG, &[("M2M_GATEWAY__SERVER__LISTEN", "bogus")]);
    assert!(
        err.contains("environment variable M2M_GATEWAY__SERVER__LISTEN"),
        "{err}"
    );
    let err = check(CONFIG, &[("M2M_GATEWAY__SERVER__REQUEST_TIMEOUT_MS", "0")]);
    assert!(
        err.contains("environment variable M2M_GATEWAY__SERVER__REQUEST_TIMEOUT_MS")
            && err.contains("server.request_timeout_ms"),
        "{err}"
    );
    // A missing file: its OS error once.
    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/gateway.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
