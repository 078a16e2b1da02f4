//! Counting the spans an exporter could not deliver, so a phase report can say how many were
//! lost: the SDK's flush only says that an export failed, not what it carried.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

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
}

/// A span exporter that passes every batch on to `E` and counts its spans as exported or lost
/// by the result.
///
/// The batch processor drops a batch whose export failed (the OTLP exporter retries 429, 502,
/// 503 and 504 itself before it fails), so the spans of a failed export are lost for good.
///
/// What it cannot count: spans the batch processor drops before any export, because its queue
/// is full (`max_queue_size`, 2,048 by default in opentelemetry_sdk 0.33; a stalled exporter
/// holds the queue's one worker). Those never reach the exporter. The SDK logs the first such
/// drop (`BatchSpanProcessor.SpanDroppingStarted`) and the total at shutdown.
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
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
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

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    use super::*;

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
