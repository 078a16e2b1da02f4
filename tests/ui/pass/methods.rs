//! Methods: `&self`, `&mut self` and `self: Arc<Self>` receivers, and a shared handler behind
//! `service_fn`.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

struct Handler {
    greeting: String,
    calls: Arc<AtomicUsize>,
}

impl Handler {
    #[deferred_handler]
    async fn handle(&self, event: LambdaEvent<Value>) -> Result<String, Error> {
        let calls = Arc::clone(&self.calls);
        defer!(async move {
            calls.fetch_add(1, Ordering::SeqCst);
        });
        Ok(format!(
            "{}, {}",
            self.greeting,
            event.payload["name"].as_str().unwrap_or("?")
        ))
    }

    #[deferred_handler]
    async fn rename(&mut self, event: LambdaEvent<String>) -> usize {
        self.greeting = event.payload;
        self.greeting.len()
    }

    #[deferred_handler]
    async fn owned(self: Arc<Self>, event: LambdaEvent<()>) -> usize {
        let _ = event;
        Arc::strong_count(&self)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut handler = Handler {
        greeting: "hello".to_owned(),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    assert_eq!(
        handler
            .rename(LambdaEvent::new("hi".to_owned(), Context::default()))
            .await,
        2
    );

    let event = LambdaEvent::new(json!({ "name": "Ada" }), Context::default());
    assert_eq!(handler.handle(event).await.unwrap(), "hi, Ada");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);

    let shared = Arc::new(handler);
    assert_eq!(
        Arc::clone(&shared)
            .owned(LambdaEvent::new((), Context::default()))
            .await,
        2
    );

    // The usual way to run a method: a closure that clones the shared handler.
    let _runner = lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let shared = Arc::clone(&shared);
        async move { shared.handle(event).await }
    }));
}
