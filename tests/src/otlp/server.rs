//! The HTTP side of the sink: a hyper 1 HTTP/1.1 server on its own thread and runtime, and
//! the request handler that applies the current behaviour.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::behaviour::{Reply, Scheduler};
use super::decode::{self, GARBAGE, Signal};
use super::store::{Outcome, Store};

/// The largest request body the sink reads (the exporters' default limit is far below).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The state the server and every [`OtlpSink`](super::OtlpSink) handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) scheduler: Scheduler,
}

/// Stops the server when dropped: the server thread then drops its runtime, which closes
/// the listener and every connection (stalled ones included).
#[derive(Debug)]
pub(crate) struct ServerGuard {
    _stop: oneshot::Sender<()>,
}

/// Binds 127.0.0.1 on an ephemeral port and serves on a new thread with its own
/// current-thread runtime, so the sink keeps answering even if the caller's runtime is
/// blocked (by a synchronous `force_flush`, say).
pub(crate) fn spawn(shared: Arc<Shared>) -> std::io::Result<(SocketAddr, ServerGuard)> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("otlp-sink-{}", addr.port()))
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, "otlp sink: cannot register the listener");
                        return;
                    }
                };
                tokio::select! {
                    // Resolves (with an error) when the guard is dropped.
                    _ = stopped => {}
                    () = accept_loop(listener, shared) => {}
                }
            });
            // Dropping the runtime here cancels every connection task.
        })?;
    Ok((addr, ServerGuard { _stop: stop }))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Typically EMFILE under a heavy benchmark: back off a little, keep serving.
                tracing::warn!(%error, "otlp sink: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, Arc::clone(&shared)));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                // Refused and released stalls end here on purpose; clients going away too.
                tracing::debug!(%error, "otlp sink: connection closed");
            }
        });
    }
}

/// The error a handler returns to make hyper close the connection without an answer.
#[derive(Debug)]
pub(crate) struct Unanswered;

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed without an answer, as the sink's behaviour asks")
    }
}

impl std::error::Error for Unanswered {}

type Answer = Result<Response<Full<Bytes>>, Unanswered>;

async fn handle(request: Request<Incoming>, shared: Arc<Shared>) -> Answer {
    let store = &shared.store;
    store.count_received();
    if shared.scheduler.refuses() {
        store.count(Outcome::Refused);
        return Err(Unanswered);
    }
    let Some(signal) = Signal::from_path(request.uri().path()) else {
        return Ok(reject(store, StatusCode::NOT_FOUND, "unknown path"));
    };
    if request.method() != Method::POST {
        let mut answer = reject(store, StatusCode::METHOD_NOT_ALLOWED, "POST only");
        answer
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return Ok(answer);
    }
    if let Some(problem) = unsupported_headers(&request) {
        return Ok(reject(store, StatusCode::UNSUPPORTED_MEDIA_TYPE, problem));
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Ok(reject(
                store,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large",
            ));
        }
        Err(_) => return Ok(reject(store, StatusCode::BAD_REQUEST, "body read failed")),
    };
    let received_at = Instant::now();
    let batch = match decode::decode(signal, &body, received_at) {
        Ok(batch) => batch,
        Err(error) => {
            let message = format!("malformed protobuf body: {error}");
            return Ok(reject(store, StatusCode::BAD_REQUEST, &message));
        }
    };

    let (reply, mut changes) = shared.scheduler.next();
    match reply {
        Reply::Answer(delay) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            store.record(batch, Outcome::Accepted);
            Ok(success(signal))
        }
        Reply::Hold(hold) => {
            store.count(Outcome::Held);
            tokio::time::sleep(hold).await;
            store.record(batch, Outcome::Accepted);
            Ok(success(signal))
        }
        Reply::Stall => {
            store.count(Outcome::Stalled);
            // Ends on a behaviour change, or never if the sink is dropped first (the runtime
            // is then dropped with this future).
            let _ = changes.changed().await;
            Err(Unanswered)
        }
        Reply::Fail(status) => {
            store.count(Outcome::Failed);
            Ok(error(status_code(status), "failing on purpose"))
        }
        Reply::FailAfter(status, delay) => {
            tokio::time::sleep(delay).await;
            store.count(Outcome::Failed);
            Ok(error(status_code(status), "failing on purpose, late"))
        }
        Reply::Throttle(status, seconds) => {
            store.count(Outcome::Failed);
            let mut answer = error(status_code(status), "throttled on purpose");
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
            Ok(answer)
        }
        Reply::PartialSuccess => {
            store.count(Outcome::Partial);
            Ok(protobuf(Bytes::from(signal.partial_success_body(&batch))))
        }
        Reply::Garbage => {
            store.record(batch, Outcome::Garbage);
            Ok(protobuf(Bytes::from_static(GARBAGE)))
        }
        Reply::Refuse => {
            store.count(Outcome::Refused);
            Err(Unanswered)
        }
    }
}

/// Why the request's headers rule it out, if they do: a content type other than protobuf
/// (OTLP/JSON is not supported), none at all (a collector tells the encoding by it: the
/// OpenTelemetry Collector answers 415 there too), or any content encoding
/// (opentelemetry-otlp sends none unless compression is configured, which needs its
/// `gzip-http` or `zstd-http` feature).
fn unsupported_headers<B>(request: &Request<B>) -> Option<&'static str> {
    let essence = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::trim);
    if !essence.is_some_and(|essence| essence.eq_ignore_ascii_case("application/x-protobuf")) {
        return Some("only application/x-protobuf is supported");
    }
    if let Some(encoding) = request.headers().get(header::CONTENT_ENCODING)
        && !encoding
            .to_str()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case("identity")
    {
        return Some("compressed bodies are not supported");
    }
    None
}

/// The status a behaviour asks for; an invalid code (outside 100..=999) becomes 500.
fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn reject(store: &Store, status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    store.count(Outcome::Rejected);
    error(status, message)
}

fn success(signal: Signal) -> Response<Full<Bytes>> {
    protobuf(Bytes::from(signal.success_body()))
}

fn protobuf(body: Bytes) -> Response<Full<Bytes>> {
    response(StatusCode::OK, body)
}

/// An error answer: the OTLP/HTTP specification wants a protobuf `google.rpc.Status` as the
/// body of every 4xx and 5xx, as a collector sends it.
fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    response(status, Bytes::from(decode::error_body(message)))
}

/// An answer with a protobuf body: the only encoding the sink accepts, so the request's too.
fn response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}
