//! The fleet's proven secrets: a hash per client of sealed proofs and refusals,
//! announced on a channel so every replica learns of one at once.

use std::sync::atomic::Ordering::Relaxed;

use futures_util::{future::BoxFuture, stream::BoxStream};

use super::*;

/// A proof or a refusal as stored and announced (encrypted): the verifier, never
/// the secret; when Cognito was asked; until when a proof lasts.
#[derive(Serialize, Deserialize)]
pub(crate) struct SharedProof {
    pub(super) verifier: String,
    pub(super) refused: bool,
    pub(super) at_ms: u64,
    pub(super) until_ms: u64,
}

/// An announcement: a record and the client it is for, sealed together.
#[derive(Serialize, Deserialize)]
struct Announcement {
    client: String,
    proof: SharedProof,
}

/// The longest access-token lifetime Cognito allows, in ms.
const ONE_DAY_MS: u64 = 86_400_000;
/// The associated data of sealed announcements.
const ANNOUNCEMENT_AAD: &str = "m2m:proofs announcement";
/// The longest announcement read (a real one is about 300 bytes).
const MAX_ANNOUNCEMENT: usize = 4096;

/// A stored or announced record, in the broker's terms; a proof whose end has
/// passed (by `now_ms`, 0 = keep) is none.
fn to_record(proof: &SharedProof, verifier: Verifier, now_ms: u64) -> Option<ProofRecord> {
    let at = ms_to_instant(proof.at_ms);
    if proof.refused {
        Some(ProofRecord::Refused { verifier, at })
    } else {
        (proof.until_ms > now_ms).then(|| ProofRecord::Proven {
            verifier,
            until: ms_to_instant(proof.until_ms),
            at,
        })
    }
}

impl FleetCache {
    /// Records a proof or a refusal for the fleet and announces it. Proofs and
    /// refusals of one verifier live in two fields (`p:`, `r:`), so neither
    /// overwrites the other: whoever reads both applies the newer.
    pub(crate) async fn put_record(
        &self,
        client_key: &str,
        record: &ProofRecord,
    ) -> Result<(), FleetError> {
        let (proof, ttl) = match *record {
            ProofRecord::Proven {
                verifier,
                until,
                at,
            } => {
                let until_ms = instant_to_ms(until);
                let shared = SharedProof {
                    verifier: STANDARD_NO_PAD.encode(verifier),
                    refused: false,
                    at_ms: instant_to_ms(at),
                    until_ms,
                };
                (shared, until_ms.saturating_sub(now_ms()))
            }
            ProofRecord::Refused { verifier, at } => {
                let shared = SharedProof {
                    verifier: STANDARD_NO_PAD.encode(verifier),
                    refused: true,
                    at_ms: instant_to_ms(at),
                    until_ms: 0,
                };
                (shared, 0)
            }
        };
        if ttl == 0 && !proof.refused {
            return Ok(());
        }
        let verifier = match record {
            ProofRecord::Proven { verifier, .. } | ProofRecord::Refused { verifier, .. } => {
                verifier
            }
        };
        let field = self.record_field(verifier, proof.refused);
        if proof.refused {
            // Stored only where it beats a stored proof (it lives as long as that
            // proof's hash): a stranger's wrong secrets add nothing to Redis.
            let proven: bool = self
                .call(
                    redis::cmd("HEXISTS")
                        .arg(client_key)
                        .arg(self.record_field(verifier, false)),
                )
                .await
                .unwrap_or(false);
            if !proven {
                return self.announce(client_key, proof).await;
            }
        }
        let blob = self.seal(&format!("{client_key}/{field}"), &proof)?;
        let hset = redis::cmd("HSET")
            .arg(client_key)
            .arg(&field)
            .arg(&blob)
            .clone();
        if let Err(FleetError::Data(e)) = self.call::<i64>(&hset).await {
            // Our own key, overwritten with another type: it is ours to replace.
            tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis was not a hash; replaced");
            let _: i64 = self.call(redis::cmd("DEL").arg(client_key)).await?;
            let _: i64 = self.call(&hset).await?;
        }
        // NX gives a new hash its lifetime; GT lets a later proof extend it (a
        // refusal lives as long as the proofs it beats).
        if ttl > 0 {
            for flag in ["NX", "GT"] {
                let _: i64 = self
                    .call(redis::cmd("PEXPIRE").arg(client_key).arg(ttl).arg(flag))
                    .await?;
            }
        } else {
            // The proof's hash may have expired since: never a key without a TTL.
            let _: i64 = self
                .call(
                    redis::cmd("PEXPIRE")
                        .arg(client_key)
                        .arg(ONE_DAY_MS)
                        .arg("NX"),
                )
                .await?;
        }
        self.announce(client_key, proof).await
    }
    /// Publishes a record, sealed whole: kind, client, verifier and times are
    /// authenticated together, so none can be changed or moved to another client.
    pub(super) async fn announce(
        &self,
        client_key: &str,
        proof: SharedProof,
    ) -> Result<(), FleetError> {
        let sealed = self.seal(
            ANNOUNCEMENT_AAD,
            &Announcement {
                client: client_key.to_owned(),
                proof,
            },
        )?;
        let message = STANDARD_NO_PAD.encode(sealed);
        let _: i64 = self
            .call(redis::cmd("PUBLISH").arg(PROOF_CHANNEL).arg(message))
            .await?;
        Ok(())
    }
    /// A client's live proofs and remembered refusals.
    pub(crate) async fn load_proofs(
        &self,
        client_key: &str,
    ) -> Result<Vec<ProofRecord>, FleetError> {
        // Bounded: a hash overwritten with another type or stuffed with junk is
        // skipped (and said so), never read whole and never fatal.
        let fields: Vec<(String, Vec<u8>)> = match self
            .call::<usize>(redis::cmd("HLEN").arg(client_key))
            .await
        {
            Ok(n) if n > MAX_PROOF_FIELDS => {
                self.stats.corrupt.fetch_add(1, Relaxed);
                tracing::warn!(
                    key = client_key,
                    fields = n,
                    "a client's proof hash in Redis is oversized; skipped"
                );
                return Ok(Vec::new());
            }
            Ok(_) => match self.call(redis::cmd("HGETALL").arg(client_key)).await {
                Err(FleetError::Data(e)) => {
                    tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis is unreadable; skipped");
                    return Ok(Vec::new());
                }
                other => other?,
            },
            Err(FleetError::Data(e)) => {
                tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis is unreadable; skipped");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let now = now_ms();
        Ok(fields
            .into_iter()
            .filter_map(|(field, blob)| {
                let proof: SharedProof = self.open(&format!("{client_key}/{field}"), blob)?;
                let (verifier, refused) = self.check_proof(&proof)?;
                // The field is the record's own name: a sealed record cannot be
                // replayed under another verifier or kind.
                (self.record_field(&verifier, refused) == field).then_some(())?;
                to_record(&proof, verifier, now)
            })
            .collect())
    }
    pub(super) fn check_proof(&self, proof: &SharedProof) -> Option<(Verifier, bool)> {
        let verifier = <[u8; 32]>::try_from(STANDARD_NO_PAD.decode(&proof.verifier).ok()?).ok()?;
        Some((verifier, proof.refused))
    }
    /// Subscribes to the fleet's proof and revocation announcements (a
    /// dedicated connection).
    pub(super) async fn proof_events(
        self: &std::sync::Arc<Self>,
    ) -> Result<impl futures_util::Stream<Item = FleetEvent> + Send + use<>, FleetError> {
        let mut pubsub = self.link.pubsub().await.map_err(FleetError::Link)?;
        tokio::time::timeout(
            self.timeout.max(Duration::from_secs(1)),
            pubsub.subscribe(&[PROOF_CHANNEL, super::revocations::REVOCATION_CHANNEL]),
        )
        .await
        .map_err(|_| FleetError::Timeout)?
        .map_err(|e| FleetError::Link(LinkError::from_redis(&e)))?;
        let this = std::sync::Arc::clone(self);
        Ok(futures_util::StreamExt::filter_map(
            pubsub.into_on_message(),
            move |msg| {
                let event = if msg.get_channel_name() == super::revocations::REVOCATION_CHANNEL {
                    Some(FleetEvent::Revocations)
                } else {
                    msg.get_payload::<String>()
                        .ok()
                        .and_then(|text| this.parse_event(&text))
                        .map(FleetEvent::Proof)
                };
                std::future::ready(event)
            },
        ))
    }
    /// An announcement, if it is one this fleet sealed; anything else (junk,
    /// a changed byte, a message of another fleet) is dropped and counted.
    pub(super) fn parse_event(&self, text: &str) -> Option<ProofEvent> {
        if text.len() > MAX_ANNOUNCEMENT {
            self.stats.corrupt.fetch_add(1, Relaxed);
            return None;
        }
        let opened = STANDARD_NO_PAD
            .decode(text)
            .ok()
            .and_then(|blob| self.open::<Announcement>(ANNOUNCEMENT_AAD, blob));
        let Some(announcement) = opened else {
            self.stats.corrupt.fetch_add(1, Relaxed);
            return None;
        };
        let (verifier, _) = self.check_proof(&announcement.proof)?;
        let record = to_record(&announcement.proof, verifier, 0)?;
        Some(ProofEvent {
            client: announcement.client,
            record,
        })
    }
    pub(super) fn record_field(&self, verifier: &Verifier, refused: bool) -> String {
        let name = self.proof_field(verifier);
        if refused {
            format!("r:{name}")
        } else {
            format!("p:{name}")
        }
    }
}

/// The proof store on Redis (an `Arc`: the subscription outlives the call that
/// makes it).
impl ProofStore for std::sync::Arc<FleetCache> {
    fn client_ref(&self, client_id: &str) -> ClientRef {
        self.proof_key(client_id)
    }

    fn load<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, Option<Vec<ProofRecord>>> {
        Box::pin(async move { self.load_proofs(client).await.ok() })
    }

    fn record<'a>(&'a self, client: &'a ClientRef, record: ProofRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.put_record(client, &record).await;
        })
    }

    fn forget<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.call::<i64>(redis::cmd("DEL").arg(client)).await;
        })
    }

    fn subscribe(&self) -> BoxFuture<'_, Option<BoxStream<'static, FleetEvent>>> {
        Box::pin(async move {
            match self.proof_events().await {
                Ok(events) => Some(Box::pin(events) as BoxStream<'static, FleetEvent>),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to the fleet's proven secrets yet");
                    None
                }
            }
        })
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.mark_subscribed(subscribed);
    }

    fn heartbeat(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = FleetCache::heartbeat(self).await;
        })
    }
}
