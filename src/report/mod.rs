//! Report real failures exactly once, and never an [`Exit`].
//!
//! A catch-all reporter (a mailer, Sentry, an error log) that sees every
//! `Err` and every unwind files a "crash" for each intended exit. The
//! [`ReportLayer`] hands real failures (errors and panics) to a
//! [`Reporter`] and passes them on unchanged; an `Exit`, as unwind or as
//! `Err` anywhere in the error's source chain, is passed on without a report.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
//! use tower_exit::{report::Failure, Exit, ServiceBuilderExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let reports = Arc::new(AtomicUsize::new(0));
//! let counter = reports.clone();
//! let svc = ServiceBuilder::new()
//!     .report(move |_: &Failure<'_>| { counter.fetch_add(1, Ordering::SeqCst); })
//!     .service_fn(|code: i32| async move {
//!         if code == 0 { Err::<(), BoxError>("disk full".into()) } else { Err(Exit::new(code).into()) }
//!     });
//!
//! assert!(svc.clone().oneshot(0).await.is_err()); // a failure: reported
//! assert!(svc.oneshot(3).await.is_err()); // an exit: passed on, not reported
//! assert_eq!(reports.load(Ordering::SeqCst), 1);
//! # }
//! ```

mod rate_limited;
#[cfg(feature = "sentry")]
mod sentry;

pub use self::rate_limited::{Dropped, RateLimited};
#[cfg(feature = "sentry")]
pub use self::sentry::SentryReporter;

use crate::exit::{AsError, ConcreteError};
use crate::Exit;
use pin_project_lite::pin_project;
use std::any::Any;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// What a [`Reporter`] is handed: a real failure, or an exit that the
/// layer's [`ExitPolicy`] asks to report (never as a failure).
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Failure<'a> {
    /// The service returned this error (its chain holds no `Exit`).
    Error(&'a (dyn Error + 'static)),
    /// The service panicked with this payload (not an `Exit`).
    Panic(&'a (dyn Any + Send)),
    /// The service exited, and the [`ExitPolicy`] reports this exit. It is
    /// passed on exactly as when it is not reported.
    Exit(&'a Exit),
}

/// Which exits a [`ReportLayer`] reports, as [`Failure::Exit`].
///
/// Whatever the policy, an exit is never reported as an error or a panic,
/// and reporting it never changes how it propagates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExitPolicy {
    /// Report no exit (the default): an exit is not a failure.
    #[default]
    Never,
    /// Report exits whose status is not 0 (`Exit::is_success` is false):
    /// visible, as exits, in the error tracker.
    NonZero,
    /// Report every exit.
    All,
}

impl ExitPolicy {
    /// Whether this policy reports `exit`.
    pub fn reports(self, exit: &Exit) -> bool {
        match self {
            ExitPolicy::Never => false,
            ExitPolicy::NonZero => !exit.is_success(),
            ExitPolicy::All => true,
        }
    }
}

impl Failure<'_> {
    /// The panic message, when the payload is a string (as `panic!` makes it).
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            Failure::Panic(payload) => payload
                .downcast_ref::<&'static str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str)),
            Failure::Error(_) | Failure::Exit(_) => None,
        }
    }

    /// Whether this is a real failure (an error or a panic), not an exit.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Failure::Exit(_))
    }
}

impl fmt::Debug for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Error(err) => f.debug_tuple("Error").field(err).finish(),
            Failure::Panic(_) => f
                .debug_tuple("Panic")
                .field(&self.panic_message().unwrap_or("<non-string payload>"))
                .finish(),
            Failure::Exit(exit) => f.debug_tuple("Exit").field(exit).finish(),
        }
    }
}

/// Shows a failure in one line: an error with its whole source chain
/// (`outer: inner: root`), a panic with its message, an exit as
/// `exit 3: message`.
impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Error(err) => {
                write!(f, "{err}")?;
                let mut source = err.source();
                while let Some(err) = source {
                    write!(f, ": {err}")?;
                    source = err.source();
                }
                Ok(())
            }
            Failure::Panic(_) => match self.panic_message() {
                Some(message) => write!(f, "panicked: {message}"),
                None => f.write_str("panicked"),
            },
            Failure::Exit(exit) => write!(f, "{exit}"),
        }
    }
}

/// Receives every real failure a [`ReportLayer`] sees, once (and the exits
/// its [`ExitPolicy`] reports).
///
/// Implemented for closures `Fn(&Failure<'_>)`.
pub trait Reporter: Send + Sync + 'static {
    /// Reports one failure. Runs on the request path: keep it short and never
    /// block (hand the work to a channel or a background task).
    fn report(&self, failure: &Failure<'_>);

    /// Reports how many reports a rate limiter ([`RateLimited`]) dropped.
    /// By default, one `tracing` warning.
    fn report_dropped(&self, dropped: &Dropped) {
        tracing::warn!(
            errors = dropped.errors,
            panics = dropped.panics,
            exits = dropped.exits,
            "{dropped}"
        );
    }
}

impl<F: Fn(&Failure<'_>) + Send + Sync + 'static> Reporter for F {
    fn report(&self, failure: &Failure<'_>) {
        self(failure)
    }
}

/// The default reporter: one `tracing` event per report: failures at
/// `ERROR` level with the whole error chain or the panic message, exits at
/// `WARN` level with their code and message (fields `exit.code` and
/// `exit.message`).
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingReporter;

impl Reporter for TracingReporter {
    fn report(&self, failure: &Failure<'_>) {
        match failure {
            Failure::Error(_) => tracing::error!(error = %failure, "service failed"),
            Failure::Panic(_) => tracing::error!(panic = %failure, "service panicked"),
            // `exit.message`, not `message`: that name is the event's own
            // text, and JSON logs would carry it twice.
            Failure::Exit(exit) => tracing::warn!(
                exit.code = exit.code(),
                exit.message = exit.message(),
                "service exited"
            ),
        }
    }
}

/// Layer that reports real failures and never an exit. See [the module docs](self).
///
/// `M` is the [`AsError`] marker of the inner service's error, always
/// inferred.
pub struct ReportLayer<R = TracingReporter, M = ConcreteError> {
    reporter: Arc<R>,
    exits: ExitPolicy,
    _error: PhantomData<fn() -> M>,
}

impl<R, M> Clone for ReportLayer<R, M> {
    fn clone(&self) -> Self {
        ReportLayer {
            reporter: self.reporter.clone(),
            exits: self.exits,
            _error: PhantomData,
        }
    }
}

impl<R, M> fmt::Debug for ReportLayer<R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportLayer")
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

impl<M> Default for ReportLayer<TracingReporter, M> {
    fn default() -> Self {
        ReportLayer::new(TracingReporter)
    }
}

impl<R: Reporter, M> ReportLayer<R, M> {
    /// Reports through `reporter`; no exit is reported
    /// ([`ExitPolicy::Never`]).
    pub fn new(reporter: R) -> Self {
        ReportLayer {
            reporter: Arc::new(reporter),
            exits: ExitPolicy::Never,
            _error: PhantomData,
        }
    }

    /// Which exits to report, as [`Failure::Exit`].
    pub fn report_exits(mut self, policy: ExitPolicy) -> Self {
        self.exits = policy;
        self
    }
}

impl<S, R, M> Layer<S> for ReportLayer<R, M> {
    type Service = Report<S, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Report {
            inner,
            reporter: self.reporter.clone(),
            exits: self.exits,
            _error: PhantomData,
        }
    }
}

impl<S, R, M> Report<S, R, M> {
    /// Reports the failures of `inner` through `reporter`, never its exits
    /// (see [`ReportLayer::report_exits`] to change that).
    pub fn new(inner: S, reporter: R) -> Self {
        Report {
            inner,
            reporter: Arc::new(reporter),
            exits: ExitPolicy::Never,
            _error: PhantomData,
        }
    }
}

inner_accessors!(Report<S, R, M>, inner);

/// Service built by [`ReportLayer`].
///
/// `M` is the [`AsError`] marker of the inner service's error, always
/// inferred.
pub struct Report<S, R = TracingReporter, M = ConcreteError> {
    inner: S,
    reporter: Arc<R>,
    exits: ExitPolicy,
    _error: PhantomData<fn() -> M>,
}

impl<S: Clone, R, M> Clone for Report<S, R, M> {
    fn clone(&self) -> Self {
        Report {
            inner: self.inner.clone(),
            reporter: self.reporter.clone(),
            exits: self.exits,
            _error: PhantomData,
        }
    }
}

impl<S: fmt::Debug, R, M> fmt::Debug for Report<S, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, R, M, Req> Service<Req> for Report<S, R, M>
where
    S: Service<Req>,
    S::Error: AsError<M>,
    R: Reporter,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, R, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let result = ready!(self.inner.poll_ready(cx));
        if let Err(err) = &result {
            report_error(&*self.reporter, self.exits, err);
        }
        Poll::Ready(result)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| inner.call(req))) {
            Ok(future) => ResponseFuture {
                future,
                reporter: Some(self.reporter.clone()),
                exits: self.exits,
                _error: PhantomData,
            },
            Err(payload) => {
                report_panic(&*self.reporter, self.exits, &payload);
                resume_unwind(payload)
            }
        }
    }
}

pub(crate) fn report_error<E: AsError<M>, M, R: Reporter>(
    reporter: &R,
    exits: ExitPolicy,
    err: &E,
) {
    let err = err.as_error();
    match Exit::from_error(err) {
        None => reporter.report(&Failure::Error(err)),
        Some(exit) if exits.reports(exit) => reporter.report(&Failure::Exit(exit)),
        Some(_) => {}
    }
}

pub(crate) fn report_panic<R: Reporter>(
    reporter: &R,
    exits: ExitPolicy,
    payload: &Box<dyn Any + Send>,
) {
    match Exit::from_panic(&**payload) {
        None => reporter.report(&Failure::Panic(&**payload)),
        Some(exit) if exits.reports(exit) => reporter.report(&Failure::Exit(exit)),
        Some(_) => {}
    }
}

pin_project! {
    /// Response future of [`Report`].
    pub struct ResponseFuture<F, R, M> {
        #[pin]
        future: F,
        reporter: Option<Arc<R>>,
        exits: ExitPolicy,
        _error: PhantomData<fn() -> M>,
    }
}

impl<F, R, M, T, E> Future for ResponseFuture<F, R, M>
where
    F: Future<Output = Result<T, E>>,
    E: AsError<M>,
    R: Reporter,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = this.future;
        let result = match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(poll) => ready!(poll),
            Err(payload) => {
                if let Some(reporter) = this.reporter.take() {
                    report_panic(&*reporter, *this.exits, &payload);
                }
                resume_unwind(payload)
            }
        };
        // `take` makes "exactly once" hold even if the future is polled
        // again after completion.
        if let (Err(err), Some(reporter)) = (&result, this.reporter.take()) {
            report_error(&*reporter, *this.exits, err);
        }
        Poll::Ready(result)
    }
}
