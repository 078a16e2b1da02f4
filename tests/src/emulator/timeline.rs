//! What the emulator records: one [`Timeline`] per invocation, and counters in [`Stats`].

use std::collections::BTreeMap;
use std::time::Instant;

/// The recorded life of one invocation, for assertions on ordering and timing.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Timeline {
    /// The `Lambda-Runtime-Aws-Request-Id` of the invocation.
    pub request_id: String,
    /// When the caller called `invoke()` (it may then wait for the previous invocation).
    pub requested: Instant,
    /// When the invocation was dispatched: the event became available to the runtime and the
    /// INVOKE event to the extensions.
    pub invoked: Instant,
    /// The deadline (`invoked` + function timeout).
    pub deadline: Instant,
    /// The deadline as sent in `Lambda-Runtime-Deadline-Ms` (epoch ms). The extensions'
    /// `deadlineMs` is this plus [`EmulatorConfig::extension_deadline_skew_ms`] (1 ms earlier
    /// by default).
    ///
    /// [`EmulatorConfig::extension_deadline_skew_ms`]: super::EmulatorConfig::extension_deadline_skew_ms
    pub deadline_ms: u64,
    /// When the frozen child was thawed (SIGCONT) for this invocation.
    pub thawed: Option<Instant>,
    /// When the runtime's `/next` call received the event.
    pub runtime_received: Option<Instant>,
    /// When the event was written to a runtime `/next` call whose client had gone away (RAPID
    /// does not notice: the oldest pending call gets the invocation), so the runtime never
    /// received it from that call.
    pub runtime_lost: Option<Instant>,
    /// When the runtime POSTed its response (or error).
    pub response_posted: Option<Instant>,
    /// Whether the runtime answered with `/error` rather than `/response`.
    pub function_error: bool,
    /// When the runtime called `/next` again after answering.
    pub runtime_next: Option<Instant>,
    /// When each extension received this invocation's INVOKE event, by extension name.
    pub extension_invoke: Vec<(String, Instant)>,
    /// INVOKE events written to an `event/next` call whose client had gone away (RAPID does
    /// not notice: the extension stays Ready until the event is written there), by extension
    /// name: the extension never received them.
    pub extension_lost: Vec<(String, Instant)>,
    /// When each extension called `event/next` again after receiving the INVOKE event (or
    /// after it was lost, see `extension_lost`), by extension name.
    pub extension_next: Vec<(String, Instant)>,
    /// When the invocation completed (runtime answered and waits in `/next`, and every INVOKE
    /// subscriber waits in `event/next`).
    pub complete: Option<Instant>,
    /// When the environment was frozen (SIGSTOP) after this invocation.
    pub frozen: Option<Instant>,
    /// Whether the invocation overran its deadline (even if its response had already been
    /// returned to the caller).
    pub timed_out: bool,
    /// Marks posted to `POST /__testkit/mark` during the invocation: (body, arrival time).
    pub marks: Vec<(String, Instant)>,
    /// The environment generation (bumped by every reset) the invocation ran in.
    pub(crate) generation: u64,
}

impl Timeline {
    /// The time of the first mark whose text equals `text`.
    pub fn mark(&self, text: &str) -> Option<Instant> {
        self.marks
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, at)| *at)
    }

    /// When the named extension called `event/next` after receiving this invocation.
    pub fn extension_next_of(&self, name: &str) -> Option<Instant> {
        self.extension_next
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, at)| *at)
    }
}

/// One SnapStart snapshot and its restore.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Restore {
    /// When init completed and the snapshot was taken (the child frozen).
    pub snapshot: Instant,
    /// When the restore began: connections cut, child thawed, `/restore/next` answered.
    pub restored: Instant,
    /// When the runtime called `/invocation/next` after the restore: the end of the restore
    /// phase (none yet, or the restore failed).
    pub runtime_ready: Option<Instant>,
    /// The calls pending at the snapshot that the restore left dead ([`Close`] or
    /// [`Blackhole`]): `"event/next <extension name>"`, `"invocation/next"`.
    ///
    /// [`Close`]: super::RestoredConnections::Close
    /// [`Blackhole`]: super::RestoredConnections::Blackhole
    pub cut_calls: Vec<String>,
    /// Every `event/next` call accepted after the restore (in this environment), by extension
    /// name, in order.
    pub event_next: Vec<(String, Instant)>,
    /// `event/next` calls refused after the restore with 403 `Extension.InvalidExtensionState`
    /// because the extension already waited in one, by extension name.
    pub refused_event_next: Vec<(String, Instant)>,
    /// Why the restore failed (`/restore/error`, an exit, a timeout), if it did.
    pub error: Option<String>,
}

/// Counters over the emulator's whole life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The highest number of `event/next` calls ever in flight at once for one extension,
    /// a refused attempt included (lambda-deferred must keep it at 1).
    pub max_concurrent_event_next_per_extension: usize,
    /// The same, per extension name.
    pub max_concurrent_event_next_by_extension: BTreeMap<String, usize>,
    /// Total `event/next` calls (accepted ones, i.e. from a known, healthy extension).
    pub event_next_calls: u64,
    /// Total runtime `/invocation/next` calls.
    pub runtime_next_calls: u64,
    /// `/next` and `event/next` calls whose client went away before they were answered.
    pub abandoned_next_calls: u64,
    /// Invocations dispatched.
    pub invocations: u64,
    /// Invocations that overran their deadline.
    pub timeouts: u64,
    /// Environment resets (timeout, crash, extension exit error).
    pub resets: u64,
    /// Init phases that completed.
    pub inits: u64,
    /// Init phases that failed (init error, exit during init, init timeout).
    pub init_failures: u64,
    /// Times the child was frozen (SIGSTOP).
    pub freezes: u64,
    /// Times the child was thawed (SIGCONT).
    pub thaws: u64,
    /// SnapStart snapshots taken (init complete in SnapStart mode).
    pub snapshots: u64,
    /// SnapStart restores begun.
    pub restores: u64,
    /// `event/next` calls refused (403, as Lambda does) because the extension already waited
    /// in one (a call whose client went away included). Outside a SnapStart restore each also
    /// counts in the `max_concurrent_*` figures, unless the pending call's client was gone.
    pub refused_event_next_calls: u64,
    /// Invocations written to a runtime `/next` call whose client had gone away, as RAPID
    /// does: lost for the runtime (see [`Timeline::runtime_lost`]).
    pub lost_runtime_events: u64,
    /// Events (INVOKE, SHUTDOWN) written to an `event/next` call whose client had gone away,
    /// as RAPID does: lost for the extension.
    pub lost_extension_events: u64,
}
