//! SIGTERM: Lambda sends it to the runtime process before stopping an environment with
//! extensions registered, and kills it 500 ms later when an internal extension is registered
//! (300 ms with external ones only; Extensions API docs, "Shutdown phase"). The core flushes
//! everything it can within that, then exits.

use std::sync::Arc;

use tokio::time::Instant;

use crate::core::Core;
use crate::flush::NotStarted;
use crate::phase::run_flushes_when_free;
use crate::report::{FlushOutcome, PhaseKind, PhaseReport};
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

/// Waits (bounded) for a running phase and the background phases, and runs the jobs of
/// finished handlers still waiting for their response or INVOKE event, then flushes every
/// flusher, all within `shutdown_timeout` (SIGTERM: Lambda kills the process when its grace
/// period is over).
pub(crate) async fn final_flush(core: &Arc<Core>) -> PhaseReport {
    final_flush_after(core, None).await
}

/// [`final_flush`], giving the work in flight until `work_until` if that is later than half
/// of `shutdown_timeout`: for a drain, where no kill is coming and the work's own ends (each
/// phase's deadline minus the safety margin) bound the wait. The final flush then gets half of
/// `shutdown_timeout` from where that wait ended, but never past the end of the last phase
/// handed over while that is ahead (its invocation may still be open).
pub(crate) async fn final_flush_after(
    core: &Arc<Core>,
    work_until: Option<Instant>,
) -> PhaseReport {
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let half = (started + core.config.shutdown_timeout / 2).max(work_until.unwrap_or(started));
    let end = (started + core.config.shutdown_timeout).max(half + core.config.shutdown_timeout / 2);
    // Handler jobs waiting for an INVOKE event (`hand_over_later`) run now, in the first half.
    core.terminating.send_replace(true);
    // With the layer, a finished handler's job may wait for its response (held with its
    // event) or for its event (parked): neither will come now. They run here too.
    let mut stranded = Vec::new();
    core.state.send_if_modified(|state| {
        stranded.extend(state.parked.take());
        stranded.extend(state.slot.as_mut().and_then(|slot| slot.job.take()));
        false
    });
    // As background phases, in order: stopped with the others below (an action still running
    // is abandoned and dropped, so its spans close before the final flush), and reported,
    // rather than dropped mid-action when the first half ends.
    if !stranded.is_empty() {
        let phases = core.clone();
        core.spawn_tracked(async move {
            for job in stranded {
                phases.run_phase(job, PhaseKind::Background).await;
            }
        });
    }
    let mut background = std::mem::take(&mut *lock(&core.background));
    // First half: running phases (the chained one, background ones on Managed Instances) may
    // finish on their own; their actions carry the last invocations' work.
    let _ = tokio::time::timeout_at(half, async {
        // A phase handed to the phase thread may not hold the phase lock yet: wait until it
        // has ended.
        if let Some(runner) = core.runner.get() {
            runner.phases_ended().await;
        }
        drop(core.phase_lock.lock().await);
        join_all(core, &mut background).await;
    })
    .await;
    // The work in flight is over (or is cut now): from here the final flush gets half of
    // `shutdown_timeout` (or what is left of all of it), not half of it after `work_until`,
    // which may be the end of a phase that ended long ago. And a drain never runs past the
    // end of the last phase handed over (its deadline minus the safety margin) while that is
    // ahead: its invocation may still be open (lambda_runtime failed before answering it),
    // and Lambda kills the environment at its deadline.
    let now = Instant::now();
    let mut end = end
        .min((started + core.config.shutdown_timeout).max(now + core.config.shutdown_timeout / 2));
    if let Some(open_until) = work_until
        .filter(|w| *w > started)
        .and_then(|w| w.checked_sub(core.config.safety_margin / 2))
    {
        end = end.min(open_until.max(now));
    }
    // Then stop them: each abandons its action (dropping it closes the spans it holds) and
    // leaves the flush to us.
    core.stopping.send_replace(true);
    // At most half of what is left, so that a phase that does not stop leaves the final
    // flush time of its own also with a short `shutdown_timeout`.
    let stopped = end.min(half + STOP_GRACE.min(end.saturating_duration_since(half) / 2));
    let serial = tokio::time::timeout_at(stopped, core.phase_lock.lock()).await;
    let _ = tokio::time::timeout_at(stopped, join_all(core, &mut background)).await;
    // A phase still running now is stuck where stopping cannot reach it (an action or hook
    // that blocks its thread): it will not report. Say so here, rather than nothing.
    let mut late = std::mem::take(&mut *lock(&core.background));
    // Reaped first: a phase that finished (and reported) is not one that did not stop.
    while let Some(joined) = background.try_join_next() {
        crate::phase::drop_joined(joined);
    }
    while let Some(joined) = late.try_join_next() {
        crate::phase::drop_joined(joined);
    }
    let (chained, aborted) = (serial.is_err(), background.len() + late.len());
    background.abort_all();
    drop(late); // aborts them too
    let mut cut = Vec::new();
    if chained || aborted > 0 {
        tracing::warn!(
            target: "deferred",
            chained_phase_running = chained,
            background_phases_aborted = aborted,
            "final flush: deferred phases that did not stop: background ones are abandoned \
             without a report, a chained one reports if its flush is back by the end; their \
             actions may not have run"
        );
        cut.push(crate::report::CutReason::Shutdown);
    }
    // A flusher still busy (the flush of a phase that did not stop, or one abandoned
    // earlier) is waited for: its spans since that call began are in no other flush.
    let mut flushes = run_flushes_when_free(&core.config.flushers, end, started, &mut cut).await;
    // A chained phase that did not stop (its flush on the phase thread ran past the first
    // half) reports once that flush is back, which the flushes above waited for: let it, by
    // the end, rather than exit under its report (its `on_report` hook, its log line).
    if let Some(runner) = core.runner.get() {
        let _ = tokio::time::timeout_at(end, runner.phases_ended()).await;
    }
    // Bounded by `shutdown_timeout` here, not by a deadline or `flush_timeout`: the report
    // names the setting to change.
    let no_time = NotStarted::NoTime.to_string();
    for flush in &mut flushes {
        if matches!(&flush.outcome, FlushOutcome::NotRun(why) if *why == no_time) {
            flush.outcome = FlushOutcome::NotRun(NotStarted::NoShutdownTime.to_string());
        }
    }
    // Its own spans and metrics are not in this flush (they say what it did): only a flush
    // after it exports them (the providers' `shutdown` after `drain`; none after SIGTERM's).
    // Its log line, the failure counter and `on_report` see it.
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

/// Joins the background phases into `joined`, and those that start meanwhile (invocations
/// that end after SIGTERM on Managed Instances, a handler future dropped during shutdown),
/// until none is left.
async fn join_all(core: &Core, joined: &mut tokio::task::JoinSet<()>) {
    loop {
        // A phase's panic (its payload's drop guarded) must not end the final flush.
        while let Some(result) = joined.join_next().await {
            crate::phase::drop_joined(result);
        }
        let more = std::mem::take(&mut *lock(&core.background));
        if more.is_empty() {
            return;
        }
        *joined = more;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::core::{Config, Mode, ReportHook};
    use crate::phase::Job;
    use crate::report::{ActionOutcome, CutReason, FlushOutcome};
    use crate::scope::Queue;

    /// A flusher `name` whose first call takes `first` and whose later calls return at once,
    /// and the count of its calls.
    fn slow_first_call(
        name: &'static str,
        first: Duration,
    ) -> (crate::flush::Flusher, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let flusher = crate::flush::Flusher::new(crate::flush_fn(name, move || {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                std::thread::sleep(first);
            }
            Ok::<(), String>(())
        }));
        (flusher, calls)
    }

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

    /// A background task that panicked with a payload that panics in turn when dropped
    /// (a tracing subscriber's panic in the phase's own code, say) does not end the final
    /// flush, which still calls the flushers. Found by review: the wait for the background
    /// phases dropped the task's panic unguarded, and the payload's panic unwound out of the
    /// final flush.
    #[tokio::test]
    async fn a_background_panic_that_panics_when_dropped_does_not_end_the_final_flush() {
        let (flusher, calls) = slow_first_call("f", Duration::ZERO);
        let core = Core::new(
            Config {
                flushers: vec![flusher],
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Inline,
        );
        core.spawn_tracked(async {
            std::panic::panic_any(crate::phase::tests::PanicsWhenDropped);
        });
        let flushed = crate::scope::caught(std::pin::pin!(final_flush(&core)))
            .await
            .expect("the final flush does not panic");
        assert_eq!(flushed.flushes[0].outcome, FlushOutcome::Ok, "{flushed}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// With a short `shutdown_timeout` (100 ms) and a phase that does not stop, the wait for
    /// it to stop leaves the final flush time of its own: the free flusher flushes. (Before,
    /// the first half and the stop grace took all of 100 ms, and every flusher was reported
    /// not run.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_phase_that_does_not_stop_leaves_the_final_flush_time() {
        let blocked = Arc::new(AtomicBool::new(false));
        let first = blocked.clone();
        let flusher = crate::flush::Flusher::new(crate::flush_fn("f", || Ok::<(), String>(())));
        let core = Core::new(
            Config {
                flushers: vec![flusher],
                shutdown_timeout: Duration::from_millis(100),
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
        let started = Instant::now();
        let report = final_flush(&core).await;
        assert!(report.cut.contains(&CutReason::Shutdown), "{report}");
        // Called (done, or abandoned at the end on a loaded machine), not "no time left".
        assert!(
            !matches!(report.flushes[0].outcome, FlushOutcome::NotRun(_)),
            "{report}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{report}");
    }

    /// On Managed Instances, a background phase whose actions have run and that waits for a
    /// flusher still busy (an earlier phase's flush, a stalled exporter) when SIGTERM comes
    /// leaves its flush to the final flush once stopped, and is reported: its actions ran.
    /// (Before, it went on waiting, was aborted as a phase that did not stop, and no report
    /// said what its actions did.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_phase_waiting_for_a_busy_flusher_is_stopped_and_reported() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let first = AtomicBool::new(true);
        let busy = crate::flush::Flusher::new(crate::flush_fn("busy", move || {
            if first.swap(false, Ordering::SeqCst) {
                let _ = lock(&released).recv_timeout(Duration::from_secs(5));
            }
            Ok::<(), String>(())
        }));
        let reports: Arc<std::sync::Mutex<Vec<crate::PhaseReport>>> = Arc::default();
        let hook = reports.clone();
        let core = Core::new(
            Config {
                flushers: vec![busy.clone()],
                shutdown_timeout: Duration::from_millis(200),
                phase_telemetry: false,
                on_report: Some(ReportHook(Arc::new(move |report| {
                    lock(&hook).push(report.clone());
                }))),
                ..Config::default()
            },
            Mode::Background,
        );
        // An earlier phase's flush, still running.
        let _earlier = busy.start().expect("started");
        let ran = Arc::new(AtomicBool::new(false));
        let queue = Queue::new(10);
        let r = ran.clone();
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(
                Some("a".into()),
                async move { r.store(true, Ordering::SeqCst) },
            )
            .unwrap();
        })
        .await;
        core.spawn_background(Job {
            request_id: "r-1".into(),
            deadline: None,
            queue,
            flush_timeout: Duration::from_secs(2),
            parent: None,
        });
        while !ran.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = final_flush(&core).await;
        let _ = release.send(());
        // No phase was abandoned (no `Shutdown`); the busy flusher, waited for until the
        // end, cuts the final flush by its budget.
        assert!(
            matches!(report.cut[..], [CutReason::FlushBudget { .. }]),
            "nothing was abandoned: {report}"
        );
        let reports = lock(&reports);
        let phase = reports
            .iter()
            .find(|r| r.request_id == "r-1")
            .unwrap_or_else(|| panic!("the background phase was reported: {reports:?}"));
        assert_eq!(phase.actions[0].outcome, ActionOutcome::Ok, "{phase}");
        assert_eq!(phase.cut, [CutReason::Shutdown], "{phase}");
        assert!(phase.flushes.is_empty(), "left to the final flush: {phase}");
    }

    /// A background phase that starts after SIGTERM (an invocation that ends meanwhile, on
    /// Managed Instances) is waited for like the others, and named when it does not stop.
    /// (Before, the final flush knew only the phases running when it began.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_phase_that_starts_during_the_final_flush_is_waited_for() {
        let core = Core::new(
            Config {
                shutdown_timeout: Duration::from_millis(400),
                phase_telemetry: false,
                // The early phase takes 100 ms to report; the late one blocks its thread past
                // the final flush's waits.
                on_report: Some(ReportHook(Arc::new(|report| {
                    let ms = if report.request_id == "late" {
                        1500
                    } else {
                        100
                    };
                    std::thread::sleep(Duration::from_millis(ms));
                }))),
                ..Config::default()
            },
            Mode::Background,
        );
        let job = |id: &str| Job {
            request_id: id.into(),
            deadline: None,
            queue: Queue::new(0),
            flush_timeout: Duration::from_secs(1),
            parent: None,
        };
        // Running when SIGTERM comes: the final flush waits for it (100 ms).
        core.spawn_background(job("early"));
        let flushing = final_flush(&core);
        tokio::pin!(flushing);
        let report = tokio::select! {
            report = &mut flushing => panic!("the final flush did not wait: {report}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {
                core.spawn_background(job("late"));
                flushing.await
            }
        };
        assert_eq!(report.cut, vec![CutReason::Shutdown], "{report}");
    }

    /// A flusher still busy at SIGTERM (an earlier phase's flush, abandoned or not yet
    /// back) is waited for and then called: the spans that ended since that call began are
    /// in no other flush. (Before, it was reported not run and the process exited.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_final_flush_waits_for_a_flush_still_running() {
        let (flusher, calls) = slow_first_call("slow", Duration::from_millis(150));
        let core = Core::new(
            Config {
                flushers: vec![flusher.clone()],
                shutdown_timeout: Duration::from_millis(400),
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Inline,
        );
        // An earlier phase's call, still running when SIGTERM comes.
        let earlier = flusher.start().expect("started");
        let report = final_flush(&core).await;
        assert!(report.flushed(), "{report}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{report}");
        // Its call returned before the second began (the flusher was free again); the task
        // that ran it ends just after, not always before this line (`is_finished` here failed
        // once in CI).
        assert!(
            tokio::time::timeout(Duration::from_secs(1), earlier)
                .await
                .is_ok(),
            "the earlier call ended"
        );
    }

    /// A chained phase whose flush on the phase thread runs past the first half (it cannot be
    /// stopped) reports before the final flush ends, once that flush is back, rather than
    /// under the exit. Before: the final flush returned as soon as its own flushes were done
    /// (here about 100 ms before the phase's report; the report has 700 ms to spare now).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chained_phase_still_flushing_reports_before_the_final_flush_ends() {
        let (flusher, calls) = slow_first_call("slow", Duration::from_millis(1200));
        let reported = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let hook = reported.clone();
        let core = Core::new(
            Config {
                flushers: vec![flusher],
                shutdown_timeout: Duration::from_secs(2),
                phase_telemetry: false,
                on_report: Some(ReportHook(Arc::new(move |report| {
                    if report.request_id == "r-1" {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    lock(&hook).push(report.request_id.clone());
                }))),
                ..Config::default()
            },
            Mode::Extension,
        );
        // No API behind the line: the phase's `event/next` is only armed.
        let line = Arc::new(crate::extension::line::Line::new(
            "127.0.0.1:9",
            "",
            "ext-1",
        ));
        let runner = crate::runner::Runner::start(&core, line, tokio::runtime::Handle::current())
            .expect("a phase thread");
        let _ = core.runner.set(runner);
        core.submit(crate::core::Ready {
            job: Job {
                request_id: "r-1".into(),
                deadline: None,
                queue: Queue::new(0),
                flush_timeout: Duration::from_secs(3),
                parent: None,
            },
            seq: 1,
            end: tokio::time::Instant::now() + Duration::from_secs(4),
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let report = final_flush(&core).await;
        let reported = lock(&reported).clone();
        assert!(
            reported.iter().any(|id| id == "r-1"),
            "the chained phase reported before the final flush ended: {reported:?}; {report}"
        );
    }

    /// A flusher stuck in an earlier call holds up no other at SIGTERM: the free one flushes
    /// at once, and one that comes back in time flushes then. (A wait for each busy
    /// flusher in turn left every flusher after a stuck one not run.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_flusher_holds_up_no_other_in_the_final_flush() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let stuck = crate::flush::Flusher::new(crate::flush_fn("stuck", move || {
            let _ = crate::scope::lock(&released).recv_timeout(Duration::from_secs(5));
            Ok::<(), String>(())
        }));
        let (back_soon, calls) = slow_first_call("back-soon", Duration::from_millis(100));
        let free = crate::flush::Flusher::new(crate::flush_fn("free", || Ok::<(), String>(())));
        let core = Core::new(
            Config {
                flushers: vec![stuck.clone(), back_soon.clone(), free],
                shutdown_timeout: Duration::from_millis(400),
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Inline,
        );
        let _stuck = stuck.start().expect("started");
        let _back_soon = back_soon.start().expect("started");
        let report = final_flush(&core).await;
        release.send(()).expect("the stuck flush waits");
        let outcomes: Vec<_> = report.flushes.iter().map(|f| f.outcome.clone()).collect();
        assert!(
            matches!(&outcomes[..], [
                FlushOutcome::NotRun(why),
                FlushOutcome::Ok,
                FlushOutcome::Ok,
            ] if why.contains("still running")),
            "{report}"
        );
        // Waited for until the end: cut by the budget, as a flush that overran would be.
        assert!(
            matches!(report.cut[..], [CutReason::FlushBudget { .. }]),
            "{report}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{report}");
    }

    /// A job the final flush finds waiting for its response or event (with the layer) whose
    /// action still runs at half of `shutdown_timeout` is stopped like a running phase: the
    /// action is abandoned and dropped before the final flush (its spans close, and are in
    /// it), and its phase is reported, the action cut and the next one not run. (Before, the
    /// phase was dropped mid-action: the action ran on, unreported, its spans open.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stranded_job_still_running_at_sigterm_is_stopped_and_reported() {
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = dropped.clone();
        let dropped_at_flush = Arc::new(AtomicBool::new(false));
        let noted = dropped_at_flush.clone();
        let flusher = crate::flush::Flusher::new(crate::flush_fn("f", move || {
            noted.store(seen.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok::<(), String>(())
        }));
        let reports: Arc<std::sync::Mutex<Vec<crate::PhaseReport>>> = Arc::default();
        let hook = reports.clone();
        let core = Core::new(
            Config {
                flushers: vec![flusher],
                shutdown_timeout: Duration::from_millis(200),
                phase_telemetry: false,
                on_report: Some(ReportHook(Arc::new(move |report| {
                    lock(&hook).push(report.clone());
                }))),
                ..Config::default()
            },
            Mode::Extension,
        );
        core.layer_installed.store(true, Ordering::Release);
        let queue = Queue::new(10);
        let guard = OnDrop(dropped.clone());
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(Some("hangs".into()), async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            })
            .unwrap();
            crate::scope::defer(Some("after".into()), async {}).unwrap();
        })
        .await;
        core.state.send_modify(|s| {
            s.parked = Some(Job {
                request_id: "r-1".into(),
                deadline: None,
                queue,
                flush_timeout: Duration::from_secs(1),
                parent: None,
            });
        });
        let report = final_flush(&core).await;
        assert!(report.flushed(), "{report}");
        assert!(
            dropped_at_flush.load(Ordering::SeqCst),
            "the action was dropped before the final flush"
        );
        let reports = lock(&reports);
        let phase = reports
            .iter()
            .find(|r| r.request_id == "r-1")
            .unwrap_or_else(|| panic!("the stranded phase was reported: {reports:?}"));
        let outcomes: Vec<_> = phase.actions.iter().map(|a| a.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [ActionOutcome::TimedOut, ActionOutcome::NotRun],
            "{phase}"
        );
        assert!(phase.cut.contains(&CutReason::Shutdown), "{phase}");
    }

    /// The final flush is bounded by `shutdown_timeout`, and its report says so, not
    /// `flush_timeout` (which an engineer would raise to no effect).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_final_flush_report_names_shutdown_timeout() {
        let slow = crate::flush::Flusher::new(crate::flush_fn("slow", || {
            std::thread::sleep(Duration::from_millis(300));
            Ok::<(), String>(())
        }));
        for (timeout, outcome) in [
            (Duration::from_millis(50), "abandoned after"),
            (
                Duration::from_nanos(1),
                "not run: no time left within the shutdown_timeout",
            ),
        ] {
            let core = Core::new(
                Config {
                    flushers: vec![slow.clone()],
                    flush_timeout: Duration::from_secs(10),
                    shutdown_timeout: timeout,
                    phase_telemetry: false,
                    ..Config::default()
                },
                Mode::Inline,
            );
            let line = final_flush(&core).await.to_string();
            assert!(line.contains(outcome), "{line}");
            assert!(
                line.contains(
                    "(shutdown_timeout, or the open invocation's deadline - safety margin) ran out"
                ) && !line.contains("flush_timeout"),
                "{line}"
            );
            // The abandoned flush is still running: the next case must not wait for it.
            while slow.is_busy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
