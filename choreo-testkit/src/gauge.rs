//! [`GaugeProbe`]: the latest value of one metrics gauge, for tests and
//! benchmarks that compare a choreo gauge with the server's figure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A global `metrics` recorder that keeps the latest value of the gauge
/// named `name` (over all its labels) and drops everything else.
///
/// ```
/// let probe = choreo_testkit::GaugeProbe::install(choreo::observe::LAG).unwrap();
/// assert_eq!(probe.value(), None, "nothing set yet");
/// metrics::gauge!(choreo::observe::LAG).set(3.0);
/// assert_eq!(probe.value(), Some(3.0));
/// ```
#[derive(Clone, Debug)]
pub struct GaugeProbe {
    cell: Arc<Cell>,
}

#[derive(Debug)]
struct Cell(AtomicU64);

impl metrics::GaugeFn for Cell {
    fn increment(&self, v: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) + v);
    }
    fn decrement(&self, v: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) - v);
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

struct Recorder {
    name: &'static str,
    /// Only the gauge with this label, if set.
    label: Option<(&'static str, String)>,
    cell: Arc<Cell>,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let labelled = self.label.as_ref().is_none_or(|(k, v)| {
            key.labels()
                .any(|l| l.key() == *k && l.value() == v.as_str())
        });
        if key.name() == self.name && labelled {
            metrics::Gauge::from_arc(self.cell.clone())
        } else {
            metrics::Gauge::noop()
        }
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl GaugeProbe {
    /// Installs the probe as the process's metrics recorder. Install it
    /// before starting services: they take their gauges when they start.
    ///
    /// # Errors
    /// Another recorder is already installed in this process.
    pub fn install(name: &'static str) -> Result<Self, String> {
        Self::install_recorder(name, None)
    }

    /// [`install`](Self::install), keeping only the gauge that carries the
    /// label `key` = `value` (one handler's, say: `("choreo.handler",
    /// "expire_unpaid__met_PaymentCaptured")`).
    ///
    /// # Errors
    /// Another recorder is already installed in this process.
    pub fn install_for(
        name: &'static str,
        (key, value): (&'static str, &str),
    ) -> Result<Self, String> {
        Self::install_recorder(name, Some((key, value.to_owned())))
    }

    fn install_recorder(
        name: &'static str,
        label: Option<(&'static str, String)>,
    ) -> Result<Self, String> {
        let cell = Arc::new(Cell(AtomicU64::new(f64::NAN.to_bits())));
        metrics::set_global_recorder(Recorder {
            name,
            label,
            cell: cell.clone(),
        })
        .map_err(|_| "a metrics recorder is already installed in this process".to_owned())?;
        Ok(Self { cell })
    }

    /// The gauge's latest value; `None` before it was first set.
    pub fn value(&self) -> Option<f64> {
        let v = f64::from_bits(self.cell.0.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }
}
