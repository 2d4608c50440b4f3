//! A tonic load generator for the gateway and protected services. Every response
//! is checked to be a gRPC success (and `valid=true` for Validate); the run fails
//! if any is not.
//!
//! ```sh
//! cargo run --release --example loadgen -- --target validate --addr http://127.0.0.1:50051 \
//!     --gateway http://127.0.0.1:50051 --concurrency 50 --duration 10
//! ```
//! Targets: `validate`, `get-token`, `health` (gateway), `echo` (protected server).
//! Validate and echo use one warm token obtained from `--gateway` first.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use m2m_gateway::proto::{
    Encoded,
    demo::v1::EchoRequest,
    gateway::v1::{GetTokenRequest, ValidateRequest, gateway_client::GatewayClient},
};
use tonic::{
    Request, Status,
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::HealthCheckRequest;

/// What is read of a Validate answer: only what is checked.
#[derive(Clone, PartialEq, prost::Message)]
struct ValidateHead {
    #[prost(bool, tag = "1")]
    valid: bool,
}

/// What is read of a GetToken answer.
#[derive(Clone, PartialEq, prost::Message)]
struct GetTokenHead {
    #[prost(bytes = "bytes", tag = "1")]
    access_token: bytes::Bytes,
}

/// An answer whose content is not checked (only its gRPC status).
#[derive(Clone, PartialEq, prost::Message)]
struct Ignored {}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Target {
    Validate,
    GetToken,
    Health,
    Echo,
}

#[derive(Parser)]
struct Args {
    /// What to call.
    #[arg(long, value_enum)]
    target: Target,
    /// Server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Gateway that issues the warm token (validate, echo).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// Concurrent in-flight calls.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to run (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Client id for GetToken.
    #[arg(long, default_value = "dev-client")]
    client_id: String,
    /// Client secret for GetToken.
    #[arg(
        long,
        env = "M2M_CLIENT_SECRET",
        default_value = "dev-secret",
        hide_env_values = true
    )]
    client_secret: String,
    /// Scopes for GetToken.
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The CPU core the server is pinned to: reports how busy it was while
    /// measuring (from /proc/stat, time stolen by the hypervisor left out) and the
    /// calls per second of that core's busy time, which does not depend on whether
    /// this load generator kept the server saturated.
    #[arg(long)]
    server_core: Option<usize>,
    /// Instead of loading: write the target's request as a gRPC frame (the body
    /// file of `h2load -d`) to this file, make one call, and print the size of the
    /// answer's frame (`answer_frame_bytes=N`) so that a run of N calls can be
    /// checked by its byte count. Not for echo.
    #[arg(long)]
    write_request: Option<std::path::PathBuf>,
}

/// Busy and available time of one CPU core, in clock ticks, from /proc/stat.
fn core_times(core: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let field = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    let available = busy + field(3) + field(4);
    Some((busy, available))
}

/// One HTTP/2 connection to `addr`.
async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(addr.to_owned())?.tcp_nodelay(true);
    Ok(endpoint.connect().await?)
}

/// One unary call with requests encoded once and answers read only as far as
/// they are checked.
async fn call<Req, Resp>(
    grpc: &mut Grpc<Channel>,
    path: &'static str,
    request: Request<Req>,
) -> Result<Resp, Status>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(request, PathAndQuery::from_static(path), codec)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args.addr).await?);
    }
    let token = match args.target {
        Target::Validate | Target::Echo => {
            let gw = Channel::from_shared(args.gateway.clone())?
                .connect()
                .await?;
            let t = GatewayClient::new(gw)
                .get_token(get_token_request(&args))
                .await?
                .into_inner();
            Some(Arc::<str>::from(t.access_token))
        }
        _ => None,
    };

    let requests = Arc::new(Requests {
        validate: Encoded::of(&ValidateRequest {
            token: token.as_deref().unwrap_or_default().to_owned(),
            required_scopes: Vec::new(),
        }),
        get_token: Encoded::of(&get_token_request(&args)),
        health: Encoded::of(&HealthCheckRequest {
            service: String::new(),
        }),
        echo: Encoded::of(&EchoRequest {
            message: "load".into(),
        }),
        bearer: token
            .as_deref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()?,
    });
    if let Some(path) = &args.write_request {
        return write_request(&args, &requests, channels.swap_remove(0), path).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let channel = channels[i % channels.len()].clone();
        let (args, stop, measuring, failures) = (
            args.clone(),
            stop.clone(),
            measuring.clone(),
            failures.clone(),
        );
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut grpc = Grpc::new(channel);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = match args.target {
                    Target::Validate => call::<_, ValidateHead>(
                        &mut grpc,
                        "/m2m.gateway.v1.Gateway/Validate",
                        Request::new(requests.validate.clone()),
                    )
                    .await
                    .is_ok_and(|r| r.valid),
                    Target::GetToken => call::<_, GetTokenHead>(
                        &mut grpc,
                        "/m2m.gateway.v1.Gateway/GetToken",
                        Request::new(requests.get_token.clone()),
                    )
                    .await
                    .is_ok_and(|r| !r.access_token.is_empty()),
                    Target::Health => call::<_, Ignored>(
                        &mut grpc,
                        "/grpc.health.v1.Health/Check",
                        Request::new(requests.health.clone()),
                    )
                    .await
                    .is_ok(),
                    Target::Echo => {
                        let mut req = Request::new(requests.echo.clone());
                        if let Some(bearer) = &requests.bearer {
                            req.metadata_mut().insert("authorization", bearer.clone());
                        }
                        call::<_, Ignored>(&mut grpc, "/m2m.demo.v1.Echo/Echo", req)
                            .await
                            .is_ok()
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    let micros = started.elapsed().as_micros().max(1) as u64;
                    let _ = hist.record(micros.min(60_000_000));
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let core_start = args.server_core.and_then(core_times);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let core_end = args.server_core.and_then(core_times);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await?)?;
    }
    let failed = failures.load(Ordering::Relaxed);
    let rps = total.len() as f64 / elapsed.as_secs_f64();
    let server = match (core_start, core_end) {
        (Some((b0, a0)), Some((b1, a1))) if a1 > a0 => {
            let busy = (b1 - b0) as f64 / (a1 - a0) as f64;
            format!(
                " server_busy={:.0}% per_busy_second={:.0}",
                busy * 100.0,
                rps / busy.max(f64::EPSILON)
            )
        }
        _ => String::new(),
    };
    println!(
        "target={:?} concurrency={} connections={} requests={} failed={} rps={:.0} p50={}us p99={}us p99.9={}us max={}us{server}",
        args.target,
        args.concurrency,
        args.connections,
        total.len(),
        failed,
        rps,
        total.value_at_quantile(0.50),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max(),
    );
    anyhow::ensure!(failed == 0, "{failed} calls were not a gRPC success");
    Ok(())
}

/// Writes the gRPC frame of the target's request and prints the frame size of
/// its answer (prost's encoding is canonical: re-encoding gives the same length).
async fn write_request(
    args: &Args,
    requests: &Requests,
    channel: Channel,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use prost::Message as _;
    let (request, answer_len) = match args.target {
        Target::Validate => {
            let answer = GatewayClient::new(channel)
                .validate(ValidateRequest::decode(requests.validate.0.clone())?)
                .await?
                .into_inner();
            anyhow::ensure!(answer.valid, "the warm token is not valid: {answer:?}");
            (&requests.validate, answer.encoded_len())
        }
        Target::GetToken => {
            let answer = GatewayClient::new(channel)
                .get_token(GetTokenRequest::decode(requests.get_token.0.clone())?)
                .await?
                .into_inner();
            (&requests.get_token, answer.encoded_len())
        }
        Target::Health => {
            let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await?
                .into_inner();
            (&requests.health, answer.encoded_len())
        }
        Target::Echo => anyhow::bail!("--write-request is for validate, get-token and health"),
    };
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(request.0.len())?.to_be_bytes());
    frame.extend_from_slice(&request.0);
    std::fs::write(path, frame)?;
    println!("answer_frame_bytes={}", 5 + answer_len);
    Ok(())
}

/// Every request, encoded once.
struct Requests {
    validate: Encoded,
    get_token: Encoded,
    health: Encoded,
    echo: Encoded,
    bearer: Option<MetadataValue<tonic::metadata::Ascii>>,
}

fn get_token_request(args: &Args) -> GetTokenRequest {
    GetTokenRequest {
        client_id: args.client_id.clone(),
        client_secret: args.client_secret.clone(),
        scopes: args.scopes.clone(),
    }
}
