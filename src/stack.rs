//! The whole exit-aware stack as one layer, at the cost of one.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_exit::report::TracingReporter;
//! use tower_exit::Supervisor;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let supervisor = Supervisor::new();
//! let svc = ServiceBuilder::new()
//!     .layer(supervisor.stack().report(TracingReporter))
//!     .service_fn(|_: Request<()>| async {
//!         tower_exit::exit(3);
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
//!     });
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(supervisor.exit().unwrap().code(), 3);
//! # }
//! ```
//!
//! [`Supervisor::stack`] gives an [`ExitStackLayer`] that behaves exactly
//! like the recommended four layers stacked in the recommended order,
//!
//! ```text
//! supervisor.layer()                       // boundary: exit → 503, drain
//! CatchPanicLayer::new()                   // panic → 500, exits pass
//! ReportLayer::new(r).report_exits(p)      // failures reported once
//! ForkGuardLayer::new()                    // a forked child never returns
//! ```
//!
//! with one `catch_unwind` per `call` and per poll instead of four, one
//! response future and one body wrapper: each of the four layers must look
//! at an unwind to tell an exit from a panic, and each `catch_unwind` moves
//! the request and the nested futures once more. The separate layers stay,
//! each usable alone; this one also cannot be put together in the wrong
//! order (a reporter above the catch-all that sees no panic, a guard above
//! a catch-all that protects nothing).
//!
//! There is no reporter unless [`report`](ExitStackLayer::report) sets one,
//! and no fork guard unless [`fork_guard`](ExitStackLayer::fork_guard) does.

use crate::body::{HasSupervisor, ResponseBody, Sink};
use crate::catch::{caught, exit_response, take_exit_response, Requested};
use crate::catch_panic::{DefaultResponseForPanic, ResponseForPanic};
use crate::exit::{
    enter, enter_in_call, leave, leave_call, AsError, ConcreteError, Exit, RaiseContext,
};
use crate::report::{report_error, report_panic, ExitPolicy, Failure, Reporter};
use crate::supervisor::Supervisor;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

use crate::exit::rule::{self, Guard};

/// The reporter of a stack that reports nothing (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReporter;

impl Reporter for NoReporter {
    fn report(&self, _: &Failure<'_>) {}
}

/// The four exit-aware layers as one; see [the module docs](self). Built by
/// [`Supervisor::stack`].
///
/// `M` is the [`AsError`] marker of the inner service's error, always
/// inferred.
pub struct ExitStackLayer<H = DefaultResponseForPanic, R = NoReporter, M = ConcreteError> {
    shared: Shared<H, R>,
    _error: PhantomData<fn() -> M>,
}

impl<H: Clone, R, M> Clone for ExitStackLayer<H, R, M> {
    fn clone(&self) -> Self {
        ExitStackLayer {
            shared: self.shared.clone(),
            _error: PhantomData,
        }
    }
}

impl<H, R, M> fmt::Debug for ExitStackLayer<H, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitStackLayer")
            .field("supervisor", &self.shared.supervisor)
            .field("exits", &self.shared.exits)
            .finish_non_exhaustive()
    }
}

impl<M> ExitStackLayer<DefaultResponseForPanic, NoReporter, M> {
    /// The stack of `supervisor`, with no reporter and no guard.
    pub(crate) fn new(supervisor: &Supervisor) -> Self {
        ExitStackLayer {
            shared: Shared {
                supervisor: supervisor.clone(),
                handler: DefaultResponseForPanic,
                reporter: Arc::new(NoReporter),
                exits: ExitPolicy::Never,
                guard: None,
            },
            _error: PhantomData,
        }
    }
}

impl<H, R, M> ExitStackLayer<H, R, M> {
    /// Reports real failures (errors and panics) through `reporter`, once
    /// each, as [`ReportLayer`](crate::ReportLayer) does; exits only as
    /// [`report_exits`](Self::report_exits) says.
    pub fn report<R2: Reporter>(self, reporter: R2) -> ExitStackLayer<H, R2, M> {
        ExitStackLayer {
            shared: self.shared.with(|handler, _| (handler, Arc::new(reporter))),
            _error: PhantomData,
        }
    }

    /// Which exits the reporter gets (default [`ExitPolicy::Never`]).
    pub fn report_exits(mut self, policy: ExitPolicy) -> Self {
        self.shared.exits = policy;
        self
    }

    /// Answers a real panic with `handler` instead of the default `500`, as
    /// [`CatchPanicLayer::custom`](crate::CatchPanicLayer::custom) does.
    pub fn panic_response<H2: ResponseForPanic>(self, handler: H2) -> ExitStackLayer<H2, R, M> {
        ExitStackLayer {
            shared: self.shared.with(|_, reporter| (handler, reporter)),
            _error: PhantomData,
        }
    }

    cfg_fork! {
        /// Ends a child forked during a request as `guard` would, innermost
        /// (see [`ForkGuardLayer`](crate::ForkGuardLayer) and its modes).
        pub fn fork_guard(mut self, guard: crate::ForkGuardLayer<M>) -> Self {
            rule::watch_forks();
            self.shared.guard = Some(guard.end);
            self
        }
    }
}

/// What the layer holds, and every service of one layer shares: one
/// reference count per request instead of one per layer.
struct Shared<H, R> {
    supervisor: Supervisor,
    handler: H,
    /// Shared by every service of the layer: a reporter need not be
    /// `Clone` (a rate limiter keeps one budget for all).
    reporter: Arc<R>,
    exits: ExitPolicy,
    guard: Option<Guard>,
}

impl<H: Send + Sync + 'static, R: Reporter> HasSupervisor for Shared<H, R> {
    fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }
}

impl<H: Clone, R> Clone for Shared<H, R> {
    fn clone(&self) -> Self {
        Shared {
            supervisor: self.supervisor.clone(),
            handler: self.handler.clone(),
            reporter: self.reporter.clone(),
            exits: self.exits,
            guard: self.guard,
        }
    }
}

impl<H, R> Shared<H, R> {
    /// The same, with the handler and reporter `replace` gives.
    fn with<H2, R2>(self, replace: impl FnOnce(H, Arc<R>) -> (H2, Arc<R2>)) -> Shared<H2, R2> {
        let (handler, reporter) = replace(self.handler, self.reporter);
        Shared {
            supervisor: self.supervisor,
            handler,
            reporter,
            exits: self.exits,
            guard: self.guard,
        }
    }
}

impl<S, H: Clone, R, M> Layer<S> for ExitStackLayer<H, R, M> {
    type Service = ExitStack<S, H, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ExitStack {
            inner,
            shared: Arc::new(self.shared.clone()),
            _error: PhantomData,
        }
    }
}

/// Service built by [`ExitStackLayer`].
pub struct ExitStack<S, H = DefaultResponseForPanic, R = NoReporter, M = ConcreteError> {
    inner: S,
    shared: Arc<Shared<H, R>>,
    _error: PhantomData<fn() -> M>,
}

impl<S: Clone, H, R, M> Clone for ExitStack<S, H, R, M> {
    fn clone(&self) -> Self {
        ExitStack {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            _error: PhantomData,
        }
    }
}

impl<S: fmt::Debug, H, R, M> fmt::Debug for ExitStack<S, H, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitStack")
            .field("inner", &self.inner)
            .field("supervisor", &self.shared.supervisor)
            .finish_non_exhaustive()
    }
}

inner_accessors!(ExitStack<S, H, R, M>, inner);

/// The fork generation a guarded call starts in (0, unused, without a
/// guard). 8 bytes in the future, not 16: its size is
/// moved at every `catch_unwind` and return.
#[derive(Clone, Copy, Debug)]
struct Guarded {
    started: u64,
}

impl Guarded {
    #[inline]
    fn start<H, R>(shared: &Shared<H, R>) -> Self {
        Guarded {
            started: if shared.guard.is_some() {
                rule::generation()
            } else {
                0
            },
        }
    }

    /// The raise context while the inner future is polled: the
    /// boundary's (exits are caught), plus the guard's rule for children.
    #[inline]
    fn context<H, R>(self, shared: &Shared<H, R>) -> RaiseContext {
        match shared.guard {
            Some(end) => rule::guarded(self.started, end).caught_here(),
            None => crate::exit::catching_context(),
        }
    }

    /// [`context`](Self::context) while the inner service is called.
    #[inline]
    fn context_in_call<H, R>(self, shared: &Shared<H, R>) -> RaiseContext {
        match shared.guard {
            Some(end) => rule::guarded_in_call(self.started, end),
            None => crate::exit::catching_context_in_call(),
        }
    }
}

impl<S, H, R, M, ReqBody, ResBody> Service<Request<ReqBody>> for ExitStack<S, H, R, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: AsError<M> + 'static,
    H: ResponseForPanic + Send + Sync + 'static,
    R: Reporter,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, H, R, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let result = ready!(self.inner.poll_ready(cx));
        if let Err(err) = &result {
            report_error(&*self.shared.reporter, self.shared.exits, err);
        }
        Poll::Ready(result)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let request = Requested::of(&req);
        let guarded = Guarded::start(&self.shared);
        let inner = &mut self.inner;
        let outer = enter_in_call(guarded.context_in_call(&self.shared));
        let mut called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave_call(outer);
        if let Some(end) = self.shared.guard {
            rule::after_call(guarded.started, end, &mut called);
        }
        let state = match called {
            Ok(future) => State::Running { future },
            Err(payload) => {
                caught_unwind(&self.shared, &request, &payload);
                State::Answered {
                    payload: Some(payload),
                }
            }
        };
        ResponseFuture {
            state,
            shared: Some(self.shared.clone()),
            request,
            guarded,
            _error: PhantomData,
        }
    }
}

/// What the inner future came to when it is not a response without
/// extensions (that one, the common case, is passed on inline): a response
/// that may be an exit's own (`IntoResponse for Exit`), or an error.
#[cold]
#[inline(never)]
fn settle<H: Send + Sync + 'static, R: Reporter, B, E: AsError<M> + 'static, M>(
    shared: Arc<Shared<H, R>>,
    request: &Requested,
    result: Result<Response<B>, E>,
) -> Result<Response<ResponseBody<B>>, E> {
    match result {
        Ok(mut res) => match take_exit_response(&mut res) {
            None => {
                let sink = Sink::Shared(shared);
                let grpc = request.grpc.is_some();
                Ok(res.map(|body| ResponseBody::supervised(body, sink, grpc)))
            }
            // An exit returned as a response: recorded like a raised one.
            Some(exit) => {
                caught(&shared.supervisor, &exit, request);
                Ok(exit_response(request, exit))
            }
        },
        Err(err) => {
            report_error(&*shared.reporter, shared.exits, &err);
            match Exit::from_service_error(&err) {
                None => Err(err),
                Some(exit) => {
                    caught(&shared.supervisor, exit, request);
                    Ok(exit_response(request, exit.clone()))
                }
            }
        }
    }
}

/// An unwind out of the inner service: reported if it is a failure (or an
/// exit the policy reports); an exit is recorded.
#[cold]
#[inline(never)]
fn caught_unwind<H, R: Reporter>(
    shared: &Shared<H, R>,
    request: &Requested,
    payload: &Box<dyn std::any::Any + Send>,
) {
    report_panic(&*shared.reporter, shared.exits, payload);
    if let Some(exit) = Exit::from_panic(&**payload) {
        caught(&shared.supervisor, exit, request);
    }
}

/// The answer to a caught unwind: the boundary's `503` for an exit, `500`
/// (or the custom answer) for a real panic; gRPC's `UNAVAILABLE` and
/// `INTERNAL` for a gRPC call.
#[cold]
#[inline(never)]
fn answer_unwind<H: ResponseForPanic, R, B>(
    shared: &Shared<H, R>,
    request: &Requested,
    payload: Box<dyn std::any::Any + Send>,
) -> Response<ResponseBody<B>> {
    let exit = Exit::from_panic(&*payload);
    match (exit, request.grpc) {
        (Some(exit), _) => exit_response(request, exit.clone()),
        (None, None) => shared
            .handler
            .clone()
            .response_for_panic(payload)
            .map(ResponseBody::full),
        (None, Some(grpc)) => grpc
            .in_kind(shared.handler.clone().response_for_grpc_panic(payload))
            .map(ResponseBody::full),
    }
}

pin_project! {
    /// Response future of [`ExitStack`].
    pub struct ResponseFuture<F, H, R, M> {
        #[pin]
        state: State<F>,
        // Moved into the response's body when the response is ready.
        shared: Option<Arc<Shared<H, R>>>,
        request: Requested,
        guarded: Guarded,
        _error: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        // The unwind out of `call`, answered at the first poll (a payload,
        // not the answer: the future stays small).
        Answered { payload: Option<Box<dyn std::any::Any + Send>> },
    }
}

impl<F, H, R, M, B, E> Future for ResponseFuture<F, H, R, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: AsError<M> + 'static,
    H: ResponseForPanic + Send + Sync + 'static,
    R: Reporter,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let shared = &**this.shared.as_ref().expect("polled after completion");
        let future = match this.state.project() {
            StateProj::Running { future } => future,
            StateProj::Answered { payload } => {
                let payload = payload.take().expect("polled after completion");
                return Poll::Ready(Ok(answer_unwind(shared, this.request, payload)));
            }
        };
        let outer = enter(this.guarded.context(shared));
        let mut polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
        leave(outer);
        if let Some(end) = shared.guard {
            rule::after_poll(this.guarded.started, end, &mut polled);
        }
        match polled {
            // The happy path, kept small: the rest is out of line.
            Ok(Poll::Ready(Ok(res))) if res.extensions().is_empty() => {
                let sink = Sink::Shared(this.shared.take().expect("taken once, here"));
                let grpc = this.request.grpc.is_some();
                Poll::Ready(Ok(
                    res.map(|body| ResponseBody::supervised(body, sink, grpc))
                ))
            }
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => {
                let shared = this.shared.take().expect("taken once, here");
                Poll::Ready(settle(shared, this.request, result))
            }
            Err(payload) => {
                caught_unwind(shared, this.request, &payload);
                Poll::Ready(Ok(answer_unwind(shared, this.request, payload)))
            }
        }
    }
}
