//! `lambda_http` on the emulator: a `#[deferred_handler]` of `lambda_http::Request`
//! (src/bin/http_fixture.rs) invoked with real API Gateway and load balancer events, built with
//! the `aws_lambda_events` types lambda_http itself decodes: a REST API (payload 1.0,
//! `ApiGatewayProxyRequest`), an HTTP API (payload 2.0, `ApiGatewayV2httpRequest`), a Lambda
//! function URL (payload 2.0 too), buffered or in `RESPONSE_STREAM` mode
//! (`lambda_http::StreamAdapter`), and an Application Load Balancer's Lambda target group
//! (`AlbTargetGroupRequest`).
//!
//! Each test checks that the answer decodes as the response type that matches the event's
//! source (for a streamed answer: lambda_runtime's metadata prelude, then the body), with the
//! status, headers, cookies and body the handler set; that the `defer!`ed audit action ran
//! after the response was posted and before the environment was released (the extension's
//! next `event/next`); and that the invocation's spans (lambda_runtime's, the handler's and the
//! action's) reached the OTLP sink in that same window.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use deferred_testkit::emulator::{
    Emulator, EmulatorConfig, FunctionSpec, InvokeOutcome, InvokeResult, Timeline,
};
use deferred_testkit::otlp::OtlpSink;
use lambda_http::aws_lambda_events::alb::{AlbTargetGroupRequest, AlbTargetGroupResponse};
use lambda_http::aws_lambda_events::apigw::{
    ApiGatewayProxyRequest, ApiGatewayProxyResponse, ApiGatewayV2httpRequest,
    ApiGatewayV2httpResponse,
};
use lambda_http::aws_lambda_events::encodings::Body;
use lambda_http::aws_lambda_events::query_map::QueryMap;
use lambda_http::http::{HeaderMap, HeaderName, HeaderValue, Method};
use lambda_runtime::MetadataPrelude;
use serde_json::{Value, json};
use support::{Env, phase_end};

/// The REST API's and the HTTP API's host, and the function URL's.
const API_ID: &str = "r3pmxmplak";
const API_HOST: &str = "r3pmxmplak.execute-api.us-east-2.amazonaws.com";
const URL_ID: &str = "a5vvmxmplf7z2sjzkoeknslo4m0kbcuk";
const URL_HOST: &str = "a5vvmxmplf7z2sjzkoeknslo4m0kbcuk.lambda-url.us-east-2.on.aws";
const ACCOUNT: &str = "123456789012";
/// The load balancer's host, and the target group the function is registered in.
const ALB_HOST: &str = "accounts-alb-1234567890.us-east-2.elb.amazonaws.com";
const TARGET_GROUP_ARN: &str =
    "arn:aws:elasticloadbalancing:us-east-2:123456789012:targetgroup/accounts-fn/6d0ecf831eec9f09";

/// The kind of event source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// API Gateway REST API, Lambda proxy integration (payload format 1.0), stage `prod`.
    Rest,
    /// API Gateway HTTP API (payload format 2.0), stage `$default`.
    Http,
    /// A Lambda function URL (payload format 2.0, no route, stage `$default`).
    FunctionUrl,
    /// An Application Load Balancer's Lambda target group, behind an HTTP listener on port 80,
    /// with multi-value headers off (the default): single-value `headers` and
    /// `queryStringParameters`, the query values as the client encoded them, no stage, no route.
    Alb,
}

/// An HTTP request as the client sent it.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    /// The path, without the query.
    path: &'static str,
    /// The raw query string, without `?`.
    query: &'static str,
    headers: Vec<(&'static str, String)>,
    cookies: Vec<&'static str>,
    body: Option<Value>,
}

impl Call {
    fn get(path: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            query: "",
            headers: Vec::new(),
            cookies: Vec::new(),
            body: None,
        }
    }

    fn post(path: &'static str, body: Value) -> Self {
        Self {
            method: Method::POST,
            body: Some(body),
            ..Self::get(path)
        }
        .header("content-type", "application/json")
    }

    fn query(mut self, query: &'static str) -> Self {
        self.query = query;
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn cookie(mut self, cookie: &'static str) -> Self {
        self.cookies.push(cookie);
        self
    }

    /// `<METHOD> <path>`: how the fixture names the route in its audit marks.
    fn route(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// The API Gateway route this call matches (the fixture's two resources).
    fn resource(&self) -> (&'static str, HashMap<String, String>) {
        match self.path.strip_prefix("/accounts/") {
            Some(id) => (
                "/accounts/{id}",
                HashMap::from([("id".to_owned(), id.to_owned())]),
            ),
            None => ("/accounts", HashMap::new()),
        }
    }

    /// The query parameters as a load balancer passes them with multi-value headers off: not
    /// decoded, and the last value of a repeated name.
    fn raw_query(&self) -> QueryMap {
        let pairs: HashMap<String, String> = self
            .query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name.to_owned(), value.to_owned())
            })
            .collect();
        QueryMap::from(pairs)
    }

    /// The headers of a payload without a cookies field (REST API, ALB), for a call to `host`:
    /// the cookies are in the `cookie` header.
    fn header_map_with_cookie(&self, host: &str) -> HeaderMap {
        let mut headers = self.header_map(host);
        if !self.cookies.is_empty() {
            headers.insert(
                "cookie",
                HeaderValue::from_str(&self.cookies.join("; ")).expect("cookie"),
            );
        }
        headers
    }

    /// The headers API Gateway (or the load balancer) passes on, for a call to `host`.
    fn header_map(&self, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut add = |name: &str, value: &str| {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        };
        add("accept", "application/json");
        add("host", host);
        add("user-agent", "curl/8.5.0");
        add(
            "x-amzn-trace-id",
            "Root=1-65f0a9de-4c2d1a0b5e6f7a8b9c0d1e2f",
        );
        add("x-forwarded-for", "198.51.100.7");
        add("x-forwarded-port", "443");
        add("x-forwarded-proto", "https");
        if let Some(body) = &self.body {
            add("content-length", &body.to_string().len().to_string());
        }
        for (name, value) in &self.headers {
            add(name, value);
        }
        headers
    }
}

/// The event API Gateway (or the function URL, or the load balancer) sends for `call`, as JSON.
fn event(api: Api, call: &Call) -> String {
    let mut value = match api {
        Api::Rest => serde_json::to_value(rest_event(call)),
        Api::Http | Api::FunctionUrl => serde_json::to_value(http_event(api, call)),
        Api::Alb => serde_json::to_value(alb_event(call)),
    }
    .expect("the event serializes");
    // Fields that the type always writes and a real event of this source never has.
    let absent: &[&str] = match api {
        Api::Rest => &[],
        // Those of the custom authorizer payload.
        Api::Http | Api::FunctionUrl => &[
            "type",
            "methodArn",
            "httpMethod",
            "identitySource",
            "authorizationToken",
        ],
        // A target group with multi-value headers off sends only the single-value fields.
        Api::Alb => &["multiValueHeaders", "multiValueQueryStringParameters"],
    };
    let object = value.as_object_mut().expect("an object");
    for key in absent {
        assert!(object.remove(*key).is_some(), "{api:?}: no {key} to remove");
    }
    value.to_string()
}

/// A REST API proxy event (payload format 1.0), stage `prod`.
fn rest_event(call: &Call) -> ApiGatewayProxyRequest {
    let (resource, path_parameters) = call.resource();
    let headers = call.header_map_with_cookie(API_HOST);
    let query: QueryMap = call.query.parse().expect("a query string");

    let mut event = ApiGatewayProxyRequest::default();
    event.resource = Some(resource.to_owned());
    event.path = Some(call.path.to_owned());
    event.http_method = call.method.clone();
    event.headers = headers.clone();
    event.multi_value_headers = headers;
    event.query_string_parameters = call.query.parse().expect("a query string");
    event.multi_value_query_string_parameters = query;
    event.path_parameters = path_parameters;
    event.body = call.body.as_ref().map(Value::to_string);
    event.is_base64_encoded = false;

    let context = &mut event.request_context;
    context.account_id = Some(ACCOUNT.to_owned());
    context.apiid = Some(API_ID.to_owned());
    context.resource_id = Some(if call.path == "/accounts" {
        "2gxmpl".to_owned()
    } else {
        "7kxmpl".to_owned()
    });
    context.resource_path = Some(resource.to_owned());
    context.http_method = call.method.clone();
    context.stage = Some("prod".to_owned());
    context.path = Some(format!("/prod{}", call.path));
    context.protocol = Some("HTTP/1.1".to_owned());
    context.domain_name = Some(API_HOST.to_owned());
    context.domain_prefix = Some(API_ID.to_owned());
    context.request_id = Some("c6af9ac6-7b61-11e6-9a41-93e8deadbeef".to_owned());
    context.request_time = Some("12/Mar/2025:19:03:58 +0000".to_owned());
    context.request_time_epoch = 1_741_806_238_000;
    context.identity.source_ip = Some("198.51.100.7".to_owned());
    context.identity.user_agent = Some("curl/8.5.0".to_owned());
    event
}

/// An HTTP API event or a function URL event (payload format 2.0), stage `$default`.
fn http_event(api: Api, call: &Call) -> ApiGatewayV2httpRequest {
    let (host, id) = match api {
        Api::FunctionUrl => (URL_HOST, URL_ID),
        _ => (API_HOST, API_ID),
    };
    let (resource, path_parameters) = call.resource();
    let route_key = match api {
        Api::FunctionUrl => "$default".to_owned(),
        _ => format!("{} {resource}", call.method),
    };

    let mut event = ApiGatewayV2httpRequest::default();
    event.version = Some("2.0".to_owned());
    event.route_key = Some(route_key.clone());
    event.raw_path = Some(call.path.to_owned());
    event.raw_query_string = Some(call.query.to_owned());
    event.query_string_parameters = call.query.parse().expect("a query string");
    event.cookies =
        (!call.cookies.is_empty()).then(|| call.cookies.iter().map(|c| (*c).to_owned()).collect());
    event.headers = call.header_map(host);
    if api == Api::Http {
        event.path_parameters = path_parameters;
    }
    event.body = call.body.as_ref().map(Value::to_string);
    event.is_base64_encoded = false;

    let context = &mut event.request_context;
    context.route_key = Some(route_key);
    context.account_id = Some(match api {
        Api::FunctionUrl => "anonymous".to_owned(), // auth type NONE
        _ => ACCOUNT.to_owned(),
    });
    context.stage = Some("$default".to_owned());
    context.request_id = Some("JKJaXmPLvHcESHA=".to_owned());
    context.apiid = Some(id.to_owned());
    context.domain_name = Some(host.to_owned());
    context.domain_prefix = Some(id.to_owned());
    context.time = Some("12/Mar/2025:19:03:58 +0000".to_owned());
    context.time_epoch = 1_741_806_238_000;
    context.http.method = call.method.clone();
    context.http.path = Some(call.path.to_owned());
    context.http.protocol = Some("HTTP/1.1".to_owned());
    context.http.source_ip = Some("198.51.100.7".to_owned());
    context.http.user_agent = Some("curl/8.5.0".to_owned());
    event
}

/// An ALB target group event, as the load balancer sends it.
fn alb_event(call: &Call) -> AlbTargetGroupRequest {
    let mut headers = call.header_map_with_cookie(ALB_HOST);
    // An HTTP listener: lambda_http takes the URI's scheme from x-forwarded-proto, and would
    // fall back to https without it.
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    headers.insert("x-forwarded-port", HeaderValue::from_static("80"));

    let mut event = AlbTargetGroupRequest::default();
    event.http_method = call.method.clone();
    event.path = Some(call.path.to_owned());
    event.query_string_parameters = call.raw_query();
    event.headers = headers;
    // The load balancer sends an empty body for a request without one.
    event.body = Some(call.body.as_ref().map(Value::to_string).unwrap_or_default());
    event.is_base64_encoded = false;
    event.request_context.elb.target_group_arn = Some(TARGET_GROUP_ARN.to_owned());
    event
}

/// An answer, decoded as the response type of the event's source.
#[derive(Debug)]
struct Answer {
    status: i64,
    /// The ALB's `statusDescription` (`None` for the other sources, whose responses have none).
    status_description: Option<String>,
    headers: HeaderMap,
    cookies: Vec<String>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A 200 with the handler's JSON, not cached, naming the invocation it came from.
    fn assert_json_ok(&self, request_id: &str) {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.header("cache-control"), Some("no-store"));
        assert_eq!(self.header("x-request-id"), Some(request_id));
    }
}

/// Decodes the function's answer as `ApiGatewayProxyResponse` (REST),
/// `ApiGatewayV2httpResponse` (HTTP API, function URL) or `AlbTargetGroupResponse` (ALB).
fn decode(api: Api, result: &InvokeResult) -> Answer {
    let bytes = match &result.outcome {
        InvokeOutcome::Success(bytes) => bytes,
        other => panic!("{api:?}: the invocation failed: {other:?}"),
    };
    let raw: Value = serde_json::from_slice(bytes).expect("a JSON answer");
    let text = |body: Option<Body>| match body {
        Some(Body::Text(text)) => serde_json::from_str(&text).expect("a JSON body"),
        other => panic!("{api:?}: not a text body: {other:?}"),
    };
    match api {
        Api::Rest => {
            assert!(
                raw.get("cookies").is_none(),
                "a payload 1.0 response has no cookies field: {raw}"
            );
            let response: ApiGatewayProxyResponse =
                serde_json::from_value(raw).expect("an ApiGatewayProxyResponse");
            assert!(!response.is_base64_encoded);
            // lambda_http puts every header in multiValueHeaders (API Gateway merges both).
            let mut headers = response.multi_value_headers;
            headers.extend(response.headers);
            Answer {
                status: response.status_code,
                status_description: None,
                headers,
                cookies: Vec::new(),
                body: text(response.body),
            }
        }
        Api::Http | Api::FunctionUrl => {
            let response: ApiGatewayV2httpResponse =
                serde_json::from_value(raw).expect("an ApiGatewayV2httpResponse");
            assert!(!response.is_base64_encoded);
            Answer {
                status: response.status_code,
                status_description: None,
                headers: response.headers,
                cookies: response.cookies,
                body: text(response.body),
            }
        }
        Api::Alb => {
            assert!(
                raw.get("cookies").is_none(),
                "an ALB response has no cookies field: {raw}"
            );
            let response: AlbTargetGroupResponse =
                serde_json::from_value(raw).expect("an AlbTargetGroupResponse");
            assert!(!response.is_base64_encoded);
            // The load balancer reads `headers` when the target group has multi-value headers
            // off and `multiValueHeaders` when it has them on: lambda_http fills both. (A
            // canary on the dependency: lambda_http sets one as a copy of the other.)
            assert_eq!(
                response.headers, response.multi_value_headers,
                "{api:?}: headers and multiValueHeaders differ"
            );
            Answer {
                status: response.status_code,
                status_description: response.status_description,
                headers: response.headers,
                cookies: Vec::new(),
                body: text(response.body),
            }
        }
    }
}

/// Decodes a streamed answer (the `stream` mode): lambda_runtime sends the metadata prelude
/// (status, headers, cookies) as JSON, eight NUL bytes, then the body as the handler wrote it.
fn decode_streamed(result: &InvokeResult) -> Answer {
    let bytes = match &result.outcome {
        InvokeOutcome::Success(bytes) => bytes,
        other => panic!("the invocation failed: {other:?}"),
    };
    let at = bytes
        .windows(8)
        .position(|w| w == [0; 8])
        .unwrap_or_else(|| panic!("no prelude delimiter: not a streamed answer: {bytes:?}"));
    let prelude: MetadataPrelude =
        serde_json::from_slice(&bytes[..at]).expect("a JSON metadata prelude");
    Answer {
        status: prelude.status_code.as_u16().into(),
        status_description: None,
        headers: prelude.headers,
        cookies: prelude.cookies,
        body: serde_json::from_slice(&bytes[at + 8..]).expect("a JSON body after the prelude"),
    }
}

async fn start(mode: &str) -> Env {
    let sink = OtlpSink::start().await.expect("sink");
    let emulator = Emulator::start(EmulatorConfig {
        function_timeout: Duration::from_secs(5),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let spec = FunctionSpec::new(env!("CARGO_BIN_EXE_http_fixture"))
        .env("HTTP_FIXTURE_MODE", mode)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint())
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .env("RUST_LOG", "info");
    emulator.spawn_function(spec).await.expect("function init");
    Env { emulator, sink }
}

async fn call(env: &Env, api: Api, call: &Call) -> InvokeResult {
    env.emulator.invoke(event(api, call)).await
}

/// The trace of the invocation `request_id`: the one of lambda_runtime's invocation span.
fn trace_of(env: &Env, request_id: &str) -> String {
    env.sink
        .spans()
        .into_iter()
        .find(|s| s.name == "Lambda runtime invoke" && s.attribute("requestId") == Some(request_id))
        .unwrap_or_else(|| panic!("no invocation span for {request_id}"))
        .trace_id
}

/// Asserts that the environment was never reset and its extension never had two `event/next`
/// calls at once.
fn assert_no_reset_and_one_event_next_at_a_time(env: &Env) {
    let stats = env.emulator.stats();
    assert_eq!(stats.resets, 0);
    assert_eq!(stats.max_concurrent_event_next_per_extension, 1);
}

/// Asserts that the audit of `call` (status `status`) ran after the response was posted and
/// ended before the environment was released, and that the invocation's spans, the handler's
/// and the audit's were exported in that window. Returns the timeline.
async fn assert_deferred_audit(
    env: &Env,
    result: &InvokeResult,
    call: &Call,
    status: &str,
) -> Timeline {
    let t = env.completed(&result.request_id).await;
    assert!(!t.timed_out, "{}: timed out", call.route());
    let posted = t.response_posted.expect("the response was posted");
    let released = phase_end(&t);
    let started = t
        .mark(&format!("audit-start:{}", call.route()))
        .unwrap_or_else(|| panic!("the audit of {} did not start: {:?}", call.route(), t.marks));
    let ended = t
        .mark(&format!("audit:{} {status}", call.route()))
        .unwrap_or_else(|| panic!("the audit of {} did not end: {:?}", call.route(), t.marks));
    assert!(
        started >= posted,
        "{}: audit before the response",
        call.route()
    );
    assert!(
        ended <= released,
        "{}: audit after the release",
        call.route()
    );

    let trace = trace_of(env, &result.request_id);
    let spans = env.spans_before(&trace, released);
    for name in ["Lambda runtime invoke", "http-handler", "audit"] {
        assert_eq!(
            spans.iter().filter(|s| *s == name).count(),
            1,
            "{}: span {name} in this invocation's flush: {spans:?}",
            call.route()
        );
    }
    t
}

/// A REST API (payload 1.0): GET with path and query parameters, POST with a JSON body, POST
/// with a bad body; the audit of a slow action stays off the caller's latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_v1_events() {
    let env = start("run").await;

    let get = Call::get("/accounts/acc-1")
        .query("verbose=1")
        .header("x-audit-ms", "1000");
    let result = call(&env, Api::Rest, &get).await;
    let answer = decode(Api::Rest, &result);
    answer.assert_json_ok(&result.request_id);
    assert_eq!(answer.body["account"]["owner"], "Ada Lovelace");
    let seen = &answer.body["seen"];
    assert_eq!(seen["kind"], "rest", "{seen}");
    assert_eq!(seen["stage"], "prod");
    assert_eq!(seen["domain"], API_HOST);
    assert_eq!(seen["raw_path"], "/accounts/acc-1");
    assert_eq!(
        seen["uri"],
        format!("https://{API_HOST}/prod/accounts/acc-1?verbose=1")
    );
    assert_eq!(seen["query"], json!({ "verbose": "1" }));
    assert_eq!(seen["path_parameters"], json!({ "id": "acc-1" }));
    // The 1 s audit is not in the caller's latency (a generous bound for a loaded machine).
    assert!(
        result.latency < Duration::from_millis(700),
        "caller latency {:?}",
        result.latency
    );
    let t = assert_deferred_audit(&env, &result, &get, "200").await;
    let ended = t.mark("audit:GET /accounts/acc-1 200").expect("ended");
    assert!(ended >= t.response_posted.expect("posted") + Duration::from_millis(990));
    assert_eq!(
        answer.header("x-trace-id"),
        Some(trace_of(&env, &result.request_id).as_str()),
        "the handler's span is in the invocation's trace"
    );

    let post = Call::post("/accounts", json!({ "owner": "Grace Hopper" }));
    let result = call(&env, Api::Rest, &post).await;
    let answer = decode(Api::Rest, &result);
    assert_eq!(answer.status, 201, "{answer:?}");
    let id = answer.body["account"]["id"].as_str().expect("an id");
    assert_eq!(answer.body["account"]["owner"], "Grace Hopper");
    let location = format!("/accounts/{id}");
    assert_eq!(answer.header("location"), Some(location.as_str()));
    // Payload 1.0 has no cookies field: Set-Cookie stays a header.
    assert_eq!(
        answer.header("set-cookie"),
        Some(format!("last-account={location}; Path=/").as_str())
    );
    // lambda_http puts the stage back in front of the path.
    assert_eq!(
        answer.body["seen"]["uri"],
        format!("https://{API_HOST}/prod/accounts")
    );
    assert_deferred_audit(&env, &result, &post, "201").await;

    let bad = Call::post("/accounts", json!({ "name": "no owner" }));
    let result = call(&env, Api::Rest, &bad).await;
    let answer = decode(Api::Rest, &result);
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body["error"].is_string());
    assert_deferred_audit(&env, &result, &bad, "400").await;

    assert_no_reset_and_one_event_next_at_a_time(&env);
}

/// An HTTP API (payload 2.0): cookies in and out, the raw query string, the route's path
/// parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_v2_events() {
    let env = start("run").await;

    let get = Call::get("/accounts/acc-1")
        .query("verbose=1&fields=owner")
        .cookie("session=s3cr3t")
        .cookie("theme=dark");
    let result = call(&env, Api::Http, &get).await;
    let answer = decode(Api::Http, &result);
    answer.assert_json_ok(&result.request_id);
    assert!(answer.cookies.is_empty(), "{answer:?}");
    assert_eq!(answer.body["account"]["balance_cents"], 125_000);
    let seen = &answer.body["seen"];
    assert_eq!(seen["kind"], "http", "{seen}");
    assert_eq!(seen["stage"], "$default");
    assert_eq!(seen["domain"], API_HOST);
    assert_eq!(
        seen["uri"],
        format!("https://{API_HOST}/accounts/acc-1?verbose=1&fields=owner")
    );
    assert_eq!(seen["query"], json!({ "verbose": "1", "fields": "owner" }));
    assert_eq!(seen["path_parameters"], json!({ "id": "acc-1" }));
    assert_eq!(seen["cookie"], "session=s3cr3t; theme=dark");
    assert_deferred_audit(&env, &result, &get, "200").await;
    assert_eq!(
        answer.header("x-trace-id"),
        Some(trace_of(&env, &result.request_id).as_str())
    );

    let post = Call::post("/accounts", json!({ "owner": "Katherine Johnson" }));
    let result = call(&env, Api::Http, &post).await;
    let answer = decode(Api::Http, &result);
    assert_eq!(answer.status, 201, "{answer:?}");
    let location = answer.header("location").expect("location").to_owned();
    assert!(location.starts_with("/accounts/acc-"), "{location}");
    // Payload 2.0: Set-Cookie goes to the cookies field, not to the headers.
    assert_eq!(
        answer.cookies,
        [format!("last-account={location}; Path=/")],
        "{answer:?}"
    );
    assert_eq!(answer.header("set-cookie"), None);
    assert_deferred_audit(&env, &result, &post, "201").await;
}

/// A Lambda function URL (payload 2.0 without a route): lambda_http takes it for an HTTP API
/// event; its response is an `ApiGatewayV2httpResponse`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_url_events() {
    let env = start("run").await;

    let post = Call::post("/accounts", json!({ "owner": "Dorothy Vaughan" }));
    let result = call(&env, Api::FunctionUrl, &post).await;
    let answer = decode(Api::FunctionUrl, &result);
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.body["account"]["owner"], "Dorothy Vaughan");
    assert_eq!(answer.cookies.len(), 1, "{answer:?}");
    let seen = &answer.body["seen"];
    assert_eq!(seen["kind"], "http", "{seen}");
    assert_eq!(seen["domain"], URL_HOST);
    assert_eq!(seen["uri"], format!("https://{URL_HOST}/accounts"));
    assert_deferred_audit(&env, &result, &post, "201").await;

    let missing = Call::get("/accounts/acc-999");
    let result = call(&env, Api::FunctionUrl, &missing).await;
    let answer = decode(Api::FunctionUrl, &result);
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_eq!(answer.body["error"], "no account acc-999");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    // No route: the handler routes on the raw path.
    assert_eq!(answer.body["seen"]["raw_path"], "/accounts/acc-999");
    assert_deferred_audit(&env, &result, &missing, "404").await;
}

/// A function URL in `RESPONSE_STREAM` mode: `Deferred::run` with `lambda_http::StreamAdapter`
/// (the `stream` mode), whose handler's body is streamed by a task after the handler returned.
/// The caller gets the prelude and the whole body; the audit starts only once the stream, and
/// with it the response's POST, is over, and ends, with the flush of the invocation's spans,
/// before the environment is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_url_streamed_responses() {
    let env = start("stream").await;

    // Three pieces 60 ms apart, then a 1 s audit: a caller that waited for it would wait
    // over 1.1 s, far from the bound below on a loaded machine too.
    let get = Call::get("/accounts/acc-1")
        .header("x-stream-ms", "60")
        .header("x-audit-ms", "1000");
    let result = call(&env, Api::FunctionUrl, &get).await;
    let answer = decode_streamed(&result);
    answer.assert_json_ok(&result.request_id);
    assert!(answer.cookies.is_empty(), "{answer:?}");
    assert_eq!(answer.body["account"]["owner"], "Ada Lovelace");
    let seen = &answer.body["seen"];
    assert_eq!(seen["kind"], "http", "{seen}");
    assert_eq!(seen["domain"], URL_HOST);
    assert_eq!(seen["uri"], format!("https://{URL_HOST}/accounts/acc-1"));
    // The caller waits for the whole stream, not for the audit.
    assert!(
        result.latency >= Duration::from_millis(120) && result.latency < Duration::from_millis(900),
        "caller latency {:?}",
        result.latency
    );
    let t = assert_deferred_audit(&env, &result, &get, "200").await;
    let posted = t.response_posted.expect("posted");
    let stream_end = t
        .mark("stream-end:GET /accounts/acc-1")
        .unwrap_or_else(|| panic!("the stream did not end: {:?}", t.marks));
    assert!(stream_end < posted, "the POST ended before the stream");
    let ended = t.mark("audit:GET /accounts/acc-1 200").expect("ended");
    assert!(ended >= posted + Duration::from_millis(990));
    assert_eq!(
        answer.header("x-trace-id"),
        Some(trace_of(&env, &result.request_id).as_str()),
        "the handler's span is in the invocation's trace"
    );

    // StreamAdapter moves Set-Cookie from the headers to the prelude's cookies.
    let post = Call::post("/accounts", json!({ "owner": "Annie Easley" }));
    let result = call(&env, Api::FunctionUrl, &post).await;
    let answer = decode_streamed(&result);
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.body["account"]["owner"], "Annie Easley");
    assert_eq!(
        answer.header("x-request-id"),
        Some(result.request_id.as_str())
    );
    let location = answer.header("location").expect("location").to_owned();
    assert!(location.starts_with("/accounts/acc-"), "{location}");
    assert_eq!(
        answer.cookies,
        [format!("last-account={location}; Path=/")],
        "{answer:?}"
    );
    assert_eq!(answer.header("set-cookie"), None);
    assert_deferred_audit(&env, &result, &post, "201").await;

    // A failing handler: an error response, no stream, and the audit still runs after it.
    let failing = Call::get("/accounts/acc-1").header("x-fixture", "err");
    let result = call(&env, Api::FunctionUrl, &failing).await;
    match &result.outcome {
        InvokeOutcome::FunctionError { error_message, .. } => assert_eq!(
            error_message,
            "the account store is unavailable (on purpose)"
        ),
        other => panic!("expected a function error, got {other:?}"),
    }
    let t = assert_deferred_audit(&env, &result, &failing, "error").await;
    assert!(t.function_error, "posted to /error");

    assert_no_reset_and_one_event_next_at_a_time(&env);
}

/// An Application Load Balancer's Lambda target group: the query passed on as the client
/// encoded it, cookies in a header both ways, no stage; the response carries a
/// `statusDescription` and the headers twice (`headers` and `multiValueHeaders`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alb_target_group_events() {
    let env = start("run").await;

    let get = Call::get("/accounts/acc-1")
        .query("verbose=1&fields=owner%2Cbalance_cents")
        .cookie("session=s3cr3t")
        .cookie("theme=dark")
        .header("x-audit-ms", "1000");
    let result = call(&env, Api::Alb, &get).await;
    let answer = decode(Api::Alb, &result);
    answer.assert_json_ok(&result.request_id);
    assert_eq!(answer.status_description.as_deref(), Some("200 OK"));
    assert_eq!(answer.body["account"]["owner"], "Ada Lovelace");
    let seen = &answer.body["seen"];
    // Not an API Gateway context: the fixture calls any other `other`, and of the sources
    // enabled here only ALB's remains.
    assert_eq!(seen["kind"], "alb", "{seen}");
    assert_eq!(seen["stage"], Value::Null);
    assert_eq!(seen["raw_path"], "/accounts/acc-1");
    // The load balancer does not decode the query; lambda_http does.
    assert_eq!(
        seen["query"],
        json!({ "verbose": "1", "fields": "owner,balance_cents" })
    );
    // The scheme from x-forwarded-proto, the host header, no stage; lambda_http rebuilds the
    // query from a map, in no set order.
    let uri = seen["uri"].as_str().expect("a uri");
    let (base, query) = uri.split_once('?').expect("a query in the uri");
    assert_eq!(base, format!("http://{ALB_HOST}/accounts/acc-1"));
    let mut pairs: Vec<&str> = query.split('&').collect();
    pairs.sort_unstable();
    assert_eq!(
        pairs,
        ["fields=owner%2Cbalance_cents", "verbose=1"],
        "{uri}"
    );
    assert_eq!(seen["cookie"], "session=s3cr3t; theme=dark");
    // The 1 s audit is not in the caller's latency (a generous bound for a loaded machine).
    assert!(
        result.latency < Duration::from_millis(700),
        "caller latency {:?}",
        result.latency
    );
    let t = assert_deferred_audit(&env, &result, &get, "200").await;
    let ended = t.mark("audit:GET /accounts/acc-1 200").expect("ended");
    assert!(ended >= t.response_posted.expect("posted") + Duration::from_millis(990));
    assert_eq!(
        answer.header("x-trace-id"),
        Some(trace_of(&env, &result.request_id).as_str())
    );

    let post = Call::post("/accounts", json!({ "owner": "Mary Jackson" }));
    let result = call(&env, Api::Alb, &post).await;
    let answer = decode(Api::Alb, &result);
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.status_description.as_deref(), Some("201 Created"));
    assert_eq!(answer.body["account"]["owner"], "Mary Jackson");
    assert_eq!(
        answer.header("x-request-id"),
        Some(result.request_id.as_str())
    );
    let location = answer.header("location").expect("location").to_owned();
    assert!(location.starts_with("/accounts/acc-"), "{location}");
    // No cookies field: Set-Cookie stays a header.
    assert_eq!(
        answer.header("set-cookie"),
        Some(format!("last-account={location}; Path=/").as_str())
    );
    assert_eq!(
        answer.body["seen"]["uri"],
        format!("http://{ALB_HOST}/accounts")
    );
    assert_deferred_audit(&env, &result, &post, "201").await;

    let bad = Call::post("/accounts", json!({ "name": "no owner" }));
    let result = call(&env, Api::Alb, &bad).await;
    let answer = decode(Api::Alb, &result);
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(
        answer.status_description.as_deref(),
        Some("400 Bad Request")
    );
    assert!(answer.body["error"].is_string());
    assert_deferred_audit(&env, &result, &bad, "400").await;

    let missing = Call::get("/accounts/acc-999");
    let result = call(&env, Api::Alb, &missing).await;
    let answer = decode(Api::Alb, &result);
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_eq!(answer.status_description.as_deref(), Some("404 Not Found"));
    assert_eq!(answer.body["error"], "no account acc-999");
    // No query: none in the uri either.
    assert_eq!(
        answer.body["seen"]["uri"],
        format!("http://{ALB_HOST}/accounts/acc-999")
    );
    assert_deferred_audit(&env, &result, &missing, "404").await;

    assert_no_reset_and_one_event_next_at_a_time(&env);
}

/// A handler that returns `Err` or panics: the caller gets Lambda's error response at once
/// (API Gateway or the load balancer turns it into a 502), and the audit queued before the failure still runs
/// after it, with the flush; the next request is served normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_still_answers_and_runs_deferred_work() {
    let env = start("run").await;
    for (api, fixture, message) in [
        (
            Api::Http,
            "err",
            "the account store is unavailable (on purpose)",
        ),
        (
            Api::Rest,
            "panic",
            "Lambda panicked: the handler panicked on purpose",
        ),
        (
            Api::FunctionUrl,
            "err",
            "the account store is unavailable (on purpose)",
        ),
        (
            Api::Alb,
            "panic",
            "Lambda panicked: the handler panicked on purpose",
        ),
    ] {
        let failing = Call::get("/accounts/acc-1").header("x-fixture", fixture);
        let result = call(&env, api, &failing).await;
        match &result.outcome {
            InvokeOutcome::FunctionError { error_message, .. } => {
                assert_eq!(error_message, message, "{api:?} {fixture}");
            }
            other => panic!("{api:?} {fixture}: expected a function error, got {other:?}"),
        }
        let t = assert_deferred_audit(&env, &result, &failing, "error").await;
        assert!(t.function_error, "{api:?} {fixture}: posted to /error");

        let ok = Call::get("/accounts/acc-1");
        let result = call(&env, api, &ok).await;
        let answer = decode(api, &result);
        answer.assert_json_ok(&result.request_id);
        assert_deferred_audit(&env, &result, &ok, "200").await;
    }
    assert_eq!(env.emulator.stats().resets, 0);
}

/// The other wirings: `Deferred::start` with `lambda_http::run` (the phase starts when the
/// handler returns, alongside the response POST), and `start` with a `lambda_runtime::Runtime`
/// of `lambda_http::Adapter` carrying the handle's `DeferredLayer` (as `run`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_lambda_http_run_and_with_the_layer() {
    for mode in ["start", "layer"] {
        let env = start(mode).await;
        for api in [Api::Rest, Api::Http, Api::Alb] {
            let get = Call::get("/accounts/acc-1").header("x-audit-ms", "800");
            let result = call(&env, api, &get).await;
            let answer = decode(api, &result);
            assert_eq!(answer.status, 200, "{mode} {api:?}: {answer:?}");
            assert_eq!(
                answer.header("x-request-id"),
                Some(result.request_id.as_str()),
                "{mode} {api:?}: the handler sees the Lambda request id"
            );
            // Generous for a loaded machine; waiting for the audit would take 800 ms.
            assert!(
                result.latency < Duration::from_millis(500),
                "{mode} {api:?}: caller latency {:?}",
                result.latency
            );
            let t = env.completed(&result.request_id).await;
            assert!(!t.timed_out);
            let ended = t
                .mark("audit:GET /accounts/acc-1 200")
                .unwrap_or_else(|| panic!("{mode} {api:?}: the audit did not run: {:?}", t.marks));
            assert!(
                ended <= phase_end(&t),
                "{mode} {api:?}: audit after the release"
            );
            let trace = answer.header("x-trace-id").expect("x-trace-id").to_owned();
            let spans = env.spans_before(&trace, phase_end(&t));
            assert!(
                spans.iter().any(|s| s == "audit"),
                "{mode} {api:?}: the audit's span in this flush: {spans:?}"
            );
            if mode == "layer" {
                // With the layer, as with `run`: after the response, every span in this flush.
                assert_deferred_audit(&env, &result, &get, "200").await;
            }
        }
        assert_eq!(
            env.emulator.stats().max_concurrent_event_next_per_extension,
            1,
            "{mode}"
        );
        assert_eq!(env.emulator.stats().resets, 0, "{mode}");
    }
}
