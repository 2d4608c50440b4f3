//! The list of revocations in force: clients cut off (no new token, and every
//! token issued at or before the revocation refused) and single tokens refused
//! until they expire, each with when, why and by whom, and how it survives a
//! restart without a shared store (`revocations.state_file`, written atomically).
//!
//! An entry drops out once no token it covers can still be valid: a client's
//! at its revocation time plus the longest token lifetime (and only once the
//! client is restored), a token's at its own expiry.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::proto::gateway::v1 as pb;

/// The longest access-token lifetime Cognito allows: one day.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

/// Largest state file read (a revocation is a few hundred bytes; entries
/// expire after a day).
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;

/// Version of the state file's format.
const STATE_FORMAT: u32 = 1;

/// What a revocation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A client id: its tokens issued at or before the revocation.
    Client,
    /// One token, by its `jti`.
    Token,
}

/// One revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// A client or a token.
    pub target: Target,
    /// The client id, or the token's `jti`.
    pub id: String,
    /// When it was revoked, in Unix milliseconds.
    pub at_ms: u64,
    /// Until when it must be remembered, in Unix milliseconds.
    pub until_ms: u64,
    /// A client still cut off from new tokens (false once restored).
    #[serde(default)]
    pub blocked: bool,
    /// Why, as the operator said it.
    pub reason: String,
    /// Who: the admin client id that asked.
    pub by: String,
    /// The last change (the revocation, or the restore), in Unix milliseconds:
    /// where two copies of one entry differ, the later change wins.
    #[serde(default)]
    pub changed_ms: u64,
}

impl Revocation {
    /// Whether this copy of an entry is a later change than `other`.
    fn newer_than(&self, other: &Revocation) -> bool {
        (self.changed_ms, self.at_ms, self.blocked) > (other.changed_ms, other.at_ms, other.blocked)
    }
}

/// The revocations in force, keyed by what they cover. Every change bumps
/// [`RevocationList::version`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// By client id (looked up without allocating: every check borrows).
    clients: BTreeMap<String, Revocation>,
    /// By `jti`.
    tokens: BTreeMap<String, Revocation>,
    version: u64,
}

/// Why the state file could not be used: the gateway does not start on it,
/// rather than start with an empty list.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It exists but cannot be read.
    #[error("{path}: cannot read the revocation state: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a revocation state this version understands.
    #[error(
        "{path}: not a revocation state file ({message}); fix or move it away, never start with an empty list by accident"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// It could not be written.
    #[error("{path}: cannot write the revocation state: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    revocations: Vec<Revocation>,
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes so far (0 for a new list).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every revocation in force, clients first, then tokens, each by id.
    pub fn entries(&self) -> impl Iterator<Item = &Revocation> {
        self.clients.values().chain(self.tokens.values())
    }

    /// Cuts `client_id` off at `at_ms`: no new token, and its tokens issued at
    /// or before `at_ms` refused for `max_lifetime_secs`.
    pub fn revoke_client(
        &mut self,
        client_id: &str,
        at_ms: u64,
        max_lifetime_secs: u64,
        reason: &str,
        by: &str,
    ) -> &Revocation {
        let entry = Revocation {
            target: Target::Client,
            id: client_id.to_owned(),
            at_ms,
            until_ms: at_ms.saturating_add(max_lifetime_secs.saturating_mul(1000)),
            blocked: true,
            reason: reason.to_owned(),
            by: by.to_owned(),
            changed_ms: at_ms,
        };
        self.version += 1;
        self.clients.insert(client_id.to_owned(), entry);
        &self.clients[client_id]
    }

    /// Lets `client_id` get tokens again (at `now_ms`); its tokens issued
    /// before the revocation stay refused. `false` when it was not cut off.
    pub fn restore_client(&mut self, client_id: &str, now_ms: u64, reason: &str, by: &str) -> bool {
        match self.clients.get_mut(client_id) {
            Some(entry) if entry.blocked => {
                entry.blocked = false;
                entry.reason = reason.to_owned();
                entry.by = by.to_owned();
                entry.changed_ms = now_ms.max(entry.changed_ms + 1);
                self.version += 1;
                true
            }
            _ => false,
        }
    }

    /// Refuses the token `jti` until it expires (`exp_ms`).
    pub fn revoke_token(&mut self, jti: &str, at_ms: u64, exp_ms: u64, reason: &str, by: &str) {
        self.version += 1;
        self.tokens.insert(
            jti.to_owned(),
            Revocation {
                target: Target::Token,
                id: jti.to_owned(),
                at_ms,
                until_ms: exp_ms,
                blocked: false,
                reason: reason.to_owned(),
                by: by.to_owned(),
                changed_ms: at_ms,
            },
        );
    }

    /// The entry for a client, if one is in force.
    pub fn client(&self, client_id: &str) -> Option<&Revocation> {
        self.clients.get(client_id)
    }

    /// The entry for a token's `jti`, if one is in force.
    pub fn token(&self, jti: &str) -> Option<&Revocation> {
        self.tokens.get(jti)
    }

    /// Whether nothing is in force.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.tokens.is_empty()
    }

    /// Takes in copies of entries from elsewhere (the fleet's store, a
    /// gateway's stream): an entry not known here, or a later change of one, is
    /// kept. Returns the entries that changed here.
    pub fn merge<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a Revocation>,
    ) -> Vec<Revocation> {
        let mut changed = Vec::new();
        for theirs in entries {
            let map = self.map_mut(theirs.target);
            let take = map
                .get(&theirs.id)
                .is_none_or(|ours| theirs.newer_than(ours));
            if take {
                map.insert(theirs.id.clone(), theirs.clone());
                changed.push(theirs.clone());
            }
        }
        if !changed.is_empty() {
            self.version += 1;
        }
        changed
    }

    /// The entries here that `theirs` lacks or holds an earlier change of: what
    /// a replica writes back to a store that lost them.
    pub fn newer_than<'a>(&'a self, theirs: &RevocationList) -> Vec<&'a Revocation> {
        self.entries()
            .filter(|ours| {
                let map = match ours.target {
                    Target::Client => &theirs.clients,
                    Target::Token => &theirs.tokens,
                };
                map.get(&ours.id).is_none_or(|t| ours.newer_than(t))
            })
            .collect()
    }

    /// Puts an entry in, replacing any for the same target (a stream's change:
    /// the gateway's copy is the one in force).
    pub fn upsert(&mut self, entry: Revocation) {
        self.map_mut(entry.target).insert(entry.id.clone(), entry);
        self.version += 1;
    }

    /// Removes one entry (a stream's removal). `true` when it was there.
    pub fn remove(&mut self, target: Target, id: &str) -> bool {
        let gone = self.map_mut(target).remove(id).is_some();
        if gone {
            self.version += 1;
        }
        gone
    }

    /// Replaces the whole list with `entries` (a stream's snapshot).
    pub fn from_entries(entries: impl IntoIterator<Item = Revocation>) -> Self {
        let mut list = Self::new();
        for r in entries {
            list.map_mut(r.target).insert(r.id.clone(), r);
        }
        list.version = 1;
        list
    }

    fn map_mut(&mut self, target: Target) -> &mut BTreeMap<String, Revocation> {
        match target {
            Target::Client => &mut self.clients,
            Target::Token => &mut self.tokens,
        }
    }

    /// Whether `client_id` is cut off from new tokens.
    pub fn is_blocked(&self, client_id: &str) -> bool {
        self.clients.get(client_id).is_some_and(|e| e.blocked)
    }

    /// Whether a token of `client_id` issued at `iat_ms` (with `jti`, when it
    /// carries one) is refused.
    pub fn is_revoked(&self, client_id: &str, iat_ms: u64, jti: Option<&str>) -> bool {
        self.verdict(client_id, iat_ms, jti.unwrap_or_default())
            .is_some()
    }

    /// Why a token of `client_id` issued at `iat_ms` (Unix ms), with `jti`
    /// (empty: none), is refused: the one rule every check applies.
    pub fn verdict(&self, client_id: &str, iat_ms: u64, jti: &str) -> Option<Verdict> {
        if self.client(client_id).is_some_and(|e| iat_ms <= e.at_ms) {
            return Some(Verdict::ClientRevoked);
        }
        (!jti.is_empty() && self.tokens.contains_key(jti)).then_some(Verdict::TokenRevoked)
    }

    /// Drops what can no longer cover a valid token at `now_ms` (a client still
    /// cut off stays). Returns how many entries went.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.clients.len() + self.tokens.len();
        let live = |_: &String, e: &mut Revocation| e.blocked || e.until_ms > now_ms;
        self.clients.retain(live);
        self.tokens.retain(live);
        let gone = before - self.clients.len() - self.tokens.len();
        if gone > 0 {
            self.version += 1;
        }
        gone
    }

    /// Reads the state file: a missing file is an empty list; anything else
    /// that cannot be read whole is an error.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let corrupt = |message: String| StateError::Corrupt {
            path: path.to_owned(),
            message,
        };
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_file() && meta.len() > MAX_STATE_BYTES {
                return Err(corrupt(format!(
                    "{} bytes, more than {MAX_STATE_BYTES}",
                    meta.len()
                )));
            }
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.format != STATE_FORMAT {
            return Err(corrupt(format!(
                "format {} (this gateway reads {STATE_FORMAT})",
                state.format
            )));
        }
        Ok(Self::from_entries(state.revocations))
    }

    /// Writes the state file atomically: a temporary file beside it, flushed
    /// to disk, renamed over it, and the directory flushed, so that a crash
    /// leaves the old list or the new one, never half of one. One writer at a
    /// time (the caller holds the list's lock while saving).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let failed = |source| StateError::Write {
            path: path.to_owned(),
            source,
        };
        let state = State {
            format: STATE_FORMAT,
            revocations: self.entries().cloned().collect(),
        };
        let text = serde_json::to_vec_pretty(&state).map_err(|e| failed(e.into()))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut temp = tempfile_in(dir, path).map_err(failed)?;
        temp.1.write_all(&text).map_err(failed)?;
        temp.1.sync_all().map_err(failed)?;
        std::fs::rename(&temp.0, path).map_err(failed)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A new file beside `path` (same directory, so the rename is atomic).
fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = path.file_name().map_or_else(
        || "revocations".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    Ok((temp, file))
}

/// Now, in Unix milliseconds.
#[cfg_attr(not(feature = "gateway"), allow(dead_code))]
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a verified token is refused by the revocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its client was revoked at or after the token was issued.
    ClientRevoked,
    /// The token itself (its `jti`) was revoked.
    TokenRevoked,
    /// The list is too stale to trust and the service chose to refuse
    /// everything then ([`crate::auth::WhenStale::RefuseAll`]).
    ListStale,
}

impl Verdict {
    /// For humans (Validate's `detail`, the layer's message).
    pub fn detail(self) -> &'static str {
        match self {
            Verdict::ClientRevoked => "the token's client was revoked",
            Verdict::TokenRevoked => "the token was revoked",
            Verdict::ListStale => {
                "the revocation list is stale and this service refuses every token until it is current again"
            }
        }
    }
}

/// The revocations in force, shared by everything that checks tokens in one
/// process: the gateway's broker and validator, or a service's validator fed by
/// a [`crate::auth::RevocationWatcher`]. Cheap to clone; a check with nothing
/// in force is one atomic load.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<Shared>,
}

struct Shared {
    list: tokio::sync::watch::Sender<Arc<RevocationList>>,
    /// Something is in force (the hot path's early exit).
    active: AtomicBool,
    /// Every token is refused (a stale list, by the service's choice).
    refuse_all: AtomicBool,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.snapshot();
        f.debug_struct("Revocations")
            .field("version", &list.version())
            .field("entries", &list.entries().count())
            .field("refuse_all", &self.inner.refuse_all.load(Relaxed))
            .finish()
    }
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new(RevocationList::new())
    }
}

impl Revocations {
    /// Shares `list`.
    pub fn new(list: RevocationList) -> Self {
        let active = !list.is_empty();
        Self {
            inner: Arc::new(Shared {
                list: tokio::sync::watch::channel(Arc::new(list)).0,
                active: AtomicBool::new(active),
                refuse_all: AtomicBool::new(false),
            }),
        }
    }

    /// The list as it is now.
    pub fn snapshot(&self) -> Arc<RevocationList> {
        self.inner.list.borrow().clone()
    }

    /// A receiver that sees every new list.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<RevocationList>> {
        self.inner.list.subscribe()
    }

    /// Replaces the list; its version becomes the next one of this process.
    pub fn publish(&self, mut list: RevocationList) {
        self.inner.list.send_modify(|current| {
            list.version = current.version() + 1;
            self.inner.active.store(!list.is_empty(), Relaxed);
            *current = Arc::new(list);
        });
    }

    /// Changes the list in place (copied first: readers keep theirs) and
    /// publishes it when `change` reports a change. Returns what `change` did.
    pub fn update<T>(&self, change: impl FnOnce(&mut RevocationList) -> (bool, T)) -> T {
        let mut result = None;
        self.inner.list.send_if_modified(|current| {
            let mut list = RevocationList::clone(current);
            let (changed, out) = change(&mut list);
            result = Some(out);
            if changed {
                list.version = current.version() + 1;
                self.inner.active.store(!list.is_empty(), Relaxed);
                *current = Arc::new(list);
            }
            changed
        });
        result.expect("send_if_modified runs its closure")
    }

    /// Whether a verified token of `client_id`, issued at `iat` (Unix seconds),
    /// with `jti` (empty when it has none), is refused.
    #[inline]
    pub fn check(&self, client_id: &str, iat: i64, jti: &str) -> Option<Verdict> {
        if self.inner.refuse_all.load(Relaxed) {
            return Some(Verdict::ListStale);
        }
        if !self.inner.active.load(Relaxed) {
            return None;
        }
        self.check_slow(client_id, iat, jti)
    }

    #[cold]
    fn check_slow(&self, client_id: &str, iat: i64, jti: &str) -> Option<Verdict> {
        let iat_ms = u64::try_from(iat).unwrap_or(0).saturating_mul(1000);
        self.inner.list.borrow().verdict(client_id, iat_ms, jti)
    }

    /// Whether `client_id` is cut off from new tokens.
    #[inline]
    pub fn is_blocked(&self, client_id: &str) -> bool {
        self.inner.active.load(Relaxed) && self.inner.list.borrow().is_blocked(client_id)
    }

    /// Whether a token of `client_id` issued at `issued_ms` (Unix ms) with
    /// `jti` (empty: none) is covered by a revocation of its client or itself.
    #[inline]
    pub fn covers(&self, client_id: &str, issued_ms: u64, jti: &str) -> bool {
        self.inner.active.load(Relaxed)
            && self
                .inner
                .list
                .borrow()
                .verdict(client_id, issued_ms, jti)
                .is_some()
    }

    /// Refuses every token (or stops refusing): a watcher whose list went stale
    /// past the service's limit, when the service chose to refuse then.
    pub(crate) fn set_refuse_all(&self, refuse: bool) {
        self.inner.refuse_all.store(refuse, Relaxed);
    }

    /// Whether every token is refused because the list is stale.
    pub fn refusing_all(&self) -> bool {
        self.inner.refuse_all.load(Relaxed)
    }
}

fn timestamp(ms: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn millis(t: Option<&prost_types::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        u64::try_from(t.seconds)
            .unwrap_or(0)
            .saturating_mul(1000)
            .saturating_add(u64::try_from(t.nanos / 1_000_000).unwrap_or(0))
    })
}

impl From<Target> for pb::RevocationTarget {
    fn from(t: Target) -> Self {
        match t {
            Target::Client => pb::RevocationTarget::Client,
            Target::Token => pb::RevocationTarget::Token,
        }
    }
}

impl From<&Revocation> for pb::Revocation {
    fn from(r: &Revocation) -> Self {
        pb::Revocation {
            target: pb::RevocationTarget::from(r.target) as i32,
            id: r.id.clone(),
            revoked_at: timestamp(r.at_ms),
            until: timestamp(r.until_ms),
            blocked: r.blocked,
            reason: r.reason.clone(),
            by: r.by.clone(),
            changed_at: timestamp(r.changed_ms),
        }
    }
}

/// The target of a proto value (`None` for UNSPECIFIED or unknown values).
pub(crate) fn target_from_proto(value: i32) -> Option<Target> {
    match pb::RevocationTarget::try_from(value).ok()? {
        pb::RevocationTarget::Client => Some(Target::Client),
        pb::RevocationTarget::Token => Some(Target::Token),
        pb::RevocationTarget::Unspecified => None,
    }
}

impl TryFrom<&pb::Revocation> for Revocation {
    type Error = &'static str;

    fn try_from(r: &pb::Revocation) -> Result<Self, Self::Error> {
        let target = target_from_proto(r.target).ok_or("unknown revocation target")?;
        if r.id.is_empty() {
            return Err("revocation without an id");
        }
        Ok(Revocation {
            target,
            id: r.id.clone(),
            at_ms: millis(r.revoked_at.as_ref()),
            until_ms: millis(r.until.as_ref()),
            blocked: r.blocked,
            reason: r.reason.clone(),
            by: r.by.clone(),
            changed_ms: millis(r.changed_at.as_ref()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = DEFAULT_MAX_TOKEN_LIFETIME_SECS;

    #[test]
    fn a_revoked_client_is_cut_off_and_its_old_tokens_stay_refused_after_a_restore() {
        let mut list = RevocationList::new();
        list.revoke_client("leaky", 10_000, DAY, "secret in a public repo", "ops-admin");
        assert!(list.is_blocked("leaky"));
        assert!(list.is_revoked("leaky", 9_000, None), "issued before");
        assert!(
            list.is_revoked("leaky", 10_000, None),
            "issued at the moment"
        );
        assert!(!list.is_revoked("other", 9_000, None));
        assert!(list.restore_client("leaky", 20_000, "secret rotated", "ops-admin"));
        assert!(!list.is_blocked("leaky"));
        assert!(
            list.is_revoked("leaky", 9_000, None),
            "old tokens stay refused"
        );
        assert!(!list.is_revoked("leaky", 10_001, None), "new tokens pass");
        assert!(!list.restore_client("leaky", 21_000, "again", "ops-admin"));
        assert!(!list.restore_client("never", 21_000, "x", "ops-admin"));
    }

    #[test]
    fn a_token_is_refused_by_jti_until_it_expires_then_the_entry_goes() {
        let mut list = RevocationList::new();
        list.revoke_token("jti-1", 1_000, 5_000, "pasted in a ticket", "ops-admin");
        assert!(list.is_revoked("any", 0, Some("jti-1")));
        assert!(!list.is_revoked("any", 0, Some("jti-2")));
        assert_eq!(list.expire(4_999), 0);
        assert_eq!(list.expire(5_000), 1);
        assert!(!list.is_revoked("any", 0, Some("jti-1")));
    }

    #[test]
    fn a_client_entry_lasts_one_token_lifetime_and_never_while_cut_off() {
        let mut list = RevocationList::new();
        list.revoke_client("c", 0, 60, "r", "a");
        assert_eq!(list.expire(61_000), 0, "still cut off");
        list.restore_client("c", 1, "r", "a");
        assert_eq!(list.expire(59_999), 0);
        assert_eq!(list.expire(60_000), 1);
        assert_eq!(list.entries().count(), 0);
    }

    #[test]
    fn merging_keeps_the_later_change_and_says_what_to_write_back() {
        let mut a = RevocationList::new();
        a.revoke_client("c", 1_000, DAY, "leak", "ops");
        let mut b = a.clone();
        b.restore_client("c", 5_000, "rotated", "ops");
        b.revoke_token("j", 2_000, 9_000, "ticket", "ops");
        // a lacks b's restore and token: a takes both, and has nothing b lacks.
        let changed = a.merge(b.entries());
        assert_eq!(changed.len(), 2);
        assert!(!a.is_blocked("c"));
        assert!(a.newer_than(&b).is_empty());
        // An older copy never undoes a later change.
        let mut old = RevocationList::new();
        old.revoke_client("c", 1_000, DAY, "leak", "ops");
        assert!(a.merge(old.entries()).is_empty());
        assert!(!a.is_blocked("c"));
        // A store that lost everything gets every entry written back.
        assert_eq!(a.newer_than(&RevocationList::new()).len(), 2);
        assert_eq!(old.newer_than(&a).len(), 0);
    }

    #[test]
    fn the_shared_list_checks_tokens_by_client_time_and_jti() {
        let shared = Revocations::default();
        assert_eq!(shared.check("c", 1, "j"), None);
        shared.update(|l| {
            l.revoke_client("c", 10_000, DAY, "r", "a");
            l.revoke_token("j", 0, u64::MAX, "r", "a");
            (true, ())
        });
        assert_eq!(shared.snapshot().version(), 1);
        assert_eq!(shared.check("c", 10, ""), Some(Verdict::ClientRevoked));
        assert_eq!(shared.check("c", 11, ""), None, "issued after");
        assert_eq!(shared.check("d", 11, "j"), Some(Verdict::TokenRevoked));
        assert!(shared.is_blocked("c") && !shared.is_blocked("d"));
        assert!(shared.covers("c", 10_000, "") && !shared.covers("c", 10_001, ""));
        assert!(shared.covers("d", 0, "j") && !shared.covers("d", 0, "k"));
        shared.set_refuse_all(true);
        assert_eq!(shared.check("d", 11, ""), Some(Verdict::ListStale));
        shared.set_refuse_all(false);
        // Through the proto form and back.
        let list = shared.snapshot();
        let back: Vec<Revocation> = list
            .entries()
            .map(|r| Revocation::try_from(&pb::Revocation::from(r)).unwrap())
            .collect();
        assert_eq!(back, list.entries().cloned().collect::<Vec<_>>());
        shared.publish(RevocationList::new());
        assert_eq!(shared.check("c", 10, ""), None);
        assert_eq!(shared.snapshot().version(), 2);
    }

    #[test]
    fn every_change_bumps_the_version() {
        let mut list = RevocationList::new();
        assert_eq!(list.version(), 0);
        list.revoke_client("c", 0, DAY, "r", "a");
        list.revoke_token("j", 0, 1, "r", "a");
        list.restore_client("c", 1, "r", "a");
        assert_eq!(list.version(), 3);
        list.expire(2);
        assert_eq!(list.version(), 4);
    }

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.json");
        assert_eq!(RevocationList::load(&path).unwrap().entries().count(), 0);
        let mut list = RevocationList::new();
        list.revoke_client("leaky", 10_000, DAY, "leak", "ops-admin");
        list.revoke_token("jti-1", 1_000, 5_000, "ticket", "ops-admin");
        list.save(&path).unwrap();
        let again = RevocationList::load(&path).unwrap();
        assert_eq!(
            again.entries().collect::<Vec<_>>(),
            list.entries().collect::<Vec<_>>()
        );
        assert!(again.is_blocked("leaky"));
        // Nothing but the file is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["revocations.json"]);
    }

    #[test]
    fn a_corrupt_or_unreadable_state_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.json");
        std::fs::write(&path, b"{\"format\": 1, \"revocations\": [").unwrap();
        let err = RevocationList::load(&path).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("never start with an empty list"),
            "{err}"
        );
        std::fs::write(&path, b"{\"format\": 9, \"revocations\": []}").unwrap();
        let err = RevocationList::load(&path).unwrap_err();
        assert!(err.to_string().contains("format 9"), "{err}");
        // Past the bound it is not read at all.
        let big = std::fs::File::create(&path).unwrap();
        big.set_len(MAX_STATE_BYTES + 1).unwrap();
        let err = RevocationList::load(&path).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        // A directory where the file should be cannot be read.
        let err = RevocationList::load(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Read { .. }), "{err}");
    }
}
