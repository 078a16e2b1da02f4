//! The report of one deferred phase: what ran, how long it took, what was cut and why.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::action::ActionLabel;

/// How a phase ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PhaseKind {
    /// After the response, with the extension holding the environment (the normal case).
    Chained,
    /// Before the handler returned, because no extension holds the environment (outside
    /// Lambda, registration refused, chain broken, or the invocation was claimed too late).
    Inline,
    /// As a background task (Lambda Managed Instances: nothing is frozen).
    Background,
    /// The final flush on SIGTERM.
    Shutdown,
}

/// What became of one action.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActionOutcome {
    /// It completed (yielded `()` or `Ok(())`).
    Ok,
    /// It yielded `Err`; the error's text.
    Failed(String),
    /// It panicked; the panic's message.
    Panicked(String),
    /// It was still running when the actions' budget ran out, and was abandoned.
    TimedOut,
    /// It never started: the budget had run out.
    NotRun,
}

/// One action's line in the report.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ActionReport {
    /// The action's name and where it was queued.
    pub label: ActionLabel,
    /// When it started (or was skipped), from the start of the phase.
    pub offset: Duration,
    /// How long it ran.
    pub duration: Duration,
    /// What became of it.
    pub outcome: ActionOutcome,
}

/// What became of one flusher's flush.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushOutcome {
    /// The flush succeeded.
    Ok,
    /// The flush returned an error; its text.
    Failed(String),
    /// The flush panicked; the panic's message.
    Panicked(String),
    /// The flush overran its timeout and was abandoned (its thread may still run).
    TimedOut,
    /// Not started; the reason (a previous flush still running, no time left).
    NotRun(String),
}

/// One flusher's line in the report.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FlushReport {
    /// The flusher's name ([`Flush::name`](crate::Flush::name)).
    pub name: String,
    /// When it started (or was skipped), from the start of the phase.
    pub offset: Duration,
    /// How long the flush took (or ran before it was abandoned).
    pub duration: Duration,
    /// What became of it.
    pub outcome: FlushOutcome,
}

/// Why part of the deferred work was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CutReason {
    /// The actions ran out of their budget: the invocation's deadline, minus the safety margin,
    /// minus the time reserved for the flush.
    ActionBudget {
        /// The time the actions had in all.
        budget: Duration,
    },
    /// The process is shutting down (SIGTERM): the running action was abandoned and the final
    /// flush took over.
    Shutdown,
    /// The flush ran out of time: `flush_timeout`, or the deadline minus the safety margin.
    FlushBudget {
        /// The time the flush had.
        budget: Duration,
    },
}

/// The report of one deferred phase, logged as a `tracing` event with target `deferred`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PhaseReport {
    /// The invocation's request id (empty outside Lambda).
    pub request_id: String,
    /// How the phase ran.
    pub kind: PhaseKind,
    /// When the phase started (wall clock).
    pub started: SystemTime,
    /// Every action queued, in queue order.
    pub actions: Vec<ActionReport>,
    /// Every flusher.
    pub flushes: Vec<FlushReport>,
    /// The whole phase.
    pub duration: Duration,
    /// What was cut, if anything.
    pub cut: Vec<CutReason>,
    /// How many phases in a row, this one included, had a flush that did not succeed (0 when
    /// this phase's flushes all succeeded): alert on it rather than on one failure.
    pub consecutive_flush_failures: u32,
}

impl PhaseReport {
    /// True when every flush succeeded (or there was none to run).
    pub fn flushed(&self) -> bool {
        self.flushes.iter().all(|f| f.outcome == FlushOutcome::Ok)
    }

    /// True when every action and flush succeeded and nothing was cut.
    pub fn is_clean(&self) -> bool {
        self.cut.is_empty()
            && self.actions.iter().all(|a| a.outcome == ActionOutcome::Ok)
            && self.flushed()
    }

    /// Logs the report: `info` when clean, `warn` otherwise.
    pub(crate) fn emit(&self) {
        let failed_actions = self
            .actions
            .iter()
            .filter(|a| a.outcome != ActionOutcome::Ok)
            .count();
        let failed_flushes = self
            .flushes
            .iter()
            .filter(|f| f.outcome != FlushOutcome::Ok)
            .count();
        let duration_ms = self.duration.as_secs_f64() * 1e3;
        if self.is_clean() {
            tracing::info!(
                target: "deferred",
                request_id = %self.request_id,
                kind = ?self.kind,
                actions = self.actions.len(),
                duration_ms,
                "{self}"
            );
        } else {
            tracing::warn!(
                target: "deferred",
                request_id = %self.request_id,
                kind = ?self.kind,
                actions = self.actions.len(),
                failed_actions,
                failed_flushes,
                cut = !self.cut.is_empty(),
                consecutive_flush_failures = self.consecutive_flush_failures,
                duration_ms,
                "{self}"
            );
        }
    }
}

struct Ms(Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}ms", self.0.as_secs_f64() * 1e3)
    }
}

impl fmt::Display for PhaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deferred phase ({:?}) of {:?} took {}",
            self.kind,
            self.request_id,
            Ms(self.duration)
        )?;
        for a in &self.actions {
            write!(f, "; {} ", a.label)?;
            match &a.outcome {
                ActionOutcome::Ok => write!(f, "ok in {}", Ms(a.duration))?,
                ActionOutcome::Failed(e) => write!(f, "failed after {}: {e}", Ms(a.duration))?,
                ActionOutcome::Panicked(e) => write!(f, "panicked after {}: {e}", Ms(a.duration))?,
                ActionOutcome::TimedOut => write!(f, "cut after {}", Ms(a.duration))?,
                ActionOutcome::NotRun => write!(f, "not run")?,
            }
        }
        for fl in &self.flushes {
            write!(f, "; flush {} ", fl.name)?;
            match &fl.outcome {
                FlushOutcome::Ok => write!(f, "ok in {}", Ms(fl.duration))?,
                FlushOutcome::Failed(e) => write!(f, "failed after {}: {e}", Ms(fl.duration))?,
                FlushOutcome::Panicked(e) => write!(f, "panicked after {}: {e}", Ms(fl.duration))?,
                FlushOutcome::TimedOut => write!(f, "abandoned after {}", Ms(fl.duration))?,
                FlushOutcome::NotRun(why) => write!(f, "not run: {why}")?,
            }
        }
        for cut in &self.cut {
            match cut {
                CutReason::ActionBudget { budget } => write!(
                    f,
                    "; actions cut: their budget of {} (deadline - safety margin - flush reserve) ran out",
                    Ms(*budget)
                )?,
                CutReason::Shutdown => write!(f, "; cut by shutdown: the final flush took over")?,
                CutReason::FlushBudget { budget } => write!(
                    f,
                    "; flush cut: its budget of {} (flush_timeout, or deadline - safety margin) ran out",
                    Ms(*budget)
                )?,
            }
        }
        Ok(())
    }
}
