//! Real `redis-server` processes on loopback, as production runs them: TLS with
//! a throwaway CA, ACL passwords, and a 3-master cluster over TLS
//! (`tls-cluster yes`). Each is stopped when dropped.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

use m2m_gateway::{
    config::Config,
    proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient},
};
use tonic::transport::Channel;

use super::{TestGateway, require_tool};

/// `n` gateway replicas on `cfg`, ready, with a client each.
pub async fn start_replicas(
    cfg: &Config,
    n: usize,
) -> (Vec<TestGateway>, Vec<GatewayClient<Channel>>) {
    let mut replicas = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let r = TestGateway::start(cfg.clone()).await.ready().await;
        clients.push(r.client().await);
        replicas.push(r);
    }
    (replicas, clients)
}

/// `calls` concurrent GetToken calls of `req` spread over `clients`, released
/// together; the tokens.
pub async fn burst(
    clients: &[GatewayClient<Channel>],
    calls: usize,
    req: GetTokenRequest,
) -> Vec<String> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(calls));
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let barrier = barrier.clone();
            let req = req.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                c.get_token(req).await.unwrap().into_inner().access_token
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    tokens
}

/// Polls `check` until it holds, for at most `secs`: for state another replica
/// or Redis changes asynchronously.
pub async fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether redis-server and redis-cli are here (fails under CI=true when not).
pub fn redis_present() -> bool {
    let ok = ["redis-server", "redis-cli"].iter().all(|bin| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    require_tool(
        ok,
        "redis-server and redis-cli",
        "apt-get install redis-server redis-tools",
    )
}

/// A throwaway CA, a server certificate for `localhost` and `127.0.0.1` signed
/// by it, another CA that signed nothing here, and a certificate signed by the
/// CA for a name that is not this host.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (redis-server, redis-cli) takes a leaf whose
        // issuer equals its subject for self-signed.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("m2m test CA {name}"));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(name), cert.pem()).unwrap();
        Issuer::new(params, key)
    };
    let issuer = ca("ca.crt");
    ca("other-ca.crt");
    let leaf = |names: Vec<String>, stem: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, stem.to_owned());
        // The cluster bus uses the same certificate as a client.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join(format!("{stem}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    };
    leaf(vec!["localhost".into(), "127.0.0.1".into()], "redis");
    leaf(vec!["cache.elsewhere.example".into()], "wrong-name");
    let p = |name: &str| dir.path().join(name);
    Pki {
        ca: p("ca.crt"),
        other_ca: p("other-ca.crt"),
        cert: p("redis.crt"),
        key: p("redis.key"),
        wrong_name_cert: p("wrong-name.crt"),
        wrong_name_key: p("wrong-name.key"),
        dir,
    }
}

/// A free loopback port whose cluster-bus twin (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// One redis-server process; can be stopped and started again on its port.
pub struct RedisNode {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl RedisNode {
    fn spawn(args: &[String]) -> Child {
        Self::try_spawn(args).unwrap_or_else(|log| panic!("redis-server {args:?} exited:\n{log}"))
    }

    /// Starts redis-server; its log when it exits before it is ready.
    fn try_spawn(args: &[String]) -> Result<Child, String> {
        let mut child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                return Err(seen.join("\n"));
            };
            if line.contains("Ready to accept connections") {
                break;
            }
            seen.push(line);
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(child)
    }

    /// Starts a node on a free port: `args_for(port)`, tried again on another
    /// port when a parallel test took that one between the probe and the bind.
    fn on_free_port(args_for: impl Fn(u16) -> Vec<String>) -> (Child, u16, Vec<String>) {
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port();
            let args = args_for(port);
            match Self::try_spawn(&args) {
                Ok(child) => return (child, port, args),
                Err(log) if log.contains("Address already in use") => last = log,
                Err(log) => panic!("redis-server {args:?} exited:\n{log}"),
            }
        }
        panic!("no free port for redis-server:\n{last}");
    }

    /// A TLS-only node (`port 0`, `tls-port`), with `extra` arguments.
    pub fn tls(pki: &Pki, cert: &Path, key: &Path, extra: &[&str]) -> Self {
        let (child, port, args) = Self::on_free_port(|port| {
            let dir = pki.dir.path().join(format!("node-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut args: Vec<String> = [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                pki.ca.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec();
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        });
        Self {
            child: Some(child),
            port,
            args,
            _dir: None,
        }
    }

    /// A plain-TCP node on loopback.
    pub fn plain() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (child, port, args) = Self::on_free_port(|port| {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.path().to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec()
        });
        Self {
            child: Some(child),
            port,
            args,
            _dir: Some(dir),
        }
    }

    /// A connection to a plain node, for tests that play the attacker.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Stops the process (SIGKILL: a node that fails).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(Self::spawn(&self.args));
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `redis-cli` over TLS against `port`; its output.
pub fn cli(pki: &Pki, port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["--tls", "--cacert", pki.ca.to_str().unwrap()])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A 3-master Redis Cluster over TLS (client and bus), no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    pub fn start(pki: &Pki) -> Self {
        let nodes: Vec<RedisNode> = (0..3)
            .map(|_| {
                RedisNode::tls(
                    pki,
                    &pki.cert,
                    &pki.key,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--tls-cluster",
                        "yes",
                        "--tls-replication",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(pki, nodes[0].port, &args);
        assert!(out.contains("All 16384 slots covered"), "{out}");
        let cluster = Self { nodes };
        cluster.wait_ok(pki);
        cluster
    }

    /// Waits (bounded) until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self, pki: &Pki) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let info = cli(pki, node.port, &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The keys each node holds (by `KEYS *`).
    pub fn keys_per_node(&self, pki: &Pki) -> Vec<Vec<String>> {
        self.nodes
            .iter()
            .map(|n| {
                cli(pki, n.port, &["--no-raw", "KEYS", "*"])
                    .lines()
                    .filter(|l| l.contains("m2m:"))
                    .map(|l| l.to_owned())
                    .collect()
            })
            .collect()
    }
}
