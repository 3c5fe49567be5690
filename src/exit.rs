//! The [`Exit`] signal, how it is raised, and how it is told apart from real
//! failures.
//!
//! An [`Exit`] travels through a tower stack in one of two channels:
//!
//! - as an **unwind**: [`exit`] and [`Exit::raise`] call
//!   [`std::panic::resume_unwind`] with the `Exit` as payload. Unlike `panic!`,
//!   that does not run the panic hook: no "thread panicked" line is printed.
//! - as an **error**: `Err(exit)`, or any error whose [`source`](Error::source)
//!   chain holds an `Exit` (a `tower::BoxError`, `tower::buffer`'s
//!   `ServiceError`, `io::Error::other(exit)`, your own enum with `#[source]`).
//!
//! Whether something is an exit is decided in one place, [`Exit::from_panic`]
//! and [`Exit::from_error`]; every layer of this crate calls them.
//!
//! # Exit codes
//!
//! An `Exit` keeps the code it was given, any `i32`. When it ends a process
//! ([`From<Exit> for ExitCode`](std::process::ExitCode), the fork guard,
//! `panic = "abort"`), only the low 8 bits reach the parent, exactly as the OS
//! truncates the argument of `exit(2)`: `Exit::new(256)` ends a process with
//! status 0 and `Exit::new(-1)` with status 255. [`Exit::status`] tells that
//! status in advance; keep codes in `0..=255` to avoid surprises.

use std::any::Any;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use crate::hooks::HookList;

/// A request to end a piece of work on purpose, with a status code: the
/// counterpart of Python's `SystemExit`.
///
/// `Exit` is not a failure. Layers of this crate pass it on untouched: they
/// do not report it, retry it or turn it into a `500`.
///
/// ```
/// use tower_exit::Exit;
///
/// let exit = Exit::failure("config file missing");
/// assert_eq!(exit.code(), 1);
/// assert_eq!(exit.message(), Some("config file missing"));
/// assert_eq!(exit.to_string(), "exit 1: config file missing");
/// ```
#[derive(Clone)]
#[must_use = "an `Exit` does nothing until it is raised or returned"]
pub struct Exit {
    code: i32,
    message: Option<Cow<'static, str>>,
    /// Set by a `ForkGuardLayer` in `propagate_exit` mode on an exit that
    /// leaves a forked child: the child is killed when the last clone of
    /// this exit is dropped anywhere but at a boundary.
    #[cfg(all(unix, feature = "fork"))]
    armed: Option<std::sync::Arc<crate::fork::end::Armed>>,
}

impl fmt::Debug for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Exit");
        debug
            .field("code", &self.code)
            .field("message", &self.message);
        #[cfg(all(unix, feature = "fork"))]
        if self.armed.is_some() {
            debug.field("armed", &true);
        }
        debug.finish()
    }
}

/// Two exits are equal when their codes and messages are.
impl PartialEq for Exit {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message
    }
}

impl Eq for Exit {}

impl std::hash::Hash for Exit {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.code.hash(state);
        self.message.hash(state);
    }
}

impl Exit {
    /// An exit with the given status code (see [the module docs](self) for
    /// codes outside `0..=255`).
    pub const fn new(code: i32) -> Self {
        Exit {
            code,
            message: None,
            #[cfg(all(unix, feature = "fork"))]
            armed: None,
        }
    }

    /// An exit with status 0.
    pub const fn success() -> Self {
        Exit::new(0)
    }

    /// An exit with status 1 and a message, like Python's `sys.exit("msg")`.
    pub fn failure(message: impl Into<Cow<'static, str>>) -> Self {
        Exit::new(1).with_message(message)
    }

    /// Adds (or replaces) the message, keeping the code.
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The status code, as given.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The status a parent process sees when this exit ends a process: the
    /// low 8 bits of [`code`](Self::code), as the OS truncates it.
    pub fn status(&self) -> u8 {
        // Truncation is the point: it is what `exit(2)` does.
        self.code as u8
    }

    /// Whether the status a parent sees is 0.
    pub fn is_success(&self) -> bool {
        self.status() == 0
    }

    /// The message, if any.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// Raises this exit as an unwind, without running the panic hook.
    ///
    /// Where it is raised decides what happens:
    ///
    /// - in a child forked during a request guarded by a
    ///   [`ForkGuardLayer`](crate::ForkGuardLayer), or inside
    ///   [`fork::spawn`](crate::fork::spawn), the child ends right here
    ///   (its cleanup hooks, then `SIGTERM` or `_exit`): no allocation, no
    ///   unwinding through the parent's frames, whose destructors would take
    ///   locks other threads held at the fork;
    /// - where nothing exit-aware will catch it (no boundary, server,
    ///   [`exit::spawn`](spawn) task or [`exit::main`](main) on this
    ///   thread's stack), it is logged once at ERROR with its code, message
    ///   and this call's location, then unwinds like a panic;
    /// - under `panic = "abort"` there is no unwinding: the hooks registered
    ///   with [`on_abort_exit`] in this process run, then the process ends
    ///   with [`status`](Self::status) through [`std::process::exit`].
    ///
    /// Raising an exit in a `Drop` that runs while the thread is already
    /// unwinding aborts the process, as any panic there does.
    #[track_caller]
    pub fn raise(self) -> ! {
        let context = CONTEXT.get();
        end_child_if_ruled(&self);
        if !context.caught() {
            unhandled(&self, std::panic::Location::caller());
        } else if context.forked_below() {
            forked_unguarded(&self, std::panic::Location::caller());
        }
        #[cfg(panic = "abort")]
        {
            run_abort_hooks(&self);
            std::process::exit(i32::from(self.status()));
        }
        #[cfg(not(panic = "abort"))]
        std::panic::resume_unwind(Box::new(self))
    }

    /// Raises the [`Exit`] found in `err` or its `source()` chain (see
    /// [`from_error`](Self::from_error)); returns when there is none.
    ///
    /// The one line an application error's conversion into a response
    /// needs, so that an exit carried by the error (via `?`) is not turned
    /// into a `500`:
    ///
    /// ```
    /// # use tower_exit::Exit;
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error("stopping")]
    ///     Stop(#[from] Exit),
    ///     #[error("database: {0}")]
    ///     Db(String),
    /// }
    ///
    /// fn into_status(err: AppError) -> u16 {
    ///     Exit::raise_if_found(&err); // an exit travels on to the boundary
    ///     500
    /// }
    /// # assert_eq!(into_status(AppError::Db("down".into())), 500);
    /// ```
    ///
    /// The error must expose the exit: as itself, or through `source()`
    /// (thiserror's `#[from]` or `#[source]`). thiserror's
    /// `#[error(transparent)]` hides it: it forwards `source()` to the
    /// exit's own source, which is none.
    #[track_caller]
    pub fn raise_if_found(err: &(dyn Error + 'static)) {
        if let Some(exit) = Exit::from_error(err) {
            exit.clone().raise()
        }
    }

    cfg_fork! {
        /// Arms this exit as leaving a forked child (see
        /// `ForkGuardLayer::propagate_exit`).
        pub(crate) fn arm(&mut self) {
            self.armed = Some(std::sync::Arc::new(crate::fork::end::Armed::new()));
        }
    }

    /// Called by an exit-aware boundary (or a server) that caught this
    /// exit: if it is armed in this very child, the child ends here with
    /// the exit's status (after its cleanups) instead of answering the
    /// parent's client. Returns otherwise.
    #[inline]
    pub(crate) fn end_if_armed(&self) {
        #[cfg(all(unix, feature = "fork"))]
        if let Some(armed) = &self.armed {
            armed.end_here(self.status());
        }
    }

    /// The `Exit` carried by a panic payload, if it is one.
    ///
    /// ```
    /// let payload = std::panic::catch_unwind(|| tower_exit::exit(3)).unwrap_err();
    /// assert_eq!(tower_exit::Exit::from_panic(&*payload).unwrap().code(), 3);
    /// ```
    pub fn from_panic(payload: &(dyn Any + Send)) -> Option<&Exit> {
        payload.downcast_ref::<Exit>()
    }

    /// The `Exit` in an error or anywhere in its `source()` chain.
    ///
    /// `io::Error` does not expose a wrapped error through `source()`, so
    /// its inner error (`io::Error::other(exit)`) is looked into as well.
    ///
    /// ```
    /// use tower_exit::Exit;
    /// let err = std::io::Error::other(Exit::new(4));
    /// assert_eq!(Exit::from_error(&err).unwrap().code(), 4);
    /// ```
    pub fn from_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a Exit> {
        let mut next = Some(err);
        // Error chains are finite in practice; the bound keeps a cyclic
        // `source()` implementation from hanging a layer.
        for _ in 0..MAX_CHAIN {
            let err = next?;
            if let Some(exit) = err.downcast_ref::<Exit>() {
                return Some(exit);
            }
            next = match err.downcast_ref::<std::io::Error>() {
                Some(io) => match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn Error + 'static)),
                    None => io.source(),
                },
                None => err.source(),
            };
        }
        None
    }

    /// The `Exit` in any error a layer may see (a concrete error or a boxed
    /// one); see [`AsError`].
    pub fn from_service_error<E: AsError<M>, M>(err: &E) -> Option<&Exit> {
        Exit::from_error(err.as_error())
    }
}

const MAX_CHAIN: usize = 64;

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Some(message) => write!(f, "exit {}: {}", self.code, message),
            None => write!(f, "exit {}", self.code),
        }
    }
}

impl Error for Exit {}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.status())
    }
}

/// Ends the current piece of work with `code`: raises [`Exit::new(code)`](Exit::new).
///
/// ```
/// let result = std::panic::catch_unwind(|| tower_exit::exit(2));
/// let payload = result.unwrap_err();
/// assert_eq!(tower_exit::Exit::from_panic(&*payload).unwrap().code(), 2);
/// ```
#[track_caller]
pub fn exit(code: i32) -> ! {
    Exit::new(code).raise()
}

/// A view of a service error as `&dyn Error`, so that layers can look for an
/// [`Exit`] in it.
///
/// Implemented for every `E: Error + 'static` and for the boxed errors tower
/// uses (`tower::BoxError` and friends), which do not implement `Error`
/// themselves. `M` is a marker ([`ConcreteError`] or [`BoxedError`]) that
/// keeps those two kinds of impl apart: coherence forbids one blanket impl
/// for both.
///
/// `M` is inferred where the layered service is used as a `Service`. A layer
/// built but never applied to a service (a `ServiceBuilder` stored without
/// its service) may need it spelled out: `ReportLayer::<_, ConcreteError>`.
pub trait AsError<M> {
    /// This error as a trait object.
    fn as_error(&self) -> &(dyn Error + 'static);
}

/// Marker for [`AsError`] on concrete error types.
#[derive(Debug)]
pub enum ConcreteError {}

/// Marker for [`AsError`] on boxed error trait objects.
#[derive(Debug)]
pub enum BoxedError {}

impl<E: Error + 'static> AsError<ConcreteError> for E {
    fn as_error(&self) -> &(dyn Error + 'static) {
        self
    }
}

impl AsError<BoxedError> for Box<dyn Error + Send + Sync> {
    fn as_error(&self) -> &(dyn Error + 'static) {
        &**self
    }
}

impl AsError<BoxedError> for Box<dyn Error + Send> {
    fn as_error(&self) -> &(dyn Error + 'static) {
        &**self
    }
}

impl AsError<BoxedError> for Box<dyn Error> {
    fn as_error(&self) -> &(dyn Error + 'static) {
        &**self
    }
}

// ---------------------------------------------------------------------------
// Where an exit raised on this thread goes
// ---------------------------------------------------------------------------
//
// `Exit::raise` must decide, before it allocates anything, whether it runs
// in a forked child that must end in place, and whether anything will catch
// the unwind at all. Exit-aware frames (a boundary, a server, the fork
// guard, `fork::spawn`, `exit::spawn`, `exit::main`) say so in a
// thread-local while they call and poll what they wrap, and restore what was
// there before when they return: the innermost frame decides. The
// thread-local is a `Cell` of a `Copy` value with a const initializer, so
// reading it allocates nothing and registers no destructor, which keeps it
// usable in a forked child (only the forking thread exists there, with its
// thread-locals).

/// Who catches an exit raised on this thread right now, packed in one word
/// so that a layer saves, sets and restores it with one aligned load and
/// two stores (a struct of a `bool` and an `Option` cost the boundary about
/// 30 ns a call in store-forwarding stalls).
///
/// Bit 0: an exit-aware frame will catch an unwinding exit. Bits 1 and up:
/// the rule for a child forked below this frame (`fork::ChildRule`, packed;
/// 0 when there is none), under which a raise ends the child in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RaiseContext(u64);

const CAUGHT: u64 = 1;

impl RaiseContext {
    const NONE: RaiseContext = RaiseContext(0);

    /// Whether an exit-aware frame will catch an unwinding exit.
    #[inline]
    pub(crate) fn caught(self) -> bool {
        self.0 & CAUGHT != 0
    }

    /// The rule for a child forked below this frame, if any.
    #[cfg(all(unix, feature = "fork"))]
    #[inline]
    pub(crate) fn child(self) -> Option<crate::fork::end::ChildRule> {
        crate::fork::end::ChildRule::unpack(self.0 >> 1)
    }

    /// This context with `rule` for children forked below (`caught` kept).
    #[cfg(all(unix, feature = "fork"))]
    #[inline]
    pub(crate) fn with_child(self, rule: crate::fork::end::ChildRule) -> RaiseContext {
        RaiseContext((self.0 & CAUGHT) | rule.pack() << 1)
    }

    /// The context inside an exit-aware frame that catches exits: a rule
    /// set by a fork guard around it still holds (a child forked during a
    /// guarded request ends at the raise, whatever catches above), one set
    /// by `fork::spawn` gives way (a spawned child may serve with its own
    /// boundary).
    ///
    /// Without a rule, the frame keeps the fork generation it was entered
    /// in, where a rule keeps its own (bit 4 up, the rule's end bits 0): a
    /// raise in a child forked below it, which no guard ends, is said at
    /// the raise (see [`forked_below`](Self::forked_below)).
    #[inline]
    fn catching(self) -> RaiseContext {
        #[cfg(all(unix, feature = "fork"))]
        {
            if self.0 & (crate::fork::end::ChildRule::STICKY << 1) != 0 {
                return RaiseContext(self.0 | CAUGHT);
            }
            RaiseContext(CAUGHT | crate::fork::end::generation() << 4)
        }
        #[cfg(not(all(unix, feature = "fork")))]
        RaiseContext(CAUGHT)
    }

    /// Whether this frame catches exits but runs in a child forked below
    /// it with no rule for children (no fork guard): the child's copy of
    /// the frame takes the exit and answers in the child.
    #[inline]
    fn forked_below(self) -> bool {
        #[cfg(all(unix, feature = "fork"))]
        {
            let rule = self.0 >> 1;
            rule & 0b11 == 0 && rule >> 3 != crate::fork::end::generation()
        }
        #[cfg(not(all(unix, feature = "fork")))]
        false
    }

    /// This context, marked as caught (the rule for children kept).
    #[inline]
    pub(crate) fn caught_here(self) -> RaiseContext {
        RaiseContext(self.0 | CAUGHT)
    }
}

thread_local! {
    static CONTEXT: std::cell::Cell<RaiseContext> = const { std::cell::Cell::new(RaiseContext::NONE) };
}

/// Restores the outer context when a frame returns, also while unwinding.
struct Restore(RaiseContext);

impl Drop for Restore {
    fn drop(&mut self) {
        CONTEXT.set(self.0);
    }
}

/// Rule 1: in a forked child that a fork guard or `fork::spawn` covers,
/// ends the child here (cleanup hooks, then `SIGTERM` or `_exit`) without
/// allocating. Returns otherwise.
#[inline]
pub(crate) fn end_child_if_ruled(exit: &Exit) {
    let _ = exit;
    #[cfg(all(unix, feature = "fork"))]
    if let Some(rule) = CONTEXT.get().child() {
        rule.end_at_raise(exit.status());
    }
}

/// The context of the frame this is called from.
#[cfg(any(all(unix, feature = "fork"), feature = "axum"))]
#[inline]
pub(crate) fn context() -> RaiseContext {
    CONTEXT.get()
}

/// Runs `f` with `context` as this thread's raise context.
#[inline]
pub(crate) fn with_context<R>(context: RaiseContext, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(CONTEXT.replace(context));
    f()
}

/// Runs `f` inside an exit-aware frame that catches exits.
#[inline]
pub(crate) fn catching<R>(f: impl FnOnce() -> R) -> R {
    with_context(catching_context(), f)
}

/// Makes `context` this thread's raise context; returns the one to give
/// back to [`leave`] when the frame returns. Layers call it around their
/// `catch_unwind(|| inner.call(req))` and `catch_unwind(|| future.poll(cx))`,
/// outside the closure: wrapping the closure in one more function instead
/// moves the request and the future through one more frame, which measured
/// 10–25 ns a layer in memcpy. No drop guard is needed to give the outer
/// context back: `catch_unwind` stops every unwind, and nothing unwinds
/// under `panic = "abort"`.
#[inline]
pub(crate) fn enter(context: RaiseContext) -> RaiseContext {
    CONTEXT.replace(context)
}

/// Gives back the context [`enter`] returned.
#[inline]
pub(crate) fn leave(outer: RaiseContext) {
    CONTEXT.set(outer);
}

/// The context of a frame that catches exits, inside the current one.
#[inline]
pub(crate) fn catching_context() -> RaiseContext {
    CONTEXT.get().catching()
}

/// [`enter`] the context of a frame that catches exits.
#[inline]
pub(crate) fn enter_catching() -> RaiseContext {
    enter(catching_context())
}

/// Rule 4: an exit raised where nothing exit-aware will catch it is said
/// once, here, where the location is still known; in a process whose
/// server takes stray exits (a prefork worker), it is also handed to it.
#[cold]
#[inline(never)]
fn unhandled(exit: &Exit, at: &std::panic::Location<'_>) {
    match STRAY.get() {
        Some(take) => {
            say_unheeded(
                exit,
                Some(at),
                "exit raised where nothing exit-aware catches it (a background task, a timer): \
                 the server drains and ends with it",
            );
            take(exit);
        }
        None => say_unheeded(
            exit,
            Some(at),
            "exit raised where nothing exit-aware catches it (no boundary, server, exit::spawn or \
             exit::main): it unwinds like a panic",
        ),
    }
}

/// An exit raised in a child forked below an exit-aware frame that no
/// fork guard covers: the child's copy of that frame will take it (answer,
/// record in the child's copy of the supervisor), which is rarely what was
/// meant. Said at the raise, where the location is known.
#[cold]
#[inline(never)]
fn forked_unguarded(exit: &Exit, at: &std::panic::Location<'_>) {
    say_unheeded(
        exit,
        Some(at),
        "exit raised in a child forked below an exit-aware frame with no fork guard: the child's \
         copy of that frame takes it and answers in the child (add a ForkGuardLayer, or fork \
         with fork::spawn)",
    );
}

type StrayExits = dyn Fn(&Exit) + Send + Sync;

/// Where exits raised outside every exit-aware frame go, in a process that
/// has one server for its whole life (a prefork worker). Set once: a
/// worker is a process of its own.
static STRAY: OnceLock<Box<StrayExits>> = OnceLock::new();

/// Hands every exit raised outside every exit-aware frame of this process
/// to `take` (after saying it), from now on; `false` if a taker is already
/// set.
#[cfg_attr(
    not(all(unix, feature = "prefork", any(feature = "http", feature = "fastcgi"))),
    allow(dead_code)
)]
pub(crate) fn take_stray_exits(take: impl Fn(&Exit) + Send + Sync + 'static) -> bool {
    STRAY.set(Box::new(take)).is_ok()
}

/// Runs `f` outside every exit-aware frame and child rule of this thread:
/// for a process that serves with frames of its own (a prefork worker,
/// forked by `fork::spawn`, whose rule would end it at any raise).
#[cfg_attr(
    not(all(unix, feature = "prefork", any(feature = "http", feature = "fastcgi"))),
    allow(dead_code)
)]
pub(crate) fn outside_frames<R>(f: impl FnOnce() -> R) -> R {
    with_context(RaiseContext::NONE, f)
}

/// Says at ERROR an exit nothing will act on (with where it was raised,
/// when known), or on stderr when no `tracing` subscriber would show it:
/// never silent.
#[cold]
pub(crate) fn say_unheeded(exit: &Exit, at: Option<&std::panic::Location<'_>>, why: &str) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(
            exit.code = exit.code(),
            exit.message = exit.message(),
            at = at.map(tracing::field::display),
            "{why}"
        );
    } else {
        match at {
            Some(at) => eprintln!("tower-exit: {exit} at {at}: {why}"),
            None => eprintln!("tower-exit: {exit}: {why}"),
        }
    }
}

/// What a failed [`tokio::task::JoinHandle`] carried, told apart by
/// [`classify_join`].
#[derive(Debug)]
#[non_exhaustive]
pub enum JoinFailure {
    /// The task raised an [`Exit`].
    Exit(Exit),
    /// The task panicked; the payload, to pass to
    /// [`std::panic::resume_unwind`].
    Panic(Box<dyn Any + Send>),
    /// The task was cancelled (aborted, or its runtime shut down).
    Cancelled(tokio::task::JoinError),
}

impl JoinFailure {
    /// The exit, if the task raised one.
    pub fn exit(&self) -> Option<&Exit> {
        match self {
            JoinFailure::Exit(exit) => Some(exit),
            _ => None,
        }
    }

    /// Continues the failure in the current task: raises the exit, resumes
    /// the panic with its payload; a cancellation becomes a panic.
    #[track_caller]
    pub fn resume(self) -> ! {
        match self {
            JoinFailure::Exit(exit) => exit.raise(),
            JoinFailure::Panic(payload) => std::panic::resume_unwind(payload),
            JoinFailure::Cancelled(err) => panic!("joined task was cancelled: {err}"),
        }
    }
}

/// Tells an [`Exit`] raised in a `tokio::spawn` or `spawn_blocking` task
/// apart from a real panic or a cancellation.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_exit::exit::{classify_join, JoinFailure};
///
/// let err = tokio::task::spawn_blocking(|| tower_exit::exit(5)).await.unwrap_err();
/// match classify_join(err) {
///     JoinFailure::Exit(exit) => assert_eq!(exit.code(), 5),
///     other => other.resume(),
/// }
/// # }
/// ```
pub fn classify_join(err: tokio::task::JoinError) -> JoinFailure {
    match err.try_into_panic() {
        Ok(payload) => match payload.downcast::<Exit>() {
            Ok(exit) => JoinFailure::Exit(*exit),
            Err(payload) => JoinFailure::Panic(payload),
        },
        Err(err) => JoinFailure::Cancelled(err),
    }
}

/// Joins a spawned task, raising again in this task an [`Exit`] it raised.
///
/// Takes a [`tokio::task::JoinHandle`] or the [`JoinHandle`] of
/// [`exit::spawn`](spawn). Other failures are returned as they are (a panic
/// as [`JoinFailure::Panic`]), so the caller decides what to do with them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_exit::exit;
///
/// let handle = exit::spawn(async { 40 + 2 });
/// assert_eq!(exit::join(handle).await.unwrap(), 42);
/// # }
/// ```
#[track_caller]
pub fn join<T, H>(handle: H) -> impl Future<Output = Result<T, JoinFailure>>
where
    H: Future<Output = Result<T, tokio::task::JoinError>>,
{
    let at = std::panic::Location::caller();
    async move {
        match handle.await {
            Ok(value) => Ok(value),
            Err(err) => match classify_join(err) {
                JoinFailure::Exit(exit) => raise_at(exit, at),
                other => Err(other),
            },
        }
    }
}

/// [`Exit::raise`] with a location taken earlier (an `async fn` cannot
/// track its caller).
fn raise_at(exit: Exit, at: &'static std::panic::Location<'static>) -> ! {
    let context = CONTEXT.get();
    if context.caught() {
        exit.raise()
    }
    unhandled(&exit, at);
    // Said once: the raise below must not say it again (the outer context
    // comes back as the exit unwinds out of here).
    let _restore = Restore(enter(context.caught_here()));
    exit.raise()
}

/// Spawns `future` on the current tokio runtime as an exit-aware task: an
/// [`Exit`] raised in it is not flagged as unhandled, and reaches whoever
/// joins the task with [`join`] (raised again there).
///
/// If the handle is dropped without being joined, an exit the task raises
/// has nobody to act on it: it is logged once at ERROR instead of
/// disappearing.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_exit::{exit, Exit};
///
/// let handle = exit::spawn(async {
///     tower_exit::exit(4) // reaches the task that joins this one
/// });
/// // `exit::join(handle).await` would raise it again here; awaiting the
/// // handle directly shows what it carries.
/// let err = handle.await.unwrap_err();
/// let exit = exit::classify_join(err).exit().cloned();
/// assert_eq!(exit, Some(Exit::new(4)));
/// # }
/// ```
#[track_caller]
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let shared = Arc::new(TaskShared::default());
    let task = ExitAwareTask {
        future,
        shared: shared.clone(),
    };
    JoinHandle {
        inner: tokio::spawn(task),
        shared,
    }
}

/// The handle of a task started with [`exit::spawn`](spawn): await it (it
/// resolves like a [`tokio::task::JoinHandle`]) or give it to [`join`].
#[derive(Debug)]
#[must_use = "dropping the handle detaches the task; an exit it raises is then only logged"]
pub struct JoinHandle<T> {
    inner: tokio::task::JoinHandle<T>,
    shared: Arc<TaskShared>,
}

impl<T> JoinHandle<T> {
    /// Cancels the task (see [`tokio::task::JoinHandle::abort`]).
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let ended = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll(cx));
        // Whatever it carried, it is now the caller's.
        self.shared.state.store(DELIVERED, Ordering::Release);
        std::task::Poll::Ready(ended)
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if self.shared.state.swap(DETACHED, Ordering::AcqRel) == EXITED {
            if let Some(exit) = self.shared.exit.get() {
                detached_exit(exit);
            }
        }
    }
}

// The task and its handle race to tell who was last: the one that sees the
// other's mark logs a detached exit, so it is logged exactly once. The
// state starts at 0: running, handle held.
const EXITED: u8 = 1;
const DETACHED: u8 = 2;
const DELIVERED: u8 = 3;

#[derive(Debug, Default)]
struct TaskShared {
    state: AtomicU8,
    exit: OnceLock<Exit>,
}

pin_project_lite::pin_project! {
    struct ExitAwareTask<F> {
        #[pin]
        future: F,
        shared: Arc<TaskShared>,
    }
}

impl<F: Future> Future for ExitAwareTask<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let future = this.future;
        let outer = enter_catching();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.poll(cx)));
        leave(outer);
        match polled {
            Ok(poll) => poll,
            Err(payload) => {
                if let Some(exit) = Exit::from_panic(&*payload) {
                    let _ = this.shared.exit.set(exit.clone());
                    if this.shared.state.swap(EXITED, Ordering::AcqRel) == DETACHED {
                        detached_exit(exit);
                    }
                }
                std::panic::resume_unwind(payload)
            }
        }
    }
}

#[cold]
fn detached_exit(exit: &Exit) {
    match STRAY.get() {
        Some(take) => {
            say_unheeded(
                exit,
                None,
                "exit raised in a task spawned with exit::spawn whose handle was dropped: the \
                 server drains and ends with it",
            );
            take(exit);
        }
        None => say_unheeded(
            exit,
            None,
            "exit raised in a task spawned with exit::spawn whose handle was dropped: nothing acts \
             on it",
        ),
    }
}

/// Runs `main`'s body so that an [`Exit`] raised in it (and not caught on
/// the way) ends the program with that exit's status, as Python's
/// interpreter does with an uncaught `SystemExit`: the exit's message, if
/// any, is printed to stderr. A real panic unwinds on as usual (status 101).
///
/// ```no_run
/// use std::process::ExitCode;
///
/// fn main() -> ExitCode {
///     tower_exit::exit::main(|| {
///         let runtime = tokio::runtime::Runtime::new().expect("runtime");
///         runtime.block_on(async {
///             // ... serve; an exit raised here ends `main` with its code.
///             tower_exit::exit(3)
///         })
///     })
/// }
/// ```
///
/// With `#[tokio::main]`, call it inside: `exit::main(|| runtime.block_on(..))`
/// needs the runtime built by hand as above, since the attribute's
/// `block_on` sits outside your function. Tasks spawned from `main` raise
/// into [`exit::spawn`](spawn)'s handle, not here.
pub fn main<T: std::process::Termination>(body: impl FnOnce() -> T) -> std::process::ExitCode {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| catching(body))) {
        Ok(value) => value.report(),
        Err(payload) => match payload.downcast::<Exit>() {
            Ok(exit) => {
                if let Some(message) = exit.message() {
                    eprintln!("{message}");
                }
                std::process::ExitCode::from(exit.status())
            }
            Err(payload) => std::panic::resume_unwind(payload),
        },
    }
}

type AbortHook = dyn Fn(&Exit) + Send + Sync;

static ABORT_HOOKS: HookList<AbortHook> = HookList::new();

/// Registers a hook that runs when [`Exit::raise`] ends the process because
/// it was built with `panic = "abort"` (destructors do not run then, so this
/// is the place to flush or commit).
///
/// Hooks run in registration order, and only in the process that registered
/// them: a forked child never runs its parent's hooks (it ends through its
/// [child cleanups](crate::fork::on_child_exit) instead). Under
/// `panic = "unwind"` they never run: the exit unwinds to a boundary
/// instead, and destructors run on the way.
pub fn on_abort_exit(hook: impl Fn(&Exit) + Send + Sync + 'static) {
    #[cfg(all(unix, feature = "fork"))]
    let hook = {
        crate::fork::end::watch_forks();
        let registered_in = crate::fork::end::generation();
        move |exit: &Exit| {
            if crate::fork::end::generation() == registered_in {
                hook(exit)
            }
        }
    };
    ABORT_HOOKS.push(Box::new(hook));
}

#[cfg_attr(not(panic = "abort"), allow(dead_code))]
fn run_abort_hooks(exit: &Exit) {
    ABORT_HOOKS.for_each(|hook| hook(exit));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum AppError {
        #[error("database")]
        Db(#[source] Exit),
    }

    #[test]
    fn codes_are_kept_and_truncated_like_the_os_when_ending_a_process() {
        assert_eq!(Exit::new(256).code(), 256);
        assert_eq!(Exit::new(256).status(), 0);
        assert_eq!(Exit::new(-1).status(), 255);
        assert_eq!(Exit::new(300).status(), 44);
        assert!(Exit::new(256).is_success());
    }

    #[test]
    fn exit_is_found_through_source_chains() {
        let nested = std::io::Error::other(AppError::Db(Exit::new(7)));
        assert_eq!(Exit::from_error(&nested).unwrap().code(), 7);
        let boxed: Box<dyn Error + Send + Sync> = Box::new(AppError::Db(Exit::new(8)));
        assert_eq!(Exit::from_service_error(&boxed).unwrap().code(), 8);
        let plain = std::io::Error::other("disk full");
        assert!(Exit::from_error(&plain).is_none());
    }

    #[test]
    fn display_reads_well() {
        assert_eq!(Exit::success().to_string(), "exit 0");
        assert_eq!(Exit::new(3).with_message("bye").to_string(), "exit 3: bye");
    }
}
