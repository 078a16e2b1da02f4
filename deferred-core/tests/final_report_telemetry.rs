//! The final flush's own report (`PhaseKind::Shutdown`) is recorded through OpenTelemetry
//! after the last flush: that flush exports the earlier phases' spans, not its own, which only
//! a flush after it (the providers' `shutdown` at the end of `main`) exports. A file of its
//! own: it sets the global tracer provider, and `start` succeeds once per process.

use deferred_core::opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use deferred_core::{CountingSpanExporter, Deferred, PhaseKind, defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent};

#[deferred_handler]
async fn handler(_event: LambdaEvent<()>) -> Result<(), Error> {
    defer!("audit", async {});
    Ok(())
}

/// The `deferred.phase` spans of `kind` among `spans`.
fn phases(spans: &[SpanData], kind: &str) -> usize {
    spans
        .iter()
        .filter(|span| span.name == "deferred.phase")
        .filter(|span| {
            span.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "deferred.phase.kind" && kv.value.as_str() == kind)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_reports_span_leaves_only_with_a_flush_after_it() {
    let memory = InMemorySpanExporter::default();
    let exporter = CountingSpanExporter::new(memory.clone());
    let counts = exporter.counts();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    deferred_core::opentelemetry::global::set_tracer_provider(provider.clone());
    let deferred = Deferred::new()
        .handle_sigterm(false)
        .flush(provider.clone())
        .start()
        .await
        .expect("started");
    // Outside Lambda: an inline phase, its span recorded after its own flush.
    handler(LambdaEvent::new((), Context::default()))
        .await
        .expect("handler");

    let report = deferred.drain().await;
    assert_eq!(report.kind, PhaseKind::Shutdown);
    assert!(report.flushed(), "{report}");
    let exported = memory.get_finished_spans().expect("spans");
    assert_eq!(phases(&exported, "inline"), 1, "the last flush carries it");
    assert_eq!(
        phases(&exported, "shutdown"),
        0,
        "the final report's span cannot be in the flush it reports"
    );
    let before = counts.exported();

    // A flush after it (the provider's shutdown as `main` returns) carries it.
    provider.force_flush().expect("flushed");
    let exported = memory.get_finished_spans().expect("spans");
    assert_eq!(phases(&exported, "shutdown"), 1);
    // The phase span and one child per flusher.
    assert_eq!(counts.exported(), before + 2);
}
