//! An emulator of AWS Lambda's Runtime API (2018-06-01) and Extensions API (2020-01-01).
//!
//! It serves both APIs on `127.0.0.1` (ephemeral port) and either starts the function as a
//! child process ([`Emulator::spawn_function`]), so it can freeze, thaw and kill it, or lets the
//! test itself play runtime and extensions against [`Emulator::runtime_api`] ("attach" mode).
//! It follows Lambda's rules, not the AWS Runtime Interface Emulator's shortcuts:
//!
//! - registration closes at the runtime's first `/next`; internal extensions may not subscribe
//!   to SHUTDOWN; at most 10 extensions; errors are `{"errorMessage","errorType"}` JSON;
//! - init completes when the runtime and every extension have called next, within
//!   `init_timeout`;
//! - an invocation is complete only when the runtime has answered and called `/next` again and
//!   every INVOKE subscriber waits in `event/next`; the next invocation is held until then;
//! - an extension already waiting in `event/next` is refused another call (403
//!   `Extension.InvalidExtensionState`), also when the pending call's client went away: the
//!   next event is written to that dead call and lost, and only then is a call accepted;
//! - the runtime's `/next` follows RAPID's runtime states: asked again before answering, it
//!   renders the current invocation again; two calls at once both wait, and each invocation
//!   goes to the oldest, also when its client went away: then the invocation is lost and
//!   times out (outside Managed Instances); an answer for an id other than the current
//!   invocation's is 400 `InvalidRequestID`, a second one for the current one 403;
//! - the runtime's deadline and the extensions' `deadlineMs` are rendered apart and may differ
//!   by a millisecond ([`EmulatorConfig::extension_deadline_skew_ms`]);
//! - the caller gets the response as soon as the runtime posts it; a streamed response
//!   (`Lambda-Runtime-Function-Response-Mode: streaming`) may reach 200 MB instead of 6 MB,
//!   and reaches the caller whole, metadata prelude included, once its last chunk is in;
//! - an idle, complete child is frozen (SIGSTOP) and thawed (SIGCONT) on the next invoke;
//! - a deadline overrun resets the environment, which "behaves like a Shutdown event": SIGTERM
//!   and the runtime's grace when an extension is registered, then SIGKILL; init again on the
//!   next invoke; an external extension subscribed to SHUTDOWN gets one (reason `timeout`,
//!   or `failure` after a crash), on its pending `event/next` or its next one; the other
//!   calls pending at the reset are not answered (they end with the process), and until the
//!   reset child has exited its new calls go nowhere (a `/next` or an extension's
//!   `event/next` is never answered, a registration is closed, an init error refused); only
//!   then is the next child started;
//! - with SnapStart, init ends in a snapshot (the child frozen while its runtime waits in
//!   `/restore/next`) and the first invoke restores it (see [`EmulatorConfig::snap_start`]).
//!
//! Everything is recorded: a [`Timeline`] per invocation and [`Stats`]. Faults can be injected
//! through [`Emulator::faults`].

mod extensions_api;
mod faults;
mod ids;
mod process;
mod runtime_api;
mod server;
mod state;
mod timeline;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

pub use faults::{Fault, FaultMode, Faults};
pub use timeline::{Restore, Stats, Timeline};

use state::Shared;

/// How the emulated function is configured.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The function timeout: each invocation's deadline is its dispatch time plus this, sent
    /// as epoch milliseconds. Default 3 s (Lambda's default).
    pub function_timeout: Duration,
    /// The init phase limit. Default 10 s (Lambda's limit).
    pub init_timeout: Duration,
    /// Freeze (SIGSTOP) an idle, complete child and thaw it (SIGCONT) on the next invoke.
    /// Default true.
    pub freeze: bool,
    /// Extension names that count as external (as if an executable of that name were in
    /// `/opt/extensions`); every other registration is internal.
    pub external_extensions: Vec<String>,
    /// `AWS_LAMBDA_FUNCTION_NAME`. Default `"test-function"`. (Memory size is `"128"`, version
    /// `"$LATEST"`.)
    pub function_name: String,
    /// `Some(n)`: Lambda Managed Instances mode: up to `n` invocations at once, INVOKE
    /// registration refused, nothing frozen, timeouts end only the invocation concerned.
    /// Default `None`.
    pub managed_instances: Option<u32>,
    /// The time the child gets between SIGTERM and SIGKILL on [`Emulator::shutdown`] and on a
    /// reset (a timeout, a crash). `None`
    /// (default) applies Lambda's rule: 0 ms with no extension, 500 ms with an internal one,
    /// 300 ms with external ones only; external extensions get the rest of the 2 s phase.
    pub shutdown_grace: Option<Duration>,
    /// SnapStart (default false). The child gets `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`;
    /// init ends when the runtime waits in `GET /runtime/restore/next` (or `/invocation/next`)
    /// and every extension has called `event/next`; then the snapshot is taken: the child is
    /// frozen and [`Emulator::spawn_function`] returns. The next [`Emulator::invoke`] (or
    /// [`Emulator::restore`]) restores it: the connections open at the snapshot are treated as
    /// [`restored_connections`](Self::restored_connections) says, the child is thawed,
    /// `/restore/next` is answered, and the restore phase ends with the runtime's first
    /// `/invocation/next` (within `init_timeout`) or fails with `/restore/error`.
    ///
    /// (In every mode an extension already waiting in `event/next` may not call it again: 403
    /// `Extension.InvalidExtensionState`, RAPID's rule from aws-lambda-runtime-interface-emulator,
    /// `core/internalagent_states.go`. A pending call whose client went away, or that a restore
    /// cut, still counts, as in RAPID: the next event is written to it and lost, and only then
    /// is a new call accepted.)
    pub snap_start: bool,
    /// What the restore does to the connections open at snapshot time (SnapStart only;
    /// default [`RestoredConnections::Survive`]).
    pub restored_connections: RestoredConnections,
    /// Milliseconds added to an INVOKE event's `deadlineMs` for the extensions, against the
    /// runtime's `Lambda-Runtime-Deadline-Ms`. Default -1: the two need not agree. Lambda's
    /// Runtime API server renders each from the invocation's monotonic deadline when it answers
    /// that call, with a fresh wall-clock offset and truncated to the millisecond
    /// (aws-lambda-runtime-interface-emulator, `rapi/rendering/rendering.go`:
    /// `MonoToEpoch(DeadlineNs) / time.Millisecond` in both `RenderRuntimeEvent` and
    /// `newAgentInvokeEvent`), so they can differ by a millisecond either way. Earlier by
    /// default, so that nothing can count on the two being equal and no test gets time past
    /// the runtime's deadline.
    pub extension_deadline_skew_ms: i64,
}

/// What a SnapStart restore does to the connections to the emulator that were open when the
/// snapshot was taken, pending calls included. The runtime's `/restore/next` always survives:
/// the restore answers it.
///
/// AWS does not document this. `Survive` is what Lambda's own Runtime API server does as far as
/// its open-source code shows: `/restore/next` is answered after the restore on the connection
/// it came on, and an extension's `event/next` pending at the snapshot is answered by the first
/// invoke (aws-lambda-runtime-interface-emulator, `rapid/handlers.go`: `handleRestore` releases
/// the runtime, `doInvoke` the agents). `Close` and `Blackhole` model connections that do not
/// survive (lambda_runtime resets its pool after a restore because "stale connections to RAPID
/// won't survive the snapshot"), so a function can be tested against the worst case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestoredConnections {
    /// They work on: a pending call is answered after the restore.
    #[default]
    Survive,
    /// They are closed at the restore: a pending call fails at once (connection closed
    /// before the answer), an idle keep-alive connection on its next use. An extension's
    /// pending `event/next` still counts as pending (RAPID does not notice the close): a new
    /// call is refused until the first INVOKE event has been written to the closed one, and
    /// lost.
    Close,
    /// They are dead without a sign: never answered, never closed. What is written to them
    /// goes nowhere (the first INVOKE event, for an extension's pending `event/next`, as with
    /// `Close`); a client without a timeout waits forever.
    Blackhole,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            function_timeout: Duration::from_secs(3),
            init_timeout: Duration::from_secs(10),
            freeze: true,
            external_extensions: Vec::new(),
            function_name: "test-function".to_owned(),
            managed_instances: None,
            shutdown_grace: None,
            snap_start: false,
            restored_connections: RestoredConnections::Survive,
            extension_deadline_skew_ms: -1,
        }
    }
}

/// The function to run as a child process.
#[derive(Debug, Clone, Default)]
pub struct FunctionSpec {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables added after the Lambda ones (so they can override them).
    pub env: Vec<(String, String)>,
}

impl FunctionSpec {
    /// A spec for `program` with no arguments and no extra environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            ..Self::default()
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// What [`Emulator::invoke`] returns.
#[derive(Debug, Clone)]
pub struct InvokeResult {
    /// The invocation's request id (a fresh one when init failed before dispatch).
    pub request_id: String,
    /// How it ended for the caller.
    pub outcome: InvokeOutcome,
    /// From the `invoke()` call to the outcome being available to the caller.
    pub latency: Duration,
}

/// How an invocation ended, as a synchronous caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// The runtime posted this response.
    Success(Bytes),
    /// The runtime posted an error (or the environment failed during the invocation).
    FunctionError {
        /// `errorType` (e.g. `"Runtime.ExitError"`, `"Function.ResponseSizeTooLarge"`).
        error_type: String,
        /// `errorMessage`.
        error_message: String,
    },
    /// The deadline passed before the runtime answered.
    Timeout,
    /// Init failed (init error, exit during init, init timeout).
    InitError(String),
}

impl InvokeOutcome {
    /// The response body, if the invocation succeeded.
    pub fn body(&self) -> Option<&Bytes> {
        match self {
            InvokeOutcome::Success(body) => Some(body),
            _ => None,
        }
    }

    /// Whether the invocation succeeded.
    pub fn is_success(&self) -> bool {
        matches!(self, InvokeOutcome::Success(_))
    }
}

/// What [`Emulator::shutdown`] observed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShutdownResult {
    /// The child's exit status (`None` in attach mode or if it could not be reaped).
    pub exit_status: Option<ExitStatus>,
    /// Whether the child outlived the grace period and had to be killed (SIGKILL).
    pub killed: bool,
    /// From the `shutdown()` call to the child being gone.
    pub duration: Duration,
    /// The grace period applied between SIGTERM and SIGKILL of the runtime process.
    pub grace: Duration,
    /// The whole Shutdown phase: the external extensions' `deadlineMs` (2 s with one).
    pub phase: Duration,
    /// Names of the external extensions that were sent a SHUTDOWN event.
    pub shutdown_events: Vec<String>,
}

/// Kills the child and stops the server when the last [`Emulator`] handle is dropped.
#[derive(Debug)]
struct DropGuard {
    shared: Arc<Shared>,
    server: AbortHandle,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.server.abort();
        self.shared.kill_on_drop();
    }
}

/// A running emulator. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl Emulator {
    /// Binds `127.0.0.1:0` and starts serving both APIs.
    pub async fn start(config: EmulatorConfig) -> io::Result<Emulator> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config, addr));
        let server = tokio::spawn(server::serve(listener, shared.clone())).abort_handle();
        Ok(Emulator {
            _guard: Arc::new(DropGuard {
                shared: shared.clone(),
                server,
            }),
            shared,
        })
    }

    /// `127.0.0.1:PORT`: the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn runtime_api(&self) -> String {
        self.shared.addr.to_string()
    }

    /// The invoked function ARN sent with every invocation.
    pub fn function_arn(&self) -> String {
        self.shared.function_arn.to_string()
    }

    /// Starts `spec` as the function's child process and waits for init to complete. Fails
    /// with the init error (the runtime's or an extension's `init/error`, an exit during init,
    /// or `init_timeout`); the next [`Emulator::invoke`] then runs init again. A child of an
    /// earlier spec is killed first.
    pub async fn spawn_function(&self, spec: FunctionSpec) -> io::Result<()> {
        self.shared.set_spec(spec);
        self.shared.ensure_ready().await.map_err(io::Error::other)
    }

    /// Invokes the function synchronously and returns as soon as the runtime has answered
    /// (or the deadline passed). Concurrent calls are served one at a time, in order, each
    /// one only once the previous invocation is complete (in Managed Instances mode, up to
    /// `n` at once). Without a spawned child, the invocation goes to whoever plays runtime
    /// and extensions against [`Emulator::runtime_api`], once their init is complete.
    pub async fn invoke(&self, payload: impl Into<Bytes>) -> InvokeResult {
        let requested = Instant::now();
        let payload = payload.into();
        let failed = |message: String| InvokeResult {
            request_id: ids::uuid_v4(),
            outcome: InvokeOutcome::InitError(message),
            latency: requested.elapsed(),
        };
        let Ok(mut permit) = self.shared.slots.clone().acquire_owned().await else {
            return failed("the emulator is closed".to_owned());
        };
        loop {
            if let Err(message) = self.shared.ensure_ready().await {
                return failed(message);
            }
            // SnapStart: the first invocation after the snapshot restores it.
            if let Err(message) = self.shared.restore().await {
                return failed(message);
            }
            match self.shared.dispatch(payload.clone(), requested, permit) {
                Ok(dispatched) => {
                    let shared = self.shared.clone();
                    let request_id = dispatched.request_id.clone();
                    let deadline = tokio::time::Instant::from_std(dispatched.deadline);
                    let completion = dispatched.completion;
                    tokio::spawn(async move {
                        if tokio::time::timeout_at(deadline, completion).await.is_err() {
                            shared.on_deadline(&request_id);
                        }
                    });
                    let outcome = dispatched.outcome.await.unwrap_or(InvokeOutcome::Timeout);
                    return InvokeResult {
                        request_id: dispatched.request_id,
                        outcome,
                        latency: requested.elapsed(),
                    };
                }
                // Reset between init and dispatch (e.g. the child crashed): init again.
                Err(back) => permit = back,
            }
        }
    }

    /// SnapStart: restores the snapshot now, if one waits (otherwise does nothing), and
    /// returns once the restore phase is over (the runtime called `/invocation/next`). Fails
    /// with the restore error (`/restore/error`, an exit, or `init_timeout` elapsed); the next
    /// `invoke()` then runs init again. `invoke()` restores by itself when needed.
    pub async fn restore(&self) -> io::Result<()> {
        let Ok(_permit) = self.shared.slots.clone().acquire_owned().await else {
            return Err(io::Error::other("the emulator is closed"));
        };
        self.shared.restore().await.map_err(io::Error::other)
    }

    /// Every SnapStart restore so far, in order.
    pub fn restores(&self) -> Vec<Restore> {
        self.shared.restores()
    }

    /// One timeline per dispatched invocation, in dispatch order.
    pub fn timelines(&self) -> Vec<Timeline> {
        self.shared.timelines()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The fault injection switchboard.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Every line the child(ren) wrote to stdout and stderr, in arrival order. Set
    /// `TESTKIT_ECHO=1` to also echo them to the test's stderr.
    pub fn function_logs(&self) -> Vec<String> {
        self.shared.logs.snapshot()
    }

    /// Waits up to `timeout` for a function log line that satisfies `predicate` (lines already
    /// logged count) and returns it.
    pub async fn wait_for_log(
        &self,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.logs.subscribe();
        let mut seen = 0;
        loop {
            let lines = self.shared.logs.snapshot();
            if let Some(line) = lines[seen.min(lines.len())..].iter().find(|l| predicate(l)) {
                return Some(line.clone());
            }
            seen = lines.len();
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Waits up to `timeout` until `condition` holds over the current stats and timelines;
    /// returns whether it did. Re-evaluated on every state change, never polled.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&Stats, &[Timeline]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe_changes();
        loop {
            if condition(&self.shared.stats(), &self.shared.timelines()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return condition(&self.shared.stats(), &self.shared.timelines());
            }
        }
    }

    /// Marks posted to `/__testkit/mark` while no invocation had been dispatched yet.
    pub fn marks_outside_invocations(&self) -> Vec<(String, Instant)> {
        self.shared.loose_marks()
    }

    /// The pid of the running child, if any.
    pub fn child_pid(&self) -> Option<u32> {
        self.shared.child_pid()
    }

    /// Names of the extensions registered in the current environment.
    pub fn extensions(&self) -> Vec<String> {
        self.shared.extension_names()
    }

    /// Runs the shutdown phase: SHUTDOWN (`"spindown"`) to the external extensions subscribed
    /// to it, SIGTERM to the child (thawed first), SIGKILL after the grace period. The next
    /// `invoke()` starts a fresh environment.
    pub async fn shutdown(&self) -> ShutdownResult {
        self.shared.shutdown().await
    }
}
