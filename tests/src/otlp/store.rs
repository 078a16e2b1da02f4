//! What the sink has received: spans, metrics, log records and request counts.
//!
//! The store is the one piece of state shared between the server (which writes) and the
//! [`OtlpSink`](super::OtlpSink) handles (which read). Every change bumps a
//! [`tokio::sync::watch`] generation so that waiters wake up on events, never by polling.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

/// One span, as the sink decoded it from an acknowledged `POST /v1/traces`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The trace id, 32 lowercase hex digits (as `opentelemetry::trace::TraceId` formats it).
    pub trace_id: String,
    /// The span id, 16 lowercase hex digits.
    pub span_id: String,
    /// The parent span id (16 lowercase hex digits), `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span name.
    pub name: String,
    /// The span attributes in the order received, values rendered as strings
    /// (see [`ReceivedSpan::attribute`]).
    pub attributes: Vec<(String, String)>,
    /// The `service.name` resource attribute of the batch, if any.
    pub service_name: Option<String>,
    /// The instrumentation scope name (the tracer's name), empty if none.
    pub scope: String,
    /// Start time, nanoseconds since the Unix epoch, as the exporter sent it.
    pub start_time_unix_nano: u64,
    /// End time, nanoseconds since the Unix epoch, as the exporter sent it.
    pub end_time_unix_nano: u64,
    /// When the sink finished reading the request that carried this span.
    pub received_at: Instant,
}

impl ReceivedSpan {
    /// The value of the attribute `key` rendered as a string, if the span has it.
    ///
    /// Strings are given as is; booleans, integers and floats with `to_string`; bytes in hex;
    /// arrays as `[a, b]`; key-value lists as `{k: v}`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One metric of one acknowledged `POST /v1/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMetric {
    /// The metric (instrument) name.
    pub name: String,
    /// How many data points this export carried for the metric.
    pub data_points: usize,
    /// When the sink finished reading the request that carried this metric.
    pub received_at: Instant,
}

/// One log record of one acknowledged `POST /v1/logs`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedLog {
    /// The body rendered as a string (empty if the record has none).
    pub body: String,
    /// The severity text, as sent (may be empty).
    pub severity_text: String,
    /// The trace id (hex) of the span the record was emitted in, if any.
    pub trace_id: Option<String>,
    /// When the sink finished reading the request that carried this record.
    pub received_at: Instant,
}

/// How many requests the sink has seen, by outcome.
///
/// Every request is counted once in [`received`](Self::received) when its head arrives, and
/// once more in exactly one outcome counter when the sink decides how to treat it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Every request that reached the sink, whatever became of it.
    pub received: u64,
    /// Answered 200 with the matching `Export*ServiceResponse`; its content was recorded.
    /// Includes requests answered late by `Slow`, `StallFor` or `StallEvery`.
    pub accepted: u64,
    /// Answered 200 with a body that is not protobuf ([`Behaviour::Garbage`]); its content
    /// was recorded, since the answer was a success.
    ///
    /// [`Behaviour::Garbage`]: super::Behaviour::Garbage
    pub garbage: u64,
    /// Answered 200 with a partial success that rejected everything the request carried
    /// ([`Reply::PartialSuccess`]); nothing recorded.
    ///
    /// [`Reply::PartialSuccess`]: super::Reply::PartialSuccess
    pub partial: u64,
    /// Answered with the error status of [`Behaviour::Fail`] (or of a [`Reply::Fail`],
    /// [`Reply::FailAfter`] or [`Reply::Throttle`]); nothing recorded.
    ///
    /// [`Behaviour::Fail`]: super::Behaviour::Fail
    /// [`Reply::Fail`]: super::Reply::Fail
    /// [`Reply::FailAfter`]: super::Reply::FailAfter
    /// [`Reply::Throttle`]: super::Reply::Throttle
    pub failed: u64,
    /// Answered 4xx because the request itself was wrong: unknown path or method (404/405),
    /// a missing or unsupported content type or a content encoding (415), body too large
    /// (413), or a body that does not decode as the signal's protobuf request (400). Nothing
    /// recorded.
    pub rejected: u64,
    /// Held without an answer by [`Behaviour::Stall`] (counted when the hold starts); nothing
    /// recorded. A held request is released by closing its connection, unanswered.
    ///
    /// [`Behaviour::Stall`]: super::Behaviour::Stall
    pub stalled: u64,
    /// Held for a while by [`Behaviour::StallFor`] or by a stalling turn of
    /// [`Behaviour::StallEvery`], then answered (and counted in `accepted` too once answered).
    ///
    /// [`Behaviour::StallFor`]: super::Behaviour::StallFor
    /// [`Behaviour::StallEvery`]: super::Behaviour::StallEvery
    pub held: u64,
    /// Closed without an answer by [`Behaviour::Refuse`].
    ///
    /// [`Behaviour::Refuse`]: super::Behaviour::Refuse
    pub refused: u64,
}

/// Everything recorded, behind one mutex.
#[derive(Debug, Default)]
struct Records {
    spans: Vec<ReceivedSpan>,
    /// `(trace id, span id)` of every span received, to tell a span sent again.
    seen: HashSet<(String, String)>,
    /// Spans received again (an id already seen): counted with the others everywhere, so a
    /// count that asserts "at least n" must check this is 0.
    duplicates: usize,
    spans_per_trace: HashMap<String, usize>,
    spans_per_name: HashMap<String, usize>,
    metrics: Vec<ReceivedMetric>,
    logs: Vec<ReceivedLog>,
    counts: RequestCounts,
}

/// The shared store. Reads clone out of it; writes bump the generation.
#[derive(Debug)]
pub(crate) struct Store {
    records: Mutex<Records>,
    generation: watch::Sender<u64>,
}

/// Which outcome counter a request lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Accepted,
    Garbage,
    Failed,
    Partial,
    Rejected,
    Stalled,
    Held,
    Refused,
}

/// What one acknowledged request carried, decoded.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) spans: Vec<ReceivedSpan>,
    pub(crate) metrics: Vec<ReceivedMetric>,
    pub(crate) logs: Vec<ReceivedLog>,
}

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            records: Mutex::new(Records::default()),
            generation: watch::Sender::new(0),
        }
    }

    /// The records, even if a reader panicked while holding the lock (the data stays usable).
    fn lock(&self) -> MutexGuard<'_, Records> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that wakes up on every change of the store.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Counts a request whose head arrived.
    pub(crate) fn count_received(&self) {
        self.lock().counts.received += 1;
        self.bump();
    }

    /// Counts a request's outcome.
    pub(crate) fn count(&self, outcome: Outcome) {
        {
            let mut records = self.lock();
            let counts = &mut records.counts;
            let counter = match outcome {
                Outcome::Accepted => &mut counts.accepted,
                Outcome::Garbage => &mut counts.garbage,
                Outcome::Failed => &mut counts.failed,
                Outcome::Partial => &mut counts.partial,
                Outcome::Rejected => &mut counts.rejected,
                Outcome::Stalled => &mut counts.stalled,
                Outcome::Held => &mut counts.held,
                Outcome::Refused => &mut counts.refused,
            };
            *counter += 1;
        }
        self.bump();
    }

    /// Records an acknowledged batch and counts it under `outcome`, atomically (a reader
    /// never sees the spans without the count or the other way round).
    pub(crate) fn record(&self, batch: Batch, outcome: Outcome) {
        {
            let mut records = self.lock();
            for span in &batch.spans {
                let id = (span.trace_id.clone(), span.span_id.clone());
                if !records.seen.insert(id) {
                    records.duplicates += 1;
                }
                *records
                    .spans_per_trace
                    .entry(span.trace_id.clone())
                    .or_default() += 1;
                *records.spans_per_name.entry(span.name.clone()).or_default() += 1;
            }
            records.spans.extend(batch.spans);
            records.metrics.extend(batch.metrics);
            records.logs.extend(batch.logs);
            match outcome {
                Outcome::Garbage => records.counts.garbage += 1,
                _ => records.counts.accepted += 1,
            }
        }
        self.bump();
    }

    pub(crate) fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().spans.clone()
    }

    pub(crate) fn span_count(&self) -> usize {
        self.lock().spans.len()
    }

    pub(crate) fn spans_in_trace(&self, trace_id: &str) -> usize {
        let trace_id = trace_id.to_ascii_lowercase();
        self.lock()
            .spans_per_trace
            .get(&trace_id)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn duplicate_spans(&self) -> usize {
        self.lock().duplicates
    }

    pub(crate) fn spans_named(&self, name: &str) -> usize {
        self.lock().spans_per_name.get(name).copied().unwrap_or(0)
    }

    pub(crate) fn metrics(&self) -> Vec<ReceivedMetric> {
        self.lock().metrics.clone()
    }

    pub(crate) fn logs(&self) -> Vec<ReceivedLog> {
        self.lock().logs.clone()
    }

    pub(crate) fn counts(&self) -> RequestCounts {
        self.lock().counts
    }

    pub(crate) fn clear(&self) {
        *self.lock() = Records::default();
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, name: &str) -> ReceivedSpan {
        ReceivedSpan {
            trace_id: trace.to_owned(),
            span_id: format!("{trace}-{name}"),
            parent_span_id: None,
            name: name.to_owned(),
            attributes: vec![("k".to_owned(), "v".to_owned())],
            service_name: None,
            scope: String::new(),
            start_time_unix_nano: 0,
            end_time_unix_nano: 0,
            received_at: Instant::now(),
        }
    }

    #[test]
    fn record_counts_per_trace_and_name() {
        let store = Store::new();
        let batch = Batch {
            spans: vec![span("ab", "a"), span("ab", "b"), span("cd", "a")],
            ..Batch::default()
        };
        store.record(batch, Outcome::Accepted);
        assert_eq!(store.span_count(), 3);
        assert_eq!(store.spans_in_trace("ab"), 2);
        assert_eq!(store.spans_in_trace("AB"), 2);
        assert_eq!(store.spans_named("a"), 2);
        assert_eq!(store.spans_named("zz"), 0);
        assert_eq!(store.counts().accepted, 1);
        assert_eq!(store.spans()[0].attribute("k"), Some("v"));
        assert_eq!(store.duplicate_spans(), 0);
        store.clear();
        assert_eq!(store.span_count(), 0);
        assert_eq!(store.counts(), RequestCounts::default());
    }

    /// A span sent again counts with the others, and as a duplicate: "at least n spans"
    /// with one lost and another sent twice does not pass unseen.
    #[test]
    fn a_span_sent_twice_is_counted_as_a_duplicate() {
        let store = Store::new();
        for _ in 0..2 {
            let batch = Batch {
                spans: vec![span("ab", "a")],
                ..Batch::default()
            };
            store.record(batch, Outcome::Accepted);
        }
        assert_eq!(store.span_count(), 2);
        assert_eq!(store.duplicate_spans(), 1);
        store.clear();
        assert_eq!(store.duplicate_spans(), 0);
    }
}
