//! Fault injection: a small, data-driven list of misbehaviours a test can arm at any time.

use std::sync::Mutex;
use std::time::Duration;

/// One misbehaviour of the emulated Extensions API.
///
/// Faults on `event/next` act when the call is about to be answered with an event (so a fault
/// armed while the extension already waits still applies to the next event it gets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// `POST /extension/register` answers this status with `{"errorMessage","errorType"}`
    /// and registers nothing.
    RegisterStatus {
        /// HTTP status, e.g. 403 or 500.
        status: u16,
        /// The `errorType` of the JSON body.
        error_type: String,
    },
    /// `POST /extension/register` closes the connection without an answer.
    RegisterClose,
    /// `POST /extension/register` registers the extension at once but answers only after this
    /// delay: Lambda counts the extension in (it must call `event/next` before init ends)
    /// while the function may have stopped waiting for the answer.
    RegisterAnswerDelay(Duration),
    /// `GET /event/next` answers this status (JSON error body) instead of the event. The event
    /// is consumed, as in RAPID, whose only 500 on `event/next` comes after the extension was
    /// released with the event (aws-lambda-runtime-interface-emulator,
    /// `rapi/handler/agentnext.go`): the retry is the extension's next `event/next`, which
    /// ends the invocation for it and waits for the next event.
    EventNextStatus(u16),
    /// `GET /event/next` sends the headers and half the body, then closes the connection. The
    /// event is consumed.
    EventNextCloseMidBody,
    /// `GET /event/next` answers 200 with a body that is not valid JSON. The event is consumed.
    EventNextMalformedBody,
    /// `GET /event/next` answers an event whose `eventType` is unknown. The event is consumed.
    EventNextUnknownEventType,
    /// `GET /event/next` answers an INVOKE whose `requestId` is not the invocation's. The event
    /// is consumed.
    EventNextWrongRequestId,
    /// Every Extensions API request is answered only after this delay.
    ExtensionsApiDelay(Duration),
    /// An INVOKE event reaches the extension this long after the runtime got the invocation
    /// (the extension's copy is late; the event is still delivered).
    EventNextAnswerDelay(Duration),
}

/// How long an injected fault stays armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Fires once, then disarms itself.
    Once,
    /// Fires every time until [`Faults::clear`].
    Persistent,
}

/// The armed faults of one emulator; see [`crate::emulator::Emulator::faults`].
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<(Fault, FaultMode)>>,
}

impl Faults {
    /// Arms `fault` with the given mode. Faults of the same kind fire in the order armed.
    pub fn inject(&self, fault: Fault, mode: FaultMode) {
        self.lock().push((fault, mode));
    }

    /// Arms `fault` for one occurrence.
    pub fn once(&self, fault: Fault) {
        self.inject(fault, FaultMode::Once);
    }

    /// Arms `fault` until [`Faults::clear`].
    pub fn always(&self, fault: Fault) {
        self.inject(fault, FaultMode::Persistent);
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The faults still armed.
    pub fn armed(&self) -> Vec<(Fault, FaultMode)> {
        self.lock().clone()
    }

    /// Takes the first armed fault that `select` accepts (disarming it if one-shot).
    pub(crate) fn take(&self, select: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut armed = self.lock();
        let index = armed.iter().position(|(fault, _)| select(fault))?;
        match armed[index].1 {
            FaultMode::Once => Some(armed.remove(index).0),
            FaultMode::Persistent => Some(armed[index].0.clone()),
        }
    }

    /// The delay to apply to an Extensions API request, if one is armed.
    pub(crate) fn extensions_delay(&self) -> Option<Duration> {
        match self.take(|f| matches!(f, Fault::ExtensionsApiDelay(_)))? {
            Fault::ExtensionsApiDelay(delay) => Some(delay),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Fault, FaultMode)>> {
        // A panic elsewhere while holding the lock leaves the list itself consistent.
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }
}
