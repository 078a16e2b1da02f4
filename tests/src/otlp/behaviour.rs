//! How the sink answers: the [`Behaviour`] a test sets, and the scheduler that turns it into
//! one [`Reply`] per export request.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// How the sink answers export requests. Set with
/// [`OtlpSink::set_behaviour`](super::OtlpSink::set_behaviour); applies to requests whose
/// body has been read after the change.
///
/// Requests are numbered from 1 under each behaviour (setting a behaviour restarts the
/// count), which makes every schedule deterministic. A request that is malformed (bad path,
/// content type or body) is answered 4xx whatever the behaviour, and does not take a turn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Answer 200 at once and record what was received.
    #[default]
    Normal,
    /// Answer 200 after the given delay, then record (a healthy but slow collector).
    Slow(Duration),
    /// Never answer: hold the connection until the behaviour is changed or the sink is
    /// dropped, then close it without an answer. What the request carried is not recorded
    /// (it was never acknowledged); the request is counted in
    /// [`RequestCounts::stalled`](super::RequestCounts::stalled).
    Stall,
    /// Hold the request for the given time, then answer 200 and record (a stall the
    /// collector recovers from). Counted in [`RequestCounts::held`](super::RequestCounts::held).
    StallFor(Duration),
    /// A mostly healthy collector with occasional stalls: every `every`th request (the
    /// `every`th, `2 * every`th, …) is held for `duration` before it is answered, the others
    /// are answered after `base` (use [`Duration::ZERO`] for at once). `every: 0` never
    /// stalls. "Answers in 5 ms, but stalls 2 s on 2% of exports" is
    /// `StallEvery { every: 50, duration: 2 s, base: 5 ms }`.
    StallEvery {
        /// Which requests stall: the multiples of `every`.
        every: u32,
        /// How long a stalling request is held before its answer.
        duration: Duration,
        /// How long every other request waits before its answer.
        base: Duration,
    },
    /// Answer `status` (its body a protobuf `google.rpc.Status`, as from a collector) to the
    /// next `times` requests, then behave as [`Behaviour::Normal`]. Nothing is recorded from a
    /// failed request. The OTLP exporter retries 429, 502, 503 and 504 (and network errors)
    /// but not other statuses such as 500.
    Fail {
        /// The HTTP status to answer; an invalid code (outside 100..=999) becomes 500.
        status: u16,
        /// How many requests fail before the sink answers normally again.
        times: u32,
    },
    /// Answer 200 with a body that does not decode as protobuf. The content is recorded,
    /// since the answer claims success. (The OTLP/HTTP exporter of opentelemetry-otlp 0.33
    /// only logs an undecodable success body at debug level: the export still succeeds.)
    Garbage,
    /// Close the connection at once, without an answer, before the body is read.
    Refuse,
    /// A deterministic custom schedule: request `n` (from 1) gets `replies[(n - 1) % len]`.
    /// An empty list answers like [`Behaviour::Normal`].
    Cycle(Vec<Reply>),
}

/// What the sink does with one export request, as a step of [`Behaviour::Cycle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer 200 after the delay (zero: at once), then record.
    Answer(Duration),
    /// Hold for the delay, then answer 200 and record; counted as held.
    Hold(Duration),
    /// Hold until the behaviour changes or the sink is dropped, then close unanswered.
    Stall,
    /// Answer this HTTP status; nothing recorded.
    Fail(u16),
    /// Answer this HTTP status after the delay; nothing recorded, counted as failed. What a
    /// proxy in front of a collector answers when it gives up waiting for it (a 504 after its
    /// own timeout). The exporter retries a retryable status if its timeout has not run out,
    /// and that retry gets a whole timeout of its own.
    FailAfter(u16, Duration),
    /// Answer this HTTP status (429 or 503: a collector throttling its clients) with a
    /// `Retry-After` of this many seconds; nothing recorded, counted as failed. The exporter
    /// waits that long before its retry if the wait ends within its timeout, and fails the
    /// export at once otherwise.
    Throttle(u16, u32),
    /// Answer 200 with a non-protobuf body; recorded.
    Garbage,
    /// Answer 200 with a partial success that rejects everything the request carried
    /// (`partial_success` set: `rejected_spans`, `rejected_data_points` or
    /// `rejected_log_records`, and an `error_message`); nothing recorded, counted as
    /// partial. The exporter takes it as a success: it logs it and does not retry.
    PartialSuccess,
    /// Close the connection without an answer; nothing recorded.
    Refuse,
}

/// The current behaviour and how far its schedule has advanced.
#[derive(Debug, Default)]
struct State {
    behaviour: Behaviour,
    /// Requests that took a turn under the current behaviour.
    turns: u64,
}

/// Hands out one [`Reply`] per request, and tells stalled requests when to let go.
#[derive(Debug)]
pub(crate) struct Scheduler {
    state: Mutex<State>,
    /// Bumped on every behaviour change; stalled requests wait for it.
    changes: watch::Sender<u64>,
}

impl Scheduler {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the behaviour, restarts its schedule and releases stalled requests.
    pub(crate) fn set(&self, behaviour: Behaviour) {
        *self.lock() = State {
            behaviour,
            turns: 0,
        };
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The current behaviour (a `Fail` that has used up its turns reads as `Normal`).
    pub(crate) fn current(&self) -> Behaviour {
        let state = self.lock();
        match &state.behaviour {
            Behaviour::Fail { times, .. } if state.turns >= u64::from(*times) => Behaviour::Normal,
            other => other.clone(),
        }
    }

    /// Whether the sink refuses connections right now (checked before the body is read).
    pub(crate) fn refuses(&self) -> bool {
        matches!(self.lock().behaviour, Behaviour::Refuse)
    }

    /// The reply for the next well-formed request, with a receiver that fires when the
    /// behaviour changes after this decision (used by stalls).
    pub(crate) fn next(&self) -> (Reply, watch::Receiver<u64>) {
        let mut state = self.lock();
        // Subscribed under the lock: a change after this decision is always seen.
        let changes = self.changes.subscribe();
        state.turns += 1;
        let n = state.turns;
        let reply = match &state.behaviour {
            Behaviour::Normal => Reply::Answer(Duration::ZERO),
            Behaviour::Slow(delay) => Reply::Answer(*delay),
            Behaviour::Stall => Reply::Stall,
            Behaviour::StallFor(hold) => Reply::Hold(*hold),
            Behaviour::StallEvery {
                every,
                duration,
                base,
            } => {
                if *every != 0 && n.is_multiple_of(u64::from(*every)) {
                    Reply::Hold(*duration)
                } else {
                    Reply::Answer(*base)
                }
            }
            Behaviour::Fail { status, times } => {
                if n <= u64::from(*times) {
                    Reply::Fail(*status)
                } else {
                    Reply::Answer(Duration::ZERO)
                }
            }
            Behaviour::Garbage => Reply::Garbage,
            Behaviour::Refuse => Reply::Refuse,
            Behaviour::Cycle(replies) => {
                if replies.is_empty() {
                    Reply::Answer(Duration::ZERO)
                } else {
                    // `n` counts from 1; the modulo is below `len`, so it fits in usize.
                    let len = replies.len() as u64;
                    replies[((n - 1) % len) as usize]
                }
            }
        };
        (reply, changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(s: &Scheduler, n: usize) -> Vec<Reply> {
        (0..n).map(|_| s.next().0).collect()
    }

    const NOW: Reply = Reply::Answer(Duration::ZERO);

    #[test]
    fn fail_then_normal() {
        let s = Scheduler::new();
        s.set(Behaviour::Fail {
            status: 503,
            times: 2,
        });
        assert_eq!(
            replies(&s, 3),
            vec![Reply::Fail(503), Reply::Fail(503), NOW]
        );
        assert_eq!(s.current(), Behaviour::Normal);
    }

    #[test]
    fn stall_every_is_deterministic() {
        let s = Scheduler::new();
        let base = Duration::from_millis(5);
        let hold = Duration::from_secs(2);
        s.set(Behaviour::StallEvery {
            every: 3,
            duration: hold,
            base,
        });
        let r = replies(&s, 6);
        assert_eq!(
            r,
            vec![
                Reply::Answer(base),
                Reply::Answer(base),
                Reply::Hold(hold),
                Reply::Answer(base),
                Reply::Answer(base),
                Reply::Hold(hold)
            ]
        );
        // A new behaviour restarts the count: one turn into the old one (7th), every 2nd
        // holds from the new one's first turn, not from the 8th.
        assert_eq!(replies(&s, 1), vec![Reply::Answer(base)]);
        s.set(Behaviour::StallEvery {
            every: 2,
            duration: hold,
            base,
        });
        assert_eq!(
            replies(&s, 3),
            vec![Reply::Answer(base), Reply::Hold(hold), Reply::Answer(base)]
        );
        // `every: 0` never holds.
        s.set(Behaviour::StallEvery {
            every: 0,
            duration: hold,
            base,
        });
        assert_eq!(replies(&s, 2), vec![Reply::Answer(base); 2]);
    }

    #[test]
    fn cycle_repeats() {
        let s = Scheduler::new();
        s.set(Behaviour::Cycle(vec![Reply::Garbage, Reply::Refuse]));
        assert_eq!(
            replies(&s, 3),
            vec![Reply::Garbage, Reply::Refuse, Reply::Garbage]
        );
        s.set(Behaviour::Cycle(Vec::new()));
        assert_eq!(replies(&s, 1), vec![NOW]);
    }

    #[test]
    fn a_change_wakes_stalled_requests() {
        let s = Scheduler::new();
        s.set(Behaviour::Stall);
        let (reply, changes) = s.next();
        assert_eq!(reply, Reply::Stall);
        assert!(!changes.has_changed().unwrap_or(true));
        s.set(Behaviour::Normal);
        assert!(changes.has_changed().unwrap_or(false));
    }
}
