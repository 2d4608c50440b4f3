//! Keeps refusal logging bounded, for the gateway's call log and every
//! service's AuthLayer: a few lines per kind of refusal and interval, then the
//! count of those left out.

use std::time::Duration;

/// How many refusals of one kind (method, status, rejection) are logged per
/// interval; the rest are counted and summed up in the next line of that kind.
pub const REFUSALS_LOGGED_PER_INTERVAL: u32 = 5;
/// The interval of [`REFUSALS_LOGGED_PER_INTERVAL`].
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps refusal logging bounded: a stranger's flood of junk costs metrics
/// counts, not a log line per call. Every kind of refusal is still logged (its
/// first few per interval), with the number left out since the last line.
#[derive(Debug, Default)]
pub struct RefusalLog {
    kinds: std::sync::Mutex<std::collections::HashMap<RefusalKind, Window>>,
}

type RefusalKind = (&'static str, i32, Option<&'static str>);

#[derive(Debug)]
struct Window {
    started: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether to log this refusal now, and how many of its kind were left
    /// out before it (to report on the line).
    pub fn admit(&self, kind: RefusalKind, now: std::time::Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let w = kinds.entry(kind).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= REFUSAL_LOG_INTERVAL {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < REFUSALS_LOGGED_PER_INTERVAL {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_few_lines_per_kind_and_interval_then_the_count_of_the_rest() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let kind = ("Validate", 0, Some("malformed"));
        let logged = (0..100).filter(|_| log.admit(kind, t0).is_some()).count();
        assert_eq!(logged, REFUSALS_LOGGED_PER_INTERVAL as usize);
        // Another kind has its own allowance.
        assert_eq!(log.admit(("GetToken", 16, None), t0), Some(0));
        // The next interval's first line carries what was left out.
        let later = t0 + REFUSAL_LOG_INTERVAL + Duration::from_millis(1);
        assert_eq!(log.admit(kind, later), Some(95));
        assert_eq!(log.admit(kind, later), Some(0));
    }
}
