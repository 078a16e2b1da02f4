//! The execution environment's state machine: init, registration, event delivery, the
//! completion gate, freeze/thaw, deadlines and resets.
//!
//! Everything lives behind one `std::sync::Mutex` held only for short, non-blocking sections;
//! waiting is done on tokio `oneshot`s (one per blocked `next` call) and a `watch` counter
//! bumped on every lifecycle change, so nothing polls.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use super::faults::Faults;
use super::ids;
use super::process::{self, ChildProcess, LogSink};
use super::server::{ConnTag, Cut};
use super::timeline::{Restore, Stats, Timeline};
use super::{EmulatorConfig, FunctionSpec, InvokeOutcome, RestoredConnections, ShutdownResult};

/// Lambda accepts at most 10 extensions ("Lambda Extensions API": `Extension.TooManyExtensions`;
/// `core.MaxAgentsAllowed` in aws-lambda-runtime-interface-emulator).
pub(crate) const MAX_EXTENSIONS: usize = 10;

/// Largest response payload: 6 MiB + 100 bytes (`interop.MaxPayloadSize` in
/// aws-lambda-runtime-interface-emulator, lambda/interop/model.go).
pub(crate) const MAX_PAYLOAD: usize = 6 * 1024 * 1024 + 100;

/// Largest streamed response (`Lambda-Runtime-Function-Response-Mode: streaming`): 200 MB,
/// against 6 MB buffered (Lambda developer guide, "Response streaming for Lambda functions").
/// RIE has no streaming; lambda_runtime sends such a response chunked, metadata prelude first.
pub(crate) const MAX_STREAMED_PAYLOAD: usize = 200 * 1024 * 1024;

/// Memory size and version the emulated function reports.
pub(crate) const MEMORY_SIZE: &str = "128";
pub(crate) const FUNCTION_VERSION: &str = "$LATEST";
pub(crate) const HANDLER: &str = "bootstrap";
pub(crate) const ACCOUNT_ID: &str = "123456789012";

/// An API answer other than success: the status and Lambda's JSON error body.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) error_type: String,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: u16, error_type: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type: error_type.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn forbidden(error_type: &str, message: impl Into<String>) -> Self {
        Self::new(403, error_type, message)
    }

    /// The runtime called an endpoint its state does not allow (RIE renders
    /// `RenderForbiddenWithTypeMsg(..., "InvalidStateTransition", ...)`).
    fn runtime_state(from: &str, to: &str) -> Self {
        Self::forbidden(
            "InvalidStateTransition",
            format!(
                "State transition from {from} to {to} failed for runtime. Error: State transition is not allowed"
            ),
        )
    }

    fn extension_state(from: &str, to: &str, id: &str) -> Self {
        Self::forbidden(
            "Extension.InvalidExtensionState",
            format!(
                "State transition from {from} to {to} failed for extension {id}. Error: State transition is not allowed"
            ),
        )
    }
}

/// What the runtime's `/invocation/next` returns.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeEvent {
    pub(crate) request_id: String,
    pub(crate) deadline_ms: u64,
    pub(crate) function_arn: Arc<str>,
    pub(crate) trace_id: String,
    pub(crate) payload: Bytes,
}

/// What an extension's `event/next` returns.
#[derive(Debug, Clone)]
pub(crate) enum ExtEvent {
    Invoke {
        request_id: String,
        deadline_ms: u64,
        function_arn: Arc<str>,
        trace_id: String,
        timeline: usize,
    },
    Shutdown {
        reason: &'static str,
        deadline_ms: u64,
    },
}

impl ExtEvent {
    /// The body Lambda sends ("Lambda Extensions API", Next event).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            ExtEvent::Invoke {
                request_id,
                deadline_ms,
                function_arn,
                trace_id,
                ..
            } => json!({
                "eventType": "INVOKE",
                "deadlineMs": deadline_ms,
                "requestId": request_id,
                "invokedFunctionArn": &**function_arn,
                "tracing": { "type": "X-Amzn-Trace-Id", "value": trace_id },
            }),
            ExtEvent::Shutdown {
                reason,
                deadline_ms,
            } => json!({
                "eventType": "SHUTDOWN",
                "shutdownReason": reason,
                "deadlineMs": deadline_ms,
            }),
        }
    }
}

/// A `next` call answers at once or after waiting.
#[derive(Debug)]
pub(crate) enum Next<T> {
    Now(T),
    Wait(oneshot::Receiver<T>),
    /// The caller is a reset environment's process, still running out its grace: nothing
    /// will ever answer it (its connection ends with the process).
    Never,
}

/// Which extension error endpoint was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtensionErrorKind {
    Init,
    Exit,
}

impl ExtensionErrorKind {
    /// The agent state the call moves to (RAPID's `AgentInitErrorStateName`,
    /// `AgentExitErrorStateName`).
    fn state(self) -> &'static str {
        match self {
            ExtensionErrorKind::Init => "InitError",
            ExtensionErrorKind::Exit => "ExitError",
        }
    }
}

/// How the runtime answered an invocation.
#[derive(Debug)]
pub(crate) enum Answer {
    Response(Bytes),
    TooLarge {
        /// The body's size (at least this much, when it was not read to its end).
        size: usize,
        /// The limit it passed: [`MAX_PAYLOAD`], or [`MAX_STREAMED_PAYLOAD`] when streamed.
        limit: usize,
    },
    Error {
        error_type: String,
        error_message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Registration open or init running: no invocation may be dispatched.
    Init,
    /// SnapStart: init complete, the snapshot taken (child frozen); waiting for a restore.
    Snapshot,
    /// SnapStart: restored, `/restore/next` answered; the restore phase ends with the
    /// runtime's first `/invocation/next`.
    Restoring,
    /// Init (or the restore) complete: invocations are dispatched.
    Ready,
}

/// Why the environment is being reset.
#[derive(Debug)]
enum ResetCause {
    Timeout,
    RuntimeExited(String),
    ExtensionExit { name: String, error_type: String },
    Shutdown,
}

impl ResetCause {
    /// What a caller still waiting for its response gets.
    fn outcome(&self) -> InvokeOutcome {
        match self {
            ResetCause::Timeout => InvokeOutcome::Timeout,
            ResetCause::RuntimeExited(message) => InvokeOutcome::FunctionError {
                error_type: "Runtime.ExitError".to_owned(),
                error_message: message.clone(),
            },
            ResetCause::ExtensionExit { name, error_type } => InvokeOutcome::FunctionError {
                error_type: error_type.clone(),
                error_message: format!("Extension {name} reported an exit error"),
            },
            ResetCause::Shutdown => InvokeOutcome::FunctionError {
                error_type: "Sandbox.Shutdown".to_owned(),
                error_message: "The environment was shut down during the invocation".to_owned(),
            },
        }
    }

    /// The reason of the SHUTDOWN event the reset sends: the reset's own, "timeout" or
    /// "failure" (rapid/handlers.go, `handleReset`); none for the shutdown, which sent its
    /// "spindown" already.
    fn shutdown_reason(&self) -> Option<&'static str> {
        match self {
            ResetCause::Timeout => Some("timeout"),
            ResetCause::RuntimeExited(_) | ResetCause::ExtensionExit { .. } => Some("failure"),
            ResetCause::Shutdown => None,
        }
    }
}

#[derive(Debug)]
struct Extension {
    id: String,
    name: String,
    external: bool,
    invoke: bool,
    shutdown: bool,
    /// The error it reported, if any: it is then in that terminal state.
    error: Option<ExtensionErrorKind>,
    /// Called `event/next` at least once (init progress).
    called_next: bool,
    in_flight: usize,
    /// The `event/next` calls not answered yet. As in RAPID, a call whose client went away
    /// (connection closed, or cut by a SnapStart restore) stays here: the extension is still
    /// in state Ready, and the next event is written to that call and lost (see
    /// [`Shared::extension_next`]).
    waiters: VecDeque<oneshot::Sender<ExtEvent>>,
    queue: VecDeque<ExtEvent>,
    /// Timeline whose INVOKE this extension received and whose next `event/next` is not yet
    /// recorded.
    record_next_for: Option<usize>,
}

impl Extension {
    /// Waits in `event/next` with nothing left to receive: what the completion gate requires.
    /// RAPID's state Ready: the call counts whether or not its client is still there.
    fn waiting(&self) -> bool {
        self.queue.is_empty() && !self.waiters.is_empty()
    }
}

#[derive(Debug, Default)]
struct RuntimeSlot {
    called_next: bool,
    /// The `/next` calls not answered yet, oldest first. As in RAPID, a call whose client went
    /// away stays here (outside Managed Instances): the next invocation is written to it and
    /// lost (see [`Shared::runtime_next`]).
    waiters: VecDeque<oneshot::Sender<RuntimeEvent>>,
    queue: VecDeque<RuntimeEvent>,
    /// SnapStart: the runtime waits in `/restore/next`.
    restore: Option<oneshot::Sender<()>>,
}

impl RuntimeSlot {
    fn waits_in_restore_next(&self) -> bool {
        self.restore.as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

#[derive(Debug)]
struct Active {
    request_id: String,
    /// What the runtime's `/next` renders for it (again, in RAPID's Running state).
    event: RuntimeEvent,
    timeline: usize,
    delivered: bool,
    answered: bool,
    runtime_next: bool,
    /// Extensions subscribed to INVOKE when the invocation was dispatched.
    subscribers: Vec<String>,
    responder: Option<oneshot::Sender<InvokeOutcome>>,
    completion: Option<oneshot::Sender<()>>,
    /// Released when the invocation ends, which lets the next `invoke()` proceed.
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct ChildSlot {
    process: ChildProcess,
    frozen: bool,
}

impl ChildSlot {
    fn exited(&self) -> bool {
        self.process.exit.borrow().is_some()
    }
}

#[derive(Debug)]
struct Inner {
    generation: u64,
    phase: Phase,
    registration_open: bool,
    /// This generation's init failed; the next `ensure_ready` reports it.
    init_error: Option<String>,
    runtime: RuntimeSlot,
    extensions: Vec<Extension>,
    /// Identifiers of extensions of earlier generations, and the error each had reported.
    retired: HashMap<String, Option<ExtensionErrorKind>>,
    /// The SHUTDOWN events of extensions of earlier generations that had not taken theirs:
    /// their next `event/next` gets it.
    retired_shutdown: HashMap<String, ExtEvent>,
    active: Vec<Active>,
    timelines: Vec<Timeline>,
    loose_marks: Vec<(String, Instant)>,
    stats: Stats,
    spec: Option<FunctionSpec>,
    child: Option<ChildSlot>,
    /// Killed children not yet reaped: a new child is not started before they are gone.
    dying: Vec<watch::Receiver<Option<ExitStatus>>>,
    /// The pending `next` calls of an environment reset while its child runs out its grace:
    /// never answered, they end with that process (dropped when the next child starts).
    parked_runtime: Vec<oneshot::Sender<RuntimeEvent>>,
    parked_extensions: Vec<oneshot::Sender<ExtEvent>>,
    shutting_down: bool,
    /// SnapStart: when this generation's snapshot was taken.
    snapshot: Option<Instant>,
    /// SnapStart: every restore so far, and the index of this generation's.
    restores: Vec<Restore>,
    restore_open: Option<usize>,
}

impl Inner {
    /// Whether a Runtime API call comes from a process of an environment already reset: a
    /// killed (or SIGTERMed) child that has not exited yet. The next child is started only
    /// once it has, so meanwhile every call is its. RAPID shuts the old runtime domain down,
    /// and waits for its processes, before the next init: their calls never reach the new
    /// environment.
    fn stale_caller(&self) -> bool {
        self.child.is_none() && self.dying.iter().any(|exit| exit.borrow().is_none())
    }
}

/// A dispatched invocation, as `invoke()` waits for it.
#[derive(Debug)]
pub(crate) struct Dispatched {
    pub(crate) request_id: String,
    pub(crate) outcome: oneshot::Receiver<InvokeOutcome>,
    pub(crate) completion: oneshot::Receiver<()>,
    pub(crate) deadline: Instant,
}

/// Counts an extension's `event/next` call as in flight until the answer is produced (or the
/// call is dropped).
#[derive(Debug)]
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    pub(crate) id: String,
    pub(crate) generation: u64,
    /// The restore epoch of the call: a SnapStart restore that cut it already took it off
    /// the books.
    epoch: u64,
    answered: bool,
}

impl InFlight {
    /// Counts a call of extension `id` of environment `generation`, taken in restore epoch
    /// `epoch`.
    fn new(shared: &Arc<Shared>, id: &str, generation: u64, epoch: u64) -> Self {
        Self {
            shared: shared.clone(),
            id: id.to_owned(),
            generation,
            epoch,
            answered: false,
        }
    }

    /// The call got its answer (or its environment was reset): not abandoned by the client.
    pub(crate) fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.shared.cut_since(self.epoch) {
            return;
        }
        if !self.answered {
            self.shared.note_abandoned();
        }
        let mut inner = self.shared.lock();
        if inner.generation != self.generation {
            return;
        }
        if let Some(ext) = inner.extensions.iter_mut().find(|e| e.id == self.id) {
            ext.in_flight = ext.in_flight.saturating_sub(1);
        }
    }
}

/// State shared by the API handlers and the `Emulator` handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: EmulatorConfig,
    pub(crate) addr: SocketAddr,
    pub(crate) function_arn: Arc<str>,
    pub(crate) faults: Faults,
    pub(crate) logs: Arc<LogSink>,
    pub(crate) slots: Arc<Semaphore>,
    changed: watch::Sender<u64>,
    /// Bumped by every SnapStart restore: connections accepted before it may be cut.
    restore_epoch: watch::Sender<u64>,
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new(config: EmulatorConfig, addr: SocketAddr) -> Self {
        let function_arn: Arc<str> = format!(
            "arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:{}",
            config.function_name
        )
        .into();
        let permits = config
            .managed_instances
            .map_or(1, |n| usize::try_from(n.max(1)).unwrap_or(1));
        Self {
            config,
            addr,
            function_arn,
            faults: Faults::default(),
            logs: Arc::new(LogSink::new()),
            slots: Arc::new(Semaphore::new(permits)),
            changed: watch::channel(0).0,
            restore_epoch: watch::channel(0).0,
            inner: Mutex::new(Inner {
                generation: 0,
                phase: Phase::Init,
                registration_open: true,
                init_error: None,
                runtime: RuntimeSlot::default(),
                extensions: Vec::new(),
                retired: HashMap::new(),
                retired_shutdown: HashMap::new(),
                active: Vec::new(),
                timelines: Vec::new(),
                loose_marks: Vec::new(),
                stats: Stats::default(),
                spec: None,
                child: None,
                dying: Vec::new(),
                parked_runtime: Vec::new(),
                parked_extensions: Vec::new(),
                shutting_down: false,
                snapshot: None,
                restores: Vec::new(),
                restore_open: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn managed(&self) -> bool {
        self.config.managed_instances.is_some()
    }

    /// Wakes whoever waits for a lifecycle change (init complete or failed, reset).
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A blocked `next` call was dropped because its client went away.
    pub(crate) fn note_abandoned(&self) {
        self.lock().stats.abandoned_next_calls += 1;
        self.bump();
    }

    /// A receiver that sees every state change (API call, dispatch, completion, reset).
    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    // ----- snapshots -------------------------------------------------------------------------

    pub(crate) fn timelines(&self) -> Vec<Timeline> {
        self.lock().timelines.clone()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub(crate) fn loose_marks(&self) -> Vec<(String, Instant)> {
        self.lock().loose_marks.clone()
    }

    pub(crate) fn child_pid(&self) -> Option<u32> {
        let inner = self.lock();
        let child = inner.child.as_ref().filter(|c| !c.exited())?;
        u32::try_from(child.process.pid.as_raw()).ok()
    }

    pub(crate) fn extension_names(&self) -> Vec<String> {
        self.lock()
            .extensions
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    // ----- Runtime API ---------------------------------------------------------------------

    /// `GET /runtime/invocation/next`.
    pub(crate) fn runtime_next(&self) -> Result<Next<RuntimeEvent>, ApiError> {
        let now = Instant::now();
        let managed = self.managed();
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.stale_caller() {
            // The old runtime waits in `/next` until it is killed.
            return Ok(Next::Never);
        }
        if managed {
            inner.runtime.waiters.retain(|w| !w.is_closed());
        }
        // SnapStart: a runtime waiting in `/restore/next` is in RAPID's RestoreReady state.
        if inner.runtime.waits_in_restore_next() {
            return Err(ApiError::runtime_state("RestoreReady", "Ready"));
        }
        if inner.phase == Phase::Restoring {
            // The end of the restore phase (RIE `handleRestore`: AwaitRuntimeReady).
            inner.phase = Phase::Ready;
            if let Some(record) = inner.restore_open.and_then(|i| inner.restores.get_mut(i)) {
                record.runtime_ready = Some(now);
            }
        }
        // RAPID's runtime state machine (aws-lambda-runtime-interface-emulator,
        // core/states.go) refuses neither of these: in state Running (the invocation is out,
        // not answered yet) `Ready()` succeeds at once and the current invocation is rendered
        // again; in state Ready (a call already waits, whether or not its client is still
        // there) the call is suspended too, and each invoke releases the oldest one.
        if !managed && let Some(active) = inner.active.iter().find(|a| a.delivered && !a.answered) {
            let event = active.event.clone();
            let timeline = active.timeline;
            inner.stats.runtime_next_calls += 1;
            inner.timelines[timeline]
                .runtime_received
                .get_or_insert(now);
            self.bump();
            return Ok(Next::Now(event));
        }
        inner.stats.runtime_next_calls += 1;
        // "Registration closes at the runtime's first /next" (Extensions API: the Init phase
        // ends for registration when the runtime signals readiness).
        inner.registration_open = false;
        inner.runtime.called_next = true;
        if !managed {
            for a in inner.active.iter_mut() {
                if a.answered && !a.runtime_next {
                    a.runtime_next = true;
                    inner.timelines[a.timeline].runtime_next = Some(now);
                }
            }
        }
        let next = match inner.runtime.queue.pop_front() {
            Some(event) => {
                mark_delivered(inner, &event.request_id, now);
                Next::Now(event)
            }
            None => {
                let (tx, rx) = oneshot::channel();
                inner.runtime.waiters.push_back(tx);
                Next::Wait(rx)
            }
        };
        self.check_init(inner);
        self.try_complete(inner, now);
        self.bump();
        Ok(next)
    }

    /// `POST /runtime/invocation/{id}/response` and `/error`.
    pub(crate) fn runtime_answer(&self, request_id: &str, answer: Answer) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(pos) = inner
            .active
            .iter()
            .position(|a| a.request_id == request_id && a.delivered)
        else {
            // RIE: an id other than the current invocation's (the last one dispatched, answered
            // or not) is "Invalid request ID" (400; lambda/rapi/middleware
            // AwsRequestIDValidator); a second answer for the current one is a state error
            // (403). Managed Instances have no single current invocation: any answered one.
            let current = if self.managed() {
                inner
                    .timelines
                    .iter()
                    .rev()
                    .any(|t| t.request_id == request_id && t.response_posted.is_some())
            } else {
                inner
                    .timelines
                    .last()
                    .is_some_and(|t| t.generation == inner.generation && t.request_id == request_id)
            };
            return Err(if current {
                Self::answered_twice(inner)
            } else {
                ApiError::new(400, "InvalidRequestID", "Invalid request ID")
            });
        };
        if inner.active[pos].answered {
            return Err(Self::answered_twice(inner));
        }
        let active = &mut inner.active[pos];
        active.answered = true;
        let timeline = &mut inner.timelines[active.timeline];
        timeline.response_posted = Some(now);
        let (outcome, result) = match answer {
            Answer::Response(body) => (InvokeOutcome::Success(body), Ok(())),
            // RIE answers 413 and hands the caller Function.ResponseSizeTooLarge.
            Answer::TooLarge { size, limit } => (
                InvokeOutcome::FunctionError {
                    error_type: "Function.ResponseSizeTooLarge".to_owned(),
                    error_message: format!(
                        "Response payload size ({size} bytes) exceeded maximum allowed payload size ({limit} bytes)."
                    ),
                },
                Err(ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    format!("Exceeded maximum allowed payload size ({limit} bytes)."),
                )),
            ),
            Answer::Error {
                error_type,
                error_message,
            } => (
                InvokeOutcome::FunctionError {
                    error_type,
                    error_message,
                },
                Ok(()),
            ),
        };
        timeline.function_error = !matches!(outcome, InvokeOutcome::Success(_));
        // The caller gets the response the moment the runtime posts it (real Lambda does; the
        // completion gate only holds the *next* invocation).
        if let Some(responder) = active.responder.take() {
            let _ = responder.send(outcome);
        }
        self.try_complete(inner, now);
        self.bump();
        result
    }

    /// A second answer to the current invocation: RAPID's state is ResponseSent, or Ready once
    /// the runtime waits in `/next` again.
    fn answered_twice(inner: &Inner) -> ApiError {
        let state = if inner.runtime.waiters.is_empty() {
            "ResponseSent"
        } else {
            "Ready"
        };
        ApiError::runtime_state(state, "InvocationResponse")
    }

    /// `POST /runtime/init/error`.
    pub(crate) fn runtime_init_error(
        &self,
        error_type: &str,
        message: &str,
    ) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.stale_caller() {
            return Err(ApiError::runtime_state("Running", "InitError"));
        }
        // Init failed and no invoke has re-run it yet: the runtime is still in state
        // InitError, which allows no transition, not even to itself (lambda/core/states.go,
        // `RuntimeInitErrorState.InitError`; rapi/handler/initerror.go answers 403).
        if inner.init_error.is_some() {
            return Err(ApiError::runtime_state("InitError", "InitError"));
        }
        if inner.runtime.called_next || inner.phase != Phase::Init {
            return Err(ApiError::runtime_state("Ready", "InitError"));
        }
        self.fail_init(inner, format!("{error_type}: {message}"));
        Ok(())
    }

    // ----- Extensions API ------------------------------------------------------------------

    /// `POST /extension/register`; returns the new `Lambda-Extension-Identifier`.
    pub(crate) fn register(&self, name: &str, events: &[String]) -> Result<String, ApiError> {
        let external = self.config.external_extensions.iter().any(|n| n == name);
        let (mut invoke, mut shutdown) = (false, false);
        // Event validation comes first, as in RIE's agentregister.go.
        for event in events {
            match event.as_str() {
                // Lambda Managed Instances: extensions may not subscribe to INVOKE.
                "INVOKE" if self.managed() => {
                    return Err(ApiError::forbidden(
                        "Extension.InvalidEventType",
                        "INVOKE: EventNotSupportedInLambdaManagedInstances",
                    ));
                }
                "INVOKE" => invoke = true,
                "SHUTDOWN" if external => shutdown = true,
                // Internal extensions may not subscribe to SHUTDOWN (RIE:
                // errEventNotSupportedForInternalAgent).
                "SHUTDOWN" => {
                    return Err(ApiError::forbidden(
                        "Extension.InvalidEventType",
                        "SHUTDOWN: ShutdownEventNotSupportedForInternalExtension",
                    ));
                }
                other => {
                    return Err(ApiError::forbidden(
                        "Extension.InvalidEventType",
                        format!("{other}: ErrorInvalidEventType"),
                    ));
                }
            }
        }
        let mut inner = self.lock();
        if !inner.registration_open || inner.stale_caller() {
            return Err(ApiError::forbidden(
                "Extension.RegistrationClosed",
                "Extension registration closed already",
            ));
        }
        if inner.extensions.iter().any(|e| e.name == name) {
            return Err(ApiError::forbidden(
                "Extension.InvalidExtensionState",
                "Extension with this name already registered",
            ));
        }
        if inner.extensions.len() >= MAX_EXTENSIONS {
            return Err(ApiError::forbidden(
                "Extension.TooManyExtensions",
                format!("Extension limit ({MAX_EXTENSIONS}) reached"),
            ));
        }
        let id = ids::uuid_v4();
        inner.extensions.push(Extension {
            id: id.clone(),
            name: name.to_owned(),
            external,
            invoke,
            shutdown,
            error: None,
            called_next: false,
            in_flight: 0,
            waiters: VecDeque::new(),
            queue: VecDeque::new(),
            record_next_for: None,
        });
        self.bump();
        Ok(id)
    }

    /// Finds a live extension by identifier, or the error Lambda answers for it.
    fn find_extension(inner: &Inner, id: &str, to: &str) -> Result<usize, ApiError> {
        match inner.extensions.iter().position(|e| e.id == id) {
            Some(i) => match inner.extensions[i].error {
                Some(kind) => Err(ApiError::extension_state(kind.state(), to, id)),
                None => Ok(i),
            },
            // An extension that reported an error stays in an error state: any later call is
            // refused with InvalidExtensionState ("after that the extension may make no call").
            None => match inner.retired.get(id) {
                Some(Some(kind)) => Err(ApiError::extension_state(kind.state(), to, id)),
                _ => Err(ApiError::forbidden(
                    "Extension.UnknownExtensionIdentifier",
                    format!("Unknown extension {id}"),
                )),
            },
        }
    }

    /// `GET /extension/event/next`.
    pub(crate) fn extension_next(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(Next<ExtEvent>, InFlight), ApiError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(event) = inner.retired_shutdown.remove(id) {
            // Its environment was reset or shut down while it was busy: RAPID released it for
            // the SHUTDOWN event (rapid/shutdown.go, `shutdownAgents`), which this call renders.
            let generation = inner.generation.wrapping_sub(1);
            self.bump();
            drop(guard);
            return Ok((
                Next::Now(event),
                InFlight::new(self, id, generation, self.restore_epoch()),
            ));
        }
        if inner.stale_caller() && inner.retired.get(id) == Some(&None) {
            // An extension of an environment already reset, whose process runs out its grace:
            // RAPID still has it registered (the registrations are cleared only once the
            // shutdown is over, `reinitialize`), so its call is taken and suspended
            // (`InternalAgentRunningState.Ready`) and never released; it ends with the process.
            let generation = inner.generation.wrapping_sub(1);
            drop(guard);
            let mut in_flight = InFlight::new(self, id, generation, self.restore_epoch());
            // Not an abandoned call when the process's end closes it.
            in_flight.answered();
            return Ok((Next::Never, in_flight));
        }
        let index = Self::find_extension(inner, id, "Ready")?;
        let generation = inner.generation;
        let epoch = self.restore_epoch();
        let Inner {
            extensions,
            timelines,
            stats,
            restores,
            restore_open,
            ..
        } = inner;
        let ext = &mut extensions[index];
        let record = restore_open.and_then(|i| restores.get_mut(i));
        // RAPID refuses a second `next` from an extension that already waits in one, in every
        // mode: its Ready state allows no Ready transition (aws-lambda-runtime-interface-
        // emulator, core/internalagent_states.go; rapi/handler/agentnext.go answers 403
        // Extension.InvalidExtensionState). A call whose client went away counts as waiting
        // there too: `Ready()` suspends the agent's goroutine (`ManagedThread.SuspendUnsafe`)
        // until the next invoke releases it, and nothing watches the connection meanwhile. So a
        // re-issued call is refused until the next event has been written to the dead call
        // (lost, [`offer_to_extension`]); only then (state Running) is a call accepted, and it
        // counts as the extension being done with that invocation (rapid/handlers.go,
        // `doInvoke`: `agent.Release()`; `InternalAgentRunningState.Ready` ->
        // `invokeFlow.AgentReady()`).
        if !ext.waiters.is_empty() {
            stats.refused_event_next_calls += 1;
            match record {
                Some(record) => record.refused_event_next.push((ext.name.clone(), now)),
                // Outside a restore (where the SnapStart probe is refused on purpose) the
                // attempt counts as concurrent calls, so that G2's check still sees it.
                None => {
                    let attempted = ext.in_flight + 1;
                    stats.max_concurrent_event_next_per_extension =
                        stats.max_concurrent_event_next_per_extension.max(attempted);
                    let max = stats
                        .max_concurrent_event_next_by_extension
                        .entry(ext.name.clone())
                        .or_insert(0);
                    *max = (*max).max(attempted);
                }
            }
            self.bump();
            return Err(ApiError::extension_state("Ready", "Ready", id));
        }
        if let Some(record) = record {
            record.event_next.push((ext.name.clone(), now));
        }
        ext.in_flight += 1;
        stats.event_next_calls += 1;
        stats.max_concurrent_event_next_per_extension = stats
            .max_concurrent_event_next_per_extension
            .max(ext.in_flight);
        let max = stats
            .max_concurrent_event_next_by_extension
            .entry(ext.name.clone())
            .or_insert(0);
        *max = (*max).max(ext.in_flight);
        ext.called_next = true;
        if let Some(t) = ext.record_next_for.take() {
            timelines[t].extension_next.push((ext.name.clone(), now));
        }
        let next = match ext.queue.pop_front() {
            Some(event) => {
                note_ext_delivery(ext, &event, timelines, now);
                Next::Now(event)
            }
            None => {
                let (tx, rx) = oneshot::channel();
                ext.waiters.push_back(tx);
                Next::Wait(rx)
            }
        };
        self.check_init(inner);
        self.try_complete(inner, now);
        self.bump();
        drop(guard);
        Ok((next, InFlight::new(self, id, generation, epoch)))
    }

    /// `POST /extension/init/error` and `/exit/error`.
    pub(crate) fn extension_error(
        &self,
        id: &str,
        error_type: &str,
        kind: ExtensionErrorKind,
    ) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let to = kind.state();
        // The same error again is taken and changes nothing: "multiple calls are allowed, but
        // only the first submitted error is accepted" (aws-lambda-runtime-interface-emulator,
        // lambda/core/externalagent_states.go and internalagent_states.go: the InitError and
        // ExitError states allow that one transition, to themselves; the handlers,
        // rapi/handler/agentiniterror.go and agentexiterror.go, answer 202).
        let reported = match inner.extensions.iter().find(|e| e.id == id) {
            Some(ext) => ext.error,
            None => inner.retired.get(id).copied().flatten(),
        };
        if reported == Some(kind) {
            return Ok(());
        }
        let index = Self::find_extension(inner, id, to)?;
        let ext = &mut inner.extensions[index];
        if kind == ExtensionErrorKind::Init && ext.called_next {
            return Err(ApiError::extension_state("Ready", to, id));
        }
        ext.error = Some(kind);
        ext.waiters.clear();
        let name = ext.name.clone();
        if inner.phase == Phase::Init {
            self.fail_init(
                inner,
                format!("Extension {name} reported an {to}: {error_type}"),
            );
        } else {
            self.reset(
                inner,
                ResetCause::ExtensionExit {
                    name,
                    error_type: error_type.to_owned(),
                },
            );
        }
        Ok(())
    }

    /// `POST /__testkit/mark`: records `text` on the targeted (or latest) invocation.
    pub(crate) fn mark(&self, text: String, request_id: Option<&str>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let target = match request_id {
            Some(id) => inner
                .timelines
                .iter_mut()
                .rev()
                .find(|t| t.request_id == id),
            None => inner.timelines.last_mut(),
        };
        match target {
            Some(timeline) => timeline.marks.push((text, now)),
            None => inner.loose_marks.push((text, now)),
        }
        self.bump();
    }

    // ----- invocations ---------------------------------------------------------------------

    /// Makes invocation available to the runtime and the INVOKE subscribers. Hands the permit
    /// back when the environment is not ready (it was reset meanwhile).
    pub(crate) fn dispatch(
        &self,
        payload: Bytes,
        requested: Instant,
        permit: OwnedSemaphorePermit,
    ) -> Result<Dispatched, OwnedSemaphorePermit> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.phase != Phase::Ready || inner.init_error.is_some() || inner.shutting_down {
            return Err(permit);
        }
        let now = Instant::now();
        let mut thawed = None;
        if let Some(child) = inner.child.as_mut().filter(|c| c.frozen) {
            process::thaw(child.process.pid);
            child.frozen = false;
            inner.stats.thaws += 1;
            thawed = Some(now);
        }
        let request_id = ids::uuid_v4();
        let timeout = self.config.function_timeout;
        let deadline = now + timeout;
        let deadline_ms = ids::epoch_ms_in(timeout);
        let trace_id = ids::trace_id();
        let index = inner.timelines.len();
        inner.timelines.push(Timeline {
            request_id: request_id.clone(),
            requested,
            invoked: now,
            deadline,
            deadline_ms,
            thawed,
            runtime_received: None,
            runtime_lost: None,
            response_posted: None,
            function_error: false,
            runtime_next: None,
            extension_invoke: Vec::new(),
            extension_lost: Vec::new(),
            extension_next: Vec::new(),
            complete: None,
            frozen: None,
            timed_out: false,
            marks: Vec::new(),
            generation: inner.generation,
        });
        let Inner {
            extensions,
            timelines,
            runtime,
            stats,
            ..
        } = inner;
        let mut inner_stats_lost = 0;
        let extension_deadline_ms =
            deadline_ms.saturating_add_signed(self.config.extension_deadline_skew_ms);
        let mut subscribers = Vec::new();
        for ext in extensions
            .iter_mut()
            .filter(|e| e.invoke && e.error.is_none())
        {
            subscribers.push(ext.id.clone());
            let event = ExtEvent::Invoke {
                request_id: request_id.clone(),
                deadline_ms: extension_deadline_ms,
                function_arn: self.function_arn.clone(),
                trace_id: trace_id.clone(),
                timeline: index,
            };
            match offer_to_extension(ext, event.clone(), &mut inner_stats_lost) {
                Ok(true) => note_ext_delivery(ext, &event, timelines, now),
                Ok(false) => note_ext_loss(ext, &event, timelines, now),
                Err(event) => ext.queue.push_back(event),
            }
        }
        stats.lost_extension_events += inner_stats_lost;
        let event = RuntimeEvent {
            request_id: request_id.clone(),
            deadline_ms,
            function_arn: self.function_arn.clone(),
            trace_id,
            payload,
        };
        let kept = event.clone();
        let offered = if self.managed() {
            offer(&mut runtime.waiters, event).map(|()| true)
        } else {
            // As RAPID releases the runtime's oldest suspended `/next`, whether or not its
            // client is still there: written to a dead call, the invocation is lost.
            offer_to_oldest(&mut runtime.waiters, event)
        };
        let delivered = match offered {
            Ok(true) => {
                timelines[index].runtime_received = Some(now);
                true
            }
            Ok(false) => {
                timelines[index].runtime_lost = Some(now);
                stats.lost_runtime_events += 1;
                true
            }
            Err(event) => {
                runtime.queue.push_back(event);
                false
            }
        };
        let (responder, outcome) = oneshot::channel();
        let (completion_tx, completion) = oneshot::channel();
        inner.active.push(Active {
            request_id: request_id.clone(),
            event: kept,
            timeline: index,
            delivered,
            answered: false,
            runtime_next: false,
            subscribers,
            responder: Some(responder),
            completion: Some(completion_tx),
            _permit: permit,
        });
        inner.stats.invocations += 1;
        self.bump();
        Ok(Dispatched {
            request_id,
            outcome,
            completion,
            deadline,
        })
    }

    /// The deadline of `request_id` passed before it completed.
    pub(crate) fn on_deadline(&self, request_id: &str) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(pos) = inner.active.iter().position(|a| a.request_id == request_id) else {
            return;
        };
        let timeline = inner.active[pos].timeline;
        inner.timelines[timeline].timed_out = true;
        inner.stats.timeouts += 1;
        if self.managed() {
            // Managed Instances: each invocation has its own timeout; the others go on.
            let mut active = inner.active.remove(pos);
            if let Some(responder) = active.responder.take() {
                let _ = responder.send(InvokeOutcome::Timeout);
            }
            self.bump();
            return;
        }
        // "The function timeout covers the whole invoke phase, extension time included. On
        // timeout Lambda resets the environment" (execution environment lifecycle).
        self.reset(inner, ResetCause::Timeout);
    }

    /// An invocation is complete when the runtime answered and waits in `/next`, and every
    /// INVOKE subscriber waits in `event/next` (Extensions API, Invoke phase). Completion
    /// releases the next invocation; an idle, complete environment is frozen.
    fn try_complete(&self, inner: &mut Inner, now: Instant) {
        let managed = self.managed();
        let mut i = 0;
        while i < inner.active.len() {
            let a = &inner.active[i];
            let done = a.answered
                && (managed
                    || (a.runtime_next
                        && a.subscribers.iter().all(|id| {
                            inner
                                .extensions
                                .iter()
                                .find(|e| e.id == *id)
                                .is_none_or(|e| e.error.is_some() || e.waiting())
                        })));
            if done {
                let mut active = inner.active.remove(i);
                inner.timelines[active.timeline].complete = Some(now);
                if let Some(completion) = active.completion.take() {
                    let _ = completion.send(());
                }
            } else {
                i += 1;
            }
        }
        self.maybe_freeze(inner, now);
    }

    fn maybe_freeze(&self, inner: &mut Inner, now: Instant) {
        if !self.config.freeze
            || self.managed()
            || inner.phase != Phase::Ready
            || !inner.active.is_empty()
            || inner.shutting_down
        {
            return;
        }
        let Some(child) = inner.child.as_mut() else {
            return;
        };
        if child.frozen || child.exited() {
            return;
        }
        if process::freeze(child.process.pid) {
            child.frozen = true;
            inner.stats.freezes += 1;
            let generation = inner.generation;
            if let Some(t) = inner.timelines.last_mut().filter(|t| {
                t.generation == generation && t.complete.is_some() && t.frozen.is_none()
            }) {
                t.frozen = Some(now);
            }
        }
    }

    /// Init completes when the runtime and every registered extension have called next (the
    /// runtime's next may be `/restore/next`). With SnapStart the snapshot is taken then.
    fn check_init(&self, inner: &mut Inner) {
        if inner.phase == Phase::Init
            && inner.init_error.is_none()
            && (inner.runtime.called_next || inner.runtime.waits_in_restore_next())
            && inner
                .extensions
                .iter()
                .all(|e| e.called_next && e.error.is_none())
        {
            inner.stats.inits += 1;
            if self.config.snap_start {
                self.take_snapshot(inner);
            } else {
                inner.phase = Phase::Ready;
            }
            self.bump();
        }
    }

    /// SnapStart: init is complete; Lambda snapshots the environment (RIE
    /// `doRuntimeDomainInit` returns once the runtime is restore-ready and every extension
    /// ready). The child is frozen until the restore.
    fn take_snapshot(&self, inner: &mut Inner) {
        inner.phase = Phase::Snapshot;
        inner.snapshot = Some(Instant::now());
        inner.stats.snapshots += 1;
        if let Some(child) = inner.child.as_mut().filter(|c| !c.frozen && !c.exited())
            && process::freeze(child.process.pid)
        {
            child.frozen = true;
        }
    }

    // ----- SnapStart -------------------------------------------------------------------------

    /// The current restore epoch (bumped by every restore).
    pub(crate) fn restore_epoch(&self) -> u64 {
        *self.restore_epoch.borrow()
    }

    /// Whether a call made in restore epoch `epoch` was cut by a restore since (then the
    /// restore already took it off the books).
    pub(crate) fn cut_since(&self, epoch: u64) -> bool {
        self.restore_epoch() != epoch
            && self.config.restored_connections != RestoredConnections::Survive
    }

    /// Whether (and how) a restore cut this connection.
    pub(crate) fn is_cut(&self, conn: &ConnTag) -> Option<Cut> {
        if self.restore_epoch() <= conn.epoch || conn.survives() {
            return None;
        }
        match self.config.restored_connections {
            RestoredConnections::Survive => None,
            RestoredConnections::Close => Some(Cut::Close),
            RestoredConnections::Blackhole => Some(Cut::Blackhole(self.lock().generation)),
        }
    }

    /// Resolves when a restore cuts this connection (never, if none does).
    pub(crate) async fn cut(&self, conn: &ConnTag) -> Cut {
        let mut epochs = self.restore_epoch.subscribe();
        loop {
            epochs.borrow_and_update();
            if let Some(cut) = self.is_cut(conn) {
                return cut;
            }
            if epochs.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves once environment `generation` is over (reset, shutdown, new spec).
    pub(crate) async fn generation_ended(&self, generation: u64) {
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if self.lock().generation != generation {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub(crate) fn restores(&self) -> Vec<Restore> {
        self.lock().restores.clone()
    }

    /// `GET /runtime/restore/next`: the receiver resolves when the restore answers it.
    pub(crate) fn runtime_restore_next(&self) -> Result<oneshot::Receiver<()>, ApiError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let state = if inner.runtime.called_next || inner.stale_caller() {
            "Ready"
        } else if inner.runtime.waits_in_restore_next() {
            "RestoreReady"
        } else if inner.phase == Phase::Init {
            "Started"
        } else {
            "RestoreRunning"
        };
        // Outside SnapStart the route does not exist (the router answers 404).
        if state != "Started" {
            return Err(ApiError::runtime_state(state, "RestoreReady"));
        }
        // Registration closes when the runtime is restore-ready (RIE `doRuntimeDomainInit`:
        // `AwaitRuntimeRestoreReady`, then `registrationService.TurnOff()`).
        inner.registration_open = false;
        let (tx, rx) = oneshot::channel();
        inner.runtime.restore = Some(tx);
        self.check_init(inner);
        self.bump();
        Ok(rx)
    }

    /// `POST /runtime/restore/error`: the restore fails.
    pub(crate) fn runtime_restore_error(
        &self,
        error_type: &str,
        message: &str,
    ) -> Result<(), ApiError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.phase != Phase::Restoring || inner.runtime.called_next {
            let state = if inner.runtime.waits_in_restore_next() {
                "RestoreReady"
            } else if inner.phase == Phase::Init {
                "Started"
            } else {
                "Ready"
            };
            return Err(ApiError::runtime_state(state, "RestoreError"));
        }
        self.fail_init(inner, format!("{error_type}: {message}"));
        Ok(())
    }

    /// Restores the snapshot, if one waits, and waits for the end of the restore phase.
    pub(crate) async fn restore(&self) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let mut changes = self.changed.subscribe();
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if inner.phase != Phase::Snapshot || inner.shutting_down {
                return Ok(());
            }
            self.begin_restore(inner);
        }
        let deadline = started + self.config.init_timeout;
        loop {
            {
                let mut guard = self.lock();
                let inner = &mut *guard;
                if let Some(error) = inner.init_error.take() {
                    return Err(error);
                }
                match inner.phase {
                    Phase::Restoring => {}
                    // Ready: restored. Init: the restore failed and its error was taken.
                    _ => return Ok(()),
                }
                if tokio::time::Instant::now() >= deadline {
                    let limit = self.config.init_timeout.as_secs_f64();
                    self.fail_init(inner, format!("Restore timed out after {limit:.3}s"));
                    return Err(inner.init_error.take().unwrap_or_default());
                }
            }
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }

    /// Cuts the connections open at the snapshot as configured, thaws the child and answers
    /// `/restore/next`.
    fn begin_restore(&self, inner: &mut Inner) {
        let now = Instant::now();
        inner.stats.restores += 1;
        let mut record = Restore {
            snapshot: inner.snapshot.unwrap_or(now),
            restored: now,
            runtime_ready: None,
            cut_calls: Vec::new(),
            event_next: Vec::new(),
            refused_event_next: Vec::new(),
            error: None,
        };
        if self.config.restored_connections != RestoredConnections::Survive {
            for ext in &mut inner.extensions {
                for waiter in &mut ext.waiters {
                    if !waiter.is_closed() {
                        record.cut_calls.push(format!("event/next {}", ext.name));
                    }
                    // Dead from now on (a blackholed connection is no longer polled, but its
                    // receiver lives on), yet still the extension's pending call: RAPID does
                    // not notice, the extension stays Ready and the next event goes to it.
                    *waiter = oneshot::channel().0;
                }
                // No longer counted in flight.
                ext.in_flight = 0;
            }
            if inner.runtime.waiters.iter().any(|w| !w.is_closed()) {
                record.cut_calls.push("invocation/next".to_owned());
            }
            // Dead too, yet still pending: the first invocation goes to such a call and is
            // lost, as with an extension's.
            for waiter in &mut inner.runtime.waiters {
                *waiter = oneshot::channel().0;
            }
        }
        // Connections accepted before this point belong to the snapshot. (Bumped after the
        // pending calls are counted: the connection tasks act on it at once.)
        self.restore_epoch.send_modify(|e| *e += 1);
        if let Some(child) = inner.child.as_mut().filter(|c| c.frozen) {
            process::thaw(child.process.pid);
            child.frozen = false;
        }
        inner.restore_open = Some(inner.restores.len());
        inner.restores.push(record);
        let answered = inner
            .runtime
            .restore
            .take()
            .is_some_and(|tx| tx.send(()).is_ok());
        if answered {
            inner.phase = Phase::Restoring;
        } else {
            // The runtime went to `/invocation/next` without `/restore/next`: RAPID's
            // `handleRestore` has nothing to release and the restore is over at once.
            inner.phase = Phase::Ready;
            if let Some(record) = inner.restores.last_mut() {
                record.runtime_ready = Some(now);
            }
        }
        self.bump();
    }

    // ----- lifecycle -----------------------------------------------------------------------

    /// Starts a fresh environment generation: everything the runtime and the extensions had is
    /// forgotten; pending `next` calls are dropped (their connections close).
    fn new_generation(&self, inner: &mut Inner) {
        inner.generation += 1;
        inner.phase = Phase::Init;
        inner.snapshot = None;
        inner.restore_open = None;
        inner.registration_open = true;
        inner.runtime = RuntimeSlot::default();
        for ext in inner.extensions.drain(..) {
            if let Some(event) = ext
                .queue
                .into_iter()
                .find(|e| matches!(e, ExtEvent::Shutdown { .. }))
            {
                inner.retired_shutdown.insert(ext.id.clone(), event);
            }
            inner.retired.insert(ext.id, ext.error);
        }
        self.bump();
    }

    fn kill_child(inner: &mut Inner) {
        if let Some(child) = inner.child.take() {
            if !child.exited() {
                process::kill_now(child.process.pid);
            }
            inner.dying.push(child.process.exit);
        }
    }

    /// Init failed: kill the child, forget the generation, and let the waiter report `message`.
    fn fail_init(&self, inner: &mut Inner, message: String) {
        if matches!(inner.phase, Phase::Snapshot | Phase::Restoring)
            && let Some(record) = inner.restore_open.and_then(|i| inner.restores.get_mut(i))
        {
            record.error = Some(message.clone());
        }
        inner.stats.init_failures += 1;
        inner.init_error = Some(message);
        Self::kill_child(inner);
        self.new_generation(inner);
    }

    /// Resets the environment: kill the child, end the active invocations, forget the
    /// generation. The next `invoke()` runs init again.
    fn reset(&self, inner: &mut Inner, cause: ResetCause) {
        if !matches!(cause, ResetCause::Shutdown) {
            inner.stats.resets += 1;
        }
        for mut active in inner.active.drain(..) {
            if let Some(responder) = active.responder.take() {
                let _ = responder.send(cause.outcome());
            }
        }
        // "If the Lambda function crashes or times out during the Invoke phase, Lambda resets
        // the execution environment. The reset behaves like a Shutdown event" (execution
        // environment lifecycle): SIGTERM and the runtime's share of the Shutdown phase when an
        // extension is registered, then SIGKILL.
        let grace = self.runtime_grace(inner);
        // As the shutdown does, the reset sends SHUTDOWN to the external extensions subscribed
        // to it (rapid/handlers.go, `handleReset`, runs the same `shutdown` as
        // `handleShutdown`, with the reset's reason). RAPID sends it once the runtime has
        // exited or its share of the phase is over; here it goes at once, as in `shutdown`.
        if let Some(reason) = cause.shutdown_reason() {
            let deadline = ids::epoch_ms_in(Self::shutdown_phase(inner, grace));
            Self::send_shutdown(inner, reason, deadline);
        }
        if grace.is_zero() {
            Self::kill_child(inner);
        } else {
            // RAPID answers none of the runtime's or the extensions' other suspended calls on a
            // reset (rapid/shutdown.go releases only the external extensions subscribed to
            // SHUTDOWN): they stay pending through the grace and end with the process.
            if inner.child.as_ref().is_some_and(|c| !c.exited()) {
                let Inner {
                    runtime,
                    extensions,
                    parked_runtime,
                    parked_extensions,
                    ..
                } = &mut *inner;
                parked_runtime.extend(runtime.waiters.drain(..));
                for ext in extensions.iter_mut() {
                    parked_extensions.extend(ext.waiters.drain(..));
                }
            }
            Self::terminate_child(inner, grace);
        }
        self.new_generation(inner);
    }

    /// The runtime process's share of the Shutdown phase: "Lambda reserves up to 300 ms (500 ms
    /// for a runtime with an internal extension) for the runtime process to perform a graceful
    /// shutdown. Lambda allocates the remainder of the 2,000 ms limit for external extensions"
    /// (Extensions API, Shutdown phase); 0 ms with no extension at all.
    fn runtime_grace(&self, inner: &Inner) -> Duration {
        let external = inner.extensions.iter().any(|e| e.external);
        let internal = inner.extensions.iter().any(|e| !e.external);
        self.config.shutdown_grace.unwrap_or(if internal {
            Duration::from_millis(500)
        } else if external {
            Duration::from_millis(300)
        } else {
            Duration::ZERO
        })
    }

    /// The whole Shutdown phase, the external extensions' deadline: 2 s with one, else the
    /// runtime's `grace`.
    fn shutdown_phase(inner: &Inner, grace: Duration) -> Duration {
        if inner.extensions.iter().any(|e| e.external) {
            grace.max(Duration::from_millis(2000))
        } else {
            grace
        }
    }

    /// SHUTDOWN to the external extensions subscribed to it (rapid/shutdown.go,
    /// `shutdownAgents`): to a pending `event/next`, else to the next one, ahead of any event
    /// not taken yet (RAPID renders only the current event, now SHUTDOWN). Returns their names.
    fn send_shutdown(inner: &mut Inner, reason: &'static str, deadline_ms: u64) -> Vec<String> {
        let mut notified = Vec::new();
        for ext in inner
            .extensions
            .iter_mut()
            .filter(|e| e.external && e.shutdown && e.error.is_none())
        {
            let event = ExtEvent::Shutdown {
                reason,
                deadline_ms,
            };
            if let Err(event) =
                offer_to_extension(ext, event, &mut inner.stats.lost_extension_events)
            {
                ext.queue.clear();
                ext.queue.push_back(event);
            }
            notified.push(ext.name.clone());
        }
        notified
    }

    /// SIGTERM to the child (thawed first), SIGKILL if it still runs after `grace`.
    fn terminate_child(inner: &mut Inner, grace: Duration) {
        let Some(child) = inner.child.take() else {
            return;
        };
        if !child.exited() {
            if child.frozen {
                process::thaw(child.process.pid);
                inner.stats.thaws += 1;
            }
            process::terminate(child.process.pid);
            let (pid, mut exit) = (child.process.pid, child.process.exit.clone());
            tokio::spawn(async move {
                let exited = tokio::time::timeout(grace, exit.wait_for(|s| s.is_some())).await;
                if exited.is_err() {
                    process::kill_now(pid);
                }
            });
        }
        inner.dying.push(child.process.exit);
    }

    /// The child exited on its own.
    fn child_exited(&self, pid: Pid, status: Option<ExitStatus>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.shutting_down || inner.child.as_ref().is_none_or(|c| c.process.pid != pid) {
            return;
        }
        inner.child = None;
        let message = match status {
            Some(status) => format!("Runtime exited with error: {status}"),
            None => "Runtime exited".to_owned(),
        };
        match inner.phase {
            Phase::Init | Phase::Snapshot | Phase::Restoring => self.fail_init(inner, message),
            Phase::Ready => self.reset(inner, ResetCause::RuntimeExited(message)),
        }
    }

    /// Replaces the function spec; a running child of an earlier spec is killed.
    pub(crate) fn set_spec(&self, spec: FunctionSpec) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.spec = Some(spec);
        // A fresh environment, unless nothing happened yet (then extensions a test registered
        // by hand, e.g. an external one it plays itself, are kept).
        if inner.child.is_some() || inner.phase == Phase::Ready || inner.runtime.called_next {
            for mut active in inner.active.drain(..) {
                if let Some(responder) = active.responder.take() {
                    let _ = responder.send(ResetCause::Shutdown.outcome());
                }
            }
            Self::kill_child(inner);
            self.new_generation(inner);
        }
        inner.init_error = None;
    }

    fn spawn_locked(self: &Arc<Self>, inner: &mut Inner) {
        let Some(spec) = inner.spec.clone() else {
            return;
        };
        // The reset children whose calls these were are gone.
        inner.parked_runtime.clear();
        inner.parked_extensions.clear();
        let name = &self.config.function_name;
        let mut env = vec![
            ("AWS_LAMBDA_RUNTIME_API".to_owned(), self.addr.to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), name.clone()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(),
                MEMORY_SIZE.to_owned(),
            ),
            (
                "AWS_LAMBDA_FUNCTION_VERSION".to_owned(),
                FUNCTION_VERSION.to_owned(),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME".to_owned(),
                format!("2025/01/01/[{FUNCTION_VERSION}]{}", ids::hex128()),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME".to_owned(),
                format!("/aws/lambda/{name}"),
            ),
            ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
            ("AWS_DEFAULT_REGION".to_owned(), "us-east-1".to_owned()),
            ("_HANDLER".to_owned(), HANDLER.to_owned()),
        ];
        let mut remove = vec!["_X_AMZN_TRACE_ID"];
        match self.config.managed_instances {
            Some(n) => {
                env.push((
                    "AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(),
                    "lambda-managed-instances".to_owned(),
                ));
                env.push(("AWS_LAMBDA_MAX_CONCURRENCY".to_owned(), n.to_string()));
            }
            None => {
                let kind = if self.config.snap_start {
                    "snap-start"
                } else {
                    "on-demand"
                };
                env.push(("AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(), kind.to_owned()));
                remove.push("AWS_LAMBDA_MAX_CONCURRENCY");
            }
        }
        let weak: Weak<Shared> = Arc::downgrade(self);
        let spawned = process::spawn(
            &spec,
            env,
            &remove,
            self.logs.clone(),
            move |pid, status| {
                if let Some(shared) = weak.upgrade() {
                    shared.child_exited(pid, status);
                }
            },
        );
        match spawned {
            Ok(process) => {
                inner.child = Some(ChildSlot {
                    process,
                    frozen: false,
                })
            }
            Err(e) => self.fail_init(
                inner,
                format!(
                    "Runtime.InvalidEntrypoint: cannot start {:?}: {e}",
                    spec.program
                ),
            ),
        }
    }

    /// Waits until init is complete, starting the child first when a spec is set and none runs.
    /// Fails with the init error (runtime or extension `init/error`, exit during init, or
    /// `init_timeout` elapsed).
    pub(crate) async fn ensure_ready(self: &Arc<Self>) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let limit = self.config.init_timeout;
        let mut changes = self.changed.subscribe();
        loop {
            let dying = {
                let mut guard = self.lock();
                let inner = &mut *guard;
                if let Some(error) = inner.init_error.take() {
                    return Err(error);
                }
                // A SnapStart snapshot counts: init is complete, `invoke` restores it.
                if matches!(inner.phase, Phase::Ready | Phase::Snapshot) {
                    return Ok(());
                }
                let mut dying = Vec::new();
                if inner.spec.is_some() && inner.child.is_none() {
                    inner.dying.retain(|d| d.borrow().is_none());
                    if inner.dying.is_empty() {
                        self.spawn_locked(inner);
                        continue;
                    }
                    dying = inner.dying.clone();
                }
                dying
            };
            let deadline = started + limit;
            if !dying.is_empty() {
                // A killed child's late calls must not count for the new one: start it only
                // once the old one is gone (SIGKILL makes that quick).
                for mut exit in dying {
                    let _ = tokio::time::timeout_at(deadline, exit.wait_for(|s| s.is_some())).await;
                }
            } else if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_ok()
            {
                continue;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut guard = self.lock();
                let inner = &mut *guard;
                if inner.phase == Phase::Init && inner.init_error.is_none() {
                    self.fail_init(
                        inner,
                        format!("Init timed out after {:.3}s", limit.as_secs_f64()),
                    );
                }
                return match inner.init_error.take() {
                    Some(error) => Err(error),
                    None => Ok(()),
                };
            }
        }
    }

    /// The shutdown phase: SHUTDOWN to the external extensions that asked for it, SIGTERM to
    /// the (thawed) child, SIGKILL after the grace period.
    pub(crate) async fn shutdown(self: &Arc<Self>) -> ShutdownResult {
        let started = Instant::now();
        let (grace, phase, child, notified, mut changes) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            inner.shutting_down = true;
            let changes = self.changed.subscribe();
            let grace = self.runtime_grace(inner);
            let phase = Self::shutdown_phase(inner, grace);
            // Lowercase, as RAPID sends it (aws-lambda-runtime-interface-emulator,
            // lambda/rapi/model/agentevent.go: `Spindown ShutdownReason = "spindown"`).
            let notified = Self::send_shutdown(inner, "spindown", ids::epoch_ms_in(phase));
            let child = inner.child.take();
            if let Some(child) = child.as_ref().filter(|c| !c.exited()) {
                // A stopped process would not act on SIGTERM: thaw it first.
                if child.frozen {
                    process::thaw(child.process.pid);
                    inner.stats.thaws += 1;
                }
                process::terminate(child.process.pid);
            }
            (grace, phase, child, notified, changes)
        };
        let deadline = tokio::time::Instant::now() + grace;
        let mut exit_status = None;
        let mut killed = false;
        if let Some(child) = child {
            let mut exit = child.process.exit.clone();
            let waited = tokio::time::timeout_at(deadline, exit.wait_for(|s| s.is_some()))
                .await
                .ok()
                .and_then(|r| r.ok().map(|status| *status));
            match waited {
                Some(status) => exit_status = status,
                None => {
                    killed = process::kill_now(child.process.pid);
                    exit_status = tokio::time::timeout(
                        Duration::from_secs(5),
                        exit.wait_for(|s| s.is_some()),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|status| *status));
                }
            }
        } else {
            // No process to wait for (attach mode): wait, within the phase, until the
            // external extensions have taken their SHUTDOWN event.
            let deadline = tokio::time::Instant::now() + phase;
            loop {
                let pending = self.lock().extensions.iter().any(|e| {
                    e.queue
                        .iter()
                        .any(|ev| matches!(ev, ExtEvent::Shutdown { .. }))
                });
                if !pending
                    || tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err()
                {
                    break;
                }
            }
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.shutting_down = false;
        self.reset(inner, ResetCause::Shutdown);
        ShutdownResult {
            exit_status,
            killed,
            duration: started.elapsed(),
            grace,
            phase,
            shutdown_events: notified,
        }
    }

    /// Kills the child at once (the `Emulator` was dropped).
    pub(crate) fn kill_on_drop(&self) {
        let mut inner = self.lock();
        inner.shutting_down = true;
        Self::kill_child(&mut inner);
    }
}

/// Hands `value` to the first waiter still listening; gives it back when there is none.
fn offer<T>(waiters: &mut VecDeque<oneshot::Sender<T>>, mut value: T) -> Result<(), T> {
    while let Some(waiter) = waiters.pop_front() {
        match waiter.send(value) {
            Ok(()) => return Ok(()),
            Err(back) => value = back,
        }
    }
    Err(value)
}

/// Hands `value` to the oldest pending call, whether or not its client is still there.
/// `Ok(true)`: delivered; `Ok(false)`: written to a call whose client went away, so lost;
/// `Err`: no call pending, `value` is given back to be queued.
fn offer_to_oldest<T>(waiters: &mut VecDeque<oneshot::Sender<T>>, value: T) -> Result<bool, T> {
    match waiters.pop_front() {
        Some(waiter) => Ok(waiter.send(value).is_ok()),
        None => Err(value),
    }
}

/// Hands `event` to the extension's pending `event/next` call, as RAPID does: to the oldest
/// one, whether or not its client is still there. `Ok(true)`: delivered; `Ok(false)`: written
/// to a call whose client went away, so lost (counted in `lost`); `Err`: no call pending, the
/// event is given back to be queued.
fn offer_to_extension(
    ext: &mut Extension,
    event: ExtEvent,
    lost: &mut u64,
) -> Result<bool, ExtEvent> {
    let delivered = offer_to_oldest(&mut ext.waiters, event)?;
    if !delivered {
        *lost += 1;
    }
    Ok(delivered)
}

/// An INVOKE event was written to a dead `event/next` call: the extension never sees it, and
/// its next accepted call is the one that ends this invocation for it.
fn note_ext_loss(ext: &mut Extension, event: &ExtEvent, timelines: &mut [Timeline], now: Instant) {
    if let ExtEvent::Invoke { timeline, .. } = event {
        ext.record_next_for = Some(*timeline);
        if let Some(t) = timelines.get_mut(*timeline) {
            t.extension_lost.push((ext.name.clone(), now));
        }
    }
}

fn mark_delivered(inner: &mut Inner, request_id: &str, now: Instant) {
    if let Some(active) = inner.active.iter_mut().find(|a| a.request_id == request_id) {
        active.delivered = true;
        inner.timelines[active.timeline].runtime_received = Some(now);
    }
}

fn note_ext_delivery(
    ext: &mut Extension,
    event: &ExtEvent,
    timelines: &mut [Timeline],
    now: Instant,
) {
    if let ExtEvent::Invoke { timeline, .. } = event {
        ext.record_next_for = Some(*timeline);
        if let Some(t) = timelines.get_mut(*timeline) {
            t.extension_invoke.push((ext.name.clone(), now));
        }
    }
}
