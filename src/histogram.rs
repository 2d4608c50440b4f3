//! A fixed-bucket latency histogram on atomics (cumulative buckets, as Prometheus
//! exposes them).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Counts observations into buckets with the given upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or below it).
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of observations, seconds.
    pub sum_secs: f64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn record(&self, value: Duration) {
        let secs = value.as_secs_f64();
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .bounds
                .iter()
                .zip(self.buckets.iter())
                .map(|(b, n)| (*b, n.load(Relaxed)))
                .collect(),
            count: self.count.load(Relaxed),
            sum_secs: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(5));
        h.record(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.001, 1), (0.01, 2), (0.1, 2)]);
        assert_eq!(s.count, 3);
        assert!((s.sum_secs - 1.0055).abs() < 1e-9);
    }
}
