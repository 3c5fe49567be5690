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

mod abort;
mod context;
pub(crate) mod rule;
mod task;

pub use self::abort::on_abort_exit;
pub(crate) use self::context::*;
pub use self::task::{classify_join, join, main, spawn, JoinFailure, JoinHandle};

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
    armed: Option<rule::Armed>,
}

impl fmt::Debug for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Exit");
        debug
            .field("code", &self.code)
            .field("message", &self.message);
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
        let context = context::context();
        end_child_if_ruled(&self);
        if !context.caught() {
            context::unhandled(&self, std::panic::Location::caller());
        } else if context.forked_below() {
            context::forked_unguarded(&self, std::panic::Location::caller());
        }
        #[cfg(panic = "abort")]
        {
            abort::run_abort_hooks(&self);
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
        if let Some(armed) = &self.armed {
            rule::end_if_armed(armed, self.status());
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
