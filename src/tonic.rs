//! gRPC health that follows the drain (feature `tonic`).
//!
//! Kubernetes' gRPC probes, Envoy and gRPC's own health-checking clients ask
//! the standard health service (`grpc.health.v1.Health`) whether to send
//! traffic. [`health_reporter`] gives `tonic-health`'s reporter and service,
//! with one difference: from the moment the [`Supervisor`] records an exit
//! (an `exit`, SIGTERM, the first moment of a shutdown delay) every
//! service answers `NOT_SERVING`, to `Check` and on every open `Watch`,
//! whatever the application set before or sets after. Probes and load
//! balancers stop sending before the connections close; the drain then
//! runs as usual. It follows [`Supervisor::ready`], as the HTTP
//! [readiness](Supervisor::readiness) probe does.
//!
//! ```no_run
//! # async fn run(listener: tokio::net::TcpListener, demo: tonic_health::pb::health_server::HealthServer<tower_exit::tonic::DrainingHealth>) -> std::io::Result<()> {
//! use tower_exit::Supervisor;
//!
//! let supervisor = Supervisor::new();
//! let (health, health_service) = tower_exit::tonic::health_reporter(&supervisor);
//! health.set_service_status("demo.Demo", tonic_health::ServingStatus::Serving).await;
//! let exit = tower_exit::serve::graceful(&supervisor, |shutdown| {
//!     tonic::transport::Server::builder()
//!         .layer(supervisor.stack())
//!         .add_service(health_service)
//!         .serve_with_incoming_shutdown(
//!             tonic::transport::server::TcpIncoming::from(listener),
//!             shutdown,
//!         )
//! })
//! .with_signals()
//! .await?;
//! # Ok(()) }
//! ```
//!
//! An application that builds its own `HealthReporter` wraps the service
//! of that reporter: `HealthServer::new(DrainingHealth::new(
//! HealthService::from_health_reporter(reporter), &supervisor))`.
//!
//! Answers to the calls themselves (an exit answers `UNAVAILABLE`, a panic
//! `INTERNAL`) need no feature: the boundary, the one-layer stack and the
//! servers answer any request whose `content-type` is `application/grpc*`
//! in gRPC's form.

use crate::Supervisor;
use futures_util::Stream;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// `tonic_health::server::health_reporter()`, with the service's answers
/// following `supervisor`: every service `NOT_SERVING` from the first
/// moment of its drain. See [the module docs](self).
pub fn health_reporter(supervisor: &Supervisor) -> (HealthReporter, HealthServer<DrainingHealth>) {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(DrainingHealth::new(service, supervisor)),
    )
}

/// `tonic-health`'s service, answering `NOT_SERVING` for every service it
/// knows once the supervisor drains. Unknown services stay `NOT_FOUND`.
#[derive(Debug)]
pub struct DrainingHealth {
    inner: HealthService,
    supervisor: Supervisor,
}

impl DrainingHealth {
    /// Wraps `inner` (`HealthService::from_health_reporter(reporter)`).
    pub fn new(inner: HealthService, supervisor: &Supervisor) -> Self {
        DrainingHealth {
            inner,
            supervisor: supervisor.clone(),
        }
    }
}

const NOT_SERVING: HealthCheckResponse = HealthCheckResponse {
    status: ServingStatus::NotServing as i32,
};

#[::tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: ::tonic::Request<HealthCheckRequest>,
    ) -> Result<::tonic::Response<HealthCheckResponse>, ::tonic::Status> {
        let mut answer = self.inner.check(request).await?;
        if !self.supervisor.ready() {
            *answer.get_mut() = NOT_SERVING;
        }
        Ok(answer)
    }

    type WatchStream = DrainingWatch;

    async fn watch(
        &self,
        request: ::tonic::Request<HealthCheckRequest>,
    ) -> Result<::tonic::Response<DrainingWatch>, ::tonic::Status> {
        let supervisor = self.supervisor.clone();
        let answer = self.inner.watch(request).await?;
        Ok(answer.map(|inner| DrainingWatch {
            inner: Box::pin(inner),
            drain: Some(Box::pin(supervisor.shutdown_signal())),
        }))
    }
}

type WatchStream = <HealthService as Health>::WatchStream;

/// The stream of a `Watch` call under [`DrainingHealth`]: the service's
/// statuses until the drain starts, then one `NOT_SERVING`, and nothing
/// more (the call stays open until the server closes it, as the protocol
/// asks: a `Watch` that ended would be retried).
pub struct DrainingWatch {
    inner: Pin<Box<WatchStream>>,
    /// `None` once the drain started and `NOT_SERVING` was sent.
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for DrainingWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainingWatch")
            .field("draining", &self.drain.is_none())
            .finish_non_exhaustive()
    }
}

impl Stream for DrainingWatch {
    type Item = Result<HealthCheckResponse, ::tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(drain) = &mut this.drain {
            if drain.as_mut().poll(cx).is_ready() {
                this.drain = None;
                return Poll::Ready(Some(Ok(NOT_SERVING)));
            }
            return this.inner.as_mut().poll_next(cx);
        }
        // Draining: what the application sets now is not said; the call
        // ends only if the service's status is cleared.
        loop {
            match std::task::ready!(this.inner.as_mut().poll_next(cx)) {
                Some(_) => continue,
                None => return Poll::Ready(None),
            }
        }
    }
}
