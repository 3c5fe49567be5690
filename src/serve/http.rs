//! Serve a tower service over HTTP/1 and HTTP/2 (hyper), until the first
//! [`Exit`].
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tower::ServiceBuilder;
//! use tower_exit::{Supervisor, TracingReporter};
//!
//! # async fn handler(_: http::Request<tower_exit::serve::http::RequestBody>) -> Result<http::Response<String>, std::convert::Infallible> { todo!() }
//! #[tokio::main]
//! async fn main() -> std::io::Result<ExitCode> {
//!     let supervisor = Supervisor::new();
//!     let svc = ServiceBuilder::new()
//!         .layer(supervisor.stack().report(TracingReporter))
//!         .service_fn(handler);
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let exit = tower_exit::serve::http(listener, svc, &supervisor)
//!         .with_signals()
//!         .await?;
//!     Ok(exit.into())
//! }
//! ```

use super::budget::Budget;
use super::conn_io::ConnIo;
use super::escape::{Escapes, ForHyper};
use super::in_flight::{Activity, Conn, Open};
use super::listen::{Listener, Peer};
use super::min_rate::MinRate;
use super::watch::{Event, Watch};
use super::ServeService;
use super::{DrainOptions, Room};
use crate::{Exit, Supervisor};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use super::request_body::{BodyError, RequestBody};
pub use super::DEFAULT_GRACE;

const DEFAULT_MIN_RATE: MinRate = MinRate {
    bytes_per_sec: DEFAULT_MIN_RESPONSE_RATE.0,
    grace: DEFAULT_MIN_RESPONSE_RATE.1,
};

/// Serves `service` on `listener` (TCP or unix) until `supervisor` records
/// an exit; see [`ServeHttp`].
pub fn http<S>(listener: impl Into<Listener>, service: S, supervisor: &Supervisor) -> ServeHttp<S> {
    ServeHttp {
        listener: listener.into(),
        service,
        supervisor: supervisor.clone(),
        drain: DrainOptions::default(),
        header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        max_connections: None,
        budget: None,
        min_response_rate: Some(DEFAULT_MIN_RATE),
        min_request_body_rate: Some(DEFAULT_MIN_BODY_RATE),
    }
}

/// Default minimum response rate: 240 bytes a second after a 5 s grace,
/// Kestrel's. See [`ServeHttp::min_response_rate`].
pub const DEFAULT_MIN_RESPONSE_RATE: (u64, Duration) = (240, Duration::from_secs(5));

/// Default minimum request body rate: 240 bytes a second after a 5 s
/// grace, Kestrel's. See [`ServeHttp::min_request_body_rate`].
pub const DEFAULT_MIN_REQUEST_BODY_RATE: (u64, Duration) = (240, Duration::from_secs(5));

const DEFAULT_MIN_BODY_RATE: MinRate = MinRate {
    bytes_per_sec: DEFAULT_MIN_REQUEST_BODY_RATE.0,
    grace: DEFAULT_MIN_REQUEST_BODY_RATE.1,
};

/// Default time a connection may go without starting or finishing a
/// request: 30 s, hyper's header read timeout. See
/// [`ServeHttp::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The default connection cap: half the process's soft limit on open file
/// descriptors (`ulimit -n`; 512 for the common 1,024), so that the
/// connections leave descriptors for everything else, at most 65,536.
pub fn default_max_connections() -> usize {
    crate::sys::fd_limit().map_or(512, |limit| (limit / 2).clamp(16, 65_536))
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
pub struct ServeHttp<S> {
    listener: Listener,
    service: S,
    supervisor: Supervisor,
    drain: DrainOptions,
    header_read_timeout: Duration,
    max_connections: Option<usize>,
    budget: Option<Arc<Budget>>,
    min_response_rate: Option<MinRate>,
    min_request_body_rate: Option<MinRate>,
}

impl<S> ServeHttp<S> {
    /// How long a connection may go with no request in flight and none
    /// started or finished (default [`DEFAULT_HEADER_READ_TIMEOUT`]); then
    /// it is closed. This bounds a silent client, one that sends a header
    /// a byte a second or never ends it, and an idle keep-alive connection.
    /// A request counts as in flight until its response body is sent, and
    /// bytes the socket takes count as activity: a slow handler, a long
    /// streamed response or a large one that the client reads slowly is
    /// never cut. A response whose client takes no byte for a whole period
    /// (it stopped reading) is closed, as nginx's `send_timeout` does.
    ///
    /// The deadline is checked once per period, not per request (a timer
    /// per request costs several percent of CPU): a connection is closed
    /// between one and two periods after its last activity.
    /// HTTP/2 connections are also pinged every 20 s: one that does not
    /// answer within 20 s is closed.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Serve at most `max` requests, exactly, then drain and resolve to
    /// [`Exit::success`] (a prefork worker recycling; see `serve::budget`).
    #[cfg(feature = "prefork")] // prefork is its one user
    pub(crate) fn max_requests(mut self, max: u64) -> Self {
        self.budget = Some(Arc::new(Budget::new(max.max(1))));
        self
    }

    /// The slowest a client may take a response (default
    /// [`DEFAULT_MIN_RESPONSE_RATE`]: 240 bytes a second after a 5 s
    /// grace, Kestrel's), so that clients that read a byte a second cannot
    /// hold connections and response buffers for ever. A write that waits
    /// on the client (the socket's buffer is full) may wait `grace`, plus
    /// what the bytes the client took since its previous wait are worth at
    /// `bytes_per_sec` (at most 64 KiB of them, about the step in which the
    /// kernel frees a socket's buffer); longer, and the connection is
    /// closed, logged at INFO. A client reading at the rate or faster is
    /// never closed; one that stops reading is closed within
    /// `grace + 64 KiB / bytes_per_sec` (4.6 min at the default). Time the
    /// application spends producing the response does not count, only
    /// waits on the socket. Upgraded connections (WebSockets) are held to
    /// it too. `bytes_per_sec` 0 turns it off.
    pub fn min_response_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_response_rate = Some(MinRate {
            bytes_per_sec,
            grace,
        });
        self
    }

    /// The slowest a client may send a request body the application is
    /// reading (default [`DEFAULT_MIN_REQUEST_BODY_RATE`]: 240 bytes a
    /// second after a 5 s grace, Kestrel's), so that clients that trickle
    /// an upload a byte at a time cannot hold connections for ever. While
    /// the application waits for the body ([`RequestBody`]), the client
    /// spends an allowance that starts at `grace`; every byte it sends
    /// earns `1 / bytes_per_sec` seconds back, up to `grace` plus what
    /// 64 KiB are worth. Spent, the request ends: the application's read
    /// fails with [`BodyError::TooSlow`] (axum answers `400`), logged at
    /// INFO, and the connection closes after the response (an HTTP/2
    /// stream is reset). A client sending at the rate or faster is never
    /// cut; one that stops is cut within `grace` (after a body of 64 KiB
    /// or more, within `grace + 64 KiB / bytes_per_sec`, 4.6 min at the
    /// default). Time the application spends not reading the body does
    /// not count. `bytes_per_sec` 0 turns it off.
    pub fn min_request_body_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_request_body_rate = Some(MinRate {
            bytes_per_sec,
            grace,
        });
        self
    }

    /// Connections served at once (default [`default_max_connections`]);
    /// more wait in the listen backlog until one ends. An upgraded
    /// connection (a WebSocket) counts until its handler closes it. At the
    /// cap, once clients have waited in the backlog for 1 s, the keep-alive
    /// connection idle the longest (one that served a request and has none
    /// in flight, for at least 1 s) is closed to make room, as nginx
    /// reuses its idle connections: at most one every 50 ms while clients
    /// wait; a request its client sent meanwhile is still answered. A
    /// connection that has not sent its first request is left to the
    /// header timeout. (The two seconds keep a pooled client that pauses
    /// between bursts from being cut as it sends.)
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = Some(max.max(1));
        self
    }
}

drain_options!(ServeHttp<S>, RequestBody);

impl<S> ServeHttp<S> {
    async fn run(self) -> io::Result<Exit>
    where
        S: ServeService<RequestBody>,
    {
        let ServeHttp {
            listener,
            service,
            supervisor,
            drain,
            header_read_timeout,
            max_connections,
            budget,
            min_response_rate,
            min_request_body_rate,
        } = self;
        drain.start(&supervisor)?;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No timer for HTTP/1: hyper's header read timeout makes a timer
        // entry per request head (measured: 4 to 5 % more CPU per request);
        // each connection task keeps one deadline instead (below).
        // Extended CONNECT (RFC 8441) on: WebSocket over HTTP/2 (axum's
        // `WebSocketUpgrade` answers it), as `axum::serve` allows.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(H2_PING_INTERVAL)
            .enable_connect_protocol();
        let max = super::slot_count(max_connections.unwrap_or_else(default_max_connections));
        let slots = Arc::new(Semaphore::new(max as usize));
        let mut connections = JoinSet::new();
        let open = Arc::new(Open::default());
        let draining = Arc::new(AtomicBool::new(false));
        // A shutdown delay starts: HTTP/1 responses say `connection:
        // close`, HTTP/2 connections get GOAWAY, accepting goes on.
        let going_away = tokio::spawn({
            let (supervisor, draining, open) = (supervisor.clone(), draining.clone(), open.clone());
            async move {
                if drain.delay_started(supervisor).await {
                    draining.store(true, Ordering::Release);
                    open.go_away_http2();
                }
            }
        });
        let shutdown = drain.drain_signal(&supervisor);
        tokio::pin!(shutdown);
        // At the cap: since when clients wait in the backlog.
        let mut waiting_since = None;

        loop {
            let Some((stream, peer, slot)) = super::next_connection(
                &listener,
                &slots,
                budget.as_deref(),
                &supervisor,
                Some(&|room| match room {
                    Room::Slot => {
                        if open.reclaim_idlest(false) {
                            tracing::debug!(
                                "at the connection cap: closing the connection idle the longest"
                            );
                        }
                    }
                    // Connections that never sent a request first (likely
                    // never will), then the one idle the longest after
                    // its requests.
                    Room::Budget => {
                        let silent = open.reclaim_silent();
                        if silent > 0 {
                            tracing::debug!(
                                silent,
                                "budget held by open connections: closing the silent ones"
                            );
                        } else if open.reclaim_idlest(true) {
                            tracing::debug!(
                                "budget held by open connections: closing the one idle the longest"
                            );
                        }
                    }
                }),
                &mut waiting_since,
                shutdown.as_mut(),
            )
            .await
            else {
                break;
            };
            while connections.try_join_next().is_some() {}
            // Rule 3: an exit escaping the service ends the server, not
            // just the connection (see `escape`).
            let svc = Escapes::new(
                service.clone(),
                &supervisor,
                Some(&draining),
                budget.as_ref(),
            );
            let conn_state = svc.conn().clone();
            // The slot goes with the socket: an upgraded connection keeps
            // it, in its handler, until closed.
            let io = ConnIo::new(stream, conn_state.clone(), slot, peer, min_response_rate);
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(io),
                    ForHyper::new(svc, peer, min_request_body_rate),
                )
                .into_owned();
            let drain_now = drain.drain_signal(&supervisor);
            let entry = open.add(&conn_state);
            connections.spawn(async move {
                let _entry = entry;
                handle_connection(conn, &conn_state, drain_now, peer, header_read_timeout).await;
            });
        }
        going_away.abort();
        draining.store(true, Ordering::Release);
        listener.remove_socket_if_bound_here();
        drop(listener);

        Ok(super::drain(connections, &slots, max, drain.grace, &supervisor).await)
    }
}

/// Serves one accepted connection until it ends, the server's drain closes
/// it, or it misses its deadline (see [`ServeHttp::header_read_timeout`]).
async fn handle_connection<S>(
    conn: auto::UpgradeableConnection<'static, TokioIo<ConnIo>, ForHyper<S>, TokioExecutor>,
    conn_state: &Conn,
    drain: impl Future<Output = ()>,
    peer: Peer,
    header_read_timeout: Duration,
) where
    S: ServeService<RequestBody>,
{
    // Serve. Once draining starts, an HTTP/1 connection is left
    // to end by itself: its next response carries `connection:
    // close` (see `Escapes`), so a request a client already
    // sent on an idle keep-alive or a just-accepted connection is
    // answered, not dropped. After NEXT_REQUEST_WAIT (or at once
    // for HTTP/2, whose GOAWAY clients handle) it is shut down
    // gracefully: a request in flight still finishes.
    tokio::pin!(conn);
    tokio::pin!(drain);
    // The connection's deadline: it must start or finish a
    // request within every period of `header_read_timeout`, or
    // have one in flight; otherwise it is closed. One timer
    // entry per connection, moved forward once a period (no
    // timer work per request). This bounds a silent client
    // (hyper-util reads the first bytes to tell HTTP/1 from
    // HTTP/2 with no timeout of its own), a partial or
    // byte-a-second header, and an idle keep-alive connection:
    // each is closed between one and two periods after its last
    // activity. Bytes the socket took count as activity: a response
    // whose last frame hyper took is still going out while the client
    // reads it; one whose client stopped reading is closed like an idle
    // connection (nginx's `send_timeout`).
    let deadline = tokio::time::sleep(header_read_timeout);
    tokio::pin!(deadline);
    let reclaimed = conn_state.reclaimed();
    tokio::pin!(reclaimed);
    let mut seen = Activity::default();
    let mut watch = Watch::new();
    let result = loop {
        let event = std::future::poll_fn(|cx| {
            watch.poll(cx, conn.as_mut(), |cx| {
                if drain.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Watched::Drain);
                }
                if reclaimed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Watched::Reclaimed);
                }
                deadline.as_mut().poll(cx).map(|()| Watched::Deadline)
            })
        })
        .await;
        match event {
            Event::Conn(result) => break Some(result),
            Event::Watcher(Watched::Drain) => break None,
            Event::Watcher(Watched::Reclaimed) => {
                // Idle with the server at its cap, or HTTP/2 in a shutdown
                // delay: shut down gracefully (a request its client sent
                // meanwhile is still answered), HTTP/2 with GOAWAY.
                tracing::debug!(%peer, "connection asked to close: idle at the cap, or HTTP/2 going away");
                conn.as_mut().graceful_shutdown();
                break Some(conn.as_mut().await);
            }
            Event::Watcher(Watched::Deadline) => {
                let now = conn_state.activity();
                if now.no_request() && now == seen {
                    tracing::debug!(%peer, requests = now.started, "no request for the header read timeout: connection closed");
                    return;
                }
                seen = now;
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + header_read_timeout);
            }
        }
    };
    let result = match result {
        Some(result) => result,
        None => {
            let by_itself = if conn_state.http2() {
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
}

/// Which of a connection task's watchers fired.
enum Watched {
    Drain,
    Deadline,
    Reclaimed,
}

/// How long an HTTP/1 connection may stay open once draining starts, for a
/// request its client may already have sent; then it is shut down.
const NEXT_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// HTTP/2: a ping this often, and a peer that does not answer one within as
/// long is dropped.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
