//! HTTP calls of the Extensions API, over `lambda_runtime_api_client` (the runtime's own
//! client: same connection handling, same `AWS_LAMBDA_RUNTIME_API` path-prefix rule).

use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Limited};
use lambda_runtime_api_client::{PooledClient, body::Body};
use serde::Deserialize;

use super::error::ClientError;
use super::event::{NextEvent, decode_event};

const BASE: &str = "/2020-01-01/extension";
const NAME_HEADER: &str = "Lambda-Extension-Name";
const ID_HEADER: &str = "Lambda-Extension-Identifier";
const ERROR_TYPE_HEADER: &str = "Lambda-Extension-Function-Error-Type";
/// Events and error bodies are small; a larger answer is a protocol error, not a reason to
/// allocate without bound.
const MAX_BODY: usize = 256 * 1024;

/// A client of the Extensions API.
///
/// The core uses it where speed does not count, for an extension that only acknowledges
/// events (its registration and its chained `event/next` go over connections of their own);
/// it is public for tests and tools that speak the protocol themselves. Calls go
/// through lambda_runtime_api_client's pooled HTTP/1.1 client, which keeps at most one idle
/// connection.
///
/// ```
/// use deferred_core::extension::{Client, NextEvent};
///
/// # async fn fake_extensions_api() -> String {
/// #     use http_body_util::Full;
/// #     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// #     let address = listener.local_addr().unwrap().to_string();
/// #     tokio::spawn(async move {
/// #         loop {
/// #             let (stream, _) = listener.accept().await.unwrap();
/// #             let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
/// #                 let response = http::Response::builder().header("Lambda-Extension-Identifier", "ext-1");
/// #                 let body = match request.uri().path() {
/// #                     "/2020-01-01/extension/register" => r#"{"functionName":"orders","functionVersion":"$LATEST"}"#,
/// #                     "/2020-01-01/extension/event/next" => r#"{"eventType":"INVOKE","deadlineMs":1700000003000,"requestId":"req-1"}"#,
/// #                     _ => "",
/// #                 };
/// #                 response.body(Full::new(bytes::Bytes::from(body)))
/// #             });
/// #             let io = hyper_util::rt::TokioIo::new(stream);
/// #             tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
/// #         }
/// #     });
/// #     address
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), deferred_core::extension::ClientError> {
/// # let runtime_api = fake_extensions_api().await;
/// // `runtime_api` is the value of AWS_LAMBDA_RUNTIME_API (here, a local stand-in).
/// let client = Client::new(&runtime_api)?;
/// let registration = client.register("my-extension", &["INVOKE"]).await?;
/// assert_eq!(registration.function_name, "orders");
///
/// match client.next_event(&registration.extension_id).await? {
///     NextEvent::Invoke(invoke) => assert_eq!(invoke.request_id, "req-1"),
///     NextEvent::Shutdown(shutdown) => println!("shutting down: {}", shutdown.reason),
///     _ => {}
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Client {
    http: PooledClient,
    endpoint: Uri,
}

/// The answer to a successful registration.
///
/// ```no_run
/// use deferred_core::extension::{Client, Registration};
///
/// # async fn example(client: Client) -> Result<(), deferred_core::extension::ClientError> {
/// let Registration { extension_id, function_name, .. } =
///     client.register("my-extension", &["INVOKE"]).await?;
/// println!("extension of {function_name} registered");
/// let event = client.next_event(&extension_id).await?; // every later call sends the id
/// # Ok(())
/// # }
/// ```
///
/// `#[non_exhaustive]`: Lambda's answer carries more than these (`handler`, and `accountId`
/// with `Lambda-Extension-Accept-Feature`), which a later version may add.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Registration {
    /// The `Lambda-Extension-Identifier` to send on every later call.
    pub extension_id: String,
    /// `functionName` from the answer's body (empty when absent).
    pub function_name: String,
    /// `functionVersion` from the answer's body (empty when absent).
    pub function_version: String,
}

/// How long the body of an answer may take once its head is in: a few hundred bytes, which a
/// live API sends with the head.
pub(super) const BODY_AFTER_HEAD: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RegisterBody {
    function_name: String,
    function_version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody {
    error_type: Option<String>,
    error_message: Option<String>,
}

impl Client {
    /// A client for `runtime_api`, the value of `AWS_LAMBDA_RUNTIME_API`: `host:port` (what
    /// Lambda sets), possibly with an `http://` scheme and a path prefix
    /// (`http://host:port/prefix`, the form lambda_runtime accepts with a prefix), which is
    /// kept.
    ///
    /// Nothing is sent yet: only the address is checked ([`ClientError::Endpoint`]).
    ///
    /// ```
    /// use deferred_core::extension::{Client, ClientError};
    ///
    /// let client = Client::new("127.0.0.1:9001")?;
    /// let with_prefix = Client::new("http://localhost:9001/my-function")?;
    /// assert!(matches!(Client::new("not an address"), Err(ClientError::Endpoint(_))));
    /// assert!(matches!(Client::new("localhost"), Err(ClientError::Endpoint(_))));
    /// # Ok::<(), ClientError>(())
    /// ```
    pub fn new(runtime_api: &str) -> Result<Self, ClientError> {
        let runtime_api = runtime_api.trim();
        let invalid = |why: &str| ClientError::Endpoint(format!("{runtime_api:?} {why}"));
        if runtime_api.is_empty() {
            return Err(ClientError::Endpoint("empty".into()));
        }
        // lambda_runtime parses the value as a URI, with or without the scheme; the Runtime
        // API is plain HTTP.
        let address = runtime_api.strip_prefix("http://").unwrap_or(runtime_api);
        if address.contains("://") {
            return Err(invalid(
                "is not plain HTTP: the Runtime API is http://host:port",
            ));
        }
        let uri: Uri = format!("http://{address}")
            .parse()
            .map_err(|e| ClientError::Endpoint(format!("{runtime_api:?}: {e}")))?;
        let authority = uri
            .authority()
            .filter(|authority| uri.query().is_none() && !authority.as_str().contains('@'));
        let Some(authority) = authority else {
            return Err(invalid("is not host:port[/prefix]"));
        };
        // The chain's own connection (`line.rs`) dials the authority as it is: without a port
        // it would fail where hyper falls back to port 80.
        if authority.port().is_none() {
            return Err(invalid("has no port: expected host:port"));
        }
        // lambda_runtime_api_client's set_origin joins the base path with ours, so a prefix in
        // AWS_LAMBDA_RUNTIME_API survives, exactly as for the runtime's own calls.
        let http = PooledClient::builder()
            .with_pool_size(1)
            .with_endpoint(uri.clone())
            .build();
        Ok(Self {
            http,
            endpoint: uri,
        })
    }

    /// A client for the `AWS_LAMBDA_RUNTIME_API` of this process, `None` outside Lambda.
    ///
    /// ```
    /// use deferred_core::extension::Client;
    ///
    /// match Client::from_env() {
    ///     None => println!("not in Lambda"),
    ///     Some(Ok(client)) => println!("in Lambda: {client:?}"),
    ///     Some(Err(error)) => eprintln!("{error}"),
    /// }
    /// ```
    pub fn from_env() -> Option<Result<Self, ClientError>> {
        let api = std::env::var_os("AWS_LAMBDA_RUNTIME_API")?;
        // Set but not text is a broken endpoint, not "outside Lambda".
        Some(match api.to_str() {
            Some(api) => Self::new(api),
            None => Err(ClientError::Endpoint(format!("not valid UTF-8: {api:?}"))),
        })
    }

    /// `POST /register`: registers an extension named `name` for `events` (e.g. `["INVOKE"]`).
    /// Must happen during init, before the runtime's first `next`.
    ///
    /// A name that is not the name of a file in `/opt/extensions` registers an internal
    /// extension. A registration Lambda refuses is a [`ClientError::Api`].
    ///
    /// ```no_run
    /// use deferred_core::extension::Client;
    ///
    /// # async fn example() -> Result<(), deferred_core::extension::ClientError> {
    /// let client = Client::from_env().expect("in Lambda")?;
    /// let name = format!("my-extension-{}", std::process::id());
    /// let registration = client.register(&name, &["INVOKE"]).await?;
    /// println!("registered as {}", registration.extension_id);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn register(&self, name: &str, events: &[&str]) -> Result<Registration, ClientError> {
        let body = serde_json::json!({ "events": events }).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{BASE}/register"))
            .header(NAME_HEADER, name)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body));
        // Lambda has registered the extension once it answers with the identifier: a body that
        // then fails to arrive must not turn that into a failure, or no one would call
        // `event/next` for an extension Lambda waits for.
        let (parts, body) = self.send_head(request).await?;
        // Bounded as well: a body that stalls would hold `start` (and so init) forever.
        let body = tokio::time::timeout(BODY_AFTER_HEAD, read_body(body))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let extension_id = parts
            .headers
            .get(ID_HEADER)
            .map(http::HeaderValue::as_bytes);
        registration(parts.status.as_u16(), extension_id, &body)
    }

    /// `GET /event/next`: blocks until the next event. Never put a timeout on it: Lambda
    /// answers only when the next invocation arrives, which may be hours away.
    ///
    /// While this extension has not called it, Lambda neither freezes the environment nor
    /// delivers the next invocation.
    ///
    /// ```no_run
    /// use deferred_core::extension::{Client, NextEvent};
    ///
    /// # async fn example(client: Client, extension_id: String) -> Result<(), deferred_core::extension::ClientError> {
    /// loop {
    ///     match client.next_event(&extension_id).await? {
    ///         NextEvent::Invoke(invoke) => {
    ///             // The environment is held until the next call: finish this invocation's work.
    ///             println!("invocation {} until {:?}", invoke.request_id, invoke.deadline);
    ///         }
    ///         NextEvent::Shutdown(_) => return Ok(()),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn next_event(&self, extension_id: &str) -> Result<NextEvent, ClientError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{BASE}/event/next"))
            .header(ID_HEADER, extension_id)
            .body(Body::empty());
        let (_, body) = self.send(request).await?;
        decode_event(&body)
    }

    /// `POST /init/error`: reports a failed initialisation; the extension may make no further
    /// calls after it.
    ///
    /// `error_type` has the form `Extension.<reason>`, e.g. `Extension.ConfigInvalid`.
    ///
    /// ```no_run
    /// use deferred_core::extension::Client;
    ///
    /// # async fn example(client: Client, extension_id: String) -> Result<(), deferred_core::extension::ClientError> {
    /// # let config: Result<(), String> = Err("OTEL_EXPORTER_OTLP_ENDPOINT is not a URL".into());
    /// if let Err(why) = config {
    ///     client.init_error(&extension_id, "Extension.ConfigInvalid", &why).await?;
    ///     std::process::exit(1);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn init_error(
        &self,
        extension_id: &str,
        error_type: &str,
        message: &str,
    ) -> Result<(), ClientError> {
        self.report_error("init/error", extension_id, error_type, message)
            .await
    }

    /// `POST /exit/error`: reports an error before exiting; the extension may make no further
    /// calls after it.
    ///
    /// ```no_run
    /// use deferred_core::extension::Client;
    ///
    /// # async fn example(client: Client, extension_id: String) -> Result<(), deferred_core::extension::ClientError> {
    /// if let Err(error) = client.next_event(&extension_id).await {
    ///     client.exit_error(&extension_id, "Extension.UnknownReason", &error.to_string()).await?;
    ///     std::process::exit(1);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn exit_error(
        &self,
        extension_id: &str,
        error_type: &str,
        message: &str,
    ) -> Result<(), ClientError> {
        self.report_error("exit/error", extension_id, error_type, message)
            .await
    }

    /// Drops pooled connections (after a SnapStart restore they are stale).
    ///
    /// lambda_runtime_api_client rebuilds its pool once per client: the first call builds a
    /// fresh pool, later calls do nothing, which fits the one restore a process sees.
    ///
    /// ```
    /// use deferred_core::extension::Client;
    ///
    /// let client = Client::new("127.0.0.1:9001")?;
    /// // After a restore: the next call opens a new connection.
    /// client.reset_pool();
    /// # Ok::<(), deferred_core::extension::ClientError>(())
    /// ```
    pub fn reset_pool(&self) {
        self.http.reset_pool();
    }

    async fn report_error(
        &self,
        path: &str,
        extension_id: &str,
        error_type: &str,
        message: &str,
    ) -> Result<(), ClientError> {
        let body = serde_json::json!({ "errorMessage": message, "errorType": error_type });
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{BASE}/{path}"))
            .header(ID_HEADER, extension_id)
            .header(ERROR_TYPE_HEADER, error_type)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()));
        self.send(request).await.map(|_| ())
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`] with the API's errorType.
    async fn send(
        &self,
        request: http::Result<Request<Body>>,
    ) -> Result<(http::response::Parts, bytes::Bytes), ClientError> {
        let (parts, body) = self.send_head(request).await?;
        // The head may be long in coming (`event/next`), the body comes with it: bounded, or a
        // body that stalls would hold the caller's loop, and Lambda's invocation, for good.
        let body = tokio::time::timeout(BODY_AFTER_HEAD, read_body(body))
            .await
            .map_err(|_| {
                ClientError::Transport(format!("the answer's body stalled for {BODY_AFTER_HEAD:?}"))
            })??;
        if parts.status.is_success() {
            return Ok((parts, body));
        }
        Err(api_error(parts.status.as_u16(), &body))
    }

    /// Sends a request and returns the answer's head, its body not yet read.
    async fn send_head(
        &self,
        request: http::Result<Request<Body>>,
    ) -> Result<(http::response::Parts, hyper::body::Incoming), ClientError> {
        let request = request.map_err(|e| ClientError::Malformed(format!("request: {e}")))?;
        let response = self
            .http
            .call(request)
            .await
            .map_err(|e| ClientError::Transport(crate::report::with_causes(e.as_ref())))?;
        Ok(response.into_parts())
    }

    /// `host:port` and the path prefix of the Runtime API, for the chain's own connection.
    pub(crate) fn endpoint(&self) -> (&str, &str) {
        let authority = self.endpoint.authority().map_or("", |a| a.as_str());
        (authority, self.endpoint.path())
    }
}

/// The registration that an answer to `register` (its status, its `Lambda-Extension-Identifier`
/// and its body, empty if it failed to arrive) makes.
pub(super) fn registration(
    status: u16,
    extension_id: Option<&[u8]>,
    body: &[u8],
) -> Result<Registration, ClientError> {
    if !(200..300).contains(&status) {
        return Err(api_error(status, body));
    }
    let raw = extension_id
        .map(<[u8]>::trim_ascii)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ClientError::Malformed(format!("register answer without {ID_HEADER}")))?;
    // Sent back as a header on every later call: visible ASCII, blanks inside, as hyper's
    // `HeaderValue::to_str` takes it (RFC 9110, 5.5: obs-text, bytes past ASCII, is obsolete).
    // Refused here, with the reason, rather than failing each `event/next` later.
    let extension_id = std::str::from_utf8(raw)
        .ok()
        .filter(|id| {
            id.bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
        })
        .ok_or_else(|| {
            ClientError::Malformed(format!(
                "register answer: {ID_HEADER} is not visible ASCII: {}",
                lossy(raw)
            ))
        })?
        .to_owned();
    // The body only informs; an odd body does not make a successful registration fail.
    let info: RegisterBody = serde_json::from_slice(body).unwrap_or_default();
    Ok(Registration {
        extension_id,
        function_name: info.function_name,
        function_version: info.function_version,
    })
}

/// The API's answer with a non-2xx `status`, with the `errorType` of its JSON body.
pub(super) fn api_error(status: u16, body: &[u8]) -> ClientError {
    let (error_type, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => (e.error_type, e.error_message.unwrap_or_else(|| lossy(body))),
        Err(_) => (None, lossy(body)),
    };
    ClientError::Api {
        status,
        error_type,
        message,
    }
}

fn lossy(body: &[u8]) -> String {
    const SHOWN: usize = 512;
    String::from_utf8_lossy(&body[..body.len().min(SHOWN)]).into_owned()
}

/// Reads an answer's body, at most [`MAX_BODY`].
async fn read_body(body: hyper::body::Incoming) -> Result<bytes::Bytes, ClientError> {
    Ok(Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| ClientError::Transport(format!("reading the answer: {e}")))?
        .to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers one request on a fresh loopback listener with `answer`, then closes.
    async fn answering(answer: &'static str) -> String {
        answering_then(answer, false).await
    }

    /// [`answering`], keeping the connection open (silent) after the answer when `stall`.
    async fn answering_then(answer: &'static str, stall: bool) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            // The request: its head, then (a register's) short JSON body.
            while !(request.ends_with(b"]}")
                || request.starts_with(b"GET ") && request.ends_with(b"\r\n\r\n"))
            {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
            if stall {
                std::future::pending::<()>().await;
            }
        });
        addr
    }

    /// What `register` makes of `answer` (the connection then closed).
    async fn registered(answer: &'static str) -> Result<Registration, ClientError> {
        let addr = answering(answer).await;
        Client::new(&addr)
            .unwrap()
            .register("deferred", &["INVOKE"])
            .await
    }

    /// An identifier that cannot go back as a header (bytes past ASCII) is refused with the
    /// reason, not as a missing one; one between blanks is trimmed.
    #[tokio::test]
    async fn an_identifier_is_visible_ascii_and_trimmed() {
        let result = registered(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-é\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        assert!(
            matches!(&result, Err(ClientError::Malformed(m)) if m.contains("not visible ASCII")),
            "{result:?}"
        );
        let result = registered(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: \t ext 1 \t\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        assert_eq!(result.unwrap().extension_id, "ext 1");
    }

    /// A body that stalls after the head (which carries the identifier) does not hold the
    /// registration, and so `start` and init, forever.
    #[tokio::test]
    async fn a_registration_whose_body_stalls_still_succeeds() {
        let addr = answering_then(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-1\r\n\
             Content-Length: 100\r\n\r\n{\"functionName\":",
            true,
        )
        .await;
        let client = Client::new(&addr).unwrap();
        let registered = tokio::time::timeout(
            BODY_AFTER_HEAD + std::time::Duration::from_secs(5),
            client.register("deferred", &["INVOKE"]),
        )
        .await
        .expect("the registration returned");
        assert_eq!(registered.unwrap().extension_id, "ext-1");
    }

    /// An event whose body stalls after the head fails within a bound: the event/next loop
    /// that waits on it would never call again, and Lambda would hold the invocation to its
    /// timeout.
    #[tokio::test]
    async fn an_event_whose_body_stalls_fails_within_a_bound() {
        let addr = answering_then(
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"eventType\":",
            true,
        )
        .await;
        let client = Client::new(&addr).unwrap();
        let result = tokio::time::timeout(
            BODY_AFTER_HEAD + std::time::Duration::from_secs(5),
            client.next_event("ext-1"),
        )
        .await
        .expect("next_event returned");
        assert!(
            matches!(result, Err(ClientError::Transport(_))),
            "{result:?}"
        );
    }

    /// Lambda has registered the extension once it answers with the identifier: a body cut
    /// short does not make the registration fail (the core would fall back to inline work,
    /// and no one would call `event/next` for an extension Lambda waits for).
    #[tokio::test]
    async fn a_registration_whose_body_is_cut_short_still_succeeds() {
        let registration = registered(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-1\r\n\
             Content-Length: 100\r\n\r\n{\"functionName\":",
        )
        .await
        .unwrap();
        assert_eq!(registration.extension_id, "ext-1");
        assert_eq!(registration.function_name, "");
    }

    /// A refusal whose body is cut short is still a refusal.
    #[tokio::test]
    async fn a_refused_registration_with_a_cut_body_is_an_api_error() {
        let error =
            registered("HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\n{\"errorType\":")
                .await
                .unwrap_err();
        assert!(
            matches!(error, ClientError::Api { status: 403, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn endpoint_forms() {
        assert!(Client::new("127.0.0.1:9001").is_ok());
        assert!(Client::new("localhost:9001/my-function").is_ok());
        let with_scheme = Client::new("http://localhost:9001/my-function").unwrap();
        assert_eq!(with_scheme.endpoint(), ("localhost:9001", "/my-function"));
        assert_eq!(
            Client::new("[::1]:9001").unwrap().endpoint(),
            ("[::1]:9001", "/")
        );
        for bad in [
            "https://localhost:9001",
            "http://http://localhost:9001",
            "localhost",
            "http://localhost/x",
            "user@localhost:9001",
        ] {
            let error = Client::new(bad).err();
            assert!(
                matches!(error, Some(ClientError::Endpoint(_))),
                "{bad}: {error:?}"
            );
        }
        assert!(matches!(Client::new(""), Err(ClientError::Endpoint(_))));
        assert!(matches!(Client::new("a b"), Err(ClientError::Endpoint(_))));
        assert!(matches!(
            Client::new("host:9001/x?y=1"),
            Err(ClientError::Endpoint(_))
        ));
    }
}
