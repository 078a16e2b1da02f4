//! The chain's logs reach the subscriber a function installs after `start`: the chain's
//! thread follows the global default rather than keeping the none it saw at `start`. A file
//! of its own: `start` succeeds once per process, and the global default is set once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deferred_core::{Deferred, Mode};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Records the messages of the events it sees.
#[derive(Default)]
struct Messages(Arc<Mutex<Vec<String>>>);

struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            *self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Messages {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0.lock().expect("messages").push(message);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Reads one request (its head, and a body of its `Content-Length`); false at the end.
async fn read_request(stream: &mut BufReader<TcpStream>) -> bool {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return false;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.is_ok()
}

/// Runs [`in_lambda`] in a child process of this test binary, with `AWS_LAMBDA_RUNTIME_API`
/// pointing at its stand-in API (the environment of this process cannot be set safely).
#[test]
fn the_chains_logs_reach_a_subscriber_installed_after_start() {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener =
        runtime.block_on(async { TcpListener::bind("127.0.0.1:0").await.expect("bind") });
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let exe = std::env::current_exe().expect("this test binary");
    let status = std::process::Command::new(exe)
        .args(["--exact", "in_lambda", "--nocapture", "--test-threads=1"])
        .env("AWS_LAMBDA_RUNTIME_API", &addr)
        .env("CHAIN_LOGS_ADDR", &addr)
        .status()
        .expect("the child test");
    assert!(status.success(), "in_lambda failed: {status}");
}

/// The function's side: `start` registers with the stand-in API before a subscriber is
/// installed; the chain's first call then fails, which the chain logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_lambda() {
    let Ok(addr) = std::env::var("CHAIN_LOGS_ADDR") else {
        // Run by the test above only.
        return;
    };
    let listener = TcpListener::bind(&addr).await.expect("bind");
    let api = tokio::spawn(async move {
        // The registration, then the chain's first event/next (its own connection).
        let (register, _) = listener.accept().await.expect("accept");
        let mut register = BufReader::new(register);
        assert!(read_request(&mut register).await, "the registration");
        register
            .get_mut()
            .write_all(
                b"HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-1\r\n\
                  Content-Length: 2\r\n\r\n{}",
            )
            .await
            .expect("write");
        let (next, _) = listener.accept().await.expect("accept");
        let mut next = BufReader::new(next);
        assert!(read_request(&mut next).await, "the first event/next");
        (listener, register, next)
    });
    let deferred = Deferred::new()
        .handle_sigterm(false)
        .start()
        .await
        .expect("started");
    assert_eq!(deferred.mode(), Mode::Extension);
    let (_listener, _register, mut next) = tokio::time::timeout(Duration::from_secs(5), api)
        .await
        .expect("the chain's first event/next")
        .expect("api");

    // As a function that sets its subscriber up after `start`.
    let messages = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(Messages(messages.clone())).expect("global");
    // The chain's call fails: it says so.
    next.get_mut()
        .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .expect("write");
    let said = || {
        messages
            .lock()
            .expect("messages")
            .iter()
            .any(|m| m.contains("event/next failed"))
    };
    let t0 = std::time::Instant::now();
    while !said() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the chain's warning never reached the subscriber: {:?}",
            messages.lock().expect("messages")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
