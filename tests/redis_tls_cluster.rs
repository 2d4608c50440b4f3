//! The fleet on the Redis AWS users run: TLS-only with an ACL user, and a
//! 3-master cluster over TLS (what ElastiCache Serverless, cluster-mode
//! ElastiCache and Valkey clusters answer like). Real `redis-server`s on
//! loopback, each with its own throwaway CA.

mod support;

use std::{path::Path, time::Duration};

use m2m_gateway::{
    broker::{FleetCache, FleetSettings, LinkError, RedisMode, RedisTarget, Topology},
    config::{CacheBackend, Config},
    emulator::{Emulator, EmulatorClient},
    proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient},
};
use secrecy::SecretString;
use support::{redis_servers::*, *};
use tonic::{Code, transport::Channel};

const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
const REDIS_PASSWORD: &str = "s3cret-redis-pass";

fn client_b() -> EmulatorClient {
    EmulatorClient::new("client-b", "secret-b", &["orders/read"])
}

fn client_c() -> EmulatorClient {
    EmulatorClient::new("client-c", "secret-c", &["orders/read"])
}

fn client_d() -> EmulatorClient {
    EmulatorClient::new("client-d", "secret-d", &["orders/read"])
}

fn client_e() -> EmulatorClient {
    EmulatorClient::new("client-e", "secret-e", &["orders/read", "orders/write"])
}

fn request(id: &str, secret: &str, scopes: &[&str]) -> GetTokenRequest {
    GetTokenRequest {
        client_id: id.into(),
        client_secret: secret.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

fn fleet_config(emu: &Emulator, url: String, ca: &Path) -> Config {
    let mut cfg = config(
        emu,
        &[client_a(), client_b(), client_c(), client_d(), client_e()],
    );
    cfg.cache.backend = CacheBackend::Redis;
    cfg.cache.redis_url = Some(url);
    cfg.cache.redis_ca_file = Some(ca.to_owned());
    cfg.cache.encryption_key = Some(SecretString::from(KEY.to_owned()));
    // Loopback TLS under a loaded test machine: room for a handshake.
    cfg.cache.redis_timeout_ms = 1000;
    cfg
}

/// A TLS node with the ACL user `gateway` / [`REDIS_PASSWORD`].
fn acl_node(pki: &Pki) -> RedisNode {
    let password = format!(">{REDIS_PASSWORD}");
    let acl = ["--user", "gateway", "on", &password, "~*", "&*", "+@all"];
    RedisNode::tls(pki, &pki.cert, &pki.key, &acl)
}

/// One upstream schedule for the fleet: at 1 call/s with 100 ms of patience,
/// two misses of a proven client on two replicas right after each other: the
/// second must wait for the fleet's next slot (a second away) and is refused.
async fn assert_one_schedule(cfg: &Config, prover: &GatewayClient<Channel>) {
    prover
        .clone()
        .get_token(request("client-e", "secret-e", &["orders/read"]))
        .await
        .unwrap();
    let mut slow = cfg.clone();
    slow.limits.upstream_per_second = 1;
    slow.limits.upstream_max_wait_ms = 100;
    let (budgeted, bc) = start_replicas(&slow, 2).await;
    // Both have loaded the fleet's proofs before the timed part.
    eventually("the budgeted replicas share the fleet", 10, || {
        all_shared(&budgeted)
    })
    .await;
    bc[0]
        .clone()
        .get_token(request("client-e", "secret-e", &["orders/write"]))
        .await
        .expect("the first miss gets the slot");
    let s = bc[1]
        .clone()
        .get_token(request("client-e", "secret-e", &[]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let budget = budgeted[1].gateway.broker.budget_stats();
    assert_eq!(budget.snapshot().refused, 1);
    assert_eq!(budget.snapshot().strangers_refused, 0);
}

fn fleet(r: &TestGateway) -> &FleetCache {
    r.gateway.broker.fleet().expect("redis backend")
}

fn all_shared(replicas: &[TestGateway]) -> bool {
    replicas.iter().all(|r| fleet(r).is_shared())
}

/// One Cognito call for `req` across the fleet, under concurrent load.
async fn one_call_for_the_fleet(
    emu: &Emulator,
    clients: &[GatewayClient<Channel>],
    req: GetTokenRequest,
) {
    let before = emu.token_requests();
    let tokens = burst(clients, 150, req).await;
    assert_eq!(
        emu.token_requests() - before,
        1,
        "one Cognito call for the fleet"
    );
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one token");
}

fn target(url: String, ca: &Path, password: Option<&str>) -> FleetSettings {
    FleetSettings {
        redis: RedisTarget {
            url,
            mode: RedisMode::Auto,
            ca_pem: Some(std::fs::read(ca).unwrap()),
            username: None,
            password: password.map(|p| SecretString::from(p.to_owned())),
            iam: None,
            timeout: Duration::from_secs(2),
        },
        lock_ttl: Duration::from_secs(10),
        lock_wait: Duration::from_secs(3),
    }
}

async fn connect(settings: FleetSettings) -> Result<Topology, LinkError> {
    FleetCache::new(&settings, &[7u8; 32])
        .unwrap()
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_an_acl_user_is_one_fleet() {
    if !redis_present() {
        return;
    }
    let pki = pki();
    let node = acl_node(&pki);
    let emu = emulator(vec![client_b(), client_c(), client_d(), client_e()]).await;
    let password_file = pki.dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{REDIS_PASSWORD}\n")).unwrap();
    let mut cfg = fleet_config(
        &emu,
        format!("rediss://gateway@localhost:{}", node.port),
        &pki.ca,
    );
    cfg.cache.redis_password_file = Some(password_file);
    let (replicas, mut clients) = start_replicas(&cfg, 3).await;

    one_call_for_the_fleet(&emu, &clients, request(CLIENT, SECRET, &[])).await;
    assert_eq!(fleet(&replicas[0]).topology(), Some(&Topology::Standalone));
    eventually("every replica shares the fleet", 10, || {
        all_shared(&replicas)
    })
    .await;
    for r in &replicas {
        let (_, metrics) = r.admin_get("/metrics").await;
        assert_eq!(metric(&metrics, "m2m_gateway_redis_up"), 1.0);
        assert_eq!(metric(&metrics, "m2m_gateway_fleet_shared"), 1.0);
    }

    // A proof made on replica 0 reaches replicas 1 and 2; a refusal too.
    let before = replicas[2].gateway.broker.proven_secrets();
    clients[0]
        .get_token(request("client-b", "secret-b", &[]))
        .await
        .unwrap();
    eventually("client-b's proof reached replica 2", 5, || {
        replicas[2].gateway.broker.proven_secrets() == before + 1
    })
    .await;
    let calls = emu.token_requests();
    let t = clients[2]
        .get_token(request("client-b", "secret-b", &[]))
        .await
        .unwrap();
    assert!(!t.into_inner().access_token.is_empty());
    assert_eq!(emu.token_requests(), calls, "served from the fleet's cache");
    // Cognito deletes client-a's secret; replica 0 presents it upstream (a scope
    // set not cached yet) and is refused: replica 2 forgets it and no longer
    // serves it from the cache.
    let proven = replicas[2].gateway.broker.proven_secrets();
    emu.delete_secret(CLIENT, SECRET);
    let s = clients[0]
        .get_token(request(CLIENT, SECRET, &["orders/write"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    eventually("the refusal reached replica 2", 5, || {
        replicas[2].gateway.broker.proven_secrets() == proven - 1
    })
    .await;
    let s = clients[2]
        .get_token(request(CLIENT, SECRET, &[]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    assert_one_schedule(&cfg, &clients[0]).await;
}

#[tokio::test]
async fn wrong_ca_wrong_hostname_and_wrong_password_say_so() {
    if !redis_present() {
        return;
    }
    let pki = pki();
    let node = acl_node(&pki);
    let url = |user: &str| format!("rediss://{user}localhost:{}", node.port);

    let ok = connect(target(url("gateway@"), &pki.ca, Some(REDIS_PASSWORD))).await;
    assert_eq!(ok, Ok(Topology::Standalone));

    let e = connect(target(url(""), &pki.other_ca, None))
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Tls(_)), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");

    let e = connect(target(url("gateway@"), &pki.ca, Some("wrong-password")))
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Auth(_)), "{e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(!e.to_string().contains("wrong-password"), "{e}");

    let wrong_name = RedisNode::tls(&pki, &pki.wrong_name_cert, &pki.wrong_name_key, &[]);
    let e = connect(target(
        format!("rediss://localhost:{}", wrong_name.port),
        &pki.ca,
        None,
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, LinkError::Tls(_)), "{e}");
    assert!(
        e.to_string().contains("not valid for name \"localhost\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_one_fleet_and_survives_a_master_failing() {
    if !redis_present() {
        return;
    }
    let pki = pki();
    let mut cluster = RedisCluster::start(&pki);
    let emu = emulator(vec![client_b(), client_c(), client_d(), client_e()]).await;
    // One endpoint, as with a configuration or Serverless endpoint.
    let url = format!("rediss://127.0.0.1:{}", cluster.nodes[0].port);
    let cfg = fleet_config(&emu, url, &pki.ca);

    // check-redis, as an operator runs it on the first day.
    let file = pki.dir.path().join("gateway.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap();
    let (ok, out) = run_to_end(
        std::process::Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
            .args(["check-redis", "--config", file.to_str().unwrap()])
            .env("M2M_GATEWAY__CACHE__ENCRYPTION_KEY", KEY),
    );
    assert!(ok, "{out}");
    assert!(out.contains("TLS, cluster (3 masters)"), "{out}");
    assert!(out.contains("own message received"), "{out}");

    let (replicas, clients) = start_replicas(&cfg, 3).await;
    one_call_for_the_fleet(&emu, &clients, request(CLIENT, SECRET, &[])).await;
    let Some(Topology::Cluster { masters }) = fleet(&replicas[0]).topology() else {
        panic!("not a cluster: {:?}", fleet(&replicas[0]).topology());
    };
    assert_eq!(masters.len(), 3);
    one_call_for_the_fleet(&emu, &clients, request(CLIENT, SECRET, &["orders/read"])).await;
    one_call_for_the_fleet(&emu, &clients, request("client-b", "secret-b", &[])).await;
    eventually("every replica shares the fleet", 10, || {
        all_shared(&replicas)
    })
    .await;
    // Proofs were announced through the cluster: every replica holds both.
    eventually(
        "proofs of client-a and client-b on every replica",
        5,
        || {
            replicas
                .iter()
                .all(|r| r.gateway.broker.proven_secrets() == 2)
        },
    )
    .await;
    // A refusal reaches every replica through the cluster too.
    emu.add_secret("client-b", "secret-b-2");
    clients[0]
        .clone()
        .get_token(request("client-b", "secret-b-2", &[]))
        .await
        .unwrap();
    eventually("the rotated secret's proof on every replica", 5, || {
        replicas
            .iter()
            .all(|r| r.gateway.broker.proven_secrets() == 3)
    })
    .await;
    // Cognito deletes client-a's secret; replica 1 presents it for a scope set
    // not cached yet and is refused: every replica forgets it.
    emu.delete_secret(CLIENT, SECRET);
    let s = clients[1]
        .clone()
        .get_token(request(CLIENT, SECRET, &["orders/write"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    eventually("the refusal reached every replica", 5, || {
        replicas
            .iter()
            .all(|r| r.gateway.broker.proven_secrets() == 2)
    })
    .await;
    let s = clients[2]
        .clone()
        .get_token(request(CLIENT, SECRET, &[]))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unauthenticated,
        "no longer served from the cache"
    );
    emu.add_secret(CLIENT, SECRET);

    // One upstream schedule for the fleet on the cluster as well.
    assert_one_schedule(&cfg, &clients[0]).await;

    let keys = cluster.keys_per_node(&pki);
    assert!(
        keys.iter().filter(|k| !k.is_empty()).count() >= 2,
        "entries spread over the cluster: {keys:?}"
    );

    // A master fails: every GetToken still succeeds, cached or not.
    cluster.nodes[1].stop();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        c.get_token(request(CLIENT, SECRET, &[])).await.unwrap();
        c.get_token(request(CLIENT, SECRET, &["orders/write"]))
            .await
            .unwrap();
        c.get_token(request("client-b", "secret-b", &[]))
            .await
            .unwrap_or_else(|s| panic!("replica {i}: {s:?}"));
    }

    // It comes back: sharing resumes by itself.
    cluster.nodes[1].restart();
    cluster.wait_ok(&pki);
    eventually("every replica shares the fleet again", 30, || {
        all_shared(&replicas)
    })
    .await;
    one_call_for_the_fleet(&emu, &clients, request("client-c", "secret-c", &[])).await;
}

/// `m2m-gateway dev --redis rediss://... --redis-ca FILE`: the dev gateway on a
/// TLS Redis with a private CA (it used to stop at start).
#[tokio::test]
async fn dev_mode_runs_on_a_tls_redis() {
    if !redis_present() {
        return;
    }
    let pki = pki();
    let node = RedisNode::tls(&pki, &pki.cert, &pki.key, &[]);
    let url = format!("rediss://localhost:{}", node.port);
    let dev = DevProcess::start(&["--redis", &url, "--redis-ca", pki.ca.to_str().unwrap()]).await;
    let mut client = GatewayClient::connect(format!("http://{}", dev.addr))
        .await
        .unwrap();
    client
        .get_token(request("dev-client", "dev-secret", &[]))
        .await
        .expect("a token");
    let keys = cli(&pki, node.port, &["--no-raw", "KEYS", "m2m:*"]);
    assert!(keys.contains("m2m:tok:{"), "nothing in Redis: {keys}");
}

/// The kill switch on a TLS cluster: a revocation made on one replica is
/// stored in the cluster (one slot) and announced through it; the other
/// replica refuses the client's earlier token and its GetToken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_replica_through_a_tls_cluster() {
    use m2m_gateway::proto::gateway::{
        admin::v1::{RevokeClientRequest, admin_client::AdminClient},
        v1::{Rejection, ValidateRequest},
    };
    if !redis_present() {
        return;
    }
    let pki = pki();
    let cluster = RedisCluster::start(&pki);
    let admin = EmulatorClient::new("ops-admin", "ops-admin-secret", &["m2m-gateway/admin"]);
    let emu = emulator(vec![admin.clone()]).await;
    let url = format!("rediss://127.0.0.1:{}", cluster.nodes[0].port);
    let mut cfg = fleet_config(&emu, url, &pki.ca);
    cfg.clients = config(&emu, &[client_a(), admin]).clients;
    let (replicas, mut clients) = start_replicas(&cfg, 2).await;
    eventually("every replica shares the fleet", 10, || {
        all_shared(&replicas)
    })
    .await;
    let token = |id: &'static str, secret: &'static str| request(id, secret, &[]);
    let old = clients[0]
        .get_token(token(CLIENT, SECRET))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let admin_token = clients[0]
        .get_token(token("ops-admin", "ops-admin-secret"))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let mut revoke = tonic::Request::new(RevokeClientRequest {
        client_id: CLIENT.into(),
        reason: "leak".into(),
    });
    revoke.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin_token}").parse().unwrap(),
    );
    AdminClient::new(replicas[0].channel().await)
        .revoke_client(revoke)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = clients[1]
            .validate(ValidateRequest {
                token: old.clone(),
                required_scopes: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        if answer.rejection == Rejection::Revoked as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica 2 never refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = clients[1]
        .get_token(token(CLIENT, SECRET))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let keys: Vec<String> = cluster.keys_per_node(&pki).into_iter().flatten().collect();
    assert!(
        keys.iter().any(|k| k.ends_with("\"m2m:{revocations}\"")),
        "{keys:?}"
    );
    for r in replicas {
        r.stop().await;
    }
}
