//! Exits raised in tasks: telling them apart when a task is joined,
//! exit-aware tasks, and `main`.

use super::context::{catching, detached_exit, enter_catching, leave, raise_at};
use super::Exit;
use std::any::Any;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

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
