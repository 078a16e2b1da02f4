//! Quickstart: a Lambda function whose callers stay fast while its telemetry exporter stalls.
//!
//! ```text
//! cargo run -p examples --bin quickstart
//! ```
//!
//! No AWS account needed. This binary starts the testkit's Lambda emulator and an OTLP/HTTP
//! collector in-process, then runs *itself* as the Lambda function, in a child process
//! (`QUICKSTART_ROLE=function`), the way Lambda runs a `bootstrap` binary. It invokes the
//! function six times, makes the collector stall on two of them, and prints what the caller
//! saw and what happened after each response.
//!
//! The function half (module `function`) has the shape of what you would deploy: a
//! `#[deferred_handler]` that answers at once and queues a 300 ms "send receipt" action with
//! `defer!`, and a `main` that flushes the tracer provider after every invocation. It is not
//! deployable as it is: it takes its collector from the driver, builds its provider with the
//! testkit's helper, and keeps the exporter's 10 s timeout to show the worst case;
//! `api_handler` is the one to build as `bootstrap`. The driver half (module `driver`) plays
//! AWS. Set `TESTKIT_ECHO=1` to see the function's logs (`RUST_LOG` sets their level;
//! `warn` by default).

/// Set on the child process: run as the Lambda function rather than as the driver.
const ROLE_ENV: &str = "QUICKSTART_ROLE";
/// The prefix of the one line the function prints per deferred phase, for the driver.
const PHASE_LINE: &str = "quickstart-phase";

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    if std::env::var_os(ROLE_ENV).is_some() {
        function::main().await
    } else {
        driver::main().await
    }
}

/// The Lambda function, as the emulator runs it (see the module docs for what a deployable one
/// changes).
mod function {
    use std::time::Duration;

    use deferred_core::{Deferred, FlushOutcome, defer, deferred_handler};
    use deferred_testkit::telemetry;
    use lambda_runtime::{Error, LambdaEvent, service_fn};
    use serde_json::{Value, json};
    use tracing::Instrument as _;

    use super::PHASE_LINE;

    #[tracing::instrument(skip_all)]
    #[deferred_handler(flush_timeout = "1s")]
    async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
        let order = event.payload["order"].as_u64().unwrap_or_default();
        // A little work on the response path, in a span of its own.
        async { tokio::time::sleep(Duration::from_millis(2)).await }
            .instrument(tracing::info_span!("check stock", order))
            .await;
        // Runs after the response has been sent; its span joins this invocation's trace.
        defer!("send receipt", send_receipt(order));
        Ok(json!({ "order": order, "status": "accepted" }))
    }

    #[tracing::instrument]
    async fn send_receipt(order: u64) {
        tokio::time::sleep(Duration::from_millis(300)).await; // an e-mail API, say
        tracing::info!("receipt sent");
    }

    pub(super) async fn main() -> Result<(), Error> {
        let endpoint = std::env::var(telemetry::ENDPOINT_ENV)?;
        // The exporter keeps the SDK's default timeout (10 s), longer than flush_timeout, to
        // show the worst case. In production, set it below flush_timeout (see the README).
        let telemetry =
            telemetry::init(&endpoint, "quickstart", telemetry::DEFAULT_EXPORT_TIMEOUT)?;
        Deferred::new()
            .flush(telemetry.tracer_provider.clone())
            // The core logs a report of every phase; this hook also tells the driver.
            .on_report(|report| {
                let flush = match report.flushes.first().map(|f| &f.outcome) {
                    Some(FlushOutcome::Ok) => "flushed",
                    Some(FlushOutcome::TimedOut) => "abandoned",
                    Some(FlushOutcome::NotRun(_)) => "skipped",
                    Some(_) => "failed",
                    None => "none",
                };
                println!("{PHASE_LINE} {} {flush}", report.request_id);
            })
            .run(service_fn(handler))
            .await
    }
}

/// The driver: plays AWS (Lambda, a caller, an OTLP collector) and prints the table.
mod driver {
    use std::time::{Duration, Instant};

    use deferred_testkit::emulator::{Emulator, EmulatorConfig, FunctionSpec, Timeline};
    use deferred_testkit::otlp::{Behaviour, OtlpSink};
    use deferred_testkit::telemetry::ENDPOINT_ENV;
    use lambda_runtime::Error;

    use super::{PHASE_LINE, ROLE_ENV};

    /// The collector's state during each invocation.
    const PLAN: [bool; 6] = [true, true, false, false, true, true];

    /// What one invocation looked like.
    struct Row {
        healthy: bool,
        request_id: String,
        latency: Duration,
        /// From the response POST to the extension's next `event/next`.
        phase: Duration,
        /// From dispatch to the extension's next `event/next`: spans received in this window
        /// came with this invocation's flush.
        window: (Instant, Instant),
        /// What the function's phase report said of the flush.
        flush: String,
        /// Spans of this invocation's trace received by the end of its phase.
        spans_then: usize,
        /// The same, once everything is over.
        spans_final: usize,
    }

    pub(super) async fn main() -> Result<(), Error> {
        let sink = OtlpSink::start().await?;
        let emulator = Emulator::start(EmulatorConfig::default()).await?;
        let mut spec = FunctionSpec::new(std::env::current_exe()?)
            .env(ROLE_ENV, "function")
            .env(ENDPOINT_ENV, sink.endpoint());
        if std::env::var_os("RUST_LOG").is_none() {
            spec = spec.env("RUST_LOG", "warn");
        }
        emulator.spawn_function(spec).await?;

        println!(
            "lambda-deferred quickstart: a Lambda function (this binary, as a child process) on a\n\
             local Lambda emulator, exporting its spans to a local OTLP collector. Each invocation\n\
             answers at once and queues a 300 ms \"send receipt\" action; after it, the spans are\n\
             flushed (flush_timeout = 1 s). The collector stalls during invocations 3 and 4.\n\n\
             caller latency: what the caller waited. deferred phase: from the response until the\n\
             function let Lambda move on. spans exported: the invocation's spans that reached\n\
             the collector by the end of its deferred phase (and later, if any); the phase's own\n\
             spans (scope lambda-deferred) join the same trace with the next flush.\n"
        );

        let mut rows = Vec::new();
        let mut healthy_now = true;
        for (i, healthy) in PLAN.into_iter().enumerate() {
            if healthy != healthy_now {
                // Normal also releases the held requests: their connections close unanswered.
                sink.set_behaviour(if healthy {
                    Behaviour::Normal
                } else {
                    Behaviour::Stall
                });
                healthy_now = healthy;
            }
            rows.push(invoke(&emulator, &sink, i + 1, healthy).await?);
        }

        // SIGTERM: the core runs a last, bounded flush and exits 0.
        let shutdown = emulator.shutdown().await;
        if shutdown.killed || !shutdown.exit_status.is_some_and(|s| s.success()) {
            return Err(format!("the function did not shut down cleanly: {shutdown:?}").into());
        }
        for row in &mut rows {
            row.spans_final = spans_of(&sink, &row.request_id);
        }
        print_table(&sink, &rows);
        let tail = if rows.iter().all(|r| r.spans_final > 0) {
            ", and no span was lost"
        } else {
            ""
        };
        println!(
            "\nWhat you saw: every caller got its answer in milliseconds. The receipt and the span export\n\
             ran after the response, while the in-process extension kept Lambda from freezing the function.\n\
             A stalled collector cost the deferred phase at most 1 s, never the caller{tail}."
        );
        Ok(())
    }

    async fn invoke(
        emulator: &Emulator,
        sink: &OtlpSink,
        n: usize,
        healthy: bool,
    ) -> Result<Row, Error> {
        let payload = serde_json::json!({ "order": 1000 + n });
        let result = emulator.invoke(payload.to_string()).await;
        if !result.outcome.is_success() {
            return Err(format!("invocation {n} failed: {:?}", result.outcome).into());
        }
        let id = result.request_id;

        // The invocation is complete once the extension asks for the next event, i.e. once
        // the deferred phase is over.
        let complete = |tl: &Timeline| tl.request_id == id && tl.complete.is_some();
        let timeout = Duration::from_secs(5);
        if !emulator
            .wait_until(timeout, |_, tls| tls.iter().any(complete))
            .await
        {
            return Err(format!("invocation {n}: the deferred phase did not end").into());
        }
        let timeline = emulator
            .timelines()
            .into_iter()
            .find(complete)
            .ok_or("no timeline")?;
        let posted = timeline.response_posted.ok_or("no response")?;
        let (_, released) = timeline
            .extension_next
            .first()
            .cloned()
            .ok_or("the extension did not call event/next")?;

        let prefix = format!("{PHASE_LINE} {id} ");
        let flush = emulator
            .wait_for_log(|line| line.starts_with(&prefix), timeout)
            .await
            .map(|line| line[prefix.len()..].to_owned())
            .ok_or_else(|| format!("invocation {n}: no phase report"))?;

        Ok(Row {
            healthy,
            latency: result.latency,
            phase: released.saturating_duration_since(posted),
            window: (timeline.invoked, released),
            flush,
            spans_then: spans_of(sink, &id),
            spans_final: 0,
            request_id: id,
        })
    }

    /// The number of spans received in the trace of the invocation `request_id`, found through
    /// lambda_runtime's root span ("Lambda runtime invoke", attribute `requestId`), without
    /// the phase's own spans: those are recorded after the phase, so they come one flush later.
    fn spans_of(sink: &OtlpSink, request_id: &str) -> usize {
        let spans = sink.spans();
        spans
            .iter()
            .find(|s| s.attribute("requestId") == Some(request_id))
            .map_or(0, |root| {
                spans
                    .iter()
                    .filter(|s| s.trace_id == root.trace_id && s.scope != "lambda-deferred")
                    .count()
            })
    }

    fn print_table(sink: &OtlpSink, rows: &[Row]) {
        let spans = sink.spans();
        println!(
            "{:>2}  {:<9}  {:>14}  {:>14}  {:<14}  note",
            "#", "collector", "caller latency", "deferred phase", "spans exported"
        );
        for (i, row) in rows.iter().enumerate() {
            // Spans of earlier invocations that arrived during this one's phase.
            let carried: Vec<String> = rows[..i]
                .iter()
                .enumerate()
                .filter(|(_, earlier)| {
                    spans.iter().any(|s| {
                        s.attribute("requestId") == Some(earlier.request_id.as_str())
                            && (row.window.0..=row.window.1).contains(&s.received_at)
                    })
                })
                .map(|(j, _)| format!("#{}", j + 1))
                .collect();
            let exported = match (row.spans_then, row.spans_final) {
                (then, end) if then == end => then.to_string(),
                (then, 0) => format!("{then} (lost)"),
                (then, end) => format!("{then} ({end} later)"),
            };
            let note = note(row, &carried);
            println!(
                "{:>2}  {:<9}  {:>14}  {:>14}  {:<14}  {note}",
                i + 1,
                if row.healthy { "healthy" } else { "stalled" },
                ms(row.latency),
                ms(row.phase),
                exported,
            );
        }
    }

    fn note(row: &Row, carried: &[String]) -> String {
        let mut note = match row.flush.as_str() {
            "flushed" if carried.is_empty() => {
                "receipt sent after the response, then spans flushed".to_owned()
            }
            "flushed" => format!(
                "collector back: this flush also carried the spans of {}",
                carried.join(", ")
            ),
            "abandoned" => {
                "collector stalled: flush abandoned at flush_timeout (1 s), caller unaffected"
                    .to_owned()
            }
            "skipped" => "still stalled: flush skipped while the abandoned one runs".to_owned(),
            other => format!("flush {other}"),
        };
        if row.flush == "flushed" && row.spans_final == 0 {
            note.push_str(" (no spans?)");
        }
        note
    }

    fn ms(d: Duration) -> String {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}
