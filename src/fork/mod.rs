//! Fork a child that can never run on into the caller's code, and reap it.
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
//!
//! - [`spawn`] runs a closure in a forked child under `catch_unwind`, then
//!   the child's cleanup hooks, then `_exit`: the closure returning gives
//!   status 0, [`exit(n)`](fn@crate::exit) gives `n`, a panic gives 101. Like
//!   Python's `multiprocessing`, the child never returns into the caller.
//! - [`fork`] is the raw form, for code that must fork in place (a handler
//!   that forks and goes on in the child): the child continues after the call, and a
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

#![allow(unsafe_code)] // `fork` is an `unsafe fn` by contract; see `crate::sys`.

mod child;
pub(crate) mod end;
pub mod server;

pub use self::child::Child;
pub use self::end::on_child_exit;
pub(crate) use self::end::{generation, run_child_hooks, watch_forks};

use self::end::{exit_now, ChildEnd, ChildRule};
use crate::{sys, Exit};
use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// The status a child ends with when its work panicked, as Rust's own
/// `main` does.
pub const PANIC_STATUS: i32 = 101;

/// The status for the outcome of a child's work: `Ok` 0, an `Exit` its
/// status, a panic 101, any other error 1.
pub(crate) fn status_of_panic(payload: &(dyn Any + Send)) -> i32 {
    match Exit::from_panic(payload) {
        Some(exit) => i32::from(exit.status()),
        None => PANIC_STATUS,
    }
}

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
    // SAFETY: the caller keeps the contract on what the child does (see
    // `# Safety`).
    match unsafe { sys::fork() }? {
        None => Ok(Forked::Child),
        Some(pid) => Ok(Forked::Parent(Child::new(pid, parent_generation))),
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
                .caught_outside_tasks()
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

