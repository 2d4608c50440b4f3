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
};

use serde::{Deserialize, Serialize};

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
        };
        self.version += 1;
        self.clients.insert(client_id.to_owned(), entry);
        &self.clients[client_id]
    }

    /// Lets `client_id` get tokens again; its tokens issued before the
    /// revocation stay refused. `false` when it was not cut off.
    pub fn restore_client(&mut self, client_id: &str, reason: &str, by: &str) -> bool {
        match self.clients.get_mut(client_id) {
            Some(entry) if entry.blocked => {
                entry.blocked = false;
                entry.reason = reason.to_owned();
                entry.by = by.to_owned();
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
            },
        );
    }

    /// Whether `client_id` is cut off from new tokens.
    pub fn is_blocked(&self, client_id: &str) -> bool {
        self.clients.get(client_id).is_some_and(|e| e.blocked)
    }

    /// Whether a token of `client_id` issued at `iat_ms` (with `jti`, when it
    /// carries one) is refused.
    pub fn is_revoked(&self, client_id: &str, iat_ms: u64, jti: Option<&str>) -> bool {
        self.clients
            .get(client_id)
            .is_some_and(|e| iat_ms <= e.at_ms)
            || jti.is_some_and(|j| self.tokens.contains_key(j))
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
        let mut list = Self::new();
        for r in state.revocations {
            let map = match r.target {
                Target::Client => &mut list.clients,
                Target::Token => &mut list.tokens,
            };
            map.insert(r.id.clone(), r);
        }
        list.version = 1;
        Ok(list)
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
        assert!(list.restore_client("leaky", "secret rotated", "ops-admin"));
        assert!(!list.is_blocked("leaky"));
        assert!(
            list.is_revoked("leaky", 9_000, None),
            "old tokens stay refused"
        );
        assert!(!list.is_revoked("leaky", 10_001, None), "new tokens pass");
        assert!(!list.restore_client("leaky", "again", "ops-admin"));
        assert!(!list.restore_client("never", "x", "ops-admin"));
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
        list.restore_client("c", "r", "a");
        assert_eq!(list.expire(59_999), 0);
        assert_eq!(list.expire(60_000), 1);
        assert_eq!(list.entries().count(), 0);
    }

    #[test]
    fn every_change_bumps_the_version() {
        let mut list = RevocationList::new();
        assert_eq!(list.version(), 0);
        list.revoke_client("c", 0, DAY, "r", "a");
        list.revoke_token("j", 0, 1, "r", "a");
        list.restore_client("c", "r", "a");
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
