//! Runtime API 2018-06-01: `/runtime/invocation/next`, `/invocation/{id}/response`,
//! `/invocation/{id}/error`, `/init/error`, and SnapStart's `/restore/next` and
//! `/restore/error`.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use hyper::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use super::server::{self, ConnTag, HandlerResult};
use super::state::{Answer, ApiError, MAX_PAYLOAD, MAX_STREAMED_PAYLOAD, Next, Shared};

/// Hard cap on what is read of a buffered response body: past [`MAX_PAYLOAD`] it is refused
/// anyway, this only bounds memory. A streamed one is read to just past
/// [`MAX_STREAMED_PAYLOAD`].
const READ_CAP: usize = 64 * 1024 * 1024;

/// The error document runtimes post (`{"errorMessage","errorType","stackTrace"?}`).
#[derive(Debug, Deserialize)]
struct ErrorDocument {
    #[serde(rename = "errorMessage")]
    error_message: Option<String>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
}

/// `GET /runtime/invocation/next`: blocks until an invocation is dispatched; the body is the
/// payload and the context travels in `Lambda-Runtime-*` headers (Runtime API, Next invocation).
pub(crate) async fn next(shared: &Arc<Shared>) -> HandlerResult {
    let event = match shared.runtime_next() {
        Err(e) => return Ok(server::error(&e)),
        Ok(Next::Now(event)) => event,
        Ok(Next::Never) => std::future::pending().await,
        Ok(Next::Wait(rx)) => {
            // Counts the call as abandoned if hyper drops this future (client gone).
            let mut abandoned = Abandoned(Some((shared, shared.restore_epoch())));
            let event = rx.await;
            abandoned.0 = None;
            event.map_err(|_| io::Error::other("environment reset while waiting in /next"))?
        }
    };
    let mut response = server::respond(200, server::full(event.payload));
    server::set_header(
        &mut response,
        "lambda-runtime-aws-request-id",
        &event.request_id,
    );
    server::set_header(
        &mut response,
        "lambda-runtime-deadline-ms",
        &event.deadline_ms.to_string(),
    );
    server::set_header(
        &mut response,
        "lambda-runtime-invoked-function-arn",
        &event.function_arn,
    );
    server::set_header(&mut response, "lambda-runtime-trace-id", &event.trace_id);
    Ok(response)
}

/// `POST /runtime/invocation/{id}/response` -> 202; 400 unknown id; 403 already answered;
/// 413 over 6 MiB + 100 bytes, or over 200 MB when streamed. A streamed response
/// (`Lambda-Runtime-Function-Response-Mode: streaming`) is answered once its last chunk is in:
/// the caller gets the whole stream, metadata prelude included, as the response.
pub(crate) async fn response(
    shared: &Arc<Shared>,
    id: &str,
    req: Request<Incoming>,
) -> HandlerResult {
    let streamed = server::header_str(req.headers(), "lambda-runtime-function-response-mode")
        .is_some_and(|mode| mode.eq_ignore_ascii_case("streaming"));
    let limit = if streamed {
        MAX_STREAMED_PAYLOAD
    } else {
        MAX_PAYLOAD
    };
    let cap = READ_CAP.max(limit + 1);
    let answer = match server::read_body(req, cap).await? {
        Ok(body) if body.len() > limit => Answer::TooLarge {
            size: body.len(),
            limit,
        },
        Ok(body) => Answer::Response(body),
        Err(declared) => Answer::TooLarge {
            size: declared.unwrap_or(cap + 1),
            limit,
        },
    };
    Ok(server::accepted_or(shared.runtime_answer(id, answer)))
}

/// `POST /runtime/invocation/{id}/error` -> 202. The error type comes from the body's
/// `errorType`, else from `Lambda-Runtime-Function-Error-Type` (Runtime API, Invocation error).
pub(crate) async fn error(shared: &Arc<Shared>, id: &str, req: Request<Incoming>) -> HandlerResult {
    let header = error_type_header(&req);
    let (error_type, error_message) = match server::read_body(req, READ_CAP).await? {
        Ok(body) => parse_error(&body, header),
        Err(_) => {
            return Ok(server::error(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."),
            )));
        }
    };
    let answer = Answer::Error {
        error_type,
        error_message,
    };
    Ok(server::accepted_or(shared.runtime_answer(id, answer)))
}

/// The error type and message of an init or restore error (body up to 1 MiB); an oversized
/// body gives the header's type, else `default_type`, and no message.
async fn read_error(req: Request<Incoming>, default_type: &str) -> io::Result<(String, String)> {
    let header = error_type_header(&req);
    Ok(match server::read_body(req, 1024 * 1024).await? {
        Ok(body) => parse_error(&body, header),
        Err(_) => (
            header.unwrap_or_else(|| default_type.to_owned()),
            String::new(),
        ),
    })
}

/// `POST /runtime/init/error` -> 202, and init fails; 403 once init is over.
pub(crate) async fn init_error(shared: &Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let (error_type, error_message) = read_error(req, "Unknown").await?;
    Ok(server::accepted_or(
        shared.runtime_init_error(&error_type, &error_message),
    ))
}

/// `GET /runtime/restore/next` (SnapStart): the runtime's init is done; the call blocks while
/// the snapshot is taken and is answered (200, empty body) after the restore, on this very
/// connection (RIE `rapi/handler/restorenext.go`, `rendering.RestoreRenderer`). 403
/// `InvalidStateTransition` once the runtime has left init; outside SnapStart the route does
/// not exist (404, see `server::route`).
pub(crate) async fn restore_next(shared: &Arc<Shared>, conn: &ConnTag) -> HandlerResult {
    // The restore answers this call, so its connection survives whatever the restore does to
    // the others.
    conn.survive();
    let restored = match shared.runtime_restore_next() {
        Err(e) => return Ok(server::error(&e)),
        Ok(rx) => rx,
    };
    restored
        .await
        .map_err(|_| io::Error::other("environment reset while waiting in /restore/next"))?;
    let mut response = hyper::Response::new(server::full(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::OK;
    Ok(response)
}

/// `POST /runtime/restore/error` -> 202, and the restore fails (RIE
/// `rapi/handler/restoreerror.go`); 403 `InvalidStateTransition` unless the runtime is
/// between the answer to `/restore/next` and its first `/invocation/next`.
pub(crate) async fn restore_error(shared: &Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let (error_type, error_message) = read_error(req, "Runtime.AfterRestoreError").await?;
    Ok(server::accepted_or(
        shared.runtime_restore_error(&error_type, &error_message),
    ))
}

/// Reports a blocked `/next` dropped before its answer (unless a SnapStart restore cut it:
/// the client did not go away).
struct Abandoned<'a>(Option<(&'a Shared, u64)>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some((shared, epoch)) = self.0
            && !shared.cut_since(epoch)
        {
            shared.note_abandoned();
        }
    }
}

fn error_type_header(req: &Request<Incoming>) -> Option<String> {
    server::header_str(req.headers(), "lambda-runtime-function-error-type").map(str::to_owned)
}

/// Malformed or absent error documents are accepted: Lambda falls back to the header and the
/// raw body.
fn parse_error(body: &[u8], header: Option<String>) -> (String, String) {
    let document = serde_json::from_slice::<ErrorDocument>(body).ok();
    let error_type = document
        .as_ref()
        .and_then(|d| d.error_type.clone())
        .or(header)
        .unwrap_or_else(|| "Unhandled".to_owned());
    let error_message = document
        .and_then(|d| d.error_message)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (error_type, error_message)
}
