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
use crate::snapstart::{RestoreWatch, Restores};

/// A registration in flight.
pub(crate) type Registering =
    Pin<Box<dyn Future<Output = Result<Registration, ClientError>> + Send>>;

/// A registration `start` stopped waiting for, still in flight.
pub(crate) struct Pending {
    pub(crate) client: Arc<Client>,
    pub(crate) registration: Registering,
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
        // Lambda's usual environment (Managed Instances register nothing): its grace applies.
        crate::builder::say_past_the_grace(&core.config, true, true);
        crate::shutdown::install(core);
    }
    acknowledge(pending.client, registration.extension_id).await;
}

/// Calls `event/next` again as soon as each event arrives, holding nothing, until SHUTDOWN or
/// the end of the process: for a registered extension whose deferred work runs inline.
pub(crate) async fn acknowledge(client: Arc<Client>, extension_id: String) {
    acknowledge_with(client, extension_id, Restores::global()).await;
}

/// [`acknowledge`], watching `restores`.
async fn acknowledge_with(client: Arc<Client>, extension_id: String, restores: Arc<Restores>) {
    // Its `event/next` is in flight across a SnapStart snapshot too: watch the restores as the
    // chain does (but keep no call that a refused probe found counted: `next_event`).
    let mut restores = restores.watch();
    let mut failures: u32 = 0;
    loop {
        let next = restores
            .next_event(|| client.next_event(&extension_id), || client.reset_pool())
            .await;
        if !acknowledged(next, &mut failures, &mut restores).await {
            return;
        }
    }
}

/// What an acknowledging extension does with the answer to one `event/next` call: nothing
/// for an event, a backoff after a failure (`failures` in a row, the first one logged);
/// `false` for SHUTDOWN, after which it calls no more.
pub(crate) async fn acknowledged(
    next: Result<NextEvent, ClientError>,
    failures: &mut u32,
    restores: &mut RestoreWatch,
) -> bool {
    match next {
        Ok(NextEvent::Invoke(_)) => *failures = 0,
        Ok(NextEvent::Shutdown(_)) => return false,
        Err(error) => {
            *failures = failures.saturating_add(1);
            if *failures == 1 {
                tracing::warn!(target: "deferred", %error, "event/next failed (acknowledging extension); retrying");
            }
            // A restore ends the backoff, as the chain's: `after_restore` waits until the
            // next call has settled it.
            tokio::select! {
                () = tokio::time::sleep(crate::chain::backoff(*failures)) => {}
                _ = restores.changed() => {}
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;
    use crate::extension::line::tests::{request, with_status};

    /// An acknowledging extension whose `event/next` keeps failing backs off up to a second
    /// between calls. A SnapStart restore meanwhile must end the backoff, as it does the
    /// chain's: the restore is settled (and `after_restore` returns) at once, not after the
    /// rest of the backoff, which would hold the restore up to its settle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_ends_the_backoff_of_an_acknowledging_extension() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let client = Arc::new(Client::new(&authority).expect("client"));
        let restores = Restores::new();
        tokio::spawn(acknowledge_with(client, "ext-1".into(), restores.clone()));
        let failed = with_status(
            "500 Internal Server Error",
            r#"{"errorMessage":"down","errorType":"Unknown"}"#,
        );
        let (mut api, _) = listener.accept().await.expect("accept");
        // Eight failures in a row: the backoff after the last one is its longest (1 s).
        for _ in 0..8 {
            request(&mut api).await;
            api.write_all(failed.as_bytes()).await.expect("write");
        }
        // Ordering only: the last answer read, its backoff begun (had it not, the restore
        // would be taken by the call in flight: a false pass, never a false failure).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let hook = crate::snapstart::SnapStartHook::new(
            crate::core::Core::new(crate::core::Config::default(), crate::core::Mode::Inline),
            restores,
        );
        lambda_runtime::SnapStartResource::after_restore(&hook)
            .await
            .expect("never fails");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the restore was settled {:?} after it was announced",
            started.elapsed()
        );
    }

    /// A registration that answers late installs the core's SIGTERM handler, whose final
    /// flush is bounded by `shutdown_timeout`: one longer than the 500 ms Lambda gives the
    /// runtime is said, as `start` says it when the registration answers in time. (Before,
    /// only `start` said it, and only for a registration in time: with a late one, the final
    /// flush was killed mid-export with no line saying why.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_late_registration_says_a_shutdown_timeout_past_lambdas_grace() {
        let said = Arc::new(std::sync::Mutex::new(Vec::new()));
        let _default =
            tracing::subscriber::set_default(crate::core::tests::OnEvent::messages(said.clone()));
        let core = Core::new(
            crate::core::Config {
                shutdown_timeout: Duration::from_millis(800),
                ..crate::core::Config::default()
            },
            crate::core::Mode::Inline,
        );
        // Nothing listens behind the client: the acknowledging calls fail and back off.
        let client = Arc::new(Client::new("127.0.0.1:9").expect("client"));
        let registration: Registering = Box::pin(async {
            Ok(Registration {
                extension_id: "ext-1".into(),
                function_name: String::new(),
                function_version: String::new(),
            })
        });
        let pending = Pending {
            client,
            registration,
        };
        let _ = tokio::time::timeout(Duration::from_millis(100), pass_through(pending, core)).await;
        let said = crate::scope::lock(&said).clone();
        assert!(
            said.iter()
                .any(|m| m.contains("shutdown_timeout is longer")),
            "{said:?}"
        );
    }
}
