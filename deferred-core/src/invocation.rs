//! One invocation from the wrapper's side: take a ticket, run the body in its scope, hand the
//! queue over (or run it inline), even when the body panics or its future is dropped.

use std::future::Future;
use std::panic::resume_unwind;
use std::pin::pin;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::SpanContext;

use crate::context::Invocation;
use crate::core::{Config, Core, Mode, Ticket};
use crate::report::PhaseKind;
use crate::scope::{Options, Queue, caught, with_queue};

/// The rewritten handler's body: [`run_on`] the process's core. Not an `async fn` of its own:
/// a second state machine around `run_on`'s would be moved with it on every poll.
pub(crate) fn run<F: Future>(
    invocation: Invocation,
    options: Options,
    body: F,
) -> impl Future<Output = F::Output> {
    run_on(current_core(), invocation, options, body)
}

/// [`run`] on a given core (the ordering harness drives cores of its own).
pub(crate) async fn run_on<F: Future>(
    core: Arc<Core>,
    invocation: Invocation,
    options: Options,
    body: F,
) -> F::Output {
    let ticket = core.begin(&invocation);
    let before = match &ticket {
        Ticket::Chained(request_id) => core.queued_before(request_id),
        Ticket::Inline | Ticket::Background => 0,
    };
    let queue = Queue::after(core.config.max_actions, before);
    // Taken before the body runs: lambda_runtime polls this future inside the invocation's
    // span, and the body may enter spans of its own.
    let parent = if core.config.phase_telemetry {
        crate::otel::current_span()
    } else {
        None
    };
    let mut guard = HandOver {
        core: &core,
        ticket: &ticket,
        invocation: &invocation,
        queue: &queue,
        options,
        parent,
        armed: true,
    };

    let mut body = pin!(with_queue(queue.clone(), body));
    // Caught so that a panicking handler still gets its actions and flush; re-raised below for
    // lambda_runtime to report as the invocation's error.
    let result = caught(body.as_mut()).await;

    core.await_event(&ticket, invocation.deadline).await;
    let job = core.job(
        &invocation,
        queue.clone(),
        options.flush_timeout,
        guard.parent.take(),
    );
    if let Some(job) = core.dispatch(&ticket, job, "inline") {
        // Still armed: should this future be dropped during the phase (a timeout around the
        // handler), the guard hands what is left in the queue (and the flush) over.
        //
        // Boxed: the phase's future is about 1.5 KB, and unboxed it would make every
        // handler's future (moved several times per invocation by the runtime's layers) that
        // much larger for a path only the fallbacks take.
        Box::pin(core.run_phase(job, PhaseKind::Inline)).await;
        core.closed_work_done(&invocation.request_id);
    }
    guard.armed = false;
    match result {
        Ok(output) => output,
        Err(panic) => resume_unwind(panic),
    }
}

/// The core of this process, or an inline one when `Deferred::start` never ran (a unit test
/// calling the handler directly, or a function that forgot `start`).
fn current_core() -> Arc<Core> {
    if let Some(core) = Core::global() {
        return core.clone();
    }
    static FALLBACK: OnceLock<Arc<Core>> = OnceLock::new();
    FALLBACK
        .get_or_init(|| {
            tracing::info!(
                target: "deferred",
                "no Deferred::start() or Deferred::run() in this process: deferred actions run \
                 inline before the handler returns, and nothing is flushed"
            );
            Core::new(Config::default(), Mode::Inline)
        })
        .clone()
}

/// Hands the queue over if the handler's future is dropped before it completes.
struct HandOver<'a> {
    core: &'a Arc<Core>,
    ticket: &'a Ticket,
    invocation: &'a Invocation,
    queue: &'a Arc<Queue>,
    options: Options,
    parent: Option<SpanContext>,
    armed: bool,
}

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let idle = self.queue.len() == 0 && self.core.config.flushers.is_empty();
        if matches!(self.ticket, Ticket::Background) && runtime.is_err() {
            // Its dispatch spawns a task, which would panic here, in a drop.
            if !idle {
                lost(self.invocation, self.queue);
            }
            return;
        }
        let job = self.core.job(
            self.invocation,
            self.queue.clone(),
            self.options.flush_timeout,
            self.parent.take(),
        );
        let waits_for_event =
            matches!(self.ticket, Ticket::Chained(_)) && !self.core.layer_installed();
        if let (Ok(runtime), true) = (&runtime, waits_for_event) {
            // Without the layer nothing parks a job for an INVOKE event still on its way:
            // handed over now, it would be refused and run loose while the event is released,
            // so Lambda could freeze it. A task waits for the event, as `run` does.
            if !idle {
                dropped(
                    self.invocation,
                    "its deferred work goes to the invocation's deferred phase when the INVOKE \
                     event comes",
                );
            }
            let _entered = runtime.enter();
            self.core.hand_over_later(self.ticket.clone(), job);
            return;
        }
        let Some(job) = self.core.dispatch(self.ticket, job, "as a background task") else {
            return;
        };
        if idle {
            // No work to run outside the chain: a call held for it may go out now.
            self.core.closed_work_done(&self.invocation.request_id);
            return;
        }
        // Cannot await in drop: run it as a background phase, so the work is still done if the
        // process lives on, and the SIGTERM flush waits for it.
        match runtime {
            Ok(runtime) => {
                dropped(self.invocation, "running it as a background task");
                let _entered = runtime.enter();
                self.core.spawn_background(job);
            }
            Err(_) => {
                lost(self.invocation, self.queue);
                self.core.closed_work_done(&self.invocation.request_id);
            }
        }
    }
}

/// Says that a handler future was dropped before it completed, and where its work goes.
fn dropped(invocation: &Invocation, then: &str) {
    tracing::warn!(
        target: "deferred",
        request_id = %invocation.request_id,
        "the handler's future was dropped before it completed (a timeout around it?): {then}"
    );
}

/// Says that the work of a handler future dropped outside a tokio runtime is lost.
fn lost(invocation: &Invocation, queue: &Queue) {
    tracing::error!(
        target: "deferred",
        request_id = %invocation.request_id,
        actions = queue.len(),
        "the handler's future was dropped outside a tokio runtime: its deferred actions are lost"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::scope::defer;

    fn invocation() -> Invocation {
        Invocation {
            request_id: String::new(),
            deadline: None,
        }
    }

    /// A deferred handler called by another joins its invocation's one phase: its own
    /// `flush_timeout` counts for that phase's flush, as for calls in a row (the longest
    /// applies). It was ignored: a router's 100 ms cut the flush its route asked 2 s for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nested_handlers_flush_timeout_counts_for_the_invocations_flush() {
        let outcome = |outer: Option<u64>, nested: Option<Option<u64>>| {
            let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = reports.clone();
            let config = crate::Deferred::new()
                .flush_timeout(Duration::from_millis(150))
                .flush(crate::flush_fn("slow", || {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok::<(), String>(())
                }))
                .on_report(move |report| seen.lock().unwrap().push(report.flushes.clone()))
                .config;
            let core = Core::new(config, Mode::Inline);
            let options = |ms: Option<u64>| Options {
                flush_timeout: ms.map(Duration::from_millis),
            };
            async move {
                run_on(core, invocation(), options(outer), async move {
                    if let Some(ms) = nested {
                        crate::scope::scope(invocation(), options(ms), async {}).await;
                    }
                })
                .await;
                let reports = reports.lock().unwrap();
                assert_eq!(reports.len(), 1, "one phase for the invocation");
                reports[0][0].outcome.clone()
            }
        };
        use crate::FlushOutcome::{Ok as Flushed, TimedOut};
        // The router's 100 ms, or the builder's 150 ms, alone: the 400 ms flush is cut.
        assert_eq!(outcome(Some(100), None).await, TimedOut);
        assert_eq!(outcome(None, None).await, TimedOut);
        // Its route asks 2 s: the flush gets it.
        assert_eq!(outcome(Some(100), Some(Some(2000))).await, Flushed);
        assert_eq!(outcome(None, Some(Some(2000))).await, Flushed);
        // A shorter nested one, or none (the builder's), does not shorten the router's.
        assert_eq!(outcome(Some(2000), Some(Some(100))).await, Flushed);
        assert_eq!(outcome(Some(2000), Some(None)).await, Flushed);
        // A router with 100 ms calling a route with no `flush_timeout`: the builder's 150 ms.
        assert_eq!(outcome(Some(100), Some(None)).await, TimedOut);
    }

    /// A deferred handler called by a deferred action (a helper that is also a handler) runs
    /// in the invocation's scope too: its actions join the queue and run in the same phase,
    /// after the action that called it, and its `flush_timeout` counts for that phase's flush,
    /// which comes after every action. It was ignored: the flush timeout was settled before
    /// the actions ran.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_called_by_an_action_joins_the_phase_and_its_flush_timeout_counts() {
        let outcome = |builder: u64, nested: Option<u64>| {
            let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = reports.clone();
            let config = crate::Deferred::new()
                .flush_timeout(Duration::from_millis(builder))
                .flush(crate::flush_fn("slow", || {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok::<(), String>(())
                }))
                .on_report(move |report| seen.lock().unwrap().push(report.clone()))
                .config;
            let core = Core::new(config, Mode::Inline);
            let ran = Arc::new(AtomicUsize::new(0));
            async move {
                let in_action = ran.clone();
                let options = Options {
                    flush_timeout: Some(Duration::from_millis(100)),
                };
                run_on(core, invocation(), options, async move {
                    defer(Some("calls a handler".into()), async move {
                        let nested = Options {
                            flush_timeout: nested.map(Duration::from_millis),
                        };
                        crate::scope::scope(invocation(), nested, async move {
                            defer(Some("nested".into()), async move {
                                in_action.fetch_add(1, Ordering::SeqCst);
                            })
                            .expect("queued on the invocation's queue");
                        })
                        .await;
                    })
                    .expect("queued");
                })
                .await;
                let reports = reports.lock().unwrap();
                assert_eq!(reports.len(), 1, "one phase for the invocation");
                let names: Vec<_> = reports[0]
                    .actions
                    .iter()
                    .map(|a| a.label.name.as_deref().unwrap_or_default().to_owned())
                    .collect();
                assert_eq!(names, ["calls a handler", "nested"]);
                assert_eq!(ran.load(Ordering::SeqCst), 1, "the nested action ran");
                reports[0].flushes[0].outcome.clone()
            }
        };
        use crate::FlushOutcome::{Ok as Flushed, TimedOut};
        // The handler's 100 ms alone would cut the 400 ms flush. The nested one's 2 s, or the
        // builder's 2 s when it has none, gives it the time.
        assert_eq!(outcome(150, Some(2000)).await, Flushed);
        assert_eq!(outcome(2000, None).await, Flushed);
        // Its 50 ms, or the builder's 150 ms: still cut.
        assert_eq!(outcome(150, Some(50)).await, TimedOut);
        assert_eq!(outcome(150, None).await, TimedOut);
    }

    #[tokio::test]
    async fn without_start_actions_run_inline_before_returning() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let out = run(invocation(), Options::default(), async move {
            defer(None, async move {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            7
        })
        .await;
        assert_eq!(out, 7);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_handler_still_runs_its_actions_and_the_panic_goes_on() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let handler = tokio::spawn(run(invocation(), Options::default(), async move {
            defer(None, async move {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            panic!("handler panicked");
        }));
        let error = handler.await.unwrap_err();
        assert!(error.is_panic());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_handler_future_hands_its_actions_over() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let handler = run(invocation(), Options::default(), async move {
            defer(None, async move {
                r.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            std::future::pending::<()>().await;
        });
        // Poll it once (the action is queued), then drop it mid-body.
        let _ = tokio::time::timeout(Duration::from_millis(20), handler).await;
        // A background phase of the core, which the SIGTERM flush waits for (a finished one
        // stays in the set until the next is spawned).
        assert!(!crate::scope::lock(&current_core().background).is_empty());
        for _ in 0..100 {
            if ran.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the queued action was lost");
    }

    /// Dropped during its inline phase, while an action runs: the background phase that takes
    /// the queue over waits for that action before it runs the next, so they stay in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_dropped_mid_action_keeps_its_actions_in_order() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, b) = (log.clone(), log.clone());
        let handler = run(invocation(), Options::default(), async move {
            defer(None, async move {
                a.lock().unwrap().push("a start");
                tokio::time::sleep(Duration::from_millis(300)).await;
                a.lock().unwrap().push("a end");
            })
            .unwrap();
            defer(None, async move { b.lock().unwrap().push("b") }).unwrap();
        });
        // The body is done and the inline phase runs `a` when the timeout drops it.
        let _ = tokio::time::timeout(Duration::from_millis(100), handler).await;
        for _ in 0..100 {
            if log.lock().unwrap().len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*log.lock().unwrap(), ["a start", "a end", "b"]);
    }

    /// Runs `body` as a handler on an inline core built by `builder`, drops the handler's
    /// future `drop_after` ms in (by a timeout around it, during its inline phase), and
    /// returns the one report that follows: that of the background phase that takes its work
    /// over.
    async fn reported_after_drop(
        builder: crate::Deferred,
        drop_after: u64,
        body: impl Future<Output = ()> + Send,
    ) -> crate::PhaseReport {
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let config = builder
            .on_report(move |report| seen.lock().unwrap().push(report.clone()))
            .config;
        let core = Core::new(config, Mode::Inline);
        let handler = run_on(core, invocation(), Options::default(), body);
        let _ = tokio::time::timeout(Duration::from_millis(drop_after), handler).await;
        for _ in 0..100 {
            if !reports.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reports = reports.lock().unwrap();
        let [report] = &reports[..] else {
            panic!("one report, of the background phase: {reports:?}")
        };
        report.clone()
    }

    /// Dropped during its inline phase, 100 ms into a 300 ms action: the background phase that
    /// takes the queue over reports that action with the time it ran, from when the dropped
    /// phase started it (the dropped phase never reports). It said only the time the second
    /// phase waited for it: "ok in 200ms" for an action that ran 300 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_action_taken_over_from_a_dropped_phase_is_reported_with_its_whole_run() {
        let report = reported_after_drop(crate::Deferred::new(), 100, async {
            defer(Some("slow".into()), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
            })
            .unwrap();
        })
        .await;
        assert_eq!(report.kind, crate::PhaseKind::Background);
        let [action] = &report.actions[..] else {
            panic!("{report}")
        };
        assert_eq!(action.outcome, crate::ActionOutcome::Ok);
        assert!(
            action.duration >= Duration::from_millis(300),
            "it ran 300 ms: {report}"
        );
        assert_eq!(
            action.offset,
            Duration::ZERO,
            "it started before the phase: {report}"
        );
    }

    /// Dropped during its inline phase: the actions that phase finished, and what it cut, are
    /// in the report of the phase that takes the queue over, as every action queued is. They
    /// were in no report (the dropped phase never reports): a failed action was never said,
    /// and dropped during the flush, the report listed no action at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_inline_phase_leaves_what_it_ran_to_the_next_report() {
        let run = |drop_after: u64| async move {
            let flushes = crate::Deferred::new().flush(crate::flush_fn("slow", || {
                std::thread::sleep(Duration::from_millis(300));
                Ok::<(), String>(())
            }));
            let report = reported_after_drop(flushes, drop_after, async {
                defer(Some("fails".into()), async { Err::<(), _>("HTTP 503") }).unwrap();
                defer(Some("slow".into()), async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                })
                .unwrap();
            })
            .await;
            let names: Vec<_> = report
                .actions
                .iter()
                .map(|a| (a.label.name.as_deref().unwrap_or(""), a.outcome.clone()))
                .collect();
            assert_eq!(
                names,
                [
                    ("fails", crate::ActionOutcome::Failed("HTTP 503".into())),
                    ("slow", crate::ActionOutcome::Ok),
                ],
                "dropped after {drop_after} ms: {report}"
            );
        };
        // During `slow`, then during the flush.
        run(100).await;
        run(350).await;
    }

    /// A background handler future dropped outside a tokio runtime (say, by a runtime being
    /// torn down): its work is said to be lost, rather than a panic in `drop`, which aborts
    /// the process when it is already unwinding.
    #[test]
    fn a_background_handover_dropped_outside_a_runtime_does_not_panic() {
        let core = Core::new(Config::default(), Mode::Background);
        let ticket = Ticket::Background;
        let queue = Queue::new(1);
        let invocation = invocation();
        let guard = HandOver {
            core: &core,
            ticket: &ticket,
            invocation: &invocation,
            queue: &queue,
            options: Options::default(),
            parent: None,
            armed: true,
        };
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(guard)));
        assert!(dropped.is_ok());
    }

    /// A core whose chain is broken (its `event/next` failed), and an invocation `r-1` a
    /// minute from its deadline: a handler that starts now runs its work outside the chain.
    fn broken_chain() -> (Arc<Core>, Invocation) {
        let core = Core::new(Config::default(), Mode::Extension);
        core.state
            .send_modify(|s| s.chain = crate::core::Chain::Broken);
        let at = Invocation {
            request_id: "r-1".into(),
            deadline: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
        };
        (core, at)
    }

    /// A handler that starts while the chain is broken runs its work outside the chain, and
    /// the chain's retry waits for that work (`State::running_closed`). Dropped before it
    /// queued anything, with no flusher, it has no work: the retry must not wait for it. Found
    /// by review: the wait was never lifted, and held the invocation (no `event/next`) to its
    /// phase end.
    #[tokio::test]
    async fn a_dropped_handler_with_no_work_does_not_hold_the_chain() {
        let (core, at) = broken_chain();
        let handler = run_on(
            core.clone(),
            at,
            Options::default(),
            std::future::pending::<()>(),
        );
        let _ = tokio::time::timeout(Duration::from_millis(20), handler).await;
        assert_eq!(
            core.closed_work_end(),
            None,
            "the chain's retry would wait for no work"
        );
    }

    /// A router (no layer) calls one deferred handler, then another, in an invocation that
    /// the broken chain closed. The second call's work runs outside the chain too: should its
    /// future be dropped, it becomes a background phase after the runtime is done, so the
    /// chain's retry must wait for it. Found by review: the first call's end lifted the wait,
    /// and the second call (its invocation closed already) set none.
    #[tokio::test]
    async fn a_later_call_of_a_closed_invocation_holds_the_chain_too() {
        let (core, at) = broken_chain();
        run_on(core.clone(), at.clone(), Options::default(), async {}).await;
        // The second call still runs (its body pending).
        let mut second = Box::pin(run_on(
            core.clone(),
            at,
            Options::default(),
            std::future::pending::<()>(),
        ));
        let _ = tokio::time::timeout(Duration::from_millis(20), &mut second).await;
        assert!(
            core.closed_work_end().is_some(),
            "the retry would not wait for the second call"
        );
    }

    /// As above, with the two calls running at once (`join_all`): the first call's end must
    /// not lift the wait while the second still runs. Found by review: `running_closed` held
    /// one call, and the first to end lifted it.
    #[tokio::test]
    async fn calls_of_a_closed_invocation_running_at_once_hold_the_chain_until_both_end() {
        let (core, at) = broken_chain();
        let go = Arc::new(tokio::sync::Notify::new());
        let g = go.clone();
        let mut first = Box::pin(run_on(
            core.clone(),
            at.clone(),
            Options::default(),
            async move { g.notified().await },
        ));
        let _ = tokio::time::timeout(Duration::from_millis(10), &mut first).await;
        let mut second = Box::pin(run_on(
            core.clone(),
            at,
            Options::default(),
            std::future::pending::<()>(),
        ));
        let _ = tokio::time::timeout(Duration::from_millis(10), &mut second).await;
        go.notify_one();
        first.await;
        assert!(
            core.closed_work_end().is_some(),
            "the retry would not wait for the second call"
        );
        // The second call dropped with no work left: the wait is over.
        drop(second);
        assert_eq!(core.closed_work_end(), None);
    }

    /// A deferred handler called by another joins the caller's invocation: its action waits
    /// for the invocation's phase, after the caller's body, instead of a phase of its own.
    #[tokio::test]
    async fn a_handler_called_by_another_joins_its_invocation() {
        let (outer, inner) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, i) = (outer.clone(), inner.clone());
        let ran = inner.clone();
        crate::scope::scope(invocation(), Options::default(), async move {
            defer(None, async move {
                o.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            crate::scope::scope(invocation(), Options::default(), async move {
                defer(None, async move {
                    i.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
            })
            .await;
            assert_eq!(
                ran.load(Ordering::SeqCst),
                0,
                "ran before the caller's body ended"
            );
        })
        .await;
        assert_eq!(
            (outer.load(Ordering::SeqCst), inner.load(Ordering::SeqCst)),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn defer_outside_a_handler_is_an_error_not_a_silent_drop() {
        let error = defer(Some("x".into()), async {}).unwrap_err();
        assert!(matches!(error, crate::DeferError::OutsideHandler { .. }));
        assert!(error.to_string().contains("outside a #[deferred_handler]"));
    }

    /// Every handler's future holds this one, and the runtime's layers move it several times
    /// per invocation (each move a `memcpy`): the inline phase, which only the fallbacks run,
    /// is boxed so as not to add its 1.5 KB to it.
    #[test]
    fn the_wrappers_future_stays_small() {
        let options = Options {
            flush_timeout: None,
        };
        let future = run(invocation(), options, async {});
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1024, "{size} bytes");
    }
}
