//! What `Exit::raise` runs before it ends a process built with
//! `panic = "abort"`.

use super::rule;
use super::Exit;
use crate::hooks::HookList;

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
    rule::watch_forks();
    let registered_in = rule::generation();
    ABORT_HOOKS.push(Box::new(move |exit: &Exit| {
        if rule::generation() == registered_in {
            hook(exit)
        }
    }));
}

#[cfg_attr(not(panic = "abort"), allow(dead_code))]
pub(super) fn run_abort_hooks(exit: &Exit) {
    ABORT_HOOKS.for_each(|hook| hook(exit));
}
