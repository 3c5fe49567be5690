//! Fork a child that can never run on into the caller's code, and reap it.
//!
//! - [`spawn`] runs a closure in a forked child under `catch_unwind`, then
//!   the child's cleanup hooks, then `_exit`: the closure returning gives
//!   status 0, [`exit(n)`](fn@crate::exit) gives `n`, a panic gives 101. Like
//!   Python's `multiprocessing`, the child never returns into the caller.
//! - [`fork`] is the raw form, for code that must fork in place (the seed's
//!   scenario): the child continues after the call, and a
//!   [`ForkGuardLayer`](crate::ForkGuardLayer) ends it before it can return
//!   into the parent's stack.
//! - [`Child`] waits for the child without a thread per child (a pidfd where
//!   the kernel has one, Linux 5.3+), and a dropped `Child` is still reaped
//!   by one shared background thread: no zombies.
//! - [`on_child_exit`] registers cleanups (flush logs, commit or roll back,
//!   close sockets) that run in a child before it ends.
//!
//! # What a forked child may do
//!
//! Only the thread that called `fork` exists in the child. A lock another
//! thread held at that moment stays locked forever in the child, and a tokio
//! runtime inherited from the parent has lost its worker and driver threads
//! (tokio does not support `fork` after the runtime started). So the child
//! should do its work synchronously and end; it must not `.await` on the
//! parent's runtime. To run async work in a child, build a fresh runtime in
//! the child, or better, fork from a clean state before any runtime or
//! thread exists. A warning is logged (through `tracing`) when forking a
//! process that has other threads.
//!
//! `_exit` does not flush buffered output: flush in the closure or in an
//! [`on_child_exit`] hook.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let mut child = tower_exit::fork::spawn(|| {
//!     // Runs in the child only, then the child ends: status 7.
//!     tower_exit::exit(7)
//! })?;
//! let status = child.wait().await?;
//! assert_eq!(status.code(), Some(7));
//! # Ok(()) }
//! ```

use crate::hooks::HookList;
use crate::Exit;
use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, Once, OnceLock};
use std::time::Duration;

/// The status a child ends with when its work panicked, as Rust's own
/// `main` does.
pub const PANIC_STATUS: i32 = 101;

// ---------------------------------------------------------------------------
// Fork generation
// ---------------------------------------------------------------------------

/// Counts the forks this process descends from. Incremented in the child only
/// (by the `pthread_atfork` child handler), so a value that changed since a
/// request started means "this is now a child forked during the request".
static GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add, no lock, no allocation.
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the `pthread_atfork` child handler once per process.
pub(crate) fn watch_forks() {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only does an atomic add; it is
        // `extern "C"`, never unwinds, and lives for the whole program.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        if rc != 0 {
            tracing::error!(
                error = %io::Error::from_raw_os_error(rc),
                "pthread_atfork failed: forks will not be detected"
            );
        }
    });
}

/// The current fork generation: one atomic load, no syscall.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Child cleanup hooks
// ---------------------------------------------------------------------------

type ChildHook = dyn Fn() + Send + Sync;

static CHILD_HOOKS: HookList<ChildHook> = HookList::new();
/// The generation in which the hooks last ran (`u64::MAX`: never), so that
/// they run once per process even if two guards end the same child.
static HOOKS_RAN_IN: AtomicU64 = AtomicU64::new(u64::MAX);

/// Registers a cleanup that runs in a child before it ends through this
/// crate ([`spawn`], [`ForkGuardLayer`](crate::ForkGuardLayer)): flush logs,
/// commit or roll back, close sockets.
///
/// Hooks run once per child, in registration order, each under
/// `catch_unwind`: a panicking hook does not stop the others. They run in a
/// forked child, where only the forking thread exists: do not take a lock
/// another thread may hold, do not await.
pub fn on_child_exit(hook: impl Fn() + Send + Sync + 'static) {
    watch_forks();
    CHILD_HOOKS.push(Box::new(hook));
}

/// Runs the child cleanup hooks, once per process.
pub(crate) fn run_child_hooks() {
    let current = generation();
    if HOOKS_RAN_IN.swap(current, Ordering::AcqRel) == current {
        return;
    }
    CHILD_HOOKS.for_each(|hook| {
        let _ = catch_unwind(AssertUnwindSafe(hook));
    });
}

// ---------------------------------------------------------------------------
// Ending a child
// ---------------------------------------------------------------------------

/// The status for the outcome of a child's work: `Ok` 0, an `Exit` its
/// status, a panic 101, any other error 1.
pub(crate) fn status_of_panic(payload: &(dyn Any + Send)) -> i32 {
    match Exit::from_panic(payload) {
        Some(exit) => i32::from(exit.status()),
        None => PANIC_STATUS,
    }
}

/// Ends this process now with `_exit(status)`: no destructors, no atexit
/// handlers, no stdio flush (they belong to the parent's state).
pub(crate) fn exit_now(status: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and takes any int.
    unsafe { libc::_exit(status & 0xff) }
}

/// Ends this process with SIGTERM, as the seed's remedy does, after making
/// sure nothing can keep it alive: the disposition is reset to the default
/// (an application's handler must not catch it) and the signal unblocked.
pub(crate) fn terminate_now() -> ! {
    // SAFETY: sigaction, sigprocmask, getpid and kill are async-signal-safe;
    // the structures are zeroed, then filled by the libc calls meant to.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());

        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());

        // POSIX: an unblocked signal sent to the calling process is
        // delivered before `kill` returns.
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
    // Not reached; keep the promise of `!` anyway.
    exit_now(128 + libc::SIGTERM)
}

/// How a child forked below an exit-aware frame ends when it raises an
/// [`Exit`] (see `exit::RaiseContext`): set by the fork guard while it calls
/// and polls, and by [`spawn`] around the child's work.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChildRule {
    /// The generation the frame started in: the rule applies only in a
    /// process forked since (a higher generation).
    started: u64,
    end: ChildEnd,
    /// Set by the guard: a child forked during a guarded request ends at
    /// the raise even below a boundary. `spawn`'s rule gives way to a
    /// boundary inside the child (a prefork worker serves with its own).
    sticky: bool,
}

/// How a child ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ChildEnd {
    /// `SIGTERM` to itself, after resetting its disposition.
    #[default]
    Terminate,
    /// `_exit(status)`.
    ExitCode,
    /// An exit unwinds on, armed, to the boundary (fork guard only).
    Propagate,
}

impl ChildRule {
    #[inline]
    pub(crate) fn guard(started: u64, end: ChildEnd) -> Self {
        ChildRule {
            started,
            end,
            sticky: true,
        }
    }

    /// The `sticky` bit of [`pack`](Self::pack).
    pub(crate) const STICKY: u64 = 1 << 2;

    /// This rule in one word, never 0: bits 0–1 the end (1 to 3), bit 2
    /// `sticky`, the generation above (a process would need 2^60 forks in
    /// its ancestry to overflow it).
    #[inline]
    pub(crate) fn pack(self) -> u64 {
        let end = match self.end {
            ChildEnd::Terminate => 1,
            ChildEnd::ExitCode => 2,
            ChildEnd::Propagate => 3,
        };
        (self.started << 3) | (u64::from(self.sticky) * Self::STICKY) | end
    }

    /// The rule [`pack`](Self::pack) made; `None` for 0.
    #[inline]
    pub(crate) fn unpack(word: u64) -> Option<ChildRule> {
        let end = match word & 3 {
            1 => ChildEnd::Terminate,
            2 => ChildEnd::ExitCode,
            3 => ChildEnd::Propagate,
            _ => return None,
        };
        Some(ChildRule {
            started: word >> 3,
            end,
            sticky: word & Self::STICKY != 0,
        })
    }
}

/// Called by [`Exit::raise`] first thing: in a child the rule covers, ends
/// the child here (cleanup hooks, then `SIGTERM` or `_exit`) without
/// allocating or unwinding. Returns otherwise.
pub(crate) fn end_child_at_raise(rule: ChildRule, exit: &Exit) {
    if generation() == rule.started {
        return;
    }
    match rule.end {
        // Travels on armed, as documented; under `panic = "abort"` it
        // cannot, and ends with its status as `exit_code` would.
        ChildEnd::Propagate if cfg!(not(panic = "abort")) => {}
        ChildEnd::Terminate => {
            run_child_hooks();
            terminate_now()
        }
        ChildEnd::ExitCode | ChildEnd::Propagate => {
            run_child_hooks();
            exit_now(i32::from(exit.status()))
        }
    }
}

/// The arming of an [`Exit`] that leaves a forked child (see
/// `ForkGuardLayer::propagate_exit`): whoever drops the last clone of the
/// exit without consuming it at a boundary kills the child at that moment.
#[derive(Debug)]
pub(crate) struct Armed {
    /// The generation of the child that armed it: the arming means nothing
    /// in any other process.
    generation: u64,
    disarmed: AtomicBool,
}

impl Armed {
    pub(crate) fn new() -> Self {
        Armed {
            generation: generation(),
            disarmed: AtomicBool::new(false),
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if !self.disarmed.load(Ordering::Acquire) && generation() == self.generation {
            run_child_hooks();
            terminate_now();
        }
    }
}

/// Called by an exit-aware boundary that caught `exit`: if it is armed in
/// this child, the child ends here with the exit's status (after its
/// cleanups) instead of answering the parent's client. Returns otherwise.
pub(crate) fn end_if_armed(exit: &Exit) {
    if let Some(armed) = exit.armed() {
        if generation() == armed.generation {
            armed.disarmed.store(true, Ordering::Release);
            run_child_hooks();
            exit_now(i32::from(exit.status()));
        }
    }
}

// ---------------------------------------------------------------------------
// Forking
// ---------------------------------------------------------------------------

/// What [`fork`] returned, in the parent or in the child.
#[derive(Debug)]
#[must_use = "a parent must keep or drop the `Child`; a child must end"]
pub enum Forked {
    /// In the parent: the new child.
    Parent(Child),
    /// In the child.
    Child,
}

/// Forks the process in place, like `fork(2)`: both processes return from
/// this call.
///
/// Prefer [`spawn`], whose child cannot return into your code. Use this where
/// the child must continue in place, under a
/// [`ForkGuardLayer`](crate::ForkGuardLayer) that ends it before it returns
/// into the parent's stack. See [the module docs](self) for what a child may
/// do.
///
/// # Safety
///
/// In the child of a multi-threaded process only the calling thread exists:
/// a lock another thread held at the fork (the allocator's, a `Mutex`, a
/// semaphore, a connection pool) stays locked forever, so safe code such as
/// allocating, logging or dropping a guard can deadlock the child. Until it
/// ends or execs, the child must only do async-signal-safe work: raise an
/// [`Exit`] under a guard (which ends it without allocating), return, or
/// call functions documented as fork-safe. The same contract as `nix`'s
/// `unsafe fn fork`; calling it from safe code does not compile:
///
/// ```compile_fail
/// let _ = tower_exit::fork::fork();
/// ```
pub unsafe fn fork() -> io::Result<Forked> {
    watch_forks();
    warn_if_threads();
    let parent_generation = generation();
    // SAFETY: `fork` itself is always sound to call; what the child does
    // afterwards is the caller's contract (see `# Safety`).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Child::new(pid, parent_generation))),
    }
}

/// Forks a child that runs `f`, its cleanup hooks, then `_exit`s: `f`
/// returning gives status 0, [`exit(n)`](fn@crate::exit) gives `n`, a panic
/// gives 101. The child never returns into the caller.
///
/// An exit raised in `f` ends the child right at the raise (cleanup hooks,
/// then `_exit(status)`), without unwinding through `f`'s frames. A panic
/// does unwind, to the `catch_unwind` around `f`; under `panic = "abort"`
/// there is no unwinding and a panicking child ends with `SIGABRT`.
///
/// `spawn` is safe where `fork` is not because nothing of the caller runs
/// in the child: only `f`, which must itself respect what a forked child
/// may do (see [the module docs](self)) when the parent has other threads.
/// From a single-threaded process (a fork server, a prefork master) any
/// code may run in `f`.
pub fn spawn<F: FnOnce()>(f: F) -> io::Result<Child> {
    let parent_generation = generation();
    // SAFETY: the child runs only `f` (whose contract is documented above)
    // and then `_exit`s; it never returns into the caller's frames.
    match unsafe { fork() }? {
        Forked::Parent(child) => Ok(child),
        Forked::Child => {
            let rule = ChildRule {
                started: parent_generation,
                end: ChildEnd::ExitCode,
                sticky: false,
            };
            let context = crate::exit::RaiseContext::default()
                .caught_here()
                .with_child(rule);
            let status =
                match catch_unwind(AssertUnwindSafe(|| crate::exit::with_context(context, f))) {
                    Ok(()) => 0,
                    Err(payload) => status_of_panic(&*payload),
                };
            run_child_hooks();
            exit_now(status)
        }
    }
}

fn warn_if_threads() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |dir| dir.count());
    if threads > 1 {
        // Once at warn level, then at debug: a server forking per request
        // must not flood its log.
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(threads, "forking a multi-threaded process");
        } else {
            tracing::warn!(
                threads,
                "forking a process with {threads} threads: only the calling thread exists in \
                 the child; it must not take locks or await on the parent's runtime"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Child handle
// ---------------------------------------------------------------------------

/// A forked child process, owned by its parent.
///
/// Dropping a `Child` does not kill it, but it is still reaped (by a shared
/// background thread) once it ends: no zombies.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    /// A pidfd for the child, when the kernel has them.
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// The fork generation of the process that forked this child: a `Child`
    /// value copied into a grandchild by a later fork is not its to reap.
    owner_generation: u64,
}

impl Child {
    fn new(pid: libc::pid_t, owner_generation: u64) -> Self {
        Child {
            pid,
            pidfd: pidfd_open(pid),
            status: None,
            owner_generation,
        }
    }

    /// Closes this handle's pidfd, if it has one: `wait` then polls. For a
    /// parent that reaps otherwise (on SIGCHLD) and forks again, so that
    /// its later children do not inherit the descriptor.
    #[cfg(feature = "http")]
    pub(crate) fn without_pidfd(mut self) -> Self {
        self.pidfd = None;
        self
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Sends `signal` (such as `libc::SIGTERM`) to the child.
    ///
    /// Safe against pid reuse: until this handle reaps the child, its pid
    /// cannot be given to another process. A copy of the handle inherited
    /// by a later forked child is not the owner and refuses: there, the pid
    /// may already belong to another process.
    pub fn kill(&mut self, signal: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "child has already been reaped",
            ));
        }
        if generation() != self.owner_generation {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this handle was inherited through a fork: only the process that forked the child may signal it",
            ));
        }
        // SAFETY: plain syscall on a pid we own and have not reaped.
        if unsafe { libc::kill(self.pid, signal) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The exit status if the child has ended (reaping it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = try_reap(self.pid)?;
        if status.is_some() {
            self.status = status;
            self.pidfd = None;
        }
        Ok(status)
    }

    /// Blocks the thread until the child ends, and reaps it: for code with
    /// no runtime, such as a forked child waiting for its own child.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child only.
            if unsafe { libc::waitpid(self.pid, &mut status, 0) } != -1 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        let status = ExitStatus::from_raw(status);
        self.status = Some(status);
        self.pidfd = None;
        Ok(status)
    }

    /// Waits for the child to end and reaps it.
    ///
    /// With a pidfd (Linux 5.3+) this waits on the runtime's I/O driver, no
    /// thread per child; otherwise it polls with a short, growing sleep.
    /// Needs a tokio runtime with I/O and time enabled.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Some(fd) = self.pidfd.as_ref().map(AsRawFd::as_raw_fd) {
            // SAFETY: `fd` is owned by `self.pidfd`, which is neither closed
            // nor replaced while the registration lives: the loop below
            // reaps with `try_reap`, which leaves `self.pidfd` alone, and
            // the registration is dropped before `self.pidfd` is cleared.
            // (Closing a registered fd first would let its number be reused
            // by a socket that the deregistration then removes from the
            // runtime's epoll: that socket would never be woken again.)
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    PidFd(fd),
                    tokio::io::Interest::READABLE,
                )
            };
            if let Ok(readable) = registered {
                let status = loop {
                    // A pidfd becomes readable when the process ends.
                    let mut ready = readable.readable().await?;
                    if let Some(status) = try_reap(self.pid)? {
                        break status;
                    }
                    ready.clear_ready();
                };
                drop(readable);
                self.status = Some(status);
                self.pidfd = None;
                return Ok(status);
            }
        }
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() || generation() != self.owner_generation {
            return;
        }
        match try_reap(self.pid) {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => reap_later(self.pid),
        }
    }
}

/// A borrowed pidfd registered with tokio for the length of one `wait`.
struct PidFd(RawFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just gave us this fd; nobody else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `waitpid(pid, WNOHANG)`: `Some(status)` if it ended (and is now reaped).
fn try_reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waits only for our own child `pid`, never for -1: other
        // code's children (std::process, tokio::process) are not ours.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Ok(None),
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            _ => return Ok(Some(ExitStatus::from_raw(status))),
        }
    }
}

/// Hands a still-running child to the shared reaper thread.
///
/// The thread sleeps on its channel while it has nothing to reap, and polls
/// its pids with a growing pause (1 ms to 100 ms) while it has some.
fn reap_later(pid: libc::pid_t) {
    static REAPER: OnceLock<Mutex<mpsc::Sender<libc::pid_t>>> = OnceLock::new();
    let sender = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tower-exit-reaper".into())
            .spawn(move || reaper(rx));
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the reaper thread: dropped children may linger");
        }
        Mutex::new(tx)
    });
    let sent = sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(pid);
    if sent.is_err() {
        tracing::error!(pid, "reaper thread is gone: child may linger as a zombie");
    }
}

fn reaper(rx: mpsc::Receiver<libc::pid_t>) {
    let mut pending: Vec<libc::pid_t> = Vec::new();
    let mut pause = Duration::from_millis(1);
    loop {
        let received = if pending.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(pause)
        };
        match received {
            Ok(pid) => {
                pending.push(pid);
                pause = Duration::from_millis(1);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) if pending.is_empty() => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(pause),
        }
        // Keep only the children that are still running.
        pending.retain(|&pid| matches!(try_reap(pid), Ok(None)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_rule_survives_packing_into_the_raise_context() {
        for end in [ChildEnd::Terminate, ChildEnd::ExitCode, ChildEnd::Propagate] {
            for sticky in [false, true] {
                for started in [0, 1, 7, u64::MAX >> 4] {
                    let rule = ChildRule {
                        started,
                        end,
                        sticky,
                    };
                    let packed = rule.pack();
                    assert_ne!(packed, 0);
                    let back = ChildRule::unpack(packed).unwrap();
                    assert_eq!(
                        (back.started, back.end, back.sticky),
                        (started, end, sticky)
                    );
                }
            }
        }
        assert!(ChildRule::unpack(0).is_none());
    }
}
