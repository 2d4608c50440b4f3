//! The kill switch's admin API (`m2m.gateway.admin.v1.Admin`): revoke and
//! restore clients, revoke single tokens, list what is in force. Every method
//! needs the scope `m2m-gateway/admin`, checked by the gateway's own
//! [`AuthLayer`](crate::auth::AuthLayer) from the scopes declared in
//! `admin.proto`; every call writes one audit log line (target
//! `m2m_gateway::audit`). The list persists in `revocations.state_file` and,
//! with Redis, in the fleet's store.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use crate::{
    auth,
    broker::Broker,
    jwt::{CognitoValidator, Rejection},
    proto::{gateway::admin::v1 as pb, gateway::v1::Revocation as PbRevocation},
    revocations::{Revocation, RevocationList, Revocations, StateError, now_ms},
    settings::RevocationSettings,
};

/// The scope every admin method needs (declared in `admin.proto`).
pub const ADMIN_SCOPE: &str = "m2m-gateway/admin";
/// Longest `reason`.
const MAX_REASON: usize = 500;
/// Longest `jti`.
const MAX_JTI: usize = 256;
/// How often expired entries are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// The revocations of one gateway: the shared list, where it persists, and
/// the broker that drops a revoked client's secrets and tokens.
#[derive(Debug)]
pub struct KillSwitch {
    broker: Broker,
    validator: CognitoValidator,
    state_file: Option<PathBuf>,
    max_lifetime_secs: u64,
    /// One change (and one save of the state file) at a time.
    writing: tokio::sync::Mutex<()>,
    /// The version of the list the state file holds: a change is saved once,
    /// by whoever made it (an admin call, or the maintenance task for changes
    /// from the fleet and expiry).
    saved: std::sync::atomic::AtomicU64,
}

/// Reads the state file at start: a missing file is an empty list, an
/// unreadable or corrupt one is an error (the gateway does not start rather
/// than forget a revocation).
pub fn load_state(settings: &RevocationSettings) -> Result<RevocationList, StateError> {
    match &settings.state_file {
        Some(path) => {
            let mut list = RevocationList::load(path)?;
            list.expire(now_ms());
            Ok(list)
        }
        None => Ok(RevocationList::new()),
    }
}

impl KillSwitch {
    /// The kill switch over `broker`'s revocations (which `validator` refuses).
    pub fn new(broker: Broker, validator: CognitoValidator, settings: &RevocationSettings) -> Self {
        // The list as loaded from the state file.
        let saved = broker.revocations().snapshot().version();
        Self {
            broker,
            validator,
            state_file: settings.state_file.clone(),
            max_lifetime_secs: settings.max_token_lifetime_secs,
            writing: tokio::sync::Mutex::new(()),
            saved: saved.into(),
        }
    }

    /// The shared list.
    pub fn revocations(&self) -> &Revocations {
        self.broker.revocations()
    }

    /// Writes the list to the state file, if one is configured.
    async fn save(&self) -> Result<(), StateError> {
        let Some(path) = self.state_file.clone() else {
            return Ok(());
        };
        let list = self.revocations().snapshot();
        let version = list.version();
        tokio::task::spawn_blocking(move || list.save(&path))
            .await
            .unwrap_or_else(|e| {
                Err(StateError::Write {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
        self.saved
            .store(version, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Drops expired entries every few seconds, and keeps the state file in
    /// step with changes that came from the fleet. Ends with the returned
    /// handle's abort.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut changes = this.revocations().subscribe();
            let mut tick = tokio::time::interval(EXPIRE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let now = now_ms();
                        this.revocations().update(|l| (l.expire(now) > 0, ()));
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let unsaved = || {
                    this.revocations().snapshot().version()
                        != this.saved.load(std::sync::atomic::Ordering::Relaxed)
                };
                changes.borrow_and_update();
                if this.state_file.is_some() && unsaved() {
                    let _guard = this.writing.lock().await;
                    // An admin call may have saved it while this waited.
                    if unsaved() {
                        if let Err(e) = this.save().await {
                            tracing::error!(error = %e, "revocations not saved");
                        }
                    }
                }
            }
        })
    }

    /// Persists and shares a change made to the list; the answer says where
    /// it did not reach.
    async fn commit(&self, entry: &Revocation) -> Result<(), Status> {
        if let Err(e) = self.save().await {
            return Err(Status::internal(format!(
                "in force on this replica, but not saved: {e}"
            )));
        }
        if !self
            .broker
            .share_revocations(std::slice::from_ref(entry))
            .await
        {
            return Err(Status::unavailable(
                "in force on this replica, but the fleet's Redis did not take it; this replica writes it back when Redis answers (retry to confirm)",
            ));
        }
        Ok(())
    }

    async fn revoke_client(
        &self,
        client_id: &str,
        reason: &str,
        by: &str,
    ) -> Result<Revocation, Status> {
        check_reason(reason)?;
        check_client_id(client_id)?;
        if !self.broker.is_registered(client_id) {
            return Err(Status::not_found(format!(
                "no registered client {client_id:?} (check [[clients]])"
            )));
        }
        let _guard = self.writing.lock().await;
        let now = now_ms();
        let entry = self.revocations().update(|l| {
            let e = l
                .revoke_client(client_id, now, self.max_lifetime_secs, reason, by)
                .clone();
            (true, e)
        });
        self.broker.forget_client(client_id).await;
        self.commit(&entry).await?;
        Ok(entry)
    }

    async fn restore_client(
        &self,
        client_id: &str,
        reason: &str,
        by: &str,
    ) -> Result<Revocation, Status> {
        check_reason(reason)?;
        check_client_id(client_id)?;
        let _guard = self.writing.lock().await;
        let Some(at_ms) = self
            .revocations()
            .snapshot()
            .client(client_id)
            .filter(|e| e.blocked)
            .map(|e| e.at_ms)
        else {
            return Err(Status::failed_precondition(format!(
                "client {client_id:?} is not revoked"
            )));
        };
        // Token times are whole seconds: a token issued in the revocation's
        // second counts as issued before it. Restoring only once that second
        // is over means every token issued after the restore is accepted.
        let next_second = (at_ms / 1000 + 1) * 1000;
        let now = now_ms();
        if now < next_second {
            tokio::time::sleep(Duration::from_millis(next_second - now)).await;
        }
        let now = now_ms();
        let entry = self.revocations().update(|l| {
            l.restore_client(client_id, now, reason, by);
            (true, l.client(client_id).cloned())
        });
        let entry = entry.ok_or_else(|| Status::internal("the entry vanished"))?;
        // Proofs made while revoked, and tokens cached then, go too.
        self.broker.forget_client(client_id).await;
        self.commit(&entry).await?;
        Ok(entry)
    }

    async fn revoke_token(
        &self,
        which: Option<pb::revoke_token_request::Which>,
        reason: &str,
        by: &str,
    ) -> Result<Revocation, Status> {
        use pb::revoke_token_request::Which;
        check_reason(reason)?;
        let now = now_ms();
        let (jti, until_ms) = match which {
            Some(Which::Token(token)) => {
                let token = crate::service::strip_bearer(&token);
                match self.validator.validate(token, &[]).await {
                    Ok(claims) if claims.jti().is_empty() => {
                        return Err(Status::failed_precondition(
                            "the token carries no jti: revoke its client instead",
                        ));
                    }
                    Ok(claims) => {
                        let exp = u64::try_from(claims.expires_at()).unwrap_or(0);
                        (claims.jti().to_owned(), exp.saturating_mul(1000))
                    }
                    Err(invalid) if invalid.rejection == Rejection::Revoked => {
                        return Err(Status::failed_precondition(format!(
                            "already refused: {}",
                            invalid.detail
                        )));
                    }
                    Err(invalid) if invalid.rejection == Rejection::Expired => {
                        return Err(Status::failed_precondition(
                            "the token has expired: nothing to revoke",
                        ));
                    }
                    Err(invalid) => {
                        return Err(Status::invalid_argument(format!(
                            "not a valid token of this gateway's pools ({}): pass its jti instead",
                            invalid.rejection
                        )));
                    }
                }
            }
            Some(Which::Jti(jti)) => {
                if jti.is_empty()
                    || jti.len() > MAX_JTI
                    || !jti.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(Status::invalid_argument(format!(
                        "jti must be 1 to {MAX_JTI} printable ASCII characters"
                    )));
                }
                (
                    jti,
                    now.saturating_add(self.max_lifetime_secs.saturating_mul(1000)),
                )
            }
            None => {
                return Err(Status::invalid_argument("set token or jti"));
            }
        };
        let _guard = self.writing.lock().await;
        let entry = self.revocations().update(|l| {
            l.revoke_token(&jti, now, until_ms, reason, by);
            (true, l.token(&jti).cloned())
        });
        let entry = entry.ok_or_else(|| Status::internal("the entry vanished"))?;
        self.commit(&entry).await?;
        Ok(entry)
    }
}

fn check_client_id(client_id: &str) -> Result<(), Status> {
    if crate::rules::scope::is_valid_client_id(client_id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "client_id is not an app client id (1 to 128 letters, digits, '_', '-' or '+')",
        ))
    }
}

fn check_reason(reason: &str) -> Result<(), Status> {
    if reason.trim().is_empty() {
        return Err(Status::invalid_argument(
            "reason is required (it goes into the audit log and the list)",
        ));
    }
    if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "reason must be at most {MAX_REASON} characters, none of them control characters"
        )));
    }
    Ok(())
}

/// The `m2m.gateway.admin.v1.Admin` implementation.
#[derive(Debug, Clone)]
pub struct AdminService {
    kill: Arc<KillSwitch>,
}

impl AdminService {
    /// The service over a kill switch.
    pub fn new(kill: Arc<KillSwitch>) -> Self {
        Self { kill }
    }

    /// The generated server for it.
    pub fn into_server(self, max_message_bytes: usize) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

/// A revocation as the Admin answers carry it.
fn answer(r: &Revocation) -> Option<PbRevocation> {
    Some(PbRevocation::from(r))
}

/// The caller, as the layer verified it.
fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    auth::claims(request)
        .map(|c| c.client_id().to_owned())
        .ok_or_else(|| {
            Status::unauthenticated("admin calls need a token checked by the gateway's AuthLayer")
        })
}

/// Writes the audit line of one admin call and passes its result on.
fn audit<T>(
    caller: &str,
    action: &'static str,
    target: &str,
    reason: &str,
    result: Result<T, Status>,
) -> Result<T, Status> {
    match &result {
        Ok(_) => tracing::info!(
            target: "m2m_gateway::audit",
            caller, action, target, reason, result = "ok",
            "admin call"
        ),
        Err(status) => tracing::warn!(
            target: "m2m_gateway::audit",
            caller, action, target, reason,
            result = ?status.code(), detail = status.message(),
            "admin call"
        ),
    }
    result
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn revoke_client(
        &self,
        request: Request<pb::RevokeClientRequest>,
    ) -> Result<Response<pb::RevokeClientResponse>, Status> {
        let by = caller(&request)?;
        let req = request.into_inner();
        let result = self
            .kill
            .revoke_client(&req.client_id, &req.reason, &by)
            .await;
        audit(&by, "revoke_client", &req.client_id, &req.reason, result).map(|r| {
            Response::new(pb::RevokeClientResponse {
                revocation: answer(&r),
            })
        })
    }

    async fn restore_client(
        &self,
        request: Request<pb::RestoreClientRequest>,
    ) -> Result<Response<pb::RestoreClientResponse>, Status> {
        let by = caller(&request)?;
        let req = request.into_inner();
        let result = self
            .kill
            .restore_client(&req.client_id, &req.reason, &by)
            .await;
        audit(&by, "restore_client", &req.client_id, &req.reason, result).map(|r| {
            Response::new(pb::RestoreClientResponse {
                revocation: answer(&r),
            })
        })
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let by = caller(&request)?;
        let req = request.into_inner();
        // The audit line names a jti, never a token.
        let named = match &req.which {
            Some(pb::revoke_token_request::Which::Jti(j)) => format!("jti:{j}"),
            Some(pb::revoke_token_request::Which::Token(_)) => "token".to_owned(),
            None => String::new(),
        };
        let result = self.kill.revoke_token(req.which, &req.reason, &by).await;
        let target = match &result {
            Ok(r) => format!("jti:{}", r.id),
            Err(_) => named,
        };
        audit(&by, "revoke_token", &target, &req.reason, result).map(|r| {
            Response::new(pb::RevokeTokenResponse {
                revocation: answer(&r),
            })
        })
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let by = caller(&request)?;
        let list = self.kill.revocations().snapshot();
        let result = Ok(pb::ListRevocationsResponse {
            revocations: list.entries().map(PbRevocation::from).collect(),
        });
        audit(&by, "list_revocations", "", "", result).map(Response::new)
    }
}
