//! The deferred phase: the actions one by one in queue order, then every flush, all within the
//! invocation's budget.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::SpanContext;
use tokio::time::Instant;

use crate::action::ActionLabel;
use crate::flush::{FlushPanic, Flusher, NotStarted};
use crate::report::{
    ActionOutcome, ActionReport, CutReason, FlushOutcome, FlushReport, PhaseKind, PhaseReport,
};
use crate::scope::{Next, Queue, RunningAction, Unreported, with_queue};

/// Lambda's longest function timeout: the bound when an invocation's deadline is unknown.
pub(crate) const MAX_FUNCTION_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The work of one invocation, handed from the wrapper to whoever runs the phase.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) request_id: String,
    /// The invocation's deadline, `None` when unknown.
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) queue: Arc<Queue>,
    /// `flush_timeout` of the handler, or of the builder.
    pub(crate) flush_timeout: Duration,
    /// The span that was current when the handler started: the phase span's parent.
    pub(crate) parent: Option<SpanContext>,
}

impl Job {
    /// Takes on the work of `later`, a later call of a deferred handler in the same invocation
    /// (a router calling one per record): its actions after these, and the longer of the two
    /// flush timeouts.
    pub(crate) fn join(&mut self, later: Job) {
        self.queue.append(&later.queue);
        self.flush_timeout = self.flush_timeout.max(later.flush_timeout);
    }
}

/// When the phase must be over: the invocation's deadline minus the safety margin.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) end: Instant,
}

impl Budget {
    /// The budget for an invocation ending at `deadline` (wall clock), keeping `margin` spare.
    pub(crate) fn new(deadline: Option<SystemTime>, margin: Duration) -> Self {
        let now = Instant::now();
        let end = match deadline {
            // Lambda stops the environment at the deadline, extension time included: the phase
            // must be over before it (Extensions API docs, "Invoke phase").
            Some(deadline) => {
                // No invocation outlives Lambda's longest timeout: a deadline further away is
                // bogus (and one too far for `Instant` would overflow), so it is capped.
                let left = deadline
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_FUNCTION_TIMEOUT);
                now + left.saturating_sub(margin)
            }
            None => now + MAX_FUNCTION_TIMEOUT,
        };
        Self { end }
    }
}

/// Runs a phase: actions (cut before they starve the flush), then flushes, then the report.
pub(crate) async fn run(
    job: Job,
    flushers: &[Flusher],
    budget: Budget,
    kind: PhaseKind,
    stop: Stop,
) -> PhaseReport {
    let mut stopping = stop.clone();
    let queue = job.queue.clone();
    let mut staged = run_actions_stage(job, flushers, budget, kind, stop).await;
    let (flush_end, started) = (staged.flush_end, staged.started);
    // Should this phase be dropped while it flushes (an inline phase under a timeout around
    // the handler), its actions' reports go to the phase that takes the queue over.
    let reports = Reports::new(&queue, std::mem::take(&mut staged.actions), &mut staged.cut);
    let flushes = match flush_end {
        // Background phases overlap: a flusher busy now is another phase's flush. The final
        // flush (SIGTERM) stops them and waits for them: stopped while it flushes (or waits for
        // a busy flusher), the phase leaves its flush to the final one, which waits for the
        // calls still running, and reports, rather than being aborted with no report.
        Some(end) if kind == PhaseKind::Background => {
            let mut cut = Vec::new();
            let flushing = run_flushes_when_free(flushers, end, started, &mut cut);
            let flushes = tokio::select! {
                flushes = flushing => flushes,
                () = stopping.wait() => {
                    cut.push(CutReason::Shutdown);
                    Vec::new()
                }
            };
            reports.cut.extend(cut);
            flushes
        }
        Some(end) => run_flushes(flushers, end, started, reports.cut).await,
        None => Vec::new(),
    };
    staged.actions = reports.finish();
    staged.into_report(flushes)
}

/// A phase whose actions are done: what its report needs, and when its flushes must end.
#[derive(Debug)]
pub(crate) struct Staged {
    request_id: String,
    parent: Option<SpanContext>,
    kind: PhaseKind,
    pub(crate) started: Instant,
    started_wall: SystemTime,
    actions: Vec<ActionReport>,
    pub(crate) cut: Vec<CutReason>,
    /// When the flushes must be over; `None` when they are left to the final flush (SIGTERM).
    pub(crate) flush_end: Option<Instant>,
}

impl Staged {
    pub(crate) fn into_report(self, flushes: Vec<FlushReport>) -> PhaseReport {
        PhaseReport {
            request_id: self.request_id,
            invocation_span: self.parent,
            kind: self.kind,
            started: self.started_wall,
            actions: self.actions,
            flushes,
            duration: self.started.elapsed(),
            cut: self.cut,
            consecutive_flush_failures: 0,
            spans_lost: None,
            spans_dropped: None,
        }
    }
}

/// The first part of a phase: the actions, cut before they starve the flush.
pub(crate) async fn run_actions_stage(
    job: Job,
    flushers: &[Flusher],
    budget: Budget,
    kind: PhaseKind,
    mut stop: Stop,
) -> Staged {
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let mut cut = Vec::new();

    // The flush keeps a reserve: its own timeout, but at most half of what is left, so that a
    // long flush_timeout on a short function does not leave the actions no time at all.
    let left = budget.end.saturating_duration_since(started);
    // Never less than the wait for a cut action to let go (`ABORT_GRACE`), so that the phase
    // still ends by `budget.end` when the action's thread is blocked (a short flush_timeout, or
    // little time left).
    let grace = ABORT_GRACE.min(left);
    let reserve = if flushers.is_empty() {
        grace
    } else {
        job.flush_timeout.min(left / 2).max(grace)
    };
    let actions_end = budget.end.checked_sub(reserve).unwrap_or(started);
    let actions = run_actions(&job.queue, actions_end, &mut cut, started, &mut stop).await;

    // On shutdown the final flush flushes everything; this phase yields to it at once, and
    // says so (its own flush did not run). Read once: a stop set between two reads would skip
    // the flush without saying so.
    let stopped = stop.is_set();
    if stopped && !flushers.is_empty() && !cut.contains(&CutReason::Shutdown) {
        cut.push(CutReason::Shutdown);
    }
    // With the flush timeouts of deferred handlers that the actions called.
    let flush_timeout = job.queue.flush_timeout_after_actions(job.flush_timeout);
    let flush_end = (!stopped).then(|| {
        // `checked_add`: however long `flush_timeout` is, it must not overflow the clock.
        Instant::now()
            .checked_add(flush_timeout)
            .map_or(budget.end, |end| budget.end.min(end))
    });
    Staged {
        request_id: job.request_id,
        parent: job.parent,
        kind,
        started,
        started_wall,
        actions,
        cut,
        flush_end,
    }
}

/// Tells a running phase that the process is shutting down (SIGTERM).
#[derive(Debug, Clone)]
pub(crate) struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    pub(crate) fn new(rx: tokio::sync::watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop is set; never, if its sender is gone.
    async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn run_actions(
    queue: &Arc<Queue>,
    end: Instant,
    cut: &mut Vec<CutReason>,
    started: Instant,
    stop: &mut Stop,
) -> Vec<ActionReport> {
    // First what a dropped phase of this queue did: its actions came first. Had it cut the
    // actions, the rest are cut too, for the reason it gave.
    let carried = queue.take_unreported();
    let mut cut_short = !carried.cut.is_empty();
    cut.extend(carried.cut);
    let mut reports = Reports::new(queue, carried.actions, cut);
    // One at a time rather than a drained list: an action may queue more actions, which run
    // after it. Once it is empty the queue is closed: an abandoned action that runs on cannot
    // queue work that nothing would run (its `defer!` fails instead).
    //
    // First the action a dropped phase of this queue left running: it is waited for (or cut)
    // like one started here, so that the next one does not run beside it.
    while let Some(next) = queue.next() {
        let (label, task, begun) = match next {
            // Reported from when the dropped phase started it: that phase never reports.
            Next::Running(running) => (running.label, running.task, running.started),
            Next::Queued(action) => {
                let label = action.label();
                if !cut_short && stop.is_set() {
                    cut_short = true;
                    reports.cut.push(CutReason::Shutdown);
                }
                if !cut_short && Instant::now() >= end {
                    cut_short = true;
                    reports.cut.push(CutReason::ActionBudget {
                        budget: end.saturating_duration_since(started),
                    });
                }
                if cut_short {
                    reports.actions.push(ActionReport {
                        label,
                        offset: started.elapsed(),
                        duration: Duration::ZERO,
                        outcome: ActionOutcome::NotRun,
                    });
                    continue;
                }
                // A task of its own: a panic is caught by tokio, and an overrun can be aborted.
                (
                    label,
                    tokio::spawn(with_queue(queue.clone(), action.future)),
                    Instant::now(),
                )
            }
        };
        // Should this phase be dropped while it waits (an inline phase under a timeout around
        // the handler), the task goes back to the queue for the phase that takes it over.
        let mut flight = InFlight {
            queue,
            running: Some(RunningAction {
                label,
                task,
                started: begun,
            }),
        };
        let task = flight.task();
        let finished = tokio::select! {
            finished = tokio::time::timeout_at(end, &mut *task) => finished.ok(),
            () = stop.wait() => None,
        };
        let outcome = match finished {
            Some(Ok(Ok(()))) => ActionOutcome::Ok,
            Some(Ok(Err(message))) => ActionOutcome::Failed(message),
            Some(Err(join)) if join.is_panic() => {
                ActionOutcome::Panicked(panic_message(join.into_panic()))
            }
            // Aborted by the cut of a phase that was dropped before it saw the task end (in
            // `ABORT_GRACE` below): that cut, carried over, says why.
            Some(Err(join)) if join.is_cancelled() => ActionOutcome::TimedOut,
            Some(Err(join)) => ActionOutcome::Failed(join.to_string()),
            None => {
                // The reason first: should this phase be dropped in the wait below, it goes
                // to the phase that takes the queue over, with the aborted task.
                if !cut_short {
                    cut_short = true;
                    reports.cut.push(if stop.is_set() {
                        CutReason::Shutdown
                    } else {
                        CutReason::ActionBudget {
                            budget: end.saturating_duration_since(started),
                        }
                    });
                }
                // Abandoned. Wait (briefly) for its future to be dropped: it holds the spans
                // it was queued in, which must close before the flush to be in it.
                task.abort();
                // A future that panics as it is dropped gives its panic here: not the phase's.
                if let Ok(joined) = tokio::time::timeout(ABORT_GRACE, &mut *task).await {
                    drop_joined(joined);
                }
                ActionOutcome::TimedOut
            }
        };
        let label = flight.done();
        reports.actions.push(ActionReport {
            label,
            offset: begun.saturating_duration_since(started),
            duration: begun.elapsed(),
            outcome,
        });
    }
    reports.finish()
}

/// The reports of a phase's actions, and what it cut: should the phase be dropped before it
/// reports (an inline phase under a timeout around the handler, while its actions or its
/// flushes run), they go to its queue, for the report of the phase that takes it over.
struct Reports<'a> {
    queue: &'a Queue,
    actions: Vec<ActionReport>,
    cut: &'a mut Vec<CutReason>,
    done: bool,
}

impl<'a> Reports<'a> {
    fn new(queue: &'a Queue, actions: Vec<ActionReport>, cut: &'a mut Vec<CutReason>) -> Self {
        Self {
            queue,
            actions,
            cut,
            done: false,
        }
    }

    /// The actions' reports, for this phase's own report: nothing is left to carry.
    fn finish(mut self) -> Vec<ActionReport> {
        self.done = true;
        std::mem::take(&mut self.actions)
    }
}

impl Drop for Reports<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.queue.carry(Unreported {
                actions: std::mem::take(&mut self.actions),
                cut: std::mem::take(self.cut),
            });
        }
    }
}

/// How long an aborted action's task may take to be dropped.
const ABORT_GRACE: Duration = Duration::from_millis(20);

/// The action a phase is waiting for; back to its queue if the phase is dropped meanwhile.
struct InFlight<'a> {
    queue: &'a Queue,
    running: Option<RunningAction>,
}

impl InFlight<'_> {
    fn task(&mut self) -> &mut tokio::task::JoinHandle<Result<(), String>> {
        match &mut self.running {
            Some(running) => &mut running.task,
            None => unreachable!("taken only by `done`, which consumes it"),
        }
    }

    /// The wait is over: the action's label, for its report.
    fn done(mut self) -> ActionLabel {
        match self.running.take() {
            Some(running) => running.label,
            None => unreachable!("taken only here"),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            self.queue.adopt(running);
        }
    }
}

/// Runs every flusher at once, each on its own thread, all bounded by `end`: one slow
/// or failing provider does not hold up or stop the others.
/// `phase_started` is the start of the phase they belong to, which their offsets count from.
pub(crate) async fn run_flushes(
    flushers: &[Flusher],
    end: Instant,
    phase_started: Instant,
    cut: &mut Vec<CutReason>,
) -> Vec<FlushReport> {
    let running = start_flushes(flushers, end);
    collect_flushes(running, end, phase_started, cut).await
}

/// As [`run_flushes`], for phases that overlap other phases' flushes (background phases on
/// Managed Instances, the final flush at SIGTERM): a flusher still busy with another phase's
/// call is waited for, until `end`, and then called, rather than reported not run. The free
/// ones start at once, and the busy ones are waited for side by side: a stuck flusher holds
/// up no other.
pub(crate) async fn run_flushes_when_free(
    flushers: &[Flusher],
    end: Instant,
    phase_started: Instant,
    cut: &mut Vec<CutReason>,
) -> Vec<FlushReport> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(flushers.len());
    // A set, so that the waits end with this phase should it be aborted (SIGTERM): a wait
    // left behind could win the flusher and start a flush that no one reports.
    let mut waiting = tokio::task::JoinSet::new();
    for flusher in flushers {
        let task = startable(started, end, || flusher.start());
        if task
            .as_ref()
            .is_err_and(|why| *why == NotStarted::StillRunning)
        {
            let (busy, at) = (flusher.clone(), tasks.len());
            waiting.spawn(async move { (at, busy.start_when_free(end).await) });
        }
        tasks.push((flusher.name.to_string(), task));
    }
    // A join error (the runtime shutting down) leaves it reported still running.
    while let Some(joined) = waiting.join_next().await {
        if let Ok((at, task)) = joined {
            tasks[at].1 = task;
        }
    }
    let running = Running {
        started,
        tasks,
        done: Vec::new(),
    };
    collect_flushes(running, end, phase_started, cut).await
}

/// Flushes started on their own threads (or why one was not), with when they started.
#[derive(Debug)]
pub(crate) struct Running {
    started: Instant,
    tasks: Vec<(String, Result<FlushTask, NotStarted>)>,
    /// Reports of flushes that ran elsewhere (on the chain's phase thread), listed first.
    done: Vec<FlushReport>,
}

type FlushTask = tokio::task::JoinHandle<crate::flush::Called>;

/// Starts every flusher on its own thread (`Flusher::start`), all at once.
pub(crate) fn start_flushes(flushers: &[Flusher], end: Instant) -> Running {
    let started = Instant::now();
    let tasks = flushers
        .iter()
        .map(|flusher| {
            let task = startable(started, end, || flusher.start());
            (flusher.name.to_string(), task)
        })
        .collect();
    Running {
        started,
        tasks,
        done: Vec::new(),
    }
}

impl Running {
    /// Adds the report of a flush that ran elsewhere (on the chain's phase thread).
    pub(crate) fn add_done(&mut self, report: FlushReport) {
        self.done.push(report);
    }

    /// Adds a flush that was to run elsewhere and did not start (`why`), listed first, as
    /// it would have been.
    pub(crate) fn add_not_started(&mut self, flusher: &Flusher, why: NotStarted) {
        self.tasks.insert(0, (flusher.name.to_string(), Err(why)));
    }

    /// The reports as things stand, without waiting: what has not finished timed out. For the
    /// watchdog that abandons a phase whose flush on the phase thread overran; `inline` names
    /// that flush.
    pub(crate) async fn abandon(
        self,
        inline: &str,
        end: Instant,
        phase_started: Instant,
        cut: &mut Vec<CutReason>,
    ) -> Vec<FlushReport> {
        let offset = self.started.saturating_duration_since(phase_started);
        // Flushes that ran elsewhere first, as `collect_flushes` lists them.
        let mut reports = self.done;
        reports.push(FlushReport {
            name: inline.to_owned(),
            offset,
            duration: self.started.elapsed(),
            outcome: FlushOutcome::TimedOut,
        });
        for (name, task) in self.tasks {
            let (outcome, duration) = match task {
                Err(why) => (FlushOutcome::NotRun(why.to_string()), Duration::ZERO),
                Ok(task) if task.is_finished() => outcome(task.await, self.started),
                Ok(_) => (FlushOutcome::TimedOut, self.started.elapsed()),
            };
            reports.push(FlushReport {
                name,
                offset,
                duration,
                outcome,
            });
        }
        // The budget it had, as `collect_flushes` reports it; not how late the watchdog came.
        cut.push(CutReason::FlushBudget {
            budget: end.saturating_duration_since(self.started),
        });
        reports
    }
}

/// Runs `flusher` on this thread, as `claim` ([`Flusher::claim`]) allows: the chain's phase
/// thread does so with the first flusher, which saves two thread hand-offs per phase; its
/// watchdog abandons the flush at `end`. The caller has checked that `end` has not come.
pub(crate) fn flush_here(
    flusher: &Flusher,
    claim: Result<crate::flush::Claimed<'_>, NotStarted>,
    end: Instant,
    phase_started: Instant,
) -> FlushReport {
    let started = Instant::now();
    let (outcome, duration) = match claim.map(crate::flush::Claimed::run_here) {
        Err(why) => (FlushOutcome::NotRun(why.to_string()), Duration::ZERO),
        Ok(Ok(done)) => outcome(Ok(done), started),
        Ok(Err(panic)) => (
            FlushOutcome::Panicked(panic_message(panic)),
            started.elapsed(),
        ),
    };
    // Finished, but past its end: as late as an abandoned one, and reported the same way.
    let outcome = if Instant::now() > end && matches!(outcome, FlushOutcome::Ok) {
        FlushOutcome::TimedOut
    } else {
        outcome
    };
    FlushReport {
        name: flusher.name.to_string(),
        offset: started.saturating_duration_since(phase_started),
        duration,
        outcome,
    }
}

/// Starts a flush with `start` unless its end has come; `Err` says why it was not run.
fn startable<T>(
    now: Instant,
    end: Instant,
    start: impl FnOnce() -> Result<T, NotStarted>,
) -> Result<T, NotStarted> {
    if now >= end {
        return Err(NotStarted::NoTime);
    }
    start()
}

/// Waits for the started flushes until `end`; what is still running then is abandoned.
pub(crate) async fn collect_flushes(
    running: Running,
    end: Instant,
    phase_started: Instant,
    cut: &mut Vec<CutReason>,
) -> Vec<FlushReport> {
    let Running {
        started,
        tasks,
        mut done,
    } = running;
    let offset = started.saturating_duration_since(phase_started);
    // Cut by the budget: a flush abandoned (or finished past its end), or never started for
    // lack of time (or for a busy flusher waited for until the end).
    let mut timed_out = done.iter().any(|r| r.outcome == FlushOutcome::TimedOut);
    for (name, task) in tasks {
        let (outcome, duration) = match task {
            Err(why) => {
                timed_out |= matches!(why, NotStarted::NoTime | NotStarted::StillRunningAtEnd);
                (FlushOutcome::NotRun(why.to_string()), Duration::ZERO)
            }
            Ok(mut task) => match tokio::time::timeout_at(end, &mut task).await {
                Ok(joined) => outcome(joined, started),
                // Abandoned: a blocking thread cannot be stopped; the flusher stays busy until
                // it returns, and later phases skip it meanwhile.
                Err(_) => {
                    timed_out = true;
                    (FlushOutcome::TimedOut, started.elapsed())
                }
            },
        };
        done.push(FlushReport {
            name,
            offset,
            duration,
            outcome,
        });
    }
    if timed_out {
        cut.push(CutReason::FlushBudget {
            budget: end.saturating_duration_since(started),
        });
    }
    done
}

/// What a finished flush reports: its outcome and duration.
fn outcome(
    joined: Result<crate::flush::Called, tokio::task::JoinError>,
    started: Instant,
) -> (FlushOutcome, Duration) {
    match joined {
        Ok((Ok(()), took)) => (FlushOutcome::Ok, took),
        Ok((Err(e), took)) => (FlushOutcome::Failed(e), took),
        Err(join) if join.is_panic() => match join.into_panic().downcast::<FlushPanic>() {
            // Its own time: the phase may look at it long after the panic.
            Ok(panic) => (
                FlushOutcome::Panicked(panic_message(panic.payload)),
                panic.took,
            ),
            Err(payload) => (
                FlushOutcome::Panicked(panic_message(payload)),
                started.elapsed(),
            ),
        },
        Err(join) => (FlushOutcome::Failed(join.to_string()), started.elapsed()),
    }
}

pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(payload) => {
                drop_panic(payload);
                "a panic with a non-text payload".to_owned()
            }
        },
    }
}

/// Drops what a task gave, the payload of its panic by [`drop_panic`].
pub(crate) fn drop_joined<T>(joined: Result<T, tokio::task::JoinError>) {
    if let Err(join) = joined
        && let Ok(panic) = join.try_into_panic()
    {
        drop_panic(panic);
    }
}

/// Drops a panic's payload without letting its own panic out. A payload may panic as it is
/// dropped (`panic_any` of such a value): that panic must not end the phase, the phase
/// thread or, after the response, the runtime loop, and lose the work still to do. Its own
/// payload is leaked, not dropped, should it do the same.
pub(crate) fn drop_panic(payload: Box<dyn Any + Send>) {
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(payload)));
    if let Err(nested) = dropped {
        std::mem::forget(nested);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::flush::{FlushError, flush_fn};
    use crate::scope::defer;

    fn job(queue: Arc<Queue>, flush_timeout: Duration) -> Job {
        Job {
            request_id: "r-1".into(),
            deadline: None,
            queue,
            flush_timeout,
            parent: None,
        }
    }

    /// Queues `actions` the way a handler does: inside the queue's scope.
    async fn queue_with(actions: impl FnOnce()) -> Arc<Queue> {
        let queue = Queue::new(100);
        with_queue(queue.clone(), async { actions() }).await;
        queue
    }

    fn no_stop() -> Stop {
        Stop::new(tokio::sync::watch::channel(false).1)
    }

    /// A phase dropped while it waits for an action it cut to let go (`ABORT_GRACE`; the
    /// action blocks its thread): the phase that takes the queue over finds that task
    /// cancelled. It is the cut action, reported as cut; it was reported as failed with
    /// tokio's "task N was cancelled".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_action_cut_by_a_dropped_phase_is_reported_cut_not_failed() {
        let queue = queue_with(|| {
            defer(Some("blocks".into()), async {
                std::thread::sleep(Duration::from_millis(200));
                tokio::task::yield_now().await;
            })
            .expect("queued");
        })
        .await;
        let end = Instant::now() + Duration::from_millis(50);
        let first = run(
            job(queue.clone(), Duration::ZERO),
            &[],
            Budget { end },
            PhaseKind::Inline,
            no_stop(),
        );
        // Dropped within the grace its cut action has to let go (the phase's last
        // `ABORT_GRACE`, with no flusher).
        let dropped = tokio::time::timeout_at(end - ABORT_GRACE / 2, first).await;
        assert!(dropped.is_err(), "dropped before it reported");
        let end = Instant::now() + Duration::from_secs(5);
        let report = run(
            job(queue, Duration::ZERO),
            &[],
            Budget { end },
            PhaseKind::Background,
            no_stop(),
        )
        .await;
        let [action] = &report.actions[..] else {
            panic!("{report}")
        };
        assert_eq!(action.outcome, ActionOutcome::TimedOut, "{report}");
        assert!(
            matches!(report.cut[..], [CutReason::ActionBudget { .. }]),
            "{report}"
        );
    }

    /// An action that never ends, and a count of its drops (1 once it is cut).
    fn hanging_action() -> (impl Future<Output = ()> + Send + 'static, Arc<AtomicUsize>) {
        struct OnDrop(Arc<AtomicUsize>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let guard = OnDrop(dropped.clone());
        let action = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        (action, dropped)
    }

    fn budget(secs: u64) -> Budget {
        Budget {
            end: Instant::now() + Duration::from_secs(secs),
        }
    }

    /// Issue 5, fuzzing: the farthest deadline an event can carry (`deadlineMs` = `u64::MAX`)
    /// gives a budget, not an overflow panic.
    #[test]
    fn a_budget_for_an_extreme_deadline() {
        let now = Instant::now();
        let farthest = crate::context::deadline_from_epoch_ms(u64::MAX);
        for deadline in [farthest, Some(SystemTime::UNIX_EPOCH), None] {
            for margin in [Duration::ZERO, Duration::from_millis(100), Duration::MAX] {
                assert!(Budget::new(deadline, margin).end >= now);
            }
        }
        let unknown = Budget::new(None, Duration::ZERO).end;
        assert!(unknown >= now + MAX_FUNCTION_TIMEOUT);
        // Further than Lambda's longest timeout is bogus: capped like an unknown deadline.
        if farthest.is_some() {
            let capped = Budget::new(farthest, Duration::ZERO).end;
            assert!(capped >= now + MAX_FUNCTION_TIMEOUT);
            assert!(capped <= Instant::now() + MAX_FUNCTION_TIMEOUT);
        }
        let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            Budget::new(Some(in_an_hour), Duration::ZERO).end
                <= Instant::now() + MAX_FUNCTION_TIMEOUT
        );
    }

    /// A phase dropped while it waits for an action (an inline phase under a timeout around
    /// the handler) does not leave that action running loose: the next phase of the queue
    /// waits for it, then runs the next action, so the actions still run one at a time, in
    /// order, and the running one is reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_phase_hands_its_running_action_to_the_next() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (log.clone(), log.clone());
        let queue = queue_with(|| {
            defer(Some("a".into()), async move {
                a.lock().unwrap().push("a start");
                tokio::time::sleep(Duration::from_millis(300)).await;
                a.lock().unwrap().push("a end");
            })
            .unwrap();
            defer(Some("b".into()), async move {
                b.lock().unwrap().push("b");
            })
            .unwrap();
        })
        .await;
        let first = run(
            job(queue.clone(), Duration::from_secs(1)),
            &[],
            budget(10),
            PhaseKind::Inline,
            no_stop(),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), first)
                .await
                .is_err()
        );
        assert_eq!(queue.len(), 2, "a (running) and b");
        let report = run(
            job(queue, Duration::from_secs(1)),
            &[],
            budget(10),
            PhaseKind::Background,
            no_stop(),
        )
        .await;
        assert_eq!(*log.lock().unwrap(), ["a start", "a end", "b"]);
        let ran: Vec<_> = report
            .actions
            .iter()
            .map(|a| (a.label.to_string(), a.outcome.clone()))
            .collect();
        assert!(
            matches!(&ran[..], [(a, ActionOutcome::Ok), (b, ActionOutcome::Ok)] if a.starts_with("\"a\"") && b.starts_with("\"b\"")),
            "{report}"
        );

        // Handed over past its budget, the running action is cut (aborted), not waited for.
        let (hanging, dropped) = hanging_action();
        let queue = queue_with(|| defer(None, hanging).unwrap()).await;
        let first = run(
            job(queue.clone(), Duration::from_secs(1)),
            &[],
            budget(10),
            PhaseKind::Inline,
            no_stop(),
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), first).await;
        let report = run(
            job(queue, Duration::from_secs(1)),
            &[],
            Budget {
                end: Instant::now(),
            },
            PhaseKind::Background,
            no_stop(),
        )
        .await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "aborted: {report}");
        assert!(
            matches!(
                report.actions[..],
                [ActionReport {
                    outcome: ActionOutcome::TimedOut,
                    ..
                }]
            ),
            "{report}"
        );
        assert!(
            matches!(report.cut[..], [CutReason::ActionBudget { .. }]),
            "{report}"
        );
    }

    /// A background phase waits for a flusher busy with another phase's call; still busy
    /// when the phase's flush time runs out, it is not run, and the phase is cut by its flush
    /// budget, as when a flush it started overruns. Found by review: the phase was reported
    /// with no cut, though its time had run out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flusher_busy_until_a_background_phase_ends_cuts_the_phase() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let busy = Flusher::new(flush_fn("busy", move || {
            let _ = released
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(5));
            Ok::<(), FlushError>(())
        }));
        // Another phase's call.
        let _other = busy.start().expect("started");
        let report = run(
            job(Queue::new(0), Duration::from_millis(100)),
            std::slice::from_ref(&busy),
            budget(10),
            PhaseKind::Background,
            no_stop(),
        )
        .await;
        release.send(()).expect("the flush waits");
        assert!(
            matches!(&report.flushes[..], [FlushReport { outcome: FlushOutcome::NotRun(why), .. }] if why.contains("still running")),
            "{report}"
        );
        assert!(
            matches!(report.cut[..], [CutReason::FlushBudget { .. }]),
            "{report}"
        );
    }

    /// The wait for a cut action to let go stays within the phase's end, flushers or not: an
    /// action that blocks its thread cannot be dropped, so the whole grace is waited. (Four
    /// workers: each case leaves one blocked for 300 ms, and the timers need one free.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_abort_grace_stays_within_the_budget_with_flushers() {
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        for flush_timeout in [Duration::from_millis(1), Duration::from_secs(1)] {
            let queue = queue_with(|| {
                defer(None, async {
                    std::thread::sleep(Duration::from_millis(300))
                })
                .unwrap();
            })
            .await;
            // 30 ms: half of it (the flush's reserve) is under the abort grace.
            let budget = Budget {
                end: Instant::now() + Duration::from_millis(30),
            };
            let report = run(
                job(queue, flush_timeout),
                &flushers,
                budget,
                PhaseKind::Chained,
                no_stop(),
            )
            .await;
            // The actions are cut early enough for the whole grace to fit before the end
            // (before, with a 1 ms `flush_timeout`, they ran to 1 ms before it and the phase
            // ended about 20 ms late). Read from the report, not from the clock: a loaded
            // machine delays the phase's own steps by more than the margin under test.
            let Some(actions) = report.cut.iter().find_map(|cut| match cut {
                CutReason::ActionBudget { budget } => Some(*budget),
                _ => None,
            }) else {
                panic!("{flush_timeout:?}: {report}");
            };
            assert!(
                actions <= Duration::from_millis(30) - ABORT_GRACE,
                "{flush_timeout:?}: the actions had {actions:?} of 30 ms: {report}"
            );
            let over = Instant::now().saturating_duration_since(budget.end);
            assert!(
                over < Duration::from_millis(250),
                "{flush_timeout:?}: the phase ended {over:?} past its end: {report}"
            );
        }
    }

    /// A zero `flush_timeout` leaves the flush no time: it is not run, and the phase says it
    /// was cut, rather than reporting a failure with no cut (and a clean-looking count).
    #[tokio::test]
    async fn a_flush_with_no_time_is_cut_not_failed() {
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        let report = run(
            job(Queue::new(0), Duration::ZERO),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert!(
            matches!(&report.flushes[0].outcome, FlushOutcome::NotRun(why) if *why == NotStarted::NoTime.to_string()),
            "{report}"
        );
        assert!(
            matches!(report.cut[..], [CutReason::FlushBudget { .. }]),
            "{report}"
        );
        assert!(!report.is_clean());
    }

    /// A phase stopped by SIGTERM leaves its flush to the final one, and says so.
    #[tokio::test]
    async fn a_stopped_phase_says_its_flush_was_left_to_the_final_one() {
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        let (_stopping, stopped) = tokio::sync::watch::channel(true);
        let report = run(
            job(Queue::new(0), Duration::from_secs(1)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            Stop::new(stopped),
        )
        .await;
        assert!(report.flushes.is_empty(), "{report}");
        assert_eq!(report.cut, [CutReason::Shutdown]);
        assert!(!report.is_clean());
    }

    /// A flush that cannot get a thread (the OS refuses its own thread and tokio's blocking
    /// pool cannot start one either; here: outside a runtime) is reported as not run, with
    /// why, and the phase goes on to its report.
    #[test]
    fn a_flush_without_a_thread_is_reported_not_run() {
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        let end = Instant::now() + Duration::from_secs(1);
        let running = start_flushes(&flushers, end);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let mut cut = Vec::new();
        let reports = runtime.block_on(collect_flushes(running, end, Instant::now(), &mut cut));
        assert!(
            matches!(&reports[0].outcome, FlushOutcome::NotRun(why) if why.starts_with("no thread could be started")),
            "{:?}",
            reports[0].outcome
        );
    }

    /// A flush that was to run on the phase thread but found its end come (`add_not_started`)
    /// is listed first, not run, and the phase is cut by its budget.
    #[tokio::test]
    async fn a_first_flush_that_found_its_end_come_is_a_cut() {
        let flushers = [
            Flusher::new(flush_fn("first", || Ok::<(), FlushError>(()))),
            Flusher::new(flush_fn("second", || Ok::<(), FlushError>(()))),
        ];
        let end = Instant::now() + Duration::from_secs(5);
        let mut running = start_flushes(&flushers[1..], end);
        running.add_not_started(&flushers[0], NotStarted::NoTime);
        let mut cut = Vec::new();
        let reports = collect_flushes(running, end, Instant::now(), &mut cut).await;
        let names: Vec<_> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert!(
            matches!(&reports[0].outcome, FlushOutcome::NotRun(why) if why.starts_with("no time"))
        );
        assert_eq!(reports[1].outcome, FlushOutcome::Ok);
        assert!(
            matches!(cut[..], [CutReason::FlushBudget { .. }]),
            "{cut:?}"
        );
    }

    /// Without flushers, a hung action is cut early enough that the wait for it to let go
    /// (`ABORT_GRACE`) still ends within the budget.
    #[tokio::test(start_paused = true)]
    async fn an_action_cut_without_flushers_leaves_room_for_its_abort() {
        let queue = queue_with(|| {
            defer(None, std::future::pending::<()>()).unwrap();
        })
        .await;
        let report = run(
            job(queue, Duration::from_secs(1)),
            &[],
            budget(1),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
        let [CutReason::ActionBudget { budget }] = report.cut[..] else {
            panic!("{report}");
        };
        assert_eq!(budget, Duration::from_secs(1) - ABORT_GRACE);
    }

    /// An action abandoned at its budget while it blocks, which then queues another action:
    /// its `defer!` fails (nothing would run it) instead of queuing work that is never run
    /// nor reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_action_cannot_queue_work_after_the_phase() {
        let (tx, rx) = std::sync::mpsc::channel();
        let queue = queue_with(|| {
            defer(None, async move {
                std::thread::sleep(Duration::from_millis(400));
                let _ = tx.send(defer(None, async {}));
            })
            .unwrap();
        })
        .await;
        let budget = Budget {
            end: Instant::now() + Duration::from_millis(100),
        };
        let report = run(
            job(queue, Duration::from_secs(1)),
            &[],
            budget,
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(report.actions.len(), 1, "{report}");
        assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
        let late = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the action ran on");
        assert!(
            matches!(late, Err(crate::DeferError::PhaseOver { .. })),
            "{late:?}"
        );
    }

    /// A `flush_timeout` too long for the clock (`Duration::MAX`) is bounded by the deadline,
    /// not an overflow panic.
    #[tokio::test]
    async fn a_huge_flush_timeout_is_bounded_by_the_budget() {
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        let budget = budget(10);
        let mut staged = run_actions_stage(
            job(Queue::new(0), Duration::MAX),
            &flushers,
            budget,
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(staged.flush_end, Some(budget.end));
        // The rest of the phase, as `run` goes on.
        let flushes = run_flushes(&flushers, budget.end, staged.started, &mut staged.cut).await;
        let report = staged.into_report(flushes);
        assert!(report.is_clean(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn actions_run_in_order_then_the_flush() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b, f) = (log.clone(), log.clone(), log.clone());
        let queue = queue_with(|| {
            defer(Some("a".into()), async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                a.lock().unwrap().push("a");
            })
            .unwrap();
            defer(None, async move { b.lock().unwrap().push("b") }).unwrap();
        })
        .await;
        let flushers = [Flusher::new(flush_fn("f", move || {
            f.lock().unwrap().push("flush");
            Ok::<(), FlushError>(())
        }))];
        let report = run(
            job(queue, Duration::from_secs(1)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(*log.lock().unwrap(), ["a", "b", "flush"]);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.actions[0].label.name.as_deref(), Some("a"));
        assert_eq!(report.actions[1].label.name, None);
    }

    /// Also a panic whose payload is neither text nor harmless: one that panics in turn when
    /// dropped. Found by review: the payload was dropped in `panic_message`, and its panic
    /// ended the phase (the later actions, the flush and the report were lost; under the
    /// layer, after the response, it went out of the runtime loop).
    #[tokio::test(start_paused = true)]
    async fn failures_and_panics_do_not_stop_later_actions_or_the_flush() {
        let ran = Arc::new(AtomicUsize::new(0));
        let (r1, r2) = (ran.clone(), ran.clone());
        let queue = queue_with(|| {
            // Of type `!`: an action that can only panic.
            defer(None, async { panic!("boom") }).unwrap();
            defer(None, async { std::panic::panic_any(PanicsWhenDropped) }).unwrap();
            defer(None, async { Err::<(), _>("bad input") }).unwrap();
            defer(None, async move {
                r1.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        })
        .await;
        let flushers = [Flusher::new(flush_fn("f", move || {
            r2.fetch_add(10, Ordering::SeqCst);
            Ok::<(), FlushError>(())
        }))];
        let report = run(
            job(queue, Duration::from_secs(1)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(ran.load(Ordering::SeqCst), 11);
        assert_eq!(
            report.actions[0].outcome,
            ActionOutcome::Panicked("boom".into())
        );
        assert_eq!(
            report.actions[1].outcome,
            ActionOutcome::Panicked("a panic with a non-text payload".into())
        );
        assert_eq!(
            report.actions[2].outcome,
            ActionOutcome::Failed("bad input".into())
        );
        assert_eq!(report.actions[3].outcome, ActionOutcome::Ok);
        assert_eq!(report.flushes[0].outcome, FlushOutcome::Ok);
    }

    /// A panic payload that panics in turn when it is dropped.
    pub(crate) struct PanicsWhenDropped;

    impl Drop for PanicsWhenDropped {
        fn drop(&mut self) {
            panic!("the payload panics as it is dropped");
        }
    }

    /// Panics with a [`PanicsWhenDropped`] when dropped: in an action, its drop at the cut.
    struct PanicsWithItWhenDropped;

    impl Drop for PanicsWithItWhenDropped {
        fn drop(&mut self) {
            std::panic::panic_any(PanicsWhenDropped);
        }
    }

    /// A cut action whose future panics as it is dropped (tokio gives that panic, payload
    /// and all, to the task's handle), with a payload that panics when dropped: the phase
    /// goes on to its flush and its report. Found by review: the phase dropped what the
    /// aborted task gave unguarded, and the payload's panic ended the phase.
    #[tokio::test(start_paused = true)]
    async fn a_cut_action_whose_drop_panics_does_not_end_the_phase() {
        let flushed = Arc::new(AtomicUsize::new(0));
        let f = flushed.clone();
        let queue = queue_with(|| {
            defer(Some("hang".into()), async {
                let _guard = PanicsWithItWhenDropped;
                std::future::pending::<()>().await;
            })
            .unwrap();
        })
        .await;
        let flushers = [Flusher::new(flush_fn("f", move || {
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<(), FlushError>(())
        }))];
        let report = crate::scope::caught(std::pin::pin!(run(
            job(queue, Duration::from_secs(2)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )))
        .await
        .expect("the phase does not panic");
        assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
        assert_eq!(flushed.load(Ordering::SeqCst), 1);
        assert_eq!(report.flushes[0].outcome, FlushOutcome::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_action_is_cut_before_it_starves_the_flush() {
        let flushed = Arc::new(AtomicUsize::new(0));
        let f = flushed.clone();
        let queue = queue_with(|| {
            defer(Some("hang".into()), std::future::pending::<()>()).unwrap();
            defer(Some("later".into()), async {}).unwrap();
        })
        .await;
        let flushers = [Flusher::new(flush_fn("f", move || {
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<(), FlushError>(())
        }))];
        let started = Instant::now();
        // 10 s left, flush_timeout 2 s: the actions get 8 s.
        let report = run(
            job(queue, Duration::from_secs(2)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
        assert_eq!(report.actions[1].outcome, ActionOutcome::NotRun);
        assert_eq!(
            report.cut,
            [CutReason::ActionBudget {
                budget: Duration::from_secs(8)
            }]
        );
        assert_eq!(flushed.load(Ordering::SeqCst), 1);
        assert_eq!(report.flushes[0].outcome, FlushOutcome::Ok);
        assert!(started.elapsed() <= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_flush_reserve_is_at_most_half_of_what_is_left() {
        let queue = queue_with(|| defer(None, std::future::pending::<()>()).unwrap()).await;
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        // 3 s left and flush_timeout 10 s: actions still get 1.5 s.
        let report = run(
            job(queue, Duration::from_secs(10)),
            &flushers,
            budget(3),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(
            report.cut[0],
            CutReason::ActionBudget {
                budget: Duration::from_millis(1500)
            }
        );
    }

    // Real time: a running spawn_blocking task stops a paused clock from advancing.
    #[tokio::test]
    async fn a_stalled_flush_is_abandoned_and_skipped_while_it_runs() {
        let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let r = release.clone();
        let stalled = Flusher::new(flush_fn("stalled", move || {
            let (lock, cvar) = &*r;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cvar.wait(go).unwrap();
            }
            Ok::<(), FlushError>(())
        }));
        let healthy_runs = Arc::new(AtomicUsize::new(0));
        let h = healthy_runs.clone();
        let healthy = Flusher::new(flush_fn("healthy", move || {
            h.fetch_add(1, Ordering::SeqCst);
            Ok::<(), FlushError>(())
        }));
        let flushers = [stalled, healthy];
        let report = run(
            job(Queue::new(0), Duration::from_millis(200)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(report.flushes[0].outcome, FlushOutcome::TimedOut);
        assert_eq!(report.flushes[1].outcome, FlushOutcome::Ok);
        // Each flusher reports its own time, not the slowest one's.
        assert!(report.flushes[0].duration >= Duration::from_millis(200));
        assert!(report.flushes[1].duration < Duration::from_millis(150));
        assert!(matches!(report.cut[..], [CutReason::FlushBudget { .. }]));

        let again = run(
            job(Queue::new(0), Duration::from_millis(200)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert!(
            matches!(&again.flushes[0].outcome, FlushOutcome::NotRun(why) if why.contains("still running"))
        );
        assert_eq!(healthy_runs.load(Ordering::SeqCst), 2);

        *release.0.lock().unwrap() = true;
        release.1.notify_all();
    }

    /// A flusher that panics at once reports its own time, not the time until the phase
    /// looked at it (after a slower flusher listed before it). Found by review: it reported
    /// "panicked after 200 ms" for a panic at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_flusher_reports_its_own_time() {
        let flushers = [
            Flusher::new(flush_fn("slow", || {
                std::thread::sleep(Duration::from_millis(300));
                Ok::<(), FlushError>(())
            })),
            Flusher::new(flush_fn("panics", || -> Result<(), FlushError> {
                panic!("flusher boom")
            })),
        ];
        let now = Instant::now();
        let mut cut = Vec::new();
        let reports = run_flushes(&flushers, now + Duration::from_secs(5), now, &mut cut).await;
        assert_eq!(
            reports[1].outcome,
            FlushOutcome::Panicked("flusher boom".into())
        );
        assert!(
            reports[1].duration < Duration::from_millis(150),
            "{:?}",
            reports[1]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_action_may_queue_more_actions() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (log.clone(), log.clone());
        let queue = queue_with(|| {
            defer(None, async move {
                a.lock().unwrap().push("first");
                defer(
                    None,
                    async move { b.lock().unwrap().push("queued by first") },
                )
                .unwrap();
            })
            .unwrap();
        })
        .await;
        run(
            job(queue, Duration::from_secs(1)),
            &[],
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(*log.lock().unwrap(), ["first", "queued by first"]);
    }

    /// `max_actions` counts every action queued in the invocation, also those queued by
    /// actions after earlier ones ran: a chain of actions that each queue the next stops at
    /// the limit.
    #[tokio::test(start_paused = true)]
    async fn actions_queued_by_actions_count_against_the_limit() {
        fn chain(ran: Arc<AtomicUsize>, refused: Arc<Mutex<Option<crate::DeferError>>>) {
            let next = refused.clone();
            let result = defer(None, async move {
                ran.fetch_add(1, Ordering::SeqCst);
                chain(ran, next);
            });
            if let Err(error) = result {
                *refused.lock().unwrap() = Some(error);
            }
        }
        let ran = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(Mutex::new(None));
        let queue = Queue::new(3);
        let (r, e) = (ran.clone(), refused.clone());
        with_queue(queue.clone(), async move { chain(r, e) }).await;
        run(
            job(queue, Duration::from_secs(1)),
            &[],
            budget(10),
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(ran.load(Ordering::SeqCst), 3);
        assert!(
            matches!(
                *refused.lock().unwrap(),
                Some(crate::DeferError::QueueFull { limit: 3, .. })
            ),
            "{:?}",
            refused.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn no_time_left_means_nothing_starts() {
        let queue = queue_with(|| defer(None, async {}).unwrap()).await;
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        let past = Budget {
            end: Instant::now(),
        };
        let report = run(
            job(queue, Duration::from_secs(1)),
            &flushers,
            past,
            PhaseKind::Chained,
            no_stop(),
        )
        .await;
        assert_eq!(report.actions[0].outcome, ActionOutcome::NotRun);
        assert!(matches!(report.flushes[0].outcome, FlushOutcome::NotRun(_)));
    }

    #[tokio::test]
    async fn a_stop_abandons_the_running_action_and_leaves_the_flush() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (hanging, dropped) = hanging_action();
        let queue = queue_with(|| {
            defer(None, hanging).unwrap();
            defer(None, async {}).unwrap();
        })
        .await;
        let flushers = [Flusher::new(flush_fn("f", || Ok::<(), FlushError>(())))];
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(true);
        });
        let report = run(
            job(queue, Duration::from_secs(1)),
            &flushers,
            budget(10),
            PhaseKind::Chained,
            Stop::new(rx),
        )
        .await;
        assert_eq!(report.actions[0].outcome, ActionOutcome::TimedOut);
        assert_eq!(report.actions[1].outcome, ActionOutcome::NotRun);
        assert_eq!(report.cut, [CutReason::Shutdown]);
        assert!(report.flushes.is_empty(), "the final flush takes over");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the abandoned action was dropped"
        );
    }
}
