//! A small encoder of the Prometheus text exposition format (version 0.0.4):
//! every component writes its own series with it (`encode` beside its stats),
//! and `/metrics` is their concatenation. Names get the `m2m_gateway_` prefix
//! unless written whole.

use std::fmt::{self, Write as _};

use crate::histogram::HistogramSnapshot;

/// The text being written.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// An empty exposition.
    pub fn new() -> Self {
        Self {
            out: String::with_capacity(8 * 1024),
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }

    /// `m2m_gateway_<name>`'s HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.out,
            "# HELP m2m_gateway_{name} {help}\n# TYPE m2m_gateway_{name} {kind}"
        );
    }

    /// One unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        let _ = writeln!(self.out, "m2m_gateway_{name} {value}");
    }

    /// One unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.out, "m2m_gateway_{name} {value}");
    }

    /// One histogram family `name` (written whole); `series` pairs a label set
    /// (`a="b"`, possibly empty) with its snapshot.
    pub fn histogram(&mut self, name: &str, help: &str, series: &[(String, HistogramSnapshot)]) {
        let out = &mut self.out;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (labels, h) in series {
            let sep = if labels.is_empty() { "" } else { "," };
            for (bound, n) in &h.buckets {
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
            let braced = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            };
            let _ = writeln!(out, "{name}_sum{braced} {}", h.sum_secs);
            let _ = writeln!(out, "{name}_count{braced} {}", h.count);
        }
    }
}

/// Raw lines (`writeln!(out, ...)`) for labelled series.
impl fmt::Write for Encoder {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.out.push_str(s);
        Ok(())
    }
}

/// A label value escaped for the text format (names come from the config).
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_escapes() {
        let mut e = Encoder::new();
        e.counter("x_total", "Xs.", 3);
        e.gauge("y", "Y.", 1.5);
        let _ = writeln!(e, "m2m_gateway_z{{pool=\"{}\"}} 1", label_value("a\"b"));
        let text = e.finish();
        assert!(
            text.contains("# TYPE m2m_gateway_x_total counter\nm2m_gateway_x_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE m2m_gateway_y gauge\nm2m_gateway_y 1.5\n"),
            "{text}"
        );
        assert!(text.contains("m2m_gateway_z{pool=\"a\\\"b\"} 1"), "{text}");
    }
}
