//! Generic handlers: type parameters, bounds inline and in a `where` clause.
use deferred_core::{defer, deferred_handler};
use lambda_runtime::{Context, Error, LambdaEvent, service_fn};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[deferred_handler(flush_timeout = "2s")]
pub(crate) async fn echo<T, U: Default>(event: LambdaEvent<T>) -> Result<(T, U), Error>
where
    T: DeserializeOwned + Serialize + Clone + Send + 'static,
{
    let copy = event.payload.clone();
    defer!(async move { drop(copy) });
    Ok((event.payload, U::default()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _runner = lambda_runtime::run(service_fn(echo::<Vec<u8>, u8>));

    let event = LambdaEvent::new("payload".to_owned(), Context::default());
    let (payload, extra): (String, u8) = echo(event).await.unwrap();
    assert_eq!(payload, "payload");
    assert_eq!(extra, 0);
}
