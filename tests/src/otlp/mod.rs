//! An OTLP/HTTP receiver for tests and benchmarks: [`OtlpSink`].
//!
//! The sink listens on `127.0.0.1` on an ephemeral port and serves `POST /v1/traces`,
//! `/v1/metrics` and `/v1/logs` with protobuf bodies (`application/x-protobuf`, uncompressed:
//! what opentelemetry-otlp's `http-proto` exporters send by default; any other content type,
//! or none, is answered 415). It decodes every request with `opentelemetry-proto`, answers
//! the matching `Export*ServiceResponse` with 200, and records what it acknowledged. Its
//! error answers carry a protobuf `google.rpc.Status`, as the OTLP/HTTP specification
//! requires. On demand it answers slowly, stalls, fails (at once, late, or throttling with
//! `Retry-After`), answers a partial success or garbage, or refuses connections (see
//! [`Behaviour`] and [`Reply`]).
//!
//! The server runs on its own thread with its own Tokio runtime: it keeps answering while
//! the test's runtime is blocked, and it stops (closing every connection, stalled ones
//! included) when the last clone of the [`OtlpSink`] is dropped.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use deferred_testkit::otlp::{Behaviour, OtlpSink};
//!
//! let sink = OtlpSink::start().await?;
//! // Point an exporter at `format!("{}/v1/traces", sink.endpoint())`, export, then:
//! assert!(sink.wait_for_spans(1, Duration::from_secs(5)).await);
//! // "Answers in 5 ms, but stalls 2 s on 2% of exports":
//! sink.set_behaviour(Behaviour::StallEvery {
//!     every: 50,
//!     duration: Duration::from_secs(2),
//!     base: Duration::from_millis(5),
//! });
//! # Ok(()) }
//! ```

mod behaviour;
mod decode;
mod server;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use behaviour::{Behaviour, Reply};
pub use store::{ReceivedLog, ReceivedMetric, ReceivedSpan, RequestCounts};

use behaviour::Scheduler;
use server::{ServerGuard, Shared};
use store::Store;

/// A running OTLP/HTTP receiver. Cheap to clone (clones share the server and its records);
/// `Send + Sync`. The server stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct OtlpSink {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _guard: Arc<ServerGuard>,
}

impl OtlpSink {
    /// Starts a sink on `127.0.0.1` on an ephemeral port, behaving [`Behaviour::Normal`].
    ///
    /// The server gets its own thread and its own current-thread Tokio runtime, so the
    /// caller's runtime flavour does not matter. Fails only if the port cannot be bound,
    /// the runtime not built or the thread not started.
    pub async fn start() -> std::io::Result<OtlpSink> {
        let shared = Arc::new(Shared {
            store: Store::new(),
            scheduler: Scheduler::new(),
        });
        let (addr, guard) = server::spawn(Arc::clone(&shared))?;
        Ok(OtlpSink {
            shared,
            addr,
            _guard: Arc::new(guard),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`, without a trailing slash. An exporter
    /// configured through `OTEL_EXPORTER_OTLP_ENDPOINT` appends `/v1/traces` (and so on)
    /// itself; one configured with `.with_endpoint(…)` needs the full URL:
    /// `format!("{}/v1/traces", sink.endpoint())`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span acknowledged so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.store.spans()
    }

    /// How many spans were acknowledged so far.
    pub fn span_count(&self) -> usize {
        self.shared.store.span_count()
    }

    /// How many acknowledged spans belong to the trace `trace_id` (hex, any case).
    pub fn spans_in_trace(&self, trace_id: &str) -> usize {
        self.shared.store.spans_in_trace(trace_id)
    }

    /// How many acknowledged spans carried a (trace id, span id) already received: the same
    /// span sent twice. The other counts include them, so a test that asserts "at least n
    /// spans" checks this is 0.
    pub fn duplicate_spans(&self) -> usize {
        self.shared.store.duplicate_spans()
    }

    /// How many acknowledged spans are named `name`.
    pub fn spans_named(&self, name: &str) -> usize {
        self.shared.store.spans_named(name)
    }

    /// The distinct names of the metrics acknowledged so far, in order of first arrival.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for metric in self.shared.store.metrics() {
            if !names.contains(&metric.name) {
                names.push(metric.name);
            }
        }
        names
    }

    /// Every metric of every acknowledged export, in arrival order (a periodic reader sends
    /// the same metric again on each export).
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        self.shared.store.metrics()
    }

    /// The total number of data points acknowledged for the metric `name`, over all exports.
    pub fn metric_points(&self, name: &str) -> usize {
        self.shared
            .store
            .metrics()
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.data_points)
            .sum()
    }

    /// The bodies of the log records acknowledged so far, rendered as strings, in arrival
    /// order.
    pub fn log_bodies(&self) -> Vec<String> {
        self.shared
            .store
            .logs()
            .into_iter()
            .map(|log| log.body)
            .collect()
    }

    /// Every log record acknowledged so far, in arrival order.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.shared.store.logs()
    }

    /// How many requests the sink has seen, by outcome.
    pub fn requests(&self) -> RequestCounts {
        self.shared.store.counts()
    }

    /// Waits until at least `n` spans have been acknowledged, or `timeout` has passed.
    /// Returns whether the count was reached. Event-driven: wakes on each recorded request.
    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |sink| sink.span_count() >= n)
            .await
    }

    /// Waits until `condition` holds, or `timeout` has passed; returns whether it held.
    /// The condition is checked at once and again after every change of the records or
    /// counts (a request arriving, answered, stalled, …), never by polling on a timer.
    ///
    /// ```no_run
    /// # async fn demo(sink: deferred_testkit::otlp::OtlpSink) {
    /// use std::time::Duration;
    /// // Wait until the exporter's request is being held.
    /// sink.wait_until(Duration::from_secs(5), |s| s.requests().stalled >= 1).await;
    /// # }
    /// ```
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&OtlpSink) -> bool,
    ) -> bool {
        let mut changes = self.shared.store.subscribe();
        let wait = async {
            loop {
                if condition(self) {
                    return true;
                }
                if changes.changed().await.is_err() {
                    // The store lives as long as `self`: this cannot happen, but be total.
                    return condition(self);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Sets how the sink answers from now on (requests whose body is read after this call).
    /// Restarts the behaviour's schedule, and releases every request held by
    /// [`Behaviour::Stall`]: their connections are closed without an answer.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.shared.scheduler.set(behaviour);
    }

    /// The current behaviour (a [`Behaviour::Fail`] whose turns are used up reads as
    /// [`Behaviour::Normal`]).
    pub fn behaviour(&self) -> Behaviour {
        self.shared.scheduler.current()
    }

    /// Forgets every span, metric and log record received and resets the request counts.
    /// The behaviour is left as it is.
    pub fn clear(&self) {
        self.shared.store.clear();
    }
}
