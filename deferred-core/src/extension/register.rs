//! `start`'s registration of the internal extension, on a connection of its own.
//!
//! Why not [`Client::register`](super::Client::register): its request goes out through the
//! pooled client's connection task and its answer comes back through a channel (a hop between
//! threads each way), and its caller cannot tell when the request is out. Here `start` learns
//! it the moment the request is written, and starts the chain's thread while Lambda answers:
//! neither that nor building the chain's runtime then holds `start`, whose end the runtime's
//! first `/next`, and so the end of init, waits for (cold start). The answer is read as the
//! chain reads `event/next` answers (`line.rs`), and means what it means to `Client`.

use tokio::io::AsyncWriteExt as _;
use tokio::sync::oneshot;

use super::ClientError;
use super::client::{BODY_AFTER_HEAD, registration};
use super::line::{Head, Incoming, begin, read_body, read_head};
use crate::extension::Registration;

/// Registers the extension `name` for INVOKE events with the Runtime API at `authority`
/// (`host:port`) under `prefix` (the path part of `AWS_LAMBDA_RUNTIME_API`). `sent` is told
/// once the request is written. Unbounded until the answer's head is in, as
/// `Client::register`: the caller bounds it (`register_timeout`); the body then gets
/// `BODY_AFTER_HEAD`.
///
/// Lambda has registered the extension once it answers 2xx with the identifier: a body that
/// then fails to arrive does not make that a failure, or no one would call `event/next` for
/// an extension Lambda waits for.
pub(crate) async fn register(
    authority: String,
    prefix: String,
    name: String,
    sent: oneshot::Sender<()>,
) -> Result<Registration, ClientError> {
    let transport =
        |e: std::io::Error| ClientError::Transport(format!("register: {authority}: {e}"));
    let mut stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(transport)?;
    stream.set_nodelay(true).map_err(transport)?;
    stream
        .write_all(&request(&authority, &prefix, &name))
        .await
        .map_err(transport)?;
    let _ = sent.send(());
    let mut conn = Incoming {
        reader: stream,
        buf: Vec::with_capacity(1024),
        call: "register",
    };
    let mut head = Head::default();
    // The head as `Client::register` waits for it: for as long as the caller does (a head
    // that trickles in is still Lambda's answer); then the body, bounded: one that stalls
    // would otherwise hold `start`, or the late registration, for good.
    let framed = match begin(&mut conn).await {
        Ok(()) => read_head(&mut conn, &mut head).await,
        Err(error) => Err(error),
    };
    let (status, body) = match framed {
        Ok((status, framing, _)) => {
            let body = tokio::time::timeout(BODY_AFTER_HEAD, read_body(&mut conn, framing));
            let body = body.await.ok().and_then(Result::ok).unwrap_or_default();
            (status, body)
        }
        // A head refused for its framing: its status and identifier still decide.
        Err(error) => match head.status {
            Some(status) => (status, Vec::new()),
            None => return Err(error),
        },
    };
    registration(status, head.extension_id.as_deref(), &body)
}

/// `POST {prefix}/2020-01-01/extension/register` for INVOKE events (Extensions API reference:
/// `Lambda-Extension-Name` names the extension; internal extensions cannot take SHUTDOWN).
fn request(authority: &str, prefix: &str, name: &str) -> Vec<u8> {
    const BODY: &str = r#"{"events":["INVOKE"]}"#;
    let prefix = prefix.trim_end_matches('/');
    format!(
        "POST {prefix}/2020-01-01/extension/register HTTP/1.1\r\nHost: {authority}\r\n\
         Lambda-Extension-Name: {name}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nAccept: */*\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;
    use crate::extension::line::tests::request as read_request;

    /// Registers against a stand-in that answers `answer` (then closes, or stalls when
    /// `stall`); returns the request it read, whether `sent` was told before the answer went
    /// out, and the result.
    async fn against(
        answer: &'static str,
        stall: bool,
    ) -> (String, bool, Result<Registration, ClientError>) {
        against_in(&[answer], Duration::ZERO, stall).await
    }

    /// [`against`], the answer written in `pieces`, `pause` apart.
    async fn against_in(
        pieces: &[&'static str],
        pause: Duration,
        stall: bool,
    ) -> (String, bool, Result<Registration, ClientError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("address").to_string();
        let (sent, out) = oneshot::channel();
        let registering = tokio::spawn(register(
            authority,
            "/prefix/".into(),
            "lambda-deferred-7".into(),
            sent,
        ));
        let (mut stream, _) = listener.accept().await.expect("accept");
        let head = read_request(&mut stream).await;
        let mut body = [0u8; 21];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut body)
            .await
            .expect("body");
        let told = tokio::time::timeout(Duration::from_secs(5), out)
            .await
            .is_ok();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            stream.write_all(piece.as_bytes()).await.expect("answer");
        }
        if !stall {
            drop(stream);
        }
        let result = tokio::time::timeout(Duration::from_secs(10), registering)
            .await
            .expect("register returns")
            .expect("no panic");
        (
            format!("{head}{}", String::from_utf8_lossy(&body)),
            told,
            result,
        )
    }

    #[tokio::test]
    async fn a_registration_is_one_post_and_its_answer_gives_the_identifier() {
        let (request, told, result) = against(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-9\r\nContent-Length: 53\r\n\r\n\
             {\"functionName\":\"orders\",\"functionVersion\":\"$LATEST\"}",
            false,
        )
        .await;
        assert!(
            request.starts_with("POST /prefix/2020-01-01/extension/register HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nLambda-Extension-Name: lambda-deferred-7\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with("\r\n\r\n{\"events\":[\"INVOKE\"]}"),
            "{request}"
        );
        assert!(told, "sent is told once the request is out");
        let registration = result.expect("registered");
        assert_eq!(registration.extension_id, "ext-9");
        assert_eq!(registration.function_name, "orders");
        assert_eq!(registration.function_version, "$LATEST");
    }

    /// A body that never comes, or that is cut short, does not undo a registration that the
    /// head made: Lambda counts the extension in.
    #[tokio::test(start_paused = true)]
    async fn a_registration_whose_body_stalls_or_is_cut_still_succeeds() {
        for stall in [true, false] {
            let (_, _, result) = against(
                "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-9\r\nContent-Length: 54\r\n\r\n{\"fun",
                stall,
            )
            .await;
            let registration = result.unwrap_or_else(|e| panic!("stall {stall}: {e}"));
            assert_eq!(registration.extension_id, "ext-9");
            assert_eq!(registration.function_name, "");
        }
    }

    /// An answer with more header fields than the 32 the line's parser had room for still
    /// registers: `Client::register` (hyper, up to 100 fields) took it, and Lambda, having
    /// answered 2xx with the identifier, waits for the extension's `event/next`. Found by
    /// review: "register answer: too many headers", so no one called `event/next` and init was
    /// held to Lambda's limit.
    /// A head that trickles in (here over 3 s) is still Lambda's answer, as for
    /// `Client::register`: only the body is bounded once the head is in. (Found by review:
    /// the line's bound on the rest of an answer, 2 s, failed such a registration, which
    /// Lambda had made.)
    #[tokio::test(start_paused = true)]
    async fn a_head_that_trickles_in_still_registers() {
        let (_, _, result) = against_in(
            &[
                "HTTP/1.1 200 OK\r\n",
                "Lambda-Extension-Identifier: ext-9\r\n",
                "Content-Length: 2\r\n\r\n{}",
            ],
            Duration::from_millis(1500),
            false,
        )
        .await;
        assert_eq!(result.expect("registered").extension_id, "ext-9");
    }

    #[tokio::test]
    async fn an_answer_with_many_header_fields_registers() {
        let fields: String = (0..40).map(|i| format!("X-Field-{i}: v\r\n")).collect();
        let answer = format!(
            "HTTP/1.1 200 OK\r\n{fields}Lambda-Extension-Identifier: ext-9\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let (_, _, result) = against(answer.leak(), false).await;
        assert_eq!(result.expect("registered").extension_id, "ext-9");
    }

    /// A 2xx answer refused for its framing still carries the identifier: Lambda has
    /// registered the extension, whatever the order of the header fields. Found by review: the
    /// identifier was only seen in the fields before the one refused, so the same answer
    /// registered or not by the order of its fields.
    #[tokio::test]
    async fn a_2xx_head_refused_for_its_framing_registers_whatever_the_order_of_its_fields() {
        for answer in [
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-9\r\nContent-Length: x\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\nLambda-Extension-Identifier: ext-9\r\n\r\n{}",
        ] {
            let (_, _, result) = against(answer, false).await;
            let registration = result.unwrap_or_else(|e| panic!("{answer:?}: {e}"));
            assert_eq!(registration.extension_id, "ext-9");
        }
    }

    /// The identifier goes back as a header on every `event/next`: one that cannot (bytes past
    /// ASCII) is refused with the reason, as `Client::register` refuses it. Found by review:
    /// it was accepted here, and refused as missing there.
    #[tokio::test]
    async fn an_identifier_past_ascii_is_refused_with_the_reason() {
        let (_, _, result) = against(
            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-é\r\nContent-Length: 2\r\n\r\n{}",
            false,
        )
        .await;
        assert!(
            matches!(&result, Err(ClientError::Malformed(m)) if m.contains("not visible ASCII") && m.contains("ext-é")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_refusal_is_an_api_error_and_an_answer_without_identifier_is_malformed() {
        let (_, _, result) = against(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 61\r\n\r\n\
             {\"errorMessage\":\"too late\",\"errorType\":\"Extension.Forbidden\"}",
            false,
        )
        .await;
        match result {
            Err(ClientError::Api {
                status, error_type, ..
            }) => {
                assert_eq!(
                    (status, error_type.as_deref()),
                    (403, Some("Extension.Forbidden"))
                );
            }
            other => panic!("{other:?}"),
        }
        let (_, _, result) = against("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", false).await;
        assert!(
            matches!(&result, Err(ClientError::Malformed(m)) if m.contains("Lambda-Extension-Identifier")),
            "{result:?}"
        );
        // Closed before any answer: a transport error that names the call.
        let (_, _, result) = against("", false).await;
        assert!(
            matches!(&result, Err(ClientError::Transport(m)) if m.starts_with("register:")),
            "{result:?}"
        );
    }
}
