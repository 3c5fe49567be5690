//! The exit-aware boundary: where an [`Exit`] stops travelling and becomes
//! the end of the server.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_exit::{ServiceBuilderExt, Supervisor};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let supervisor = Supervisor::new();
//! let svc = ServiceBuilder::new()
//!     .boundary(&supervisor)
//!     .catch_panic()
//!     .service_fn(|_: Request<()>| async {
//!         tower_exit::exit(3);
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
//!     });
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! supervisor.shutdown_signal().await; // resolves: the server should drain
//! assert_eq!(supervisor.exit().unwrap().code(), 3);
//! # }
//! ```
//!
//! A [`Supervisor`] belongs to one server. Its [`BoundaryLayer`], the
//! outermost layer of the stack, catches an `Exit` (as unwind or as `Err`),
//! answers that request with `503 Service Unavailable` and
//! `connection: close`, records the first exit and tells the server to drain:
//! [`Supervisor::shutdown_signal`] resolves, so a server built with graceful
//! shutdown stops accepting and finishes in-flight requests. `main` then
//! returns the recorded exit as its [`ExitCode`](std::process::ExitCode).
//!
//! Real failures pass through the boundary unchanged.

use crate::body::ResponseBody;
use crate::exit::{enter_catching, leave, AsError, ConcreteError};
use crate::Exit;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

/// Records the first [`Exit`] of a server and tells the server to stop.
///
/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Supervisor {
    // `watch` keeps the value for late subscribers: a `shutdown_signal()`
    // taken after the exit was recorded resolves at once.
    exit: Arc<watch::Sender<Option<Exit>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("exit", &self.exit())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor with no exit recorded.
    pub fn new() -> Self {
        Supervisor {
            exit: Arc::new(watch::Sender::new(None)),
        }
    }

    /// The boundary layer that reports exits to this supervisor; put it
    /// outermost.
    pub fn layer<M>(&self) -> BoundaryLayer<M> {
        BoundaryLayer {
            supervisor: self.clone(),
            _error: PhantomData,
        }
    }

    /// Records `exit` unless one is already recorded, and wakes every
    /// [`shutdown_signal`](Self::shutdown_signal) and [`wait`](Self::wait).
    /// Returns whether this exit was the first.
    ///
    /// Servers call this on SIGTERM/SIGINT with [`Exit::success`].
    pub fn trigger(&self, exit: Exit) -> bool {
        self.exit.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(exit);
            true
        })
    }

    /// The first recorded exit, if any.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Resolves to the first exit (at once if one is recorded already).
    pub fn wait(&self) -> impl Future<Output = Exit> + Send + 'static {
        let supervisor = self.clone();
        async move {
            let mut rx = supervisor.exit.subscribe();
            // The sender lives in `supervisor`, held by this future, so the
            // channel cannot close while we wait.
            let exit = rx
                .wait_for(Option::is_some)
                .await
                .expect("sender is held by this future");
            exit.clone().expect("waited for Some")
        }
    }

    /// Resolves once an exit is recorded: the signal a server's graceful
    /// shutdown waits for (`axum::serve(..).with_graceful_shutdown(..)`,
    /// hyper-util's `GracefulShutdown`).
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let wait = self.wait();
        async move {
            let _first_exit = wait.await;
        }
    }
}

/// Layer that turns an [`Exit`] into the end of the server; see [the module
/// docs](self). Built by [`Supervisor::layer`].
pub struct BoundaryLayer<M = ConcreteError> {
    supervisor: Supervisor,
    _error: PhantomData<fn() -> M>,
}

impl<M> Clone for BoundaryLayer<M> {
    fn clone(&self) -> Self {
        self.supervisor.layer()
    }
}

impl<M> fmt::Debug for BoundaryLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundaryLayer")
            .field("supervisor", &self.supervisor)
            .finish()
    }
}

impl<S, M> Layer<S> for BoundaryLayer<M> {
    type Service = Boundary<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Boundary::new(inner, &self.supervisor)
    }
}

/// Service built by [`BoundaryLayer`].
pub struct Boundary<S, M = ConcreteError> {
    inner: S,
    supervisor: Supervisor,
    _error: PhantomData<fn() -> M>,
}

impl<S, M> Boundary<S, M> {
    /// The boundary of `supervisor` around `inner`.
    pub fn new(inner: S, supervisor: &Supervisor) -> Self {
        Boundary {
            inner,
            supervisor: supervisor.clone(),
            _error: PhantomData,
        }
    }
}

inner_accessors!(Boundary<S, M>, inner);

impl<S: Clone, M> Clone for Boundary<S, M> {
    fn clone(&self) -> Self {
        Boundary {
            inner: self.inner.clone(),
            supervisor: self.supervisor.clone(),
            _error: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Boundary<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Boundary")
            .field("inner", &self.inner)
            .field("supervisor", &self.supervisor)
            .finish()
    }
}

impl<S, M, ReqBody, ResBody> Service<Request<ReqBody>> for Boundary<S, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: AsError<M>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let request = Requested::of(&req);
        let inner = &mut self.inner;
        let outer = enter_catching();
        let called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave(outer);
        let state = match called {
            Ok(future) => State::Running { future },
            Err(payload) => match Exit::from_panic(&*payload) {
                Some(exit) => {
                    caught(&self.supervisor, exit, &request);
                    State::Exited {
                        exit: Some(exit.clone()),
                    }
                }
                None => resume_unwind(payload),
            },
        };
        ResponseFuture {
            state,
            supervisor: self.supervisor.clone(),
            request,
            _error: PhantomData,
        }
    }
}

pin_project! {
    /// Response future of [`Boundary`].
    pub struct ResponseFuture<F, M> {
        #[pin]
        state: State<F>,
        supervisor: Supervisor,
        request: Requested,
        _error: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        Exited { exit: Option<Exit> },
    }
}

impl<F, M, B, E> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: AsError<M>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let exit = match this.state.project() {
            StateProj::Running { future } => {
                let outer = enter_catching();
                let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
                leave(outer);
                match ready!(classify(polled, |err| Exit::from_service_error(err))) {
                    Polled::Response(res) => return Poll::Ready(Ok(res.map(ResponseBody::inner))),
                    Polled::Error(err) => return Poll::Ready(Err(err)),
                    Polled::Exit(exit) => exit,
                }
            }
            StateProj::Exited { exit } => {
                let exit = exit.take().expect("polled after completion");
                return Poll::Ready(Ok(exit_response(this.request.version, exit)));
            }
        };
        caught(this.supervisor, &exit, this.request);
        Poll::Ready(Ok(exit_response(this.request.version, exit)))
    }
}

/// What a poll of an inner future under `catch_unwind` came to, for a frame
/// that answers exits (the boundary, and a server for an exit that escaped
/// its service).
pub(crate) enum Polled<B, E> {
    /// A response to pass on.
    Response(Response<B>),
    /// An error that carries no exit, to pass on.
    Error(E),
    /// An exit: raised, returned as `Err` (anywhere in the error's chain,
    /// as `exit_in` finds it), or returned as a response (`IntoResponse for
    /// Exit`: the abort-safe channel).
    Exit(Exit),
}

/// Tells an exit apart from everything else in one caught poll; a real
/// panic unwinds on.
#[inline]
pub(crate) fn classify<B, E>(
    polled: std::thread::Result<Poll<Result<Response<B>, E>>>,
    exit_in: impl FnOnce(&E) -> Option<&Exit>,
) -> Poll<Polled<B, E>> {
    Poll::Ready(match polled {
        Ok(poll) => match ready!(poll) {
            Ok(mut res) => match take_exit_response(&mut res) {
                Some(exit) => Polled::Exit(exit),
                None => Polled::Response(res),
            },
            Err(err) => match exit_in(&err) {
                Some(exit) => Polled::Exit(exit.clone()),
                None => Polled::Error(err),
            },
        },
        Err(payload) => match Exit::from_panic(&*payload) {
            Some(exit) => Polled::Exit(exit.clone()),
            None => resume_unwind(payload),
        },
    })
}

/// What the boundary keeps of a request, to answer and log an exit.
///
/// Only the path is kept of the URI (one reference count on the request's
/// buffer): a whole `Uri` clone cost about 20 ns a request in
/// `benches/layers.rs`.
#[derive(Debug)]
pub(crate) struct Requested {
    pub(crate) version: Version,
    method: Method,
    path: Option<PathAndQuery>,
}

impl Requested {
    #[inline(always)]
    pub(crate) fn of<B>(req: &Request<B>) -> Self {
        Requested {
            version: req.version(),
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
        }
    }
}

/// The exit in a response, if it is an exit's own (`IntoResponse for Exit`),
/// taken out. A response with no extensions at all (the common case) is
/// told apart without a call: `Extensions::remove` is not inlined, and cost
/// the one-layer stack about 5 ns a request in `benches/layers.rs`.
#[inline(always)]
pub(crate) fn take_exit_response<B>(res: &mut Response<B>) -> Option<Exit> {
    if res.extensions().is_empty() {
        return None;
    }
    res.extensions_mut()
        .remove::<ExitResponse>()
        .map(|ExitResponse(exit)| exit)
}

/// An exit turned into a response on its way out (`IntoResponse for Exit`
/// under the `axum` feature): the boundary, or a server when there is none,
/// records it as if it had been raised.
#[derive(Clone, Debug)]
pub(crate) struct ExitResponse(pub(crate) Exit);

/// The boundary caught `exit`: said once, here (INFO for status 0, WARN
/// otherwise), then recorded.
pub(crate) fn caught(supervisor: &Supervisor, exit: &Exit, request: &Requested) {
    // An armed exit in a forked child ends the child here, before the log
    // line allocates; otherwise the exit is said, then recorded.
    exit.end_if_armed();
    let first = supervisor.exit().is_none();
    let method = &request.method;
    let path = request.path.as_ref().map_or("/", PathAndQuery::path);
    if exit.is_success() {
        tracing::info!(exit.code = exit.code(), exit.message = exit.message(), %method, path, first, "exit: the server drains");
    } else {
        tracing::warn!(exit.code = exit.code(), exit.message = exit.message(), %method, path, first, "exit: the server drains");
    }
    supervisor.trigger(exit.clone());
}

/// `503`, and `connection: close` where HTTP/1 has it (HTTP/2 forbids the
/// header; the server's graceful shutdown sends GOAWAY there). The exit
/// rides in the response's extensions, so that layers outside can tell an
/// intended exit from a real `503` (`res.extensions().get::<Exit>()`).
pub(crate) fn exit_response<B>(version: Version, exit: Exit) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::full(Bytes::from_static(
        b"Service Unavailable\n",
    )));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if version <= Version::HTTP_11 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res.extensions_mut().insert(exit);
    res
}
