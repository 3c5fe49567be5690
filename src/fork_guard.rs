//! Keep a child forked during a request from returning into the parent's
//! stack.
//!
//! # Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::ServiceBuilder;
//! use tower_exit::fork::{fork, Forked};
//! use tower_exit::ServiceBuilderExt;
//!
//! async fn handler(_: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     // SAFETY: the child only raises an exit, which the guard turns into
//!     // the end of the child without allocating or unwinding.
//!     match unsafe { fork() }.expect("fork") {
//!         Forked::Child => {
//!             // Child work, then exit. Whatever a layer above does with
//!             // the exit, the guard ends the child first.
//!             tower_exit::exit(0)
//!         }
//!         Forked::Parent(_child) => Ok(Response::new(Full::from("forked"))),
//!     }
//! }
//!
//! let svc = ServiceBuilder::new()
//!     .layer(tower_http::catch_panic::CatchPanicLayer::new()) // not exit-aware
//!     .fork_guard() // below every catch-all
//!     .service_fn(handler);
//! // Used as a service (here, or by a server), the guard learns how to
//! // look into the handler's error type.
//! let _response = tower::ServiceExt::oneshot(svc, Request::new(()));
//! ```
//!
//! The worst case: a handler forks, the child calls
//! [`exit(0)`](fn@crate::exit), a catch-all above swallows the exit, and the
//! child runs on into the parent's code: a second response, a second commit,
//! a copy of the server accepting on the parent's socket.
//!
//! [`ForkGuardLayer`] sits just above the handler, below every catch-all.
//! While it calls and polls the inner service, an [`Exit`] raised in a child
//! forked meanwhile ends that child right at the raise: no allocation, no
//! unwinding through the handler's frames (whose destructors would take
//! locks that other threads of the parent held at the fork: the allocator's,
//! a semaphore's, a pool's). After the inner `call` and after every poll it
//! also checks (one atomic load) whether it now runs in such a child; if
//! so, whatever the outcome (an error, a panic, a response, or `Pending`),
//! it ends the child without returning. Either way the child first runs
//! its cleanup hooks ([`fork::on_child_exit`](crate::fork::on_child_exit)),
//! then ends:
//!
//! - by default with `SIGTERM` sent to itself after
//!   resetting that signal to its default action (an application's SIGTERM
//!   handler must not keep the child alive);
//! - with [`ForkGuardLayer::exit_code`], by `_exit(status)` so the parent
//!   sees the status: `Ok` 0, an `Exit` its status, a panic 101, an error or
//!   `Pending` (the child tried to await after the fork) 1;
//! - with [`ForkGuardLayer::propagate_exit`], an `Exit` unwinds on, *armed*,
//!   up to an exit-aware [`BoundaryLayer`](crate::BoundaryLayer), which ends
//!   the child with the exit's status; a layer that drops it on the way kills
//!   the child at that moment. This is the one mode in which a child
//!   unwinds, on purpose: see its docs for the price.
//!
//! A child's `_exit` and `SIGTERM` skip `atexit` handlers and do not flush
//! the parent's buffered output a second time.
//!
//! In the parent it changes nothing.
//!
//! # What it does not cover
//!
//! - A fork made on another thread, or in another task than the guarded
//!   future, while this request is not being polled: the child continues in
//!   that other code. (If that child later polls this request, the guard
//!   ends it then.) Guard every service, or fork with
//!   [`fork::spawn`](crate::fork::spawn), whose child cannot return at all.
//! - Processes made by raw `clone` syscalls or `vfork`: `pthread_atfork`
//!   handlers do not run for them. `posix_spawn` and `std::process::Command`
//!   exec at once and need no guard.
//! - Code in the child that awaits after the fork: the parent's tokio runtime
//!   does not work in a child. The guard ends the child when the inner future
//!   returns `Pending`.

use crate::exit::{context, enter, leave, AsError, ConcreteError, RaiseContext};
use crate::fork::end::{
    exit_now, generation, run_child_hooks, terminate_now, watch_forks, ChildEnd, ChildRule,
};
use crate::fork::status_of_panic;
use crate::Exit;
use pin_project_lite::pin_project;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Layer that ends a child forked during a request before it can return
/// into the parent's stack. See [the module docs](self).
///
/// `M` is the [`AsError`] marker of the inner service's error, inferred
/// where the guarded service is used: the guard looks for an exit in an
/// error (to end a child with its status) exactly as every other layer of
/// this crate does, through its `source()` chain.
pub struct ForkGuardLayer<M = ConcreteError> {
    pub(crate) end: ChildEnd,
    _error: PhantomData<fn() -> M>,
}

impl<M> Clone for ForkGuardLayer<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for ForkGuardLayer<M> {}

impl<M> fmt::Debug for ForkGuardLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForkGuardLayer")
            .field("end", &self.end)
            .finish()
    }
}

impl<M> Default for ForkGuardLayer<M> {
    fn default() -> Self {
        ForkGuardLayer::new()
    }
}

impl<M> ForkGuardLayer<M> {
    /// A guard that ends a child with `SIGTERM`.
    pub fn new() -> Self {
        // Registered here, before any request can fork.
        watch_forks();
        ForkGuardLayer {
            end: ChildEnd::Terminate,
            _error: PhantomData,
        }
    }

    /// Ends a child with `_exit(status)` instead of `SIGTERM`, so the parent
    /// sees the status of the child's outcome.
    pub fn exit_code(mut self) -> Self {
        self.end = ChildEnd::ExitCode;
        self
    }

    /// Lets an [`Exit`] leaving a child travel on up to an exit-aware
    /// [`BoundaryLayer`](crate::BoundaryLayer), so that the destructors of
    /// the frames in between run (an RAII transaction rolls back, a lock
    /// guard unlocks). The exit is *armed*: the boundary ends the child with
    /// the exit's status (after the cleanup hooks) instead of answering, and
    /// any layer that drops the exit instead (a catch-all that turns it into
    /// a `500`) kills the child with `SIGTERM` at that moment.
    ///
    /// The price: the unwind allocates and runs the destructors of every
    /// frame between the raise and the boundary *in the child*, against
    /// resources it shares with the parent (a pooled connection returned to
    /// a pool, a semaphore permit released, a lock taken by the allocator).
    /// In a child of a multi-threaded process any of them may hang on a
    /// lock another thread held at the fork. Prefer the default modes there.
    /// Under `panic = "abort"` nothing unwinds and this mode ends the child
    /// at the raise, as [`exit_code`](Self::exit_code) does.
    ///
    /// Only an unwinding exit, or an `Err` whose error type is `Exit`
    /// itself, travels on; an exit deeper in an error's chain cannot be
    /// armed in place and ends the child at the guard with its status;
    /// every other outcome ends the child at the guard with `SIGTERM`.
    /// Between the guard and the boundary, the child runs the code of the
    /// layers it passes through: a catch-all that reports before it drops
    /// the exit still reports, from the child. Use this mode only where the
    /// layers above the guard are exit-aware or tunneled.
    pub fn propagate_exit(mut self) -> Self {
        self.end = ChildEnd::Propagate;
        self
    }
}

impl<S, M> Layer<S> for ForkGuardLayer<M> {
    type Service = ForkGuard<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ForkGuard::new(inner, *self)
    }
}

/// Service built by [`ForkGuardLayer`].
pub struct ForkGuard<S, M = ConcreteError> {
    inner: S,
    end: ChildEnd,
    _error: PhantomData<fn() -> M>,
}

impl<S: Clone, M> Clone for ForkGuard<S, M> {
    fn clone(&self) -> Self {
        ForkGuard {
            inner: self.inner.clone(),
            end: self.end,
            _error: PhantomData,
        }
    }
}

impl<S: Copy, M> Copy for ForkGuard<S, M> {}

impl<S: fmt::Debug, M> fmt::Debug for ForkGuard<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForkGuard")
            .field("inner", &self.inner)
            .field("end", &self.end)
            .finish()
    }
}

impl<S, M> ForkGuard<S, M> {
    /// Guards `inner` as `guard` says (see [`ForkGuardLayer`]'s modes).
    pub fn new(inner: S, guard: ForkGuardLayer<M>) -> Self {
        watch_forks();
        ForkGuard {
            inner,
            end: guard.end,
            _error: PhantomData,
        }
    }
}

inner_accessors!(ForkGuard<S, M>, inner);

impl<S, M, Req> Service<Req> for ForkGuard<S, M>
where
    S: Service<Req>,
    S::Error: AsError<M> + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let started = generation();
        let inner = &mut self.inner;
        let outer = enter(guarded(started, self.end));
        let mut called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave(outer);
        in_child_after_call(started, self.end, &mut called);
        match called {
            Ok(future) => ResponseFuture {
                future,
                started,
                end: self.end,
                _error: PhantomData,
            },
            Err(payload) => resume_unwind(payload),
        }
    }
}

pin_project! {
    /// Response future of [`ForkGuard`].
    pub struct ResponseFuture<F, M> {
        #[pin]
        future: F,
        started: u64,
        end: ChildEnd,
        _error: PhantomData<fn() -> M>,
    }
}

impl<F, M, T, E> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<T, E>>,
    E: AsError<M> + 'static,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = this.future;
        let outer = enter(guarded(*this.started, *this.end));
        let mut polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
        leave(outer);
        in_child_after_poll(*this.started, *this.end, &mut polled);
        match polled {
            Ok(poll) => poll,
            Err(payload) => resume_unwind(payload),
        }
    }
}

/// After the inner `call`: in a child forked during it, arms an unwinding
/// exit (propagate mode) or ends the child. Returns at once in the parent.
#[inline]
pub(crate) fn in_child_after_call<T>(
    started: u64,
    end: ChildEnd,
    called: &mut Result<T, Box<dyn Any + Send>>,
) {
    if generation() != started {
        match called {
            Err(payload) => arm_or_end(end, payload),
            Ok(_) => end_child(end, 0),
        }
    }
}

/// After a poll of the inner future: in a child forked since `started`,
/// whatever the outcome, arms an exit that travels on (propagate mode) or
/// ends the child. The happy path costs one relaxed load: the generation
/// only changes in a child, in the `pthread_atfork` handler.
#[inline]
pub(crate) fn in_child_after_poll<T, E: AsError<M> + 'static, M>(
    started: u64,
    end: ChildEnd,
    polled: &mut Result<Poll<Result<T, E>>, Box<dyn Any + Send>>,
) {
    if generation() != started {
        match polled {
            Err(payload) => arm_or_end(end, payload),
            Ok(Poll::Ready(Err(err))) if end == ChildEnd::Propagate => {
                match (err as &mut dyn Any).downcast_mut::<Exit>() {
                    Some(exit) => exit.arm(),
                    // An exit deeper in the chain cannot be armed in place:
                    // the child ends here with its status.
                    None => match Exit::from_service_error(err) {
                        Some(exit) => end_child(ChildEnd::ExitCode, i32::from(exit.status())),
                        None => end_child(ChildEnd::Terminate, 1),
                    },
                }
            }
            _ => end_child(end, status_of_poll(polled)),
        }
    }
}

/// The raise context while the guard calls or polls: in a child forked
/// meanwhile, `Exit::raise` ends the child in place (rule 1), before it can
/// allocate or unwind through frames that hold the parent's locks.
#[inline]
pub(crate) fn guarded(started: u64, end: ChildEnd) -> RaiseContext {
    context().with_child(ChildRule::guard(started, end))
}

/// [`guarded`], for a synchronous `call` inside an exit-aware frame (the
/// one-layer stack's): the task cell is not read.
#[inline]
pub(crate) fn guarded_in_call(started: u64, end: ChildEnd) -> RaiseContext {
    crate::exit::context_in_call()
        .with_child(ChildRule::guard(started, end))
        .caught_in_call()
}

fn status_of_poll<T, E: AsError<M>, M>(
    polled: &Result<Poll<Result<T, E>>, Box<dyn Any + Send>>,
) -> i32 {
    match polled {
        Ok(Poll::Ready(Ok(_))) => 0,
        Ok(Poll::Ready(Err(err))) => {
            Exit::from_service_error(err).map_or(1, |exit| i32::from(exit.status()))
        }
        Ok(Poll::Pending) => 1,
        Err(payload) => status_of_panic(&**payload),
    }
}

/// In a child, for an unwind: arms an `Exit` to travel on (propagate mode),
/// or ends the child.
fn arm_or_end(end: ChildEnd, payload: &mut Box<dyn Any + Send>) {
    if end == ChildEnd::Propagate {
        if let Some(exit) = payload.downcast_mut::<Exit>() {
            exit.arm();
            return;
        }
    }
    end_child(end, status_of_panic(&**payload))
}

/// Ends this child: cleanups, then SIGTERM or `_exit`. Never returns.
///
/// Runs in a child that may descend from a multi-threaded process: nothing
/// here allocates or locks (user hooks aside, which are documented so).
#[cold]
#[inline(never)]
fn end_child(end: ChildEnd, status: i32) -> ! {
    run_child_hooks();
    match end {
        ChildEnd::Terminate | ChildEnd::Propagate => terminate_now(),
        ChildEnd::ExitCode => exit_now(status),
    }
}
