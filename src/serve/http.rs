//! Serve a tower service over HTTP/1 and HTTP/2 (hyper), until the first
//! [`Exit`].
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tower::ServiceBuilder;
//! use tower_exit::{ServiceBuilderExt, Supervisor};
//!
//! # async fn handler(_: http::Request<hyper::body::Incoming>) -> Result<http::Response<String>, std::convert::Infallible> { todo!() }
//! #[tokio::main]
//! async fn main() -> std::io::Result<ExitCode> {
//!     let supervisor = Supervisor::new();
//!     let svc = ServiceBuilder::new()
//!         .boundary(&supervisor)
//!         .catch_panic()
//!         .service_fn(handler);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let exit = tower_exit::serve::http(listener, svc, &supervisor)
//!         .with_signals()
//!         .await?;
//!     Ok(exit.into())
//! }
//! ```

use super::listen::Listener;
use super::ServeService;
use crate::{Exit, Supervisor};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::task::JoinSet;
use tower_service::Service;

/// Default time in-flight requests get to finish once the server drains.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Serves `service` on `listener` (TCP or unix) until `supervisor` records
/// an exit; see [`Serve`].
pub fn http<S>(listener: impl Into<Listener>, service: S, supervisor: &Supervisor) -> Serve<S> {
    Serve {
        listener: listener.into(),
        service,
        supervisor: supervisor.clone(),
        grace: DEFAULT_GRACE,
        signals: false,
    }
}

/// An HTTP server that ends with the first [`Exit`]. Await it.
///
/// On the first exit (recorded by the [`BoundaryLayer`](crate::BoundaryLayer)
/// or by [`Supervisor::trigger`]) the server stops accepting and drains:
/// on HTTP/1 every response carries `connection: close` and an idle
/// keep-alive connection is closed after 1 s without a new request (so a
/// request a client already sent is answered, not dropped); on HTTP/2 it
/// sends GOAWAY. In-flight requests finish within the
/// [grace period](Self::grace); then the server resolves to that exit.
#[derive(Debug)]
#[must_use = "a server does nothing until awaited"]
pub struct Serve<S> {
    listener: Listener,
    service: S,
    supervisor: Supervisor,
    grace: Duration,
    signals: bool,
}

impl<S> Serve<S> {
    /// How long in-flight requests may run once draining starts (default
    /// 30 s). Connections still open after it are dropped.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Also drain on SIGTERM and SIGINT, which count as [`Exit::success`].
    ///
    /// This installs tokio's signal handlers for the rest of the process.
    pub fn with_signals(mut self) -> Self {
        self.signals = true;
        self
    }
}

impl<S> IntoFuture for Serve<S>
where
    S: ServeService<Incoming>,
{
    type Output = io::Result<Exit>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<Exit>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<S> Serve<S> {
    async fn run(self) -> io::Result<Exit>
    where
        S: ServeService<Incoming>,
    {
        let Serve {
            listener,
            service,
            supervisor,
            grace,
            signals,
        } = self;
        if signals {
            super::drain_on_signals(&supervisor)?;
        }
        // Rule 3: an exit escaping the service ends the server, not just
        // the connection (see `escape`).
        let service = super::escape::Escapes::new(service, &supervisor);
        let builder = auto::Builder::new(TokioExecutor::new());
        let mut connections = JoinSet::new();
        let draining = Arc::new(AtomicBool::new(false));
        let shutdown = supervisor.shutdown_signal();
        tokio::pin!(shutdown);

        loop {
            let Some((stream, peer)) = super::accept_until(&listener, shutdown.as_mut()).await
            else {
                break;
            };
            while connections.try_join_next().is_some() {}
            let http2 = Arc::new(AtomicBool::new(false));
            let svc = DrainAware {
                inner: service.clone(),
                draining: draining.clone(),
                http2: http2.clone(),
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
                .into_owned();
            let drain = supervisor.shutdown_signal();
            connections.spawn(async move {
                // Serve. Once draining starts, an HTTP/1 connection is left
                // to end by itself: its next response carries `connection:
                // close` (see `DrainAware`), so a request a client already
                // sent on an idle keep-alive or a just-accepted connection is
                // answered, not dropped. After NEXT_REQUEST_WAIT (or at once
                // for HTTP/2, whose GOAWAY clients handle) it is shut down
                // gracefully: a request in flight still finishes.
                tokio::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => Some(result),
                    () = drain => None,
                };
                let result = match result {
                    Some(result) => result,
                    None => {
                        let by_itself = if http2.load(Ordering::Acquire) {
                            None
                        } else {
                            tokio::time::timeout(NEXT_REQUEST_WAIT, conn.as_mut())
                                .await
                                .ok()
                        };
                        match by_itself {
                            Some(result) => result,
                            None => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        }
                    }
                };
                if let Err(err) = result {
                    tracing::debug!(%peer, err = %err, "connection ended with an error");
                }
            });
        }
        draining.store(true, Ordering::Release);
        drop(listener);

        Ok(super::drain(connections, grace, &supervisor).await)
    }
}

/// How long an HTTP/1 connection may stay open once draining starts, for a
/// request its client may already have sent; then it is shut down.
const NEXT_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Marks responses `connection: close` (HTTP/1) once the server drains, so
/// that keep-alive clients stop sending on this connection, and tells the
/// connection task whether it speaks HTTP/2.
#[derive(Clone)]
struct DrainAware<S> {
    inner: S,
    draining: Arc<AtomicBool>,
    http2: Arc<AtomicBool>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DrainAware<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DrainAwareFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let http1 = req.version() <= http::Version::HTTP_11;
        if req.version() == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Release);
        }
        DrainAwareFuture {
            inner: self.inner.call(req),
            draining: http1.then(|| self.draining.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    struct DrainAwareFuture<F> {
        #[pin]
        inner: F,
        draining: Option<Arc<AtomicBool>>,
    }
}

impl<F, B, E> Future for DrainAwareFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let (Ok(res), Some(draining)) = (&mut result, this.draining) {
            if draining.load(Ordering::Acquire) {
                res.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
        }
        Poll::Ready(result)
    }
}
