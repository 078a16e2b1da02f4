//! A Lambda function for the integration tests, run as a child process of the emulator.
//!
//! `FIXTURE_MODE` picks how it is wired: `run` (`Deferred::run`), `start` (`Deferred::start`
//! and plain `lambda_runtime::run`), `runtime` (`Deferred::start` and a `Runtime` built with
//! its layer and SnapStart resource; `FIXTURE_SNAPSTART_RESOURCE=0` leaves the resource out),
//! `concurrent` (`Deferred::run_concurrent`), `naive` (no
//! extension: the flush is spawned and the handler returns, the design this library replaces)
//! or `sync` (flush before returning).
//! `FLUSH_TIMEOUT_MS` and `REGISTER_TIMEOUT_MS` set the builder's timeouts; `FLUSH_METRICS=1`
//! adds the meter provider to the flush; `FIXTURE_INIT_SPAN=1` traces a span `init-work` during
//! init; `HANDLER_TIMEOUT_MS` drops a handler's future that has not completed by then (a
//! timeout layer of the user's); `FIXTURE_FLUSH_HANG=1` registers, before the tracer provider, a flush named `hang`
//! whose first call never returns (the chain's watchdog must abandon it), and
//! `FIXTURE_FLUSH_HANG_LAST=1` one named `hang-last` after the tracer provider (on a thread of
//! its own);
//! `FIXTURE_OWN_SIGTERM=1` (mode `start`) handles SIGTERM in the function (`shutdown()`, then
//! return from `main`); `FIXTURE_RUNTIME` picks the Tokio runtime (see `main`). Each invocation's
//! payload is a [`Plan`]:
//! what the handler does, which actions it defers, and whether it streams its answer. Actions post marks to the emulator
//! (`start:<name>`, `end:<name>`) so tests can order them against the protocol timeline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deferred_core::{Deferred, defer, deferred_handler};
use deferred_testkit::mark::mark;
use deferred_testkit::telemetry::{self, current_trace_id};
use lambda_runtime::streaming::Body;
use lambda_runtime::{Error, FunctionResponse, LambdaEvent, StreamResponse, service_fn};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Plan {
    #[serde(default)]
    actions: Vec<ActionPlan>,
    #[serde(default)]
    handler: HandlerPlan,
    #[serde(default)]
    handler_ms: u64,
    /// After `actions`, queue this many tiny actions named `bulk` with `defer!` (past the
    /// queue's limit `defer!` panics, so the handler panics). Every 500th one that runs posts
    /// the mark `bulk:<n>` (n = how many bulk actions of this invocation ran so far).
    #[serde(default)]
    defer_count: usize,
    /// Queue the `defer_count` actions with `try_defer!` instead: on the first error, post the
    /// mark `queue-full:<queued so far>` (the mark text then carries the error) and stop.
    #[serde(default)]
    bulk_try: bool,
    /// Queue one more action, `capture`, that owns a buffer of this many bytes (every page
    /// written) and posts `capture:<len>`.
    #[serde(default)]
    capture_bytes: usize,
    /// Stream the answer (a response-streaming function) instead of returning it whole.
    #[serde(default)]
    stream: Option<StreamPlan>,
    /// Then call the deferred handler again with each of these, in order, in the same
    /// invocation, from the undecorated `timed` (a router that calls a deferred handler per
    /// record); the answer is the last call's.
    #[serde(default)]
    again: Vec<Plan>,
    /// Present (any value): decoding the event panics (a `Deserialize` impl that unwraps), in
    /// lambda_runtime's response layer, outside its handler's panic guard.
    #[serde(default, deserialize_with = "panics_when_decoded")]
    #[expect(dead_code, reason = "never decoded: its decoding panics")]
    decode_panics: (),
}

fn panics_when_decoded<'de, D: serde::Deserializer<'de>>(_: D) -> Result<(), D::Error> {
    panic!("this event panics as it is decoded, on purpose")
}

/// A streamed answer: a line `trace_id <id>`, then `chunks` lines `chunk <i>`, `ms` apart,
/// written by a task of the handler's after it returned. The task posts `stream-end` after
/// the last line (before the stream is closed). With `fail`, the stream then ends in an
/// error, which lambda_runtime writes into the stream; with `panic`, the task panics instead,
/// dropping its sender.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct StreamPlan {
    chunks: usize,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    panic: bool,
}

#[derive(Debug, Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum HandlerPlan {
    #[default]
    Ok,
    Err,
    Panic,
    /// Returns an answer that fails to serialize: lambda_runtime cannot post it, and its loop
    /// ends with the error.
    Unserializable,
    /// Returns an answer whose serialization panics (a `Serialize` impl that unwraps):
    /// lambda_runtime serializes it outside its handler's panic guard.
    PanicOnSerialize,
    /// Queues its actions, then never returns: only a timeout around the handler
    /// (`HANDLER_TIMEOUT_MS`) ends it, by dropping its future.
    Hang,
}

/// The handler's answer: JSON, or one whose serialization fails.
#[derive(Debug)]
enum Answer {
    Json(Value),
    Unserializable,
    PanicOnSerialize,
}

impl serde::Serialize for Answer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Json(value) => value.serialize(serializer),
            Self::Unserializable => Err(serde::ser::Error::custom(
                "this answer does not serialize, on purpose",
            )),
            Self::PanicOnSerialize => panic!("this answer panics as it serializes, on purpose"),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
struct ActionPlan {
    name: String,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    kind: ActionKind,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ActionKind {
    #[default]
    Ok,
    Err,
    Panic,
    Hang,
    /// Spawns its own task (which sleeps `ms`, then posts `spawned:<name>`) and returns at once.
    Spawn,
    /// Blocks its thread for `ms` (`std::thread::sleep`, the mistake of a synchronous call in
    /// an action), holding a worker of the runtime.
    Block,
}

#[deferred_handler]
async fn handler(event: LambdaEvent<Plan>) -> Result<FunctionResponse<Answer, Body>, Error> {
    let plan = event.payload;
    let request_id = event.context.request_id;
    let trace_id = current_trace_id();
    work(plan.handler_ms).await;
    for action in plan.actions {
        let request_id = request_id.clone();
        defer!(action.name.clone(), run_action(action, request_id));
    }
    queue_bulk(plan.defer_count, plan.bulk_try, &request_id);
    if plan.capture_bytes > 0 {
        let buffer = vec![0xA5_u8; plan.capture_bytes];
        let request_id = request_id.clone();
        defer!("capture", async move {
            let len = buffer.iter().map(|b| usize::from(*b != 0)).sum::<usize>();
            mark(&request_id, &format!("capture:{len}")).await;
        });
    }
    match plan.handler {
        HandlerPlan::Ok => Ok(match plan.stream {
            None => {
                FunctionResponse::BufferedResponse(Answer::Json(json!({ "trace_id": trace_id })))
            }
            Some(stream) => {
                FunctionResponse::StreamingResponse(streamed(stream, trace_id, request_id))
            }
        }),
        HandlerPlan::Unserializable => {
            Ok(FunctionResponse::BufferedResponse(Answer::Unserializable))
        }
        HandlerPlan::PanicOnSerialize => {
            Ok(FunctionResponse::BufferedResponse(Answer::PanicOnSerialize))
        }
        HandlerPlan::Err => Err("the handler failed on purpose".into()),
        HandlerPlan::Panic => panic!("the handler panicked on purpose"),
        HandlerPlan::Hang => std::future::pending().await,
    }
}

/// [`handler`], dropped after `HANDLER_TIMEOUT_MS` if that is set (a timeout layer of the
/// user's around the handler); lambda_runtime then posts the timeout as the invocation's error.
/// `HANDLER_START_DELAY_MS`: called only that long after the runtime got the invocation (a slow
/// middleware in front of the handler).
async fn timed(event: LambdaEvent<Plan>) -> Result<FunctionResponse<Answer, Body>, Error> {
    if let Some(delay) = env_ms("HANDLER_START_DELAY_MS") {
        tokio::time::sleep(delay).await;
    }
    let LambdaEvent {
        mut payload,
        context,
    } = event;
    let again = std::mem::take(&mut payload.again);
    let mut answer = once(LambdaEvent::new(payload, context.clone())).await;
    for plan in again {
        answer = once(LambdaEvent::new(plan, context.clone())).await;
    }
    answer
}

/// One call of the deferred handler, under `HANDLER_TIMEOUT_MS` if set.
async fn once(event: LambdaEvent<Plan>) -> Result<FunctionResponse<Answer, Body>, Error> {
    match env_ms("HANDLER_TIMEOUT_MS") {
        Some(limit) => tokio::time::timeout(limit, handler(event))
            .await
            .map_err(|_| Error::from("the handler timed out"))?,
        None => handler(event).await,
    }
}

/// The streamed answer of [`StreamPlan`]: its lines come from a task, after the handler returned.
fn streamed(plan: StreamPlan, trace_id: String, request_id: String) -> StreamResponse<Body> {
    let (mut sender, body) = lambda_runtime::streaming::channel();
    tokio::spawn(async move {
        if sender
            .send_data(format!("trace_id {trace_id}\n").into())
            .await
            .is_err()
        {
            return;
        }
        for i in 0..plan.chunks {
            tokio::time::sleep(Duration::from_millis(plan.ms)).await;
            if sender
                .send_data(format!("chunk {i}\n").into())
                .await
                .is_err()
            {
                return;
            }
        }
        mark(&request_id, "stream-end").await;
        if plan.panic {
            panic!("the stream's writer panicked on purpose");
        }
        if plan.fail {
            sender.send_error(lambda_runtime_api_client::Error::new(
                "the stream failed on purpose",
            ));
        }
    });
    StreamResponse::from(body)
}

/// Queues `count` tiny actions (see [`Plan::defer_count`]).
fn queue_bulk(count: usize, use_try: bool, request_id: &str) {
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for queued in 0..count {
        let ran = ran.clone();
        let rid = request_id.to_owned();
        let action = async move {
            let n = ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if n.is_multiple_of(500) {
                mark(&rid, &format!("bulk:{n}")).await;
            }
        };
        if use_try {
            if let Err(error) = deferred_core::try_defer!("bulk", action) {
                let text = format!("queue-full:{queued}:{error}");
                let request_id = request_id.to_owned();
                // Posted from a task: the handler itself stays synchronous here.
                tokio::spawn(async move { mark(&request_id, &text).await });
                return;
            }
        } else {
            defer!("bulk", action);
        }
    }
}

/// The handler of the naive design: spawn the flush and return at once.
async fn naive_handler(
    event: LambdaEvent<Plan>,
    tracer: opentelemetry_sdk::trace::SdkTracerProvider,
) -> Result<Value, Error> {
    let trace_id = current_trace_id();
    let request_id = event.context.request_id;
    work(event.payload.handler_ms).await;
    tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || tracer.force_flush()).await;
        mark(&request_id, "naive-flushed").await;
    });
    Ok(json!({ "trace_id": trace_id }))
}

/// The handler of the synchronous design: flush, then return.
async fn sync_handler(
    event: LambdaEvent<Plan>,
    tracer: opentelemetry_sdk::trace::SdkTracerProvider,
) -> Result<Value, Error> {
    let trace_id = current_trace_id();
    work(event.payload.handler_ms).await;
    let _ = tokio::task::spawn_blocking(move || tracer.force_flush()).await;
    Ok(json!({ "trace_id": trace_id }))
}

async fn work(ms: u64) {
    async {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    .instrument(tracing::info_span!("handler-work"))
    .await;
}

async fn run_action(action: ActionPlan, request_id: String) -> Result<(), String> {
    let span = tracing::info_span!("deferred-action", action = %action.name);
    async move {
        mark(&request_id, &format!("start:{}", action.name)).await;
        if let ActionKind::Spawn = action.kind {
            let (name, ms, rid) = (action.name.clone(), action.ms, request_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                mark(&rid, &format!("spawned:{name}")).await;
            });
            mark(&request_id, &format!("end:{}", action.name)).await;
            return Ok(());
        }
        if let ActionKind::Block = action.kind {
            std::thread::sleep(Duration::from_millis(action.ms));
        } else {
            tokio::time::sleep(Duration::from_millis(action.ms)).await;
        }
        let result = match action.kind {
            ActionKind::Ok | ActionKind::Block => Ok(()),
            ActionKind::Err => Err(format!("action {} failed on purpose", action.name)),
            ActionKind::Panic => panic!("action {} panicked on purpose", action.name),
            ActionKind::Hang => std::future::pending().await,
            ActionKind::Spawn => Ok(()),
        };
        mark(&request_id, &format!("end:{}", action.name)).await;
        result
    }
    .instrument(span)
    .await
}

/// `runtime`: `Deferred::start` and a `lambda_runtime::Runtime` built here, as a function that
/// keeps its own runtime does: the tracing layer, the deferred layer and the SnapStart resource
/// (left out with `FIXTURE_SNAPSTART_RESOURCE=0`, to show what it is for).
async fn own_runtime(deferred: Deferred) -> Result<(), Error> {
    let handle = deferred.start().await?;
    // `FIXTURE_LAYERS_REVERSED=1`: the deferred layer added first, inside the tracing one (the
    // wrong order, which the core warns about).
    if env_flag("FIXTURE_LAYERS_REVERSED") {
        return lambda_runtime::Runtime::new(service_fn(timed))
            .layer(handle.layer())
            .layer(lambda_runtime::layers::TracingLayer::new())
            .run()
            .await;
    }
    let runtime = lambda_runtime::Runtime::new(service_fn(timed))
        .layer(lambda_runtime::layers::TracingLayer::new())
        .layer(handle.layer());
    if std::env::var("FIXTURE_SNAPSTART_RESOURCE").is_ok_and(|v| v == "0") {
        runtime.run().await
    } else {
        runtime
            .register_snapstart_resource(handle.snapstart_resource())
            .run()
            .await
    }
}

/// The environment variable `name` as a number of milliseconds, if set and valid.
fn env_ms(name: &str) -> Option<Duration> {
    let ms = std::env::var(name).ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// Whether the environment variable `name` is `1`.
/// A flusher whose first call never returns (a stalled exporter); later calls succeed.
fn hangs_once(name: &'static str, hung: &'static AtomicBool) -> impl deferred_core::Flush {
    deferred_core::flush_fn(name, move || {
        if !hung.swap(true, Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
        Ok::<(), String>(())
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// `FIXTURE_RUNTIME` picks the Tokio runtime the function runs on: `multi` (the default,
/// `#[tokio::main]`), `current` (`flavor = "current_thread"`), `multi1` (`worker_threads = 1`),
/// `local` (current-thread, everything inside a `LocalSet`), `blocking1` (multi-thread with
/// `max_blocking_threads(1)`).
fn main() -> Result<(), Error> {
    let flavour = std::env::var("FIXTURE_RUNTIME").unwrap_or_default();
    let mut builder = match flavour.as_str() {
        "current" | "local" => tokio::runtime::Builder::new_current_thread(),
        "multi1" => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
        "blocking1" => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.max_blocking_threads(1);
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build()?;
    if flavour == "local" {
        let local = tokio::task::LocalSet::new();
        return runtime.block_on(local.run_until(real_main()));
    }
    runtime.block_on(real_main())
}

async fn real_main() -> Result<(), Error> {
    let telemetry = telemetry::init_from_env("fixture")?;
    let tracer = telemetry.tracer_provider.clone();
    // `FIXTURE_INIT_SPAN=1`: init's own work, traced (a SnapStart snapshot must not carry it).
    if env_flag("FIXTURE_INIT_SPAN") {
        tracing::info_span!("init-work").in_scope(|| {});
    }
    let mut deferred = Deferred::new();
    if env_flag("FIXTURE_FLUSH_HANG") {
        // First registered, so it runs on the chain's phase thread.
        static HUNG: AtomicBool = AtomicBool::new(false);
        deferred = deferred.flush(hangs_once("hang", &HUNG));
    }
    let mut deferred = deferred
        .span_export_counts(telemetry.span_counts.clone())
        .flush(tracer.clone())
        .flush_timeout(env_ms("FLUSH_TIMEOUT_MS").unwrap_or(Duration::from_secs(10)));
    if env_flag("FIXTURE_FLUSH_HANG_LAST") {
        // Registered after the tracer provider, so it runs on a thread of its own (not the
        // chain's phase thread).
        static HUNG_LAST: AtomicBool = AtomicBool::new(false);
        deferred = deferred.flush(hangs_once("hang-last", &HUNG_LAST));
    }
    // `FIXTURE_OWN_SIGTERM=1` (mode `start`): the function handles SIGTERM itself, as the
    // README says: `handle_sigterm(false)`, then `DeferredHandle::shutdown` and return.
    if env_flag("FIXTURE_OWN_SIGTERM") {
        deferred = deferred.handle_sigterm(false);
    }
    if let Some(timeout) = env_ms("REGISTER_TIMEOUT_MS") {
        deferred = deferred.register_timeout(timeout);
    }
    if let Some(margin) = env_ms("SAFETY_MARGIN_MS") {
        deferred = deferred.safety_margin(margin);
    }
    // `REPORT_HOOK_BLOCK_MS`: the first phase's `on_report` hook blocks that long (a hook
    // doing blocking I/O).
    if let Some(block) = env_ms("REPORT_HOOK_BLOCK_MS") {
        static BLOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        deferred = deferred.on_report(move |_| {
            if !BLOCKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(block);
            }
        });
    }
    // `REPORT_HOOK_PANIC=1`: every phase's `on_report` hook panics (a hook that unwraps a
    // send to a receiver that is gone).
    if env_flag("REPORT_HOOK_PANIC") {
        deferred = deferred.on_report(|report| panic!("hook bug at {}", report.request_id));
    }
    // `FLUSH_METRICS=1`: flush the meter provider too (the phase's own histograms).
    if env_flag("FLUSH_METRICS") {
        deferred = deferred.flush(telemetry.meter_provider.clone());
    }
    match std::env::var("FIXTURE_MODE").as_deref() {
        Ok("run") | Err(_) => deferred.run(service_fn(timed)).await,
        Ok("concurrent") => deferred.run_concurrent(service_fn(timed)).await,
        Ok("runtime") => own_runtime(deferred).await,
        Ok("start") => {
            // `START_GIVE_UP_MS`: stop waiting for `start` after this long (a `timeout`
            // around it) and serve all the same.
            let handle = match env_ms("START_GIVE_UP_MS") {
                Some(wait) => {
                    let started = tokio::time::timeout(wait, deferred.start()).await;
                    if started.is_err() {
                        tracing::warn!("fixture: gave up waiting for Deferred::start");
                    }
                    started.ok().transpose()?
                }
                None => Some(deferred.start().await?),
            };
            if env_flag("FIXTURE_OWN_SIGTERM") {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    ended = lambda_runtime::run(service_fn(timed)) => return ended,
                    _ = term.recv() => {
                        if let Some(handle) = &handle {
                            handle.shutdown().await;
                        }
                        tracing::info!("fixture: own SIGTERM handler done, returning from main");
                        return Ok(());
                    }
                }
            }
            let ended = lambda_runtime::run(service_fn(timed)).await;
            // As the README says for an own loop: the work in flight before the error.
            if let (Err(_), Some(handle)) = (&ended, handle) {
                handle.drain().await;
            }
            ended
        }
        Ok("naive") => lambda_runtime::run(service_fn(|e| naive_handler(e, tracer.clone()))).await,
        Ok("sync") => lambda_runtime::run(service_fn(|e| sync_handler(e, tracer.clone()))).await,
        Ok(other) => Err(format!("unknown FIXTURE_MODE {other:?}").into()),
    }
}
