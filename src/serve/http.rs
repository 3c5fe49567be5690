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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
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
        header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        max_connections: None,
    }
}

/// Default time a client has to send a request's whole header
/// (HTTP/1), counted from the connection's start or from the end of the
/// previous response: 30 s, hyper's. It is also how long an idle
/// keep-alive connection is kept.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The default connection cap: half the process's soft limit on open file
/// descriptors (`ulimit -n`; 512 for the common 1,024), so that the
/// connections leave descriptors for everything else, at most 65,536.
pub fn default_max_connections() -> usize {
    super::listen::fd_limit().map_or(512, |limit| (limit / 2).clamp(16, 65_536))
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
    header_read_timeout: Duration,
    max_connections: Option<usize>,
}

impl<S> Serve<S> {
    /// How long a client may take to send a request's header, HTTP/1
    /// (default [`DEFAULT_HEADER_READ_TIMEOUT`]); then the connection is
    /// closed. The time counts from the connection's start or the end of
    /// the previous response, so it also bounds an idle keep-alive
    /// connection, a silent one, and one that sends a byte a second.
    /// HTTP/2 connections are pinged instead: one that does not answer
    /// within 20 s is closed.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Connections served at once (default [`default_max_connections`]);
    /// more wait in the listen backlog until one ends.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = Some(max.max(1));
        self
    }

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
            header_read_timeout,
            max_connections,
        } = self;
        if signals {
            super::drain_on_signals(&supervisor)?;
        }
        // Rule 3: an exit escaping the service ends the server, not just
        // the connection (see `escape`).
        let service = super::escape::Escapes::new(service, &supervisor);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's header read timeout needs a timer: without one it is
        // silently off, and a silent or byte-a-second client holds its
        // connection forever.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(H2_PING_INTERVAL);
        let slots = Arc::new(Semaphore::new(
            max_connections.unwrap_or_else(default_max_connections),
        ));
        let mut connections = JoinSet::new();
        let draining = Arc::new(AtomicBool::new(false));
        let shutdown = supervisor.shutdown_signal();
        tokio::pin!(shutdown);

        loop {
            // A free connection slot first: beyond the cap, connections
            // wait in the kernel's backlog.
            let slot = tokio::select! {
                biased;
                _ = shutdown.as_mut() => break,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
            };
            let Some((stream, peer)) = super::accept_until(&listener, shutdown.as_mut()).await
            else {
                break;
            };
            while connections.try_join_next().is_some() {}
            let seen = Arc::new(Seen::default());
            let svc = DrainAware {
                inner: service.clone(),
                draining: draining.clone(),
                seen: seen.clone(),
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
                .into_owned();
            let drain = supervisor.shutdown_signal();
            connections.spawn(async move {
                // Held until the task ends, however it ends.
                let _slot = slot;
                // Serve. Once draining starts, an HTTP/1 connection is left
                // to end by itself: its next response carries `connection:
                // close` (see `DrainAware`), so a request a client already
                // sent on an idle keep-alive or a just-accepted connection is
                // answered, not dropped. After NEXT_REQUEST_WAIT (or at once
                // for HTTP/2, whose GOAWAY clients handle) it is shut down
                // gracefully: a request in flight still finishes.
                tokio::pin!(conn);
                tokio::pin!(drain);
                // hyper-util reads a connection's first bytes to tell HTTP/1
                // from HTTP/2 before hyper's header timer starts: a client
                // that sends nothing (or less than an HTTP/2 preface) would
                // hold its connection forever. So the first request must
                // start within the header read timeout, counted from the
                // accept as hyper counts it.
                let first_request = tokio::time::sleep(header_read_timeout);
                tokio::pin!(first_request);
                let mut first_checked = false;
                let result = loop {
                    tokio::select! {
                        result = conn.as_mut() => break Some(result),
                        () = &mut drain => break None,
                        () = &mut first_request, if !first_checked => {
                            first_checked = true;
                            if !seen.requested.load(Ordering::Acquire) {
                                tracing::debug!(%peer, "no request within the header read timeout: connection closed");
                                return;
                            }
                        }
                    }
                };
                let result = match result {
                    Some(result) => result,
                    None => {
                        let by_itself = if seen.http2.load(Ordering::Acquire) {
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
        listener.remove_socket_if_bound_here();
        drop(listener);

        Ok(super::drain(connections, grace, &supervisor).await)
    }
}

/// How long an HTTP/1 connection may stay open once draining starts, for a
/// request its client may already have sent; then it is shut down.
const NEXT_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// HTTP/2: a ping this often, and a peer that does not answer one within as
/// long is dropped.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// What a connection task learns from its requests.
#[derive(Debug, Default)]
struct Seen {
    /// A request arrived (the first-request deadline is met).
    requested: AtomicBool,
    /// The connection speaks HTTP/2.
    http2: AtomicBool,
}

/// Marks responses `connection: close` (HTTP/1) once the server drains, so
/// that keep-alive clients stop sending on this connection, and tells the
/// connection task what it [`Seen`].
#[derive(Clone)]
struct DrainAware<S> {
    inner: S,
    draining: Arc<AtomicBool>,
    seen: Arc<Seen>,
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
        self.seen.requested.store(true, Ordering::Release);
        if req.version() == http::Version::HTTP_2 {
            self.seen.http2.store(true, Ordering::Release);
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
