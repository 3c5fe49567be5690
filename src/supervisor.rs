//! The [`Supervisor`]: one per server, it records the first [`Exit`] and
//! tells the server to drain; [`Supervisor::stack`] gives the exit-aware
//! stack that reports to it, [`Supervisor::layer`] its boundary alone.

use crate::boundary::BoundaryLayer;
use crate::catch_panic::DefaultResponseForPanic;
use crate::exit::Exit;
use crate::stack::{ExitStackLayer, NoReporter};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::{watch, Notify};

/// Records the first [`Exit`] of a server and tells the server to stop.
///
/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Supervisor {
    // One pointer: the exit-aware layers clone it for every request (into
    // the response's body), one reference count, and the body stays small.
    shared: Arc<Shared>,
}

struct Shared {
    // `watch` keeps the value for late subscribers: a `shutdown_signal()`
    // taken after the exit was recorded resolves at once.
    exit: watch::Sender<Option<Exit>>,
    holds: Holds,
    stop: Stop,
}

/// How the first exit came, for the servers' shutdown delay.
#[derive(Default)]
struct Stop {
    /// When the first exit was recorded.
    at: OnceLock<Instant>,
    /// The first exit came from SIGTERM or SIGINT.
    signaled: AtomicBool,
    /// A second signal came: drain now, the delay cut short.
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    hurry: AtomicBool,
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))]
    hurried: Notify,
    /// The drain's last call came (a moment before its grace period
    /// ends): gRPC streams still open end with `UNAVAILABLE`.
    last_call: AtomicBool,
    last_called: Arc<Notify>,
}

/// How many [`Hold`]s are alive, and who waits for none to be.
#[derive(Default)]
struct Holds {
    count: AtomicUsize,
    released: Notify,
}

/// Keeps a server's drain waiting, up to its grace period, until dropped;
/// see [`Supervisor::hold`].
#[must_use = "the drain waits for a hold only while it is alive"]
pub struct Hold {
    shared: Arc<Shared>,
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold").finish_non_exhaustive()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // AcqRel: what the holder did happens before the drain that sees
        // the count reach zero goes on.
        let holds = &self.shared.holds;
        if holds.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            holds.released.notify_waiters();
        }
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("exit", &self.exit())
            .finish()
    }
}

impl Supervisor {
    /// The whole exit-aware stack as one layer (see [`ExitStackLayer`]):
    /// put it outermost, where [`layer`](Self::layer) would go.
    pub fn stack<M>(&self) -> ExitStackLayer<DefaultResponseForPanic, NoReporter, M> {
        ExitStackLayer::new(self)
    }

    /// A supervisor with no exit recorded.
    pub fn new() -> Self {
        Supervisor {
            shared: Arc::new(Shared {
                exit: watch::Sender::new(None),
                holds: Holds::default(),
                stop: Stop::default(),
            }),
        }
    }

    /// The boundary layer that reports exits to this supervisor; put it
    /// outermost.
    pub fn layer<M>(&self) -> BoundaryLayer<M> {
        BoundaryLayer::new(self)
    }

    /// Records `exit` unless one is already recorded, and wakes every
    /// [`shutdown_signal`](Self::shutdown_signal) and [`wait`](Self::wait).
    /// Returns whether this exit was the first.
    ///
    /// Servers call this on SIGTERM/SIGINT with [`Exit::success`].
    pub fn trigger(&self, exit: Exit) -> bool {
        self.record(exit, false)
    }

    /// Records `exit` as [`trigger`](Self::trigger) does; `signaled`: it
    /// comes from SIGTERM or SIGINT (the servers' shutdown delay applies).
    pub(crate) fn record(&self, exit: Exit, signaled: bool) -> bool {
        self.shared.exit.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            // Before the exit is published: whoever sees it sees these.
            let _ = self.shared.stop.at.set(Instant::now());
            self.shared.stop.signaled.store(signaled, Ordering::Relaxed);
            *slot = Some(exit);
            true
        })
    }

    /// Whether the server takes new work: true until the first exit is
    /// recorded (SIGTERM with [`with_signals`](crate::serve::ServeHttp::with_signals)
    /// records one), false from then on, through a shutdown delay and the
    /// drain. What [`readiness`](Self::readiness) answers.
    pub fn ready(&self) -> bool {
        self.shared.exit.borrow().is_none()
    }

    /// A readiness check, as a tower service (axum:
    /// `.route_service("/ready", supervisor.readiness())`): `200 ready`
    /// while [`ready`](Self::ready), `503 draining` from the first moment
    /// of a shutdown delay or drain, so that a load balancer or Kubernetes
    /// stops sending new clients before the server stops accepting them.
    pub fn readiness(&self) -> Readiness {
        Readiness(self.clone())
    }

    /// A liveness check, as a tower service: `200 live` for as long as the
    /// server answers, through the shutdown delay and the drain (a
    /// liveness probe that failed during a drain would get the process
    /// killed in the middle of it).
    pub fn liveness(&self) -> Liveness {
        Liveness
    }

    /// When the first exit was recorded, and whether it came from a signal.
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) fn stopped_at(&self) -> Option<(Instant, bool)> {
        let at = *self.shared.stop.at.get()?;
        Some((at, self.shared.stop.signaled.load(Ordering::Relaxed)))
    }

    /// Cuts the shutdown delay short (a second signal): every server
    /// drains now.
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) fn hurry(&self) {
        self.shared.stop.hurry.store(true, Ordering::Release);
        self.shared.stop.hurried.notify_waiters();
    }

    /// Resolves once the delay is cut short by [`hurry`](Self::hurry).
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) async fn hurried(&self) {
        let hurried = self.shared.stop.hurried.notified();
        tokio::pin!(hurried);
        hurried.as_mut().enable();
        if self.shared.stop.hurry.load(Ordering::Acquire) {
            return;
        }
        hurried.await;
    }

    /// The drain's last call, a moment before its grace period ends (see
    /// `serve::last_call_at`): every gRPC stream still open ends with
    /// trailers `grpc-status: 14` (see `grpc::LastCall`).
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) fn call_last(&self) {
        self.shared.stop.last_call.store(true, Ordering::Release);
        self.shared.stop.last_called.notify_waiters();
    }

    /// Whether the drain's last call came.
    #[inline]
    pub(crate) fn last_called(&self) -> bool {
        self.shared.stop.last_call.load(Ordering::Acquire)
    }

    /// A wait for the drain's last call (never over, without a server):
    /// woken by a call made after it was created, polled or not.
    pub(crate) fn last_call(&self) -> tokio::sync::futures::OwnedNotified {
        self.shared.stop.last_called.clone().notified_owned()
    }

    /// The first recorded exit, if any.
    pub fn exit(&self) -> Option<Exit> {
        self.shared.exit.borrow().clone()
    }

    /// Resolves to the first exit (at once if one is recorded already).
    pub fn wait(&self) -> impl Future<Output = Exit> + Send + 'static {
        let supervisor = self.clone();
        async move {
            let mut rx = supervisor.shared.exit.subscribe();
            // The sender lives in `supervisor`, held by this future, so the
            // channel cannot close while we wait.
            let exit = rx
                .wait_for(Option::is_some)
                .await
                .expect("sender is held by this future");
            exit.clone().expect("waited for Some")
        }
    }

    /// Resolves once an exit is recorded: the signal a server's graceful
    /// shutdown waits for (`axum::serve(..).with_graceful_shutdown(..)`,
    /// hyper-util's `GracefulShutdown`).
    pub fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let wait = self.wait();
        async move {
            let _first_exit = wait.await;
        }
    }

    /// Keeps the drain of this supervisor's server (`serve::http`,
    /// `serve::fastcgi`, `serve::graceful`, a prefork worker) waiting until
    /// the returned [`Hold`] is dropped, up to the grace period: hold one
    /// in work that outlives its request and must end cleanly, a WebSocket
    /// that sends its close frame, a stream that sends its last event, a
    /// job that finishes its write. Without one, the server resolves once
    /// its own connections are done and `main` returns, ending such work
    /// wherever it is.
    ///
    /// Take it before the work can be cut (in the handler, before the
    /// upgrade), and watch [`shutdown_signal`](Self::shutdown_signal) to
    /// learn that the drain started; it resolves at once if it already
    /// did, so there is no race between the two.
    ///
    /// ```
    /// # async fn run(supervisor: tower_exit::Supervisor) {
    /// let hold = supervisor.hold();
    /// tokio::spawn(async move {
    ///     let _hold = hold;
    ///     // ... serve a WebSocket until `supervisor.shutdown_signal()`
    ///     // resolves, then send close 1001 ("going away") and return.
    /// });
    /// # }
    /// ```
    ///
    /// Upgraded connections of `serve::http` are waited for without one.
    pub fn hold(&self) -> Hold {
        self.shared.holds.count.fetch_add(1, Ordering::Relaxed);
        Hold {
            shared: self.shared.clone(),
        }
    }

    /// How many [`Hold`]s are alive.
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) fn holds(&self) -> usize {
        self.shared.holds.count.load(Ordering::Acquire)
    }

    /// Resolves once no [`Hold`] is alive.
    #[cfg(all(unix, any(feature = "http", feature = "fastcgi")))] // the servers
    pub(crate) async fn released(&self) {
        loop {
            let released = self.shared.holds.released.notified();
            tokio::pin!(released);
            // Registered before the count is read: a release between the
            // two still wakes this wait.
            released.as_mut().enable();
            if self.holds() == 0 {
                return;
            }
            released.await;
        }
    }
}

/// [`Supervisor::readiness`]: `200 ready` while the server takes new work,
/// `503 draining` from its first exit (SIGTERM included) on.
#[derive(Clone, Debug)]
pub struct Readiness(Supervisor);

/// [`Supervisor::liveness`]: `200 live` while the process answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness;

impl Readiness {
    /// The answer, for any request.
    pub(crate) fn response(&self) -> http::Response<String> {
        if self.0.ready() {
            plain(http::StatusCode::OK, "ready\n")
        } else {
            plain(http::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
    }
}

impl Liveness {
    /// The answer, for any request.
    pub(crate) fn response(&self) -> http::Response<String> {
        plain(http::StatusCode::OK, "live\n")
    }
}

/// A probe as a tower service: always ready, its `response` to any request.
macro_rules! probe_service {
    ($probe:ty) => {
        impl<B> tower_service::Service<http::Request<B>> for $probe {
            type Response = http::Response<String>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, _: http::Request<B>) -> Self::Future {
                std::future::ready(Ok(self.response()))
            }
        }
    };
}

probe_service!(Readiness);
probe_service!(Liveness);

/// A `text/plain` answer; never cached (a probe must see the state now).
fn plain(status: http::StatusCode, body: &'static str) -> http::Response<String> {
    let mut res = http::Response::new(body.to_owned());
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}
