//! The OTLP sink against real opentelemetry-otlp exporters (built by
//! `deferred_testkit::telemetry`), and against hand-made HTTP requests.
//!
//! Every blocking `force_flush` runs on `spawn_blocking`; every wait is event-driven.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deferred_core::CountingSpanExporter;
use deferred_testkit::otlp::{Behaviour, OtlpSink, Reply};
use deferred_testkit::telemetry::{self, PROCESSOR_FLUSH_TIMEOUT, Telemetry};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prost::Message as _;

/// Generous: nothing here should take more than a fraction of it.
const WAIT: Duration = Duration::from_secs(10);

async fn sink() -> OtlpSink {
    OtlpSink::start().await.expect("the sink starts")
}

fn telemetry(sink: &OtlpSink, export_timeout: Duration) -> Telemetry {
    telemetry::build(&sink.endpoint(), "otlp-sink-test", export_timeout)
        .expect("the providers build")
}

/// Ends one span named `name` and returns its trace id (hex).
fn one_span(telemetry: &Telemetry, name: &'static str) -> String {
    let tracer = telemetry.tracer_provider.tracer("otlp-sink-test");
    let mut span = tracer.start(name);
    let trace_id = span.span_context().trace_id().to_string();
    span.end();
    trace_id
}

/// Flushes the tracer provider off the runtime; returns the result and how long it took.
async fn flush_traces(telemetry: &Telemetry) -> (OTelSdkResult, Duration) {
    let provider = telemetry.tracer_provider.clone();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let result = provider.force_flush();
        (result, start.elapsed())
    })
    .await
    .expect("the flush thread does not panic")
}

/// Shuts the providers down off the runtime (a shutdown blocks, up to 5 s when stalled).
async fn shutdown(telemetry: Telemetry) {
    tokio::task::spawn_blocking(move || {
        let _ = telemetry.shutdown();
    })
    .await
    .expect("the shutdown thread does not panic");
}

/// POSTs `body` to `path` on a fresh connection; `Err` if the connection ended unanswered.
async fn post(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), hyper::Error> {
    let response = send(addr, method, path, content_type, body).await?;
    let status = response.status();
    Ok((status, response.into_body()))
}

/// [`post`], with the answer's headers.
async fn send(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<http::Response<Bytes>, hyper::Error> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the sink accepts connections");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("the HTTP handshake succeeds");
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .expect("the request is valid");
    let (parts, body) = sender.send_request(request).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

async fn post_traces(addr: SocketAddr, body: Vec<u8>) -> Result<(StatusCode, Bytes), hyper::Error> {
    post(
        addr,
        http::Method::POST,
        "/v1/traces",
        Some("application/x-protobuf"),
        body,
    )
    .await
}

/// A valid trace export request with one span named `name`.
fn trace_request(name: &str) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![ProtoSpan {
                    trace_id: vec![7; 16],
                    span_id: vec![9; 8],
                    name: name.to_owned(),
                    ..ProtoSpan::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn flushed_spans_arrive_with_trace_ids_names_and_parents() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    let tracer = telemetry.tracer_provider.tracer("otlp-sink-test");

    let root = tracer.start("root");
    let trace_id = root.span_context().trace_id().to_string();
    let root_id = root.span_context().span_id().to_string();
    let cx = Context::current_with_span(root);
    let mut child = tracer.start_with_context("child", &cx);
    child.set_attribute(KeyValue::new("answer", 42_i64));
    child.set_attribute(KeyValue::new("kind", "test"));
    let child_id = child.span_context().span_id().to_string();
    child.end();
    cx.span().end();
    let other_trace = one_span(&telemetry, "other");

    let (result, _) = flush_traces(&telemetry).await;
    result.expect("the flush succeeds");
    // The spans were acknowledged before force_flush returned: no wait needed.
    assert_eq!(sink.span_count(), 3);
    assert_eq!(sink.spans_in_trace(&trace_id), 2);
    assert_eq!(sink.spans_in_trace(&trace_id.to_uppercase()), 2);
    assert_eq!(sink.spans_in_trace(&other_trace), 1);
    assert_eq!(sink.spans_named("child"), 1);
    assert_eq!(sink.spans_named("nope"), 0);

    let spans = sink.spans();
    let root = spans
        .iter()
        .find(|s| s.name == "root")
        .expect("root arrived");
    let child = spans
        .iter()
        .find(|s| s.name == "child")
        .expect("child arrived");
    assert_eq!(root.parent_span_id, None);
    assert_eq!(root.span_id, root_id);
    assert_eq!(child.span_id, child_id);
    assert_eq!(child.parent_span_id.as_deref(), Some(root_id.as_str()));
    assert_eq!(child.trace_id, trace_id);
    assert_eq!(child.attribute("answer"), Some("42"));
    assert_eq!(child.attribute("kind"), Some("test"));
    assert_eq!(child.service_name.as_deref(), Some("otlp-sink-test"));
    assert_eq!(child.scope, "otlp-sink-test");

    let counts = sink.requests();
    assert!(counts.accepted >= 1, "{counts:?}");
    assert_eq!(counts.received, counts.accepted, "{counts:?}");

    sink.clear();
    assert_eq!(sink.span_count(), 0);
    assert_eq!(sink.requests().received, 0);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn tracing_spans_are_exported_through_the_subscriber() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    {
        let _default = tracing::subscriber::set_default(telemetry.subscriber());
        let outer = tracing::info_span!("outer");
        let _entered = outer.enter();
        tracing::info_span!("inner").in_scope(|| tracing::info!("inside"));
        // Below the exported level: not a span in the sink.
        tracing::debug_span!("debug_only").in_scope(|| {});
    }
    let (result, _) = flush_traces(&telemetry).await;
    result.expect("the flush succeeds");
    let spans = sink.spans();
    let outer = spans
        .iter()
        .find(|s| s.name == "outer")
        .expect("outer arrived");
    let inner = spans
        .iter()
        .find(|s| s.name == "inner")
        .expect("inner arrived");
    assert_eq!(inner.trace_id, outer.trace_id);
    assert_eq!(
        inner.parent_span_id.as_deref(),
        Some(outer.span_id.as_str())
    );
    assert_eq!(sink.spans_named("debug_only"), 0);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn wait_for_spans_wakes_on_arrival_and_times_out() {
    let sink = sink().await;
    assert!(!sink.wait_for_spans(1, Duration::from_millis(50)).await);
    let waiter = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.wait_for_spans(2, WAIT).await })
    };
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    one_span(&telemetry, "a");
    one_span(&telemetry, "b");
    let (result, _) = flush_traces(&telemetry).await;
    result.expect("the flush succeeds");
    assert!(waiter.await.expect("the waiter does not panic"));
    shutdown(telemetry).await;
}

#[tokio::test]
async fn stall_holds_force_flush_until_the_processor_timeout() {
    let sink = sink().await;
    // An export timeout longer than the processor's 5 s flush wait.
    let telemetry = telemetry(&sink, Duration::from_secs(30));
    sink.set_behaviour(Behaviour::Stall);
    let trace_id = one_span(&telemetry, "stalled");

    let (result, took) = flush_traces(&telemetry).await;
    let error = result.expect_err("a stalled export makes the flush fail");
    assert!(
        format!("{error:?}").contains("Timeout"),
        "the batch processor gave up waiting: {error:?}"
    );
    assert!(
        took >= PROCESSOR_FLUSH_TIMEOUT - Duration::from_millis(100)
            && took < PROCESSOR_FLUSH_TIMEOUT + Duration::from_secs(4),
        "the flush returned after {took:?}"
    );
    assert_eq!(sink.span_count(), 0, "a stalled request is not recorded");
    assert_eq!(sink.requests().stalled, 1);

    // Releasing the stall closes the held connection unanswered. The worker thread was
    // still inside that export: the exporter retries it (a network error, within its 30 s
    // timeout), so the span does arrive after all.
    sink.set_behaviour(Behaviour::Normal);
    assert!(sink.wait_for_spans(1, WAIT).await);
    assert_eq!(sink.spans_in_trace(&trace_id), 1);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn stall_fails_the_flush_at_a_shorter_export_timeout() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(1));
    sink.set_behaviour(Behaviour::Stall);
    one_span(&telemetry, "stalled");

    let (result, took) = flush_traces(&telemetry).await;
    result.expect_err("the exporter's own timeout fails the export");
    assert!(
        took >= Duration::from_millis(900) && took < PROCESSOR_FLUSH_TIMEOUT,
        "the flush returned after {took:?}"
    );
    assert_eq!(sink.span_count(), 0);
    // The timeout used the whole retry budget: no second attempt.
    assert_eq!(sink.requests().stalled, 1);
    sink.set_behaviour(Behaviour::Normal);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn fail_500_fails_the_flush_and_drops_the_batch() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    sink.set_behaviour(Behaviour::Fail {
        status: 500,
        times: 1,
    });
    one_span(&telemetry, "lost");
    let (result, _) = flush_traces(&telemetry).await;
    result.expect_err("a 500 answer fails the flush");
    let counts = sink.requests();
    assert_eq!(counts.failed, 1, "500 is not retried: {counts:?}");
    assert_eq!(sink.span_count(), 0);
    assert_eq!(sink.behaviour(), Behaviour::Normal);

    // The next flush succeeds, and carries only the new span: the failed batch is gone.
    one_span(&telemetry, "kept");
    let (result, _) = flush_traces(&telemetry).await;
    result.expect("the sink answers normally again");
    assert_eq!(sink.spans_named("kept"), 1);
    assert_eq!(sink.spans_named("lost"), 0);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn fail_503_is_retried_by_the_exporter() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    sink.set_behaviour(Behaviour::Fail {
        status: 503,
        times: 1,
    });
    one_span(&telemetry, "retried");
    let (result, _) = flush_traces(&telemetry).await;
    result.expect("the retry succeeds");
    let counts = sink.requests();
    assert_eq!((counts.failed, counts.accepted), (1, 1), "{counts:?}");
    assert_eq!(sink.spans_named("retried"), 1);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn garbage_answer_counts_as_success_for_the_exporter() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    sink.set_behaviour(Behaviour::Garbage);
    one_span(&telemetry, "garbled");
    let (result, _) = flush_traces(&telemetry).await;
    // opentelemetry-otlp 0.33 only logs an undecodable 200 body (at debug level).
    result.expect("a 200 answer is a success, whatever its body");
    assert_eq!(sink.requests().garbage, 1);
    assert_eq!(sink.spans_named("garbled"), 1);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn refuse_fails_the_flush_after_the_exporter_retries() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(3));
    sink.set_behaviour(Behaviour::Refuse);
    one_span(&telemetry, "refused");
    let (result, took) = flush_traces(&telemetry).await;
    result.expect_err("closed connections fail the flush");
    assert!(took < PROCESSOR_FLUSH_TIMEOUT, "took {took:?}");
    let counts = sink.requests();
    assert!(
        counts.refused >= 2,
        "network errors are retried: {counts:?}"
    );
    assert_eq!(counts.accepted, 0);
    assert_eq!(sink.span_count(), 0);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn slow_delays_the_flush_and_records_the_span() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    let delay = Duration::from_millis(300);
    sink.set_behaviour(Behaviour::Slow(delay));
    one_span(&telemetry, "slow");
    let (result, took) = flush_traces(&telemetry).await;
    result.expect("a slow answer within the timeout is a success");
    assert!(took >= delay, "took {took:?}");
    assert_eq!(sink.spans_named("slow"), 1);
    shutdown(telemetry).await;
}

#[tokio::test]
async fn metrics_and_logs_arrive() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(5));
    let meter = telemetry.meter_provider.meter("otlp-sink-test");
    let counter = meter.u64_counter("invocations").build();
    counter.add(1, &[KeyValue::new("outcome", "ok")]);
    counter.add(1, &[KeyValue::new("outcome", "err")]);
    let logger = telemetry.logger_provider.logger("otlp-sink-test");
    let mut record = logger.create_log_record();
    record.set_body(AnyValue::from("hello from a log record"));
    logger.emit(record);

    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .expect("the flush thread does not panic")
        .expect("the flush succeeds");
    assert_eq!(sink.metric_names(), vec!["invocations".to_owned()]);
    assert_eq!(sink.metric_points("invocations"), 2);
    assert_eq!(
        sink.log_bodies(),
        vec!["hello from a log record".to_owned()]
    );
    shutdown(telemetry).await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_sink_keeps_serving() {
    let sink = sink().await;
    let addr = sink.addr();

    let (status, _) = post_traces(addr, b"\xff\xff\xff not protobuf".to_vec())
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(addr, http::Method::POST, "/v1/nope", None, Vec::new())
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(addr, http::Method::GET, "/v1/traces", None, Vec::new())
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = post(
        addr,
        http::Method::POST,
        "/v1/traces",
        Some("application/json"),
        b"{}".to_vec(),
    )
    .await
    .expect("answered");
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(sink.requests().rejected, 4);
    assert_eq!(sink.span_count(), 0);

    // A well-formed request still works, and gets a decodable response.
    let (status, body) = post_traces(addr, trace_request("raw"))
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::OK);
    ExportTraceServiceResponse::decode(body).expect("the answer is protobuf");
    assert_eq!(sink.spans_named("raw"), 1);
    assert_eq!(sink.spans()[0].trace_id, "07".repeat(16));
    assert_eq!(sink.requests().received, 5);
}

#[tokio::test]
async fn a_stalled_request_does_not_block_other_connections() {
    let sink = sink().await;
    let addr = sink.addr();
    sink.set_behaviour(Behaviour::Cycle(vec![
        Reply::Stall,
        Reply::Answer(Duration::ZERO),
    ]));
    let stalled = tokio::spawn(post_traces(addr, trace_request("held")));
    assert!(
        sink.wait_until(WAIT, |s| s.requests().stalled == 1).await,
        "the first request is held"
    );
    let (status, _) = post_traces(addr, trace_request("free"))
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sink.spans_named("free"), 1);
    assert!(!stalled.is_finished());

    // Changing the behaviour releases the held request: closed, unanswered, not recorded.
    sink.set_behaviour(Behaviour::Normal);
    let result = tokio::time::timeout(WAIT, stalled)
        .await
        .expect("released promptly")
        .expect("the request task does not panic");
    assert!(result.is_err(), "closed without an answer: {result:?}");
    assert_eq!(sink.spans_named("held"), 0);
}

#[tokio::test]
async fn dropping_the_sink_closes_stalled_connections() {
    let sink = sink().await;
    let addr = sink.addr();
    sink.set_behaviour(Behaviour::Stall);
    let stalled = tokio::spawn(post_traces(addr, trace_request("held")));
    assert!(sink.wait_until(WAIT, |s| s.requests().stalled == 1).await);
    drop(sink);
    let result = tokio::time::timeout(WAIT, stalled)
        .await
        .expect("the connection is closed promptly")
        .expect("the request task does not panic");
    assert!(result.is_err(), "closed without an answer: {result:?}");
}

#[tokio::test]
async fn stall_every_holds_every_nth_request() {
    let sink = sink().await;
    let addr = sink.addr();
    let hold = Duration::from_millis(200);
    sink.set_behaviour(Behaviour::StallEvery {
        every: 2,
        duration: hold,
        base: Duration::ZERO,
    });
    let mut took = Vec::new();
    for i in 0..4 {
        let start = Instant::now();
        let (status, _) = post_traces(addr, trace_request(&format!("r{i}")))
            .await
            .expect("answered");
        assert_eq!(status, StatusCode::OK);
        took.push(start.elapsed());
    }
    assert!(took[1] >= hold && took[3] >= hold, "{took:?}");
    let counts = sink.requests();
    assert_eq!((counts.held, counts.accepted), (2, 4), "{counts:?}");
    assert_eq!(sink.span_count(), 4);
}

/// A collector tells an OTLP request's encoding by its `Content-Type` (the OpenTelemetry
/// Collector answers 415 without one): a body without it is not taken as protobuf.
#[tokio::test]
async fn a_request_without_a_content_type_is_refused_with_415() {
    let sink = sink().await;
    let addr = sink.addr();
    let (status, _) = post(
        addr,
        http::Method::POST,
        "/v1/traces",
        None,
        trace_request("untyped"),
    )
    .await
    .expect("answered");
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(sink.requests().rejected, 1);
    assert_eq!(sink.span_count(), 0);
}

/// `google.rpc.Status`, the body the OTLP/HTTP specification requires of every 4xx and 5xx
/// answer (its `details` left out).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// The error answer's body as a `google.rpc.Status` in protobuf, with its content type.
fn status_message(response: &http::Response<Bytes>) -> RpcStatus {
    assert_eq!(
        response.headers().get(header::CONTENT_TYPE),
        Some(&header::HeaderValue::from_static("application/x-protobuf")),
        "{response:?}"
    );
    let status = RpcStatus::decode(response.body().clone()).expect("a google.rpc.Status");
    assert!(!status.message.is_empty(), "{status:?}");
    status
}

/// Every error answer carries a protobuf `google.rpc.Status`, as the specification requires
/// and a collector sends (the exporter reads only the code, but a body that is not one is
/// an answer no collector gives), and a 405 names the method it allows.
#[tokio::test]
async fn error_answers_carry_a_protobuf_status() {
    let sink = sink().await;
    let addr = sink.addr();
    let protobuf = Some("application/x-protobuf");

    let bad = send(
        addr,
        http::Method::POST,
        "/v1/traces",
        protobuf,
        b"\xff".to_vec(),
    )
    .await
    .expect("answered");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    status_message(&bad);

    let get = send(addr, http::Method::GET, "/v1/traces", None, Vec::new())
        .await
        .expect("answered");
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        get.headers().get(header::ALLOW),
        Some(&header::HeaderValue::from_static("POST"))
    );
    status_message(&get);

    let json = send(
        addr,
        http::Method::POST,
        "/v1/logs",
        Some("application/json"),
        b"{}".to_vec(),
    )
    .await
    .expect("answered");
    assert_eq!(json.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    status_message(&json);

    let unknown = send(addr, http::Method::POST, "/v1/nope", protobuf, Vec::new())
        .await
        .expect("answered");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    status_message(&unknown);

    sink.set_behaviour(Behaviour::Fail {
        status: 503,
        times: 1,
    });
    let failed = send(
        addr,
        http::Method::POST,
        "/v1/metrics",
        protobuf,
        Vec::new(),
    )
    .await
    .expect("answered");
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    status_message(&failed);
    assert_eq!(sink.requests().failed, 1);
}

/// The exporter's timeout bounds each request and when a retry may start, not the export: a
/// retryable failure that comes late (a proxy's 504 after 600 ms) is retried within the
/// timeout, and the retry then gets a whole timeout of its own. A 1 s exporter timeout holds
/// the flush about 1.7 s here, and up to twice the timeout in general.
#[tokio::test]
async fn a_late_retryable_failure_makes_an_export_outlast_its_timeout() {
    let sink = sink().await;
    let timeout = Duration::from_secs(1);
    let telemetry = telemetry(&sink, timeout);
    let late = Duration::from_millis(600);
    sink.set_behaviour(Behaviour::Cycle(vec![
        Reply::FailAfter(504, late),
        Reply::Stall,
    ]));
    one_span(&telemetry, "late");
    let (result, took) = flush_traces(&telemetry).await;
    result.expect_err("the retry timed out");
    assert!(
        took >= late + timeout && took < PROCESSOR_FLUSH_TIMEOUT,
        "the flush returned after {took:?}, its exporter timeout is {timeout:?}"
    );
    let counts = sink.requests();
    assert_eq!((counts.failed, counts.stalled), (1, 1), "{counts:?}");
    sink.set_behaviour(Behaviour::Normal);
    shutdown(telemetry).await;
}

/// A 429 or 503 with `Retry-After` holds the export that long before its retry, if the wait
/// ends within the exporter's timeout; a longer one fails the export at once.
#[tokio::test]
async fn retry_after_delays_the_retry_or_fails_the_export() {
    let sink = sink().await;
    let telemetry = telemetry(&sink, Duration::from_secs(3));
    sink.set_behaviour(Behaviour::Cycle(vec![
        Reply::Throttle(503, 1),
        Reply::Answer(Duration::ZERO),
    ]));
    one_span(&telemetry, "throttled");
    let (result, took) = flush_traces(&telemetry).await;
    result.expect("the retry after the wait succeeds");
    assert!(took >= Duration::from_secs(1), "took {took:?}");
    assert_eq!(sink.spans_named("throttled"), 1);

    sink.set_behaviour(Behaviour::Cycle(vec![Reply::Throttle(429, 10)]));
    one_span(&telemetry, "dropped");
    let (result, took) = flush_traces(&telemetry).await;
    result.expect_err("a wait past the timeout fails the export");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let counts = sink.requests();
    assert_eq!((counts.failed, counts.accepted), (2, 1), "{counts:?}");
    assert_eq!(sink.spans_named("dropped"), 0);
    sink.set_behaviour(Behaviour::Normal);
    shutdown(telemetry).await;
}

/// A partial success (200, `partial_success` set) is a success to the exporter, which only
/// logs it and does not retry (as the specification says): the spans the collector rejected
/// are gone, and neither the flush nor a `CountingSpanExporter` says so.
#[tokio::test]
async fn a_partial_success_is_a_success_whose_rejected_spans_are_not_counted_lost() {
    let sink = sink().await;
    let exporter = CountingSpanExporter::new(
        SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", sink.endpoint()))
            .with_timeout(Duration::from_secs(5))
            .build()
            .expect("the exporter builds"),
    );
    let counts = exporter.counts();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    sink.set_behaviour(Behaviour::Cycle(vec![Reply::PartialSuccess]));
    let mut span = provider.tracer("otlp-sink-test").start("rejected");
    span.end();
    let flushed = provider.clone();
    tokio::task::spawn_blocking(move || flushed.force_flush())
        .await
        .expect("the flush thread does not panic")
        .expect("a partial success is a success");
    let requests = sink.requests();
    assert_eq!(
        (requests.partial, requests.accepted),
        (1, 0),
        "{requests:?}"
    );
    assert_eq!(sink.span_count(), 0, "the rejected span is not recorded");
    assert_eq!((counts.exported(), counts.lost()), (1, 0), "{counts:?}");
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("the shutdown thread does not panic")
        .expect("the provider shuts down");
}
