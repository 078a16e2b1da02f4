//! The emulator follows Lambda's Runtime API and Extensions API rules. Most tests drive it in
//! "attach" mode: the test itself plays runtime and extensions over raw HTTP (a hyper client);
//! the child-process tests use the `emu_probe` binary.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deferred_testkit::emulator::{
    Emulator, EmulatorConfig, Fault, FunctionSpec, InvokeOutcome, InvokeResult, RestoredConnections,
};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";
const REGISTER: &str = "/2020-01-01/extension/register";
const EVENT_NEXT: &str = "/2020-01-01/extension/event/next";
const EXT_INIT_ERROR: &str = "/2020-01-01/extension/init/error";
const EXT_EXIT_ERROR: &str = "/2020-01-01/extension/exit/error";
const MARK: &str = "/__testkit/mark";

const SECOND: Duration = Duration::from_secs(1);
const PROBE: &str = env!("CARGO_BIN_EXE_emu_probe");

// ----- a raw HTTP client ---------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
            .to_owned()
    }

    /// Lambda's error answer: the status and `{"errorMessage","errorType"}`.
    #[track_caller]
    fn assert_error(&self, status: u16, error_type: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["errorType"], error_type, "{body}");
        assert!(body["errorMessage"].is_string(), "{body}");
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    addr: String,
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Conn {
            addr: addr.to_owned(),
            sender,
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(body.into()))
            .map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh connection; `Err` when the connection fails or closes early.
async fn try_call(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    Conn::open(addr)
        .await?
        .send(method, path, headers, body)
        .await
}

async fn call(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    try_call(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Bounds any await, so a broken rule fails the test instead of hanging it.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .expect("timed out")
}

async fn joined<T>(handle: JoinHandle<T>) -> T {
    within(handle).await.expect("task panicked")
}

async fn register_reply(addr: &str, name: &str, events: &[&str]) -> Reply {
    let body = json!({ "events": events }).to_string();
    call(
        addr,
        Method::POST,
        REGISTER,
        &[("Lambda-Extension-Name", name)],
        body,
    )
    .await
}

async fn register(addr: &str, name: &str, events: &[&str]) -> String {
    let reply = register_reply(addr, name, events).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.header("lambda-extension-identifier")
}

fn spawn_ext_next(addr: &str, id: &str) -> JoinHandle<Result<Reply, String>> {
    let (addr, id) = (addr.to_owned(), id.to_owned());
    tokio::spawn(async move {
        try_call(
            &addr,
            Method::GET,
            EVENT_NEXT,
            &[("Lambda-Extension-Identifier", &id)],
            "",
        )
        .await
    })
}

/// The client of the pending call `call` goes away (its connection closes); returns once the
/// emulator has seen it (the first such call of the run).
async fn drop_pending<T>(emu: &Emulator, call: JoinHandle<T>) {
    call.abort();
    let _ = call.await;
    assert!(
        emu.wait_until(SECOND, |s, _| s.abandoned_next_calls == 1)
            .await
    );
}

fn spawn_runtime_next(addr: &str) -> JoinHandle<Reply> {
    let addr = addr.to_owned();
    tokio::spawn(async move { call(&addr, Method::GET, NEXT, &[], "").await })
}

/// A runtime `/next` whose connection may end without an answer.
fn spawn_try_runtime_next(addr: &str) -> JoinHandle<Result<Reply, String>> {
    let addr = addr.to_owned();
    tokio::spawn(async move { try_call(&addr, Method::GET, NEXT, &[], "").await })
}

fn spawn_invoke(emu: &Emulator, payload: &'static str) -> JoinHandle<InvokeResult> {
    let emu = emu.clone();
    tokio::spawn(async move { emu.invoke(payload).await })
}

/// Invokes with `payload` and takes the invocation as the runtime: its request id, and the
/// caller's pending result.
async fn dispatched(
    emu: &Emulator,
    addr: &str,
    payload: &'static str,
) -> (String, JoinHandle<InvokeResult>) {
    let runtime = spawn_runtime_next(addr);
    let invoke = spawn_invoke(emu, payload);
    let id = joined(runtime)
        .await
        .header("lambda-runtime-aws-request-id");
    (id, invoke)
}

async fn respond(addr: &str, request_id: &str, body: &'static str) -> Reply {
    call(
        addr,
        Method::POST,
        &format!("/2018-06-01/runtime/invocation/{request_id}/response"),
        &[],
        body,
    )
    .await
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A runtime that echoes every payload, on keep-alive connections, until the emulator goes.
fn echo_runtime(addr: &str) -> JoinHandle<()> {
    let addr = addr.to_owned();
    tokio::spawn(async move {
        let Ok(mut conn) = Conn::open(&addr).await else {
            return;
        };
        while let Ok(event) = conn.send(Method::GET, NEXT, &[], "").await {
            if event.status != 200 {
                return;
            }
            let id = event.header("lambda-runtime-aws-request-id");
            let path = format!("/2018-06-01/runtime/invocation/{id}/response");
            if conn
                .send(Method::POST, &path, &[], event.body)
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// An extension that asks for the next event as soon as it has one.
fn eager_extension(addr: &str, id: &str) -> JoinHandle<()> {
    let (addr, id) = (addr.to_owned(), id.to_owned());
    tokio::spawn(async move {
        let Ok(mut conn) = Conn::open(&addr).await else {
            return;
        };
        let headers = [("Lambda-Extension-Identifier", id.as_str())];
        while let Ok(reply) = conn.send(Method::GET, EVENT_NEXT, &headers, "").await {
            if reply.status != 200 {
                return;
            }
        }
    })
}

async fn start(config: EmulatorConfig) -> (Emulator, String) {
    let emu = Emulator::start(config).await.expect("emulator starts");
    let addr = emu.runtime_api();
    (emu, addr)
}

// ----- Extensions API: registration ------------------------------------------------------------

#[tokio::test]
async fn registration_answers_identifier_and_closes_at_the_runtimes_first_next() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let reply = register_reply(&addr, "ext-a", &["INVOKE"]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(is_uuid(&reply.header("lambda-extension-identifier")));
    let body = reply.json();
    assert_eq!(body["functionName"], "test-function");
    assert_eq!(body["functionVersion"], "$LATEST");
    assert!(body["handler"].is_string());

    let _runtime = spawn_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.runtime_next_calls == 1)
            .await
    );
    register_reply(&addr, "ext-b", &["INVOKE"])
        .await
        .assert_error(403, "Extension.RegistrationClosed");
    assert_eq!(emu.extensions(), vec!["ext-a".to_owned()]);
}

#[tokio::test]
async fn internal_extensions_cannot_subscribe_to_shutdown_and_events_are_validated() {
    let config = EmulatorConfig {
        external_extensions: vec!["ext-external".to_owned()],
        ..EmulatorConfig::default()
    };
    let (_emu, addr) = start(config).await;
    register_reply(&addr, "ext-internal", &["INVOKE", "SHUTDOWN"])
        .await
        .assert_error(403, "Extension.InvalidEventType");
    register_reply(&addr, "ext-bogus", &["BOGUS"])
        .await
        .assert_error(403, "Extension.InvalidEventType");
    register(&addr, "ext-external", &["INVOKE", "SHUTDOWN"]).await;
    register_reply(&addr, "ext-external", &["INVOKE"])
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    // No name, and an unreadable body: RIE answers both with 403.
    call(&addr, Method::POST, REGISTER, &[], r#"{"events":[]}"#)
        .await
        .assert_error(403, "Extension.InvalidExtensionName");
    call(
        &addr,
        Method::POST,
        REGISTER,
        &[("Lambda-Extension-Name", "ext-x")],
        "{not json",
    )
    .await
    .assert_error(403, "InvalidRequestFormat");
}

/// The register body is read as RAPID reads it (agentregister.go, `parseRegister`): unknown
/// fields and a `null` event list pass, a non-empty `configurationKeys` is refused.
#[tokio::test]
async fn a_register_body_with_configuration_keys_is_refused() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let register_with = |name: &'static str, body: &'static str| {
        let addr = addr.clone();
        async move {
            call(
                &addr,
                Method::POST,
                REGISTER,
                &[("Lambda-Extension-Name", name)],
                body,
            )
            .await
        }
    };
    let reply = register_with(
        "ext-keys",
        r#"{"events":["INVOKE"],"configurationKeys":["KEY"]}"#,
    )
    .await;
    reply.assert_error(403, "InvalidRequestFormat");
    assert_eq!(
        reply.json()["errorMessage"],
        "configurationKeys are deprecated; use environment variables instead"
    );
    let reply = register_with(
        "ext-no-keys",
        r#"{"events":["INVOKE"],"configurationKeys":[],"other":1}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = register_with("ext-null", r#"{"events":null}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        emu.extensions(),
        vec!["ext-no-keys".to_owned(), "ext-null".to_owned()]
    );
}

#[tokio::test]
async fn more_than_ten_extensions_are_refused() {
    let (_emu, addr) = start(EmulatorConfig::default()).await;
    for i in 0..10 {
        register(&addr, &format!("ext-{i}"), &["INVOKE"]).await;
    }
    register_reply(&addr, "ext-10", &["INVOKE"])
        .await
        .assert_error(403, "Extension.TooManyExtensions");
}

#[tokio::test]
async fn missing_invalid_and_unknown_extension_identifiers_are_refused() {
    let (_emu, addr) = start(EmulatorConfig::default()).await;
    let unknown = "8476a536-e9f4-4a5a-9b4b-5a6d7e8f9a0b";
    for path in [EVENT_NEXT, EXT_INIT_ERROR, EXT_EXIT_ERROR] {
        let method = if path == EVENT_NEXT {
            Method::GET
        } else {
            Method::POST
        };
        let error_type = [("Lambda-Extension-Function-Error-Type", "Extension.Fatal")];
        call(&addr, method.clone(), path, &error_type, "")
            .await
            .assert_error(403, "Extension.MissingExtensionIdentifier");
        let headers = [("Lambda-Extension-Identifier", "not-a-uuid"), error_type[0]];
        call(&addr, method.clone(), path, &headers, "")
            .await
            .assert_error(403, "Extension.InvalidExtensionIdentifier");
        let headers = [("Lambda-Extension-Identifier", unknown), error_type[0]];
        call(&addr, method, path, &headers, "")
            .await
            .assert_error(403, "Extension.UnknownExtensionIdentifier");
    }
}

/// chi's plain 404 (Go's `http.NotFound`), as RAPID's router answers an unknown path.
#[track_caller]
fn assert_not_found(reply: &Reply) {
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(&reply.body[..], b"404 page not found\n");
    assert_eq!(reply.header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(reply.header("x-content-type-options"), "nosniff");
}

/// chi's 405: an empty body, and the route's methods in `Allow`.
#[track_caller]
fn assert_method_not_allowed(reply: &Reply, allowed: &[&str]) {
    assert_eq!(reply.status, 405, "{reply:?}");
    assert!(reply.body.is_empty(), "{reply:?}");
    assert!(reply.headers.get("content-type").is_none(), "{reply:?}");
    let allow: Vec<_> = reply
        .headers
        .get_all("allow")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(allow, allowed, "{reply:?}");
}

/// Unknown paths and methods get chi's plain answers, as from RAPID's router; the API's own
/// errors are Lambda's JSON documents.
#[tokio::test]
async fn unknown_paths_and_methods_get_the_routers_plain_answers() {
    let (_emu, addr) = start(EmulatorConfig::default()).await;
    assert_not_found(&call(&addr, Method::GET, "/nope", &[], "").await);
    assert_not_found(&call(&addr, Method::GET, "/2018-06-01/runtime/unknown", &[], "").await);
    assert_not_found(
        &call(
            &addr,
            Method::POST,
            "/2020-01-01/extension/unknown",
            &[],
            "",
        )
        .await,
    );
    assert_method_not_allowed(
        &call(&addr, Method::GET, REGISTER, &[], "").await,
        &["POST"],
    );
    assert_method_not_allowed(&call(&addr, Method::POST, NEXT, &[], "").await, &["GET"]);
    assert_method_not_allowed(
        &call(&addr, Method::HEAD, EVENT_NEXT, &[], "").await,
        &["GET"],
    );
    assert_method_not_allowed(
        &call(
            &addr,
            Method::GET,
            "/2018-06-01/runtime/invocation/x/response",
            &[],
            "",
        )
        .await,
        &["POST"],
    );
    // A method chi does not route is a 405 whatever the path.
    let custom = Method::from_bytes(b"BREW").expect("method");
    assert_method_not_allowed(&call(&addr, custom, "/nope", &[], "").await, &[]);
    // RIE's AwsRequestIDValidator: an id that is not the current invocation's is a 400.
    call(
        &addr,
        Method::POST,
        "/2018-06-01/runtime/invocation/no-such-id/response",
        &[],
        "{}",
    )
    .await
    .assert_error(400, "InvalidRequestID");
}

// ----- Extensions API: errors ------------------------------------------------------------------

/// After an exit error the extension may make no further call, except the same error again:
/// RAPID takes it (202) and keeps the first (core/externalagent_states.go, the ExitError state).
#[tokio::test]
async fn an_extension_that_reported_an_exit_error_may_make_no_further_call() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-dying", &["INVOKE"]).await;
    let with_id = [("Lambda-Extension-Identifier", id.as_str())];
    call(&addr, Method::POST, EXT_EXIT_ERROR, &with_id, "")
        .await
        .assert_error(403, "Extension.MissingHeader");
    let headers = [
        ("Lambda-Extension-Identifier", id.as_str()),
        ("Lambda-Extension-Function-Error-Type", "Extension.Fatal"),
    ];
    let reply = call(&addr, Method::POST, EXT_EXIT_ERROR, &headers, "").await;
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json(), json!({ "status": "OK" }));
    call(&addr, Method::GET, EVENT_NEXT, &with_id, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    let again = call(&addr, Method::POST, EXT_EXIT_ERROR, &headers, "").await;
    assert_eq!(again.status, 202, "{again:?}");
    assert_eq!(again.json(), json!({ "status": "OK" }));
    call(&addr, Method::POST, EXT_INIT_ERROR, &headers, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    // The environment failed during init: the invoke reports it.
    let result = within(emu.invoke("x")).await;
    match result.outcome {
        InvokeOutcome::InitError(message) => assert!(message.contains("ext-dying"), "{message}"),
        other => panic!("expected an init error, got {other:?}"),
    }
    assert_eq!(emu.stats().init_failures, 1);
}

#[tokio::test]
async fn an_extension_init_error_fails_init() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-broken", &["INVOKE"]).await;
    let headers = [
        ("Lambda-Extension-Identifier", id.as_str()),
        (
            "Lambda-Extension-Function-Error-Type",
            "Extension.ConfigInvalid",
        ),
    ];
    let reply = call(&addr, Method::POST, EXT_INIT_ERROR, &headers, "").await;
    assert_eq!(reply.status, 202, "{reply:?}");
    // The same error again is taken and changes nothing (RAPID's InitError state); an exit
    // error is refused.
    let again = call(&addr, Method::POST, EXT_INIT_ERROR, &headers, "").await;
    assert_eq!(again.status, 202, "{again:?}");
    call(&addr, Method::POST, EXT_EXIT_ERROR, &headers, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    let result = within(emu.invoke("x")).await;
    assert!(
        matches!(&result.outcome, InvokeOutcome::InitError(m) if m.contains("Extension.ConfigInvalid")),
        "{result:?}"
    );
    assert_eq!(emu.stats().init_failures, 1);
}

// ----- Runtime API ------------------------------------------------------------------------------

#[tokio::test]
async fn invocations_carry_epoch_ms_deadlines_and_context_headers() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-ctx", &["INVOKE"]).await;
    let ext = spawn_ext_next(&addr, &id);
    let runtime = spawn_runtime_next(&addr);
    let before = epoch_ms();
    let invoke = spawn_invoke(&emu, r#"{"hello":"world"}"#);
    let event = joined(runtime).await;
    let after = epoch_ms();
    assert_eq!(event.status, 200);
    assert_eq!(&event.body[..], br#"{"hello":"world"}"#);
    let request_id = event.header("lambda-runtime-aws-request-id");
    assert!(is_uuid(&request_id), "{request_id}");
    let deadline: u64 = event
        .header("lambda-runtime-deadline-ms")
        .parse()
        .expect("epoch ms");
    assert!(
        deadline >= before + 3000 && deadline <= after + 3000,
        "deadline {deadline} not in [{before}+3000, {after}+3000]"
    );
    assert_eq!(
        event.header("lambda-runtime-invoked-function-arn"),
        emu.function_arn()
    );
    let trace = event.header("lambda-runtime-trace-id");
    assert!(trace.starts_with("Root=1-"), "{trace}");

    let ext_event = joined(ext).await.expect("event/next");
    assert_eq!(ext_event.status, 200);
    assert!(is_uuid(
        &ext_event.header("lambda-extension-event-identifier")
    ));
    let body = ext_event.json();
    assert_eq!(body["eventType"], "INVOKE");
    assert_eq!(body["requestId"], request_id);
    // Rendered apart, as Lambda does (`EmulatorConfig::extension_deadline_skew_ms`).
    assert_eq!(body["deadlineMs"], deadline - 1);
    assert_eq!(body["invokedFunctionArn"], emu.function_arn());
    assert_eq!(body["tracing"]["type"], "X-Amzn-Trace-Id");
    assert_eq!(body["tracing"]["value"], trace);

    assert_eq!(respond(&addr, &request_id, "done").await.status, 202);
    let result = joined(invoke).await;
    assert_eq!(result.request_id, request_id);
    assert_eq!(result.outcome, InvokeOutcome::Success(Bytes::from("done")));
}

#[tokio::test]
async fn runtime_answers_follow_lambdas_state_rules() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let runtime = spawn_runtime_next(&addr);
    let invoke = spawn_invoke(&emu, "one");
    let event = joined(runtime).await;
    let id = event.header("lambda-runtime-aws-request-id");
    // Asking for the next event before answering is allowed in RAPID's Running state, and
    // renders the current invocation again (`RuntimeRunningState.Ready`).
    let again = call(&addr, Method::GET, NEXT, &[], "").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("lambda-runtime-aws-request-id"), id);
    assert_eq!(
        again.header("lambda-runtime-deadline-ms"),
        event.header("lambda-runtime-deadline-ms")
    );
    assert_eq!(&again.body[..], b"one");
    let reply = respond(&addr, &id, "r1").await;
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json(), json!({ "status": "OK" }));
    respond(&addr, &id, "again")
        .await
        .assert_error(403, "InvalidStateTransition");
    assert_eq!(
        joined(invoke).await.outcome.body(),
        Some(&Bytes::from("r1"))
    );
    // init/error after init is over.
    call(&addr, Method::POST, INIT_ERROR, &[], "{}")
        .await
        .assert_error(403, "InvalidStateTransition");

    // Over 6 MiB + 100 bytes: 413, and the caller gets Function.ResponseSizeTooLarge.
    let first_id = id;
    let (id, invoke) = dispatched(&emu, &addr, "two").await;
    // The answered invocation is no longer the current one: its id is unknown now (RIE's
    // AwsRequestIDValidator compares with the current invocation's id only).
    respond(&addr, &first_id, "late")
        .await
        .assert_error(400, "InvalidRequestID");
    let too_big = vec![b'x'; 6 * 1024 * 1024 + 101];
    call(
        &addr,
        Method::POST,
        &format!("/2018-06-01/runtime/invocation/{id}/response"),
        &[],
        too_big,
    )
    .await
    .assert_error(413, "RequestEntityTooLarge");
    match joined(invoke).await.outcome {
        InvokeOutcome::FunctionError { error_type, .. } => {
            assert_eq!(error_type, "Function.ResponseSizeTooLarge")
        }
        other => panic!("{other:?}"),
    }

    // Streamed, the same size passes (up to 200 MB), and the caller gets all of it.
    let (id, invoke) = dispatched(&emu, &addr, "streamed").await;
    let reply = call(
        &addr,
        Method::POST,
        &format!("/2018-06-01/runtime/invocation/{id}/response"),
        &[("Lambda-Runtime-Function-Response-Mode", "streaming")],
        vec![b'x'; 6 * 1024 * 1024 + 101],
    )
    .await;
    assert_eq!(reply.status, 202);
    match joined(invoke).await.outcome {
        InvokeOutcome::Success(body) => assert_eq!(body.len(), 6 * 1024 * 1024 + 101),
        other => panic!("{other:?}"),
    }

    // An invocation error reaches the caller with its type and message.
    let (id, invoke) = dispatched(&emu, &addr, "three").await;
    let reply = call(
        &addr,
        Method::POST,
        &format!("/2018-06-01/runtime/invocation/{id}/error"),
        &[("Lambda-Runtime-Function-Error-Type", "Handler.Failed")],
        r#"{"errorMessage":"boom","errorType":"Handler.Failed"}"#,
    )
    .await;
    assert_eq!(reply.status, 202);
    assert_eq!(
        joined(invoke).await.outcome,
        InvokeOutcome::FunctionError {
            error_type: "Handler.Failed".to_owned(),
            error_message: "boom".to_owned(),
        }
    );
    assert!(emu.timelines().last().is_some_and(|t| t.function_error));
}

#[tokio::test]
async fn a_runtime_init_error_fails_init() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let reply = call(
        &addr,
        Method::POST,
        INIT_ERROR,
        &[("Lambda-Runtime-Function-Error-Type", "Runtime.Broken")],
        r#"{"errorMessage":"cannot start","errorType":"Runtime.Broken"}"#,
    )
    .await;
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json(), json!({ "status": "OK" }));
    // A second one is refused: RAPID's InitError state allows no transition.
    call(&addr, Method::POST, INIT_ERROR, &[], "{}")
        .await
        .assert_error(403, "InvalidStateTransition");
    let result = within(emu.invoke("x")).await;
    assert!(
        matches!(&result.outcome, InvokeOutcome::InitError(m) if m.contains("Runtime.Broken")),
        "{result:?}"
    );
    assert_eq!(emu.stats().init_failures, 1);
    assert!(emu.timelines().is_empty());
}

// ----- the completion gate ------------------------------------------------------------------------

#[tokio::test]
async fn the_next_invocation_waits_until_every_subscriber_calls_event_next() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-gate", &["INVOKE"]).await;
    let ext = spawn_ext_next(&addr, &id);
    let runtime = spawn_runtime_next(&addr);
    let first = spawn_invoke(&emu, "one");
    let event = joined(runtime).await;
    let first_id = event.header("lambda-runtime-aws-request-id");
    assert_eq!(
        joined(ext).await.expect("event").json()["requestId"],
        first_id
    );
    assert_eq!(respond(&addr, &first_id, "r1").await.status, 202);
    assert!(joined(first).await.outcome.is_success());

    // The runtime is ready again, the extension is not: invocation 2 must be held.
    let runtime = spawn_runtime_next(&addr);
    let second = spawn_invoke(&emu, "two");
    assert!(
        !emu.wait_until(Duration::from_millis(300), |s, t| s.invocations >= 2
            || t[0].complete.is_some())
            .await,
        "invocation 2 was dispatched before the extension called event/next"
    );
    assert!(!runtime.is_finished());

    let ext = spawn_ext_next(&addr, &id);
    let event = joined(runtime).await;
    assert_eq!(&event.body[..], b"two");
    let second_id = event.header("lambda-runtime-aws-request-id");
    assert_eq!(
        joined(ext).await.expect("event").json()["requestId"],
        second_id
    );

    let timelines = emu.timelines();
    let t0 = &timelines[0];
    let ext_next = t0
        .extension_next_of("ext-gate")
        .expect("event/next recorded");
    let complete = t0.complete.expect("invocation 1 complete");
    assert!(t0.runtime_next.expect("runtime /next recorded") <= complete);
    assert!(ext_next <= complete);
    assert!(timelines[1].invoked >= complete);
    assert!(timelines[1].requested < complete);

    assert_eq!(respond(&addr, &second_id, "r2").await.status, 202);
    assert_eq!(
        joined(second).await.outcome.body(),
        Some(&Bytes::from("r2"))
    );
    assert_eq!(emu.stats().max_concurrent_event_next_per_extension, 1);
}

#[tokio::test]
async fn the_caller_gets_the_response_before_the_invocation_completes() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-slow", &["INVOKE"]).await;
    let ext = spawn_ext_next(&addr, &id);
    let (request_id, invoke) = dispatched(&emu, &addr, "payload").await;
    joined(ext).await.expect("event");
    assert_eq!(respond(&addr, &request_id, "fast").await.status, 202);
    let _runtime = spawn_runtime_next(&addr);
    let result = joined(invoke).await;
    assert_eq!(result.outcome.body(), Some(&Bytes::from("fast")));
    // The extension still works on "deferred" things: not complete, yet the caller has it.
    let timeline = &emu.timelines()[0];
    assert!(timeline.response_posted.is_some());
    assert!(timeline.complete.is_none());

    let _ext = spawn_ext_next(&addr, &id);
    assert!(emu.wait_until(SECOND, |_, t| t[0].complete.is_some()).await);
}

#[tokio::test]
async fn concurrent_invokes_are_served_one_at_a_time_in_order() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-order", &["INVOKE"]).await;
    let _ext = eager_extension(&addr, &id);
    let _runtime = echo_runtime(&addr);
    let payloads = ["a", "b", "c", "d", "e"];
    let mut handles = Vec::new();
    for payload in payloads {
        handles.push(spawn_invoke(&emu, payload));
        tokio::task::yield_now().await;
    }
    for (handle, payload) in handles.into_iter().zip(payloads) {
        assert_eq!(
            joined(handle).await.outcome.body(),
            Some(&Bytes::from(payload))
        );
    }
    let timelines = emu.timelines();
    assert_eq!(timelines.len(), 5);
    for pair in timelines.windows(2) {
        let complete = pair[0].complete.expect("complete");
        assert!(pair[1].invoked >= complete, "overlapping invocations");
    }
    assert_eq!(emu.stats().max_concurrent_event_next_per_extension, 1);
}

/// A second `event/next` while one waits is refused, as RAPID does (403
/// `Extension.InvalidExtensionState`), and counted as two calls at once (G2's check).
#[tokio::test]
async fn concurrent_event_next_calls_are_refused_and_counted() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-twice", &["INVOKE"]).await;
    let _a = spawn_ext_next(&addr, &id);
    assert!(emu.wait_until(SECOND, |s, _| s.event_next_calls == 1).await);
    let headers = [("Lambda-Extension-Identifier", id.as_str())];
    call(&addr, Method::GET, EVENT_NEXT, &headers, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    let stats = emu.stats();
    assert_eq!(stats.refused_event_next_calls, 1);
    assert_eq!(stats.max_concurrent_event_next_per_extension, 2);
    assert_eq!(stats.max_concurrent_event_next_by_extension["ext-twice"], 2);
}

// ----- timeline --------------------------------------------------------------------------------

#[tokio::test]
async fn the_timeline_records_each_phase_and_test_marks() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    assert_eq!(
        call(&addr, Method::POST, MARK, &[], "before").await.status,
        202
    );
    assert_eq!(emu.marks_outside_invocations()[0].0, "before");

    let id = register(&addr, "ext-tl", &["INVOKE"]).await;
    let ext = spawn_ext_next(&addr, &id);
    let (request_id, invoke) = dispatched(&emu, &addr, "x").await;
    joined(ext).await.expect("event");
    respond(&addr, &request_id, "y").await;
    joined(invoke).await;
    assert_eq!(
        call(&addr, Method::POST, MARK, &[], "action finished")
            .await
            .status,
        202
    );
    let _ext = spawn_ext_next(&addr, &id);
    let _runtime = spawn_runtime_next(&addr);
    assert!(emu.wait_until(SECOND, |_, t| t[0].complete.is_some()).await);
    let t = &emu.timelines()[0];
    assert_eq!(t.request_id, request_id);
    let received = t.runtime_received.expect("received");
    let posted = t.response_posted.expect("posted");
    let mark = t.mark("action finished").expect("mark");
    let ext_next = t.extension_next_of("ext-tl").expect("ext next");
    let complete = t.complete.expect("complete");
    assert!(t.invoked <= received && received <= posted);
    assert!(posted <= mark && mark <= ext_next && ext_next <= complete);
    assert_eq!(t.extension_invoke[0].0, "ext-tl");
    assert!(!t.timed_out);
    assert!(t.frozen.is_none(), "nothing to freeze in attach mode");
}

// ----- deadline --------------------------------------------------------------------------------

#[tokio::test]
async fn a_deadline_overrun_times_out_and_resets_the_environment() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(300),
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    let id = register(&addr, "ext-old", &["INVOKE"]).await;
    let _ext = spawn_ext_next(&addr, &id);
    let runtime = spawn_runtime_next(&addr);
    let invoke = spawn_invoke(&emu, "hang");
    joined(runtime).await;
    let result = joined(invoke).await;
    assert_eq!(result.outcome, InvokeOutcome::Timeout);
    assert!(
        result.latency >= Duration::from_millis(290) && result.latency < Duration::from_secs(2),
        "{:?}",
        result.latency
    );
    let stats = emu.stats();
    assert_eq!((stats.timeouts, stats.resets), (1, 1));
    assert!(emu.timelines()[0].timed_out);
    // The extension state is gone with the environment; registration is open again.
    call(
        &addr,
        Method::GET,
        EVENT_NEXT,
        &[("Lambda-Extension-Identifier", &id)],
        "",
    )
    .await
    .assert_error(403, "Extension.UnknownExtensionIdentifier");
    let id = register(&addr, "ext-new", &["INVOKE"]).await;
    let _ext = eager_extension(&addr, &id);
    let _runtime = echo_runtime(&addr);
    let result = within(emu.invoke("again")).await;
    assert_eq!(result.outcome.body(), Some(&Bytes::from("again")));
    assert_eq!(emu.stats().inits, 2);
}

/// A reset sends SHUTDOWN, with its reason, to the external extensions subscribed to it, as
/// the shutdown does (RAPID's `handleReset` runs the same shutdown sequence): on the pending
/// `event/next`, or on the next one of an extension still busy with its INVOKE.
#[tokio::test]
async fn a_reset_sends_shutdown_to_external_extensions_subscribed_to_it() {
    let config = EmulatorConfig {
        function_timeout: SECOND,
        external_extensions: vec!["ext-waiting".to_owned(), "ext-busy".to_owned()],
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    let waiting = register(&addr, "ext-waiting", &["INVOKE", "SHUTDOWN"]).await;
    let busy = register(&addr, "ext-busy", &["INVOKE", "SHUTDOWN"]).await;
    let internal = register(&addr, "ext-internal", &["INVOKE"]).await;
    let first = [
        spawn_ext_next(&addr, &waiting),
        spawn_ext_next(&addr, &busy),
        spawn_ext_next(&addr, &internal),
    ];
    let runtime = spawn_runtime_next(&addr);
    let invoke = spawn_invoke(&emu, "hang");
    joined(runtime).await;
    for call in first {
        let event = joined(call).await.expect("INVOKE event").json();
        assert_eq!(event["eventType"], "INVOKE");
    }
    let waiting_next = spawn_ext_next(&addr, &waiting);
    let internal_next = spawn_ext_next(&addr, &internal);
    assert!(emu.wait_until(SECOND, |s, _| s.event_next_calls == 5).await);
    assert_eq!(joined(invoke).await.outcome, InvokeOutcome::Timeout);
    let assert_shutdown = |event: Value| {
        assert_eq!(event["eventType"], "SHUTDOWN", "{event}");
        assert_eq!(event["shutdownReason"], "timeout", "{event}");
        assert!(event["deadlineMs"].as_u64().expect("deadlineMs") > epoch_ms());
    };
    assert_shutdown(joined(waiting_next).await.expect("SHUTDOWN event").json());
    let busy_next = call(
        &addr,
        Method::GET,
        EVENT_NEXT,
        &[("Lambda-Extension-Identifier", &busy)],
        "",
    )
    .await;
    assert_eq!(busy_next.status, 200, "{busy_next:?}");
    assert_shutdown(busy_next.json());
    // The internal extension gets nothing: its call ends with the environment.
    assert!(joined(internal_next).await.is_err());
    assert_eq!(emu.stats().resets, 1);
}

#[tokio::test]
async fn an_extension_overrunning_the_deadline_marks_the_invocation_timed_out() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(300),
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    let id = register(&addr, "ext-late", &["INVOKE"]).await;
    let _ext = spawn_ext_next(&addr, &id);
    let _runtime = echo_runtime(&addr);
    // The runtime answers at once; the extension never calls event/next again.
    let result = within(emu.invoke("x")).await;
    assert_eq!(result.outcome.body(), Some(&Bytes::from("x")));
    assert!(emu.wait_until(SECOND, |s, _| s.timeouts == 1).await);
    let t = &emu.timelines()[0];
    assert!(t.timed_out);
    assert!(t.complete.is_none());
    assert_eq!(emu.stats().resets, 1);
}

// ----- shutdown ---------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_goes_to_external_extensions_subscribed_to_it() {
    let config = EmulatorConfig {
        external_extensions: vec!["ext-external".to_owned()],
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    let external = register(&addr, "ext-external", &["SHUTDOWN"]).await;
    let internal = register(&addr, "ext-internal", &["INVOKE"]).await;
    let external_next = spawn_ext_next(&addr, &external);
    let internal_next = spawn_ext_next(&addr, &internal);
    let _runtime = spawn_runtime_next(&addr);
    assert!(emu.wait_until(SECOND, |s, _| s.inits == 1).await);
    let result = within(emu.shutdown()).await;
    assert_eq!(result.shutdown_events, vec!["ext-external".to_owned()]);
    // The runtime process (with its internal extension) gets 500 ms of the 2 s phase.
    assert_eq!(
        (result.grace, result.phase),
        (Duration::from_millis(500), Duration::from_secs(2))
    );
    assert!(result.exit_status.is_none() && !result.killed);
    let event = joined(external_next).await.expect("SHUTDOWN event").json();
    assert_eq!(event["eventType"], "SHUTDOWN");
    // RAPID's reasons are lowercase (rapi/model/agentevent.go).
    assert_eq!(event["shutdownReason"], "spindown");
    assert!(event["deadlineMs"].as_u64().expect("deadlineMs") > epoch_ms());
    // The internal extension gets nothing: its call ends with the environment.
    assert!(joined(internal_next).await.is_err());
}

// ----- faults ------------------------------------------------------------------------------------

#[tokio::test]
async fn registration_faults() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    emu.faults().once(Fault::RegisterStatus {
        status: 500,
        error_type: "Extension.Boom".to_owned(),
    });
    register_reply(&addr, "ext-f", &["INVOKE"])
        .await
        .assert_error(500, "Extension.Boom");
    emu.faults().once(Fault::RegisterClose);
    let body = json!({ "events": ["INVOKE"] }).to_string();
    let closed = try_call(
        &addr,
        Method::POST,
        REGISTER,
        &[("Lambda-Extension-Name", "ext-f")],
        body,
    )
    .await;
    assert!(closed.is_err(), "{closed:?}");
    emu.faults().always(Fault::RegisterStatus {
        status: 403,
        error_type: "Extension.Denied".to_owned(),
    });
    for _ in 0..2 {
        register_reply(&addr, "ext-f", &["INVOKE"])
            .await
            .assert_error(403, "Extension.Denied");
    }
    emu.faults().clear();
    register(&addr, "ext-f", &["INVOKE"]).await;
    assert!(emu.faults().armed().is_empty());
}

#[tokio::test]
async fn event_next_faults() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-faulty", &["INVOKE"]).await;
    let _runtime = echo_runtime(&addr);

    let pending = spawn_ext_next(&addr, &id);
    emu.faults().once(Fault::EventNextMalformedBody);
    within(emu.invoke("1")).await;
    let reply = joined(pending).await.expect("reply");
    assert_eq!(reply.status, 200);
    assert!(serde_json::from_slice::<Value>(&reply.body).is_err());

    let pending = spawn_ext_next(&addr, &id);
    emu.faults().once(Fault::EventNextUnknownEventType);
    within(emu.invoke("2")).await;
    assert_eq!(
        joined(pending).await.expect("reply").json()["eventType"],
        "UNKNOWN_EVENT"
    );

    let pending = spawn_ext_next(&addr, &id);
    emu.faults().once(Fault::EventNextWrongRequestId);
    let result = within(emu.invoke("3")).await;
    let event = joined(pending).await.expect("reply").json();
    assert_eq!(event["eventType"], "INVOKE");
    assert_ne!(event["requestId"], result.request_id);

    // A 500 loses the event, as in RAPID (the extension was released with it before the
    // answer failed): the retry is the extension's next `event/next`, so it completes the
    // invocation and waits for the next event.
    let pending = spawn_ext_next(&addr, &id);
    emu.faults().once(Fault::EventNextStatus(500));
    let result = within(emu.invoke("4")).await;
    joined(pending)
        .await
        .expect("reply")
        .assert_error(500, "InternalServerError");
    let retry = spawn_ext_next(&addr, &id);
    let lost = result.request_id.clone();
    assert!(
        emu.wait_until(SECOND, move |_, ts| ts
            .iter()
            .any(|t| t.request_id == lost && t.complete.is_some()))
            .await,
        "the retry did not complete the invocation"
    );
    assert!(!retry.is_finished(), "the retry got the lost event again");
    let next = within(emu.invoke("4b")).await;
    let event = joined(retry).await.expect("retry").json();
    assert_eq!(event["requestId"], next.request_id);

    let pending = spawn_ext_next(&addr, &id);
    emu.faults().once(Fault::EventNextCloseMidBody);
    within(emu.invoke("5")).await;
    assert!(joined(pending).await.is_err(), "the body must be cut");

    emu.faults()
        .once(Fault::ExtensionsApiDelay(Duration::from_millis(200)));
    let started = Instant::now();
    call(&addr, Method::GET, EVENT_NEXT, &[], "")
        .await
        .assert_error(403, "Extension.MissingExtensionIdentifier");
    assert!(started.elapsed() >= Duration::from_millis(200));

    // After all that, the chain still works.
    let _ext = eager_extension(&addr, &id);
    assert!(within(emu.invoke("6")).await.outcome.is_success());
    assert_eq!(emu.stats().timeouts, 0);
}

// ----- Managed Instances -------------------------------------------------------------------------

#[tokio::test]
async fn managed_instances_refuse_invoke_registration_and_run_invocations_concurrently() {
    let config = EmulatorConfig {
        managed_instances: Some(2),
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    register_reply(&addr, "ext-mi", &["INVOKE"])
        .await
        .assert_error(403, "Extension.InvalidEventType");
    let id = register(&addr, "ext-mi", &[]).await;
    let _ext = spawn_ext_next(&addr, &id);
    let first_next = spawn_runtime_next(&addr);
    let second_next = spawn_runtime_next(&addr);
    let a = spawn_invoke(&emu, "a");
    let b = spawn_invoke(&emu, "b");
    // Both are delivered before either is answered.
    let first = joined(first_next).await;
    let second = joined(second_next).await;
    for event in [&first, &second] {
        let id = event.header("lambda-runtime-aws-request-id");
        let body = if &event.body[..] == b"a" { "ra" } else { "rb" };
        assert_eq!(respond(&addr, &id, body).await.status, 202);
    }
    assert_eq!(joined(a).await.outcome.body(), Some(&Bytes::from("ra")));
    assert_eq!(joined(b).await.outcome.body(), Some(&Bytes::from("rb")));
    assert_eq!(emu.stats().freezes, 0);
}

// ----- speed -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_invocations_spend_no_time_in_the_emulator() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-fast", &["INVOKE"]).await;
    let _ext = eager_extension(&addr, &id);
    let _runtime = echo_runtime(&addr);
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(emu.invoke("x").await.outcome.is_success());
    }
    let elapsed = started.elapsed();
    // ~0.3 s in release and ~1 s in debug builds (three HTTP round trips per invocation, both
    // sides unoptimised); a sleep or poll of even 1 ms per invocation would break the bound.
    assert!(
        elapsed < Duration::from_secs(3),
        "1,000 invocations took {elapsed:?}"
    );
    let stats = emu.stats();
    assert_eq!(stats.invocations, 1000);
    assert_eq!(stats.max_concurrent_event_next_per_extension, 1);
}

// ----- child process -----------------------------------------------------------------------------

fn probe() -> FunctionSpec {
    FunctionSpec::new(PROBE)
}

/// The process state letter from /proc (`T` = stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn last_tick(logs: &[String]) -> Option<u64> {
    logs.iter()
        .rev()
        .find_map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_gets_the_lambda_environment_and_its_output_is_captured() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    within(emu.spawn_function(probe().env("PROBE_EXTRA", "extra")))
        .await
        .expect("init");
    let expected = [
        ("AWS_LAMBDA_RUNTIME_API", addr.as_str()),
        ("AWS_LAMBDA_FUNCTION_NAME", "test-function"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/test-function"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("AWS_LAMBDA_MAX_CONCURRENCY", ""),
        ("PROBE_EXTRA", "extra"),
    ];
    for (name, value) in expected {
        let payload = format!("env:{name}");
        let result = within(emu.invoke(payload)).await;
        assert_eq!(
            result.outcome.body(),
            Some(&Bytes::copy_from_slice(value.as_bytes())),
            "{name}"
        );
    }
    let stream = within(emu.invoke("env:AWS_LAMBDA_LOG_STREAM_NAME")).await;
    assert!(!stream.outcome.body().expect("stream name").is_empty());
    assert!(
        emu.function_logs()
            .iter()
            .any(|l| l.starts_with("probe started"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_instances_children_get_the_concurrency_environment() {
    let config = EmulatorConfig {
        managed_instances: Some(4),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    within(emu.spawn_function(probe())).await.expect("init");
    let kind = within(emu.invoke("env:AWS_LAMBDA_INITIALIZATION_TYPE")).await;
    assert_eq!(
        kind.outcome.body(),
        Some(&Bytes::from("lambda-managed-instances"))
    );
    let n = within(emu.invoke("env:AWS_LAMBDA_MAX_CONCURRENCY")).await;
    assert_eq!(n.outcome.body(), Some(&Bytes::from("4")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_child_is_frozen_and_thawed_on_the_next_invoke() {
    let (emu, _addr) = start(EmulatorConfig::default()).await;
    within(emu.spawn_function(probe().env("EMU_PROBE_TICK_MS", "5")))
        .await
        .expect("init");
    let pid = emu.child_pid().expect("child");
    assert!(within(emu.invoke("a")).await.outcome.is_success());
    assert!(emu.wait_until(SECOND, |_, t| t[0].frozen.is_some()).await);
    // Let a line written just before SIGSTOP drain (generously: the emulator's reader may lag
    // on a loaded machine), then the counter must stand still.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(process_state(pid), Some('T'));
    let frozen_at = last_tick(&emu.function_logs());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        last_tick(&emu.function_logs()),
        frozen_at,
        "ticked while frozen"
    );

    // The invocation keeps the child thawed for 200 ms: a quick one may be frozen again before
    // the 5 ms tick thread is scheduled, which is what made this test flaky.
    assert!(within(emu.invoke("sleep:200")).await.outcome.is_success());
    let target = frozen_at.unwrap_or(0);
    let resumed = emu
        .wait_for_log(
            |l| {
                l.strip_prefix("tick ")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > target)
            },
            Duration::from_secs(2),
        )
        .await;
    assert!(resumed.is_some(), "no tick after thaw");
    let timelines = emu.timelines();
    assert!(timelines[1].thawed.is_some());
    let stats = emu.stats();
    assert!(stats.freezes >= 2 && stats.thaws >= 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_child_and_the_next_invoke_runs_init_again() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(400),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    within(emu.spawn_function(probe())).await.expect("init");
    let first_pid = emu.child_pid().expect("child");
    let result = within(emu.invoke("hang")).await;
    assert_eq!(result.outcome, InvokeOutcome::Timeout);
    let result = within(emu.invoke("again")).await;
    assert_eq!(result.outcome.body(), Some(&Bytes::from("again")));
    let second_pid = emu.child_pid().expect("child");
    assert_ne!(first_pid, second_pid);
    assert!(!std::path::Path::new(&format!("/proc/{first_pid}")).exists());
    let stats = emu.stats();
    assert_eq!((stats.timeouts, stats.resets, stats.inits), (1, 1, 2));
    let starts = emu
        .function_logs()
        .iter()
        .filter(|l| l.starts_with("probe started"))
        .count();
    assert_eq!(starts, 2);
    assert!(emu.timelines()[0].timed_out);
}

/// A reset child that is still running during its grace (here: it ignores SIGTERM) is no
/// longer the environment's runtime: its late answer and its next `/next` go nowhere (RAPID
/// shuts the old runtime domain down, and waits for its processes to exit, before the next
/// init), and the next invoke runs init again in a new child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_childs_late_calls_do_not_count_for_the_next_environment() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(300),
        shutdown_grace: Some(Duration::from_millis(1000)),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    let stubborn = FunctionSpec::new("/bin/sh")
        .arg("-c")
        .arg(format!("trap '' TERM; exec {PROBE}"));
    within(emu.spawn_function(stubborn)).await.expect("init");
    let first_pid = emu.child_pid().expect("child");
    // Overruns its deadline, answers 200 ms later (within the grace), then asks for more.
    let result = within(emu.invoke("sleep:500")).await;
    assert_eq!(result.outcome, InvokeOutcome::Timeout);
    let result = within(emu.invoke("again")).await;
    assert_eq!(
        result.outcome.body(),
        Some(&Bytes::from("again")),
        "{result:?}"
    );
    let second_pid = emu.child_pid().expect("child");
    assert_ne!(first_pid, second_pid);
    let starts = emu
        .function_logs()
        .iter()
        .filter(|l| l.starts_with("probe started"))
        .count();
    assert_eq!(starts, 2);
    let stats = emu.stats();
    assert_eq!((stats.resets, stats.inits), (1, 2), "{stats:?}");
}

/// A reset shuts the environment down "like a Shutdown event": the runtime gets SIGTERM and
/// its grace, while its pending calls stay pending (RAPID does not answer a suspended `/next`
/// or `event/next` on a reset; the process's end closes them), so a function sees the signal,
/// not a broken connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_childs_pending_calls_stay_unanswered_during_its_grace() {
    // The extension's INVOKE comes too late: the runtime answers and waits in `/next`, the
    // invocation reaches its deadline.
    let emu = reset_with_invoke_event_late(Duration::from_secs(3)).await;
    let broken = emu
        .wait_for_log(
            |l| l.starts_with("runtime next failed") || l.starts_with("runtime next refused"),
            Duration::from_millis(800),
        )
        .await;
    assert_eq!(broken, None, "the pending /next ended during the grace");
    served_again(&emu).await;
}

/// An extension of a reset child that calls `event/next` during the grace (its deferred work
/// ended after the deadline) is not refused: RAPID keeps the reset environment's agents
/// registered until its processes are gone (`registrationService.Clear()` runs only in
/// `reinitialize`, after the shutdown), so the call of an agent in state Running is taken
/// (`InternalAgentRunningState.Ready`) and suspended, never released; only the process's end
/// closes it. A 403 would break the function's chain where Lambda holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_childs_new_event_next_stays_unanswered_during_its_grace() {
    // The INVOKE event reaches the extension 300 ms after the deadline (within the grace);
    // the probe's extension then calls `event/next` again at once.
    let emu = reset_with_invoke_event_late(Duration::from_millis(600)).await;
    let invoke = emu
        .wait_for_log(
            |l| l.starts_with("extension event 200") && l.contains("INVOKE"),
            SECOND,
        )
        .await;
    assert!(invoke.is_some(), "the delayed INVOKE event did not arrive");
    let refused = emu
        .wait_for_log(
            |l| l.starts_with("extension event ") && !l.starts_with("extension event 200"),
            Duration::from_millis(500),
        )
        .await;
    assert_eq!(refused, None, "the reset child's event/next was answered");
    served_again(&emu).await;
}

/// A child that ignores SIGTERM (so it runs out its 1.5 s grace), with an extension, on a
/// 300 ms function timeout; invoked once with the extension's INVOKE event `late`, and reset
/// when that invocation reaches its deadline.
async fn reset_with_invoke_event_late(late: Duration) -> Emulator {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(300),
        shutdown_grace: Some(Duration::from_millis(1500)),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    let stubborn = FunctionSpec::new("/bin/sh")
        .arg("-c")
        .arg(format!("trap '' TERM; exec {PROBE}"))
        .env("EMU_PROBE_EXTENSION", "probe-ext");
    within(emu.spawn_function(stubborn)).await.expect("init");
    emu.faults().once(Fault::EventNextAnswerDelay(late));
    let result = within(emu.invoke("x")).await;
    assert_eq!(result.outcome.body(), Some(&Bytes::from("x")));
    assert!(emu.wait_until(SECOND, |s, _| s.timeouts == 1).await);
    emu
}

/// The next invocation is served, by a new child once the reset one has gone.
async fn served_again(emu: &Emulator) {
    let result = within(emu.invoke("again")).await;
    assert_eq!(
        result.outcome.body(),
        Some(&Bytes::from("again")),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_child_fails_the_invocation_and_is_restarted() {
    let (emu, _addr) = start(EmulatorConfig::default()).await;
    within(emu.spawn_function(probe())).await.expect("init");
    match within(emu.invoke("crash")).await.outcome {
        InvokeOutcome::FunctionError { error_type, .. } => {
            assert_eq!(error_type, "Runtime.ExitError")
        }
        other => panic!("{other:?}"),
    }
    assert!(within(emu.invoke("fine")).await.outcome.is_success());
    assert_eq!(emu.stats().resets, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_function_reports_init_errors_and_init_timeouts() {
    let (emu, _addr) = start(EmulatorConfig::default()).await;
    let error = within(emu.spawn_function(probe().env("EMU_PROBE_INIT_ERROR", "1")))
        .await
        .expect_err("init error");
    assert!(
        error.to_string().contains("Runtime.ProbeInitError"),
        "{error}"
    );
    assert_eq!(emu.stats().init_failures, 1);

    let config = EmulatorConfig {
        init_timeout: Duration::from_millis(300),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    let silent = FunctionSpec::new("/bin/sh").arg("-c").arg("sleep 5");
    let started = Instant::now();
    let error = within(emu.spawn_function(silent))
        .await
        .expect_err("init timeout");
    assert!(error.to_string().contains("timed out"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_with_an_internal_extension_is_gated_and_terminated_gracefully() {
    let (emu, _addr) = start(EmulatorConfig::default()).await;
    within(emu.spawn_function(probe().env("EMU_PROBE_EXTENSION", "probe-ext")))
        .await
        .expect("init");
    assert_eq!(emu.extensions(), vec!["probe-ext".to_owned()]);
    assert!(within(emu.invoke("one")).await.outcome.is_success());
    assert!(within(emu.invoke("two")).await.outcome.is_success());
    let timelines = emu.timelines();
    assert!(timelines[0].extension_next_of("probe-ext").is_some());
    assert!(timelines[1].invoked >= timelines[0].complete.expect("complete"));
    // Frozen now; shutdown thaws, SIGTERMs, and the probe dies of it within 500 ms.
    let result = within(emu.shutdown()).await;
    assert_eq!(result.grace, Duration::from_millis(500));
    assert!(!result.killed, "{result:?}");
    assert_eq!(result.exit_status.and_then(|s| s.signal()), Some(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let config = EmulatorConfig {
        shutdown_grace: Some(Duration::from_millis(200)),
        ..EmulatorConfig::default()
    };
    let (emu, _addr) = start(config).await;
    // An ignored signal stays ignored across exec.
    let stubborn = FunctionSpec::new("/bin/sh")
        .arg("-c")
        .arg(format!("trap '' TERM; exec {PROBE}"));
    within(emu.spawn_function(stubborn)).await.expect("init");
    let result = within(emu.shutdown()).await;
    assert!(result.killed, "{result:?}");
    assert_eq!(result.exit_status.and_then(|s| s.signal()), Some(9));
    assert!(result.duration >= Duration::from_millis(200));
}

/// RAPID's rule for the runtime's `/next` whose client went away: the call stays suspended
/// (aws-lambda-runtime-interface-emulator, `core/states.go`: `Ready()` suspends the runtime's
/// goroutine until the invoke releases it, and nothing watches the connection), so the next
/// invocation is written to the dead call and lost. A call re-issued before that waits behind
/// it (state Ready: `RuntimeReadyState.Ready` suspends too) and gets nothing: the invocation
/// times out. A call made once the event is out (state Running) gets it again.
#[tokio::test]
async fn a_runtime_next_dropped_by_its_client_stays_pending_and_takes_the_next_event() {
    let config = EmulatorConfig {
        function_timeout: Duration::from_millis(400),
        ..EmulatorConfig::default()
    };
    let (emu, addr) = start(config).await;
    let abandoned = spawn_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.runtime_next_calls == 1 && s.inits == 1)
            .await
    );
    drop_pending(&emu, abandoned).await;
    // Re-issued: not refused, it waits behind the dead call.
    let retry = spawn_try_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.runtime_next_calls == 2)
            .await
    );
    let result = joined(spawn_invoke(&emu, "lost")).await;
    assert_eq!(result.outcome, InvokeOutcome::Timeout, "{result:?}");
    let t = &emu.timelines()[0];
    assert!(
        t.runtime_lost.is_some() && t.runtime_received.is_none(),
        "{t:?}"
    );
    let stats = emu.stats();
    assert_eq!(
        (stats.lost_runtime_events, stats.resets),
        (1, 1),
        "{stats:?}"
    );
    // The reset ends the re-issued call without an answer.
    assert!(joined(retry).await.is_err());

    // Again, with a call made after the dispatch: Running allows it, and it gets the event.
    let abandoned = spawn_runtime_next(&addr);
    assert!(emu.wait_until(SECOND, |s, _| s.inits == 2).await);
    abandoned.abort();
    let _ = abandoned.await;
    assert!(
        emu.wait_until(SECOND, |s, _| s.abandoned_next_calls == 2)
            .await
    );
    let invoke = spawn_invoke(&emu, "again");
    assert!(
        emu.wait_until(SECOND, |s, _| s.lost_runtime_events == 2)
            .await
    );
    let event = joined(spawn_runtime_next(&addr)).await;
    assert_eq!(&event.body[..], b"again");
    let id = event.header("lambda-runtime-aws-request-id");
    assert_eq!(id, emu.timelines()[1].request_id);
    assert_eq!(respond(&addr, &id, "ok").await.status, 202);
    assert!(joined(invoke).await.outcome.is_success());
}

/// Two `/next` calls at once are not refused: RAPID suspends both (`RuntimeReadyState.Ready`)
/// and each invoke releases the oldest one, so the second call gets the next invocation.
#[tokio::test]
async fn concurrent_runtime_next_calls_are_served_oldest_first() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let first = spawn_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.runtime_next_calls == 1)
            .await
    );
    let second = spawn_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.runtime_next_calls == 2)
            .await
    );
    let invoke = spawn_invoke(&emu, "one");
    let event = joined(first).await;
    assert_eq!(&event.body[..], b"one");
    let id = event.header("lambda-runtime-aws-request-id");
    assert_eq!(respond(&addr, &id, "r1").await.status, 202);
    assert!(joined(invoke).await.outcome.is_success());
    assert!(!second.is_finished(), "answered without an invocation");

    let third = spawn_runtime_next(&addr);
    assert!(emu.wait_until(SECOND, |_, t| t[0].complete.is_some()).await);
    let invoke = spawn_invoke(&emu, "two");
    let event = joined(second).await;
    assert_eq!(event.status, 200, "{event:?}");
    assert_eq!(&event.body[..], b"two");
    let id = event.header("lambda-runtime-aws-request-id");
    assert_eq!(respond(&addr, &id, "r2").await.status, 202);
    assert!(joined(invoke).await.outcome.is_success());
    assert!(
        !third.is_finished(),
        "the third call waits for invocation 3"
    );
}

/// RAPID's rule for an extension's `event/next` whose client went away: the extension stays
/// Ready (aws-lambda-runtime-interface-emulator, `core/internalagent_states.go`: `Ready()`
/// suspends the agent until the next invoke; `rapi/handler/agentnext.go`), so a re-issued call
/// is refused (403 `Extension.InvalidExtensionState`), the next INVOKE event is written to the
/// dead call and lost (`rapid/handlers.go`, `doInvoke`: `agent.Release()`), and only then is a
/// call accepted; that call ends the invocation for the extension, and the next event is its.
#[tokio::test]
async fn an_event_next_dropped_by_its_client_stays_pending_and_takes_the_next_event() {
    let (emu, addr) = start(EmulatorConfig::default()).await;
    let id = register(&addr, "ext-dropped", &["INVOKE"]).await;
    let abandoned = spawn_ext_next(&addr, &id);
    let runtime = spawn_runtime_next(&addr);
    assert!(
        emu.wait_until(SECOND, |s, _| s.event_next_calls == 1 && s.inits == 1)
            .await
    );
    drop_pending(&emu, abandoned).await;

    // Still Ready: the re-issued call is refused, and not counted as two calls at once (the
    // client has one).
    let headers = [("Lambda-Extension-Identifier", id.as_str())];
    call(&addr, Method::GET, EVENT_NEXT, &headers, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    assert_eq!(emu.stats().refused_event_next_calls, 1);

    // The INVOKE event goes to the dropped call: lost.
    let first = spawn_invoke(&emu, "one");
    let event = joined(runtime).await;
    let first_id = event.header("lambda-runtime-aws-request-id");
    let stats = emu.stats();
    assert_eq!(stats.lost_extension_events, 1, "{stats:?}");
    let t = &emu.timelines()[0];
    assert!(t.extension_invoke.is_empty(), "{t:?}");
    assert_eq!(t.extension_lost.len(), 1, "{t:?}");

    // Running now: the next call is accepted, and it is what ends invocation 1 for the
    // extension (the runtime answers and asks for the next one first: not complete before).
    respond(&addr, &first_id, "r1").await;
    assert!(joined(first).await.outcome.is_success());
    let runtime = spawn_runtime_next(&addr);
    assert!(
        !emu.wait_until(Duration::from_millis(200), |_, t| t[0].complete.is_some())
            .await,
        "complete while the extension had not called event/next since the lost event"
    );
    let accepted = spawn_ext_next(&addr, &id);
    assert!(
        emu.wait_until(SECOND, |_, t| t[0].complete.is_some()).await,
        "the accepted call ends invocation 1"
    );
    let t = &emu.timelines()[0];
    assert!(t.extension_next_of("ext-dropped").is_some(), "{t:?}");

    // And it receives invocation 2's event.
    let second = spawn_invoke(&emu, "two");
    let event = joined(runtime).await;
    let second_id = event.header("lambda-runtime-aws-request-id");
    let received = joined(accepted).await.expect("the accepted call").json();
    assert_eq!(received["requestId"], second_id.as_str());
    let _ext = eager_extension(&addr, &id);
    respond(&addr, &second_id, "r2").await;
    assert!(joined(second).await.outcome.is_success());
    let stats = emu.stats();
    // Accepted: the dropped one, the one after the lost event, the eager extension's first.
    assert_eq!(stats.event_next_calls, 3, "{stats:?}");
    assert_eq!(
        stats.max_concurrent_event_next_per_extension, 1,
        "{stats:?}"
    );
}

// ----- SnapStart ---------------------------------------------------------------------------------

const RESTORE_NEXT: &str = "/2018-06-01/runtime/restore/next";
const RESTORE_ERROR: &str = "/2018-06-01/runtime/restore/error";

fn snap_start(connections: RestoredConnections) -> EmulatorConfig {
    EmulatorConfig {
        snap_start: true,
        restored_connections: connections,
        ..EmulatorConfig::default()
    }
}

fn spawn_restore_next(addr: &str) -> JoinHandle<Result<Reply, String>> {
    let addr = addr.to_owned();
    tokio::spawn(async move { try_call(&addr, Method::GET, RESTORE_NEXT, &[], "").await })
}

/// Init ends with the runtime in `/restore/next` and the extension in `event/next`: the
/// snapshot. Until the restore, Lambda's state rules hold (registration closed, no
/// `/invocation/next` from a runtime waiting in `/restore/next`, no second `event/next`, no
/// `/restore/error`); the first invoke restores: `/restore/next` is answered (200, empty), the
/// restore phase ends with the runtime's `/invocation/next`, and the pre-snapshot `event/next`
/// (connections survive by default) receives the INVOKE event.
#[tokio::test]
async fn snap_start_init_ends_in_a_snapshot_and_the_first_invoke_restores_it() {
    let (emu, addr) = start(snap_start(RestoredConnections::Survive)).await;
    let id = register(&addr, "ext-snap", &["INVOKE"]).await;
    let old_next = spawn_ext_next(&addr, &id);
    let restore_next = spawn_restore_next(&addr);
    assert!(emu.wait_until(SECOND, |s, _| s.snapshots == 1).await);
    assert_eq!(emu.stats().inits, 1);

    register_reply(&addr, "ext-late", &["INVOKE"])
        .await
        .assert_error(403, "Extension.RegistrationClosed");
    call(&addr, Method::GET, NEXT, &[], "")
        .await
        .assert_error(403, "InvalidStateTransition");
    let headers = [("Lambda-Extension-Identifier", id.as_str())];
    call(&addr, Method::GET, EVENT_NEXT, &headers, "")
        .await
        .assert_error(403, "Extension.InvalidExtensionState");
    assert_eq!(emu.stats().refused_event_next_calls, 1);
    call(&addr, Method::POST, RESTORE_ERROR, &[], "{}")
        .await
        .assert_error(403, "InvalidStateTransition");
    assert!(!restore_next.is_finished(), "answered before the restore");
    assert!(emu.restores().is_empty());

    let invoke = spawn_invoke(&emu, "after");
    let restored = joined(restore_next).await.expect("restore/next answered");
    assert_eq!(restored.status, 200, "{restored:?}");
    assert!(restored.body.is_empty());
    let event = joined(spawn_runtime_next(&addr)).await;
    assert_eq!(&event.body[..], b"after");
    let request_id = event.header("lambda-runtime-aws-request-id");
    let invoke_event = joined(old_next)
        .await
        .expect("the pre-snapshot call")
        .json();
    assert_eq!(invoke_event["requestId"], request_id.as_str());
    let _ext = eager_extension(&addr, &id);
    respond(&addr, &request_id, "done").await;
    assert_eq!(
        joined(invoke).await.outcome.body(),
        Some(&Bytes::from("done"))
    );

    let restores = emu.restores();
    assert_eq!(restores.len(), 1);
    let record = &restores[0];
    assert!(record.snapshot <= record.restored);
    let ready = record.runtime_ready.expect("the restore phase ended");
    assert!(ready >= record.restored && ready <= emu.timelines()[0].invoked);
    assert!(record.cut_calls.is_empty());
    assert_eq!(
        record.refused_event_next.len(),
        0,
        "refused before the restore"
    );
    assert_eq!(emu.stats().restores, 1);
    // The restore is over: a second /restore/next is a state error.
    call(&addr, Method::GET, RESTORE_NEXT, &[], "")
        .await
        .assert_error(403, "InvalidStateTransition");
}

/// `Close` and `Blackhole`: every connection open at the snapshot, pending calls and idle
/// keep-alive ones, is closed or goes silent at the restore; the runtime's `/restore/next` is
/// answered all the same. As in RAPID, the extension whose pending `event/next` was cut is
/// still Ready: a fresh call is refused (403) until the first INVOKE event has been written to
/// the cut call, and lost; the fresh call after that is accepted and ends the invocation for
/// the extension.
#[tokio::test]
async fn a_restore_closes_or_silences_the_connections_open_at_the_snapshot() {
    for connections in [RestoredConnections::Close, RestoredConnections::Blackhole] {
        let (emu, addr) = start(snap_start(connections)).await;
        let id = register(&addr, "ext-cut", &["INVOKE"]).await;
        let mut idle = Conn::open(&addr).await.expect("connect");
        assert_eq!(
            idle.send(Method::POST, MARK, &[], "warm")
                .await
                .expect("mark")
                .status,
            202
        );
        let old_next = spawn_ext_next(&addr, &id);
        let restore_next = spawn_restore_next(&addr);
        assert!(emu.wait_until(SECOND, |s, _| s.snapshots == 1).await);

        let invoke = spawn_invoke(&emu, "cut");
        let restored = joined(restore_next).await.expect("restore/next answered");
        assert_eq!(restored.status, 200, "{connections:?}");
        match connections {
            RestoredConnections::Close => {
                assert!(joined(old_next).await.is_err(), "the pending call fails");
                let reused = within(idle.send(Method::POST, MARK, &[], "again")).await;
                assert!(reused.is_err(), "the idle connection is closed: {reused:?}");
            }
            _ => {
                let silent = tokio::time::timeout(Duration::from_millis(300), old_next).await;
                assert!(
                    silent.is_err(),
                    "the pending call is neither answered nor closed"
                );
                let reused = tokio::time::timeout(
                    Duration::from_millis(300),
                    idle.send(Method::POST, MARK, &[], "again"),
                )
                .await;
                assert!(
                    reused.is_err(),
                    "a request on an idle connection goes nowhere"
                );
            }
        }
        // Before the first invoke is dispatched, the cut call still counts: refused.
        let headers = [("Lambda-Extension-Identifier", id.as_str())];
        call(&addr, Method::GET, EVENT_NEXT, &headers, "")
            .await
            .assert_error(403, "Extension.InvalidExtensionState");
        let event = joined(spawn_runtime_next(&addr)).await;
        let request_id = event.header("lambda-runtime-aws-request-id");
        // Dispatched: the INVOKE event went to the cut call; a fresh call is accepted now and
        // waits for the next event.
        let fresh = spawn_ext_next(&addr, &id);
        respond(&addr, &request_id, "ok").await;
        assert!(joined(invoke).await.outcome.is_success(), "{connections:?}");
        let _runtime = spawn_runtime_next(&addr);
        assert!(
            emu.wait_until(SECOND, |_, t| t[0].complete.is_some()).await,
            "{connections:?}: the fresh call ends the invocation for the extension"
        );
        let t = &emu.timelines()[0];
        assert!(t.extension_invoke.is_empty(), "{t:?}");
        assert_eq!(t.extension_lost.len(), 1, "{t:?}");
        assert!(t.extension_next_of("ext-cut").is_some(), "{t:?}");
        assert!(
            !fresh.is_finished(),
            "the fresh call waits for the next event"
        );

        let record = &emu.restores()[0];
        assert_eq!(record.cut_calls, vec!["event/next ext-cut".to_owned()]);
        assert_eq!(record.refused_event_next.len(), 1, "{record:?}");
        let stats = emu.stats();
        assert_eq!(stats.lost_extension_events, 1, "{stats:?}");
        assert_eq!(
            stats.max_concurrent_event_next_per_extension, 1,
            "{stats:?}"
        );
        assert_eq!(
            stats.abandoned_next_calls, 0,
            "cut calls are not abandoned ones"
        );
    }
}

/// `/restore/error` between the answer to `/restore/next` and the runtime's first
/// `/invocation/next` fails the restore: the waiting invoke gets the error, and the next one
/// runs init again.
#[tokio::test]
async fn a_restore_error_fails_the_restore() {
    let (emu, addr) = start(snap_start(RestoredConnections::Survive)).await;
    let restore_next = spawn_restore_next(&addr);
    assert!(emu.wait_until(SECOND, |s, _| s.snapshots == 1).await);
    let invoke = spawn_invoke(&emu, "never");
    assert_eq!(joined(restore_next).await.expect("answered").status, 200);
    let reply = call(
        &addr,
        Method::POST,
        RESTORE_ERROR,
        &[(
            "Lambda-Runtime-Function-Error-Type",
            "Runtime.AfterRestoreError",
        )],
        r#"{"errorMessage":"hook failed","errorType":"Runtime.AfterRestoreError"}"#,
    )
    .await;
    assert_eq!(reply.status, 202, "{reply:?}");
    match joined(invoke).await.outcome {
        InvokeOutcome::InitError(message) => {
            assert!(message.contains("Runtime.AfterRestoreError"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let record = &emu.restores()[0];
    assert!(
        record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("hook failed"))
    );
    assert!(record.runtime_ready.is_none());
    assert_eq!(emu.stats().init_failures, 1);
}

/// Outside SnapStart the restore routes do not exist (RAPID's router registers them for
/// SnapStart only).
#[tokio::test]
async fn restore_routes_are_unknown_outside_snap_start() {
    let (_emu, addr) = start(EmulatorConfig::default()).await;
    assert_not_found(&call(&addr, Method::GET, RESTORE_NEXT, &[], "").await);
    assert_not_found(&call(&addr, Method::POST, RESTORE_NEXT, &[], "").await);
    assert_not_found(&call(&addr, Method::POST, RESTORE_ERROR, &[], "{}").await);
}

/// A child under SnapStart gets `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start` and stays frozen
/// from the snapshot to the restore. The probe ignores SnapStart (it goes straight to
/// `/invocation/next`): the restore then has nothing to answer and its pending `/next` gets
/// the invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snap_start_child_is_frozen_from_the_snapshot_to_the_restore() {
    let (emu, _addr) = start(snap_start(RestoredConnections::Survive)).await;
    within(emu.spawn_function(probe())).await.expect("init");
    let pid = emu.child_pid().expect("child");
    assert_eq!(emu.stats().snapshots, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(process_state(pid), Some('T'), "frozen by the snapshot");
    within(emu.restore()).await.expect("restored");
    let record = &emu.restores()[0];
    assert_eq!(record.runtime_ready, Some(record.restored));
    let kind = within(emu.invoke("env:AWS_LAMBDA_INITIALIZATION_TYPE")).await;
    assert_eq!(kind.outcome.body(), Some(&Bytes::from("snap-start")));
    assert_eq!(emu.stats().restores, 1, "one restore per snapshot");
}
