//! A prefork server: a master forks its workers from a clean state, as
//! Apache prefork, flup and gunicorn do.
//!
//! # Example
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tower_exit::serve::prefork::Prefork;
//! use tower_exit::TracingReporter;
//!
//! # async fn handler(_: http::Request<tower_exit::serve::http::RequestBody>) -> Result<http::Response<String>, std::convert::Infallible> { todo!() }
//! fn main() -> std::io::Result<ExitCode> {
//!     let exit = Prefork::new("127.0.0.1:8080".parse().unwrap())
//!         .workers(4)
//!         .max_requests(1000)
//!         .stop_all_code(3)
//!         .run_http(|supervisor| {
//!             tower::ServiceBuilder::new()
//!                 .layer(supervisor.stack().report(TracingReporter))
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
//!   first; the old ones drain once every new one accepts), SIGTTIN adds a
//!   worker, SIGTTOU removes one. SIGUSR2 upgrades: the command the master
//!   was started with starts again (so a deploy by rename or by symlink
//!   runs the new binary; see [`Prefork::upgrade_command`]) as a new master
//!   on the inherited listening socket (fd 3), and the old master's
//!   workers drain once the new one's workers accept. The old master stays
//!   for a [rollback window](Prefork::rollback_window): SIGTERM to the new
//!   master within it rolls back without a failed request.
//! - **Hung workers and memory**: [`Prefork::timeout`] kills a worker whose
//!   runtime stopped beating; [`Prefork::max_rss`] recycles a worker past a
//!   resident-memory limit.
//! - **systemd**: [`Prefork::socket_activated`] serves on the socket systemd
//!   passes; the master notifies `READY=1`, `RELOADING=1`, `STOPPING=1`,
//!   `WATCHDOG=1` when `NOTIFY_SOCKET` is set.
//! - **No zombies, no orphans**: the master reaps each worker it forked (by
//!   pid) and waits for all of them before it returns; a worker dies with
//!   its master (`PR_SET_PDEATHSIG`), even if the master is killed.

use super::listen::{set_socket_mode, set_socket_owner, StdListener};
use crate::fork::{self, Child};
use crate::serve::{ListenAddr, Listener, ServeService};
use crate::sys::{self, BlockedSignals, SharedCounters};
use crate::{Exit, Supervisor};
use std::future::{Future, IntoFuture};
use std::io;
use std::os::fd::AsFd;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type OnBound = Arc<dyn Fn(&ListenAddr) + Send + Sync>;
type Hook = Arc<dyn Fn() + Send + Sync>;
type OnWorkerEnded = Arc<dyn Fn(u32, ExitStatus) + Send + Sync>;

/// The master's hooks (see [`Prefork::before_fork`] and friends).
#[derive(Clone, Default)]
struct Hooks {
    before_fork: Option<Hook>,
    worker_started: Option<Hook>,
    worker_ended: Option<OnWorkerEnded>,
}

/// A prefork server's configuration. See [the module docs](self).
#[derive(Clone)]
pub struct Prefork {
    listen: ListenAddr,
    workers: usize,
    max_requests: Option<u64>,
    jitter: u64,
    stop_all_code: Option<i32>,
    grace: Duration,
    shutdown_delay: Duration,
    #[cfg(feature = "http")]
    min_response_rate: Option<(u64, Duration)>,
    #[cfg(feature = "http")]
    min_request_body_rate: Option<(u64, Duration)>,
    on_bound: Option<OnBound>,
    restart_intensity: Option<(u32, Duration)>,
    timeout: Option<Duration>,
    max_rss: Option<u64>,
    hooks: Hooks,
    /// The socket systemd passed (socket activation), instead of binding.
    inherited: Option<Arc<std::os::fd::OwnedFd>>,
    /// What SIGUSR2 starts, when set by the caller.
    upgrade_command: Option<std::path::PathBuf>,
    /// How long an old master stays after an upgrade's hand-over, to serve
    /// again if the new master ends.
    rollback_window: Duration,
    /// A unix socket's mode, owner and group, set after binding it.
    socket_mode: Option<u32>,
    socket_owner: (Option<u32>, Option<u32>),
}

/// The most workers one master runs (`workers` and SIGTTIN stop there).
pub const MAX_WORKERS: usize = 1024;

/// How long an old master stays after an upgrade's hand-over, by default;
/// see [`Prefork::rollback_window`].
pub const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(30);

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
            .field("timeout", &self.timeout)
            .field("max_rss", &self.max_rss)
            .field("rollback_window", &self.rollback_window)
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
            shutdown_delay: Duration::ZERO,
            #[cfg(feature = "http")]
            min_response_rate: None,
            #[cfg(feature = "http")]
            min_request_body_rate: None,
            on_bound: None,
            restart_intensity: None,
            timeout: None,
            max_rss: None,
            upgrade_command: None,
            rollback_window: DEFAULT_ROLLBACK_WINDOW,
            socket_mode: None,
            socket_owner: (None, None),
            hooks: Hooks::default(),
            inherited: None,
        }
    }

    /// Whether systemd passed this process sockets to serve on (socket
    /// activation: `LISTEN_PID` is this process, `LISTEN_FDS` is set).
    pub fn is_socket_activated() -> bool {
        std::env::var("LISTEN_PID").is_ok_and(|pid| pid == std::process::id().to_string())
            && std::env::var_os("LISTEN_FDS").is_some()
    }

    /// A master that serves on the one socket systemd passed (socket
    /// activation, `LISTEN_FDS`/`LISTEN_PID`; see `systemd.socket(5)`),
    /// instead of binding one. An error if there is not exactly one.
    ///
    /// Under systemd (`NOTIFY_SOCKET` set, `Type=notify`), every master
    /// also says `READY=1` once its workers accept, `RELOADING=1` and
    /// `READY=1` around a SIGHUP, `STOPPING=1` when it drains, and
    /// `WATCHDOG=1` at half of `WATCHDOG_USEC` when that is set.
    pub fn socket_activated() -> io::Result<Self> {
        let fds: Vec<_> = sd_notify::listen_fds()?.collect();
        let [fd] = fds[..] else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "socket activation: expected one socket from the service manager, got {}",
                    fds.len()
                ),
            ));
        };
        let fd = sys::inherited_fd(fd)?;
        let listen = StdListener::from_fd(fd.try_clone()?)?.local_addr()?;
        let mut prefork = Prefork::new(listen);
        prefork.inherited = Some(Arc::new(fd));
        Ok(prefork)
    }

    /// Kills a worker that shows no sign of life for `timeout` (its thread
    /// blocked: a handler stuck in a lock, a loop, a blocking call), logs
    /// its pid and how long it was silent, and starts another. Off by
    /// default. Each worker beats from its own runtime, a few times per
    /// `timeout` (at most every second), so a handler that only awaits is
    /// never killed, however long it takes.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout.max(Duration::from_millis(200)));
        self
    }

    /// Recycles a worker whose resident memory passes `bytes`: it finishes
    /// what it accepted, drains and exits 0, and the master starts a fresh
    /// one (logged with the figure). Its peak resident memory (one
    /// `getrusage`, about 0.9 µs) is checked at the end of every request
    /// and every 10 ms (growth outside requests), so a worker overshoots by
    /// what the requests in flight when it crosses the limit allocate. Off
    /// by default.
    pub fn max_rss(mut self, bytes: u64) -> Self {
        self.max_rss = Some(bytes);
        self
    }

    /// Runs `hook` in the master just before it forks each worker.
    pub fn before_fork(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hooks.before_fork = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` in each new worker, first thing, before its runtime
    /// exists.
    pub fn worker_started(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hooks.worker_started = Some(Arc::new(hook));
        self
    }

    /// Runs `hook` in the master when a worker ended (and was reaped), with
    /// its pid and status.
    pub fn worker_ended(mut self, hook: impl Fn(u32, ExitStatus) + Send + Sync + 'static) -> Self {
        self.hooks.worker_ended = Some(Arc::new(hook));
        self
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

    /// Recycle a worker after it served this many requests, exactly: it
    /// accepts no more connections than its remaining budget and closes a
    /// keep-alive connection when the budget is spent (see
    /// `serve::budget`), so it never serves one more (gunicorn's sync
    /// worker). Each open connection holds a unit for its next request;
    /// under HTTP, while connections hold every unit and a client waits in
    /// the backlog, those silent since they were accepted (250 ms or more)
    /// are closed at once, then, every 50 ms, the keep-alive connection
    /// idle the longest (1 s or more). For FastCGI, a kept connection is
    /// closed after the END_REQUEST of the last request the budget allows
    /// (and a close notice, see [`serve::fastcgi`](mod@crate::serve::fastcgi)),
    /// and, while open connections hold every unit, one idle for 1 s (or
    /// silent for 250 ms since it was accepted) closes; only a request
    /// multiplexed past the budget on one connection gets `503`.
    pub fn max_requests(mut self, max_requests: u64) -> Self {
        self.max_requests = Some(max_requests.max(1));
        self
    }

    /// Add up to this many requests to each worker's `max_requests`, so
    /// that workers do not all recycle at once (default 0: exactly
    /// `max_requests`).
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

    /// The mode of the unix socket the master binds (default: what the
    /// umask leaves, usually `0755`, so that only this user may connect);
    /// see [`Listener::socket_mode`]. Not applied to a socket systemd
    /// passes (its unit's `SocketMode=` says) or one inherited by a new
    /// master (it keeps the old one's).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = Some(mode);
        self
    }

    /// The owner and group of the unix socket the master binds; see
    /// [`Listener::socket_owner`] and [`socket_mode`](Self::socket_mode).
    pub fn socket_owner(mut self, uid: Option<u32>, gid: Option<u32>) -> Self {
        self.socket_owner = (uid, gid);
        self
    }

    /// What SIGUSR2 starts as the new master (with this master's arguments
    /// and its listening socket). Default: the command this master was
    /// started with, `argv[0]` resolved against the directory it started
    /// in (searched in `PATH` when it has no `/`, as the shell did), so that
    /// a deploy by rename (`mv -f app.new app`) or by symlink
    /// (`current -> v2`) starts the new binary, as unicorn and gunicorn do.
    /// Set it when the master is started through a wrapper.
    pub fn upgrade_command(mut self, command: impl Into<std::path::PathBuf>) -> Self {
        self.upgrade_command = Some(command.into());
        self
    }

    /// How long the old master stays after an upgrade's hand-over (default
    /// [`DEFAULT_ROLLBACK_WINDOW`], 30 s): its workers drain, it keeps the
    /// listening socket, and if the new master ends within the window (it
    /// crashed, or an operator stopped it: a rollback) the old master forks
    /// workers again and serves, as unicorn's old master does until told to
    /// quit. `Duration::ZERO`: the old master ends with its workers.
    ///
    /// Signals during an upgrade, told apart by their sender's pid (the
    /// new master's hand-over SIGTERM is not an operator's):
    ///
    /// | signal, to | before the new master accepts | within the rollback window |
    /// |---|---|---|
    /// | SIGTERM, old master | stops both masters (the upgrade is abandoned) | the upgrade is kept: the old master ends now |
    /// | SIGTERM, new master | the new master stops; the old one serves on | rollback: the old master forks workers; once they accept, the new master drains (no request fails) |
    /// | SIGKILL, new master | the old master serves on | the old master forks workers again (requests in flight on the new master's workers are lost) |
    /// | SIGTERM from pid 1 (the service manager), new master | — | the unit stops: no rollback; the old master is told to end (SIGQUIT) |
    pub fn rollback_window(mut self, window: Duration) -> Self {
        self.rollback_window = window;
        self
    }

    /// How long draining workers get on a graceful stop (default 30 s);
    /// after it, they are killed.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// On SIGTERM, workers keep accepting and serving for `delay` while
    /// their readiness answers `503` (HTTP/1 responses say `connection:
    /// close`, HTTP/2 connections get GOAWAY), then drain (default zero);
    /// see [`ServeHttp::shutdown_delay`](crate::serve::ServeHttp::shutdown_delay).
    /// The master says `STOPPING=1` at the delay's start and logs each
    /// phase; workers are killed only after delay + grace. A worker
    /// replaced on SIGHUP waits the delay too (beside its replacement).
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.shutdown_delay = delay;
        self
    }

    /// HTTP workers: the slowest a client may take a response; see
    /// [`ServeHttp::min_response_rate`](crate::serve::ServeHttp::min_response_rate)
    /// (default 240 bytes a second after 5 s).
    #[cfg(feature = "http")]
    pub fn min_response_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_response_rate = Some((bytes_per_sec, grace));
        self
    }

    /// HTTP workers: the slowest a client may send a request body; see
    /// [`ServeHttp::min_request_body_rate`](crate::serve::ServeHttp::min_request_body_rate)
    /// (default 240 bytes a second after 5 s).
    #[cfg(feature = "http")]
    pub fn min_request_body_rate(mut self, bytes_per_sec: u64, grace: Duration) -> Self {
        self.min_request_body_rate = Some((bytes_per_sec, grace));
        self
    }

    #[cfg(feature = "http")]
    /// Runs the master, serving HTTP in each worker. Returns when the server
    /// stops: [`Exit::success`] after SIGTERM/SIGINT/SIGQUIT, or the
    /// stop-all exit of a worker.
    pub fn run_http<F, S>(self, factory: F) -> io::Result<Exit>
    where
        F: Fn(&Supervisor) -> S,
        S: ServeService<super::http::RequestBody>,
    {
        let (grace, delay) = (self.grace, self.shutdown_delay);
        let (response_rate, body_rate) = (self.min_response_rate, self.min_request_body_rate);
        self.run(move |listener, supervisor, limit| {
            let mut serve = crate::serve::http(listener, factory(supervisor), supervisor)
                .grace(grace)
                .shutdown_delay(delay)
                .with_signals();
            if let Some((bytes_per_sec, grace)) = response_rate {
                serve = serve.min_response_rate(bytes_per_sec, grace);
            }
            if let Some((bytes_per_sec, grace)) = body_rate {
                serve = serve.min_request_body_rate(bytes_per_sec, grace);
            }
            if let Some(limit) = limit {
                serve = serve.max_requests(limit);
            }
            serve.into_future()
        })
    }

    #[cfg(feature = "fastcgi")]
    /// Runs the master, serving FastCGI in each worker. See
    /// [`run_http`](Self::run_http).
    pub fn run_fastcgi<F, S>(self, factory: F) -> io::Result<Exit>
    where
        F: Fn(&Supervisor) -> S,
        S: ServeService<crate::serve::fastcgi::RequestBody>,
    {
        let (grace, delay) = (self.grace, self.shutdown_delay);
        self.run(move |listener, supervisor, limit| {
            let mut serve = crate::serve::fastcgi(listener, factory(supervisor), supervisor)
                .grace(grace)
                .shutdown_delay(delay)
                .with_signals();
            if let Some(limit) = limit {
                serve = serve.max_requests(limit);
            }
            serve.into_future()
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
        let upgraded_from = upgraded_from();
        let listener = match (&self.inherited, upgraded_from) {
            // Started by an old master's SIGUSR2: its socket is our fd 3.
            (_, Some(_)) => StdListener::from_fd(sys::inherited_fd(3)?)?,
            (Some(fd), None) => StdListener::from_fd(fd.try_clone()?)?,
            (None, None) => {
                let listener = StdListener::bind(&self.listen)?;
                if let ListenAddr::Unix(path) = &self.listen {
                    if self.socket_owner != (None, None) {
                        set_socket_owner(path, self.socket_owner.0, self.socket_owner.1)?;
                    }
                    if let Some(mode) = self.socket_mode {
                        set_socket_mode(path, mode)?;
                    }
                }
                listener
            }
        };
        let bound = listener.local_addr()?;
        tracing::info!(listen = %bound, workers = self.workers, "prefork master started");
        if let Some(on_bound) = &self.on_bound {
            on_bound(&bound);
        }
        let beats = SharedCounters::new(2 * MAX_WORKERS)?;
        let mut master = Master {
            config: &self,
            listener: &listener,
            signals: &signals,
            serve: &serve,
            beats: &beats,
            free_slots: (0..2 * MAX_WORKERS).rev().collect(),
            reloading: None,
            upgrading: None,
            started_as: self.upgrade_command.clone().or_else(started_as),
            upgraded_from,
            old_master: upgraded_from,
            giving_back: None,
            handed_over: false,
            told_ready: false,
            watchdog: watchdog_period().map(|every| (every, Instant::now())),
            workers: Vec::new(),
            wanted: self.workers,
            accepted: 0,
            failures: 0,
            next_spawn: Instant::now(),
            crashes: std::collections::VecDeque::new(),
            stop: None,
        };
        let exit = master.supervise();
        let handed_over = master.handed_over;
        drop(master);
        let _ = signals.restore();
        // Every worker is gone: the socket file goes too, unless a new
        // master serves on it now.
        if !handed_over {
            listener.remove_socket_if_bound_here();
        }
        exit
    }
}

/// Why a worker is running, so its end is read right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Serving,
    /// Serving until its replacement accepts (SIGHUP); not counted as
    /// serving, so the replacement is started.
    Outgoing,
    /// Told to drain (SIGHUP, SIGTTOU, stopping): its end is not a failure
    /// and it is not replaced.
    Retiring,
    /// Killed for its silence (`timeout`): replaced at once.
    Hung,
    /// Draining by itself (its budget spent, `max_rss`, an exit): not
    /// counted as serving, so its replacement is forked now; its end is
    /// read as a serving worker's (recycled, failed, or the stop-all code).
    Draining,
}

/// An upgrade a master started (SIGUSR2), seen from that (old) master:
/// the new master, and where the upgrade stands.
struct Upgrade {
    child: std::process::Child,
    state: UpgradeState,
}

enum UpgradeState {
    /// The new master starts; this one serves on.
    Starting,
    /// The new master accepts and told this one so (SIGTERM): this one's
    /// workers drain; it keeps the socket until `until` (the rollback
    /// window), to serve again if the new master ends.
    HandedOver { until: Instant },
    /// The new master hands back (an operator stopped it): this one serves
    /// again, and tells it to drain (`told`) once its workers accept.
    TakingBack { told: bool },
}

impl Upgrade {
    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }
}

struct Worker {
    child: Child,
    role: Role,
    started: Instant,
    /// Its heartbeat counter in the shared mapping.
    slot: usize,
    /// The last count seen, and when it changed (or the fork).
    beat: u64,
    beat_changed: Instant,
    /// Seen to accept (its counter moved), and counted in
    /// `Master::accepted` if it serves.
    accepted: bool,
}

impl Worker {
    /// Reads its counter `beat`: 1 the first time it shows the worker
    /// accepts while it serves (a worker counts from its runtime's start;
    /// one that drains by itself has served), else 0.
    fn saw(&mut self, beat: u64) -> usize {
        if self.accepted || beat == 0 {
            return 0;
        }
        self.accepted = true;
        usize::from(matches!(self.role, Role::Serving | Role::Draining))
    }
}

struct Master<'a, W> {
    config: &'a Prefork,
    listener: &'a StdListener,
    signals: &'a BlockedSignals,
    serve: &'a W,
    /// One heartbeat counter per worker slot, shared with the workers.
    beats: &'a SharedCounters,
    free_slots: Vec<usize>,
    /// When a SIGHUP started replacing the workers.
    reloading: Option<Instant>,
    /// The upgrade this master started (SIGUSR2), until it ends.
    upgrading: Option<Upgrade>,
    /// What SIGUSR2 starts (see `Prefork::upgrade_command`).
    started_as: Option<std::path::PathBuf>,
    /// The old master that started this one (SIGUSR2), told to drain once
    /// this one's workers accept (taken then).
    upgraded_from: Option<u32>,
    /// The same old master, for a rollback: while it is still this
    /// master's parent (in its rollback window), an operator's SIGTERM
    /// hands back to it before this master drains.
    old_master: Option<u32>,
    /// Since when this (new) master waits for its old master to serve
    /// again (see `old_master`).
    giving_back: Option<Instant>,
    /// A new master took over: the socket stays.
    handed_over: bool,
    /// `READY=1` was sent.
    told_ready: bool,
    /// systemd's watchdog: how often to say `WATCHDOG=1`, and when it was.
    watchdog: Option<(Duration, Instant)>,
    workers: Vec<Worker>,
    wanted: usize,
    /// Serving workers seen to accept since the workers of the moment were
    /// wanted (the start, a SIGHUP, a take-back), each counted once, alive
    /// or ended: what READY, a reload's end, an upgrade's hand-over and a
    /// rollback wait for (`ready`). Counted when first seen, not as "every
    /// worker accepts at one look": while workers recycle every few
    /// milliseconds (a small `max_requests` under load) one may fork,
    /// accept, drain and end between two looks of the master, and no look
    /// may ever find them all accepting.
    accepted: usize,
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
            // First what changes the workers wanted: a worker that started
            // draining is replaced now, and a new master that ended within
            // the rollback window has the workers forked again now.
            self.check_heartbeats();
            if let Some(exit) = self.check_upgrade() {
                return exit;
            }
            if let Some(exit) = self.check_giving_back() {
                return exit;
            }
            // Handed over: the workers drained, none is forked until a
            // rollback.
            if !self.handed_over {
                self.spawn_missing()?;
            }
            self.finish_reload();
            self.tell_systemd();
            let Some((signal, from)) = self.signals.wait_from(Duration::from_millis(100)) else {
                continue;
            };
            match signal {
                libc::SIGTERM => {
                    if let Some(exit) = self.sigterm(from) {
                        return exit;
                    }
                }
                libc::SIGUSR2 => self.sigusr2(from),
                sig @ (libc::SIGINT | libc::SIGQUIT) => {
                    tracing::info!(signal = sig, "fast stop");
                    return self.stop_all(Exit::success().with_message("fast stop"), false);
                }
                // Handed over: the new master has the workers (and speaks
                // to systemd); a reload here would say RELOADING=1 for it.
                libc::SIGHUP if self.handed_over => {
                    tracing::warn!("SIGHUP to an old master after the hand-over: ignored (send it to the new master)");
                }
                libc::SIGHUP => {
                    tracing::info!("SIGHUP: replacing every worker (new ones first)");
                    for worker in &mut self.workers {
                        if worker.role == Role::Serving {
                            worker.role = Role::Outgoing;
                        }
                    }
                    self.reloading = Some(Instant::now());
                    self.accepted = 0;
                    notify(&[
                        sd_notify::NotifyState::Reloading,
                        sd_notify::NotifyState::monotonic_usec_now()
                            .unwrap_or(sd_notify::NotifyState::MonotonicUsec(0)),
                    ]);
                }
                libc::SIGTTIN if self.wanted >= MAX_WORKERS => {
                    tracing::warn!(workers = self.wanted, "SIGTTIN: already at the maximum");
                }
                libc::SIGTTIN => {
                    self.wanted += 1;
                    tracing::info!(workers = self.wanted, "SIGTTIN: one more worker");
                }
                libc::SIGTTOU if self.wanted > 1 => {
                    self.wanted -= 1;
                    tracing::info!(workers = self.wanted, "SIGTTOU: one worker less");
                    self.retire(1);
                }
                _ => {}
            }
        }
    }

    /// SIGTERM, from `from`: the new master's hand-over, an old master
    /// serving again, or an operator's stop (see
    /// [`Prefork::rollback_window`]). `Some` when this master is done.
    fn sigterm(&mut self, from: libc::pid_t) -> Option<io::Result<Exit>> {
        if let Some(upgrade) = &mut self.upgrading {
            let new_master = upgrade.child.id();
            match (&upgrade.state, from == upgrade.pid()) {
                (UpgradeState::Starting, true) => {
                    self.handed_over = true;
                    if self.config.rollback_window.is_zero() {
                        tracing::info!("the new master took over: draining");
                        return Some(self.stop_all(Exit::success().with_message("upgraded"), true));
                    }
                    tracing::info!(
                        new_master,
                        rollback_window = ?self.config.rollback_window,
                        "the new master took over: workers drain; this master stays for the rollback window"
                    );
                    upgrade.state = UpgradeState::HandedOver {
                        until: Instant::now() + self.config.rollback_window,
                    };
                    for worker in &mut self.workers {
                        if worker.role != Role::Retiring {
                            worker.role = Role::Retiring;
                            let _ = worker.child.kill(libc::SIGTERM);
                        }
                    }
                    return None;
                }
                // A hand-over after the new master asked to hand back: the
                // rollback stands.
                (_, true) => {
                    tracing::debug!("a late hand-over from the new master: ignored");
                    return None;
                }
                (UpgradeState::HandedOver { .. }, false) => {
                    tracing::info!(
                        "SIGTERM within the rollback window: the upgrade stays; this master ends"
                    );
                    return Some(self.stop_all(Exit::success().with_message("upgraded"), true));
                }
                (UpgradeState::Starting | UpgradeState::TakingBack { .. }, false) => {
                    tracing::info!(
                        new_master,
                        "SIGTERM during an upgrade: stopping this master and the new one"
                    );
                    let _ = sys::kill(upgrade.pid(), libc::SIGTERM);
                    let delay = self.config.shutdown_delay;
                    let exit = self.stop_all_after(Exit::success().with_message("SIGTERM"), delay);
                    self.reap_new_master();
                    return Some(exit);
                }
            }
        }
        if self.giving_back.is_some() && self.old_master.map(|pid| pid as libc::pid_t) == Some(from)
        {
            tracing::info!("the old master serves again: draining");
            self.handed_over = true;
            return Some(self.stop_all(Exit::success().with_message("rolled back"), true));
        }
        let from_old_master = self.old_master.map(|pid| pid as libc::pid_t) == Some(from);
        // pid 1 is the service manager (systemd with `KillMode=mixed`
        // signals only the main process): the unit stops, nothing rolls
        // back, and the old master waiting in its window ends too.
        if from == 1 && !from_old_master && self.old_master_waits() {
            let old = self.old_master.unwrap_or_default();
            tracing::info!(
                old_master = old,
                "SIGTERM from the service manager: stopping; the old master ends too"
            );
            let _ = sys::kill(old as libc::pid_t, libc::SIGQUIT);
        } else if self.giving_back.is_none()
            && self.told_ready
            && !from_old_master
            && self.old_master_waits()
        {
            let old = self.old_master.unwrap_or_default();
            tracing::info!(
                old_master = old,
                "SIGTERM within the old master's rollback window: handing back to it, then draining"
            );
            match sys::kill(old as libc::pid_t, libc::SIGUSR2) {
                Ok(()) => {
                    self.giving_back = Some(Instant::now());
                    return None;
                }
                Err(err) => tracing::warn!(%err, old_master = old, "cannot hand back"),
            }
        }
        tracing::info!("SIGTERM: graceful stop");
        let delay = self.config.shutdown_delay;
        Some(self.stop_all_after(Exit::success().with_message("SIGTERM"), delay))
    }

    /// Whether the old master that started this one still waits in its
    /// rollback window: it is still this master's parent (once it ended,
    /// this master was adopted by another process).
    fn old_master_waits(&self) -> bool {
        let parent = std::os::unix::process::parent_id();
        self.old_master.is_some_and(|old| old == parent)
    }

    /// This (new) master handed back: once the old master serves again it
    /// says so (SIGTERM, see `sigterm`). If it ended meanwhile, or does not
    /// answer within the grace period, this master stops anyway.
    fn check_giving_back(&mut self) -> Option<io::Result<Exit>> {
        let since = self.giving_back?;
        if self.old_master_waits() && since.elapsed() < self.config.grace {
            return None;
        }
        tracing::warn!("the old master did not take back: draining anyway");
        let delay = self.config.shutdown_delay;
        Some(self.stop_all_after(Exit::success().with_message("SIGTERM"), delay))
    }

    /// SIGUSR2, from `from`: the new master handing back (its operator's
    /// SIGTERM), or an operator's upgrade.
    fn sigusr2(&mut self, from: libc::pid_t) {
        let Some(upgrade) = &mut self.upgrading else {
            self.upgrade();
            return;
        };
        if from != upgrade.pid() {
            tracing::warn!("SIGUSR2: an upgrade is already under way");
            return;
        }
        let new_master = upgrade.child.id();
        match upgrade.state {
            UpgradeState::Starting => {
                // This master's workers still serve: the new one may drain
                // at once.
                tracing::info!(
                    new_master,
                    "the new master hands back before taking over: it drains"
                );
                let _ = sys::kill(upgrade.pid(), libc::SIGTERM);
                upgrade.state = UpgradeState::TakingBack { told: true };
            }
            UpgradeState::HandedOver { .. } => {
                tracing::info!(
                    new_master,
                    "rollback: the new master hands back; forking workers again"
                );
                upgrade.state = UpgradeState::TakingBack { told: false };
                self.handed_over = false;
                self.told_ready = false;
                self.accepted = 0;
            }
            UpgradeState::TakingBack { .. } => {}
        }
    }

    /// SIGUSR2: starts a new master from the command this one was started
    /// with (the binary on disk now: new code), with the same arguments and
    /// the listening socket as its descriptor 3.
    /// This one serves on until the new one's workers accept; then the new
    /// one sends it SIGTERM and its workers drain (see
    /// [`Prefork::rollback_window`] for what follows).
    fn upgrade(&mut self) {
        let Some(exe) = self.started_as.as_ref() else {
            tracing::error!("SIGUSR2: no command to start (argv[0] is empty): not upgrading");
            return;
        };
        tracing::info!(command = %exe.display(), "SIGUSR2: starting a new master");
        let mut command = std::process::Command::new(exe);
        command
            .args(std::env::args_os().skip(1))
            .env(UPGRADE_FROM, std::process::id().to_string());
        match sys::spawn_with_listener(command, self.listener.as_fd(), self.signals) {
            Ok(child) => {
                tracing::info!(
                    pid = child.id(),
                    "SIGUSR2: new master started; serving on until it accepts"
                );
                self.upgrading = Some(Upgrade {
                    child,
                    state: UpgradeState::Starting,
                });
            }
            Err(err) => tracing::error!(%err, "SIGUSR2: cannot start a new master: not upgrading"),
        }
    }

    /// Follows the upgrade under way: a new master that ended (before
    /// taking over: this one serves on; within the rollback window: this
    /// one serves again), the end of the rollback window (`Some`: this
    /// master is done), a rollback whose workers now accept (the new
    /// master is told to drain).
    fn check_upgrade(&mut self) -> Option<io::Result<Exit>> {
        let ready = self.ready();
        let upgrade = self.upgrading.as_mut()?;
        let pid = upgrade.child.id();
        let ended = match upgrade.child.try_wait() {
            Ok(ended) => ended,
            Err(err) => {
                tracing::warn!(%err, "cannot wait for the new master");
                None
            }
        };
        match (&mut upgrade.state, ended) {
            (UpgradeState::Starting, Some(status)) => {
                tracing::error!(pid, %status, "upgrade failed: the new master ended; serving on");
                self.upgrading = None;
            }
            (UpgradeState::HandedOver { .. }, Some(status)) => {
                tracing::warn!(
                    pid,
                    %status,
                    "rollback: the new master ended within the rollback window; forking workers again"
                );
                self.upgrading = None;
                self.handed_over = false;
                self.told_ready = false;
                self.accepted = 0;
            }
            (UpgradeState::HandedOver { until }, None) if Instant::now() >= *until => {
                tracing::info!("rollback window over: this master ends");
                self.upgrading = None;
                return Some(self.stop_all(Exit::success().with_message("upgraded"), true));
            }
            (UpgradeState::TakingBack { .. }, Some(status)) => {
                tracing::info!(pid, %status, "rolled back: the new master ended; this master serves");
                self.upgrading = None;
            }
            (UpgradeState::TakingBack { told }, None) if !*told && ready => {
                tracing::info!(
                    new_master = pid,
                    "rollback: this master's workers accept; the new master drains"
                );
                let _ = sys::kill(pid as libc::pid_t, libc::SIGTERM);
                *told = true;
            }
            _ => {}
        }
        None
    }

    /// After this master stopped during an upgrade, having told the new
    /// master to stop too: waits for it (its grace, and a second), then
    /// kills it, so it is reaped here, not left to another process.
    fn reap_new_master(&mut self) {
        let Some(Upgrade { mut child, .. }) = self.upgrading.take() else {
            return;
        };
        let deadline = Instant::now() + self.config.grace + Duration::from_secs(1);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            let _ = self.signals.wait(Duration::from_millis(50));
        }
        tracing::warn!(
            pid = child.id(),
            "the new master did not stop within the grace period: killed"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the workers silent for longer than the timeout; counts a
    /// worker that started draining by itself (its budget spent, its
    /// memory past `max_rss`, an exit) as leaving, so that its replacement
    /// is forked now, not once it ended: clients it keeps until its grace
    /// runs out (an idle HTTP/2 connection) do not keep new ones waiting.
    fn check_heartbeats(&mut self) {
        let now = Instant::now();
        for worker in &mut self.workers {
            let beat = self.beats.get(worker.slot).load(Ordering::Acquire);
            self.accepted += worker.saw(beat);
            if beat & DRAINING != 0 && worker.role == Role::Serving {
                tracing::info!(
                    pid = worker.child.pid(),
                    "worker draining: forking its replacement now"
                );
                worker.role = Role::Draining;
            }
            if beat != worker.beat {
                worker.beat = beat;
                worker.beat_changed = now;
                continue;
            }
            let Some(timeout) = self.config.timeout else {
                continue;
            };
            let silent = now - worker.beat_changed;
            if silent > timeout && worker.role != Role::Hung {
                tracing::warn!(
                    pid = worker.child.pid(),
                    silent = ?silent,
                    "worker silent for longer than the timeout: killed (SIGKILL), replacing it"
                );
                let _ = worker.child.kill(libc::SIGKILL);
                worker.role = Role::Hung;
            }
        }
    }

    /// After a SIGHUP: once as many new workers as wanted were seen to
    /// accept (see `accepted`), the old ones drain.
    fn finish_reload(&mut self) {
        let Some(started) = self.reloading else {
            return;
        };
        if !self.ready() {
            return;
        }
        let mut old = 0;
        for worker in &mut self.workers {
            if worker.role == Role::Outgoing {
                worker.role = Role::Retiring;
                let _ = worker.child.kill(libc::SIGTERM);
                old += 1;
            }
        }
        self.reloading = None;
        tracing::info!(took = ?started.elapsed(), old, "SIGHUP: new workers accept, old ones drain");
        notify(&[sd_notify::NotifyState::Ready]);
    }

    /// `READY=1` once the first workers accept; `WATCHDOG=1` at half the
    /// watchdog period.
    fn tell_systemd(&mut self) {
        if !self.told_ready && self.ready() {
            self.told_ready = true;
            tracing::info!(workers = self.wanted, "workers accept");
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::MainPid(std::process::id()),
            ]);
            if let Some(old) = self.upgraded_from.take() {
                tracing::info!(
                    old_master = old,
                    "upgrade: this master accepts; the old one drains"
                );
                if let Err(err) = sys::kill(old as libc::pid_t, libc::SIGTERM) {
                    tracing::warn!(%err, old_master = old, "cannot tell the old master to drain");
                }
            }
        }
        // Handed over, the unit's watchdog is the new master's to feed.
        if self.handed_over {
            return;
        }
        if let Some((every, last)) = &mut self.watchdog {
            if last.elapsed() >= *every {
                *last = Instant::now();
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }

    /// Whether the workers of the moment accept (see `accepted`).
    fn ready(&self) -> bool {
        self.accepted >= self.wanted
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
            let Some(slot) = self.free_slots.pop() else {
                // Every slot taken by workers still draining: wait for one.
                return Ok(());
            };
            self.beats.get(slot).store(0, Ordering::Release);
            if let Some(hook) = &self.config.hooks.before_fork {
                hook();
            }
            let child = match self.spawn_worker(slot) {
                // The master reaps on SIGCHLD and needs no pidfd; without
                // one, the next worker forked inherits none of its
                // siblings' (each pidfd would stay open in every younger
                // worker, and let it wait on or signal a sibling).
                Ok(child) => child.without_pidfd(),
                Err(err) => {
                    // Out of processes or memory: keep the workers we have
                    // and try again in a second.
                    self.free_slots.push(slot);
                    tracing::error!(%err, "cannot fork a worker: trying again in 1 s");
                    self.next_spawn = Instant::now() + Duration::from_secs(1);
                    return Ok(());
                }
            };
            tracing::info!(pid = child.pid(), "worker started");
            let now = Instant::now();
            self.workers.push(Worker {
                child,
                role: Role::Serving,
                started: now,
                slot,
                beat: 0,
                beat_changed: now,
                accepted: false,
            });
        }
        Ok(())
    }

    fn spawn_worker(&self, slot: usize) -> io::Result<Child> {
        let master = std::process::id();
        let beat = self.beats.get(slot);
        let heartbeat = Heartbeat {
            every: self.config.timeout.map_or(Duration::from_secs(1), |t| {
                (t / 4).min(Duration::from_secs(1))
            }),
            master,
        };
        let max_rss = self.config.max_rss;
        let worker_started = self.config.hooks.worker_started.clone();
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
            if let Some(max) = max_rss {
                MAX_RSS.store(max, Ordering::Relaxed);
            }
            if let Some(hook) = &worker_started {
                hook();
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
            // The worker serves with frames of its own: an exit raised in
            // it (a request, a body, a background task, a timer) drains the
            // worker with that code, never `fork::spawn`'s rule, which would
            // `_exit` at the raise and cut the requests in flight. A child
            // forked under a guard in the worker still ends at its raise.
            let exit = crate::exit::outside_frames(|| {
                runtime.block_on(async {
                    let listener = listener.to_tokio()?;
                    let supervisor = Supervisor::new();
                    let stray = supervisor.clone();
                    crate::exit::take_stray_exits(move |exit| {
                        stray.trigger(exit.clone());
                    });
                    // The first beat says the worker accepts; the later ones
                    // that its thread is not blocked. (Polled with the server
                    // on this task: the counter lives in the master's frame,
                    // which outlives this worker.)
                    tokio::select! {
                        exit = serve(listener, &supervisor, limit) => exit,
                        never = heartbeat.run(beat, supervisor.clone()) => match never {},
                    }
                })
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
            let mut worker = self.workers.swap_remove(i);
            // It may have accepted since the last look: its counter tells.
            let beat = self.beats.get(worker.slot).load(Ordering::Acquire);
            self.accepted += worker.saw(beat);
            self.ended(&worker, status);
        }
        Ok(())
    }

    fn ended(&mut self, worker: &Worker, status: ExitStatus) {
        let pid = worker.child.pid();
        let lived = worker.started.elapsed();
        self.free_slots.push(worker.slot);
        if let Some(hook) = &self.config.hooks.worker_ended {
            hook(pid, status);
        }
        match (worker.role, status.code()) {
            (Role::Retiring, _) => tracing::info!(pid, %status, "worker retired"),
            (Role::Hung, _) => tracing::info!(pid, %status, "hung worker reaped"),
            // Checked first; `run` refused a stop-all code of 0, which is
            // the status of a worker recycling itself.
            (Role::Serving | Role::Outgoing | Role::Draining, Some(code))
                if Some(code) == self.config.stop_all_code =>
            {
                tracing::warn!(pid, code, "worker asked to stop the server");
                self.stop = Some(Exit::new(code).with_message("a worker asked to stop the server"));
            }
            (Role::Serving | Role::Outgoing | Role::Draining, Some(0)) => {
                tracing::info!(pid, "worker recycled");
                self.failures = 0;
            }
            (Role::Serving | Role::Outgoing | Role::Draining, _) => {
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
        if graceful {
            self.stop_all_after(exit, Duration::ZERO)
        } else {
            self.stop_workers(exit, libc::SIGKILL, Duration::ZERO)
        }
    }

    /// A graceful stop whose workers first serve on for `delay` (their
    /// shutdown delay, which they run themselves on SIGTERM); phases
    /// logged. A second SIGTERM is passed on: it cuts their delay short.
    fn stop_all_after(&mut self, exit: Exit, delay: Duration) -> io::Result<Exit> {
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                workers = self.workers.len(),
                "shutdown delay: workers not ready, still serving; they drain after it"
            );
        }
        self.stop_workers(exit, libc::SIGTERM, delay)
    }

    fn stop_workers(
        &mut self,
        exit: Exit,
        signal: libc::c_int,
        delay: Duration,
    ) -> io::Result<Exit> {
        // After an upgrade's hand-over the unit is the new master's (it
        // said `MAINPID=`): the old one says nothing more, or systemd
        // (`NotifyAccess=all`) could take its STOPPING=1 for the unit's.
        // A new master that never took over never spoke for the unit
        // either, and one whose old master still waits in its rollback
        // window is not the unit's end: the old master serves again.
        if !self.handed_over
            && (self.told_ready || self.old_master.is_none())
            && !self.old_master_waits()
        {
            notify(&[sd_notify::NotifyState::Stopping]);
        }
        for worker in &mut self.workers {
            worker.role = Role::Retiring;
            let _ = worker.child.kill(signal);
        }
        let started = Instant::now();
        let mut drain_said = delay.is_zero();
        let deadline = started + delay + self.config.grace + Duration::from_secs(1);
        while !self.workers.is_empty() {
            self.reap()?;
            if !drain_said && started.elapsed() >= delay {
                drain_said = true;
                tracing::info!(
                    workers = self.workers.len(),
                    "shutdown delay over: workers drain"
                );
            }
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
            // SIGCHLD wakes us; a second SIGTERM in the delay is passed
            // on; other signals wait until we are done.
            if self.signals.wait(Duration::from_millis(50)) == Some(libc::SIGTERM)
                && signal == libc::SIGTERM
                && !drain_said
            {
                tracing::info!("second SIGTERM: the shutdown delay cut short");
                for worker in &mut self.workers {
                    let _ = worker.child.kill(libc::SIGTERM);
                }
            }
        }
        tracing::info!(%exit, "prefork master stopped");
        Ok(exit)
    }
}

/// The command this process was started with: `argv[0]` resolved against
/// the directory it started in, or left to a `PATH` search when it has no
/// `/` (as the shell found it). Not `current_exe()`: after a deploy by
/// rename that names the deleted old file (`app (deleted)`), and after a
/// symlink switch the old target.
fn started_as() -> Option<std::path::PathBuf> {
    let argv0 = std::path::PathBuf::from(std::env::args_os().next()?);
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.is_absolute() || argv0.components().count() == 1 {
        return Some(argv0);
    }
    // Read once, at the master's start: where `argv[0]` was relative to.
    Some(std::env::current_dir().ok()?.join(argv0))
}

/// The environment variable a master started by SIGUSR2 finds the old
/// master's pid in.
const UPGRADE_FROM: &str = "TOWER_EXIT_UPGRADE_FROM";

/// The old master, if this process was started by its SIGUSR2 (the
/// variable names our parent); the variable is removed, so that nothing
/// this process starts mistakes itself for an upgrade.
fn upgraded_from() -> Option<u32> {
    let old = std::env::var(UPGRADE_FROM).ok()?.parse::<u32>().ok();
    std::env::remove_var(UPGRADE_FROM);
    old.filter(|&old| old == std::os::unix::process::parent_id())
}

/// Tells the service manager, if one listens (`NOTIFY_SOCKET`); a failure
/// is logged, never fatal.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(false, states) {
        tracing::warn!(%err, "cannot notify the service manager");
    }
}

/// Half of systemd's `WATCHDOG_USEC`, when it asks this process.
fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// How often a worker with a `max_rss` checks its memory besides the end
/// of each request (see [`check_memory`]): growth outside requests (a
/// background task) passes the limit by at most what it allocates in this
/// time.
const RSS_EVERY: Duration = Duration::from_millis(10);

/// The heartbeat counter's top bit: the worker started draining. (The
/// counter's other bits count beats, which never reach it.)
const DRAINING: u64 = 1 << 63;

/// A worker's sign of life, from its own runtime: a counter in memory the
/// master reads, moved every `every`; and its memory, checked every
/// [`RSS_EVERY`] against `max_rss` (while [`check_memory`] has a limit).
struct Heartbeat {
    every: Duration,
    /// The master, woken at the first beat and when the worker starts
    /// draining.
    master: u32,
}

impl Heartbeat {
    async fn run(self, beat: &AtomicU64, supervisor: Supervisor) -> std::convert::Infallible {
        let mut interval = tokio::time::interval(self.every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drains = supervisor.wait();
        tokio::pin!(drains);
        let mut draining = false;
        // Memory is read far more often than the beat: a worker's memory
        // can grow by gigabytes in a second.
        let mut rss_every = tokio::time::interval(RSS_EVERY);
        rss_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    // The first beat (at once): the worker accepts. Its
                    // master is woken to see it now (READY, a reload's
                    // end, an upgrade's hand-over), not at its next look.
                    if beat.fetch_add(1, Ordering::Release) == 0 {
                        let _ = sys::kill(self.master as libc::pid_t, libc::SIGCHLD);
                    }
                    continue;
                }
                _ = &mut drains, if !draining => {
                    // Told once: the master forks the replacement, woken
                    // now (SIGCHLD: a child changed state) rather than at
                    // its next look, up to 100 ms later.
                    draining = true;
                    beat.fetch_or(DRAINING, Ordering::Release);
                    let _ = sys::kill(self.master as libc::pid_t, libc::SIGCHLD);
                    continue;
                }
                _ = rss_every.tick(), if checks_memory() => {
                    check_memory(&supervisor);
                }
            }
        }
    }
}

/// The worker's `max_rss` (0: off, or already passed). Process-wide: set
/// once in a forked worker, before it serves.
static MAX_RSS: AtomicU64 = AtomicU64::new(0);

/// Whether [`check_memory`] still has a limit to check.
fn checks_memory() -> bool {
    MAX_RSS.load(Ordering::Relaxed) != 0
}

/// In a prefork worker with a `max_rss`, at the end of every request and
/// every [`RSS_EVERY`]: its peak resident memory (one `getrusage`, about
/// 0.9 µs, see BENCHMARKS.md) against the limit. Past it, the worker
/// recycles before it starts another request: it overshoots by what the
/// requests in flight at that moment allocate.
pub(crate) fn check_memory(supervisor: &Supervisor) {
    let max = MAX_RSS.load(Ordering::Relaxed);
    if max == 0 {
        return;
    }
    let Some(peak) = sys::peak_resident_bytes() else {
        return;
    };
    // Once: the worker drains from here on.
    if peak > max && MAX_RSS.swap(0, Ordering::Relaxed) != 0 {
        tracing::info!(rss = peak, max_rss = max, "worker over max_rss: recycling");
        supervisor.trigger(Exit::success().with_message("max_rss exceeded"));
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
const MASTER_SIGNALS: [libc::c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGUSR2,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
];
