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

use crate::body::{ResponseBody, Sink};
use crate::catch::{caught, classify, exit_response, Polled, Requested};
use crate::exit::{
    enter_catching, enter_catching_in_call, leave, leave_call, AsError, ConcreteError, Exit,
};
use crate::supervisor::Supervisor;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Layer that turns an [`Exit`] into the end of the server; see [the module
/// docs](self). Built by [`Supervisor::layer`].
pub struct BoundaryLayer<M = ConcreteError> {
    supervisor: Supervisor,
    _error: PhantomData<fn() -> M>,
}

impl<M> BoundaryLayer<M> {
    pub(crate) fn new(supervisor: &Supervisor) -> Self {
        BoundaryLayer {
            supervisor: supervisor.clone(),
            _error: PhantomData,
        }
    }
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
        let outer = enter_catching_in_call();
        let called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave_call(outer);
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
            supervisor: Some(self.supervisor.clone()),
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
        // Moved into the response's body when the response is ready.
        supervisor: Option<Supervisor>,
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
                    Polled::Response(res) => {
                        let supervisor = this.supervisor.take().expect("polled after completion");
                        let sink = Sink::Supervisor(supervisor);
                        let grpc = this.request.grpc.is_some();
                        return Poll::Ready(Ok(
                            res.map(|body| ResponseBody::supervised(body, sink, grpc))
                        ));
                    }
                    Polled::Error(err) => return Poll::Ready(Err(err)),
                    Polled::Exit(exit) => exit,
                }
            }
            StateProj::Exited { exit } => {
                let exit = exit.take().expect("polled after completion");
                return Poll::Ready(Ok(exit_response(this.request, exit)));
            }
        };
        let supervisor = this.supervisor.as_ref().expect("polled after completion");
        caught(supervisor, &exit, this.request);
        Poll::Ready(Ok(exit_response(this.request, exit)))
    }
}
