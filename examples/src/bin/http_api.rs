//! An accounts API on `lambda_http` that writes its audit trail after each response.
//!
//! ```text
//! cargo run -p examples --bin http_api
//! ```
//!
//! The function (module `function`) is what you would deploy behind API Gateway (a REST API or
//! an HTTP API) or a Lambda function URL:
//!
//! - `GET /accounts/{id}` answers 200 with the account or 404; `POST /accounts` with
//!   `{"owner": "…"}` answers 201 with the new account and its `location`, or 400;
//! - the handler is a `#[deferred_handler]` of a `lambda_http::Request` (feature `http` of
//!   deferred-core). Every request, whatever its answer, queues its audit record with
//!   `defer!`: the caller never waits for the audit store, and the record is still written
//!   before Lambda freezes the environment;
//! - `Deferred::new().flush(tracer_provider).run(Adapter::from(service_fn(handler)))` runs it:
//!   `lambda_http::Adapter` turns the handler into a `LambdaEvent` service (as
//!   `lambda_http::run` does) and `run` adds the layer that starts the deferred phase once the
//!   response is out. The handler's span and the audit's span go out in the same flush. If you
//!   keep `lambda_http::run(service_fn(handler))`, call `Deferred::new()….start().await?`
//!   before it (the README's "start() and your own runtime" tells the difference);
//! - the handler routes on `RequestExt::raw_http_path`, not on `uri().path()`: for a REST API
//!   stage (`prod`), lambda_http puts the stage in front of the URI's path (`/prod/accounts`),
//!   unless `AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH` is set.
//!
//! No AWS account needed for the demo. This binary starts the testkit's Lambda emulator and an
//! OTLP/HTTP collector in-process, then runs *itself* as the function in a child process, as
//! `quickstart` does: with `AWS_LAMBDA_RUNTIME_API` set (by Lambda, or by the emulator) it is
//! the function, otherwise the driver. The driver (module `driver`) sends the
//! events API Gateway and function URLs send, built with the `aws_lambda_events` types that
//! lambda_http decodes (`ApiGatewayProxyRequest`, payload format 1.0, for the REST API;
//! `ApiGatewayV2httpRequest`, payload format 2.0, for the HTTP API and the function URL), decodes
//! the answers as the matching response types, and prints what the caller got and what ran
//! after. Set `TESTKIT_ECHO=1` to see the function's logs (`RUST_LOG`, `warn` by default).
//!
//! Build and deploy it as `api_handler` explains (`--bin http_api`): on Lambda it runs as the
//! function. The function timeout must cover the handler plus the deferred phase (the audit,
//! then a flush of at most `flush_timeout`, 2 s).

/// Set by Lambda (and by the emulator for the child): run as the function, not as the driver.
const RUNTIME_API_ENV: &str = "AWS_LAMBDA_RUNTIME_API";
/// The prefix of the one line the function prints per deferred phase, for the driver.
const PHASE_LINE: &str = "http-api-phase";

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    if std::env::var_os(RUNTIME_API_ENV).is_some() {
        function::main().await
    } else {
        driver::main().await
    }
}

/// The Lambda function: what you would build as `bootstrap` and deploy.
mod function {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{LazyLock, Mutex, MutexGuard};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use deferred_core::{ActionOutcome, Deferred, FlushOutcome, defer, deferred_handler};
    use lambda_http::http::StatusCode;
    use lambda_http::request::RequestContext;
    use lambda_http::{
        Adapter, Body, Error, Request, RequestExt, RequestPayloadExt, Response, service_fn,
    };
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
    use serde::{Deserialize, Serialize};
    use serde_json::{Value, json};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};

    use super::PHASE_LINE;

    /// Below half the handler's `flush_timeout` (2 s), as an export with a retry can last twice
    /// this: a stalled collector fails the export rather than keeping the exporter busy past
    /// the flush.
    const EXPORT_TIMEOUT: Duration = Duration::from_millis(800);

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

    /// Who did what, and what they got: one record per request.
    #[derive(Debug, Serialize)]
    struct AuditRecord {
        request_id: String,
        at_ms: u128,
        source_ip: Option<String>,
        method: String,
        path: String,
        status: u16,
    }

    /// The account table: a stand-in for a database.
    static ACCOUNTS: LazyLock<Mutex<HashMap<String, Account>>> = LazyLock::new(|| {
        let seed = Account {
            id: "acc-1".into(),
            owner: "Ada Lovelace".into(),
            balance_cents: 125_000,
        };
        Mutex::new(HashMap::from([(seed.id.clone(), seed)]))
    });
    static NEXT_ID: AtomicU64 = AtomicU64::new(2);

    fn accounts() -> MutexGuard<'static, HashMap<String, Account>> {
        ACCOUNTS.lock().unwrap_or_else(|p| p.into_inner())
    }

    // `instrument` above `deferred_handler`: its span closes before the deferred phase, so it
    // is in this invocation's flush.
    #[tracing::instrument(skip_all, fields(method = %request.method(), path = request.raw_http_path()))]
    #[deferred_handler(flush_timeout = "2s")]
    async fn handler(request: Request) -> Result<Response<Body>, Error> {
        let path = request.raw_http_path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (status, body, location) = match (request.method().as_str(), segments.as_slice()) {
            ("GET", ["accounts", id]) => match accounts().get(*id) {
                Some(account) => (StatusCode::OK, json!(account), None),
                None => not_found(&format!("no account {id}")),
            },
            ("POST", ["accounts"]) => match request.payload::<NewAccount>() {
                Ok(Some(new)) => {
                    let account = open_account(new).await;
                    let location = format!("/accounts/{}", account.id);
                    (StatusCode::CREATED, json!(account), Some(location))
                }
                Ok(None) | Err(_) => (
                    StatusCode::BAD_REQUEST,
                    json!({ "error": "expected {\"owner\": \"…\"}" }),
                    None,
                ),
            },
            _ => not_found("no such route"),
        };

        // After the response: the caller does not wait for the audit store.
        defer!("audit", write_audit(audit_record(&request, status)));

        let mut response = Response::builder()
            .status(status)
            .header("content-type", "application/json");
        if let Some(location) = location {
            response = response.header("location", location);
        }
        Ok(response.body(Body::from(body.to_string()))?)
    }

    fn not_found(error: &str) -> (StatusCode, Value, Option<String>) {
        (StatusCode::NOT_FOUND, json!({ "error": error }), None)
    }

    #[tracing::instrument(skip_all)]
    async fn open_account(new: NewAccount) -> Account {
        tokio::time::sleep(Duration::from_millis(3)).await; // a database insert
        let id = format!("acc-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let account = Account {
            id: id.clone(),
            owner: new.owner,
            balance_cents: 0,
        };
        accounts().insert(id, account.clone());
        account
    }

    fn audit_record(request: &Request, status: StatusCode) -> AuditRecord {
        // The caller's address, from whichever kind of event this request came in.
        let source_ip = match request.request_context_ref() {
            Some(RequestContext::ApiGatewayV1(context)) => context.identity.source_ip.clone(),
            Some(RequestContext::ApiGatewayV2(context)) => context.http.source_ip.clone(),
            _ => None,
        };
        AuditRecord {
            request_id: request
                .lambda_context_ref()
                .map(|c| c.request_id.clone())
                .unwrap_or_default(),
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            source_ip,
            method: request.method().to_string(),
            path: request.raw_http_path().to_owned(),
            status: status.as_u16(),
        }
    }

    /// Appends the record to the audit trail: a stand-in for a Kinesis or DynamoDB write, which
    /// prints the record as one JSON line (CloudWatch Logs, on Lambda).
    #[tracing::instrument(skip_all, fields(request_id = %record.request_id))]
    async fn write_audit(record: AuditRecord) -> Result<(), serde_json::Error> {
        tokio::time::sleep(Duration::from_millis(120)).await; // the store's round trip
        println!("{}", serde_json::to_string(&json!({ "audit": record }))?);
        Ok(())
    }

    fn tracer_provider() -> Result<SdkTracerProvider, Error> {
        let service = std::env::var("OTEL_SERVICE_NAME")
            .or_else(|_| std::env::var("AWS_LAMBDA_FUNCTION_NAME"))
            .unwrap_or_else(|_| "accounts-api".to_owned());
        // OTEL_EXPORTER_OTLP_ENDPOINT names the collector (default http://localhost:4318).
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        Ok(SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name(service).build())
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .build())
    }

    pub(super) async fn main() -> Result<(), Error> {
        let tracer_provider = tracer_provider()?;
        // The deferred phase reports itself (`deferred.phase` spans) through the global provider.
        opentelemetry::global::set_tracer_provider(tracer_provider.clone());
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer_provider.tracer("accounts-api"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let logs = tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(false)
            .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
        tracing_subscriber::registry().with(otel).with(logs).init();

        Deferred::new()
            .flush(tracer_provider)
            // The core logs a report of every phase; this hook also tells the driver.
            .on_report(|report| {
                let audit = match report.actions.first() {
                    Some(action) if action.outcome == ActionOutcome::Ok => {
                        format!("ok,{}", action.duration.as_millis())
                    }
                    Some(action) => format!("{:?}", action.outcome).replace(' ', "_"),
                    None => "none".to_owned(),
                };
                let flush = match report.flushes.first().map(|f| &f.outcome) {
                    Some(FlushOutcome::Ok) => "flushed",
                    Some(_) => "not-flushed",
                    None => "none",
                };
                println!("{PHASE_LINE} {} {audit} {flush}", report.request_id);
            })
            .run(Adapter::from(service_fn(handler)))
            .await
    }
}

/// The driver: plays AWS (Lambda, API Gateway, a function URL, an OTLP collector).
mod driver {
    use std::collections::HashMap;
    use std::time::Duration;

    use deferred_testkit::emulator::{
        Emulator, EmulatorConfig, FunctionSpec, InvokeOutcome, Timeline,
    };
    use deferred_testkit::otlp::OtlpSink;
    use lambda_http::Error;
    use lambda_http::aws_lambda_events::apigw::{
        ApiGatewayProxyRequest, ApiGatewayProxyResponse, ApiGatewayV2httpRequest,
        ApiGatewayV2httpResponse,
    };
    use lambda_http::aws_lambda_events::encodings::Body;
    use lambda_http::http::{HeaderMap, HeaderValue, Method};
    use serde_json::{Value, json};

    use super::PHASE_LINE;

    const API_HOST: &str = "r3pmxmplak.execute-api.us-east-2.amazonaws.com";
    const URL_HOST: &str = "a5vvmxmplf7z2sjzk.lambda-url.us-east-2.on.aws";

    #[derive(Debug, Clone, Copy)]
    enum Source {
        /// API Gateway REST API, Lambda proxy integration (payload 1.0), stage `prod`.
        RestApi,
        /// API Gateway HTTP API (payload 2.0), stage `$default`.
        HttpApi,
        /// Lambda function URL (payload 2.0, no route).
        FunctionUrl,
    }

    impl Source {
        fn label(self) -> &'static str {
            match self {
                Source::RestApi => "REST API (1.0)",
                Source::HttpApi => "HTTP API (2.0)",
                Source::FunctionUrl => "function URL",
            }
        }
    }

    /// The requests, in order.
    fn plan() -> [(Source, Method, &'static str, Option<Value>); 4] {
        [
            (
                Source::RestApi,
                Method::POST,
                "/accounts",
                Some(json!({ "owner": "Grace Hopper" })),
            ),
            (Source::HttpApi, Method::GET, "/accounts/acc-2", None),
            (Source::FunctionUrl, Method::GET, "/accounts/acc-9", None),
            (
                Source::HttpApi,
                Method::POST,
                "/accounts",
                Some(json!({ "name": "no owner" })),
            ),
        ]
    }

    pub(super) async fn main() -> Result<(), Error> {
        let sink = OtlpSink::start().await?;
        let emulator = Emulator::start(EmulatorConfig::default()).await?;
        let mut spec = FunctionSpec::new(std::env::current_exe()?)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint());
        if std::env::var_os("RUST_LOG").is_none() {
            spec = spec.env("RUST_LOG", "warn");
        }
        emulator.spawn_function(spec).await?;

        println!(
            "lambda-deferred http_api: an accounts API on lambda_http (this binary, as a child process)\n\
             on a local Lambda emulator, called through API Gateway events. Each request answers at\n\
             once; its audit record (a 120 ms write) and the span export run after the response.\n"
        );
        println!(
            "{:>2}  {:<14}  {:<21}  {:>6}  {:>14}  {:>14}  {:<14}  spans exported",
            "#", "source", "request", "status", "caller latency", "deferred phase", "audit"
        );
        let mut answers = Vec::new();
        for (n, (source, method, path, body)) in plan().into_iter().enumerate() {
            let payload = match source {
                Source::RestApi => rest_event(&method, path, body.as_ref())?,
                Source::HttpApi | Source::FunctionUrl => {
                    http_event(source, &method, path, body.as_ref())?
                }
            };
            let result = emulator.invoke(payload).await;
            let InvokeOutcome::Success(bytes) = &result.outcome else {
                return Err(format!("request {}: {:?}", n + 1, result.outcome).into());
            };
            let (status, answer) = decode(source, bytes)?;
            let id = result.request_id;

            // The phase is over when the extension asks for the next event.
            let complete = |t: &Timeline| t.request_id == id && t.complete.is_some();
            if !emulator
                .wait_until(Duration::from_secs(5), |_, timelines| {
                    timelines.iter().any(complete)
                })
                .await
            {
                return Err(format!("request {}: the deferred phase did not end", n + 1).into());
            }
            let timeline = emulator
                .timelines()
                .into_iter()
                .find(complete)
                .ok_or("no timeline")?;
            let posted = timeline.response_posted.ok_or("no response")?;
            let released = timeline
                .extension_next
                .first()
                .map(|(_, at)| *at)
                .ok_or("the extension did not call event/next")?;
            let prefix = format!("{PHASE_LINE} {id} ");
            let report = emulator
                .wait_for_log(|line| line.starts_with(&prefix), Duration::from_secs(5))
                .await
                .ok_or_else(|| format!("request {}: no phase report", n + 1))?;
            // "<audit outcome> <flush outcome>", the audit as "ok,<ms>" when it succeeded.
            let report = &report[prefix.len()..];
            let audit = match report.split(' ').next().and_then(|a| a.split_once(',')) {
                Some(("ok", ms)) => format!("written {ms} ms"),
                _ => report.to_owned(),
            };

            // Spans of this invocation's trace that reached the collector by the release.
            let spans = sink.spans();
            let in_flush: Vec<String> = spans
                .iter()
                .find(|s| s.attribute("requestId") == Some(id.as_str()))
                .map(|root| {
                    spans
                        .iter()
                        .filter(|s| s.trace_id == root.trace_id && s.received_at <= released)
                        .map(|s| s.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "{:>2}  {:<14}  {:<21}  {:>6}  {:>14}  {:>14}  {:<14}  {} ({})",
                n + 1,
                source.label(),
                format!("{method} {path}"),
                status,
                ms(result.latency),
                ms(released.saturating_duration_since(posted)),
                audit,
                in_flush.len(),
                in_flush.join(", "),
            );
            answers.push((source, answer));
        }

        println!("\nWhat each caller got, decoded as the API Gateway response type of its source:");
        for (n, (source, answer)) in answers.iter().enumerate() {
            println!("{:>2}  {:<14}  {answer}", n + 1, source.label());
        }
        let audit: Vec<String> = emulator
            .function_logs()
            .into_iter()
            .filter(|line| line.starts_with("{\"audit\""))
            .collect();
        println!("\nThe audit trail, written after the responses:");
        for line in &audit {
            println!("    {line}");
        }

        let shutdown = emulator.shutdown().await;
        if shutdown.killed || !shutdown.exit_status.is_some_and(|s| s.success()) {
            return Err(format!("the function did not shut down cleanly: {shutdown:?}").into());
        }
        if audit.len() != answers.len() {
            return Err(format!(
                "{} audit records for {} requests",
                audit.len(),
                answers.len()
            )
            .into());
        }
        println!(
            "\nEvery caller got its answer in milliseconds; each audit record and the spans were\n\
             written after the response, before Lambda could freeze the function."
        );
        Ok(())
    }

    /// The headers API Gateway passes on.
    fn headers(host: &str, body: Option<&Value>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("application/json"));
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert("host", host);
        }
        headers.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        if body.is_some() {
            headers.insert("content-type", HeaderValue::from_static("application/json"));
        }
        headers
    }

    /// A REST API proxy integration event (payload format 1.0).
    fn rest_event(method: &Method, path: &str, body: Option<&Value>) -> Result<String, Error> {
        let mut event = ApiGatewayProxyRequest::default();
        let resource = match path.strip_prefix("/accounts/") {
            Some(id) => {
                event.path_parameters = HashMap::from([("id".to_owned(), id.to_owned())]);
                "/accounts/{id}"
            }
            None => "/accounts",
        };
        event.resource = Some(resource.to_owned());
        event.path = Some(path.to_owned());
        event.http_method = method.clone();
        event.headers = headers(API_HOST, body);
        event.multi_value_headers = event.headers.clone();
        event.body = body.map(Value::to_string);
        let context = &mut event.request_context;
        context.account_id = Some("123456789012".to_owned());
        context.apiid = Some("r3pmxmplak".to_owned());
        context.stage = Some("prod".to_owned());
        context.resource_path = Some(resource.to_owned());
        context.path = Some(format!("/prod{path}"));
        context.http_method = method.clone();
        context.domain_name = Some(API_HOST.to_owned());
        context.protocol = Some("HTTP/1.1".to_owned());
        context.request_id = Some("c6af9ac6-7b61-11e6-9a41-93e8deadbeef".to_owned());
        context.identity.source_ip = Some("198.51.100.7".to_owned());
        Ok(serde_json::to_string(&event)?)
    }

    /// An HTTP API or function URL event (payload format 2.0).
    fn http_event(
        source: Source,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, Error> {
        let host = match source {
            Source::FunctionUrl => URL_HOST,
            _ => API_HOST,
        };
        let mut event = ApiGatewayV2httpRequest::default();
        let route_key = match (source, path.strip_prefix("/accounts/")) {
            (Source::FunctionUrl, _) => "$default".to_owned(),
            (_, Some(id)) => {
                event.path_parameters = HashMap::from([("id".to_owned(), id.to_owned())]);
                format!("{method} /accounts/{{id}}")
            }
            (_, None) => format!("{method} /accounts"),
        };
        event.version = Some("2.0".to_owned());
        event.route_key = Some(route_key.clone());
        event.raw_path = Some(path.to_owned());
        event.raw_query_string = Some(String::new());
        event.headers = headers(host, body);
        event.body = body.map(Value::to_string);
        let context = &mut event.request_context;
        context.route_key = Some(route_key);
        context.stage = Some("$default".to_owned());
        context.domain_name = Some(host.to_owned());
        context.request_id = Some("JKJaXmPLvHcESHA=".to_owned());
        context.http.method = method.clone();
        context.http.path = Some(path.to_owned());
        context.http.protocol = Some("HTTP/1.1".to_owned());
        context.http.source_ip = Some("198.51.100.7".to_owned());
        let mut value = serde_json::to_value(&event)?;
        if let Some(object) = value.as_object_mut() {
            // Custom authorizer fields the type always writes; a real 2.0 event has none.
            for key in [
                "type",
                "methodArn",
                "httpMethod",
                "identitySource",
                "authorizationToken",
            ] {
                object.remove(key);
            }
        }
        Ok(value.to_string())
    }

    /// The status and a one-line summary of the answer, decoded as the source's response type.
    fn decode(source: Source, bytes: &[u8]) -> Result<(i64, String), Error> {
        let (status, headers, cookies, body) = match source {
            Source::RestApi => {
                let r: ApiGatewayProxyResponse = serde_json::from_slice(bytes)?;
                let mut headers = r.multi_value_headers;
                headers.extend(r.headers);
                (r.status_code, headers, None, r.body)
            }
            Source::HttpApi | Source::FunctionUrl => {
                let r: ApiGatewayV2httpResponse = serde_json::from_slice(bytes)?;
                (r.status_code, r.headers, Some(r.cookies), r.body)
            }
        };
        let headers: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        let body = match body {
            Some(Body::Text(text)) => text,
            Some(Body::Binary(bytes)) => format!("<{} bytes>", bytes.len()),
            _ => String::new(),
        };
        let type_name = match cookies {
            None => "ApiGatewayProxyResponse".to_owned(),
            Some(cookies) => format!("ApiGatewayV2httpResponse, cookies {cookies:?}"),
        };
        Ok((
            status,
            format!("{status} [{}] {body}  ({type_name})", headers.join(", ")),
        ))
    }

    fn ms(d: Duration) -> String {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}
