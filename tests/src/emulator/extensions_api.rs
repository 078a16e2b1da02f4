//! Extensions API 2020-01-01: `/extension/register`, `/event/next`, `/init/error`,
//! `/exit/error`, with the injectable faults.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::faults::Fault;
use super::ids;
use super::server::{self, HandlerResult, Truncated};
use super::state::{
    ACCOUNT_ID, ApiError, ExtEvent, ExtensionErrorKind, FUNCTION_VERSION, HANDLER, Next, Shared,
};

/// The register body as RAPID reads it (aws-lambda-runtime-interface-emulator,
/// lambda/rapi/handler/agentregister.go, `parseRegister`): Go's `encoding/json` ignores
/// unknown fields and reads `null` as an empty list, but a non-empty `configurationKeys` is
/// refused.
#[derive(Debug, Deserialize)]
struct RegisterBody {
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default, rename = "configurationKeys")]
    configuration_keys: Option<Vec<String>>,
}

impl RegisterBody {
    /// The events, or RAPID's `InvalidRequestFormat` message.
    fn parse(body: &[u8]) -> Result<Vec<String>, String> {
        let parsed = serde_json::from_slice::<RegisterBody>(body).map_err(|e| e.to_string())?;
        if parsed
            .configuration_keys
            .is_some_and(|keys| !keys.is_empty())
        {
            return Err(
                "configurationKeys are deprecated; use environment variables instead".into(),
            );
        }
        Ok(parsed.events.unwrap_or_default())
    }
}

async fn apply_delay(shared: &Shared) {
    if let Some(delay) = shared.faults.extensions_delay() {
        tokio::time::sleep(delay).await;
    }
}

/// `POST /extension/register`.
pub(crate) async fn register(shared: &Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    apply_delay(shared).await;
    match shared
        .faults
        .take(|f| matches!(f, Fault::RegisterStatus { .. } | Fault::RegisterClose))
    {
        Some(Fault::RegisterClose) => {
            return Err(io::Error::other(
                "injected fault: register connection closed",
            ));
        }
        Some(Fault::RegisterStatus { status, error_type }) => {
            return Ok(server::error(&ApiError::new(
                status,
                &error_type,
                "Injected registration failure",
            )));
        }
        _ => {}
    }
    let name = server::header_str(req.headers(), "lambda-extension-name")
        .unwrap_or("")
        .to_owned();
    let wants_account = server::header_str(req.headers(), "lambda-extension-accept-feature")
        .is_some_and(|v| v.split(',').any(|f| f.trim() == "accountId"));
    if name.is_empty() {
        return Ok(server::error(&ApiError::forbidden(
            "Extension.InvalidExtensionName",
            "Empty extension name",
        )));
    }
    let body = match server::read_body(req, 64 * 1024).await? {
        Ok(body) => body,
        Err(_) => Bytes::new(),
    };
    // RIE answers an unreadable body with 403 InvalidRequestFormat (agentregister.go), not 400.
    let events = match RegisterBody::parse(&body) {
        Ok(events) => events,
        Err(message) => {
            return Ok(server::error(&ApiError::forbidden(
                "InvalidRequestFormat",
                message,
            )));
        }
    };
    let id = match shared.register(&name, &events) {
        Ok(id) => id,
        Err(e) => return Ok(server::error(&e)),
    };
    let mut document = json!({
        "functionName": shared.config.function_name,
        "functionVersion": FUNCTION_VERSION,
        "handler": HANDLER,
    });
    if wants_account {
        document["accountId"] = json!(ACCOUNT_ID);
    }
    let mut response = server::json_response(200, &document);
    server::set_header(&mut response, "lambda-extension-identifier", &id);
    if let Some(Fault::RegisterAnswerDelay(delay)) = shared
        .faults
        .take(|f| matches!(f, Fault::RegisterAnswerDelay(_)))
    {
        tokio::time::sleep(delay).await;
    }
    Ok(response)
}

/// Reads `Lambda-Extension-Identifier` as Lambda validates it (RIE middleware
/// `AgentUniqueIdentifierHeaderValidator`): missing -> 403 MissingExtensionIdentifier, not a
/// UUID -> 403 InvalidExtensionIdentifier.
fn identifier(headers: &HeaderMap) -> Result<String, ApiError> {
    match server::header_str(headers, "lambda-extension-identifier") {
        None | Some("") => Err(ApiError::forbidden(
            "Extension.MissingExtensionIdentifier",
            "Missing Lambda-Extension-Identifier header",
        )),
        Some(id) if !ids::is_uuid(id) => Err(ApiError::forbidden(
            "Extension.InvalidExtensionIdentifier",
            "Invalid Lambda-Extension-Identifier",
        )),
        Some(id) => Ok(id.to_owned()),
    }
}

/// `GET /extension/event/next`: blocks until the next event for this extension.
pub(crate) async fn next(shared: &Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    apply_delay(shared).await;
    let id = match identifier(req.headers()) {
        Ok(id) => id,
        Err(e) => return Ok(server::error(&e)),
    };
    let (next, mut in_flight) = match shared.extension_next(&id) {
        Ok(pair) => pair,
        Err(e) => return Ok(server::error(&e)),
    };
    let event = match next {
        Next::Now(event) => Ok(event),
        Next::Wait(rx) => rx.await,
        Next::Never => std::future::pending().await,
    };
    in_flight.answered();
    let event =
        event.map_err(|_| io::Error::other("environment reset while waiting in event/next"))?;
    let is_invoke = matches!(event, ExtEvent::Invoke { .. });
    if is_invoke
        && let Some(Fault::EventNextAnswerDelay(delay)) = shared
            .faults
            .take(|f| matches!(f, Fault::EventNextAnswerDelay(_)))
    {
        tokio::time::sleep(delay).await;
    }
    let fault = shared.faults.take(|f| match f {
        Fault::EventNextStatus(_)
        | Fault::EventNextCloseMidBody
        | Fault::EventNextMalformedBody
        | Fault::EventNextUnknownEventType => true,
        Fault::EventNextWrongRequestId => is_invoke,
        _ => false,
    });
    let mut document = event.to_json();
    let body: Bytes = match fault {
        Some(Fault::EventNextStatus(status)) => {
            // The event is lost, as in RAPID: the extension was released from its `Ready`
            // (state Running) before the answer failed (rapi/handler/agentnext.go renders 500
            // only when `RenderAgentEvent` fails), so its retry is its next `Ready`: the end of
            // this invocation for it, answered by the next event.
            let error_type = if status == 500 {
                "InternalServerError"
            } else {
                "InjectedFault"
            };
            return Ok(server::error(&ApiError::new(
                status,
                error_type,
                "Internal Server Error",
            )));
        }
        Some(Fault::EventNextMalformedBody) => {
            let text = Bytes::from(document.to_string());
            text.slice(..text.len() / 2)
        }
        Some(Fault::EventNextUnknownEventType) => {
            document["eventType"] = json!("UNKNOWN_EVENT");
            Bytes::from(document.to_string())
        }
        Some(Fault::EventNextWrongRequestId) => {
            document["requestId"] = json!(ids::uuid_v4());
            Bytes::from(document.to_string())
        }
        _ => Bytes::from(document.to_string()),
    };
    let mut response = if matches!(fault, Some(Fault::EventNextCloseMidBody)) {
        server::respond(200, Truncated::new(body).boxed())
    } else {
        server::respond(200, server::full(body))
    };
    server::set_header(
        &mut response,
        "lambda-extension-event-identifier",
        &ids::uuid_v4(),
    );
    drop(in_flight);
    Ok(response)
}

/// `POST /extension/init/error` and `/exit/error` -> 202; then the extension may make no more
/// calls (403 InvalidExtensionState) but the same error again (202, changes nothing), and the
/// environment fails.
pub(crate) async fn error(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    kind: ExtensionErrorKind,
) -> HandlerResult {
    apply_delay(shared).await;
    let id = match identifier(req.headers()) {
        Ok(id) => id,
        Err(e) => return Ok(server::error(&e)),
    };
    let Some(error_type) =
        server::header_str(req.headers(), "lambda-extension-function-error-type")
            .map(str::to_owned)
    else {
        // RIE: 403 Extension.MissingHeader (agentiniterror.go / agentexiterror.go).
        return Ok(server::error(&ApiError::forbidden(
            "Extension.MissingHeader",
            "Lambda-Extension-Function-Error-Type not found",
        )));
    };
    // The body (an optional error document) is read so the connection stays usable.
    let _ = server::read_body(req, 1024 * 1024).await?;
    Ok(server::accepted_or(shared.extension_error(
        &id,
        &error_type,
        kind,
    )))
}
