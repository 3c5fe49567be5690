//! Turn a panic in an `http` service into a `500` response, and let an
//! [`Exit`] unwind on untouched.
//!
//! tower-http's `CatchPanicLayer` answers *every* unwind with a `500`,
//! including an [`exit`](fn@crate::exit): the intended end of the work becomes
//! an error page and nobody above learns that the program wanted to exit.
//! This layer catches real panics only; an unwinding `Exit` continues with
//! the same payload, for a [`BoundaryLayer`](crate::BoundaryLayer) above to
//! answer.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_exit::ServiceBuilderExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! async fn handle(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     panic!("bug")
//! }
//!
//! let svc = ServiceBuilder::new().catch_panic().service_fn(handle);
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
//!
//! // An exit is not a panic: it keeps unwinding.
//! let svc = ServiceBuilder::new()
//!     .catch_panic()
//!     .service_fn(|_: Request<()>| async { tower_exit::exit(3); Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) });
//! let unwound = tokio::spawn(svc.oneshot(Request::new(()))).await.unwrap_err();
//! assert_eq!(tower_exit::exit::classify_join(unwound).exit().map(|e| e.code()), Some(3));
//! # }
//! ```

use crate::body::ResponseBody;
use crate::grpc::Grpc;
use crate::Exit;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Builds the response for a real panic (never called for an `Exit`).
pub trait ResponseForPanic: Clone {
    /// The response for a panic with this payload.
    fn response_for_panic(&mut self, payload: Box<dyn Any + Send>) -> Response<Bytes>;

    /// The response for a panic in a gRPC call (a `POST` whose
    /// `content-type` is `application/grpc*`), whose client reads only
    /// `grpc-status`: by default a trailers-only `INTERNAL` (HTTP `200`,
    /// `grpc-status: 13`, nothing of the panic said). A response with
    /// `content-type: application/grpc` is sent to a gRPC-Web call as
    /// `application/grpc-web+proto`.
    fn response_for_grpc_panic(&mut self, payload: Box<dyn Any + Send>) -> Response<Bytes> {
        drop(payload);
        crate::grpc::panic_response()
    }
}

impl<F> ResponseForPanic for F
where
    F: FnMut(Box<dyn Any + Send>) -> Response<Bytes> + Clone,
{
    fn response_for_panic(&mut self, payload: Box<dyn Any + Send>) -> Response<Bytes> {
        self(payload)
    }
}

/// The default answer to a panic: `500 Internal Server Error`, a short
/// plain-text body, nothing about the panic itself (the panic hook has
/// already printed it, and a [`ReportLayer`](crate::ReportLayer) reports it);
/// for a gRPC call, `grpc-status: 13` (`INTERNAL`).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultResponseForPanic;

impl ResponseForPanic for DefaultResponseForPanic {
    fn response_for_panic(&mut self, _payload: Box<dyn Any + Send>) -> Response<Bytes> {
        let mut res = Response::new(Bytes::from_static(b"Internal Server Error\n"));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }
}

/// Layer that answers real panics with a `500` and lets an `Exit` unwind on.
/// See [the module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer<H = DefaultResponseForPanic> {
    handler: H,
}

impl CatchPanicLayer {
    /// Answers panics with [`DefaultResponseForPanic`].
    pub fn new() -> Self {
        CatchPanicLayer {
            handler: DefaultResponseForPanic,
        }
    }
}

impl<H: ResponseForPanic> CatchPanicLayer<H> {
    /// Answers panics with `handler`, a [`ResponseForPanic`] such as a
    /// closure `FnMut(Box<dyn Any + Send>) -> Response<Bytes> + Clone`.
    pub fn custom(handler: H) -> Self {
        CatchPanicLayer { handler }
    }
}

impl<S, H: Clone> Layer<S> for CatchPanicLayer<H> {
    type Service = CatchPanic<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic::custom(inner, self.handler.clone())
    }
}

/// Service built by [`CatchPanicLayer`].
#[derive(Clone, Copy, Debug)]
pub struct CatchPanic<S, H = DefaultResponseForPanic> {
    inner: S,
    handler: H,
}

impl<S> CatchPanic<S> {
    /// Catches the panics of `inner`, answered `500`.
    pub fn new(inner: S) -> Self {
        CatchPanic::custom(inner, DefaultResponseForPanic)
    }
}

impl<S, H> CatchPanic<S, H> {
    /// Catches the panics of `inner`, answered by `handler`.
    pub fn custom(inner: S, handler: H) -> Self {
        CatchPanic { inner, handler }
    }
}

inner_accessors!(CatchPanic<S, H>, inner);

impl<S, H, ReqBody, ResBody> Service<Request<ReqBody>> for CatchPanic<S, H>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    H: ResponseForPanic,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let grpc = Grpc::of(&req);
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => ResponseFuture {
                state: State::Running {
                    future,
                    handler: Some(self.handler.clone()),
                    grpc,
                },
            },
            Err(payload) => ResponseFuture {
                state: State::Panicked {
                    response: Some(answer_panic(self.handler.clone(), grpc, payload)),
                },
            },
        }
    }
}

/// An `Exit` continues unwinding with its own payload; anything else is
/// answered by `handler` (in gRPC's form for a gRPC call).
fn answer_panic<H: ResponseForPanic>(
    mut handler: H,
    grpc: Option<Grpc>,
    payload: Box<dyn Any + Send>,
) -> Response<Bytes> {
    if Exit::from_panic(&*payload).is_some() {
        resume_unwind(payload);
    }
    match grpc {
        None => handler.response_for_panic(payload),
        Some(grpc) => grpc.in_kind(handler.response_for_grpc_panic(payload)),
    }
}

pin_project! {
    /// Response future of [`CatchPanic`].
    pub struct ResponseFuture<F, H> {
        #[pin]
        state: State<F, H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, H> {
        Running { #[pin] future: F, handler: Option<H>, grpc: Option<Grpc> },
        Panicked { response: Option<Response<Bytes>> },
    }
}

impl<F, H, B, E> Future for ResponseFuture<F, H>
where
    F: Future<Output = Result<Response<B>, E>>,
    H: ResponseForPanic,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running {
                future,
                handler,
                grpc,
            } => {
                let result = match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(poll) => ready!(poll).map(|res| res.map(ResponseBody::inner)),
                    Err(payload) => {
                        let handler = handler.take().expect("polled after completion");
                        Ok(answer_panic(handler, *grpc, payload).map(ResponseBody::full))
                    }
                };
                Poll::Ready(result)
            }
            StateProj::Panicked { response } => Poll::Ready(Ok(response
                .take()
                .expect("polled after completion")
                .map(ResponseBody::full))),
        }
    }
}
