//! A prefork server: a master forks its workers from a clean state, as
//! Apache prefork, flup and gunicorn do.
//!
//! # Example
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tower_exit::serve::prefork::Prefork;
//! use tower_exit::ServiceBuilderExt;
//!
//! # async fn handler(_: http::Request<hyper::body::Incoming>) -> Result<http::Response<String>, std::convert::Infallible> { todo!() }
//! fn main() -> std::io::Result<ExitCode> {
//!     let exit = Prefork::new("127.0.0.1:8080".parse().unwrap())
//!         .workers(4)
//!         .max_requests(1000)
//!         .stop_all_code(3)
//!         .run_http(|supervisor| {
//!             tower::ServiceBuilder::new()
//!                 .boundary(supervisor)
//!                 .catch_panic()
//!                 .service_fn(handler)
//!         })?;
//!     Ok(exit.into())
//! }
//! ```
//!
//! Call [`Prefork::run_http`] or [`Prefork::run_fastcgi`] at the top of
//! `main`, before any tokio runtime or thread exists. The master binds the
//! listener, forks the workers and then only watches them: it never creates
//! a runtime and handles its signals synchronously (blocked, then taken
//! with `sigtimedwait`), so no signal handler and no inherited runtime state
//! reaches a worker. Each worker builds its own single-threaded runtime and
//! serves the service its factory builds: run as many workers as cores.
//!
//! - **Recycling**: a worker that served `max_requests` (plus up to
//!   `max_requests_jitter`) requests records an [`Exit::success`] in its
//!   supervisor: it stops accepting, drains, exits 0, and the master starts
//!   a fresh one (gunicorn's `max_requests`).
//! - **Failures**: a worker that dies (signal) or exits non-zero is logged
//!   and replaced, with a growing delay while workers keep failing fast.
//! - **Stop all**: a worker that exits with the configured
//!   [`stop_all_code`](Prefork::stop_all_code) ends the whole server with
//!   that code (the other workers drain first): a worker's `exit(N)` can
//!   stop the server, which gunicorn cannot do.
//! - **Signals** (gunicorn's set): SIGTERM stops gracefully (workers drain),
//!   SIGINT and SIGQUIT stop at once, SIGHUP replaces every worker (new ones
//!   first, old ones drain), SIGTTIN adds a worker, SIGTTOU removes one.
//! - **No zombies, no orphans**: the master reaps each worker it forked (by
//!   pid) and waits for all of them before it returns; a worker dies with
//!   its master (`PR_SET_PDEATHSIG`), even if the master is killed.

use super::listen::StdListener;
use crate::fork::{self, Child};
use crate::serve::{ListenAddr, Listener, ServeService};
use crate::sys::{self, BlockedSignals};
use crate::{Exit, Supervisor};
use std::future::{Future, IntoFuture};
use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower_service::Service;

type OnBound = Arc<dyn Fn(&ListenAddr) + Send + Sync>;

/// A prefork server's configuration. See [the module docs](self).
#[derive(Clone)]
pub struct Prefork {
    listen: ListenAddr,
    workers: usize,
    max_requests: Option<u64>,
    jitter: u64,
    stop_all_code: Option<i32>,
    grace: Duration,
    on_bound: Option<OnBound>,
    restart_intensity: Option<(u32, Duration)>,
}

/// The most workers one master runs (`workers` and SIGTTIN stop there).
pub const MAX_WORKERS: usize = 1024;

impl std::fmt::Debug for Prefork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefork")
            .field("listen", &self.listen)
            .field("workers", &self.workers)
            .field("max_requests", &self.max_requests)
            .field("jitter", &self.jitter)
            .field("stop_all_code", &self.stop_all_code)
            .field("grace", &self.grace)
            .field("restart_intensity", &self.restart_intensity)
            .finish_non_exhaustive()
    }
}

impl Prefork {
    /// A master that will listen on `listen` with 2 workers.
    pub fn new(listen: ListenAddr) -> Self {
        Prefork {
            listen,
            workers: 2,
            max_requests: None,
            jitter: 0,
            stop_all_code: None,
            grace: super::DEFAULT_GRACE,
            on_bound: None,
            restart_intensity: None,
        }
    }

    /// Called in the master once the listener is bound, with the address
    /// actually bound (the port chosen for `:0`), before any worker starts.
    pub fn on_bound(mut self, f: impl Fn(&ListenAddr) + Send + Sync + 'static) -> Self {
        self.on_bound = Some(Arc::new(f));
        self
    }

    /// How many workers to run: 1 to [`MAX_WORKERS`] (default 2). Other
    /// values make `run_http`/`run_fastcgi` fail at once with
    /// [`io::ErrorKind::InvalidInput`].
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Stops the whole server (status 1) when workers fail `crashes` times
    /// within `within`, as OTP supervisors do, instead of respawning them
    /// forever. Off by default: failed workers are respawned after a
    /// backoff that doubles from 0.1 s to at most 10 s, reset by a worker
    /// that lived 5 s.
    pub fn restart_intensity(mut self, crashes: u32, within: Duration) -> Self {
        self.restart_intensity = Some((crashes.max(1), within));
        self
    }

    /// Recycle a worker after it served this many requests.
    pub fn max_requests(mut self, max_requests: u64) -> Self {
        self.max_requests = Some(max_requests.max(1));
        self
    }

    /// Add up to this many requests to each worker's `max_requests`, so
    /// that workers do not all recycle at once.
    pub fn max_requests_jitter(mut self, jitter: u64) -> Self {
        self.jitter = jitter;
        self
    }

    /// A worker exiting with this code ends the whole server with it.
    ///
    /// The code must be 1 to 255: 0 is the status of a worker recycling
    /// itself, and a process status has 8 bits. Other values make
    /// [`run_http`](Self::run_http) and [`run_fastcgi`](Self::run_fastcgi)
    /// fail at once with [`io::ErrorKind::InvalidInput`].
    pub fn stop_all_code(mut self, code: i32) -> Self {
        self.stop_all_code = Some(code);
        self
    }

    /// How long draining workers get on a graceful stop (default 30 s);
    /// after it, they are killed.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Runs the master, serving HTTP in each worker. Returns when the server
    /// stops: [`Exit::success`] after SIGTERM/SIGINT/SIGQUIT, or the
    /// stop-all exit of a worker.
    pub fn run_http<F, S>(self, factory: F) -> io::Result<Exit>
    where
        F: Fn(&Supervisor) -> S,
        S: ServeService<hyper::body::Incoming>,
    {
        let grace = self.grace;
        self.run(move |listener, supervisor, limit| {
            let svc = Recycle::new(factory(supervisor), supervisor, limit);
            crate::serve::http(listener, svc, supervisor)
                .grace(grace)
                .with_signals()
                .into_future()
        })
    }

    /// Runs the master, serving FastCGI in each worker. See
    /// [`run_http`](Self::run_http).
    pub fn run_fastcgi<F, S>(self, factory: F) -> io::Result<Exit>
    where
        F: Fn(&Supervisor) -> S,
        S: ServeService<crate::serve::fastcgi::RequestBody>,
    {
        let grace = self.grace;
        self.run(move |listener, supervisor, limit| {
            let svc = Recycle::new(factory(supervisor), supervisor, limit);
            crate::serve::fastcgi(listener, svc, supervisor)
                .grace(grace)
                .with_signals()
                .into_future()
        })
    }

    fn run<W, Fut>(self, serve: W) -> io::Result<Exit>
    where
        W: Fn(Listener, &Supervisor, Option<u64>) -> Fut,
        Fut: Future<Output = io::Result<Exit>>,
    {
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("workers({}): must be 1 to {MAX_WORKERS}", self.workers),
            ));
        }
        if let Some(code) = self.stop_all_code {
            if !(1..=255).contains(&code) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "stop_all_code({code}): must be 1 to 255 (0 is a worker recycling \
                         itself; a process status has 8 bits)"
                    ),
                ));
            }
        }
        let signals = BlockedSignals::block(&MASTER_SIGNALS)?;
        let listener = StdListener::bind(&self.listen)?;
        let bound = listener.local_addr()?;
        tracing::info!(listen = %bound, workers = self.workers, "prefork master started");
        if let Some(on_bound) = &self.on_bound {
            on_bound(&bound);
        }
        let mut master = Master {
            config: &self,
            listener: &listener,
            signals: &signals,
            serve: &serve,
            workers: Vec::new(),
            wanted: self.workers,
            failures: 0,
            next_spawn: Instant::now(),
            crashes: std::collections::VecDeque::new(),
            stop: None,
        };
        let exit = master.supervise();
        drop(master);
        let _ = signals.restore();
        // Every worker is gone: the socket file goes too.
        listener.remove_socket_if_bound_here();
        exit
    }
}

/// Why a worker is running, so its end is read right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Serving,
    /// Told to drain (SIGHUP, SIGTTOU, stopping): its end is not a failure
    /// and it is not replaced.
    Retiring,
}

struct Worker {
    child: Child,
    role: Role,
    started: Instant,
}

struct Master<'a, W> {
    config: &'a Prefork,
    listener: &'a StdListener,
    signals: &'a BlockedSignals,
    serve: &'a W,
    workers: Vec<Worker>,
    wanted: usize,
    /// Workers that failed in a row, for the respawn delay.
    failures: u32,
    next_spawn: Instant,
    /// When recent workers failed, for the restart intensity (at most as
    /// many entries as the crashes it allows).
    crashes: std::collections::VecDeque<Instant>,
    /// Set when the whole server must stop: a worker exited with the
    /// stop-all code, or the restart intensity was exceeded.
    stop: Option<Exit>,
}

impl<W, Fut> Master<'_, W>
where
    W: Fn(Listener, &Supervisor, Option<u64>) -> Fut,
    Fut: Future<Output = io::Result<Exit>>,
{
    fn supervise(&mut self) -> io::Result<Exit> {
        loop {
            self.reap()?;
            if let Some(exit) = self.stop_requested_by_worker() {
                return Ok(exit);
            }
            self.spawn_missing()?;
            match self.signals.wait(Duration::from_millis(100)) {
                Some(libc::SIGTERM) => {
                    tracing::info!("SIGTERM: graceful stop");
                    return self.stop_all(Exit::success().with_message("SIGTERM"), true);
                }
                Some(sig @ (libc::SIGINT | libc::SIGQUIT)) => {
                    tracing::info!(signal = sig, "fast stop");
                    return self.stop_all(Exit::success().with_message("fast stop"), false);
                }
                Some(libc::SIGHUP) => {
                    tracing::info!("SIGHUP: replacing every worker");
                    self.retire(self.serving_count());
                }
                Some(libc::SIGTTIN) if self.wanted >= MAX_WORKERS => {
                    tracing::warn!(workers = self.wanted, "SIGTTIN: already at the maximum");
                }
                Some(libc::SIGTTIN) => {
                    self.wanted += 1;
                    tracing::info!(workers = self.wanted, "SIGTTIN: one more worker");
                }
                Some(libc::SIGTTOU) if self.wanted > 1 => {
                    self.wanted -= 1;
                    tracing::info!(workers = self.wanted, "SIGTTOU: one worker less");
                    self.retire(1);
                }
                _ => {}
            }
        }
    }

    fn serving_count(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.role == Role::Serving)
            .count()
    }

    fn serving(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| self.workers[i].role == Role::Serving)
            .collect()
    }

    /// Tells the `n` oldest serving workers to drain.
    fn retire(&mut self, n: usize) {
        for i in self.serving().into_iter().take(n) {
            let worker = &mut self.workers[i];
            worker.role = Role::Retiring;
            let _ = worker.child.kill(libc::SIGTERM);
        }
    }

    fn spawn_missing(&mut self) -> io::Result<()> {
        while self.serving_count() < self.wanted {
            if Instant::now() < self.next_spawn {
                return Ok(());
            }
            let child = match self.spawn_worker() {
                // The master reaps on SIGCHLD and needs no pidfd; without
                // one, the next worker forked inherits none of its
                // siblings' (each pidfd would stay open in every younger
                // worker, and let it wait on or signal a sibling).
                Ok(child) => child.without_pidfd(),
                Err(err) => {
                    // Out of processes or memory: keep the workers we have
                    // and try again in a second.
                    tracing::error!(%err, "cannot fork a worker: trying again in 1 s");
                    self.next_spawn = Instant::now() + Duration::from_secs(1);
                    return Ok(());
                }
            };
            tracing::info!(pid = child.pid(), "worker started");
            self.workers.push(Worker {
                child,
                role: Role::Serving,
                started: Instant::now(),
            });
        }
        Ok(())
    }

    fn spawn_worker(&self) -> io::Result<Child> {
        let master = std::process::id();
        let limit = self
            .config
            .max_requests
            .map(|max| max + jitter(self.config.jitter));
        let listener = self.listener;
        let serve = self.serve;
        let signals = self.signals;
        fork::spawn(move || {
            // SIGKILL, not SIGTERM: a worker whose master was killed must
            // not linger through a graceful drain (it would serve alone for
            // up to the grace period); it ends at once, as the master did.
            sys::die_with_parent(libc::SIGKILL, master);
            if signals.restore().is_err() {
                crate::exit(1)
            }
            // One thread per worker: processes are the unit of parallelism
            // here, as in Apache prefork (run as many workers as cores).
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    tracing::error!(%err, "worker cannot build its runtime");
                    crate::exit(1)
                }
            };
            let exit = runtime.block_on(async {
                let listener = listener.to_tokio()?;
                let supervisor = Supervisor::new();
                serve(listener, &supervisor, limit).await
            });
            // Let the runtime's threads go before the process ends.
            runtime.shutdown_timeout(Duration::from_secs(1));
            match exit {
                Ok(exit) => exit.raise(),
                Err(err) => {
                    tracing::error!(%err, "worker failed");
                    crate::exit(1)
                }
            }
        })
    }

    /// Reaps every worker that ended, deciding what its end means.
    fn reap(&mut self) -> io::Result<()> {
        let mut i = 0;
        while i < self.workers.len() {
            let Some(status) = self.workers[i].child.try_wait()? else {
                i += 1;
                continue;
            };
            let worker = self.workers.swap_remove(i);
            self.ended(&worker, status);
        }
        Ok(())
    }

    fn ended(&mut self, worker: &Worker, status: ExitStatus) {
        let pid = worker.child.pid();
        let lived = worker.started.elapsed();
        match (worker.role, status.code()) {
            (Role::Retiring, _) => tracing::info!(pid, %status, "worker retired"),
            // Checked first; `run` refused a stop-all code of 0, which is
            // the status of a worker recycling itself.
            (Role::Serving, Some(code)) if Some(code) == self.config.stop_all_code => {
                tracing::warn!(pid, code, "worker asked to stop the server");
                self.stop = Some(Exit::new(code).with_message("a worker asked to stop the server"));
            }
            (Role::Serving, Some(0)) => {
                tracing::info!(pid, "worker recycled");
                self.failures = 0;
            }
            (Role::Serving, _) => {
                // Fast failures in a row back off: 0.1 s, 0.2 s, ... up to
                // 10 s; a worker that lived a while resets the count.
                if lived > Duration::from_secs(5) {
                    self.failures = 0;
                }
                self.failures += 1;
                let delay = Duration::from_millis(100) * 2u32.saturating_pow(self.failures - 1);
                let delay = delay.min(Duration::from_secs(10));
                tracing::warn!(pid, %status, respawn_in = ?delay, "worker failed: replacing it");
                self.next_spawn = Instant::now() + delay;
                if let Some((allowed, within)) = self.config.restart_intensity {
                    let now = Instant::now();
                    self.crashes.push_back(now);
                    while self.crashes.len() > allowed as usize
                        || self.crashes.front().is_some_and(|at| now - *at > within)
                    {
                        self.crashes.pop_front();
                    }
                    if self.crashes.len() >= allowed as usize {
                        tracing::error!(
                            crashes = allowed,
                            ?within,
                            "restart intensity exceeded: stopping the server"
                        );
                        self.stop = Some(Exit::failure(format!(
                            "workers failed {allowed} times within {within:?}: restart intensity exceeded"
                        )));
                    }
                }
            }
        }
    }

    fn stop_requested_by_worker(&mut self) -> Option<Exit> {
        let exit = self.stop.take()?;
        match self.stop_all(exit.clone(), true) {
            Ok(exit) => Some(exit),
            Err(err) => {
                tracing::error!(%err, "stopping workers failed");
                Some(exit)
            }
        }
    }

    /// Stops every worker (SIGTERM and a grace period, or SIGKILL at
    /// once), reaps them all, and returns `exit`.
    fn stop_all(&mut self, exit: Exit, graceful: bool) -> io::Result<Exit> {
        let signal = if graceful {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        };
        for worker in &mut self.workers {
            worker.role = Role::Retiring;
            let _ = worker.child.kill(signal);
        }
        let deadline = Instant::now() + self.config.grace + Duration::from_secs(1);
        while !self.workers.is_empty() {
            self.reap()?;
            if Instant::now() > deadline {
                tracing::warn!(
                    left = self.workers.len(),
                    "grace period over: killing the workers left"
                );
                for worker in &mut self.workers {
                    let _ = worker.child.kill(libc::SIGKILL);
                }
                for mut worker in self.workers.drain(..) {
                    let _ = worker.child.wait_blocking();
                }
                break;
            }
            // SIGCHLD wakes us; other signals wait until we are done.
            let _ = self.signals.wait(Duration::from_millis(50));
        }
        tracing::info!(%exit, "prefork master stopped");
        Ok(exit)
    }
}

/// A pseudo-random number in `0..=jitter`, different for each worker
/// spawned (time and pid mixed); no need for a random number generator.
fn jitter(jitter: u64) -> u64 {
    if jitter == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed = nanos ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    mixed % (jitter + 1)
}

/// The master's signals, blocked and taken synchronously with
/// `sigtimedwait` (see `sys::BlockedSignals`): no handler runs, nothing
/// async-signal-unsafe can happen, and a forked worker restores the mask
/// it had before.
const MASTER_SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
];

/// Counts requests and records an exit when a worker served its share.
#[derive(Clone)]
struct Recycle<S> {
    inner: S,
    served: Arc<AtomicU64>,
    limit: Option<u64>,
    supervisor: Supervisor,
}

impl<S> Recycle<S> {
    fn new(inner: S, supervisor: &Supervisor, limit: Option<u64>) -> Self {
        Recycle {
            inner,
            served: Arc::new(AtomicU64::new(0)),
            limit,
            supervisor: supervisor.clone(),
        }
    }
}

impl<S, Req> Service<Req> for Recycle<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(limit) = self.limit {
            if self.served.fetch_add(1, Ordering::Relaxed) + 1 == limit {
                // The worker's own exit: it stops accepting, drains, and
                // ends with status 0 for the master to replace it.
                self.supervisor
                    .trigger(Exit::success().with_message("recycling: max_requests reached"));
            }
        }
        self.inner.call(req)
    }
}
