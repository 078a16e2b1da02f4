//! A `lambda_http` function for the integration tests of tests/http.rs, run as a child process
//! of the emulator: a small accounts API whose handler is a `#[deferred_handler]` on a
//! `lambda_http::Request` and queues an audit action with `defer!`.
//!
//! Routes (matched on the raw path, without the REST API's stage):
//! - `GET /accounts/{id}`: 200 with the account (`acc-1` exists from the start), else 404;
//! - `POST /accounts` with `{"owner": "…"}`: 201 with the new account and a `location`
//!   header, 400 on another body;
//! - anything else: 404.
//!
//! Every answer is JSON `{"account" | "error": …, "seen": {…}}`, where `seen` is what the
//! handler read from the event (the request context's kind, the stage, the domain, the raw
//! path, the query and path parameters, the cookies), and carries the headers
//! `content-type`, `cache-control`, `x-request-id` (the Lambda request id), `x-trace-id` (the
//! handler span's trace) and `set-cookie: last-account=<id>`.
//!
//! Request headers drive the test cases: `x-fixture: err` makes the handler return `Err` and
//! `x-fixture: panic` makes it panic, both after queueing the audit; `x-audit-ms: <n>` makes
//! the audit action take `n` ms. The audit action posts the marks `audit-start:<route>` and
//! `audit:<route> <status>` (`<route>` is `<METHOD> <raw path>`; the status is `error` when
//! the handler fails) to the emulator, in a span named `audit`.
//!
//! `HTTP_FIXTURE_MODE` picks the wiring: `run` (default: `Deferred::run` with
//! `lambda_http::Adapter`), `start` (`Deferred::start`, then `lambda_http::run`), `layer`
//! (`Deferred::start`, then a `lambda_runtime::Runtime` of the adapter with `TracingLayer` and,
//! outermost, the handle's `DeferredLayer`) or `stream` (`Deferred::run` with
//! `lambda_http::StreamAdapter`, as for a function URL in `RESPONSE_STREAM` mode: the handler is
//! [`streamed_handler`], whose body is a `lambda_runtime::streaming::Body` that a task fills
//! after the handler returned; `x-stream-ms: <n>` sends it in three pieces `n` ms apart, and the
//! task posts the mark `stream-end:<route>` once the last piece is out).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use deferred_core::{Deferred, defer, deferred_handler};
use deferred_testkit::mark::mark;
use deferred_testkit::telemetry::{self, current_trace_id};
use lambda_http::http::StatusCode;
use lambda_http::request::RequestContext;
use lambda_http::{
    Adapter, Body, Error, Request, RequestExt, RequestPayloadExt, Response, StreamAdapter,
    service_fn,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::Instrument as _;

#[derive(Debug, Clone, Serialize)]
struct Account {
    id: String,
    owner: String,
    balance_cents: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    owner: String,
}

static ACCOUNTS: LazyLock<Mutex<BTreeMap<String, Account>>> = LazyLock::new(|| {
    let seed = Account {
        id: "acc-1".into(),
        owner: "Ada Lovelace".into(),
        balance_cents: 125_000,
    };
    Mutex::new(BTreeMap::from([(seed.id.clone(), seed)]))
});
static NEXT_ID: AtomicU64 = AtomicU64::new(2);

fn accounts() -> std::sync::MutexGuard<'static, BTreeMap<String, Account>> {
    ACCOUNTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[tracing::instrument(name = "http-handler", skip_all, fields(method = %request.method(), path = request.raw_http_path()))]
#[deferred_handler]
async fn handler(request: Request) -> Result<Response<Body>, Error> {
    let request_id = request
        .lambda_context_ref()
        .map(|context| context.request_id.clone())
        .unwrap_or_default();
    let route = format!("{} {}", request.method(), request.raw_http_path());
    let audit_ms = header(&request, "x-audit-ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);

    match header(&request, "x-fixture") {
        Some("err") => {
            defer!("audit", audit(request_id, route, "error".into(), audit_ms));
            return Err("the account store is unavailable (on purpose)".into());
        }
        Some("panic") => {
            defer!("audit", audit(request_id, route, "error".into(), audit_ms));
            panic!("the handler panicked on purpose");
        }
        _ => {}
    }

    let (status, mut body, location) = answer(&request);
    body["seen"] = seen(&request);
    defer!(
        "audit",
        audit(
            request_id.clone(),
            route,
            status.as_u16().to_string(),
            audit_ms
        )
    );

    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .header("x-request-id", request_id)
        .header("x-trace-id", current_trace_id());
    if let Some(location) = location {
        response = response
            .header("location", &location)
            .header("set-cookie", format!("last-account={location}; Path=/"));
    }
    Ok(response.body(Body::from(body.to_string()))?)
}

/// The status, the JSON body and, for a new account, its path.
fn answer(request: &Request) -> (StatusCode, Value, Option<String>) {
    let path = request.raw_http_path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method().as_str(), segments.as_slice()) {
        ("GET", ["accounts", id]) => match accounts().get(*id) {
            Some(account) => (StatusCode::OK, json!({ "account": account }), None),
            None => (
                StatusCode::NOT_FOUND,
                json!({ "error": format!("no account {id}") }),
                None,
            ),
        },
        ("POST", ["accounts"]) => match request.payload::<NewAccount>() {
            Ok(Some(new)) => {
                let id = format!("acc-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
                let account = Account {
                    id: id.clone(),
                    owner: new.owner,
                    balance_cents: 0,
                };
                accounts().insert(id.clone(), account.clone());
                let location = format!("/accounts/{id}");
                (
                    StatusCode::CREATED,
                    json!({ "account": account }),
                    Some(location),
                )
            }
            Ok(None) | Err(_) => (
                StatusCode::BAD_REQUEST,
                json!({ "error": "expected {\"owner\": \"…\"}" }),
                None,
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no route {} {path}", request.method()) }),
            None,
        ),
    }
}

/// What the handler read from the event, for the tests to check that lambda_http decoded it.
fn seen(request: &Request) -> Value {
    let (kind, stage, domain) = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => {
            ("rest", context.stage.clone(), context.domain_name.clone())
        }
        Some(RequestContext::ApiGatewayV2(context)) => {
            ("http", context.stage.clone(), context.domain_name.clone())
        }
        Some(RequestContext::Alb(_)) => ("alb", None, None),
        Some(_) => ("other", None, None),
        None => ("none", None, None),
    };
    let map = |pairs: Option<&lambda_http::aws_lambda_events::query_map::QueryMap>| {
        pairs
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_owned(), Value::from(v)))
                    .collect::<serde_json::Map<_, _>>()
            })
            .unwrap_or_default()
    };
    json!({
        "kind": kind,
        "stage": stage,
        "domain": domain,
        "raw_path": request.raw_http_path(),
        "uri": request.uri().to_string(),
        "query": map(request.query_string_parameters_ref()),
        "path_parameters": map(request.path_parameters_ref()),
        "cookie": header(request, "cookie"),
    })
}

fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The deferred audit record: marks its start and end on the emulator's timeline.
async fn audit(request_id: String, route: String, status: String, ms: u64) {
    async move {
        mark(&request_id, &format!("audit-start:{route}")).await;
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        tracing::info!(%route, %status, "audit record written");
        mark(&request_id, &format!("audit:{route} {status}")).await;
    }
    .instrument(tracing::info_span!("audit"))
    .await;
}

/// The `stream` mode's handler: [`handler`]'s answer (called from this handler's body, it joins
/// this invocation), with its body sent as a response stream by a task, after this returns.
#[deferred_handler]
async fn streamed_handler(
    request: Request,
) -> Result<Response<lambda_runtime::streaming::Body>, Error> {
    let request_id = request
        .lambda_context_ref()
        .map(|context| context.request_id.clone())
        .unwrap_or_default();
    let route = format!("{} {}", request.method(), request.raw_http_path());
    let pause = Duration::from_millis(
        header(&request, "x-stream-ms")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0),
    );
    let (parts, body) = handler(request).await?.into_parts();
    let text = bytes::Bytes::copy_from_slice(&body);
    let (mut sender, stream) = lambda_runtime::streaming::channel();
    tokio::spawn(async move {
        let piece = text.len().div_ceil(3).max(1);
        for (i, start) in (0..text.len()).step_by(piece).enumerate() {
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let end = (start + piece).min(text.len());
            if sender.send_data(text.slice(start..end)).await.is_err() {
                return;
            }
        }
        // Before `sender` drops: the stream, and with it the response's POST, ends after this.
        mark(&request_id, &format!("stream-end:{route}")).await;
    });
    Ok(Response::from_parts(parts, stream))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let telemetry = telemetry::init_from_env("http-fixture")?;
    let deferred = Deferred::new().flush(telemetry.tracer_provider.clone());
    match std::env::var("HTTP_FIXTURE_MODE").as_deref() {
        Ok("run") | Err(_) => deferred.run(Adapter::from(service_fn(handler))).await,
        Ok("start") => {
            deferred.start().await?;
            lambda_http::run(service_fn(handler)).await
        }
        Ok("layer") => {
            let handle = deferred.start().await?;
            // lambda_http's documented way to a `Runtime` (its `Adapter` is `#[doc(hidden)]`).
            lambda_http::runtime(service_fn(handler))
                .layer(lambda_runtime::layers::TracingLayer::new())
                .layer(handle.layer())
                .register_snapstart_resource(handle.snapstart_resource())
                .run()
                .await
        }
        Ok("stream") => {
            deferred
                .run(StreamAdapter::from(service_fn(streamed_handler)))
                .await
        }
        Ok(other) => Err(format!("unknown HTTP_FIXTURE_MODE {other:?}").into()),
    }
}
