//! A registration that answers after `start` stopped waiting for it.
//!
//! By then the core runs deferred work inline. But Lambda did register the extension, and it
//! ends init, and then every invocation, only once each registered extension has called
//! `event/next` (Extensions API docs, "Init phase" and "Invoke phase"). Left alone, such an
//! extension would hold init until Lambda's 10 s limit and fail it. So keep calling
//! `event/next` at once, holding nothing: Lambda is never kept waiting for us.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::core::Core;
use crate::extension::{Client, ClientError, NextEvent, Registration};

/// A registration `start` stopped waiting for, still in flight.
pub(crate) struct Pending {
    pub(crate) client: Arc<Client>,
    pub(crate) registration:
        Pin<Box<dyn Future<Output = Result<Registration, ClientError>> + Send>>,
}

/// Awaits the registration that `start` gave up on; if it succeeds after all, listens for
/// SIGTERM (Lambda now sends it, with an internal extension's 500 ms, before stopping the
/// environment: without a handler the process would die with spans still batched) and
/// acknowledges every event at once until SHUTDOWN or the end of the process.
pub(crate) async fn pass_through(pending: Pending, core: Arc<Core>) {
    let Ok(registration) = pending.registration.await else {
        // Refused or failed: Lambda does not count the extension in, nothing to do.
        return;
    };
    tracing::warn!(
        target: "deferred",
        "extension registration answered after the register timeout: the extension now only \
         acknowledges events, so Lambda does not wait for it; deferred work stays inline"
    );
    if core.config.handle_sigterm {
        crate::shutdown::install(core);
    }
    acknowledge(pending.client, registration.extension_id).await;
}

/// Calls `event/next` again as soon as each event arrives, holding nothing, until SHUTDOWN or
/// the end of the process: for a registered extension whose deferred work runs inline.
pub(crate) async fn acknowledge(client: Arc<Client>, extension_id: String) {
    // Its `event/next` is in flight across a SnapStart snapshot too: watch the restores as the
    // chain does.
    let mut restores = crate::snapstart::Restores::global().watch();
    let mut failures: u32 = 0;
    loop {
        let next = restores
            .next_event(|| client.next_event(&extension_id), || client.reset_pool())
            .await;
        match next {
            Ok(NextEvent::Invoke(_)) => failures = 0,
            Ok(NextEvent::Shutdown(_)) => return,
            Err(error) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(target: "deferred", %error, "event/next failed (acknowledging extension); retrying");
                }
                tokio::time::sleep(crate::chain::backoff(failures)).await;
            }
        }
    }
}
