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
    let serial = tokio::time::timeout_at(stopped, core.phase_lock.lock()).await;
    let _ = tokio::time::timeout_at(stopped, async {
        while background.join_next().await.is_some() {}
    })
    .await;
    // A phase still running now is stuck where stopping cannot reach it (an action or hook
    // that blocks its thread): it will not report. Say so here, rather than nothing.
    let (chained, aborted) = (serial.is_err(), background.len());
    background.abort_all();
    let mut cut = Vec::new();
    if chained || aborted > 0 {
        tracing::warn!(
            target: "deferred",
            chained_phase_running = chained,
            background_phases_aborted = aborted,
            "SIGTERM: deferred phases that did not stop are abandoned without a report; \
             their actions may not have run"
        );
        cut.push(crate::report::CutReason::Shutdown);
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::core::{Config, Mode, ReportHook};
    use crate::phase::Job;
    use crate::report::CutReason;
    use crate::scope::Queue;

    /// A background phase stuck where stopping cannot reach it (its `on_report` hook blocks
    /// the thread) is abandoned: the final flush goes on without it, and its report says
    /// work was cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_phase_that_does_not_stop_is_named_in_the_final_report() {
        let blocked = Arc::new(AtomicBool::new(false));
        let first = blocked.clone();
        let core = Core::new(
            Config {
                shutdown_timeout: Duration::from_millis(200),
                phase_telemetry: false,
                on_report: Some(ReportHook(Arc::new(move |_| {
                    if !first.swap(true, Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1500));
                    }
                }))),
                ..Config::default()
            },
            Mode::Inline,
        );
        core.spawn_background(Job {
            request_id: "r-1".into(),
            deadline: None,
            queue: Queue::new(0),
            flush_timeout: Duration::from_secs(1),
            parent: None,
        });
        while !blocked.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = final_flush(&core).await;
        assert_eq!(report.cut, vec![CutReason::Shutdown], "{report}");

        // With nothing running, nothing is cut.
        let core = Core::new(Config::default(), Mode::Inline);
        let report = final_flush(&core).await;
        assert!(report.cut.is_empty(), "{report}");
    }
}
