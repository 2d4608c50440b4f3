//! The fleet's upstream budget: one schedule in Redis (a script), this
//! replica's own while Redis does not answer.

use std::sync::atomic::Ordering::Relaxed;

use futures_util::future::BoxFuture;

use super::*;

impl FleetCache {
    /// Reserves a slot of the fleet's upstream schedule (see `budget`).
    pub(super) async fn reserve_budget(
        &self,
        key: &str,
        priority: Priority,
        interval: Duration,
        max_wait: Duration,
    ) -> Result<Grant, FleetError> {
        let refresh = if priority == Priority::Refresh {
            "1"
        } else {
            "0"
        };
        let (admitted, delay_us, corrupt): (i64, i64, i64) = self
            .call(
                redis::cmd("EVAL")
                    .arg(RESERVE_SCRIPT)
                    .arg(1)
                    .arg(key)
                    .arg(interval.as_micros() as u64)
                    .arg(refresh)
                    .arg(max_wait.as_micros() as u64),
            )
            .await?;
        if corrupt == 1 {
            self.stats.corrupt.fetch_add(1, Relaxed);
            tracing::warn!(
                key = BUDGET_KEY,
                "the fleet's upstream schedule in Redis was corrupt (not a number, another type, or beyond any honest wait); it starts again from now"
            );
        }
        let delay = Duration::from_micros(
            delay_us.clamp(0, max_wait.as_micros() as i64 + interval.as_micros() as i64) as u64,
        );
        Ok(if admitted == 1 {
            Grant::After(delay)
        } else {
            Grant::Refused { retry_after: delay }
        })
    }
}

/// The fleet's upstream schedule on Redis; this replica's own while Redis does
/// not answer.
pub(crate) struct FleetBudget {
    fleet: std::sync::Arc<FleetCache>,
    local: Schedule,
    key: &'static str,
}

impl FleetBudget {
    pub(crate) fn new(
        fleet: std::sync::Arc<FleetCache>,
        local: Schedule,
        key: &'static str,
    ) -> Self {
        Self { fleet, local, key }
    }
}

impl Budget for FleetBudget {
    fn reserve(&self, priority: Priority, max_wait: Duration) -> BoxFuture<'_, Grant> {
        Box::pin(async move {
            match self
                .fleet
                .reserve_budget(self.key, priority, self.local.interval(), max_wait)
                .await
            {
                Ok(grant) => grant,
                Err(_) => self.local.reserve(priority, max_wait),
            }
        })
    }
}
