//! Where the wrapper finds the invocation's request id and deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{Context, LambdaEvent};

/// The facts about one invocation that the deferred phase needs: which INVOKE event of the
/// extension it matches, and when Lambda will stop the environment.
///
/// ```
/// use deferred_core::Invocation;
/// use lambda_runtime::Context;
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let mut context = Context::default();
/// context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into();
/// context.deadline = 1_700_000_003_000; // Lambda-Runtime-Deadline-Ms
///
/// let invocation = Invocation::from_context(&context);
/// assert_eq!(invocation.request_id, "8476a536-e9f4-11e8-9739-2dfe598c3fcd");
/// assert_eq!(
///     invocation.deadline,
///     Some(UNIX_EPOCH + Duration::from_millis(1_700_000_003_000))
/// );
/// ```
///
/// `#[non_exhaustive]`, so that it can carry more of the invocation later (its trace header,
/// a tenant id) without breaking a [`HandlerInput`] of yours: build it with
/// [`Invocation::new`] or [`Invocation::from_context`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Invocation {
    /// The `Lambda-Runtime-Aws-Request-Id` of the invocation.
    pub request_id: String,
    /// The invocation's deadline (`Lambda-Runtime-Deadline-Ms`), `None` when unknown (a
    /// hand-built `Context` in a unit test has deadline 0).
    pub deadline: Option<SystemTime>,
}

impl Invocation {
    /// The invocation `request_id`, which Lambda stops at `deadline` (`None`: unknown), for a
    /// [`HandlerInput`] of your own.
    ///
    /// ```
    /// use deferred_core::{HandlerInput, Invocation};
    /// use std::time::{Duration, SystemTime};
    ///
    /// /// An input that carries the invocation's facts itself (e.g. from a custom adapter).
    /// struct Job {
    ///     request_id: String,
    ///     deadline: SystemTime,
    /// }
    ///
    /// impl HandlerInput for Job {
    ///     fn invocation(&self) -> Invocation {
    ///         Invocation::new(self.request_id.clone(), Some(self.deadline))
    ///     }
    /// }
    ///
    /// let deadline = SystemTime::now() + Duration::from_secs(3);
    /// let job = Job { request_id: "r-1".into(), deadline };
    /// assert_eq!(job.invocation().request_id, "r-1");
    /// assert_eq!(job.invocation().deadline, Some(deadline));
    /// ```
    pub fn new(request_id: impl Into<String>, deadline: Option<SystemTime>) -> Self {
        Self {
            request_id: request_id.into(),
            deadline,
        }
    }

    /// Reads the request id and deadline of a `lambda_runtime::Context`.
    ///
    /// A deadline of 0 (a `Context::default()`, as in unit tests) is unknown, and so is one
    /// that `SystemTime` cannot represent:
    ///
    /// ```
    /// use deferred_core::Invocation;
    /// use lambda_runtime::Context;
    ///
    /// let invocation = Invocation::from_context(&Context::default());
    /// assert_eq!(invocation.request_id, "");
    /// assert_eq!(invocation.deadline, None);
    /// ```
    pub fn from_context(context: &Context) -> Self {
        Self {
            request_id: context.request_id.clone(),
            deadline: deadline_from_epoch_ms(context.deadline),
        }
    }
}

/// Converts Lambda's epoch-millisecond deadline; 0 means "not set". A deadline the platform's
/// `SystemTime` cannot represent is unknown too (`UNIX_EPOCH + d` panics there: on Windows,
/// beyond the year 30828).
pub(crate) fn deadline_from_epoch_ms(ms: u64) -> Option<SystemTime> {
    if ms == 0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A handler argument that carries the Lambda invocation context.
///
/// `#[deferred_handler]` reads the request id and the deadline through this trait before the
/// handler's body runs. It is implemented for `lambda_runtime::LambdaEvent<T>` and, with the
/// `http` feature, for `lambda_http::Request`, of the versions deferred-core is built against
/// (see [lambda_runtime version](crate#lambda_runtime-version)).
///
/// ```
/// use deferred_core::HandlerInput;
/// use lambda_runtime::{Context, LambdaEvent};
///
/// /// The request id of any argument a deferred handler may take.
/// fn request_id(input: &impl HandlerInput) -> String {
///     input.invocation().request_id
/// }
///
/// let mut context = Context::default();
/// context.request_id = "8476a536-e9f4-11e8-9739-2dfe598c3fcd".into();
/// let event = LambdaEvent::new(serde_json::json!({ "id": 42 }), context);
/// assert_eq!(request_id(&event), "8476a536-e9f4-11e8-9739-2dfe598c3fcd");
///
/// // With the `http` feature: a request built by hand (no Lambda context) runs as outside
/// // Lambda.
/// # #[cfg(feature = "http")]
/// assert_eq!(request_id(&lambda_http::Request::default()), "");
/// ```
#[diagnostic::on_unimplemented(
    message = "`#[deferred_handler]` cannot find the Lambda context in an argument of type `{Self}`",
    label = "this argument does not carry the invocation's `lambda_runtime::Context`",
    note = "a deferred handler takes exactly one argument, by value: `lambda_runtime::LambdaEvent<T>` (any `T`), or `lambda_http::Request` with the `http` feature of deferred-core",
    note = "a `LambdaEvent` must come from lambda_runtime 1.x, the version deferred-core is built against: one from another version is another type (`cargo tree -d` lists the crates present in two versions)"
)]
pub trait HandlerInput {
    /// The invocation this argument belongs to.
    ///
    /// ```
    /// use deferred_core::HandlerInput;
    /// use lambda_runtime::{Context, LambdaEvent};
    ///
    /// let mut context = Context::default();
    /// context.deadline = 1_700_000_003_000;
    /// let invocation = LambdaEvent::new((), context).invocation();
    /// assert!(invocation.deadline.is_some());
    /// ```
    fn invocation(&self) -> Invocation;
}

impl<T> HandlerInput for LambdaEvent<T> {
    fn invocation(&self) -> Invocation {
        Invocation::from_context(&self.context)
    }
}

#[cfg(feature = "http")]
impl HandlerInput for lambda_http::Request {
    fn invocation(&self) -> Invocation {
        use lambda_http::RequestExt;
        match self.lambda_context_ref() {
            Some(context) => Invocation::from_context(context),
            // A request built by hand (a unit test) has no context: run as outside Lambda.
            None => Invocation {
                request_id: String::new(),
                deadline: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_deadline_is_unknown() {
        let ctx = Context::default();
        assert_eq!(Invocation::from_context(&ctx).deadline, None);
    }

    #[test]
    fn deadline_is_epoch_ms() {
        let mut ctx = Context::default();
        ctx.request_id = "r1".into();
        ctx.deadline = 1_700_000_000_123;
        let inv = LambdaEvent::new((), ctx).invocation();
        assert_eq!(inv.request_id, "r1");
        assert_eq!(
            inv.deadline,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
    }

    /// lambda_http's adapters (`Adapter`, `StreamAdapter`, the streaming `run`s) put the
    /// runtime's `Context` in the request's extensions, whatever the event source: the request
    /// gives its request id and deadline. One built by hand has none: an empty id and no
    /// deadline (the work then runs inline), never a panic.
    #[cfg(feature = "http")]
    #[test]
    fn a_lambda_http_request_gives_the_context_in_its_extensions() {
        use lambda_http::RequestExt;
        let mut ctx = Context::default();
        ctx.request_id = "r-http".into();
        ctx.deadline = 1_700_000_000_123;
        let request = lambda_http::Request::default().with_lambda_context(ctx);
        assert_eq!(
            request.invocation(),
            Invocation::new(
                "r-http",
                Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
            )
        );
        assert_eq!(
            lambda_http::Request::default().invocation(),
            Invocation::new("", None)
        );
    }

    /// `Lambda-Runtime-Deadline-Ms` / `deadlineMs` near `u64::MAX` (issue 5, fuzzing): never a
    /// panic; exact where `SystemTime` can represent it, unknown otherwise.
    #[test]
    fn extreme_deadlines_do_not_overflow() {
        for ms in [u64::MAX, u64::MAX - 1, u64::MAX / 2, 1 << 53, 1] {
            match deadline_from_epoch_ms(ms) {
                Some(deadline) => assert_eq!(
                    deadline.duration_since(UNIX_EPOCH).ok(),
                    Some(Duration::from_millis(ms))
                ),
                None => assert!(UNIX_EPOCH.checked_add(Duration::from_millis(ms)).is_none()),
            }
        }
    }
}
