//! The validator's series: validations by outcome, per trusted issuer, the
//! verified-token cache, and each key set's fetches and age.

use std::{
    fmt::Write as _,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use super::{CognitoValidator, Rejection};
use crate::prometheus::{Encoder, label_value};

impl CognitoValidator {
    /// The validator's series.
    pub(crate) fn encode(&self, out: &mut Encoder) {
        // Validation.
        let v = self.stats();
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_validations_total Token validations by result.\n# TYPE m2m_gateway_validations_total counter"
        );
        let _ = writeln!(
            out,
            "m2m_gateway_validations_total{{result=\"valid\"}} {}",
            v.valid()
        );
        for r in Rejection::ALL {
            let _ = writeln!(
                out,
                "m2m_gateway_validations_total{{result=\"{}\"}} {}",
                r.as_str(),
                v.rejected(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_pool_validations_total Token validations by the trusted issuer the token claimed, and result.\n# TYPE m2m_gateway_pool_validations_total counter"
        );
        for (trusted, v) in self.issuers() {
            let labels = format!(
                "pool=\"{}\",issuer=\"{}\"",
                label_value(trusted.pool()),
                label_value(trusted.issuer())
            );
            let _ = writeln!(
                out,
                "m2m_gateway_pool_validations_total{{{labels},result=\"valid\"}} {}",
                v.valid()
            );
            for r in Rejection::ALL {
                let n = v.rejected(r);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "m2m_gateway_pool_validations_total{{{labels},result=\"{}\"}} {n}",
                        r.as_str()
                    );
                }
            }
        }
        out.gauge(
            "verified_cache_entries",
            "Verified tokens remembered.",
            self.cached_verifications() as f64,
        );

        // Keys: one key set per trusted issuer.
        let key_sets: Vec<(String, &Arc<crate::jwt::KeySet>)> = self
            .issuers()
            .map(|(trusted, _)| {
                (
                    format!(
                        "pool=\"{}\",issuer=\"{}\"",
                        label_value(trusted.pool()),
                        label_value(trusted.issuer())
                    ),
                    trusted.keys(),
                )
            })
            .collect();
        out.family(
            "jwks_fetches_total",
            "counter",
            "JWKS fetches by key set and outcome.",
        );
        for (labels, keys) in &key_sets {
            let s = keys.stats();
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_fetches_total{{{labels},outcome=\"ok\"}} {}\nm2m_gateway_jwks_fetches_total{{{labels},outcome=\"failed\"}} {}",
                s.fetch_ok.load(Relaxed),
                s.fetch_failed.load(Relaxed)
            );
        }
        out.family(
            "jwks_refetches_suppressed_total",
            "counter",
            "Unknown-kid refetches skipped by the cool-down.",
        );
        for (labels, keys) in &key_sets {
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_refetches_suppressed_total{{{labels}}} {}",
                keys.stats().refetch_suppressed.load(Relaxed)
            );
        }
        out.family("jwks_keys", "gauge", "Keys in the current key set.");
        for (labels, keys) in &key_sets {
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_keys{{{labels}}} {}",
                keys.kids().len()
            );
        }
        out.family(
            "jwks_age_seconds",
            "gauge",
            "Age of the current key set (-1 = never loaded).",
        );
        for (labels, keys) in &key_sets {
            let age = keys.loaded_at().map_or(-1.0, |t| t.elapsed().as_secs_f64());
            let _ = writeln!(out, "m2m_gateway_jwks_age_seconds{{{labels}}} {age}");
        }
    }
}
