//! Decoding OTLP/HTTP protobuf request bodies into the records of the store, and encoding
//! the matching responses.

use std::fmt::Write as _;
use std::time::Instant;

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::store::{Batch, ReceivedLog, ReceivedMetric, ReceivedSpan};

/// The three OTLP signals, one endpoint each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    /// The signal served at `path`, if any.
    pub(crate) fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/traces" => Some(Self::Traces),
            "/v1/metrics" => Some(Self::Metrics),
            "/v1/logs" => Some(Self::Logs),
            _ => None,
        }
    }

    /// The encoded `Export*ServiceResponse` (empty: full success) for this signal.
    pub(crate) fn success_body(self) -> Vec<u8> {
        match self {
            Self::Traces => ExportTraceServiceResponse::default().encode_to_vec(),
            Self::Metrics => ExportMetricsServiceResponse::default().encode_to_vec(),
            Self::Logs => ExportLogsServiceResponse::default().encode_to_vec(),
        }
    }

    /// The encoded `Export*ServiceResponse` of a partial success that rejects everything
    /// `batch` carried (its spans, its metrics' data points or its log records).
    pub(crate) fn partial_success_body(self, batch: &Batch) -> Vec<u8> {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let error_message = "rejected on purpose".to_owned();
        match self {
            Self::Traces => ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: count(batch.spans.len()),
                    error_message,
                }),
            }
            .encode_to_vec(),
            Self::Metrics => ExportMetricsServiceResponse {
                partial_success: Some(ExportMetricsPartialSuccess {
                    rejected_data_points: count(batch.metrics.iter().map(|m| m.data_points).sum()),
                    error_message,
                }),
            }
            .encode_to_vec(),
            Self::Logs => ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: count(batch.logs.len()),
                    error_message,
                }),
            }
            .encode_to_vec(),
        }
    }
}

/// `google.rpc.Status`: the OTLP/HTTP specification makes it the body of every 4xx and 5xx
/// answer. Its `code` is not used by OTLP (left 0, as the specification allows) and its
/// `details` are left out.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub(crate) code: i32,
    #[prost(string, tag = "2")]
    pub(crate) message: String,
}

/// The encoded `google.rpc.Status` of an error answer saying `message`.
pub(crate) fn error_body(message: &str) -> Vec<u8> {
    RpcStatus {
        code: 0,
        message: message.to_owned(),
    }
    .encode_to_vec()
}

/// A body that no `Export*ServiceResponse` decodes: `'t'` (0x74) is the tag of field 14
/// with wire type 4 (end group) without a start group, which prost rejects.
pub(crate) const GARBAGE: &[u8] = b"this is not protobuf";

/// Decodes a request body of `signal`. `received_at` is stamped on every record.
pub(crate) fn decode(
    signal: Signal,
    body: &[u8],
    received_at: Instant,
) -> Result<Batch, prost::DecodeError> {
    let mut batch = Batch::default();
    match signal {
        Signal::Traces => {
            let request = ExportTraceServiceRequest::decode(body)?;
            for resource_spans in request.resource_spans {
                let service_name = service_name(resource_spans.resource.as_ref());
                for scope_spans in resource_spans.scope_spans {
                    let scope = scope_spans.scope.map(|s| s.name).unwrap_or_default();
                    for span in scope_spans.spans {
                        batch.spans.push(ReceivedSpan {
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: (!span.parent_span_id.is_empty()
                                && span.parent_span_id.iter().any(|b| *b != 0))
                            .then(|| hex(&span.parent_span_id)),
                            name: span.name,
                            attributes: attributes(&span.attributes),
                            service_name: service_name.clone(),
                            scope: scope.clone(),
                            start_time_unix_nano: span.start_time_unix_nano,
                            end_time_unix_nano: span.end_time_unix_nano,
                            received_at,
                        });
                    }
                }
            }
        }
        Signal::Metrics => {
            let request = ExportMetricsServiceRequest::decode(body)?;
            for resource_metrics in request.resource_metrics {
                for scope_metrics in resource_metrics.scope_metrics {
                    for m in scope_metrics.metrics {
                        let data_points = match &m.data {
                            Some(metric::Data::Gauge(g)) => g.data_points.len(),
                            Some(metric::Data::Sum(s)) => s.data_points.len(),
                            Some(metric::Data::Histogram(h)) => h.data_points.len(),
                            Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
                            Some(metric::Data::Summary(s)) => s.data_points.len(),
                            None => 0,
                        };
                        batch.metrics.push(ReceivedMetric {
                            name: m.name,
                            data_points,
                            received_at,
                        });
                    }
                }
            }
        }
        Signal::Logs => {
            let request = ExportLogsServiceRequest::decode(body)?;
            for resource_logs in request.resource_logs {
                for scope_logs in resource_logs.scope_logs {
                    for record in scope_logs.log_records {
                        batch.logs.push(ReceivedLog {
                            body: record.body.as_ref().map(any_value).unwrap_or_default(),
                            severity_text: record.severity_text,
                            trace_id: (!record.trace_id.is_empty()
                                && record.trace_id.iter().any(|b| *b != 0))
                            .then(|| hex(&record.trace_id)),
                            received_at,
                        });
                    }
                }
            }
        }
    }
    Ok(batch)
}

/// Lowercase hex of raw id bytes.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The `service.name` resource attribute.
fn service_name(resource: Option<&Resource>) -> Option<String> {
    resource?
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref())
        .map(any_value)
}

fn attributes(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(any_value).unwrap_or_default(),
            )
        })
        .collect()
}

/// An attribute or body value as a string.
fn any_value(value: &AnyValue) -> String {
    match &value.value {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(any_value).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(l)) => {
            let items: Vec<String> = l
                .values
                .iter()
                .map(|kv| {
                    let v = kv.value.as_ref().map(any_value).unwrap_or_default();
                    format!("{}: {v}", kv.key)
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        // Only meaningful for profiles; other signals treat it as absent.
        Some(any_value::Value::StringValueStrindex(_)) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::ArrayValue;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn string(s: &str) -> AnyValue {
        AnyValue {
            value: Some(any_value::Value::StringValue(s.to_owned())),
        }
    }

    #[test]
    fn garbage_is_not_a_response() {
        assert!(ExportTraceServiceResponse::decode(GARBAGE).is_err());
        assert!(ExportMetricsServiceResponse::decode(GARBAGE).is_err());
        assert!(ExportLogsServiceResponse::decode(GARBAGE).is_err());
    }

    #[test]
    fn decodes_a_span() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(string("svc")),
                        ..KeyValue::default()
                    }],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
                        parent_span_id: vec![0; 8],
                        name: "root".into(),
                        attributes: vec![
                            KeyValue {
                                key: "n".into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::IntValue(7)),
                                }),
                                ..KeyValue::default()
                            },
                            KeyValue {
                                key: "a".into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::ArrayValue(ArrayValue {
                                        values: vec![string("x"), string("y")],
                                    })),
                                }),
                                ..KeyValue::default()
                            },
                        ],
                        ..Span::default()
                    }],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let batch = decode(Signal::Traces, &request.encode_to_vec(), Instant::now())
            .expect("a valid request decodes");
        let span = &batch.spans[0];
        assert_eq!(span.trace_id, "ab".repeat(16));
        assert_eq!(span.span_id, "0102030405060708");
        assert_eq!(span.parent_span_id, None);
        assert_eq!(span.service_name.as_deref(), Some("svc"));
        assert_eq!(span.attribute("n"), Some("7"));
        assert_eq!(span.attribute("a"), Some("[x, y]"));
    }

    #[test]
    fn a_partial_success_rejects_the_whole_batch() {
        let batch = Batch {
            spans: Vec::new(),
            metrics: vec![
                ReceivedMetric {
                    name: "a".into(),
                    data_points: 2,
                    received_at: Instant::now(),
                },
                ReceivedMetric {
                    name: "b".into(),
                    data_points: 3,
                    received_at: Instant::now(),
                },
            ],
            logs: Vec::new(),
        };
        let body = Signal::Metrics.partial_success_body(&batch);
        let response = ExportMetricsServiceResponse::decode(body.as_slice()).expect("a response");
        let partial = response.partial_success.expect("a partial success");
        assert_eq!(partial.rejected_data_points, 5);
        assert!(!partial.error_message.is_empty());
        let body = Signal::Traces.partial_success_body(&batch);
        let response = ExportTraceServiceResponse::decode(body.as_slice()).expect("a response");
        assert_eq!(response.partial_success.map(|p| p.rejected_spans), Some(0));
    }

    #[test]
    fn an_error_body_is_a_status() {
        let status = RpcStatus::decode(error_body("no").as_slice()).expect("a Status");
        assert_eq!(status.message, "no");
    }

    #[test]
    fn rejects_a_malformed_body() {
        for signal in [Signal::Traces, Signal::Metrics, Signal::Logs] {
            assert!(decode(signal, b"\xff\xff\xff", Instant::now()).is_err());
        }
    }
}
