//! The process-wide core: configuration, mode, and the state shared by the wrapper, the
//! runtime layer and the chain.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::extension::InvokeEvent;
use crate::flush::Flusher;
use crate::phase::{self, Budget, Job};
use crate::report::{PhaseKind, PhaseReport};
use crate::runner::Runner;
use crate::scope::{Queue, lock};

/// Settings of the core, fixed at `start`.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) flushers: Vec<Flusher>,
    pub(crate) flush_timeout: Duration,
    pub(crate) safety_margin: Duration,
    /// How long a finished handler waits for its INVOKE event from the extension.
    pub(crate) claim_timeout: Duration,
    /// Without the runtime layer: how long an INVOKE event may stay unclaimed before it is
    /// taken for an invocation that no wrapper will see (an undecodable payload).
    pub(crate) stray_window: Duration,
    pub(crate) max_actions: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) handle_sigterm: bool,
    /// How long `start` waits for the extension's registration.
    pub(crate) register_timeout: Duration,
    pub(crate) on_report: Option<ReportHook>,
    /// The span exporter's counts, for `spans_lost` in the reports.
    pub(crate) span_counts: Option<Arc<crate::counting::ExportCounts>>,
    /// Report each phase through the global OpenTelemetry providers.
    pub(crate) phase_telemetry: bool,
}

/// The `on_report` callback.
#[derive(Clone)]
pub(crate) struct ReportHook(pub(crate) Arc<dyn Fn(&PhaseReport) + Send + Sync>);

impl std::fmt::Debug for ReportHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportHook")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            flushers: Vec::new(),
            flush_timeout: Duration::from_secs(10),
            safety_margin: Duration::from_millis(100),
            claim_timeout: Duration::from_secs(1),
            stray_window: Duration::from_millis(500),
            max_actions: 1000,
            // Lambda gives a function with an internal extension 500 ms between SIGTERM and
            // SIGKILL (Extensions API docs, "Shutdown phase").
            shutdown_timeout: Duration::from_millis(400),
            handle_sigterm: true,
            register_timeout: Duration::from_secs(5),
            on_report: None,
            span_counts: None,
            phase_telemetry: true,
        }
    }
}

/// Where deferred work runs in this process.
///
/// [`Deferred::start`](crate::Deferred::start) decides it once, and
/// [`DeferredHandle::mode`](crate::DeferredHandle::mode) tells it:
///
/// ```
/// use deferred_core::{Deferred, Mode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), deferred_core::StartError> {
/// let deferred = Deferred::new().start().await?;
/// // Outside Lambda (no AWS_LAMBDA_RUNTIME_API) no extension holds the environment.
/// assert_eq!(deferred.mode(), Mode::Inline);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// After the response, held by the internal extension (the chained `event/next`).
    Extension,
    /// Inline, before the handler returns: no extension holds the environment (outside
    /// Lambda, or registration failed). Slower, but nothing is lost.
    Inline,
    /// As background tasks, drained on SIGTERM (Lambda Managed Instances, where nothing is
    /// frozen and extensions may not subscribe to INVOKE).
    Background,
}

/// The chain's side of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chain {
    /// One `event/next` call is in flight.
    Armed,
    /// An INVOKE event is held in the slot; the next call waits for its phase.
    Holding,
    /// The last `event/next` failed; it will be retried.
    Broken,
    /// No more calls (SHUTDOWN received, or the process is exiting).
    Stopped,
}

/// The INVOKE event the chain holds, and what is known of its invocation.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) event: InvokeEvent,
    /// The event's number on the chain's line: the token its phase arms the next call with.
    pub(crate) seq: u64,
    /// Without the runtime layer: when an unclaimed event is taken for an invocation that no
    /// wrapper will see.
    pub(crate) stray_at: Instant,
    /// When the phase must be over (the deadline minus the safety margin).
    pub(crate) phase_end: Instant,
    /// The builder's `flush_timeout` after the event arrived: no flush of its phase can be
    /// overdue sooner (unless a handler sets a shorter one), so the watchdog looks first then.
    pub(crate) watch_from: Instant,
    /// A wrapper is running for it.
    pub(crate) claimed: bool,
    /// The wrapper's queue, once the handler has returned.
    pub(crate) job: Option<Job>,
    /// The runtime layer saw the response posted.
    pub(crate) responded: bool,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) chain: Chain,
    pub(crate) slot: Option<Slot>,
    /// A wrapper started for this request id before its event arrived.
    pub(crate) expected: Option<String>,
    /// The deadline of [`expected`](Self::expected)'s invocation.
    pub(crate) expected_deadline: Option<SystemTime>,
    /// Without the layer: a wrapper still running whose invocation was closed while it ran or
    /// as it began (a failed call, a broken chain, the chain out of step), and its deadline.
    /// Its work runs inline before the handler returns; but should its future be dropped (a
    /// timeout around the handler) the work goes on as a background phase after the runtime
    /// is done, so the chain lets no call out (which would let Lambda complete the invocation
    /// and freeze that work) until the work is over, at most until its phase end
    /// ([`Core::closed_work_done`], [`State::closed_work_until`]). Counted: calls of one invocation running at once (a
    /// router's `join_all`) each end theirs.
    pub(crate) running_closed: Option<(String, Option<SystemTime>, usize)>,
    /// Request ids closed without (or before) their wrapper: a late wrapper runs inline.
    pub(crate) closed: VecDeque<String>,
    /// The runtime answered this invocation before its INVOKE event reached the chain (the
    /// handler was never called, or the event is late).
    pub(crate) responded_early: Option<String>,
    /// With the runtime layer: a finished handler's job whose INVOKE event had not reached the
    /// chain yet; the event takes it on arrival (or the layer, after the response, gives up
    /// waiting and runs it).
    pub(crate) parked: Option<Job>,
    /// A failed `event/next` call lost an INVOKE event, or was refused because Lambda counts a
    /// dead call of ours as waiting and will lose the next one there (see
    /// [`State::call_failed`]), before a wrapper started for it: the next wrapper that starts
    /// without its event, until this instant, is that one.
    pub(crate) lost_event: Option<Instant>,
    /// A wrapper started without its event since the last event arrived: a loss after that is
    /// its invocation's, not one still to start.
    pub(crate) begun_unseen: bool,
    /// With the runtime layer: the invocation that [`lost_event`](Self::lost_event) was taken
    /// for. Its job is parked as usual, but not waited for after the response.
    pub(crate) lost_to: Option<String>,
    /// The invocation (request id and deadline) whose handler's job last began its phase: a
    /// later call of a deferred handler in it (a router calling one per record, under `start`)
    /// cannot join that phase. The deadline tells a retry, which keeps its request id, apart
    /// (a deadline less than a second from this one is this invocation's: `same_deadline`).
    pub(crate) phased: Option<(String, SystemTime)>,
}

const CLOSED_KEPT: usize = 16;

/// Whether the runtime's deadline and the extension's INVOKE event's are one invocation's.
/// They need not be equal: Lambda's Runtime API server renders each from the invocation's
/// monotonic deadline when it answers that call, with a wall-clock offset read anew and
/// truncated to the millisecond (aws-lambda-runtime-interface-emulator,
/// `rapi/rendering/rendering.go`), so they can differ by a millisecond. An asynchronous retry,
/// which keeps the request id, comes a minute or more later ("Lambda waits one minute between
/// the first two attempts", Lambda developer guide, asynchronous invocation).
fn same_deadline(a: SystemTime, b: SystemTime) -> bool {
    const APART: Duration = Duration::from_secs(1);
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .is_ok_and(|gap| gap < APART)
}

impl State {
    pub(crate) fn close(&mut self, request_id: String) {
        if self.closed.len() == CLOSED_KEPT {
            self.closed.pop_front();
        }
        self.closed.push_back(request_id);
    }

    pub(crate) fn was_closed(&self, request_id: &str) -> bool {
        self.closed.iter().any(|id| id == request_id)
    }

    /// Notes a running wrapper whose invocation is closed now (see
    /// [`running_closed`](Self::running_closed)), with its invocation's deadline (unknown:
    /// the longest a function runs, as for a phase).
    pub(crate) fn close_running(&mut self, request_id: String, deadline: Option<SystemTime>) {
        match &mut self.running_closed {
            // Another call of that invocation: the wait lasts until both are over.
            Some((id, until, calls)) if *id == request_id => {
                *until = until.zip(deadline).map(|(a, b)| a.max(b));
                *calls += 1;
            }
            running => *running = Some((request_id, deadline, 1)),
        }
    }

    /// Until when the chain must not let a call out for a running wrapper's closed work (see
    /// [`running_closed`](Self::running_closed)): its phase end, the deadline minus `margin`;
    /// `None`: it may now. Converted here, not where the wait is set: that is on every
    /// invocation's path, this only where a call is held back.
    pub(crate) fn closed_work_until(&self, margin: Duration) -> Option<Instant> {
        let (_, deadline, _) = self.running_closed.as_ref()?;
        Some(Budget::new(*deadline, margin).end).filter(|end| *end > Instant::now())
    }

    /// Whether this invocation's phase has begun (see [`phased`](Self::phased)); an unknown
    /// deadline matches any.
    fn phase_begun(&self, request_id: &str, deadline: Option<SystemTime>) -> bool {
        self.phased.as_ref().is_some_and(|(id, at)| {
            id == request_id && deadline.is_none_or(|d| same_deadline(d, *at))
        })
    }

    /// The extension's INVOKE event (`extension`) and the runtime's invocation (`runtime`)
    /// differ, in whichever order they came: the chain is out of step. Neither can count on
    /// it, so both are closed (the runtime's work runs outside the chain; the event, if held,
    /// is released) and the chain is re-armed.
    pub(crate) fn out_of_step(&mut self, runtime: String, extension: String) {
        tracing::error!(
            target: "deferred",
            runtime_request_id = %runtime,
            extension_request_id = %extension,
            "the extension's INVOKE event does not match the runtime's invocation; running \
             this invocation's deferred work outside the chain"
        );
        self.close(runtime);
        self.close(extension);
        self.rearm();
    }

    /// The chain calls `event/next` again: `Armed`, unless it has stopped for good (a SHUTDOWN
    /// event, a phase thread that never started, or a chain that panicked, whose held event a
    /// wrapper may still take): a stopped chain revived by a wrapper would make every later
    /// invocation wait for events that no one reads.
    fn rearm(&mut self) {
        if self.chain != Chain::Stopped {
            self.chain = Chain::Armed;
        }
    }

    /// An `event/next` call failed: it may have carried the INVOKE event of the invocation in
    /// progress, lost with it (a connection closed mid-body, an undecodable body). The wrapper
    /// waiting for that event, or whose job is parked for it, must not wait it out: its
    /// invocation is closed, so its work runs outside the chain now, and the event, should a
    /// retried call still bring it, is released at once.
    ///
    /// `lost`: the call was answered with an event that could not be read, so an INVOKE event
    /// is gone for sure, or refused because Lambda counts an earlier call as still waiting, so
    /// the next one will be; `Some(until)`. With no wrapper waiting and none started without its
    /// event since the last one arrived, its handler has not started: the next one to start
    /// without its event (until then: a handler that never starts, for a payload the runtime
    /// cannot decode, must not leave it to a later invocation) must not wait for it either
    /// ([`Core::begin`]).
    pub(crate) fn call_failed(&mut self, lost: Option<Instant>) {
        self.chain = Chain::Broken;
        // A wrapper still running (`expected`), or a finished handler's job parked for it.
        let running = self.expected.take();
        let is_running = running.is_some();
        let waiting = running.or_else(|| self.parked.as_ref().map(|job| job.request_id.clone()));
        match waiting {
            Some(request_id) if !self.was_closed(&request_id) => {
                if is_running {
                    self.close_running(request_id.clone(), self.expected_deadline);
                }
                self.close(request_id);
            }
            Some(_) => {}
            None if !self.begun_unseen => self.lost_event = lost.or(self.lost_event),
            None => {}
        }
    }
}

/// A phase that can start: its job, the event whose next call it arms, and when it must end
/// (the instant the chain's timers use too).
#[derive(Debug)]
pub(crate) struct Ready {
    pub(crate) job: Job,
    pub(crate) seq: u64,
    pub(crate) end: Instant,
}

/// Where a wrapper's work goes when its handler returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ticket {
    Chained(String),
    Inline,
    Background,
}

/// The core of one process.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) config: Config,
    pub(crate) mode: Mode,
    pub(crate) state: watch::Sender<State>,
    /// Set when the runtime layer is installed: it then closes every invocation.
    pub(crate) layer_installed: AtomicBool,
    /// Phases in a row with a flush that did not succeed.
    flush_failures: AtomicU32,
    /// The lost-span count at the previous report.
    lost_reported: std::sync::atomic::AtomicU64,
    /// The most spans found dropped on a full queue so far: what the reports have counted.
    dropped_reported: std::sync::atomic::AtomicU64,
    /// Set when the final flush begins: no INVOKE event will come any more.
    pub(crate) terminating: watch::Sender<bool>,
    /// Set on SIGTERM: running phases abandon their action and leave the flush to the final one.
    pub(crate) stopping: watch::Sender<bool>,
    /// Serialises phases with the final flush on SIGTERM.
    pub(crate) phase_lock: Arc<tokio::sync::Mutex<()>>,
    /// The chain's phase thread and line, once the chain runs.
    pub(crate) runner: OnceLock<Arc<Runner>>,
    /// Background phases (Managed Instances) still running, drained on SIGTERM.
    pub(crate) background: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// The latest end of a phase handed to the chain or to the background so far (its
    /// deadline minus the safety margin, plus the half margin after which the chain releases
    /// a chained phase that has not ended): how long a drain waits for the work in flight.
    work_until: std::sync::Mutex<Option<Instant>>,
    /// Notified when an invocation's deferred work ran outside the chain because its INVOKE
    /// event never reached it: a call kept across a SnapStart restore is then taken for dead
    /// (see `snapstart.rs`).
    pub(crate) event_missed: tokio::sync::Notify,
    /// Dropped handlers' jobs (no layer) waiting for their INVOKE event or, refused by the
    /// chain, running as background phases: a retried `event/next` waits for them.
    pub(crate) loose: watch::Sender<usize>,
}

static GLOBAL: OnceLock<Arc<Core>> = OnceLock::new();

impl Core {
    pub(crate) fn new(config: Config, mode: Mode) -> Arc<Self> {
        let chain = match mode {
            Mode::Extension => Chain::Armed,
            Mode::Inline | Mode::Background => Chain::Stopped,
        };
        Arc::new(Self {
            config,
            mode,
            state: watch::Sender::new(State {
                chain,
                slot: None,
                expected: None,
                expected_deadline: None,
                running_closed: None,
                closed: VecDeque::new(),
                responded_early: None,
                parked: None,
                lost_event: None,
                begun_unseen: false,
                lost_to: None,
                phased: None,
            }),
            layer_installed: AtomicBool::new(false),
            flush_failures: AtomicU32::new(0),
            lost_reported: std::sync::atomic::AtomicU64::new(0),
            dropped_reported: std::sync::atomic::AtomicU64::new(0),
            terminating: watch::Sender::new(false),
            stopping: watch::Sender::new(false),
            phase_lock: Arc::new(tokio::sync::Mutex::new(())),
            runner: OnceLock::new(),
            background: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            work_until: std::sync::Mutex::new(None),
            event_missed: tokio::sync::Notify::new(),
            loose: watch::Sender::new(0),
        })
    }

    /// The core of this process, if `Deferred::start` ran.
    pub(crate) fn global() -> Option<&'static Arc<Core>> {
        GLOBAL.get()
    }

    /// Installs `core` as this process's core; false if one was installed already.
    pub(crate) fn install(core: Arc<Core>) -> bool {
        GLOBAL.set(core).is_ok()
    }

    pub(crate) fn layer_installed(&self) -> bool {
        self.layer_installed.load(Ordering::Acquire)
    }

    /// Called by the wrapper when a handler starts: no waiting on the response path.
    pub(crate) fn begin(self: &Arc<Self>, invocation: &crate::context::Invocation) -> Ticket {
        let (request_id, deadline) = (invocation.request_id.as_str(), invocation.deadline);
        match self.mode {
            Mode::Inline => return Ticket::Inline,
            Mode::Background => return Ticket::Background,
            Mode::Extension => {}
        }
        if request_id.is_empty() {
            // Said once: on every invocation it would flood the logs.
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    target: "deferred",
                    "a deferred handler's input carries no Lambda context (no request id): its \
                     deferred work runs inline, before the response. A middleware that rebuilds \
                     the lambda_http::Request must keep its extensions"
                );
            }
            return Ticket::Inline;
        }
        let mut ticket = Ticket::Chained(request_id.to_owned());
        let mut release = None;
        let mut orphan = None;
        let mut again = false;
        self.state.send_if_modified(|state| {
            if state.was_closed(request_id) {
                // A later call of a closed invocation (a router): its work runs outside the
                // chain too, so the chain's wait covers it.
                state.close_running(request_id.to_owned(), deadline);
                ticket = Ticket::Inline;
                return false;
            }
            if state.phase_begun(request_id, deadline) {
                // Its event was taken by an earlier call's phase, which has begun: no event
                // will come for this call.
                again = true;
                ticket = Ticket::Inline;
                return false;
            }
            match &mut state.slot {
                Some(slot) if slot.event.request_id == request_id && !slot.claimed => {
                    // Nobody waits on a claim: the chain looks at it on its own timer.
                    slot.claimed = true;
                    false
                }
                Some(slot) if slot.event.request_id != request_id => {
                    // The extension was given another invocation than the runtime: the chain
                    // is out of step. Release that event and keep this invocation's work
                    // inline, so nothing depends on a readiness signal we cannot trust.
                    let stale = slot.event.request_id.clone();
                    release = Some(slot.seq);
                    orphan = slot.job.take();
                    state.slot = None;
                    state.out_of_step(request_id.to_owned(), stale);
                    state.close_running(request_id.to_owned(), deadline);
                    ticket = Ticket::Inline;
                    true
                }
                Some(_) => false,
                None => {
                    // Its event lost by a failed call before the handler started (this is the
                    // next handler to start without its event): it must not be waited for.
                    // Without the layer the work runs inline now, rather than after that wait
                    // on the response path; with it, the job is parked as usual and run right
                    // after the response ([`claim_parked`](Self::claim_parked)).
                    state.begun_unseen = true;
                    let lost = state
                        .lost_event
                        .take()
                        .is_some_and(|until| Instant::now() < until);
                    let layer = self.layer_installed();
                    if state.chain == Chain::Armed && (layer || !lost) {
                        state.expected = Some(request_id.to_owned());
                        state.expected_deadline = deadline;
                        if lost {
                            state.lost_to = Some(request_id.to_owned());
                        }
                    } else {
                        // The chain is broken (or stopped), or the event lost: the work runs
                        // inline. Closed, so that the INVOKE event, should a retried
                        // `event/next` still bring it, is released at once rather than given
                        // a second, flush-only phase.
                        state.close(request_id.to_owned());
                        state.close_running(request_id.to_owned(), deadline);
                        ticket = Ticket::Inline;
                    }
                    false
                }
            }
        });
        // The released event has no phase: the next call may go out once this wrapper's
        // work is safe from a freeze.
        if let Some(seq) = release {
            self.arm_after_closed_work(seq);
        }
        if again {
            called_again(request_id);
        }
        // The stale event's job (its handler returned, its response not seen): its actions
        // still run, beside this invocation's, rather than being dropped with the event.
        if let Some(job) = orphan {
            self.spawn_background(job);
        }
        ticket
    }

    /// The actions that earlier calls of a deferred handler in this invocation queued, when
    /// their job is held for the phase a later call joins (a router, under the layer): that
    /// call's queue starts from them, so `max_actions` bounds the invocation.
    pub(crate) fn queued_before(&self, request_id: &str) -> usize {
        let state = self.state.borrow();
        let held = state
            .slot
            .as_ref()
            .filter(|slot| slot.event.request_id == request_id)
            .and_then(|slot| slot.job.as_ref())
            .or(state
                .parked
                .as_ref()
                .filter(|job| job.request_id == request_id));
        held.map_or(0, |job| job.queue.pushed())
    }

    /// Called by the wrapper when the handler returned, before [`dispatch`](Self::dispatch):
    /// usually the INVOKE event is there already; if the extension's answer is still on its
    /// way, wait for it briefly (after the body, so rarely on the response path): at most the
    /// [`claim_window`](Self::claim_window) of the invocation ending at `deadline`.
    pub(crate) async fn await_event(&self, ticket: &Ticket, deadline: Option<SystemTime>) {
        self.await_event_for(ticket, self.claim_window(deadline))
            .await;
    }

    /// [`await_event`](Self::await_event), waiting at most `window`.
    async fn await_event_for(&self, ticket: &Ticket, window: Duration) {
        let Ticket::Chained(request_id) = ticket else {
            return;
        };
        if self.layer_installed() {
            // No waiting before the response: `hand_over` parks the job for its event, and
            // the layer waits for that after the response if it must.
            return;
        }
        let mut rx = self.state.subscribe();
        let wait = rx.wait_for(|s| {
            s.slot
                .as_ref()
                .is_some_and(|slot| &slot.event.request_id == request_id)
                || s.chain != Chain::Armed
                || s.was_closed(request_id)
        });
        let _ = tokio::time::timeout(window, wait).await;
    }

    /// How long a wrapper (or the layer) waits for a late INVOKE event before it runs the work
    /// itself: `claim_timeout`, but never more than half of what the invocation has left, so
    /// that the work still has time to run before the deadline.
    fn claim_window(&self, deadline: Option<SystemTime>) -> Duration {
        let end = Budget::new(deadline, self.config.safety_margin).end;
        let left = end.saturating_duration_since(Instant::now());
        self.config.claim_timeout.min(left / 2)
    }

    /// Hands a finished handler's `job` to the chain or to a background task; gives it back
    /// when the chain cannot take it (`refused` says, for the log, where it then runs).
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        ticket: &Ticket,
        job: Job,
        refused: &str,
    ) -> Option<Job> {
        match ticket {
            Ticket::Inline => Some(job),
            Ticket::Background => {
                self.spawn_background(job);
                None
            }
            Ticket::Chained(request_id) => self.hand_over(request_id, job, refused),
        }
    }

    /// Puts `job` in the chain's slot if the chain holds its invocation.
    fn hand_over(&self, request_id: &str, job: Job, refused: &str) -> Option<Job> {
        let deadline = job.deadline;
        let mut job = Some(job);
        let mut closed_before = false;
        let mut again = false;
        let mut ready = None;
        self.state.send_if_modified(|state| {
            if state.expected.as_deref() == Some(request_id) {
                state.expected = None;
            }
            let can_park = self.layer_installed()
                && state.chain == Chain::Armed
                && !state.was_closed(request_id);
            match &mut state.slot {
                Some(slot) if slot.event.request_id == request_id => {
                    slot.claimed = true;
                    match (&mut slot.job, job.take()) {
                        // A later call in the same invocation: its work joins the phase.
                        (Some(held), Some(later)) => held.join(later),
                        (held, job) => *held = job,
                    }
                    // Without the layer the phase starts now; with it, on `responded`.
                    ready = self.take_ready(state, Instant::now());
                    false
                }
                None if state
                    .parked
                    .as_ref()
                    .is_some_and(|held| held.request_id == request_id) =>
                {
                    if let (Some(held), Some(later)) = (state.parked.as_mut(), job.take()) {
                        held.join(later);
                    }
                    false
                }
                // Never over another parked job: that one's actions would be lost.
                None if can_park && state.parked.is_none() => {
                    // The event is on its way (the call is in flight): it takes the job.
                    state.parked = job.take();
                    false
                }
                _ => {
                    // Too late (the chain closed it) or never arrived: the chain will close
                    // it on arrival, and the work runs inline, before the response. Or its
                    // event's phase has begun, for an earlier call in the same invocation.
                    again = state.phase_begun(request_id, deadline);
                    closed_before = state.was_closed(request_id);
                    if !closed_before {
                        state.close(request_id.to_owned());
                    }
                    false
                }
            }
        });
        if let Some(ready) = ready {
            self.submit(ready);
        }
        if again {
            called_again(request_id);
        } else if job.is_some() {
            let why = if closed_before {
                "its deferred phase was already closed (the deadline minus the safety margin \
                 came first, the chain was out of step, or the event/next call that would have \
                 brought its INVOKE event failed)"
            } else {
                self.event_missed.notify_waiters();
                "the extension did not receive its INVOKE event in time"
            };
            tracing::warn!(
                target: "deferred",
                request_id,
                "{why}: running this invocation's deferred work {refused}"
            );
        }
        job
    }

    /// Called by the runtime layer once the response is posted and the invocation's span
    /// closed. True when the invocation's job is parked for an event that has not arrived:
    /// the layer then waits for it ([`claim_parked`](Self::claim_parked)).
    pub(crate) fn responded(&self, request_id: &str) -> bool {
        let mut ready = None;
        let mut parked = false;
        // Nobody waits on this change: the phase (if it can start) is handed over right here,
        // so the chain's task is not woken on the path to the next invocation.
        self.state.send_if_modified(|state| {
            match &mut state.slot {
                Some(slot) if slot.event.request_id == request_id => {
                    slot.responded = true;
                    ready = self.take_ready(state, Instant::now());
                }
                _ => {
                    state.responded_early = Some(request_id.to_owned());
                    parked = state
                        .parked
                        .as_ref()
                        .is_some_and(|job| job.request_id == request_id);
                }
            }
            false
        });
        if let Some(ready) = ready {
            self.submit(ready);
        }
        parked
    }

    /// After the response, for a job parked for its event: waits (at most `claim_timeout`)
    /// for the event to take it; otherwise takes it back and runs it here, before the
    /// runtime asks for the next invocation (so the environment is not frozen meanwhile).
    pub(crate) async fn claim_parked(&self, request_id: &str) {
        let mut rx = self.state.subscribe();
        let deadline = rx
            .borrow()
            .parked
            .as_ref()
            .filter(|job| job.request_id == request_id)
            .and_then(|job| job.deadline);
        // Taken by its event, or the event will not come: the call failed (the chain is
        // broken, or was and closed this invocation; or it failed before the handler started,
        // losing this event) or was answered with another invocation.
        let settled = rx.wait_for(|s| {
            s.lost_to.as_deref() == Some(request_id)
                || s.parked
                    .as_ref()
                    .is_none_or(|job| job.request_id != request_id)
                || s.chain == Chain::Broken
                || s.chain == Chain::Stopped
                || s.was_closed(request_id)
        });
        let _ = tokio::time::timeout(self.claim_window(deadline), settled).await;
        let mut job = None;
        self.state.send_if_modified(|state| {
            job = state.parked.take_if(|job| job.request_id == request_id);
            state.lost_to.take_if(|id| id == request_id);
            if job.is_some() && !state.was_closed(request_id) {
                state.close(request_id.to_owned());
            }
            false
        });
        if let Some(job) = job {
            tracing::warn!(
                target: "deferred",
                request_id,
                "the extension did not receive its INVOKE event in time (or its call failed): \
                 running this invocation's deferred work before the next invocation"
            );
            self.run_phase(job, PhaseKind::Inline).await;
            // Only now: a call that replaces a dead one must not go out while it ran.
            self.event_missed.notify_waiters();
        }
    }

    /// Takes the held event out of the slot if its phase can start now (see `decide`): the
    /// wrapper's job, or a flush-only job when no wrapper will hand one over.
    pub(crate) fn take_ready(&self, state: &mut State, now: Instant) -> Option<Ready> {
        let slot = state.slot.as_ref()?;
        let why = crate::chain::decide(self.layer_installed(), slot, now).ok()?;
        let slot = state.slot.take()?;
        state.rearm();
        let job = match slot.job {
            Some(job) => {
                // Moved, not cloned: the slot is done with it.
                state.phased = Some((slot.event.request_id, slot.event.deadline));
                job
            }
            None => {
                if let Some(why) = why {
                    tracing::debug!(target: "deferred", request_id = %slot.event.request_id, why, "phase without actions");
                }
                let invocation = crate::context::Invocation {
                    request_id: slot.event.request_id.clone(),
                    deadline: Some(slot.event.deadline),
                };
                state.close(slot.event.request_id);
                // The handler never ran: no span of the invocation to hang the phase under.
                self.job(&invocation, Queue::new(0), None, None)
            }
        };
        Some(Ready {
            job,
            seq: slot.seq,
            end: slot.phase_end,
        })
    }

    /// Notes that a phase ending by `end` is in flight (see [`work_until`](Self::work_until)).
    fn in_flight_until(&self, end: Instant) {
        let end = end + self.config.safety_margin / 2;
        let mut until = lock(&self.work_until);
        *until = Some(until.map_or(end, |at| at.max(end)));
    }

    /// The latest end of the work handed over so far: a drain waits for it until then.
    pub(crate) fn work_until(&self) -> Option<Instant> {
        *lock(&self.work_until)
    }

    /// Hands a phase to the chain's phase thread, which arms the next call once it has ended.
    pub(crate) fn submit(&self, ready: Ready) {
        self.in_flight_until(ready.end);
        match self.runner.get() {
            Some(runner) => runner.submit(ready),
            None => tracing::error!(target: "deferred", "a chained phase without a chain"),
        }
    }

    /// Lets the next `event/next` go out for event `seq`, which has no phase.
    pub(crate) fn arm(&self, seq: u64) {
        if let Some(runner) = self.runner.get() {
            runner.line.arm(seq);
        }
    }

    /// [`arm`](Self::arm), once a running wrapper's closed work is over (see
    /// [`State::running_closed`]), at most at its end. Without the layer only: with it, the
    /// layer holds the invocation until that work is done.
    pub(crate) fn arm_after_closed_work(self: &Arc<Self>, seq: u64) {
        // Not the loose jobs still waiting for their event: one may wait for the event this
        // call would bring. Those refused by the chain are running closed work (see
        // `hand_over_later`).
        match self.closed_work_end() {
            Some(until) => {
                let core = self.clone();
                tokio::spawn(async move {
                    core.wait_closed_work(until).await;
                    core.arm(seq);
                });
            }
            None => self.arm(seq),
        }
    }

    /// Without the layer, until when a running wrapper's closed work holds the chain's next
    /// call (see [`State::running_closed`]); `None`: it holds nothing.
    pub(crate) fn closed_work_end(&self) -> Option<Instant> {
        if self.layer_installed() {
            return None;
        }
        self.state
            .borrow()
            .closed_work_until(self.config.safety_margin)
    }

    /// Waits until the running wrappers' closed work is over, at most until `until`.
    async fn wait_closed_work(&self, until: Instant) {
        let mut state = self.state.subscribe();
        let over = state.wait_for(|s| s.running_closed.is_none());
        let _ = tokio::time::timeout_at(until, over).await;
    }

    /// Waits, before the chain's retry, for the work that runs outside the chain while its
    /// invocation may still be open: dropped handlers' loose jobs (at most until the end of
    /// the work handed over; after a failure none waits for an event) and, without the layer,
    /// a running wrapper's closed work (at most until its end; see
    /// [`State::running_closed`]). A call that goes out meanwhile lets Lambda complete the
    /// invocation and freeze that work.
    pub(crate) async fn closed_work_over(&self) {
        if let Some(until) = self.work_until() {
            let mut loose = self.loose.subscribe();
            let _ = tokio::time::timeout_at(until, loose.wait_for(|n| *n == 0)).await;
        }
        if let Some(until) = self.closed_work_end() {
            self.wait_closed_work(until).await;
        }
    }

    /// The closed work of `request_id`'s wrapper is over (it ran inline, or its dropped
    /// handler's background phase ended): a call held for it may go out.
    pub(crate) fn closed_work_done(&self, request_id: &str) {
        self.state
            .send_if_modified(|state| match &mut state.running_closed {
                Some((id, _, calls)) if id == request_id && *calls > 1 => {
                    *calls -= 1;
                    false
                }
                running => running.take_if(|(id, _, _)| id == request_id).is_some(),
            });
    }

    /// The job of a handler that ran with this queue.
    pub(crate) fn job(
        &self,
        invocation: &crate::context::Invocation,
        queue: Arc<crate::scope::Queue>,
        flush_timeout: Option<Duration>,
        parent: Option<opentelemetry::trace::SpanContext>,
    ) -> Job {
        Job {
            request_id: invocation.request_id.clone(),
            deadline: invocation.deadline,
            flush_timeout: queue.flush_timeout(flush_timeout, self.config.flush_timeout),
            queue,
            parent,
        }
    }

    pub(crate) fn stop(&self) -> phase::Stop {
        phase::Stop::new(self.stopping.subscribe())
    }

    /// Runs a phase and reports it. Phases never overlap, except background ones.
    pub(crate) async fn run_phase(&self, job: Job, kind: PhaseKind) -> PhaseReport {
        let budget = Budget::new(job.deadline, self.config.safety_margin);
        let flushers = &self.config.flushers;
        let report = if kind == PhaseKind::Background {
            phase::run(job, flushers, budget, kind, self.stop()).await
        } else {
            // A phase thread can hold the lock past its phase's end (a blocking `on_report`
            // hook, whose invocation the chain's safety net releases): wait for it at most half
            // of what is left, then run unserialized rather than hold this invocation's work,
            // or its response, to the deadline.
            let now = Instant::now();
            let waited = now + budget.end.saturating_duration_since(now) / 2;
            let serial = tokio::time::timeout_at(waited, self.phase_lock.lock()).await;
            if serial.is_err() {
                tracing::warn!(
                    target: "deferred",
                    request_id = %job.request_id,
                    "the previous deferred phase still holds the phase lock (an on_report hook \
                     that blocks?): this phase runs beside it"
                );
            }
            phase::run(job, flushers, budget, kind, self.stop()).await
        };
        self.finish(report)
    }

    /// Takes the spans lost so far (failed exports, with span counts) as reported, and returns
    /// how many no report has counted yet: before a SnapStart snapshot, so that init's losses
    /// are said once, not again by every environment restored from it.
    pub(crate) fn settle_lost(&self) -> u64 {
        let Some(counts) = &self.config.span_counts else {
            return 0;
        };
        let lost = counts.lost();
        lost.saturating_sub(self.lost_reported.fetch_max(lost, Ordering::Relaxed))
    }

    /// As [`settle_lost`](Self::settle_lost), for the spans found dropped on a full queue.
    pub(crate) fn settle_dropped(&self) -> u64 {
        let Some(counts) = &self.config.span_counts else {
            return 0;
        };
        self.take_dropped(counts).unwrap_or(0)
    }

    /// The spans found dropped on a full queue (see `finish`) that no report has counted yet,
    /// taken as counted; `None` without a `CountingSpanProcessor`.
    fn take_dropped(&self, counts: &crate::counting::ExportCounts) -> Option<u64> {
        // The flushed count first: each span it covers was exported or lost before it was
        // noted, so the counts read after include it. Read the other way round, a flush that
        // ends in between (another phase's) has its lost spans counted as dropped too.
        counts.flushed_if_counted().map(|ended| {
            let handled = counts.exported().saturating_add(counts.lost());
            let dropped = ended.saturating_sub(handled);
            dropped.saturating_sub(self.dropped_reported.fetch_max(dropped, Ordering::Relaxed))
        })
    }

    /// What every phase report goes through, the final flush's included: the failure
    /// counter, the log line, the OpenTelemetry spans and metrics, and the `on_report` hook.
    pub(crate) fn finish(&self, mut report: PhaseReport) -> PhaseReport {
        if let Some(counts) = &self.config.span_counts {
            let lost = counts.lost();
            // `fetch_max`: overlapping phases (Managed Instances) may read `lost` in one order
            // and get here in the other; the mark must not go back, or spans count twice.
            report.spans_lost =
                Some(lost.saturating_sub(self.lost_reported.fetch_max(lost, Ordering::Relaxed)));
            // After a flush of the batch processor that succeeded, every span that ended before
            // it began has been exported, lost in a failed export, or dropped on a full queue
            // (which no exporter sees). The processor notes how many had ended when its latest
            // such flush began. Spans exported since may hide a drop: a lower bound.
            report.spans_dropped = (!report.flushes.is_empty() && report.flushed())
                .then(|| self.take_dropped(counts))
                .flatten();
        }
        report.consecutive_flush_failures =
            if report.flushes.is_empty() && !self.config.flushers.is_empty() {
                // Not flushed, and not failed: its flush was left to the final one (SIGTERM).
                // The streak stands as it is.
                self.flush_failures.load(Ordering::Relaxed)
            } else if report.flushed() {
                self.flush_failures.store(0, Ordering::Relaxed);
                0
            } else {
                self.flush_failures
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1)
            };
        // Each observer's panic is caught (the user's hook, a tracing subscriber, a global
        // provider's exporter): it would otherwise unwind through the phase's end and leave
        // its `event/next` unsent (the environment held to the safety net), or turn a
        // handler's `Ok` into a panic on the inline path. The others still run.
        observe("the phase's log line", &report.request_id, || report.emit());
        if self.config.phase_telemetry {
            observe("the phase's telemetry", &report.request_id, || {
                crate::otel::record(&report);
            });
        }
        if let Some(hook) = &self.config.on_report {
            observe("the on_report hook", &report.request_id, || {
                (hook.0)(&report)
            });
        }
        report
    }

    /// For a handler future dropped before it completed (no layer installed): what the
    /// wrapper's `run` would have done after the body, in a task of the background set (the
    /// SIGTERM flush waits for it): wait for the INVOKE event and hand the job to its phase.
    ///
    /// The response is out (or the caller gone), so nothing waits on this wait: unlike the
    /// wrapper's, it lasts until the invocation's phase end. Lambda delivers no other
    /// invocation meanwhile: the extension has not asked for one. Only a chain that cannot
    /// take the job (its `event/next` failed) leaves it to a background phase, which Lambda
    /// may freeze; and the final flush, which runs it at once.
    pub(crate) fn hand_over_later(self: &Arc<Self>, ticket: Ticket, job: Job) {
        let core = self.clone();
        let mut terminating = self.terminating.subscribe();
        let end = Budget::new(job.deadline, self.config.safety_margin).end;
        let deadline = job.deadline;
        self.in_flight_until(end);
        self.loose.send_modify(|n| *n += 1);
        self.spawn_tracked(async move {
            /// Counts the job as loose until it is chained or its phase has ended (or the
            /// task is aborted).
            struct Loose(Arc<Core>);
            impl Drop for Loose {
                fn drop(&mut self) {
                    self.0.loose.send_modify(|n| *n = n.saturating_sub(1));
                }
            }
            let _loose = Loose(core.clone());
            let window = end.saturating_duration_since(Instant::now());
            let terminated = tokio::select! {
                () = core.await_event_for(&ticket, window) => false,
                _ = terminating.wait_for(|t| *t) => true,
            };
            let refused = if terminated {
                // No event is coming, and the final flush is waiting: a phase handed to the
                // chain now could queue behind the final flush's lock and never run.
                core.close_ticket(&ticket);
                Some(job)
            } else {
                core.dispatch(
                    &ticket,
                    job,
                    "as a background task, which Lambda may freeze",
                )
            };
            if let Some(job) = refused {
                // Closed work now: should its event still come, its release waits for it. Not
                // counted again if it was when its invocation was closed (`call_failed`, `hold`).
                let request_id = job.request_id.clone();
                core.state.send_if_modified(|s| {
                    if s.running_closed
                        .as_ref()
                        .is_none_or(|(id, _, _)| *id != request_id)
                    {
                        s.close_running(request_id.clone(), deadline);
                    }
                    false
                });
                core.run_phase(job, PhaseKind::Background).await;
                core.closed_work_done(&request_id);
            }
        });
    }

    /// Closes the invocation of `ticket`, whose work runs outside the chain: its INVOKE event,
    /// should it still come, is released at once.
    fn close_ticket(&self, ticket: &Ticket) {
        let Ticket::Chained(request_id) = ticket else {
            return;
        };
        self.state.send_if_modified(|state| {
            if state.expected.as_deref() == Some(request_id.as_str()) {
                state.expected = None;
            }
            if !state.was_closed(request_id) {
                state.close(request_id.clone());
            }
            false
        });
    }

    pub(crate) fn spawn_background(self: &Arc<Self>, job: Job) {
        self.in_flight_until(Budget::new(job.deadline, self.config.safety_margin).end);
        let core = self.clone();
        self.spawn_tracked(async move {
            let request_id = job.request_id.clone();
            core.run_phase(job, PhaseKind::Background).await;
            core.closed_work_done(&request_id);
        });
    }

    /// Spawns `task` into the background set, which the SIGTERM flush drains.
    pub(crate) fn spawn_tracked(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.background);
        // Reap finished phases so the set does not grow with every invocation.
        while let Some(joined) = tasks.try_join_next() {
            phase::drop_joined(joined);
        }
        tasks.spawn(task);
    }
}

/// Says (once per process: a router does it on every invocation) that a deferred handler was
/// called again in an invocation whose phase had begun, so its work runs inline.
fn called_again(request_id: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            target: "deferred",
            request_id,
            "a deferred handler was called again in an invocation whose deferred phase had \
             begun (with start(), the phase begins when the first call returns): this call's \
             deferred work runs inline, before the response. With the runtime layer (run(), or \
             layer() on your own Runtime) every call's work joins the invocation's phase"
        );
    }
}

/// Runs `observer` (`what`, for the log) of the phase of `request_id`, its panic caught and
/// logged; on stderr when logging panics too (the subscriber may be what panicked).
fn observe(what: &str, request_id: &str, observer: impl FnOnce()) {
    let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(observer)) else {
        return;
    };
    let message = phase::panic_message(panic);
    let logged = std::panic::catch_unwind(|| {
        tracing::error!(
            target: "deferred",
            request_id = %request_id,
            "{what} panicked: {message}; the phase is over and the chain goes on",
        );
    });
    if let Err(panic) = logged {
        // Its payload's drop must not unwind out of the phase's end either.
        phase::drop_panic(panic);
        eprintln!(
            "deferred: {what} panicked (request {request_id}): {message}; the phase is over and the chain goes on"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An exporter whose first export waits until the test releases it (so that the batch
    /// processor's one worker is busy and its queue fills up).
    #[derive(Debug)]
    struct HeldOnce {
        started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl opentelemetry_sdk::trace::SpanExporter for HeldOnce {
        async fn export(
            &self,
            _batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            let started = crate::scope::lock(&self.started).take();
            if let Some(started) = started {
                let _ = started.send(());
                let _ = crate::scope::lock(&self.release).recv();
            }
            Ok(())
        }
    }

    /// An invocation of unknown deadline.
    fn invocation(request_id: &str) -> crate::context::Invocation {
        crate::context::Invocation {
            request_id: request_id.into(),
            deadline: None,
        }
    }

    /// The slot of event 1 (`request_id`, `deadline`), its phase a minute away, with the job
    /// of its handler (claimed) or without (no handler seen yet).
    /// `max_actions` is per invocation: a deferred handler called twice in one invocation (a
    /// router, under the layer) may not queue twice the limit between its calls, and the
    /// joined queue counts both calls' actions. Found by review: each call had the whole
    /// limit (4 of a limit of 2 accepted).
    #[tokio::test]
    async fn max_actions_bounds_an_invocation_of_several_calls() {
        let core = Core::new(
            Config {
                max_actions: 2,
                ..Config::default()
            },
            Mode::Extension,
        );
        core.layer_installed.store(true, Ordering::Release);
        let deadline = SystemTime::now() + Duration::from_secs(60);
        core.state.send_modify(|s| {
            s.chain = Chain::Holding;
            s.slot = Some(held("r-1", deadline, None));
        });
        let at = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let mut accepted = 0;
        for _ in 0..2 {
            let body = async {
                (0..2)
                    .filter(|_| crate::scope::defer(None, async {}).is_ok())
                    .count()
            };
            accepted +=
                crate::invocation::run_on(core.clone(), at.clone(), Default::default(), body).await;
        }
        let state = core.state.borrow();
        let queue = state
            .slot
            .as_ref()
            .and_then(|s| s.job.as_ref())
            .map(|j| &j.queue);
        assert_eq!(accepted, 2, "max_actions is 2 per invocation");
        assert_eq!(queue.map(|q| (q.len(), q.pushed())), Some((2, 2)));
    }

    /// A stopped chain stays stopped when a wrapper takes the event it held, or finds it out
    /// of step: after a panic in the chain with an event in the slot, `Armed` again would make
    /// every later invocation wait (up to `claim_timeout`) for events that no one reads.
    #[tokio::test]
    async fn a_stopped_chain_is_not_rearmed_by_a_wrapper() {
        let core = Core::new(Config::default(), Mode::Extension);
        core.layer_installed.store(true, Ordering::Release);
        let deadline = SystemTime::now() + Duration::from_secs(60);
        let mut slot = held("r-1", deadline, Some(inline_job("r-1")));
        slot.responded = true;
        core.state.send_modify(|s| {
            s.chain = Chain::Stopped;
            s.slot = Some(slot);
        });
        let mut ready = None;
        core.state
            .send_modify(|s| ready = core.take_ready(s, Instant::now()));
        assert!(ready.is_some(), "the held event's phase is ready");
        assert_eq!(core.state.borrow().chain, Chain::Stopped);
        core.state
            .send_modify(|s| s.out_of_step("r-2".into(), "r-3".into()));
        assert_eq!(core.state.borrow().chain, Chain::Stopped);
    }

    fn held(request_id: &str, deadline: SystemTime, job: Option<Job>) -> Slot {
        let later = Instant::now() + Duration::from_secs(60);
        Slot {
            event: InvokeEvent {
                request_id: request_id.into(),
                deadline,
                invoked_function_arn: None,
                trace_id: None,
            },
            seq: 1,
            stray_at: later,
            phase_end: later,
            watch_from: later,
            claimed: job.is_some(),
            job,
            responded: false,
        }
    }

    /// A queue with one action, which sets the flag returned with it.
    async fn flagging_queue() -> (Arc<Queue>, Arc<AtomicBool>) {
        let ran = Arc::new(AtomicBool::new(false));
        let queue = Queue::new(1);
        let r = ran.clone();
        crate::scope::with_queue(queue.clone(), async move {
            crate::scope::defer(None, async move { r.store(true, Ordering::SeqCst) }).unwrap();
        })
        .await;
        (queue, ran)
    }

    pub(crate) fn inline_job(request_id: &str) -> Job {
        Job {
            request_id: request_id.into(),
            deadline: None,
            queue: Queue::new(0),
            flush_timeout: Duration::from_secs(5),
            parent: None,
        }
    }

    /// An inline core that counts spans with `counts` and flushes with `flushers` (no phase
    /// telemetry, whose spans would be counted too).
    pub(crate) fn counted_core(
        flushers: Vec<crate::flush::Flusher>,
        counts: Arc<crate::ExportCounts>,
    ) -> Arc<Core> {
        Core::new(
            Config {
                flushers,
                span_counts: Some(counts),
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Inline,
        )
    }

    /// Spans the batch processor drops on a full queue never reach the exporter; with a
    /// `CountingSpanProcessor` the next report after a clean flush counts them, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_counts_the_spans_the_batch_processor_dropped() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};
        use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

        let (started, export_started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        let exporter = crate::CountingSpanExporter::new(HeldOnce {
            started: Mutex::new(Some(started)),
            release: Mutex::new(released),
        });
        let counts = exporter.counts();
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(4)
            .with_max_export_batch_size(1)
            .build();
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(crate::CountingSpanProcessor::new(batch, counts.clone()))
            .build();
        let tracer = provider.tracer("test");
        // The first span fills a batch: the worker exports it, and waits in the exporter.
        tracer.in_span("first", |_| {});
        export_started
            .recv_timeout(Duration::from_secs(5))
            .expect("the first export started");
        // Ten more: four fit in the queue, six are dropped.
        for _ in 0..10 {
            tracer.in_span("more", |_| {});
        }
        release.send(()).expect("the exporter waits");

        let core = counted_core(
            vec![crate::flush::Flusher::new(provider.clone())],
            counts.clone(),
        );
        let report = core.run_phase(inline_job("r-1"), PhaseKind::Inline).await;
        assert!(report.flushed(), "{report}");
        assert_eq!((counts.ended(), counts.exported()), (11, 5));
        assert_eq!(report.spans_lost, Some(0));
        assert_eq!(report.spans_dropped, Some(6), "{report}");
        assert!(!report.is_clean());
        assert!(
            report
                .to_string()
                .ends_with("; 6 spans dropped (the batch processor's queue was full)"),
            "{report}"
        );

        // Counted once: the next clean phase finds none.
        tracer.in_span("later", |_| {});
        let again = core.run_phase(inline_job("r-2"), PhaseKind::Inline).await;
        assert_eq!(again.spans_dropped, Some(0), "{again}");
        assert!(again.is_clean(), "{again}");
    }

    /// Fails its first export, delivers the others.
    #[derive(Debug, Default)]
    struct FailsFirst(std::sync::atomic::AtomicBool);

    impl opentelemetry_sdk::trace::SpanExporter for FailsFirst {
        async fn export(
            &self,
            _batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            if self.0.swap(true, Ordering::Relaxed) {
                Ok(())
            } else {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "collector said 500".into(),
                ))
            }
        }
    }

    /// The SDK's batch processor with batches of one span, without its thread (which exported
    /// a span as soon as it ended, sometimes before the test's flush: the test failed 7 times
    /// in 40 runs): a flush exports one batch per span and answers with the last batch's
    /// result, as the SDK's (0.33) does.
    #[derive(Debug)]
    struct OneSpanBatches<E> {
        exporter: E,
        queue: std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>,
    }

    impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanProcessor
        for OneSpanBatches<E>
    {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

        fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
            lock(&self.queue).push(span);
        }

        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            let spans = std::mem::take(&mut *lock(&self.queue));
            let mut last = Ok(());
            for span in spans {
                let export = std::pin::pin!(self.exporter.export(vec![span]));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::future::Future::poll(export, &mut cx) {
                    std::task::Poll::Ready(result) => last = result,
                    std::task::Poll::Pending => panic!("the test's exporter answers at once"),
                }
            }
            last
        }

        fn shutdown_with_timeout(
            &self,
            _: std::time::Duration,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
    }

    /// A flush of the processor that ends while a report counts (another phase's, on Managed
    /// Instances; the function's own), a span lost in it, does not make that span count as
    /// dropped too. Found by review: the report read the lost count before that flush ended
    /// and the flushed count after, and said "1 spans dropped" of the span lost (and the mark
    /// it kept then hid the next real drop).
    #[test]
    fn a_span_lost_by_a_flush_that_ends_meanwhile_is_not_counted_as_dropped() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};

        let exporter = crate::CountingSpanExporter::new(FailsFirst::default());
        let counts = exporter.counts();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(crate::CountingSpanProcessor::new(
                OneSpanBatches {
                    exporter,
                    queue: std::sync::Mutex::new(Vec::new()),
                },
                counts.clone(),
            ))
            .build();
        let core = counted_core(Vec::new(), counts.clone());
        let tracer = provider.tracer("test");
        for _ in 0..2 {
            tracer.in_span("work", |_| {});
        }
        // Its first batch is lost, its last goes out: the flush covered both spans.
        let elsewhere = provider.clone();
        crate::counting::tests::MEANWHILE.set(Some(Box::new(move || {
            assert!(elsewhere.force_flush().is_err(), "a span was lost");
        })));
        let mut report = PhaseReport::new(PhaseKind::Inline, "r-1");
        report
            .flushes
            .push(crate::FlushReport::new("metrics", crate::FlushOutcome::Ok));
        let report = core.finish(report);
        assert_eq!(
            (counts.flushed(), counts.exported(), counts.lost()),
            (2, 1, 1)
        );
        assert_eq!(report.spans_dropped, Some(0), "{report}");
    }

    /// Without a `CountingSpanProcessor` the report cannot tell, and says so with `None`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_counting_processor_drops_are_unknown() {
        let exporter = crate::CountingSpanExporter::new(
            opentelemetry_sdk::trace::InMemorySpanExporter::default(),
        );
        let counts = exporter.counts();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        let core = counted_core(vec![crate::flush::Flusher::new(provider)], counts);
        let report = core.run_phase(inline_job("r-1"), PhaseKind::Inline).await;
        assert_eq!((report.spans_lost, report.spans_dropped), (Some(0), None));
    }

    /// Spans still queued in a batch processor that no flush has covered are not counted as
    /// dropped, even when the core's flushers (which succeeded) do not include its provider.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_no_flush_covered_are_not_counted_as_dropped() {
        use opentelemetry::trace::{Tracer as _, TracerProvider as _};
        use opentelemetry_sdk::trace::{BatchSpanProcessor, InMemorySpanExporter};

        let exporter = crate::CountingSpanExporter::new(InMemorySpanExporter::default());
        let counts = exporter.counts();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(crate::CountingSpanProcessor::new(
                BatchSpanProcessor::builder(exporter).build(),
                counts.clone(),
            ))
            .build();
        let core = counted_core(
            vec![crate::flush::Flusher::new(crate::flush_fn(
                "metrics",
                || Ok::<_, crate::FlushError>(()),
            ))],
            counts.clone(),
        );
        // Three spans wait in the batch processor (its 5 s timer has not fired).
        let tracer = provider.tracer("test");
        for _ in 0..3 {
            tracer.in_span("queued", |_| {});
        }
        let report = core.run_phase(inline_job("r-1"), PhaseKind::Inline).await;
        assert!(report.flushed(), "{report}");
        assert_eq!((counts.ended(), counts.exported()), (3, 0));
        assert_eq!(report.spans_dropped, Some(0), "{report}");

        // Once the provider itself is flushed, they are out, and still none is dropped.
        provider
            .force_flush()
            .expect("the in-memory export succeeds");
        assert_eq!((counts.flushed(), counts.exported()), (3, 3));
        let report = core.run_phase(inline_job("r-2"), PhaseKind::Inline).await;
        assert_eq!(report.spans_dropped, Some(0), "{report}");
    }

    /// Background phases (Managed Instances) overlap: one whose flusher is busy with
    /// another's flush waits for it and flushes after, instead of reporting its flush as not run
    /// (a failure, which would make the failure count flap under load).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_background_phases_each_flush() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let core = Core::new(
            Config {
                flushers: vec![crate::flush::Flusher::new(crate::flush_fn(
                    "slow",
                    move || {
                        counted.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(150));
                        Ok::<_, crate::FlushError>(())
                    },
                ))],
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Background,
        );
        // Three: two wait for the first's flush, and only one of them can call next; the
        // other waits for that call in turn.
        let (a, b, c) = tokio::join!(
            core.run_phase(inline_job("r-1"), PhaseKind::Background),
            core.run_phase(inline_job("r-2"), PhaseKind::Background),
            core.run_phase(inline_job("r-3"), PhaseKind::Background),
        );
        assert!(a.flushed() && b.flushed() && c.flushed(), "{a}\n{b}\n{c}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// An inline phase does not wait without bound for a phase that holds the lock past its
    /// end (a blocking `on_report` hook): after half of what is left, it runs beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_phase_does_not_wait_forever_for_a_stuck_phase() {
        let core = Core::new(
            Config {
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Inline,
        );
        let stuck = core.phase_lock.clone().lock_owned().await;
        let (queue, ran) = flagging_queue().await;
        let job = Job {
            queue,
            deadline: Some(SystemTime::now() + Duration::from_secs(2)),
            ..inline_job("r-1")
        };
        let started = std::time::Instant::now();
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            core.run_phase(job, PhaseKind::Inline),
        )
        .await
        .expect("the phase ran, beside the stuck one");
        assert!(ran.load(Ordering::SeqCst), "{report}");
        // Half of the 1.9 s left, give or take.
        assert!(
            started.elapsed() < Duration::from_millis(1800),
            "{:?}",
            started.elapsed()
        );
        drop(stuck);
    }

    /// A phase stopped by SIGTERM leaves its flush to the final one: it neither breaks nor
    /// extends the streak of failed flushes. (Before, its empty list of flushes counted as
    /// flushed and reset the streak to 0.)
    #[tokio::test]
    async fn a_phase_stopped_by_sigterm_leaves_the_failure_streak_as_it_is() {
        let core = Core::new(
            Config {
                flushers: vec![crate::flush::Flusher::new(crate::flush_fn("down", || {
                    Err::<(), _>("the collector is down")
                }))],
                phase_telemetry: false,
                ..Config::default()
            },
            Mode::Background,
        );
        for expected in 1..=2 {
            let report = core.run_phase(inline_job("r"), PhaseKind::Background).await;
            assert_eq!(report.consecutive_flush_failures, expected, "{report}");
        }
        core.stopping.send_replace(true);
        let stopped = core
            .run_phase(inline_job("r-3"), PhaseKind::Background)
            .await;
        assert!(stopped.flushes.is_empty(), "{stopped}");
        assert_eq!(stopped.consecutive_flush_failures, 2, "{stopped}");
        assert_eq!(core.flush_failures.load(Ordering::Relaxed), 2);
    }

    /// A tracing subscriber that hands every event to its closure.
    pub(crate) struct OnEvent<F>(pub(crate) F);

    impl OnEvent<()> {
        /// One that keeps every event's message in `messages`.
        pub(crate) fn messages(
            messages: Arc<std::sync::Mutex<Vec<String>>>,
        ) -> OnEvent<impl Fn(&tracing::Event<'_>) + Send + Sync + 'static> {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            OnEvent(move |event: &tracing::Event<'_>| {
                let mut message = Message(String::new());
                event.record(&mut message);
                lock(&messages).push(message.0);
            })
        }
    }

    impl<F: Fn(&tracing::Event<'_>) + Send + Sync + 'static> tracing::Subscriber for OnEvent<F> {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            (self.0)(event);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Under the extension, an input without a Lambda context (a lambda_http request rebuilt
    /// without its extensions) runs inline, and says so, once.
    #[tokio::test]
    async fn an_input_without_a_context_runs_inline_and_says_so_once() {
        let core = Core::new(Config::default(), Mode::Extension);
        let warnings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = warnings.clone();
        let counting = OnEvent(move |event: &tracing::Event<'_>| {
            if *event.metadata().level() == tracing::Level::WARN {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let tickets = tracing::subscriber::with_default(counting, || {
            [core.begin(&invocation("")), core.begin(&invocation(""))]
        });
        assert!(matches!(tickets, [Ticket::Inline, Ticket::Inline]));
        assert_eq!(warnings.load(Ordering::SeqCst), 1);
    }

    /// A panic in the phase's log line (the user's tracing subscriber) does not unwind out of
    /// the phase's end, where it would leave the `event/next` unsent; the hook still runs.
    /// Nor does a panic whose payload panics in turn when dropped, as the subscriber logs the
    /// first panic too (found by review: that payload was dropped unguarded, and its panic
    /// unwound out of the phase's end, the hook not run).
    #[tokio::test]
    async fn a_panicking_subscriber_does_not_unwind_out_of_the_phase_end() {
        let text: fn() = || panic!("the subscriber panicked");
        let drop_panics: fn() = || std::panic::panic_any(crate::phase::tests::PanicsWhenDropped);
        for panics in [text, drop_panics] {
            let hooked = Arc::new(AtomicBool::new(false));
            let h = hooked.clone();
            let core = Core::new(
                Config {
                    phase_telemetry: false,
                    on_report: Some(ReportHook(Arc::new(move |_| {
                        h.store(true, Ordering::SeqCst);
                    }))),
                    ..Config::default()
                },
                Mode::Inline,
            );
            let report = core.run_phase(inline_job("r-1"), PhaseKind::Inline).await;
            hooked.store(false, Ordering::SeqCst);
            let panicking = OnEvent(move |_: &tracing::Event<'_>| panics());
            let finished = tracing::subscriber::with_default(panicking, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.finish(report)))
            });
            let report = finished.expect("the subscriber's panics were caught");
            assert_eq!(report.request_id, "r-1");
            assert!(
                hooked.load(Ordering::SeqCst),
                "the hook ran after the panics"
            );
        }
    }

    /// A finished background task that panicked with a payload that panics in turn when
    /// dropped (a tracing subscriber's panic in the phase's own code, say) is reaped at the
    /// next spawn without that panic: the next task is spawned. Found by review: the payload
    /// was dropped unguarded, and its panic went out of the spawn (the handler's, which
    /// hands its work over), the next phase never spawned.
    #[tokio::test]
    async fn a_background_panic_that_panics_when_dropped_is_reaped_quietly() {
        let core = Core::new(Config::default(), Mode::Inline);
        let (panicking, panics) = tokio::sync::oneshot::channel();
        core.spawn_tracked(async move {
            let _ = panicking.send(());
            std::panic::panic_any(crate::phase::tests::PanicsWhenDropped);
        });
        // On this one thread, the task has panicked (in the same poll) by the time this runs.
        assert!(panics.await.is_ok());
        let (ran, runs) = tokio::sync::oneshot::channel();
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            core.spawn_tracked(async move {
                let _ = ran.send(());
            });
        }));
        assert!(spawned.is_ok(), "the spawn does not panic");
        assert!(runs.await.is_ok(), "the next task ran");
    }

    /// A dropped handler's job waiting for its INVOKE event (`hand_over_later`) stops waiting
    /// when the final flush begins (no event will come): it runs its actions at once, in the
    /// final flush's first half, rather than after the wait (with actions cut by then) or
    /// behind the final flush's lock in the chain.
    #[tokio::test]
    async fn a_job_waiting_for_its_event_runs_when_the_final_flush_begins() {
        let config = Config {
            claim_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        let core = Core::new(config, Mode::Extension);
        let ticket = core.begin(&invocation("r-1"));
        assert_eq!(ticket, Ticket::Chained("r-1".into()));
        let (queue, ran) = flagging_queue().await;
        let job = Job {
            queue,
            ..inline_job("r-1")
        };
        core.hand_over_later(ticket, job);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut tasks = std::mem::take(&mut *lock(&core.background));
        assert_eq!(tasks.len(), 1);
        assert!(tasks.try_join_next().is_none(), "it waits for the event");
        core.terminating.send_replace(true);
        let joined = tokio::time::timeout(Duration::from_secs(5), tasks.join_next()).await;
        assert!(matches!(joined, Ok(Some(Ok(())))), "{joined:?}");
        assert!(ran.load(Ordering::SeqCst), "its action ran");
        let state = core.state.borrow();
        assert!(state.was_closed("r-1") && state.expected.is_none());
    }

    /// The wait for a late INVOKE event leaves the work half of what the invocation has left.
    #[tokio::test]
    async fn the_claim_window_is_bounded_by_the_deadline() {
        let core = Core::new(Config::default(), Mode::Extension);
        let in_ = |d: Duration| Some(SystemTime::now() + d);
        assert_eq!(core.claim_window(None), core.config.claim_timeout);
        assert_eq!(
            core.claim_window(in_(Duration::from_secs(60))),
            core.config.claim_timeout
        );
        // 1 s left, 100 ms of margin: at most half of the 900 ms.
        let window = core.claim_window(in_(Duration::from_secs(1)));
        assert!(
            window <= Duration::from_millis(450) && window >= Duration::from_millis(250),
            "{window:?}"
        );
        assert_eq!(
            core.claim_window(Some(SystemTime::now() - Duration::from_secs(1))),
            Duration::ZERO
        );
    }

    /// A failed `event/next` closes the invocation whose event it may have carried: the one
    /// its wrapper expects, or whose job is parked; nothing else.
    #[tokio::test]
    async fn a_failed_call_closes_the_invocation_waiting_for_its_event() {
        let core = Core::new(Config::default(), Mode::Extension);
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Chained("r-1".into())
        );
        core.state.send_modify(|s| s.call_failed(lost()));
        let state = core.state.borrow();
        assert_eq!(state.chain, Chain::Broken);
        assert!(
            state.lost_event.is_none(),
            "the loss is the waiting wrapper's"
        );
        assert!(state.was_closed("r-1"));
        assert!(state.expected.is_none());
        drop(state);

        core.state.send_modify(|s| {
            s.chain = Chain::Armed;
            s.parked = Some(Job {
                request_id: "r-2".into(),
                deadline: None,
                queue: Queue::new(0),
                flush_timeout: Duration::from_millis(100),
                parent: None,
            });
        });
        core.state.send_modify(|s| s.call_failed(None));
        let state = core.state.borrow();
        assert!(state.was_closed("r-2"), "the parked job's invocation");
        assert!(
            state.parked.is_some(),
            "its job stays for the layer to take back"
        );
        assert_eq!(state.closed.len(), 2);
        drop(state);

        // With nobody waiting, a failure closes nothing.
        core.state.send_modify(|s| s.parked = None);
        core.state.send_modify(|s| s.call_failed(None));
        assert_eq!(core.state.borrow().closed.len(), 2);
    }

    /// A call that lost an event before its handler started: that handler's work runs inline
    /// at once (it would otherwise wait for the event, before the response); only that one.
    #[tokio::test]
    async fn an_event_lost_before_its_handler_started_is_not_waited_for() {
        let core = Core::new(Config::default(), Mode::Extension);
        core.state.send_modify(|s| s.call_failed(lost()));
        // The retry is out (the chain re-armed) when the handler starts.
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(core.begin(&invocation("r-1")), Ticket::Inline);
        assert!(core.state.borrow().was_closed("r-1"));
        assert_eq!(
            core.begin(&invocation("r-2")),
            Ticket::Chained("r-2".into())
        );

        // With the layer, the work runs after the response: the job is parked as usual, but
        // marked as the loss's, so the layer does not wait for its event.
        let core = Core::new(Config::default(), Mode::Extension);
        core.layer_installed.store(true, Ordering::Release);
        core.state.send_modify(|s| s.call_failed(lost()));
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Chained("r-1".into())
        );
        assert_eq!(core.state.borrow().lost_to.as_deref(), Some("r-1"));
        assert_eq!(
            core.begin(&invocation("r-2")),
            Ticket::Chained("r-2".into())
        );
        assert_eq!(core.state.borrow().lost_to.as_deref(), Some("r-1"));

        // Started during the backoff (inline, the chain being broken): the loss was that
        // handler's, not the next one's.
        let core = Core::new(Config::default(), Mode::Extension);
        core.state.send_modify(|s| s.call_failed(lost()));
        assert_eq!(core.begin(&invocation("r-1")), Ticket::Inline);
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-2")),
            Ticket::Chained("r-2".into())
        );

        // A failure that lost nothing (no answer, an API error) leaves the wait as it was.
        let core = Core::new(Config::default(), Mode::Extension);
        core.state.send_modify(|s| s.call_failed(None));
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Chained("r-1".into())
        );

        // The handler of the lost event started before the loss (its invocation closed by an
        // earlier failure): the loss is not the next handler's.
        let core = Core::new(Config::default(), Mode::Extension);
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Chained("r-1".into())
        );
        core.state.send_modify(|s| s.call_failed(None));
        core.state.send_modify(|s| s.call_failed(lost()));
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-2")),
            Ticket::Chained("r-2".into())
        );

        // A loss that no handler claimed in time (its handler never started: the runtime could
        // not decode its payload) is not a later invocation's.
        let core = Core::new(Config::default(), Mode::Extension);
        let expired = Instant::now() - Duration::from_millis(1);
        core.state.send_modify(|s| s.call_failed(Some(expired)));
        core.state.send_modify(|s| s.chain = Chain::Armed);
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Chained("r-1".into())
        );
    }

    /// The runtime starts a handler for another invocation than the one whose event (and
    /// finished handler's job) the chain holds: this invocation runs inline, and the held job's
    /// actions still run rather than being dropped with the released event.
    #[tokio::test]
    async fn a_held_job_of_a_mismatched_event_still_runs() {
        let core = Core::new(Config::default(), Mode::Extension);
        core.layer_installed.store(true, Ordering::Release);
        let (queue, ran) = flagging_queue().await;
        let job = Job {
            queue,
            ..inline_job("r-1")
        };
        let deadline = SystemTime::now() + Duration::from_secs(60);
        core.state.send_modify(|s| {
            s.chain = Chain::Holding;
            s.slot = Some(held("r-1", deadline, Some(job)));
        });
        assert_eq!(core.begin(&invocation("r-2")), Ticket::Inline);
        let state = core.state.borrow();
        assert!(state.slot.is_none() && state.chain == Chain::Armed);
        assert!(state.was_closed("r-1") && state.was_closed("r-2"));
        drop(state);
        let mut tasks = std::mem::take(&mut *lock(&core.background));
        let joined = tokio::time::timeout(Duration::from_secs(5), tasks.join_next()).await;
        assert!(matches!(joined, Ok(Some(Ok(())))), "{joined:?}");
        assert!(ran.load(Ordering::SeqCst), "the held job's action ran");
    }

    /// A deferred handler called again in the same invocation (a router calling one per
    /// record): with the layer its work joins the first call's job, held in the slot or parked
    /// for the event; once that job's phase has begun, the later call runs inline, at once. A
    /// retry of the invocation (same request id, another deadline) is not a later call.
    #[tokio::test]
    async fn a_later_call_in_the_same_invocation_joins_its_phase() {
        let core = Core::new(Config::default(), Mode::Extension);
        core.layer_installed.store(true, Ordering::Release);
        let deadline = SystemTime::now() + Duration::from_secs(60);
        let at = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline),
        };
        let job = |queue| Job {
            queue,
            deadline: Some(deadline),
            ..inline_job("r-1")
        };
        core.state.send_modify(|s| {
            s.chain = Chain::Holding;
            s.slot = Some(held("r-1", deadline, None));
        });
        for _ in 0..2 {
            let ticket = core.begin(&at);
            assert_eq!(ticket, Ticket::Chained("r-1".into()));
            let (queue, _) = flagging_queue().await;
            assert!(core.dispatch(&ticket, job(queue), "inline").is_none());
        }
        let held = core
            .state
            .borrow()
            .slot
            .as_ref()
            .and_then(|s| s.job.as_ref().map(|j| j.queue.len()));
        assert_eq!(held, Some(2), "both calls' actions, in one job");

        // Parked for its event: the same.
        core.state.send_modify(|s| {
            s.slot = None;
            s.chain = Chain::Armed;
        });
        for _ in 0..2 {
            let ticket = core.begin(&at);
            let (queue, _) = flagging_queue().await;
            assert!(core.dispatch(&ticket, job(queue), "inline").is_none());
        }
        let parked = core.state.borrow().parked.as_ref().map(|j| j.queue.len());
        assert_eq!(parked, Some(2));

        // Its phase has begun: a later call runs inline, a retry does not.
        core.state.send_modify(|s| {
            s.parked = None;
            s.phased = Some(("r-1".into(), deadline));
        });
        assert_eq!(core.begin(&at), Ticket::Inline);
        for skew in [
            deadline - Duration::from_millis(1),
            deadline + Duration::from_millis(1),
        ] {
            let rendered_apart = crate::context::Invocation {
                request_id: "r-1".into(),
                deadline: Some(skew),
            };
            assert_eq!(core.begin(&rendered_apart), Ticket::Inline, "a ms apart");
        }
        assert_eq!(
            core.begin(&invocation("r-1")),
            Ticket::Inline,
            "deadline unknown"
        );
        let retry = crate::context::Invocation {
            request_id: "r-1".into(),
            deadline: Some(deadline + Duration::from_secs(120)),
        };
        assert_eq!(core.begin(&retry), Ticket::Chained("r-1".into()));
    }

    /// With the layer, SIGTERM comes while a finished handler's job waits for its response
    /// (held in the slot with its event) or for its event (parked): the final flush runs its
    /// actions, as it does a dropped handler's job waiting for its event (`hand_over_later`),
    /// rather than exiting with them never run.
    #[tokio::test]
    async fn sigterm_runs_a_job_held_for_its_response_or_parked_for_its_event() {
        for parked in [false, true] {
            let core = Core::new(
                Config {
                    phase_telemetry: false,
                    ..Config::default()
                },
                Mode::Extension,
            );
            core.layer_installed.store(true, Ordering::Release);
            let (queue, ran) = flagging_queue().await;
            let job = Job {
                queue,
                ..inline_job("r-1")
            };
            if parked {
                core.state.send_modify(|s| s.parked = Some(job));
            } else {
                let deadline = SystemTime::now() + Duration::from_secs(60);
                core.state.send_modify(|s| {
                    s.chain = Chain::Holding;
                    s.slot = Some(held("r-1", deadline, Some(job)));
                });
            }
            tokio::time::timeout(Duration::from_secs(2), crate::shutdown::final_flush(&core))
                .await
                .expect("the final flush ends");
            assert!(
                ran.load(Ordering::SeqCst),
                "parked {parked}: the job's action ran before the process exits"
            );
        }
    }

    /// A loss that a handler still to start can claim for a second.
    fn lost() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(1))
    }
}
