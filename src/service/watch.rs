//! `WatchRevocations`: the revocations in force as a stream (the whole list,
//! then each change, and a heartbeat), for the library's watchers.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use tokio::sync::watch;
use tonic::Status;

use crate::{
    proto::gateway::v1 as pb,
    revocations::{RevocationList, Revocations},
};

/// An empty update this often tells a watcher the stream is alive.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(5);

/// The stream type of `WatchRevocations`.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationUpdate, Status>> + Send>>;

/// A random name for this process's run of versions.
pub(crate) fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The updates for one watcher: the whole list unless it already holds this
/// process's current version, then the changes as they are published.
pub(crate) fn updates(
    revocations: &Revocations,
    epoch: Arc<str>,
    request: &pb::WatchRevocationsRequest,
    draining: Option<watch::Receiver<bool>>,
) -> UpdateStream {
    let mut rx = revocations.subscribe();
    let first = rx.borrow_and_update().clone();
    let current = request.resume_epoch == *epoch && request.resume_version == first.version();
    let opening = if current {
        heartbeat(&epoch, &first)
    } else {
        snapshot(&epoch, &first)
    };
    struct State {
        rx: watch::Receiver<Arc<RevocationList>>,
        last: Arc<RevocationList>,
        epoch: Arc<str>,
        beat: tokio::time::Interval,
        draining: Option<watch::Receiver<bool>>,
    }
    let mut beat = tokio::time::interval(WATCH_HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.reset();
    let state = State {
        rx,
        last: first,
        epoch,
        beat,
        draining,
    };
    let rest = futures_util::stream::unfold(state, |mut s| async move {
        let drained = async {
            match s.draining.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|d| *d).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // The gateway is draining: the stream ends (the watcher resumes
            // on another replica) instead of holding the drain up.
            () = drained => None,
            changed = s.rx.changed() => {
                // The gateway is stopping: the stream ends, the watcher resumes
                // elsewhere.
                changed.ok()?;
                let next = s.rx.borrow_and_update().clone();
                let update = diff(&s.epoch, &s.last, &next);
                s.last = next;
                s.beat.reset();
                Some((Ok(update), s))
            }
            _ = s.beat.tick() => {
                let update = heartbeat(&s.epoch, &s.last);
                Some((Ok(update), s))
            }
        }
    });
    Box::pin(futures_util::StreamExt::chain(
        futures_util::stream::once(std::future::ready(Ok(opening))),
        rest,
    ))
}

fn heartbeat(epoch: &str, list: &RevocationList) -> pb::RevocationUpdate {
    pb::RevocationUpdate {
        epoch: epoch.to_owned(),
        version: list.version(),
        ..Default::default()
    }
}

fn snapshot(epoch: &str, list: &RevocationList) -> pb::RevocationUpdate {
    pb::RevocationUpdate {
        epoch: epoch.to_owned(),
        version: list.version(),
        reset: true,
        changed: list.entries().map(pb::Revocation::from).collect(),
        removed: Vec::new(),
    }
}

/// What changed from `old` to `new`.
fn diff(epoch: &str, old: &RevocationList, new: &RevocationList) -> pb::RevocationUpdate {
    let lookup = |list: &RevocationList, r: &crate::revocations::Revocation| match r.target {
        crate::revocations::Target::Client => list.client(&r.id).cloned(),
        crate::revocations::Target::Token => list.token(&r.id).cloned(),
    };
    pb::RevocationUpdate {
        epoch: epoch.to_owned(),
        version: new.version(),
        reset: false,
        changed: new
            .entries()
            .filter(|r| lookup(old, r).as_ref() != Some(*r))
            .map(pb::Revocation::from)
            .collect(),
        removed: old
            .entries()
            .filter(|r| lookup(new, r).is_none())
            .map(|r| pb::RevocationKey {
                target: pb::RevocationTarget::from(r.target) as i32,
                id: r.id.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn a_watcher_gets_the_list_then_each_change_and_resumes_without_a_snapshot() {
        let shared = Revocations::default();
        shared.update(|l| {
            l.revoke_client("leaky", 1_000, 60, "leak", "ops");
            (true, ())
        });
        let epoch: Arc<str> = Arc::from("e1");
        let (drain, draining) = watch::channel(false);
        let mut stream = updates(&shared, epoch.clone(), &Default::default(), Some(draining));
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.reset);
        assert_eq!(first.changed.len(), 1);
        assert_eq!(first.version, 1);
        shared.update(|l| {
            l.revoke_token("jti-1", 2_000, 9_000, "ticket", "ops");
            l.restore_client("leaky", 3_000, "rotated", "ops");
            (true, ())
        });
        let next = stream.next().await.unwrap().unwrap();
        assert!(!next.reset);
        assert_eq!(next.version, 2);
        let ids: Vec<_> = next.changed.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["leaky", "jti-1"]);
        shared.update(|l| (l.expire(10_000) > 0, ()));
        let gone = stream.next().await.unwrap().unwrap();
        assert_eq!(gone.removed.len(), 1);
        assert_eq!(gone.removed[0].id, "jti-1");
        // Resuming at the current version: no snapshot, just the heartbeat.
        let resume = pb::WatchRevocationsRequest {
            resume_epoch: "e1".into(),
            resume_version: gone.version,
        };
        let again = updates(&shared, epoch.clone(), &resume, None)
            .next()
            .await
            .unwrap()
            .unwrap();
        assert!(!again.reset && again.changed.is_empty());
        // Another process's epoch: the whole list again.
        let elsewhere = pb::WatchRevocationsRequest {
            resume_epoch: "other".into(),
            resume_version: gone.version,
        };
        let snap = updates(&shared, epoch, &elsewhere, None)
            .next()
            .await
            .unwrap()
            .unwrap();
        assert!(snap.reset);
        assert_eq!(snap.changed.len(), 1);
        // A draining gateway ends the stream.
        drain.send(true).unwrap();
        assert!(stream.next().await.is_none());
    }
}
