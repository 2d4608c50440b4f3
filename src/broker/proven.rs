//! Proven secrets: the keyed hashes ("verifiers") of client secrets that Cognito
//! accepted. A cached token is handed to any caller presenting a proven secret of
//! its client; Cognito allows two live secrets per app client while one is
//! rotated, so a client holds several. A proof lasts until Cognito refuses that
//! secret, or until one token lifetime passes without Cognito accepting it again.
//!
//! Proofs and refusals carry the time Cognito was asked, and the newer one wins:
//! a refusal is remembered (for the longest token lifetime) so that a proof made
//! before it — replayed by whoever can write to the fleet's store, or merely late —
//! cannot bring the secret back, while a secret Cognito accepts again afterwards is
//! proven again.

use std::sync::RwLock;

use subtle::{Choice, ConstantTimeEq};
use tokio::time::Instant;

/// HMAC-SHA-256 of (client id, secret) under the gateway's verifier key.
pub(crate) type Verifier = [u8; 32];

/// Most proven secrets kept per client: Cognito's two live ones, plus room for a
/// secret deleted in Cognito that nobody has presented since.
pub(crate) const MAX_PER_CLIENT: usize = 4;

/// How long a refusal is remembered: no proof made before it can still be live
/// after that (Cognito's longest access-token lifetime is a day).
const REMEMBER_REFUSALS: std::time::Duration = std::time::Duration::from_secs(86_400);
/// Most refusals remembered per client.
const MAX_REFUSALS: usize = 16;

#[derive(Clone, Copy)]
struct Proof {
    verifier: Verifier,
    until: Instant,
    /// When Cognito was asked.
    at: Instant,
}

#[derive(Clone, Copy)]
struct Refusal {
    verifier: Verifier,
    at: Instant,
}

#[derive(Default)]
struct ClientProofs {
    proofs: Vec<Proof>,
    refusals: Vec<Refusal>,
    /// Every proof made at or before this was dropped (the client was revoked
    /// or restored): an announcement of one arriving late is ignored.
    forgotten_at: Option<Instant>,
}

/// The proven verifiers of every registered client, by the client's index in
/// the registry (which is immutable, so the table never grows).
pub(crate) struct ProvenSecrets {
    clients: Box<[RwLock<ClientProofs>]>,
}

impl std::fmt::Debug for ProvenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvenSecrets")
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl ProvenSecrets {
    pub(crate) fn new(clients: usize) -> Self {
        Self {
            clients: (0..clients)
                .map(|_| RwLock::new(ClientProofs::default()))
                .collect(),
        }
    }

    /// Whether `verifier` is proven for client `index` at `now`. Compares against
    /// every live proof in constant time.
    pub(crate) fn is_proven(&self, index: usize, verifier: &Verifier, now: Instant) -> bool {
        let Some(slot) = self.clients.get(index) else {
            return false;
        };
        let client = slot.read().unwrap_or_else(|p| p.into_inner());
        let wanted = words(verifier);
        let mut found = Choice::from(0);
        for p in client.proofs.iter() {
            let live = Choice::from(u8::from(p.until > now));
            found |= words(&p.verifier).ct_eq(&wanted) & live;
        }
        found.into()
    }

    /// Records that Cognito accepted `verifier`'s secret, asked now.
    #[cfg(test)]
    pub(crate) fn prove(&self, index: usize, verifier: Verifier, until: Instant) -> bool {
        self.prove_at(index, verifier, until, Instant::now())
    }

    /// Records that Cognito, asked at `at`, accepted `verifier`'s secret; it stays
    /// proven until `until` unless accepted again. Ignored when a refusal as new
    /// or newer is known. Returns whether it was not proven before.
    pub(crate) fn prove_at(
        &self,
        index: usize,
        verifier: Verifier,
        until: Instant,
        at: Instant,
    ) -> bool {
        let Some(slot) = self.clients.get(index) else {
            return false;
        };
        let now = Instant::now();
        let mut client = slot.write().unwrap_or_else(|p| p.into_inner());
        if client.forgotten_at.is_some_and(|f| at <= f) {
            return false;
        }
        if client
            .refusals
            .iter()
            .any(|r| r.verifier == verifier && r.at >= at)
        {
            return false;
        }
        let proofs = &mut client.proofs;
        proofs.retain(|p| p.until > now);
        if let Some(p) = proofs.iter_mut().find(|p| p.verifier == verifier) {
            p.until = p.until.max(until);
            p.at = p.at.max(at);
            return false;
        }
        proofs.push(Proof {
            verifier,
            until,
            at,
        });
        if proofs.len() > MAX_PER_CLIENT {
            // The proof closest to its end goes: the secret least recently accepted.
            if let Some(oldest) = (0..proofs.len()).min_by_key(|&i| proofs[i].until) {
                proofs.swap_remove(oldest);
            }
        }
        true
    }

    /// Forgets `verifier` (Cognito refused its secret), asked now.
    #[cfg(test)]
    pub(crate) fn revoke(&self, index: usize, verifier: &Verifier) -> bool {
        self.revoke_at(index, verifier, Instant::now())
    }

    /// Records that Cognito, asked at `at`, refused `verifier`'s secret: a proof
    /// made before is forgotten, one made after stays. Returns whether a proof
    /// was forgotten.
    pub(crate) fn revoke_at(&self, index: usize, verifier: &Verifier, at: Instant) -> bool {
        let Some(slot) = self.clients.get(index) else {
            return false;
        };
        let now = Instant::now();
        let mut client = slot.write().unwrap_or_else(|p| p.into_inner());
        let before = client.proofs.len();
        client
            .proofs
            .retain(|p| &p.verifier != verifier || p.at > at);
        let forgot = client.proofs.len() != before;
        let refusals = &mut client.refusals;
        refusals.retain(|r| now.saturating_duration_since(r.at) < REMEMBER_REFUSALS);
        match refusals.iter_mut().find(|r| &r.verifier == verifier) {
            Some(r) => r.at = r.at.max(at),
            None => {
                refusals.push(Refusal {
                    verifier: *verifier,
                    at,
                });
                if refusals.len() > MAX_REFUSALS {
                    if let Some(oldest) = (0..refusals.len()).min_by_key(|&i| refusals[i].at) {
                        refusals.swap_remove(oldest);
                    }
                }
            }
        }
        forgot
    }

    /// Drops every proof of client `index` made at or before `at` (the kill
    /// switch: its next call goes to Cognito, which checks the secret again).
    pub(crate) fn forget_client(&self, index: usize, at: Instant) {
        if let Some(slot) = self.clients.get(index) {
            let mut client = slot.write().unwrap_or_else(|p| p.into_inner());
            client.proofs.retain(|p| p.at > at);
            client.forgotten_at = Some(client.forgotten_at.map_or(at, |f| f.max(at)));
        }
    }

    /// Live proofs of every client, for metrics.
    pub(crate) fn live(&self) -> usize {
        let now = Instant::now();
        self.clients
            .iter()
            .map(|slot| {
                let client = slot.read().unwrap_or_else(|p| p.into_inner());
                client.proofs.iter().filter(|p| p.until > now).count()
            })
            .sum()
    }
}

/// A verifier as four words: compared in constant time word by word (`subtle`
/// puts an optimisation barrier on every element; 4 instead of 32).
fn words(v: &Verifier) -> [u64; 4] {
    std::array::from_fn(|i| {
        u64::from_ne_bytes(
            v[i * 8..i * 8 + 8]
                .try_into()
                .expect("8 bytes of a 32-byte verifier"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn proofs_expire_unless_renewed() {
        let p = ProvenSecrets::new(2);
        let now = Instant::now();
        assert!(p.prove(0, [1; 32], now + Duration::from_secs(60)));
        assert!(p.is_proven(0, &[1; 32], now));
        assert!(!p.is_proven(1, &[1; 32], now), "bound to its client");
        assert!(!p.is_proven(0, &[2; 32], now));
        // Every byte counts, the first and the last word's included.
        for at in [0, 7, 8, 31] {
            let mut near = [1; 32];
            near[at] = 2;
            assert!(!p.is_proven(0, &near, now), "differs at byte {at}");
        }
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(!p.prove(0, [1; 32], Instant::now() + Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(p.is_proven(0, &[1; 32], Instant::now()), "renewed");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!p.is_proven(0, &[1; 32], Instant::now()), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn several_per_client_bounded_and_revocable() {
        let p = ProvenSecrets::new(1);
        let now = Instant::now();
        for i in 0..MAX_PER_CLIENT as u8 + 1 {
            p.prove(0, [i; 32], now + Duration::from_secs(100 + u64::from(i)));
        }
        assert!(!p.is_proven(0, &[0; 32], now), "the oldest proof made room");
        for i in 1..=MAX_PER_CLIENT as u8 {
            assert!(p.is_proven(0, &[i; 32], now));
        }
        assert_eq!(p.live(), MAX_PER_CLIENT);
        assert!(p.revoke(0, &[2; 32]));
        assert!(!p.is_proven(0, &[2; 32], now));
        assert!(!p.revoke(0, &[2; 32]));
        assert!(p.is_proven(0, &[3; 32], now));
    }

    #[tokio::test(start_paused = true)]
    async fn the_newer_of_a_proof_and_a_refusal_wins() {
        let p = ProvenSecrets::new(1);
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(3600);
        let s = Duration::from_secs;
        assert!(p.prove_at(0, [1; 32], until, t0));
        // Refused at t0+10: the proof of t0 goes.
        assert!(p.revoke_at(0, &[1; 32], t0 + s(10)));
        assert!(!p.is_proven(0, &[1; 32], t0 + s(11)));
        // A proof made before the refusal (replayed, or late) is ignored.
        assert!(!p.prove_at(0, [1; 32], until, t0 + s(5)));
        assert!(!p.prove_at(0, [1; 32], until, t0 + s(10)));
        assert!(!p.is_proven(0, &[1; 32], t0 + s(11)));
        // Cognito accepts it again later: proven again.
        assert!(p.prove_at(0, [1; 32], until, t0 + s(20)));
        assert!(p.is_proven(0, &[1; 32], t0 + s(21)));
        // An older refusal arriving late does not undo the newer proof.
        assert!(!p.revoke_at(0, &[1; 32], t0 + s(15)));
        assert!(p.is_proven(0, &[1; 32], t0 + s(21)));
        // Other secrets of the client are untouched throughout.
        assert!(p.prove_at(0, [2; 32], until, t0));
        assert!(p.is_proven(0, &[2; 32], t0 + s(21)));
    }
}
