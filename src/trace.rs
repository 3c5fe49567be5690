//! tower-http's `TraceLayer` that does not log an intended exit as a
//! failure (feature `tower-http`).
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_exit::{ServiceBuilderExt, Supervisor};
//!
//! let supervisor = Supervisor::new();
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(tower_exit::trace::layer()) // outermost: sees every answer
//!             .boundary(&supervisor)
//!             .catch_panic(),
//!     );
//! ```
//!
//! The [`BoundaryLayer`](crate::BoundaryLayer) answers an exit with a `503`
//! that carries the [`Exit`] in its extensions. tower-http's default
//! classifier ([`ServerErrorsAsFailures`]) counts every 5xx as a failure, so
//! `TraceLayer` logs an intended restart at ERROR. [`ExitAwareClassifier`]
//! is the same classifier except that such a response is a success: the
//! request's completion is logged as usual, without the failure.
//!
//! Put `TraceLayer` **outside** the boundary: inside it, an exit or a panic
//! unwinds through `TraceLayer`, which then logs no completion at all.
//!
//! For gRPC, [`grpc_layer`] is `TraceLayer::new_for_grpc()` with the
//! [`GrpcExitAwareClassifier`]: tower-http's [`GrpcErrorsAsFailures`]
//! (which reads `grpc-status`), except that the exit's `UNAVAILABLE` is not
//! a failure. A real `INTERNAL` (a panic), an application's error status,
//! and a stream ended by the drain's last call (`UNAVAILABLE` in its
//! trailers: the stream was cut) still are.
//!
//! ```
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_exit::Supervisor;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let supervisor = Supervisor::new();
//! // As `tonic::transport::Server::builder().layer(..)` takes them: trace
//! // outermost, then the exit-aware stack.
//! let grpc_service = service_fn(|_: Request<String>| async {
//!     Ok::<_, Infallible>(Response::new(String::new()))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(tower_exit::trace::grpc_layer())
//!     .layer(supervisor.stack())
//!     .service(grpc_service);
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert!(res.status().is_success());
//! # }
//! ```

use crate::Exit;
use http::Response;
use std::fmt;
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, GrpcErrorsAsFailures, ServerErrorsAsFailures,
    SharedClassifier,
};
use tower_http::trace::TraceLayer;

/// A tower-http classifier `C`, except that a response carrying an
/// [`Exit`] (the exit-aware layers' answer to an exit: `503`, or a gRPC
/// call's `UNAVAILABLE`) is not a failure. Everything else, end of stream
/// included, is `C`'s to classify.
#[derive(Clone, Debug, Default)]
pub struct ExitAware<C> {
    inner: C,
}

/// [`ServerErrorsAsFailures`], except that the boundary's `503` for an
/// exit is not a failure.
pub type ExitAwareClassifier = ExitAware<ServerErrorsAsFailures>;

/// [`GrpcErrorsAsFailures`], except that the `UNAVAILABLE` the exit-aware
/// layers answer a gRPC call's exit with is not a failure (a stream ended
/// by the drain still is: it was cut).
pub type GrpcExitAwareClassifier = ExitAware<GrpcErrorsAsFailures>;

impl<C: ClassifyResponse + Clone + Default + Send + 'static> ExitAware<C> {
    /// The classifier, over `C`'s default.
    pub fn new() -> Self {
        ExitAware::default()
    }

    /// As a `MakeClassifier`, for [`TraceLayer::new`].
    pub fn make_classifier() -> SharedClassifier<Self> {
        SharedClassifier::new(Self::new())
    }
}

impl<C> ExitAware<C> {
    /// Over a configured classifier
    /// (`GrpcErrorsAsFailures::new().with_success(..)`).
    pub fn wrap(inner: C) -> Self {
        ExitAware { inner }
    }
}

impl<C: ClassifyResponse> ClassifyResponse for ExitAware<C> {
    type FailureClass = C::FailureClass;
    type ClassifyEos = C::ClassifyEos;

    fn classify_response<B>(
        self,
        res: &Response<B>,
    ) -> ClassifiedResponse<Self::FailureClass, Self::ClassifyEos> {
        if res.extensions().get::<Exit>().is_some() {
            return ClassifiedResponse::Ready(Ok(()));
        }
        self.inner.classify_response(res)
    }

    fn classify_error<E>(self, error: &E) -> Self::FailureClass
    where
        E: fmt::Display + 'static,
    {
        self.inner.classify_error(error)
    }
}

/// `TraceLayer::new_for_http()` with the [`ExitAwareClassifier`].
pub fn layer() -> TraceLayer<SharedClassifier<ExitAwareClassifier>> {
    TraceLayer::new(ExitAwareClassifier::make_classifier())
}

/// `TraceLayer::new_for_grpc()` with the [`GrpcExitAwareClassifier`].
pub fn grpc_layer() -> TraceLayer<SharedClassifier<GrpcExitAwareClassifier>> {
    TraceLayer::new(GrpcExitAwareClassifier::make_classifier())
}
