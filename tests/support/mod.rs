//! Spawns the emulator and the gateway on loopback for end-to-end tests.
#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, time::Duration};

pub mod redis_servers;

use m2m_gateway::{
    config::Config,
    dev,
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    proto::gateway::v1::gateway_client::GatewayClient,
    server::App,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub const CLIENT: &str = "client-a";
pub const SECRET: &str = "secret-a";

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: App,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), m2m_gateway::server::StartError>>>,
}

impl TestGateway {
    pub async fn start(config: Config) -> Self {
        Self::start_at(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On a chosen address (a gateway that comes back where it was).
    pub async fn start_at(config: Config, at: SocketAddr) -> Self {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let gateway = App::from_config(config).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(
            gateway
                .clone()
                .serve_on(listener, Some(admin_listener), async {
                    let _ = rx.await;
                }),
        );
        Self {
            addr,
            admin,
            gateway,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Waits until the first key set is loaded (readiness).
    pub async fn ready(self) -> Self {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.gateway.validator.wait_loaded(),
        )
        .await
        .expect("keys loaded");
        self
    }

    pub async fn client(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Sends the shutdown signal (as SIGTERM does) without waiting for the end.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An emulator with `client-a` (scopes orders/read orders/write) and whatever else.
pub async fn emulator(extra: Vec<EmulatorClient>) -> Emulator {
    let mut clients = vec![EmulatorClient::new(
        CLIENT,
        SECRET,
        &["orders/read", "orders/write"],
    )];
    clients.extend(extra);
    Emulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EmulatorConfig {
            clients,
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A gateway config for `emu` registering the given clients.
pub fn config(emu: &Emulator, registered: &[EmulatorClient]) -> Config {
    dev::config_for(emu, SocketAddr::from(([127, 0, 0, 1], 0)), registered)
}

pub fn client_a() -> EmulatorClient {
    EmulatorClient::new(CLIENT, SECRET, &["orders/read", "orders/write"])
}

/// A loopback "Cognito" that accepts connections and never answers: the address,
/// and a channel that yields once per accepted connection.
pub async fn silent_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    (addr, accepted)
}

/// Whether a required external tool is present; under CI=true its absence fails
/// the test, elsewhere the test is skipped loudly.
pub fn require_tool(ok: bool, what: &str, install: &str) -> bool {
    if ok {
        return true;
    }
    let msg = format!("{what} is missing; install it with: {install}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPING: {msg}");
    false
}

/// Log output captured in memory: install with `tracing_subscriber::fmt()
/// .with_writer(move || capture.clone())`.
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// `m2m-gateway dev` as a child process (gateway and emulator on free loopback
/// ports, plus `extra` arguments), started and read up to the end of its banner,
/// which it prints once ready. Killed on drop.
pub struct DevProcess {
    child: Option<std::process::Child>,
    /// Everything printed up to and including "Ctrl-C stops.".
    pub banner: String,
    /// The gateway's address, from the banner.
    pub addr: String,
    /// Everything the process wrote to stderr so far (its logs), for failure messages.
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl DevProcess {
    pub async fn start(extra: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--emulator-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let errors = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in errors.lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let banner = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let line = line.unwrap();
                text.push_str(&line);
                text.push('\n');
                if line.contains("Ctrl-C stops.") {
                    break;
                }
            }
            // Keep reading to the end, as a terminal would: the gateway's stdout
            // stays open for as long as it runs.
            std::thread::spawn(move || lines.for_each(drop));
            text
        });
        let banner = tokio::time::timeout(Duration::from_secs(30), banner)
            .await
            .expect("dev mode ready in time")
            .unwrap();
        let addr = banner
            .split("gateway on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("no address in the banner: {banner}"))
            .to_owned();
        Self {
            child: Some(child),
            banner,
            addr,
            stderr,
        }
    }

    /// The process, no longer killed on drop (to stop it another way).
    pub fn into_child(mut self) -> std::process::Child {
        self.child.take().unwrap()
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to its end: whether it succeeded, and its stdout then stderr.
pub fn run_to_end(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The value of the series `name_and_labels` (exactly as rendered) in a
/// Prometheus text exposition.
pub fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{name_and_labels} not in metrics:\n{body}"))
}

/// `m2m-gateway serve --config <config>` as a child process with `envs` set,
/// read up to its "gateway listening" line: the child, its log lines as they
/// come (stderr), and the gRPC address from that line.
pub async fn serve_process(
    config: &std::path::Path,
    envs: &[(&str, String)],
) -> (
    std::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    String,
) {
    let (child, lines, addr, _) = serve_process_logged(config, envs).await;
    (child, lines, addr)
}

/// [`serve_process`], also giving the log lines written before "gateway
/// listening" (the start).
pub async fn serve_process_logged(
    config: &std::path::Path,
    envs: &[(&str, String)],
) -> (
    std::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
    String,
    Vec<String>,
) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut startup = Vec::new();
    let listening = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.recv().await.expect("gateway exited early");
            if line.contains("gateway listening") {
                return line;
            }
            startup.push(line);
        }
    })
    .await
    .expect("gateway starts");
    let addr = listening
        .split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("address in the log line")
        .to_owned();
    (child, lines, addr, startup)
}

/// The next of `lines` that contains `needle`.
pub async fn wait_for_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    loop {
        let line = lines.recv().await.expect("gateway exited early");
        if line.contains(needle) {
            return line;
        }
    }
}
