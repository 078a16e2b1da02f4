//! The HTTP side: accept loop, routing, and Lambda-shaped JSON answers.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use super::extensions_api;
use super::runtime_api;
use super::state::{ApiError, ExtensionErrorKind, Shared};

/// The response body type of every handler.
pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// Returning `Err` from a handler makes hyper drop the connection without an answer (used when
/// the environment was reset under a waiting call, and by the "close" faults).
pub(crate) type HandlerResult = Result<Response<Body>, io::Error>;

const RUNTIME: &str = "/2018-06-01/runtime";
const EXTENSION: &str = "/2020-01-01/extension";

/// The methods chi routes (`methodMap` in go-chi/chi mux.go); any other gets a 405.
const CHI_METHODS: [Method; 9] = [
    Method::CONNECT,
    Method::DELETE,
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::PATCH,
    Method::POST,
    Method::PUT,
    Method::TRACE,
];

/// Accepts connections until the task is aborted (when the last `Emulator` handle drops).
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = Arc::new(ConnTag::new(shared.restore_epoch()));
            let service = service_fn({
                let (shared, conn) = (shared.clone(), conn.clone());
                move |req| {
                    let (shared, conn) = (shared.clone(), conn.clone());
                    async move { route_cut(&shared, &conn, req).await }
                }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                cut = shared.cut(&conn) => {
                    if let Cut::Blackhole(generation) = cut {
                        // No longer polled: nothing is read or written, the socket stays open
                        // until the environment is gone.
                        shared.generation_ended(generation).await;
                    }
                    // Dropping the connection closes its socket.
                }
            }
        });
    }
}

/// A connection, as a SnapStart restore sees it.
#[derive(Debug)]
pub(crate) struct ConnTag {
    /// The restore epoch it was accepted in ([`Shared::restore_epoch`]).
    pub(crate) epoch: u64,
    /// It carried the runtime's `/restore/next`, which the restore answers.
    survives: AtomicBool,
}

impl ConnTag {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            survives: AtomicBool::new(false),
        }
    }

    pub(crate) fn survive(&self) {
        self.survives.store(true, Ordering::SeqCst);
    }

    pub(crate) fn survives(&self) -> bool {
        self.survives.load(Ordering::SeqCst)
    }
}

/// How a restore ended a connection open at the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Closed: the client sees the connection end.
    Close,
    /// Silent for good (until this environment generation ends).
    Blackhole(u64),
}

/// [`route`], unless a SnapStart restore cut the connection: then a request on it (or one
/// that was pending at the restore) is never answered (`Blackhole`) or the connection closes
/// (`Close`).
async fn route_cut(
    shared: &Arc<Shared>,
    conn: &Arc<ConnTag>,
    req: Request<Incoming>,
) -> HandlerResult {
    if let Some(cut) = shared.is_cut(conn) {
        return dead(shared, cut).await;
    }
    let result = route(shared, conn, req).await;
    match shared.is_cut(conn) {
        Some(cut) => dead(shared, cut).await,
        None => result,
    }
}

async fn dead(shared: &Shared, cut: Cut) -> HandlerResult {
    if let Cut::Blackhole(generation) = cut {
        shared.generation_ended(generation).await;
    }
    Err(io::Error::other("connection cut by the SnapStart restore"))
}

/// Routes as RAPID's routers do (aws-lambda-runtime-interface-emulator, lambda/rapi/server.go
/// and router.go: chi routers mounted under the API versions): a method chi does not know is a
/// 405 whatever the path, a path with no route a 404, a route without this method a 405; both
/// are chi's plain default answers (see [`not_found`]), not Lambda's JSON error document.
async fn route(shared: &Arc<Shared>, conn: &ConnTag, req: Request<Incoming>) -> HandlerResult {
    let method = req.method().clone();
    if !CHI_METHODS.contains(&method) {
        return Ok(method_not_allowed(&[]));
    }
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix(RUNTIME) {
        // The restore routes exist only under SnapStart (router.go registers them for
        // `appctx.InitCaching` only): elsewhere they are unknown paths.
        let snap_start = shared.config.snap_start;
        return match (rest, &method) {
            ("/invocation/next", &Method::GET) => runtime_api::next(shared).await,
            ("/init/error", &Method::POST) => runtime_api::init_error(shared, req).await,
            ("/restore/next", &Method::GET) if snap_start => {
                runtime_api::restore_next(shared, conn).await
            }
            ("/restore/error", &Method::POST) if snap_start => {
                runtime_api::restore_error(shared, req).await
            }
            ("/invocation/next", _) => Ok(method_not_allowed(&[Method::GET])),
            ("/restore/next", _) if snap_start => Ok(method_not_allowed(&[Method::GET])),
            ("/init/error", _) => Ok(method_not_allowed(&[Method::POST])),
            ("/restore/error", _) if snap_start => Ok(method_not_allowed(&[Method::POST])),
            _ => match invocation_path(rest) {
                Some((id, "response")) if method == Method::POST => {
                    runtime_api::response(shared, &id, req).await
                }
                Some((id, "error")) if method == Method::POST => {
                    runtime_api::error(shared, &id, req).await
                }
                Some((_, "response" | "error")) => Ok(method_not_allowed(&[Method::POST])),
                _ => Ok(not_found()),
            },
        };
    }
    if let Some(rest) = path.strip_prefix(EXTENSION) {
        return match (rest, &method) {
            ("/register", &Method::POST) => extensions_api::register(shared, req).await,
            ("/event/next", &Method::GET) => extensions_api::next(shared, req).await,
            ("/init/error", &Method::POST) => {
                extensions_api::error(shared, req, ExtensionErrorKind::Init).await
            }
            ("/exit/error", &Method::POST) => {
                extensions_api::error(shared, req, ExtensionErrorKind::Exit).await
            }
            ("/event/next", _) => Ok(method_not_allowed(&[Method::GET])),
            ("/register" | "/init/error" | "/exit/error", _) => {
                Ok(method_not_allowed(&[Method::POST]))
            }
            _ => Ok(not_found()),
        };
    }
    match (path.as_str(), &method) {
        ("/__testkit/mark", &Method::POST) => mark(shared, req).await,
        ("/__testkit/mark", _) => Ok(method_not_allowed(&[Method::POST])),
        _ => Ok(not_found()),
    }
}

/// `/invocation/{id}/{action}` -> (id, action).
fn invocation_path(rest: &str) -> Option<(String, &str)> {
    let (id, action) = rest.strip_prefix("/invocation/")?.split_once('/')?;
    (!id.is_empty() && !action.contains('/')).then(|| (id.to_owned(), action))
}

/// `POST /__testkit/mark`: a test-only endpoint; the body (text) is recorded with its arrival
/// time on the current invocation's timeline (or the one named by
/// `Lambda-Runtime-Aws-Request-Id`).
async fn mark(shared: &Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let request_id = header_str(req.headers(), "lambda-runtime-aws-request-id").map(str::to_owned);
    let body = match read_body(req, 1024 * 1024).await? {
        Ok(body) => body,
        Err(_) => {
            return Ok(error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                "Mark too large",
            )));
        }
    };
    shared.mark(
        String::from_utf8_lossy(&body).into_owned(),
        request_id.as_deref(),
    );
    Ok(accepted())
}

// ----- helpers used by the API modules -----------------------------------------------------------

/// Reads the request body up to `limit` bytes. The outer error is a transport failure (drop
/// the connection); the inner one means "too large", with the size when known.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
) -> io::Result<Result<Bytes, Option<usize>>> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(Err(declared)),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// A header as UTF-8 text, if present and valid.
pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A response with `status`, a JSON content type, and `body`.
pub(crate) fn respond(status: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn json_response(status: u16, value: &serde_json::Value) -> Response<Body> {
    respond(status, full(value.to_string()))
}

/// Sets a header whose value comes from our own data (never fails for ASCII ids).
pub(crate) fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), value);
    }
}

/// Lambda's error answer: `{"errorMessage","errorType"}`.
pub(crate) fn error(err: &ApiError) -> Response<Body> {
    json_response(
        err.status,
        &json!({ "errorMessage": err.message, "errorType": err.error_type }),
    )
}

/// 202 `{"status":"OK"}` (RIE `RenderAccepted`).
fn accepted() -> Response<Body> {
    json_response(202, &json!({ "status": "OK" }))
}

/// 202 when the state change was taken, else its error.
pub(crate) fn accepted_or(result: Result<(), ApiError>) -> Response<Body> {
    match result {
        Ok(()) => accepted(),
        Err(e) => error(&e),
    }
}

/// chi's default 404 (`http.NotFound`): plain text, `X-Content-Type-Options: nosniff`
/// (router_test.go, `Test404PageNotFound`: the body is `404 page not found\n`).
fn not_found() -> Response<Body> {
    let mut response = Response::new(full("404 page not found\n"));
    *response.status_mut() = StatusCode::NOT_FOUND;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// chi's default 405 (`methodNotAllowedHandler`): an empty body and an `Allow` header per
/// method the route has (none for a method chi does not know).
fn method_not_allowed(allowed: &[Method]) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    for method in allowed {
        if let Ok(value) = HeaderValue::from_str(method.as_str()) {
            response.headers_mut().append(ALLOW, value);
        }
    }
    response
}

/// A body that declares its full length, sends the first half, then fails: hyper then closes
/// the connection mid-body (the `EventNextCloseMidBody` fault). The failure waits a moment
/// after the first half: failing at once, hyper closes the connection before it has written
/// the head, and the client sees a close without any answer instead.
#[derive(Debug)]
pub(crate) struct Truncated {
    first: Option<Bytes>,
    total: u64,
    fail_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Truncated {
    pub(crate) fn new(full: Bytes) -> Self {
        let total = full.len() as u64;
        Self {
            first: Some(full.slice(..full.len() / 2)),
            total,
            fail_at: None,
        }
    }
}

impl HttpBody for Truncated {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        // Pending for a moment, so that hyper flushes what it has.
        let fail_at = self
            .fail_at
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
        if std::future::Future::poll(fail_at.as_mut(), cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Some(Err(io::Error::other(
            "injected fault: connection closed mid-body",
        ))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total)
    }
}
