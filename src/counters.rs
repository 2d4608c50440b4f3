//! Counter sets: a component counts with atomics it alone can touch, and hands
//! out snapshots (plain numbers) to whoever reads them.

/// A struct of `AtomicU64` counters, visible to the crate only, and its
/// snapshot type with the same fields as `u64`, made by `snapshot()`. A field
/// written `field => ("metric_total", "Help.")` is also a Prometheus counter
/// (`m2m_gateway_metric_total`), written by `encode` in field order.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $name:ident => $snapshot:ident {
            $( $(#[$fmeta:meta])* $field:ident $(=> ($metric:literal, $help:literal))?, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub(crate) $field: std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("The counters of [`", stringify!($name), "`] at one moment.")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snapshot {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $name {
            /// The counters now.
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )*
                }
            }

            /// Writes the counters that are metrics.
            #[cfg(feature = "gateway")]
            #[allow(unused_variables, dead_code)]
            pub(crate) fn encode(&self, out: &mut crate::prometheus::Encoder) {
                let now = self.snapshot();
                $( $( out.counter($metric, $help, now.$field); )? )*
            }
        }
    };
}

pub(crate) use counters;
