//! The function side of the benchmark: this binary, re-executed by the driver as the Lambda
//! function (`BENCH_ROLE=function`), wired the way `BENCH_MODE` says.
//!
//! Every mode runs the same handler body: sleep `BENCH_HANDLER_MS` inside a span
//! `bench.handler` and, when `BENCH_ACTION_MS` > 0, queue (or run) one action that sleeps that
//! long inside a span `bench.action`. The only difference between modes is where the action
//! and the flush of the tracer provider run. With `BENCH_MARKS=1` the function posts marks to
//! the emulator (`flush-start`, `flush-end`, `action-end`) so the driver can tell whether the
//! environment was released while that work still ran.

use std::io::{Read as _, Write as _};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use deferred_core::{Deferred, defer, deferred_handler, flush_fn};
use lambda_runtime::layers::{OpenTelemetryLayer, TracingLayer};
use lambda_runtime::tower::util::MapResultLayer;
use lambda_runtime::{Error, LambdaEvent, Runtime, service_fn};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Value, json};
use tracing::Instrument as _;

/// The request id of the invocation being handled, for flushers that are not told.
static CURRENT: Mutex<String> = Mutex::new(String::new());

struct Config {
    handler_ms: u64,
    action_ms: u64,
    marks: bool,
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn config() -> &'static Config {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| Config {
        handler_ms: env_u64("BENCH_HANDLER_MS"),
        action_ms: env_u64("BENCH_ACTION_MS"),
        marks: std::env::var("BENCH_MARKS").is_ok_and(|v| v == "1"),
    })
}

/// What the function writes on stderr when a mark could not be posted: the driver counts
/// those invocations as errors (a lost `flush-end` would read as an early release, a lost
/// `flush-start` would hide one).
pub(crate) const MARK_FAILED: &str = "bench-mark-failed";

/// Posts a mark to the emulator with a blocking HTTP/1.1 request (called from blocking
/// threads and, for `action-end`, from `spawn_blocking`).
fn mark_blocking(request_id: &str, text: &str) {
    if !config().marks {
        return;
    }
    if let Err(error) = post_mark(request_id, text) {
        eprintln!("{MARK_FAILED} {request_id} {text}: {error}");
    }
}

fn post_mark(request_id: &str, text: &str) -> std::io::Result<()> {
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(std::io::Error::other)?;
    let mut stream = std::net::TcpStream::connect(&api)?;
    let request = format!(
        "POST /__testkit/mark HTTP/1.1\r\nHost: {api}\r\nLambda-Runtime-Aws-Request-Id: {request_id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    if answer.starts_with(b"HTTP/1.1 2") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        )))
    }
}

async fn mark(request_id: String, text: &'static str) {
    if config().marks {
        let _ = tokio::task::spawn_blocking(move || mark_blocking(&request_id, text)).await;
    }
}

fn current() -> String {
    CURRENT.lock().map(|c| c.clone()).unwrap_or_default()
}

/// The tracer flush, wrapped in marks.
fn flush_marked(tracer: &SdkTracerProvider, request_id: &str) -> Result<(), String> {
    mark_blocking(request_id, "flush-start");
    let result = tracer.force_flush().map_err(|e| e.to_string());
    mark_blocking(request_id, "flush-end");
    result
}

/// The business logic shared by every mode: the handler's own work.
async fn work(request_id: &str) {
    let ms = config().handler_ms;
    async {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    .instrument(tracing::info_span!("bench.handler", req = request_id))
    .await;
}

/// The deferred action: `BENCH_ACTION_MS` of I/O wait in a span of its own.
async fn action(request_id: String) {
    let ms = config().action_ms;
    tokio::time::sleep(Duration::from_millis(ms))
        .instrument(tracing::info_span!("bench.action", req = %request_id))
        .await;
    mark(request_id, "action-end").await;
}

fn begin(event: &LambdaEvent<Value>) -> String {
    let request_id = event.context.request_id.clone();
    if let Ok(mut c) = CURRENT.lock() {
        c.clone_from(&request_id);
    }
    request_id
}

/// Modes 5 and 6: the action is deferred, the flush runs in the deferred phase.
#[deferred_handler]
async fn deferred(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let request_id = begin(&event);
    work(&request_id).await;
    if config().action_ms > 0 {
        defer!("bench.action", action(request_id));
    }
    Ok(json!({ "ok": true }))
}

/// Modes 1 and 2 (and the baseline "inline"): everything before the response. Mode 1 also
/// flushes here; mode 2's flush runs in `OpenTelemetryLayer` after the response.
async fn inline(
    event: LambdaEvent<Value>,
    flush: Option<SdkTracerProvider>,
) -> Result<Value, Error> {
    let request_id = begin(&event);
    work(&request_id).await;
    if config().action_ms > 0 {
        action(request_id.clone()).await;
    }
    if let Some(tracer) = flush {
        tokio::task::spawn_blocking(move || flush_marked(&tracer, &request_id)).await??;
    }
    Ok(json!({ "ok": true }))
}

/// Mode 4 (naive) and the no-flush baseline: the action (and, in mode 4, the flush) is
/// spawned, and the handler returns at once.
async fn spawned(
    event: LambdaEvent<Value>,
    flush: Option<SdkTracerProvider>,
) -> Result<Value, Error> {
    let request_id = begin(&event);
    work(&request_id).await;
    let with_action = config().action_ms > 0;
    if with_action || flush.is_some() {
        tokio::spawn(async move {
            if with_action {
                action(request_id.clone()).await;
            }
            if let Some(tracer) = flush {
                let _ =
                    tokio::task::spawn_blocking(move || flush_marked(&tracer, &request_id)).await;
            }
        });
    }
    Ok(json!({ "ok": true }))
}

pub(crate) async fn main() -> Result<(), Error> {
    let mode = std::env::var("BENCH_MODE").unwrap_or_default();
    let noop = std::env::var("BENCH_NOOP").is_ok_and(|v| v == "1");
    let flush_timeout = Duration::from_millis(match env_u64("BENCH_FLUSH_TIMEOUT_MS") {
        0 => 10_000,
        ms => ms,
    });
    // Scenario (c) measures the wrappers alone: no telemetry, a no-op flush.
    let tracer = if noop {
        None
    } else {
        let endpoint = std::env::var(deferred_testkit::telemetry::ENDPOINT_ENV)?;
        let telemetry = deferred_testkit::telemetry::init(
            &endpoint,
            "bench",
            deferred_testkit::telemetry::DEFAULT_EXPORT_TIMEOUT,
        )?;
        Some(telemetry.tracer_provider.clone())
    };
    let deferred_builder = || {
        let builder = Deferred::new().flush_timeout(flush_timeout);
        match tracer.clone() {
            Some(tracer) => builder.flush(flush_fn("tracer provider", move || {
                flush_marked(&tracer, &current())
            })),
            None => builder.flush(flush_fn("no-op", || Ok::<(), String>(()))),
        }
    };
    match mode.as_str() {
        "sync" => {
            let t = tracer.clone();
            lambda_runtime::run(service_fn(move |e| inline(e, t.clone()))).await
        }
        "otel-layer" => {
            let t = tracer.clone();
            let flush = move || {
                if let Some(t) = &t {
                    let _ = flush_marked(t, &current());
                }
            };
            Runtime::new(service_fn(|e| inline(e, None)))
                .layer(OpenTelemetryLayer::new(flush))
                .run()
                .await
        }
        "naive" => {
            let t = tracer.clone();
            lambda_runtime::run(service_fn(move |e| spawned(e, t.clone()))).await
        }
        "run" => deferred_builder().run(service_fn(deferred)).await,
        "start" => {
            let _handle = deferred_builder().start().await?;
            lambda_runtime::run(service_fn(deferred)).await
        }
        "none" => lambda_runtime::run(service_fn(|e| spawned(e, None))).await,
        "ext-only" => {
            bare_extension(None)?;
            lambda_runtime::run(service_fn(|e| spawned(e, None))).await
        }
        "ext-after-post" => {
            let posted = Arc::new(Posted::default());
            bare_extension(Some(posted.clone()))?;
            // As `lambda_runtime::run` (mode 0) and `Deferred::run` build it: `TracingLayer`, then
            // outermost, like `DeferredLayer`, the signal, mapped once the POST has returned.
            Runtime::new(service_fn(|e| spawned(e, None)))
                .layer(TracingLayer::new())
                .layer(MapResultLayer::new(move |result| {
                    posted.signal();
                    result
                }))
                .run()
                .await
        }
        other => Err(format!("unknown BENCH_MODE {other:?}").into()),
    }
}

/// How many responses have been POSTed, for the extension of mode "ext-after-post".
#[derive(Default)]
struct Posted {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Posted {
    fn signal(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_one();
    }

    /// Waits until `n` responses have been POSTed.
    fn wait_for(&self, n: u64) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *count < n {
            count = self.changed.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Modes "ext-only" and "ext-after-post" (scenario c only): plain `lambda_runtime` plus a bare
/// internal extension that registers for INVOKE and calls `event/next` again, on a thread of
/// its own with one keep-alive connection.
///
/// Without `posted` ("ext-only") it calls again at once: the extension's round trip alone, so
/// that `Deferred::run` minus this mode is the cost of the wrapper and the core. With `posted`
/// ("ext-after-post") it calls again only once the runtime has POSTed the invocation's
/// response (a layer's signal, the same mutex and condvar as lambda-deferred's phase thread):
/// the one hand-off that any design keeping the flush after the POST (G3) and off the
/// runtime's threads (G4) must make, with no flush, no report and no checks.
fn bare_extension(posted: Option<Arc<Posted>>) -> Result<(), Error> {
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API")?;
    let mut stream = std::net::TcpStream::connect(&api)?;
    let body = r#"{"events":["INVOKE"]}"#;
    let register = format!(
        "POST /2020-01-01/extension/register HTTP/1.1\r\nHost: {api}\r\nLambda-Extension-Name: bench-bare\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(register.as_bytes())?;
    let (head, _) = read_response(&mut stream)?;
    let id = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("lambda-extension-identifier")
                .then(|| value.trim().to_owned())
        })
        .ok_or("no Lambda-Extension-Identifier")?;
    // Named, so that the benchmark can tell this thread's CPU from the runtime's.
    std::thread::Builder::new()
        .name("bare-extension".into())
        .spawn(move || {
        let next = format!(
            "GET /2020-01-01/extension/event/next HTTP/1.1\r\nHost: {api}\r\nLambda-Extension-Identifier: {id}\r\n\r\n"
        );
        for invocation in 1.. {
            if stream.write_all(next.as_bytes()).is_err() || read_response(&mut stream).is_err() {
                return;
            }
            if let Some(posted) = &posted {
                posted.wait_for(invocation);
            }
        }
    })?;
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body: (head, body).
fn read_response(stream: &mut std::net::TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&byte[..n]);
    }
    Ok((head, body))
}
