//! How a forked child ends: the bottom floor under [`Exit`](crate::Exit)
//! and everything that forks.
//!
//! The fork generation (which process this is), the child cleanup hooks,
//! ending a child now (`_exit`, `SIGTERM`), the rule a frame sets for
//! children forked below it, and the arming of an exit that leaves a
//! child. It depends on nothing in the crate above it (`hooks` and `sys`
//! only): `Exit` and the layers call down into it, never the other way.

use crate::hooks::HookList;
use crate::sys;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Once;

pub(crate) use crate::sys::{exit_now, terminate_now};

// ---------------------------------------------------------------------------
// Fork generation
// ---------------------------------------------------------------------------

/// Counts the forks this process descends from. Incremented in the child
/// only (by the `pthread_atfork` child handler), so a value that changed
/// since a request started means "this is now a child forked during the
/// request".
static GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add, no lock, no allocation.
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the `pthread_atfork` child handler once per process.
pub(crate) fn watch_forks() {
    ATFORK.call_once(|| {
        if let Err(error) = sys::at_fork_in_child(after_fork_in_child) {
            tracing::error!(%error, "pthread_atfork failed: forks will not be detected");
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
/// crate ([`spawn`](crate::fork::spawn),
/// [`ForkGuardLayer`](crate::ForkGuardLayer)): flush logs, commit or roll
/// back, close sockets.
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
// The rule for children forked below a frame
// ---------------------------------------------------------------------------

/// How a child forked below an exit-aware frame ends when it raises an
/// exit (see `exit::RaiseContext`): set by the fork guard while it calls
/// and polls, and by `spawn` around the child's work.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChildRule {
    /// The generation the frame started in: the rule applies only in a
    /// process forked since (a higher generation).
    pub(crate) started: u64,
    pub(crate) end: ChildEnd,
    /// Set by the guard: a child forked during a guarded request ends at
    /// the raise even below a boundary. `spawn`'s rule gives way to a
    /// boundary inside the child (a prefork worker serves with its own).
    pub(crate) sticky: bool,
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

    /// Called when an exit with `status` is raised under this rule: in a
    /// child the rule covers, ends the child here (cleanup hooks, then
    /// `SIGTERM` or `_exit`) without allocating or unwinding. Returns
    /// otherwise.
    pub(crate) fn end_at_raise(self, status: u8) {
        if generation() == self.started {
            return;
        }
        match self.end {
            // Travels on armed, as documented; under `panic = "abort"` it
            // cannot, and ends with its status as `exit_code` would.
            ChildEnd::Propagate if cfg!(not(panic = "abort")) => {}
            ChildEnd::Terminate => {
                run_child_hooks();
                terminate_now()
            }
            ChildEnd::ExitCode | ChildEnd::Propagate => {
                run_child_hooks();
                exit_now(i32::from(status))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Arming
// ---------------------------------------------------------------------------

/// The arming of an exit that leaves a forked child (see
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

    /// At a boundary that caught the exit this arms: in the child that
    /// armed it, ends the child now with `status` (after its cleanups)
    /// instead of answering the parent's client. Returns otherwise.
    pub(crate) fn end_here(&self, status: u8) {
        if generation() == self.generation {
            self.disarmed.store(true, Ordering::Release);
            run_child_hooks();
            exit_now(i32::from(status));
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
