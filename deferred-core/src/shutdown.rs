//! SIGTERM: Lambda sends it before stopping an environment with extensions registered, and
//! gives internal extensions 500 ms (Extensions API docs, "Shutdown phase"). The core flushes
//! everything it can within that, then exits.

use std::sync::Arc;

use tokio::time::Instant;

use crate::core::Core;
use crate::phase::run_flushes;
use crate::report::{PhaseKind, PhaseReport};
use crate::scope::lock;

/// How long stopped phases get to drop their abandoned actions.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Listens for SIGTERM; on it, runs the final flush and exits with status 0.
pub(crate) fn install(core: Arc<Core>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(target: "deferred", %error, "cannot listen for SIGTERM: no final flush on shutdown");
                return;
            }
        };
        tokio::spawn(async move {
            if term.recv().await.is_some() {
                final_flush(&core).await;
                std::process::exit(0);
            }
        });
    }
    #[cfg(not(unix))]
    let _ = core;
}

/// Waits (bounded) for a running phase and the background phases, then flushes every
/// flusher, all within `shutdown_timeout`.
pub(crate) async fn final_flush(core: &Core) -> PhaseReport {
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let end = started + core.config.shutdown_timeout;
    let half = started + core.config.shutdown_timeout / 2;
    let mut background = std::mem::take(&mut *lock(&core.background));
    // First half: running phases (the chained one, background ones on Managed Instances) may
    // finish on their own; their actions carry the last invocations' work.
    let _ = tokio::time::timeout_at(half, async {
        drop(core.phase_lock.lock().await);
        while background.join_next().await.is_some() {}
    })
    .await;
    // Then stop them: each abandons its action (dropping it closes the spans it holds) and
    // leaves the flush to us.
    core.stopping.send_replace(true);
    let stopped = end.min(half + STOP_GRACE);
    let _serial = tokio::time::timeout_at(stopped, core.phase_lock.lock()).await;
    let _ = tokio::time::timeout_at(stopped, async {
        while background.join_next().await.is_some() {}
    })
    .await;
    background.abort_all();

    let mut cut = Vec::new();
    let flushes = run_flushes(&core.config.flushers, end, started, &mut cut).await;
    // Its own spans and metrics cannot be exported (this was the last flush); its log line,
    // the failure counter and `on_report` still see it.
    core.finish(PhaseReport {
        request_id: String::new(),
        invocation_span: None,
        kind: PhaseKind::Shutdown,
        started: started_wall,
        actions: Vec::new(),
        flushes,
        duration: started.elapsed(),
        cut,
        consecutive_flush_failures: 0,
        spans_lost: None,
        spans_dropped: None,
    })
}
