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

use crate::Exit;
use http::Response;
use std::fmt;
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
    ServerErrorsFailureClass, SharedClassifier,
};
use tower_http::trace::TraceLayer;

/// [`ServerErrorsAsFailures`], except that a response carrying an [`Exit`]
/// (the boundary's `503`) is not a failure.
#[derive(Clone, Debug, Default)]
pub struct ExitAwareClassifier {
    inner: ServerErrorsAsFailures,
}

impl ExitAwareClassifier {
    /// The classifier.
    pub fn new() -> Self {
        ExitAwareClassifier::default()
    }

    /// As a `MakeClassifier`, for [`TraceLayer::new`].
    pub fn make_classifier() -> SharedClassifier<Self> {
        SharedClassifier::new(Self::new())
    }
}

impl ClassifyResponse for ExitAwareClassifier {
    type FailureClass = ServerErrorsFailureClass;
    type ClassifyEos = NeverClassifyEos<ServerErrorsFailureClass>;

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
