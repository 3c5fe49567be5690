//! [`ServiceBuilderExt`]: one short method per layer of this crate.

use crate::report::Reporter;
use crate::{BoundaryLayer, CatchPanicLayer, ReportLayer, Supervisor};
use tower::layer::util::Stack;
use tower::ServiceBuilder;

/// Adds this crate's layers to [`tower::ServiceBuilder`].
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use tower::{BoxError, ServiceBuilder, ServiceExt};
/// use tower_exit::{report::TracingReporter, ServiceBuilderExt, Supervisor};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let supervisor = Supervisor::new();
/// let svc = ServiceBuilder::new()
///     .boundary(&supervisor) // outermost: turns an exit into the end of the server
///     .catch_panic() // a panic becomes a 500, an exit unwinds on
///     .report(TracingReporter) // reports real failures, never an exit
///     .fork_guard() // a child forked below never returns into this stack
///     .service_fn(|_: Request<String>| async {
///         Ok::<_, BoxError>(Response::new(String::from("hello")))
///     });
/// let res = svc.oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(res.status(), StatusCode::OK);
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a [`BoundaryLayer`] that records exits in `supervisor`.
    fn boundary<M>(self, supervisor: &Supervisor) -> ServiceBuilder<Stack<BoundaryLayer<M>, L>>;

    /// Adds a [`ReportLayer`] reporting through `reporter`.
    fn report<R: Reporter, M>(self, reporter: R) -> ServiceBuilder<Stack<ReportLayer<R, M>, L>>;

    /// Adds a [`CatchPanicLayer`] with the default `500` answer.
    fn catch_panic(self) -> ServiceBuilder<Stack<CatchPanicLayer, L>>;

    /// Adds a [`ForkGuardLayer`](crate::ForkGuardLayer) with its defaults.
    #[cfg(all(unix, feature = "fork"))]
    fn fork_guard<M>(self) -> ServiceBuilder<Stack<crate::ForkGuardLayer<M>, L>>;

    /// Adds `foreign` wrapped in a [`TunnelLayer`](crate::TunnelLayer), so
    /// that it never sees an exit.
    fn tunnel<F, M>(self, foreign: F) -> ServiceBuilder<Stack<crate::TunnelLayer<F, M>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn boundary<M>(self, supervisor: &Supervisor) -> ServiceBuilder<Stack<BoundaryLayer<M>, L>> {
        self.layer(supervisor.layer())
    }

    fn report<R: Reporter, M>(self, reporter: R) -> ServiceBuilder<Stack<ReportLayer<R, M>, L>> {
        self.layer(ReportLayer::new(reporter))
    }

    fn catch_panic(self) -> ServiceBuilder<Stack<CatchPanicLayer, L>> {
        self.layer(CatchPanicLayer::new())
    }

    #[cfg(all(unix, feature = "fork"))]
    fn fork_guard<M>(self) -> ServiceBuilder<Stack<crate::ForkGuardLayer<M>, L>> {
        self.layer(crate::ForkGuardLayer::new())
    }

    fn tunnel<F, M>(self, foreign: F) -> ServiceBuilder<Stack<crate::TunnelLayer<F, M>, L>> {
        self.layer(crate::TunnelLayer::new(foreign))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
