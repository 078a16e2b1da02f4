//! Errors of the Extensions API client.

use std::fmt;

/// Why a call to the Extensions API failed.
///
/// The client never panics on what the API answers: every failure is one of these.
///
/// ```
/// use deferred_core::extension::{Client, ClientError, decode_event};
///
/// let error = Client::new("").unwrap_err();
/// assert!(matches!(error, ClientError::Endpoint(_)));
/// assert_eq!(error.to_string(), "bad AWS_LAMBDA_RUNTIME_API: empty");
///
/// let error = decode_event(b"[]").unwrap_err();
/// assert!(matches!(error, ClientError::Malformed(_)));
///
/// // What a refused registration looks like, and how to tell it apart.
/// let refused = ClientError::Api {
///     status: 403,
///     error_type: Some("Extension.RegistrationClosed".into()),
///     message: "registration is closed".into(),
/// };
/// let closed = matches!(
///     &refused,
///     ClientError::Api { error_type: Some(t), .. } if t == "Extension.RegistrationClosed"
/// );
/// assert!(closed);
/// assert_eq!(
///     refused.to_string(),
///     "Extensions API answered 403 Extension.RegistrationClosed: registration is closed"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// `AWS_LAMBDA_RUNTIME_API` is not a usable `host:port[/prefix]`.
    Endpoint(String),
    /// The request could not be sent or the answer not read (refused, closed mid-body).
    Transport(String),
    /// The API answered with an error status; `error_type` is its `errorType`, e.g.
    /// `Extension.RegistrationClosed`.
    Api {
        /// The HTTP status.
        status: u16,
        /// The `errorType` of the JSON error body, when it had one.
        error_type: Option<String>,
        /// The `errorMessage`, or the raw body.
        message: String,
    },
    /// The answer does not follow the protocol (missing header, undecodable body, unknown event).
    Malformed(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Endpoint(m) => write!(f, "bad AWS_LAMBDA_RUNTIME_API: {m}"),
            Self::Transport(m) => write!(f, "Extensions API unreachable: {m}"),
            Self::Api {
                status,
                error_type,
                message,
            } => match error_type {
                Some(t) => write!(f, "Extensions API answered {status} {t}: {message}"),
                None => write!(f, "Extensions API answered {status}: {message}"),
            },
            Self::Malformed(m) => write!(f, "Extensions API answer malformed: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// Lambda's answer to an `event/next` while it counts the extension as waiting in one
    /// already: 403 `Extension.InvalidExtensionState` (aws-lambda-runtime-interface-emulator,
    /// `rapi/handler/agentnext.go`). It does so also when that earlier call's connection is
    /// gone: the next event is then written to the dead call and lost.
    pub(crate) fn is_already_waiting(&self) -> bool {
        matches!(
            self,
            Self::Api { status: 403, error_type: Some(t), .. } if t == "Extension.InvalidExtensionState"
        )
    }
}
