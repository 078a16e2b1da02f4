//! The function side of the emulator's test-only `POST /__testkit/mark` endpoint: fixtures
//! post marks so tests can order their work against the protocol timeline.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Posts `text` as a mark of invocation `request_id` to the emulator at
/// `AWS_LAMBDA_RUNTIME_API`, with a minimal HTTP/1.1 request on a connection of its own. Does
/// nothing outside the emulator; a failure to post is ignored (the test then misses the mark).
pub async fn mark(request_id: &str, text: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(&api).await else {
        return;
    };
    let request = format!(
        "POST /__testkit/mark HTTP/1.1\r\nHost: {api}\r\nLambda-Runtime-Aws-Request-Id: {request_id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    if stream.write_all(request.as_bytes()).await.is_ok() {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
    }
}
