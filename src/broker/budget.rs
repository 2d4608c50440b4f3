//! The upstream budget. Cognito's client-credentials quota is per AWS account and
//! Region, shared with every other app of the account, and over it Cognito
//! throttles all of them. Token calls are therefore paced: at most
//! `upstream_per_second`, one every `1 / upstream_per_second` (a GCRA with no
//! burst, so no one-second window ever sees more than the budget).
//!
//! With Redis the schedule is one key shared by the fleet, advanced by an atomic
//! script on Redis's own clock; without it (or while Redis is down) each process
//! keeps its own. A miss reserves the next free slot and waits for it, unless
//! that is further away than the longest wait; a refresh takes a slot only when
//! nobody is queued (the schedule is idle), so it never delays a miss: under
//! pressure the current token is served and the refresh waits for a quiet moment.

use std::{
    sync::{Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::time::Instant;

/// Who asks for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// A caller without a usable token.
    Miss,
    /// A refresh of a token that still has life.
    Refresh,
}

/// The answer of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// A slot is reserved `after` from now (zero: at once).
    After(Duration),
    /// No slot: the next would come too late (a miss), or the schedule is busy (a
    /// refresh). `retry_after` is when one could be free.
    Refused { retry_after: Duration },
}

/// The GCRA decision shared by the local schedule and the Redis script
/// ([`RESERVE_SCRIPT`] is the same arithmetic in microseconds): `tat` is when the
/// next slot is free.
pub(crate) fn decide(
    tat: Duration,
    now: Duration,
    interval: Duration,
    priority: Priority,
    max_wait: Duration,
) -> (Grant, Option<Duration>) {
    let start = tat.max(now);
    let delay = start - now;
    let refused = match priority {
        Priority::Miss => delay > max_wait,
        Priority::Refresh => !delay.is_zero(),
    };
    if refused {
        (Grant::Refused { retry_after: delay }, None)
    } else {
        (Grant::After(delay), Some(start + interval))
    }
}

/// The Redis side of the schedule: `KEYS[1]` holds the next free slot in
/// microseconds of Redis's clock. ARGV: interval µs, refresh (0/1), max wait µs.
/// Returns `{admitted, delay_us, corrupt}`. The key is input from a shared store:
/// a value that is not a number, of another type, or further ahead than any
/// honest schedule can be (the longest wait plus one interval) is corrupt and
/// the schedule starts again from now (`corrupt` = 1); the key always has a TTL.
pub(crate) const RESERVE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[3])
local corrupt = 0
local raw = redis.pcall('GET', KEYS[1])
local tat = 0
if type(raw) == 'table' and raw.err then
  redis.call('DEL', KEYS[1])
  corrupt = 1
elseif raw then
  tat = tonumber(raw)
  if tat == nil or tat > now + max_wait + interval then
    tat = now
    corrupt = 1
  end
end
if tat < now then tat = now end
local delay = tat - now
if (ARGV[2] == '1' and delay > 0) or delay > max_wait then
  if corrupt == 1 then
    redis.call('SET', KEYS[1], string.format('%.0f', now), 'PX', 1000)
  end
  return {0, delay, corrupt}
end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.floor((next - now) / 1000) + 1000)
return {1, delay, corrupt}
";

/// The local schedule (also the fallback while Redis is down).
#[derive(Debug)]
pub(crate) struct Schedule {
    interval: Duration,
    epoch: Instant,
    tat: Mutex<Duration>,
}

impl Schedule {
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            epoch: Instant::now(),
            tat: Mutex::new(Duration::ZERO),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    pub(crate) fn reserve(&self, priority: Priority, max_wait: Duration) -> Grant {
        let now = Instant::now().saturating_duration_since(self.epoch);
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let (grant, next) = decide(*tat, now, self.interval, priority, max_wait);
        if let Some(next) = next {
            *tat = next;
        }
        grant
    }
}

crate::counters::counters! {
    /// Counters of the budget.
    BudgetStats => BudgetStatsSnapshot {
        /// Misses that waited for their slot.
        waits => ("upstream_budget_waits_total", "Misses that waited for a slot of the upstream budget."),
        /// Refreshes put off because misses were queued (the current token was served).
        refreshes_deferred => ("upstream_budget_refreshes_deferred_total", "Refreshes put off while misses were queued (the current token was served)."),
        /// Misses refused because the next slot was beyond the longest wait.
        refused => ("upstream_budget_refused_total", "Misses refused because no slot was free within limits.upstream_max_wait_ms."),
        /// Attempts with secrets not yet proven refused because the strangers' share
        /// (a tenth of the budget) was spent.
        strangers_refused => ("upstream_budget_strangers_refused_total", "Attempts with secrets not yet proven refused because their tenth of the budget was spent."),
        /// Slots given to misses.
        granted_miss,
        /// Slots given to refreshes.
        granted_refresh,
        /// Total time misses waited, in microseconds.
        waited_us,
    }
}

impl BudgetStats {
    pub(crate) fn record(&self, priority: Priority, grant: Grant) {
        match (priority, grant) {
            (Priority::Miss, Grant::After(d)) => {
                self.granted_miss.fetch_add(1, Relaxed);
                if !d.is_zero() {
                    self.waits.fetch_add(1, Relaxed);
                    self.waited_us.fetch_add(d.as_micros() as u64, Relaxed);
                }
            }
            (Priority::Refresh, Grant::After(_)) => {
                self.granted_refresh.fetch_add(1, Relaxed);
            }
            (Priority::Refresh, Grant::Refused { .. }) => {
                self.refreshes_deferred.fetch_add(1, Relaxed);
            }
            (Priority::Miss, Grant::Refused { .. }) => {
                self.refused.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn misses_queue_behind_each_other_up_to_the_longest_wait() {
        let i = 20 * MS;
        let max = 50 * MS;
        let (g, next) = decide(Duration::ZERO, 100 * MS, i, Priority::Miss, max);
        assert_eq!((g, next), (Grant::After(Duration::ZERO), Some(120 * MS)));
        let (g, next) = decide(120 * MS, 100 * MS, i, Priority::Miss, max);
        assert_eq!((g, next), (Grant::After(20 * MS), Some(140 * MS)));
        let (g, next) = decide(160 * MS, 100 * MS, i, Priority::Miss, max);
        assert_eq!(
            (g, next),
            (
                Grant::Refused {
                    retry_after: 60 * MS
                },
                None
            )
        );
    }

    #[test]
    fn refreshes_take_only_idle_slots() {
        let i = 20 * MS;
        let (g, _) = decide(101 * MS, 100 * MS, i, Priority::Refresh, 50 * MS);
        assert_eq!(g, Grant::Refused { retry_after: MS });
        let (g, next) = decide(100 * MS, 100 * MS, i, Priority::Refresh, 50 * MS);
        assert_eq!((g, next), (Grant::After(Duration::ZERO), Some(120 * MS)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_schedule_paces_at_the_budget() {
        let s = Schedule::new(50);
        assert_eq!(s.interval(), 20 * MS);
        let mut delays = Vec::new();
        for _ in 0..5 {
            match s.reserve(Priority::Miss, Duration::from_secs(1)) {
                Grant::After(d) => delays.push(d),
                Grant::Refused { .. } => panic!("refused"),
            }
        }
        assert_eq!(delays, [0, 20, 40, 60, 80].map(|n| n * MS));
        assert!(matches!(
            s.reserve(Priority::Refresh, Duration::from_secs(1)),
            Grant::Refused { .. }
        ));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            s.reserve(Priority::Refresh, Duration::from_secs(1)),
            Grant::After(Duration::ZERO)
        );
    }
}
