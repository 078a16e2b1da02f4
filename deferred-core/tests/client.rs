//! The Extensions API client against a scripted server: URLs (with an
//! `AWS_LAMBDA_RUNTIME_API` path prefix), headers, and error answers decoded, never panicking.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use deferred_core::extension::{Client, ClientError, NextEvent};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Seen = Arc<Mutex<Vec<(String, String, Option<String>, String)>>>;

/// Serves `answer(path)` for every request; records (method, path, extension id header, body).
async fn serve(
    answer: impl Fn(&str) -> (u16, Vec<(&'static str, &'static str)>, &'static str)
    + Send
    + Sync
    + 'static,
) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("test server");
    let addr = listener.local_addr().expect("test server");
    let seen: Seen = Arc::default();
    let answer = Arc::new(answer);
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("test server");
            let (answer, record) = (answer.clone(), record.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (answer, record) = (answer.clone(), record.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let id = req
                            .headers()
                            .get("Lambda-Extension-Identifier")
                            .map(|v| v.to_str().expect("test server").to_owned());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .expect("test server")
                            .to_bytes();
                        record.lock().expect("test server").push((
                            method,
                            path.clone(),
                            id,
                            String::from_utf8_lossy(&body).into_owned(),
                        ));
                        let (status, headers, body) = answer(&path);
                        let mut response = Response::builder().status(status);
                        for (k, v) in headers {
                            response = response.header(k, v);
                        }
                        Ok::<_, Infallible>(
                            response
                                .body(Full::new(Bytes::from(body)))
                                .expect("test server"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr.to_string(), seen)
}

const INVOKE: &str = r#"{"eventType":"INVOKE","deadlineMs":1700000000000,"requestId":"req-1","invokedFunctionArn":"arn"}"#;

#[tokio::test]
async fn register_and_next_keep_the_path_prefix_and_send_the_identifier() {
    let (addr, seen) = serve(|path| match path {
        "/my-fn/2020-01-01/extension/register" => (
            200,
            vec![(
                "Lambda-Extension-Identifier",
                "0b3c1e5d-0000-4000-8000-000000000001",
            )],
            r#"{"functionName":"f","functionVersion":"$LATEST","handler":"h"}"#,
        ),
        "/my-fn/2020-01-01/extension/event/next" => (200, vec![], INVOKE),
        _ => (404, vec![], ""),
    })
    .await;
    let client = Client::new(&format!("{addr}/my-fn")).unwrap();
    let registration = client
        .register("lambda-deferred-test", &["INVOKE"])
        .await
        .unwrap();
    assert_eq!(
        registration.extension_id,
        "0b3c1e5d-0000-4000-8000-000000000001"
    );
    assert_eq!(registration.function_name, "f");
    let event = client.next_event(&registration.extension_id).await.unwrap();
    assert!(matches!(event, NextEvent::Invoke(e) if e.request_id == "req-1"));

    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, "POST");
    assert_eq!(seen[0].3, r#"{"events":["INVOKE"]}"#);
    assert_eq!(seen[1].1, "/my-fn/2020-01-01/extension/event/next");
    assert_eq!(
        seen[1].2.as_deref(),
        Some("0b3c1e5d-0000-4000-8000-000000000001")
    );
}

#[tokio::test]
async fn error_answers_carry_the_api_error_type() {
    let (addr, _) = serve(|path| match path {
        "/2020-01-01/extension/register" => (
            403,
            vec![],
            r#"{"errorMessage":"Registration is closed","errorType":"Extension.RegistrationClosed"}"#,
        ),
        "/2020-01-01/extension/event/next" => (500, vec![], "<html>oops</html>"),
        _ => (202, vec![], r#"{"status":"OK"}"#),
    })
    .await;
    let client = Client::new(&addr).unwrap();
    let refused = client.register("x", &["INVOKE"]).await.unwrap_err();
    assert_eq!(
        refused,
        ClientError::Api {
            status: 403,
            error_type: Some("Extension.RegistrationClosed".into()),
            message: "Registration is closed".into()
        }
    );
    let broken = client.next_event("id").await.unwrap_err();
    assert!(
        matches!(
            broken,
            ClientError::Api {
                status: 500,
                error_type: None,
                ..
            }
        ),
        "{broken}"
    );
    client
        .init_error("id", "Extension.Fatal", "boom")
        .await
        .unwrap();
    client
        .exit_error("id", "Extension.Fatal", "boom")
        .await
        .unwrap();
}

#[tokio::test]
async fn protocol_violations_are_errors() {
    let (addr, _) = serve(|path| match path {
        // 200 without the identifier header.
        "/2020-01-01/extension/register" => (200, vec![], "{}"),
        _ => (200, vec![], r#"{"eventType":"INVOKE"}"#),
    })
    .await;
    let client = Client::new(&addr).unwrap();
    assert!(matches!(
        client.register("x", &["INVOKE"]).await,
        Err(ClientError::Malformed(_))
    ));
    assert!(matches!(
        client.next_event("id").await,
        Err(ClientError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let client = Client::new(&addr).unwrap();
    let error = client.register("x", &["INVOKE"]).await.unwrap_err();
    assert!(matches!(error, ClientError::Transport(_)), "{error}");
}
