//! Metrics as the test collector received them: the latest cumulative point of
//! each stream (deltas are added up), rendered one line per stream.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};

use crate::span::AttrValue;

/// The instrument a metric came from, as OTLP says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A monotonic sum (a counter).
    Counter,
    /// A non-monotonic sum.
    UpDownCounter,
    /// A gauge.
    Gauge,
    /// An explicit-bucket histogram.
    Histogram,
}

/// A stream's value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A sum or gauge.
    Number(f64),
    /// A histogram.
    Histogram {
        /// Measurements recorded.
        count: u64,
        /// Their sum.
        sum: f64,
        /// Explicit bucket bounds.
        bounds: Vec<f64>,
        /// Counts per bucket (one more than the bounds).
        buckets: Vec<u64>,
    },
}

/// One metric stream: name, unit, kind, attributes and value.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedMetric {
    /// `service.name` of the resource.
    pub service: String,
    /// The instrumentation scope.
    pub scope: String,
    /// Metric name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Instrument kind.
    pub kind: MetricKind,
    /// Attributes of the stream.
    pub attributes: BTreeMap<String, AttrValue>,
    /// The value.
    pub value: MetricValue,
    /// Whether the exporter sent deltas (else cumulative points, or a gauge).
    pub delta: bool,
}

impl RecordedMetric {
    /// The sum or gauge value (`None` for histograms).
    pub fn number(&self) -> Option<f64> {
        match self.value {
            MetricValue::Number(n) => Some(n),
            MetricValue::Histogram { .. } => None,
        }
    }

    /// One line: name, unit, kind, value (histograms: count, and whether the
    /// buckets are the conventions' advice), then the attributes in key order,
    /// leaving out `hide`.
    pub fn render(&self, hide: &[&str]) -> String {
        let mut line = format!("{} [{}] {:?}", self.name, self.unit, self.kind);
        match &self.value {
            MetricValue::Number(n) => {
                let _ = write!(line, " value={n}");
            }
            MetricValue::Histogram { count, bounds, .. } => {
                let _ = write!(line, " count={count}");
                let advice = bounds.as_slice() == crate::metric::MESSAGING_BUCKETS;
                let _ = write!(
                    line,
                    " buckets={}",
                    if advice { "messaging" } else { "other" }
                );
            }
        }
        for (k, v) in &self.attributes {
            if !hide.contains(&k.as_str()) {
                let _ = write!(line, " {k}={v}");
            }
        }
        line
    }
}

/// The bucket advice of the messaging conventions.
pub const MESSAGING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The streams received so far, keyed by service, name and attributes.
#[derive(Debug, Default)]
pub(crate) struct MetricStore {
    streams: BTreeMap<(String, String, String), RecordedMetric>,
}

impl MetricStore {
    pub(crate) fn add(&mut self, request: ExportMetricsServiceRequest) {
        for rm in request.resource_metrics {
            let resource = rm
                .resource
                .map(|r| crate::collector::attributes(&r.attributes))
                .unwrap_or_default();
            let service = match resource.get("service.name") {
                Some(AttrValue::Str(s)) => s.clone(),
                _ => String::new(),
            };
            for sm in rm.scope_metrics {
                let scope = sm.scope.map(|s| s.name).unwrap_or_default();
                for m in sm.metrics {
                    let Some(data) = m.data else { continue };
                    let mut points = Vec::new();
                    match data {
                        metric::Data::Sum(sum) => {
                            let kind = if sum.is_monotonic {
                                MetricKind::Counter
                            } else {
                                MetricKind::UpDownCounter
                            };
                            let delta =
                                sum.aggregation_temporality == AggregationTemporality::Delta as i32;
                            for p in sum.data_points {
                                points.push((kind, delta, p.attributes.clone(), number(&p.value)));
                            }
                        }
                        metric::Data::Gauge(gauge) => {
                            for p in gauge.data_points {
                                points.push((
                                    MetricKind::Gauge,
                                    false,
                                    p.attributes.clone(),
                                    number(&p.value),
                                ));
                            }
                        }
                        metric::Data::Histogram(h) => {
                            let delta =
                                h.aggregation_temporality == AggregationTemporality::Delta as i32;
                            for p in h.data_points {
                                points.push((
                                    MetricKind::Histogram,
                                    delta,
                                    p.attributes.clone(),
                                    MetricValue::Histogram {
                                        count: p.count,
                                        sum: p.sum.unwrap_or_default(),
                                        bounds: p.explicit_bounds.clone(),
                                        buckets: p.bucket_counts.clone(),
                                    },
                                ));
                            }
                        }
                        _ => continue,
                    }
                    for (kind, delta, attrs, value) in points {
                        let attributes = crate::collector::attributes(&attrs);
                        let key = (service.clone(), m.name.clone(), format!("{attributes:?}"));
                        let value = match (delta, self.streams.get(&key)) {
                            (true, Some(previous)) => merge(&previous.value, &value),
                            _ => value,
                        };
                        self.streams.insert(
                            key,
                            RecordedMetric {
                                service: service.clone(),
                                scope: scope.clone(),
                                name: m.name.clone(),
                                unit: m.unit.clone(),
                                kind,
                                attributes,
                                value,
                                delta,
                            },
                        );
                    }
                }
            }
        }
    }

    pub(crate) fn all(&self) -> Vec<RecordedMetric> {
        self.streams.values().cloned().collect()
    }
}

fn number(v: &Option<number_data_point::Value>) -> MetricValue {
    MetricValue::Number(match v {
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        Some(number_data_point::Value::AsDouble(d)) => *d,
        None => 0.0,
    })
}

fn merge(a: &MetricValue, b: &MetricValue) -> MetricValue {
    match (a, b) {
        (MetricValue::Number(x), MetricValue::Number(y)) => MetricValue::Number(x + y),
        (
            MetricValue::Histogram {
                count: c1,
                sum: s1,
                buckets: b1,
                ..
            },
            MetricValue::Histogram {
                count: c2,
                sum: s2,
                bounds,
                buckets: b2,
            },
        ) => MetricValue::Histogram {
            count: c1 + c2,
            sum: s1 + s2,
            bounds: bounds.clone(),
            buckets: b1.iter().zip(b2).map(|(x, y)| x + y).collect(),
        },
        (_, newer) => newer.clone(),
    }
}
