//! Drive a server you build yourself (`axum::serve`, hyper-util's graceful
//! shutdown) with the same exit, signal and grace handling as
//! [`serve::http`](super::http()).
//!
//! ```no_run
//! use std::process::ExitCode;
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_exit::{Supervisor, TracingReporter};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<ExitCode> {
//!     let supervisor = Supervisor::new();
//!     let app = Router::new()
//!         .route("/", get(|| async { "hello" }))
//!         .layer(supervisor.stack().report(TracingReporter));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let exit = tower_exit::serve::graceful(&supervisor, |shutdown| {
//!         axum::serve(listener, app).with_graceful_shutdown(shutdown)
//!     })
//!     .grace(Duration::from_secs(10))
//!     .with_signals()
//!     .await?;
//!     Ok(exit.into())
//! }
//! ```

use crate::BoxError;
use crate::{Exit, Supervisor};
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;

/// Runs the server `start` builds around the shutdown future it is given,
/// until the first [`Exit`]; see [`Graceful`].
pub fn graceful<F, S, E>(supervisor: &Supervisor, start: F) -> Graceful<F>
where
    F: FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> S,
    S: IntoFuture<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    Graceful {
        supervisor: supervisor.clone(),
        start,
        drain: super::DrainOptions::default(),
    }
}

/// A server driven until the first exit. Await it: it resolves to that exit.
///
/// `start` gets the shutdown future to hand to the server's graceful
/// shutdown (`with_graceful_shutdown`): it resolves once the supervisor
/// records an exit (a boundary caught one, [`Supervisor::trigger`], or
/// SIGTERM/SIGINT with [`with_signals`](Self::with_signals)) and logs
/// `draining`. The server then stops accepting and lets its connections
/// finish; after the [grace period](Self::grace) the server future is
/// dropped (logged at WARN) and this resolves to the exit. Connections the
/// server runs as tasks of their own (axum does) are not owned by its
/// future: they end with the runtime, when `main` returns the exit, unless
/// they hold a [`Hold`](crate::Hold) (see [`Supervisor::hold`]), which
/// this waits for within the same grace.
///
/// With a [shutdown delay](Self::shutdown_delay), `shutdown` resolves after
/// it: meanwhile the supervisor is not ready (readiness answers `503`) and
/// your server serves as usual (it is yours: this cannot add `connection:
/// close` to its HTTP/1 responses nor send GOAWAY on its HTTP/2
/// connections, as `serve::http` does).
#[derive(Debug)]
#[must_use = "a server does nothing until awaited"]
pub struct Graceful<F> {
    supervisor: Supervisor,
    start: F,
    drain: super::DrainOptions,
}

drain_options!(Graceful<F>);

/// The server's own error (an `io::Error` from `axum::serve`, a
/// `tonic::transport::Error`, any error that converts into a boxed one)
/// comes back as an `io::Error` that wraps it (`io::Error::other`), so
/// that `main` keeps one error type.
impl<F, S, E> IntoFuture for Graceful<F>
where
    F: FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> S,
    S: IntoFuture<Output = Result<(), E>>,
    S::IntoFuture: Send + 'static,
    E: Into<BoxError>,
{
    type Output = io::Result<Exit>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<Exit>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let Graceful {
            supervisor,
            start,
            drain,
        } = self;
        let grace = drain.grace;
        let signals = drain.start(&supervisor);
        let drain_now = drain.drain_signal(&supervisor);
        let shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            drain_now.await;
            tracing::info!("draining");
        });
        let server = start(shutdown).into_future();
        let delay_started = drain.delay_started(supervisor.clone());
        let drain_now = drain.drain_signal(&supervisor);
        Box::pin(async move {
            signals?;
            let mut server = std::pin::pin!(server);
            let delay_said = tokio::spawn(delay_started);
            let grace_over = async {
                drain_now.await;
                // gRPC streams of a server with the exit-aware layers end
                // with `UNAVAILABLE` trailers a moment before the end.
                let _ = tokio::time::timeout(grace, super::last_call(&supervisor, grace)).await;
            };
            tokio::pin!(grace_over);
            tokio::select! {
                served = server.as_mut() => served.map_err(into_io)?,
                () = grace_over.as_mut() => tracing::warn!(
                    ?grace,
                    "grace period over: dropping the connections still open"
                ),
            }
            // Work the server does not own (an upgraded connection's task)
            // that holds the drain: within the same grace.
            if supervisor.exit().is_some() && supervisor.holds() > 0 {
                tokio::select! {
                    () = supervisor.released() => {}
                    () = grace_over => tracing::warn!(
                        ?grace,
                        holds = supervisor.holds(),
                        "grace period over: the holds still alive end with the runtime"
                    ),
                }
            }
            let exit = supervisor.exit().unwrap_or_else(|| {
                // The server ended by itself (its listener failed, say):
                // not an exit anyone asked for.
                Exit::failure("the server ended without an exit")
            });
            delay_said.abort();
            super::stopped(&exit);
            Ok(exit)
        })
    }
}

/// A server's error as an `io::Error`: itself if it is one, wrapped
/// otherwise.
fn into_io<E: Into<BoxError>>(err: E) -> io::Error {
    match err.into().downcast::<io::Error>() {
        Ok(io) => *io,
        Err(other) => io::Error::other(other),
    }
}
