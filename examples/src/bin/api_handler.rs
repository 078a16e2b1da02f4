//! An HTTP API behind API Gateway that exports OpenTelemetry traces and metrics over OTLP/HTTP
//! after each response, never before it.
//!
//! It shows:
//! - the tracer and meter providers built with opentelemetry-otlp (HTTP/protobuf, blocking
//!   reqwest client), with an exporter timeout below half the handler's `flush_timeout`;
//! - `#[tracing::instrument]` spans exported through tracing-opentelemetry, and a counter;
//! - `Deferred::new().flush(tracer).flush(meter)`: both providers flushed after every
//!   response, concurrently, within `flush_timeout`;
//! - lost spans counted: the span exporter wrapped in a `CountingSpanExporter` and the batch
//!   processor in a `CountingSpanProcessor`, so that each phase report says how many spans a
//!   failed export lost and how many a full queue dropped (alert on them);
//! - a `lambda_http` handler: `#[deferred_handler]` on a function of `lambda_http::Request`
//!   (feature `http` of deferred-core), run through `lambda_http::Adapter`.
//!
//! `POST /orders` with `{"item": "book", "quantity": 2}` answers 201 with the new order, and
//! 400 when the body is not such an order (or orders nothing); anything else answers 404.
//!
//! Configuration: `OTEL_EXPORTER_OTLP_ENDPOINT` (the collector's base URL, default
//! `http://localhost:4318`; the exporters append `/v1/traces` and `/v1/metrics`),
//! `OTEL_SERVICE_NAME` (default: the function's name), `RUST_LOG` (default `info`). For an
//! `https://` collector, add the `reqwest-rustls` feature to opentelemetry-otlp.
//!
//! Build and deploy without cargo-lambda: build a static Linux binary for the function's
//! architecture (musl: a binary linked against the build host's glibc fails to start on
//! `provided.al2023`, whose glibc is 2.34, when the host's is newer), name it `bootstrap`,
//! zip it:
//!
//! ```text
//! rustup target add x86_64-unknown-linux-musl      # arm64 functions: aarch64-unknown-linux-musl,
//!                                                  # which needs a cross linker on an x86 host
//!                                                  # (`cargo zigbuild`, or cargo-lambda)
//! cargo build --release -p examples --bin api_handler --target x86_64-unknown-linux-musl
//! cp target/x86_64-unknown-linux-musl/release/api_handler bootstrap
//! zip api_handler.zip bootstrap
//! aws lambda create-function --function-name orders-api --runtime provided.al2023 \
//!     --handler bootstrap --architectures x86_64 --timeout 10 \
//!     --zip-file fileb://api_handler.zip --role arn:aws:iam::<account>:role/<role> \
//!     --environment 'Variables={OTEL_EXPORTER_OTLP_ENDPOINT=http://<collector>:4318}'
//! ```
//!
//! The function timeout (10 s here) must cover the handler plus the deferred phase: the
//! flush may take up to `flush_timeout` (3 s) after the response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use deferred_core::{
    CountingSpanExporter, CountingSpanProcessor, Deferred, ExportCounts, deferred_handler,
};
use lambda_http::http::StatusCode;
use lambda_http::{
    Adapter, Body, Error, Request, RequestExt as _, RequestPayloadExt, Response, service_fn,
};
use opentelemetry::metrics::Counter;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Each export request gives up after this, and a retry may start until it has run out, so an
/// export lasts up to twice this. Keep that below `flush_timeout` (3 s): a stalled collector
/// then fails the export within the flush, rather than keeping the exporter busy past it (the
/// SDK's default is 10 s).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Orders created, by item. Instruments come from the global meter provider set in `main`.
static ORDERS_CREATED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    global::meter("orders-api")
        .u64_counter("orders.created")
        .with_description("Orders created")
        .build()
});

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Deserialize)]
struct NewOrder {
    item: String,
    quantity: u32,
}

#[derive(Debug, Serialize)]
struct Order {
    id: u64,
    item: String,
    quantity: u32,
}

// `instrument` above `deferred_handler`: its span closes before the deferred phase starts, so
// it is in this invocation's flush. Routes on `raw_http_path`: behind a REST API stage,
// lambda_http puts the stage in front of `uri().path()` (`/prod/orders`).
#[tracing::instrument(skip_all, fields(method = %request.method(), path = request.raw_http_path()))]
#[deferred_handler(flush_timeout = "3s")]
async fn handler(request: Request) -> Result<Response<Body>, Error> {
    let response = match (request.method().as_str(), request.raw_http_path()) {
        ("POST", "/orders") => match request.payload::<NewOrder>() {
            Ok(Some(new)) if new.quantity > 0 => {
                let order = create_order(new).await;
                json_response(StatusCode::CREATED, &order)?
            }
            // No JSON body, one that is not an order, or an order of nothing.
            _ => json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "expected a JSON body such as {\"item\": \"book\", \"quantity\": 2}, quantity at least 1" }),
            )?,
        },
        _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found" }))?,
    };
    tracing::info!(status = response.status().as_u16(), "answered");
    Ok(response)
}

#[tracing::instrument(skip_all, fields(item = %new.item))]
async fn create_order(new: NewOrder) -> Order {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed); // a database insert, in real life
    ORDERS_CREATED.add(
        u64::from(new.quantity),
        &[KeyValue::new("item", new.item.clone())],
    );
    Order {
        id,
        item: new.item,
        quantity: new.quantity,
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Result<Response<Body>, Error> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_string(body)?))?)
}

/// The tracer and meter providers, exporting OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT`, and
/// the span counts for the phase reports.
fn telemetry() -> Result<(SdkTracerProvider, SdkMeterProvider, Arc<ExportCounts>), Error> {
    let service = std::env::var("OTEL_SERVICE_NAME")
        .or_else(|_| std::env::var("AWS_LAMBDA_FUNCTION_NAME"))
        .unwrap_or_else(|_| "orders-api".to_owned());
    let resource = Resource::builder().with_service_name(service).build();

    let spans = CountingSpanExporter::new(
        SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
    );
    let counts = spans.counts();
    let batch = BatchSpanProcessor::builder(spans).build();
    let tracer_provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_span_processor(CountingSpanProcessor::new(batch, counts.clone()))
        .build();

    let metrics = MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let meter_provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(PeriodicReader::builder(metrics).build())
        .build();

    Ok((tracer_provider, meter_provider, counts))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (tracer_provider, meter_provider, span_counts) = telemetry()?;
    global::set_meter_provider(meter_provider.clone());
    // The deferred phase reports itself (`deferred.phase` spans) through the global provider.
    global::set_tracer_provider(tracer_provider.clone());

    // `tracing` spans go to OpenTelemetry; log lines go to stdout (CloudWatch).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("orders-api"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let logs = tracing_subscriber::fmt::layer()
        .without_time() // CloudWatch adds its own
        .with_ansi(false)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
    tracing_subscriber::registry().with(otel).with(logs).init();

    Deferred::new()
        .flush(tracer_provider)
        .flush(meter_provider)
        .span_export_counts(span_counts)
        .run(Adapter::from(service_fn(handler)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: &str) -> Request {
        lambda_http::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("a valid request")
            .with_raw_http_path(path)
    }

    async fn status(method: &str, path: &str, body: &str) -> StatusCode {
        handler(request(method, path, body))
            .await
            .expect("the handler answers")
            .status()
    }

    #[tokio::test]
    async fn an_order_is_created() {
        let response = handler(request(
            "POST",
            "/orders",
            r#"{"item": "book", "quantity": 2}"#,
        ))
        .await
        .expect("the handler answers");
        assert_eq!(response.status(), StatusCode::CREATED);
        let Body::Text(text) = response.body() else {
            panic!("a text body");
        };
        let order: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(order["item"], "book");
        assert_eq!(order["quantity"], 2);
    }

    #[tokio::test]
    async fn what_is_not_an_order_is_a_bad_request() {
        for body in [
            "",
            "not json",
            "{}",
            r#"{"item": "book", "quantity": -1}"#,
            r#"{"item": "book", "quantity": 0}"#,
        ] {
            assert_eq!(
                status("POST", "/orders", body).await,
                StatusCode::BAD_REQUEST,
                "{body:?}"
            );
        }
    }

    #[tokio::test]
    async fn other_routes_are_not_found() {
        let order = r#"{"item": "book", "quantity": 2}"#;
        for (method, path) in [("GET", "/orders"), ("POST", "/order"), ("PUT", "/orders")] {
            assert_eq!(
                status(method, path, order).await,
                StatusCode::NOT_FOUND,
                "{method} {path}"
            );
        }
    }
}
