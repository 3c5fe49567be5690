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
    armed: Option<std::sync::Arc<crate::fork::Armed>>,
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
    /// Under `panic = "abort"` there is no unwinding: the hooks registered
    /// with [`on_abort_exit`] run, then the process ends with
    /// [`status`](Self::status) through [`std::process::exit`].
    pub fn raise(self) -> ! {
        #[cfg(panic = "abort")]
        {
            run_abort_hooks(&self);
            std::process::exit(i32::from(self.status()));
        }
        #[cfg(not(panic = "abort"))]
        std::panic::resume_unwind(Box::new(self))
    }

    #[cfg(all(unix, feature = "fork"))]
    pub(crate) fn arm(&mut self, armed: std::sync::Arc<crate::fork::Armed>) {
        self.armed = Some(armed);
    }

    #[cfg(all(unix, feature = "fork"))]
    pub(crate) fn armed(&self) -> Option<&crate::fork::Armed> {
        self.armed.as_deref()
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

/// What a failed [`tokio::task::JoinHandle`] carried, told apart by
/// [`classify_join`].
#[derive(Debug)]
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
/// Other failures are returned as they are (a panic as
/// [`JoinFailure::Panic`]), so the caller decides what to do with them.
pub async fn join<T>(handle: tokio::task::JoinHandle<T>) -> Result<T, JoinFailure> {
    match handle.await {
        Ok(value) => Ok(value),
        Err(err) => match classify_join(err) {
            JoinFailure::Exit(exit) => exit.raise(),
            other => Err(other),
        },
    }
}

type AbortHook = dyn Fn(&Exit) + Send + Sync;

static ABORT_HOOKS: HookList<AbortHook> = HookList::new();

/// Registers a hook that runs when [`Exit::raise`] ends the process because
/// it was built with `panic = "abort"` (destructors do not run then, so this
/// is the place to flush or commit).
///
/// Hooks run in registration order. Under `panic = "unwind"` they never run:
/// the exit unwinds to a boundary instead, and destructors run on the way.
pub fn on_abort_exit(hook: impl Fn(&Exit) + Send + Sync + 'static) {
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
