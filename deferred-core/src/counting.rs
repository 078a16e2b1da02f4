//! Counting the spans an exporter could not deliver, so a phase report can say how many were
//! lost: the SDK's flush only says that an export failed, not what it carried. And counting
//! the spans that end, so that it can also tell spans the batch processor dropped on a full
//! queue, which never reach the exporter.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// How many spans a [`CountingSpanExporter`] has delivered and lost so far.
///
/// Give it to [`Deferred::span_export_counts`](crate::Deferred::span_export_counts): each
/// [`PhaseReport`](crate::PhaseReport) then says how many spans were lost since the previous
/// one.
///
/// ```
/// use std::sync::Arc;
/// use deferred_core::ExportCounts;
///
/// let counts = Arc::new(ExportCounts::default());
/// assert_eq!((counts.exported(), counts.lost()), (0, 0));
/// ```
#[derive(Debug, Default)]
pub struct ExportCounts {
    exported: AtomicU64,
    lost: AtomicU64,
    ended: AtomicU64,
    /// The most that `ended` was when a flush of the [`CountingSpanProcessor`] began, over the
    /// flushes its inner processor answered `Ok`.
    flushed: AtomicU64,
    /// Whether a [`CountingSpanProcessor`] counts into `ended` and `flushed`.
    processor: AtomicBool,
}

impl ExportCounts {
    /// Spans in exports that succeeded.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans in exports that failed (after the exporter's own retries): they are gone.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Sampled spans handed to a [`CountingSpanProcessor`] with these counts (0 without one).
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Acquire)
    }

    /// How many spans had [`ended`](Self::ended) when a flush of the [`CountingSpanProcessor`]
    /// began, the most over the flushes its inner processor answered `Ok` (0 before one; one
    /// that lost spans counts, though it is reported as failed): each of them has since been
    /// exported, lost in a failed export, or dropped on a full queue.
    pub fn flushed(&self) -> u64 {
        self.flushed.load(Ordering::Acquire)
    }

    /// Counts `n` spans lost, as a failed export does.
    #[cfg(test)]
    pub(crate) fn count_lost(&self, n: u64) {
        self.lost.fetch_add(n, Ordering::Relaxed);
    }

    /// [`flushed`](Self::flushed), if a [`CountingSpanProcessor`] counts it.
    pub(crate) fn flushed_if_counted(&self) -> Option<u64> {
        #[cfg(test)]
        if let Some(meanwhile) = tests::MEANWHILE.take() {
            meanwhile();
        }
        self.processor
            .load(Ordering::Relaxed)
            .then(|| self.flushed())
    }

    /// Runs a flush (or shutdown) of the processor, and notes what it covered if it succeeded.
    fn flush(&self, flush: impl FnOnce() -> OTelSdkResult) -> OTelSdkResult {
        // Read before the flush begins: a span counted here was queued (or dropped) before
        // the flush's own message, so the flush covers it.
        let (ended, lost) = (self.ended(), self.lost());
        flush()?;
        // `fetch_max`: flushes from several threads may finish out of order.
        self.flushed.fetch_max(ended, Ordering::AcqRel);
        // The SDK's batch processor (0.33) answers with its last batch's result only: a flush
        // whose earlier batch failed says `Ok`. Spans lost meanwhile make it a failure, so the
        // report's failure count sees it.
        match self.lost().saturating_sub(lost) {
            0 => Ok(()),
            n => Err(OTelSdkError::InternalFailure(format!(
                "{} lost in a failed export during the flush",
                crate::report::Spans(n)
            ))),
        }
    }
}

/// A span exporter that passes every batch on to `E` and counts its spans as exported or lost
/// by the result (lost when the export is dropped before it ends, or panics).
///
/// The batch processor drops a batch whose export failed (the OTLP exporter retries 429, 502,
/// 503 and 504 itself before it fails), so the spans of a failed export are lost for good.
///
/// What it cannot count alone: spans the batch processor drops before any export, because
/// its queue is full (`max_queue_size`, 2,048 by default in opentelemetry_sdk 0.33; a stalled
/// exporter holds the queue's one worker). Those never reach the exporter; the SDK logs only
/// the first such drop (`BatchSpanProcessor.SpanDroppingStarted`) and the total at shutdown.
/// Wrap the batch processor in a [`CountingSpanProcessor`] with the same counts, and the
/// reports count those too ([`PhaseReport::spans_dropped`](crate::PhaseReport::spans_dropped)).
///
/// ```
/// use deferred_core::{CountingSpanExporter, Deferred};
/// use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// // Any exporter: the OTLP one in a real function.
/// let exporter = CountingSpanExporter::new(InMemorySpanExporter::default());
/// let counts = exporter.counts();
/// let provider = SdkTracerProvider::builder()
///     .with_batch_exporter(exporter)
///     .build();
/// let handle = Deferred::new()
///     .flush(provider.clone())
///     .span_export_counts(counts)
///     .start()
///     .await?;
/// # let _ = handle;
/// # Ok(())
/// # }
/// ```
pub struct CountingSpanExporter<E> {
    inner: E,
    counts: Arc<ExportCounts>,
}

impl<E> CountingSpanExporter<E> {
    /// Wraps `inner`.
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            counts: Arc::new(ExportCounts::default()),
        }
    }

    /// The counts, shared: keep them before the exporter moves into the provider.
    pub fn counts(&self) -> Arc<ExportCounts> {
        self.counts.clone()
    }
}

impl<E: fmt::Debug> fmt::Debug for CountingSpanExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingSpanExporter")
            .field("inner", &self.inner)
            .field("counts", &self.counts)
            .finish()
    }
}

impl<E: SpanExporter> SpanExporter for CountingSpanExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        /// Counts the batch as lost unless forgotten: an export dropped before it ends (the
        /// async-runtime batch processor drops one at its `max_export_timeout`), or one that
        /// panics, delivered nothing that is known, and its spans are not sent again.
        struct Unfinished<'a>(&'a AtomicU64, u64);
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(self.1, Ordering::Relaxed);
            }
        }
        let spans = batch.len() as u64;
        let unfinished = Unfinished(&self.counts.lost, spans);
        let result = self.inner.export(batch).await;
        std::mem::forget(unfinished);
        let counter = if result.is_ok() {
            &self.counts.exported
        } else {
            &self.counts.lost
        };
        counter.fetch_add(spans, Ordering::Relaxed);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    // Passed on as such: the batch processor calls `shutdown()`, and an exporter may clean up
    // there only (the trait's default would call our `shutdown_with_timeout` and skip it).
    fn shutdown(&self) -> OTelSdkResult {
        self.inner.shutdown()
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A span processor that passes every call on to `P`, the batch processor, and counts the
/// spans that end into it ([`ExportCounts::ended`]).
///
/// With the counts of the [`CountingSpanExporter`] inside that processor, a phase whose flush
/// succeeded can tell how many spans the processor dropped on a full queue: every span that
/// ended before the flush began has then been exported, lost in a failed export, or dropped.
/// The processor notes how many that was ([`ExportCounts::flushed`]), whoever flushed it. The
/// report's [`spans_dropped`](crate::PhaseReport::spans_dropped) is that difference: a lower
/// bound (spans that end after the flush began may be exported and hide a drop), never an
/// overcount. Only sampled spans are counted: the SDK's simple processor exports no others.
/// That holds for the SDK's `BatchSpanProcessor` (its own thread, one export at a time); the
/// experimental one on an async runtime with `max_concurrent_exports` above 1 may answer a
/// flush while earlier exports still run, and their spans then count as dropped until the
/// next flush.
///
/// A flush during which spans were lost fails, though the batch processor says `Ok`: it
/// answers a flush of several batches with the last batch's result only.
///
/// ```
/// use deferred_core::{CountingSpanExporter, CountingSpanProcessor, Deferred};
/// use opentelemetry_sdk::trace::{BatchSpanProcessor, InMemorySpanExporter, SdkTracerProvider};
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let exporter = CountingSpanExporter::new(InMemorySpanExporter::default());
/// let counts = exporter.counts();
/// let batch = BatchSpanProcessor::builder(exporter).build();
/// let provider = SdkTracerProvider::builder()
///     .with_span_processor(CountingSpanProcessor::new(batch, counts.clone()))
///     .build();
/// let handle = Deferred::new()
///     .flush(provider.clone())
///     .span_export_counts(counts)
///     .start()
///     .await?;
/// # let _ = handle;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct CountingSpanProcessor<P> {
    inner: P,
    counts: Arc<ExportCounts>,
}

impl<P> CountingSpanProcessor<P> {
    /// Wraps `inner`, counting into `counts` (those of the exporter inside `inner`).
    pub fn new(inner: P, counts: Arc<ExportCounts>) -> Self {
        counts.processor.store(true, Ordering::Relaxed);
        Self { inner, counts }
    }
}

impl<P: SpanProcessor> SpanProcessor for CountingSpanProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let sampled = span.span_context.is_sampled();
        self.inner.on_end(span);
        // Counted once the processor has queued (or dropped) it: a flush that begins after
        // this count then covers it. An unsampled span may be exported or not, depending on
        // the processor: leaving it out can only lower the count of drops.
        if sampled {
            self.counts.ended.fetch_add(1, Ordering::Release);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.counts.flush(|| self.inner.force_flush())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.counts
            .flush(|| self.inner.shutdown_with_timeout(timeout))
    }

    // Passed on as such, as the exporter's: the trait's default would call ours with a
    // timeout and skip a `shutdown` of the inner processor's own.
    fn shutdown(&self) -> OTelSdkResult {
        self.counts.flush(|| self.inner.shutdown())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{
        Link, SpanKind, TraceId, TraceState, Tracer as _, TracerProvider as _,
    };
    use opentelemetry_sdk::trace::{
        BatchSpanProcessor, InMemorySpanExporter, SamplingDecision, SamplingResult,
        SdkTracerProvider, ShouldSample, SimpleSpanProcessor,
    };

    use super::*;

    std::thread_local! {
        /// Run by the next [`ExportCounts::flushed_if_counted`] on this thread before it reads:
        /// what another thread does at that moment.
        pub(crate) static MEANWHILE: std::cell::Cell<Option<Box<dyn FnOnce()>>> =
            const { std::cell::Cell::new(None) };
    }

    #[derive(Debug)]
    struct Failing;

    impl SpanExporter for Failing {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Err(OTelSdkError::InternalFailure("collector said 500".into()))
        }
    }

    fn spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("test");
        for _ in 0..n {
            tracer.in_span("work", |_| {});
        }
    }

    #[test]
    fn failed_exports_count_their_spans_as_lost() {
        let exporter = CountingSpanExporter::new(Failing);
        let counts = exporter.counts();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        spans(&provider, 3);
        assert!(provider.force_flush().is_err());
        assert_eq!((counts.exported(), counts.lost()), (0, 3));
    }

    /// Samples every span as record-only: recorded, handed to the processors, not sampled.
    #[derive(Debug, Clone)]
    struct RecordOnly;

    impl ShouldSample for RecordOnly {
        fn should_sample(
            &self,
            _: Option<&Context>,
            _: TraceId,
            _: &str,
            _: &SpanKind,
            _: &[KeyValue],
            _: &[Link],
        ) -> SamplingResult {
            SamplingResult {
                decision: SamplingDecision::RecordOnly,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            }
        }
    }

    /// A provider whose batch processor and exporter both count, into the counts returned.
    fn counted_batch(
        exporter: impl SpanExporter + 'static,
    ) -> (SdkTracerProvider, Arc<ExportCounts>) {
        let exporter = CountingSpanExporter::new(exporter);
        let counts = exporter.counts();
        let batch = BatchSpanProcessor::builder(exporter).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(CountingSpanProcessor::new(batch, counts.clone()))
            .build();
        (provider, counts)
    }

    #[test]
    fn a_flush_notes_the_spans_it_covered_only_when_it_succeeds() {
        let (provider, counts) = counted_batch(Failing);
        spans(&provider, 2);
        assert!(provider.force_flush().is_err());
        assert_eq!((counts.ended(), counts.flushed(), counts.lost()), (2, 0, 2));

        let (provider, counts) = counted_batch(InMemorySpanExporter::default());
        spans(&provider, 3);
        assert_eq!((counts.ended(), counts.flushed()), (3, 0));
        provider.force_flush().unwrap();
        assert_eq!(
            (counts.ended(), counts.flushed(), counts.exported()),
            (3, 3, 3)
        );
        assert_eq!(counts.flushed_if_counted(), Some(3));
    }

    /// The batch processor answers a flush of several batches with its last batch's result
    /// (opentelemetry_sdk 0.33, `get_spans_and_export`): a flush whose first batch was lost
    /// says `Ok`. Spans lost during it make it a failure all the same.
    #[test]
    fn a_flush_that_lost_a_batch_fails_though_the_last_one_went_out() {
        let counts = ExportCounts::default();
        counts.ended.store(2, Ordering::Release);
        let flushed = counts.flush(|| {
            // Its first batch fails, its last one goes out.
            counts.lost.fetch_add(1, Ordering::Relaxed);
            counts.exported.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        assert!(
            matches!(&flushed, Err(e) if e.to_string().contains("1 span lost in a failed export")),
            "{flushed:?}"
        );
        // What it covered still counts: the lost span is no drop.
        assert_eq!(counts.flushed(), 2);
        // A flush that loses nothing stays `Ok`.
        assert!(counts.flush(|| Ok(())).is_ok());
    }

    #[test]
    fn unsampled_spans_are_not_counted_as_ended() {
        let counts = Arc::new(ExportCounts::default());
        assert_eq!(counts.flushed_if_counted(), None);
        let simple = SimpleSpanProcessor::new(InMemorySpanExporter::default());
        let provider = SdkTracerProvider::builder()
            .with_sampler(RecordOnly)
            .with_span_processor(CountingSpanProcessor::new(simple, counts.clone()))
            .build();
        spans(&provider, 2);
        provider.force_flush().unwrap();
        // The simple processor exports no unsampled span: counted, they would read as dropped.
        assert_eq!((counts.ended(), counts.flushed()), (0, 0));
        assert_eq!(counts.flushed_if_counted(), Some(0));
    }

    /// An exporter whose export never ends, as against a stalled collector.
    #[derive(Debug)]
    struct Stalled;

    impl SpanExporter for Stalled {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            std::future::pending().await
        }
    }

    /// An export dropped before it ended delivered nothing: the batch processor of
    /// opentelemetry_sdk's async runtime drops it at its `max_export_timeout` (as here) and
    /// never sends its spans again. Found by review: they counted as neither exported nor
    /// lost, so the report said "0 spans lost", or blamed them on a full queue.
    #[tokio::test]
    async fn an_export_dropped_before_it_ended_counts_its_spans_as_lost() {
        let finished = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(finished.clone())
            .build();
        spans(&provider, 3);
        let batch = finished.get_finished_spans().unwrap();
        let exporter = CountingSpanExporter::new(Stalled);
        let counts = exporter.counts();
        let export = tokio::time::timeout(Duration::from_millis(10), exporter.export(batch));
        assert!(export.await.is_err(), "the export stalls");
        assert_eq!((counts.exported(), counts.lost()), (0, 3));
    }

    /// An exporter that cleans up in `shutdown`, not `shutdown_with_timeout` (as the SDK's own
    /// test exporter and the OTLP crate's transport clients do), and counts its shutdowns.
    #[derive(Debug, Default)]
    struct ShutsDown(Arc<AtomicU64>);

    impl SpanExporter for ShutsDown {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            Ok(())
        }

        fn shutdown(&self) -> OTelSdkResult {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// The batch processor shuts its exporter down with `shutdown()`: the wrapper passes
    /// that call on, not the trait's default (which calls `shutdown_with_timeout`, and so
    /// skipped the inner exporter's own `shutdown`). Found by review.
    #[test]
    fn shutdown_reaches_the_inner_exporter() {
        let shutdowns = Arc::new(AtomicU64::new(0));
        let exporter = CountingSpanExporter::new(ShutsDown(shutdowns.clone()));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        spans(&provider, 1);
        provider.shutdown().unwrap();
        assert_eq!(shutdowns.load(Ordering::Relaxed), 1);
    }

    /// A processor that counts its own `shutdown` calls.
    #[derive(Debug, Default)]
    struct ProcessorShutsDown(Arc<AtomicU64>);

    impl SpanProcessor for ProcessorShutsDown {
        fn on_start(&self, _span: &mut Span, _cx: &Context) {}

        fn on_end(&self, _span: SpanData) {}

        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }

        fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
            Ok(())
        }

        fn shutdown(&self) -> OTelSdkResult {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// The same for the processor: its `shutdown()` reaches the inner one's.
    #[test]
    fn shutdown_reaches_the_inner_processor() {
        let shutdowns = Arc::new(AtomicU64::new(0));
        let counts = Arc::new(ExportCounts::default());
        let processor = CountingSpanProcessor::new(ProcessorShutsDown(shutdowns.clone()), counts);
        SpanProcessor::shutdown(&processor).unwrap();
        assert_eq!(shutdowns.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn delivered_spans_are_counted_as_exported() {
        let inner = InMemorySpanExporter::default();
        let exporter = CountingSpanExporter::new(inner.clone());
        let counts = exporter.counts();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        spans(&provider, 4);
        provider.force_flush().unwrap();
        assert_eq!((counts.exported(), counts.lost()), (4, 0));
        assert_eq!(inner.get_finished_spans().unwrap().len(), 4);
    }
}
