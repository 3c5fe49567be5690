//! Serve a tower service until the first [`Exit`], then drain.
//!
//! - [`http()`]: HTTP/1 and HTTP/2 over hyper.
//! - [`fastcgi()`]: FastCGI 1.0 Responder, behind nginx, Apache or any
//!   FastCGI client.
//! - [`graceful()`]: a server you build yourself (`axum::serve`), given the
//!   same shutdown, signals and grace period.
//!
//! Both listen on TCP or unix sockets ([`Listener`], [`ListenAddr`]), stop
//! accepting on the first exit (or on SIGTERM/SIGINT with `with_signals`),
//! let in-flight requests finish within a grace period, and resolve to the
//! exit, for `main` to return as its exit code.

/// The builder methods every server here has, written once: `grace` and
/// `with_signals`, on a `drain: DrainOptions` field; and, given the
/// request body type, `IntoFuture` through the server's `run`.
macro_rules! drain_options {
    ($server:ident<$param:ident>) => {
        impl<$param> $server<$param> {
            /// How long in-flight work may run once draining starts
            /// (default [`DEFAULT_GRACE`](crate::serve::DEFAULT_GRACE));
            /// what still runs then is dropped, logged at WARN.
            ///
            /// gRPC streams get a goodbye a moment before the end (the
            /// last tenth of the grace, at most its last second): a
            /// response stream of a gRPC call still open then ends
            /// between two messages with trailers `grpc-status: 14`
            /// (`UNAVAILABLE`, "the server is shutting down"), which a
            /// client reads as "call elsewhere", rather than a reset. The
            /// drain never runs longer than `grace`.
            pub fn grace(mut self, grace: std::time::Duration) -> Self {
                self.drain.grace = grace;
                self
            }

            /// Also drain on SIGTERM and SIGINT, which count as
            /// [`Exit::success`](crate::Exit::success).
            ///
            /// This installs tokio's signal handlers for the rest of the
            /// process.
            pub fn with_signals(mut self) -> Self {
                self.drain.signals = true;
                self
            }

            /// After SIGTERM or SIGINT (see [`with_signals`](Self::with_signals)),
            /// keep accepting and serving for `delay` before draining
            /// (default zero: drain at once). During the delay the
            /// supervisor is not [ready](crate::Supervisor::ready) (a
            /// readiness probe answers `503`), HTTP/1 responses carry
            /// `connection: close` and HTTP/2 connections get GOAWAY, so
            /// that a load balancer or Kubernetes, which learns of the stop
            /// only from its probes, moves clients to other instances
            /// before this one stops accepting. A second signal cuts the
            /// delay short. Kubernetes: a few seconds more than the
            /// readiness probe's `periodSeconds × failureThreshold` (say
            /// 5 s for 1 s × 2 plus the endpoints' propagation), with
            /// `terminationGracePeriodSeconds` ≥ delay + grace.
            ///
            /// An exit the application raises drains at once, unless
            /// [`delay_exits`](Self::delay_exits) says otherwise.
            pub fn shutdown_delay(mut self, delay: std::time::Duration) -> Self {
                self.drain.delay = delay;
                self
            }

            /// Whether an exit the application raises (not only a signal)
            /// waits for the [shutdown delay](Self::shutdown_delay) too
            /// (default false).
            pub fn delay_exits(mut self, yes: bool) -> Self {
                self.drain.delay_exits = yes;
                self
            }
        }
    };
    ($server:ident<$param:ident>, $body:ty) => {
        drain_options!($server<$param>);

        impl<$param> std::future::IntoFuture for $server<$param>
        where
            $param: crate::serve::ServeService<$body>,
        {
            type Output = std::io::Result<crate::Exit>;
            type IntoFuture = std::pin::Pin<
                Box<dyn std::future::Future<Output = std::io::Result<crate::Exit>> + Send>,
            >;

            fn into_future(self) -> Self::IntoFuture {
                Box::pin(self.run())
            }
        }
    };
}

mod budget;
#[cfg(feature = "http")]
mod conn_io;
mod escape;
#[cfg(feature = "fastcgi")]
pub mod fastcgi;
pub mod graceful;
#[cfg(feature = "http")]
pub mod http;
mod in_flight;
mod listen;
mod min_rate;
#[cfg(feature = "prefork")]
pub mod prefork;
#[cfg(feature = "http")]
mod request_body;
#[cfg(feature = "http")]
mod watch;

#[cfg(feature = "fastcgi")]
pub use self::fastcgi::fastcgi;
pub use self::graceful::{graceful, Graceful};
#[cfg(feature = "http")]
pub use self::http::{http, ServeHttp};
pub use self::listen::{BadListenAddr, ListenAddr, Listener, Peer};

use crate::{Exit, Supervisor};
use ::http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::BoxError;

/// Default time in-flight requests get to finish once a server drains.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// When, after the drain started, gRPC streams still open are ended with
/// `UNAVAILABLE` trailers (the supervisor's last call): a tenth of the
/// grace period before its end, at most one second before, so that
/// their trailers are written while the connections are still there.
fn last_call_at(grace: std::time::Duration) -> std::time::Duration {
    grace - (grace / 10).min(std::time::Duration::from_secs(1))
}

/// Makes the supervisor's last call `last_call_at(grace)` from now;
/// never resolves.
async fn last_call(supervisor: &Supervisor, grace: std::time::Duration) {
    tokio::time::sleep(last_call_at(grace)).await;
    supervisor.call_last();
    std::future::pending().await
}

/// How a server drains: its grace period, and whether SIGTERM and SIGINT
/// start the drain. One type for every server here.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DrainOptions {
    pub(crate) grace: std::time::Duration,
    pub(crate) signals: bool,
    pub(crate) delay: std::time::Duration,
    pub(crate) delay_exits: bool,
}

impl Default for DrainOptions {
    fn default() -> Self {
        DrainOptions {
            grace: DEFAULT_GRACE,
            signals: false,
            delay: std::time::Duration::ZERO,
            delay_exits: false,
        }
    }
}

impl DrainOptions {
    /// Installs the signal handling asked for, at the server's start.
    fn start(self, supervisor: &Supervisor) -> std::io::Result<()> {
        if self.signals {
            drain_on_signals(supervisor, self.delay)?;
        }
        Ok(())
    }

    /// Whether the first exit waits for the shutdown delay.
    fn delays(self, supervisor: &Supervisor) -> Option<tokio::time::Instant> {
        let (at, signaled) = supervisor.stopped_at()?;
        (!self.delay.is_zero() && (signaled || self.delay_exits))
            .then(|| tokio::time::Instant::from_std(at + self.delay))
    }

    /// Resolves when the server must drain: once the first exit is
    /// recorded, after the shutdown delay when it applies (or a second
    /// signal cuts it short). Every one of a server's futures ends the
    /// delay at the same instant: it counts from the exit.
    pub(crate) fn drain_signal(
        self,
        supervisor: &Supervisor,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let supervisor = supervisor.clone();
        async move {
            let _first = supervisor.wait().await;
            if let Some(until) = self.delays(&supervisor) {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = supervisor.hurried() => {}
                }
            }
        }
    }

    /// Says that the shutdown delay starts, if it applies, once the first
    /// exit is recorded; returns whether it does. For the server's own
    /// work at that moment (HTTP/1 `connection: close`, HTTP/2 GOAWAY).
    pub(crate) async fn delay_started(self, supervisor: Supervisor) -> bool {
        let exit = supervisor.wait().await;
        let delays = self.delays(&supervisor).is_some();
        if delays {
            tracing::info!(
                delay = ?self.delay,
                exit.code = exit.code(),
                exit.message = exit.message(),
                "shutdown delay: not ready, still serving; draining after it"
            );
        }
        delays
    }
}

/// What the servers here need of a tower service taking `Request<ReqBody>`:
/// cloneable and `Send`, a `Send` future, errors and a response body hyper
/// can handle. Implemented for every service that fits; you never
/// implement it, it only names these bounds once.
pub trait ServeService<ReqBody>:
    Service<
        Request<ReqBody>,
        Response = Response<Self::ResBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
    /// The response body.
    type ResBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, ReqBody, B> ServeService<ReqBody> for S
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type ResBody = B;
}

/// What a server does, for a client waiting in the backlog, when it is
/// short of a connection slot ([`Room::Slot`]) or of a unit of its request
/// budget ([`Room::Budget`]): HTTP closes a connection that sends nothing.
type MakeRoom<'a> = Option<&'a (dyn Fn(Room) + Sync)>;

/// What a server is short of, for a client waiting in its backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Room {
    /// A connection slot: the cap is reached.
    Slot,
    /// A unit of the request budget: open connections hold them all.
    Budget,
}

/// How often a server at its connection cap looks for a client waiting in
/// its backlog, to close an idle connection for it. At most one idle
/// connection is closed per period.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a client waits in the backlog, the server at its cap, before
/// an idle connection is closed for it.
const RECLAIM_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The next connection a server may serve, with its connection slot:
/// a free slot first (at the cap, `make_room` is called to close an idle
/// connection once clients have waited in the kernel's backlog for
/// RECLAIM_AFTER, since `waiting_since`, which the server keeps), then a unit
/// of the request budget if there is one (see [`budget::admit`]), then the
/// accept. `None` once `shutdown` resolves or
/// the budget is spent: the server stops accepting and drains.
async fn next_connection<F: std::future::Future<Output = ()>>(
    listener: &Listener,
    slots: &std::sync::Arc<tokio::sync::Semaphore>,
    budget: Option<&budget::Budget>,
    supervisor: &Supervisor,
    make_room: MakeRoom<'_>,
    waiting_since: &mut Option<tokio::time::Instant>,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Option<(listen::Stream, Peer, tokio::sync::OwnedSemaphorePermit)> {
    let slot = match slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            // At the cap: once a client has waited in the backlog for
            // RECLAIM_AFTER, ask an idle connection to make room (HTTP),
            // checked every RECLAIM_EVERY until a slot frees.
            let acquire = slots.clone().acquire_owned();
            tokio::pin!(acquire);
            loop {
                if let Some(make_room) = make_room {
                    if listener.has_waiting() {
                        // Since when clients wait (kept across accepts while
                        // the backlog stays full): room is made for clients
                        // that waited RECLAIM_AFTER.
                        let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= RECLAIM_AFTER {
                            make_room(Room::Slot);
                        }
                    } else {
                        *waiting_since = None;
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return None,
                    slot = acquire.as_mut() => break slot.expect("semaphore never closed"),
                    () = tokio::time::sleep(RECLAIM_EVERY) => {}
                }
            }
        }
    };
    // Every unit of the budget held by open connections: one that sends
    // nothing makes room, as soon as a client waits.
    let budget_room = make_room.map(|make_room| {
        move || {
            if listener.has_waiting() {
                make_room(Room::Budget);
            }
        }
    });
    let budget_room = budget_room.as_ref().map(|room| room as &(dyn Fn() + Sync));
    if !budget::admit(
        budget,
        supervisor,
        shutdown.as_mut(),
        budget_room,
        RECLAIM_EVERY,
    )
    .await
    {
        return None;
    }
    let (stream, peer) = accept_until(listener, shutdown).await?;
    Some((stream, peer, slot))
}

/// The next connection, or `None` once `shutdown` resolves.
///
/// Accept errors (EMFILE when the process is out of file descriptors,
/// ENFILE, ENOBUFS, ...) are retried after a backoff that doubles from
/// 10 ms to 1 s while they last, so a server out of descriptors does not
/// spin; the open connections keep being served meanwhile. They are logged
/// at most once a second, with the number of failures since the last line.
async fn accept_until<F>(
    listener: &Listener,
    mut shutdown: std::pin::Pin<&mut F>,
) -> Option<(listen::Stream, Peer)>
where
    F: std::future::Future<Output = ()>,
{
    use std::time::Duration;
    let mut backoff = Duration::from_millis(10);
    let mut failed = 0u64;
    let mut last_log: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(err) => {
                    failed += 1;
                    let now = tokio::time::Instant::now();
                    if last_log.is_none_or(|at| now - at >= Duration::from_secs(1)) {
                        tracing::warn!(%err, failures = failed, retry_in = ?backoff, "accept failed");
                        last_log = Some(now);
                        failed = 0;
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.as_mut() => return None,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
}

/// A connection cap as a count of semaphore permits: at least one, at most
/// what one `acquire_many` takes (the drain takes them all back).
fn slot_count(max: usize) -> u32 {
    u32::try_from(max.max(1)).unwrap_or(u32::MAX)
}

/// Lets the connection tasks finish within `grace`, and the connections
/// they no longer own (upgraded ones: their sockets hold their `slots`,
/// `max` in all) and every [`Hold`](crate::Hold) end; then drops the
/// rest; returns the exit that started the drain.
async fn drain(
    mut connections: tokio::task::JoinSet<()>,
    slots: &tokio::sync::Semaphore,
    max: u32,
    grace: std::time::Duration,
    supervisor: &Supervisor,
) -> Exit {
    let upgraded = |connections: &tokio::task::JoinSet<()>| {
        (max as usize).saturating_sub(slots.available_permits() + connections.len())
    };
    tracing::info!(
        open = connections.len(),
        upgraded = upgraded(&connections),
        holds = supervisor.holds(),
        "draining"
    );
    let drained = tokio::time::timeout(grace, async {
        let done = async {
            while connections.join_next().await.is_some() {}
            let _every_slot = slots.acquire_many(max).await;
            supervisor.released().await;
        };
        tokio::select! {
            () = done => {}
            () = last_call(supervisor, grace) => {}
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            open = connections.len(),
            upgraded = upgraded(&connections),
            holds = supervisor.holds(),
            "grace period over: dropping the connections still open"
        );
        connections.shutdown().await;
    }
    let exit = supervisor
        .exit()
        .expect("servers drain only once an exit is recorded");
    stopped(&exit);
    exit
}

/// Every server's last line: stopped, with the exit it resolves to.
fn stopped(exit: &Exit) {
    tracing::info!(
        exit.code = exit.code(),
        exit.message = exit.message(),
        "server stopped"
    );
}

/// Records `Exit::success()` on the first SIGTERM or SIGINT (the servers'
/// shutdown `delay` applies to it); a second one cuts the delay short.
fn drain_on_signals(supervisor: &Supervisor, delay: std::time::Duration) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // tokio sets up its signal driver with a socket pair on first use and
    // panics when the process is out of file descriptors: make sure two are
    // free, to fail with an error instead.
    drop(std::os::unix::net::UnixStream::pair().map_err(|err| {
        std::io::Error::new(err.kind(), format!("cannot set up signal handling: {err}"))
    })?);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let supervisor = supervisor.clone();
    tokio::spawn(async move {
        let mut next = async || {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        let name = next().await;
        if delay.is_zero() {
            tracing::info!(signal = name, "draining on signal");
        } else {
            tracing::info!(
                signal = name,
                ?delay,
                "signal: draining after the shutdown delay"
            );
        }
        supervisor.record(Exit::success().with_message(name), true);
        if !delay.is_zero() {
            let name = next().await;
            tracing::info!(signal = name, "second signal: the shutdown delay cut short");
            supervisor.hurry();
        }
    });
    Ok(())
}
