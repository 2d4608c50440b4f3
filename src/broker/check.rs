//! `m2m-gateway check-redis`: the operator's first-day test of the fleet's
//! Redis. Connects with the configured TLS and credentials, says what the
//! endpoint is, runs every script and command the fleet uses once on throwaway
//! keys (one hash slot, gone within a minute), and sends itself an announcement.

use std::{fmt, time::Duration};

use futures_util::StreamExt as _;
use tokio::time::Instant;

use super::{
    budget::RESERVE_SCRIPT,
    fleet::{FleetCache, UNLOCK_SCRIPT},
    target::{LinkError, Topology},
};

/// What `check-redis` found.
#[derive(Debug, Clone)]
pub struct RedisReport {
    /// The endpoint, password redacted.
    pub endpoint: String,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Standalone or cluster, with the masters.
    pub topology: Topology,
    /// Round trip of the announcement to itself.
    pub announcement: Duration,
}

impl fmt::Display for RedisReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "redis: {}", self.endpoint)?;
        writeln!(
            f,
            "connection: {}, {}",
            if self.tls {
                "TLS"
            } else {
                "plain TCP (no TLS)"
            },
            self.topology
        )?;
        if let Topology::Cluster { masters } = &self.topology {
            let list: Vec<String> = masters.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            writeln!(f, "masters: {}", list.join(", "))?;
        }
        writeln!(
            f,
            "commands: GET, SET NX PX, EXISTS, HSET, HGETALL, PEXPIRE NX/GT, HDEL, DEL: ok"
        )?;
        writeln!(f, "scripts: lock release, upstream budget: ok")?;
        writeln!(
            f,
            "announcements: subscribed, own message received in {} ms",
            self.announcement.as_millis()
        )?;
        write!(
            f,
            "OK: replicas using this Redis share tokens, proofs and the upstream budget"
        )
    }
}

/// Why `check-redis` failed: the step and the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{step}: {cause}")]
pub struct RedisCheckError {
    /// What was being tried.
    pub step: &'static str,
    /// What went wrong.
    pub cause: LinkError,
}

impl FleetCache {
    /// Runs the fleet's commands, scripts and announcements once against Redis.
    pub async fn self_check(&self) -> Result<RedisReport, RedisCheckError> {
        let fail = |step: &'static str| move |cause: LinkError| RedisCheckError { step, cause };
        let topology = self.connect().await.map_err(fail("connect"))?;
        let mut conn = self.link().conn().await.map_err(fail("connect"))?;
        let mut nonce = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut nonce);
        let tag: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        // One hash tag: every key of the check lives in one slot.
        let key = |what: &str| format!("m2m:check:{{{tag}}}:{what}");
        let timeout = self.timeout().max(Duration::from_secs(2));
        macro_rules! run {
            ($step:literal, $ty:ty, $cmd:expr) => {
                match tokio::time::timeout(timeout, $cmd.query_async::<$ty>(&mut conn)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => return Err(fail($step)(LinkError::from_redis(&e))),
                    Err(_) => return Err(fail($step)(LinkError::Timeout(timeout))),
                }
            };
        }
        let lock = key("lock");
        let _: Option<String> = run!(
            "SET NX PX",
            Option<String>,
            redis::cmd("SET")
                .arg(&lock)
                .arg("me")
                .arg("NX")
                .arg("PX")
                .arg(60_000)
        );
        let _: bool = run!("EXISTS", bool, redis::cmd("EXISTS").arg(&lock));
        let _: Option<Vec<u8>> = run!("GET", Option<Vec<u8>>, redis::cmd("GET").arg(&lock));
        let released: i64 = run!(
            "lock release script",
            i64,
            redis::cmd("EVAL")
                .arg(UNLOCK_SCRIPT)
                .arg(1)
                .arg(&lock)
                .arg("me")
        );
        if released != 1 {
            return Err(fail("lock release script")(LinkError::Redis(format!(
                "released {released} keys, expected 1"
            ))));
        }
        let hash = key("proofs");
        let _: i64 = run!("HSET", i64, redis::cmd("HSET").arg(&hash).arg("f").arg("v"));
        let _: i64 = run!(
            "PEXPIRE NX",
            i64,
            redis::cmd("PEXPIRE").arg(&hash).arg(60_000).arg("NX")
        );
        let _: i64 = run!(
            "PEXPIRE GT",
            i64,
            redis::cmd("PEXPIRE").arg(&hash).arg(60_000).arg("GT")
        );
        let _: Vec<(String, String)> = run!(
            "HGETALL",
            Vec<(String, String)>,
            redis::cmd("HGETALL").arg(&hash)
        );
        let _: i64 = run!("HDEL", i64, redis::cmd("HDEL").arg(&hash).arg("f"));
        let budget = key("budget");
        let (admitted, _, _): (i64, i64, i64) = run!(
            "upstream budget script",
            (i64, i64, i64),
            redis::cmd("EVAL")
                .arg(RESERVE_SCRIPT)
                .arg(1)
                .arg(&budget)
                .arg(1_000_000u64)
                .arg("0")
                .arg(0u64)
        );
        if admitted != 1 {
            return Err(fail("upstream budget script")(LinkError::Redis(
                "a fresh schedule refused its first slot".into(),
            )));
        }
        let _: i64 = run!("DEL", i64, redis::cmd("DEL").arg(&budget).arg(&hash));

        let channel = key("channel");
        let mut pubsub = self.link().pubsub().await.map_err(fail("subscribe"))?;
        match tokio::time::timeout(timeout, pubsub.subscribe(&channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fail("subscribe")(LinkError::from_redis(&e))),
            Err(_) => return Err(fail("subscribe")(LinkError::Timeout(timeout))),
        }
        let sent = Instant::now();
        let _: i64 = run!(
            "PUBLISH",
            i64,
            redis::cmd("PUBLISH").arg(&channel).arg(&tag)
        );
        let mut messages = pubsub.on_message();
        let received = tokio::time::timeout(timeout, async {
            while let Some(msg) = messages.next().await {
                if msg.get_payload::<String>().is_ok_and(|p| p == tag) {
                    return true;
                }
            }
            false
        })
        .await;
        if received != Ok(true) {
            return Err(fail("announcements")(LinkError::Redis(format!(
                "own message on {channel} not received within {timeout:?}"
            ))));
        }
        Ok(RedisReport {
            endpoint: self.link().describe_url(),
            tls: self.link().is_tls(),
            topology,
            announcement: sent.elapsed(),
        })
    }
}
