//! Where an exit raised on this thread goes: the raise context that
//! exit-aware frames set while they call and poll, and the exits nothing
//! exit-aware takes (said at the raise, or handed to a process's server).

use super::rule;
use super::Exit;
use std::sync::OnceLock;

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
/// 30 ns a call in store-forwarding stalls), plus the tokio task the
/// catching frame runs on, in a thread-local of its own (see `TASK`).
///
/// Bit 0: an exit-aware frame will catch an unwinding exit. Bits 1 to 62:
/// the rule for a child forked below this frame (`fork::ChildRule`, packed:
/// bits 1–3 its end and stickiness, 0 when there is none, bits 4 up the
/// fork generation it started in), under which a raise ends the child in
/// place; without a rule, bits 4 up keep the generation the catching frame
/// was entered in. Bit 63: `ANY_TASK`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RaiseContext(u64, Option<tokio::task::Id>);

const CAUGHT: u64 = 1;
/// Set by a frame around a synchronous `call`: a raise there is on the
/// caller's task, whatever task that is, so the frame asks tokio nothing
/// (about 13 instructions a call). Running another executor's tasks
/// synchronously inside `Service::call` (`block_in_place` and a nested
/// runtime's `block_on`) is not seen as such there.
const ANY_TASK: u64 = 1 << 63;

impl RaiseContext {
    const NONE: RaiseContext = RaiseContext(0, None);

    /// Whether an exit-aware frame will catch an unwinding exit raised
    /// here: one is entered, and on this very tokio task. A task of
    /// another executor polled inside the frame (a `LocalSet`'s, a nested
    /// runtime's) has its own catch, which the exit never gets past.
    #[inline]
    pub(crate) fn caught(self) -> bool {
        self.0 & CAUGHT != 0 && (self.0 & ANY_TASK != 0 || self.1 == tokio::task::try_id())
    }

    /// The packed rule for children (bits 1 up, flags aside).
    #[inline]
    fn rule_word(self) -> u64 {
        (self.0 & !ANY_TASK) >> 1
    }

    cfg_fork! {
        /// This context with `rule` for children forked below (`caught`
        /// kept).
        #[inline]
        pub(crate) fn with_child(self, rule: crate::fork::end::ChildRule) -> RaiseContext {
            RaiseContext((self.0 & (CAUGHT | ANY_TASK)) | rule.pack() << 1, self.1)
        }
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
        RaiseContext(self.catching_word(), tokio::task::try_id())
    }

    /// [`catching`](Self::catching), around a synchronous `call`.
    #[inline]
    fn catching_in_call(self) -> RaiseContext {
        RaiseContext(self.catching_word() | ANY_TASK, None)
    }

    #[inline]
    fn catching_word(self) -> u64 {
        if rule::sticky(self.rule_word()) {
            return (self.0 & !ANY_TASK) | CAUGHT;
        }
        CAUGHT | rule::generation() << 4
    }

    /// Whether this frame catches exits but runs in a child forked below
    /// it with no rule for children (no fork guard): the child's copy of
    /// the frame takes the exit and answers in the child.
    #[inline]
    pub(super) fn forked_below(self) -> bool {
        let word = self.rule_word();
        word & 0b11 == 0 && word >> 3 != rule::generation()
    }

    /// This context, marked as caught by a frame outside every tokio task
    /// (a forked child's body, before it builds a runtime of its own):
    /// asks tokio nothing, which in a child could allocate.
    #[cfg_attr(not(all(unix, feature = "fork")), allow(dead_code))]
    #[inline]
    pub(crate) fn caught_outside_tasks(self) -> RaiseContext {
        RaiseContext(self.0 | CAUGHT, None)
    }

    /// This context, marked as caught on the current task (the rule for
    /// children kept).
    #[inline]
    pub(crate) fn caught_here(self) -> RaiseContext {
        RaiseContext((self.0 & !ANY_TASK) | CAUGHT, tokio::task::try_id())
    }

    /// [`caught_here`](Self::caught_here), around a synchronous `call`.
    #[cfg_attr(not(all(unix, feature = "fork")), allow(dead_code))]
    #[inline]
    pub(crate) fn caught_in_call(self) -> RaiseContext {
        RaiseContext(self.0 | CAUGHT | ANY_TASK, None)
    }
}

thread_local! {
    static CONTEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The task of the frame in `CONTEXT`: a cell of its own, so that
    /// saving and restoring never mixes access widths.
    static TASK: std::cell::Cell<Option<tokio::task::Id>> = const { std::cell::Cell::new(None) };
}

/// This thread's context.
#[inline]
fn get() -> RaiseContext {
    RaiseContext(CONTEXT.get(), TASK.get())
}

/// Makes `context` this thread's; returns the one it replaces.
#[inline]
fn replace(context: RaiseContext) -> RaiseContext {
    RaiseContext(CONTEXT.replace(context.0), TASK.replace(context.1))
}

/// Restores the outer context when a frame returns, also while unwinding.
struct Restore(RaiseContext);

impl Drop for Restore {
    fn drop(&mut self) {
        replace(self.0);
    }
}

/// Rule 1: in a forked child that a fork guard or `fork::spawn` covers,
/// ends the child here (cleanup hooks, then `SIGTERM` or `_exit`) without
/// allocating. Returns otherwise.
#[inline]
pub(crate) fn end_child_if_ruled(exit: &Exit) {
    rule::end_at_raise(get().rule_word(), exit.status());
}

/// The context of the frame this is called from.
#[inline]
pub(crate) fn context() -> RaiseContext {
    get()
}

/// [`context`] without its task, for a frame around a synchronous `call`.
#[cfg_attr(not(all(unix, feature = "fork")), allow(dead_code))]
#[inline]
pub(crate) fn context_in_call() -> RaiseContext {
    RaiseContext(CONTEXT.get(), None)
}

/// Runs `f` with `context` as this thread's raise context.
#[inline]
pub(crate) fn with_context<R>(context: RaiseContext, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(replace(context));
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
    replace(context)
}

/// Gives back the context [`enter`] returned.
#[inline]
pub(crate) fn leave(outer: RaiseContext) {
    replace(outer);
}

/// The context of a frame that catches exits, inside the current one.
#[inline]
pub(crate) fn catching_context() -> RaiseContext {
    get().catching()
}

/// [`catching_context`] around a synchronous `call` (see `ANY_TASK`).
#[inline]
pub(crate) fn catching_context_in_call() -> RaiseContext {
    RaiseContext(CONTEXT.get(), None).catching_in_call()
}

/// The context around a synchronous `call` (`ANY_TASK` set): only the
/// word changes, the task cell is left as it is (nothing reads it under
/// `ANY_TASK`, and a frame inside that sets it gives it back). Two TLS
/// accesses fewer a call than [`enter`].
#[must_use]
pub(crate) struct InCall(u64);

/// [`enter`] a context made for a synchronous `call`.
#[inline]
pub(crate) fn enter_in_call(context: RaiseContext) -> InCall {
    debug_assert!(context.0 & ANY_TASK != 0);
    InCall(CONTEXT.replace(context.0))
}

/// Gives back the context [`enter_in_call`] returned.
#[inline]
pub(crate) fn leave_call(outer: InCall) {
    CONTEXT.set(outer.0);
}

/// [`enter`] the context of a frame that catches exits.
#[inline]
pub(crate) fn enter_catching() -> RaiseContext {
    enter(catching_context())
}

/// [`enter_catching`] around a synchronous `call` (see `ANY_TASK`).
#[inline]
pub(crate) fn enter_catching_in_call() -> InCall {
    enter_in_call(catching_context_in_call())
}

/// Rule 4: an exit raised where nothing exit-aware will catch it is said
/// once, here, where the location is still known; in a process whose
/// server takes stray exits (a prefork worker), it is also handed to it.
#[cold]
#[inline(never)]
pub(super) fn unhandled(exit: &Exit, at: &std::panic::Location<'_>) {
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
pub(super) fn forked_unguarded(exit: &Exit, at: &std::panic::Location<'_>) {
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

/// [`Exit::raise`] with a location taken earlier (an `async fn` cannot
/// track its caller).
pub(crate) fn raise_at(exit: Exit, at: &'static std::panic::Location<'static>) -> ! {
    let context = get();
    if context.caught() {
        exit.raise()
    }
    unhandled(&exit, at);
    // Said once: the raise below must not say it again (the outer context
    // comes back as the exit unwinds out of here).
    let _restore = Restore(enter(context.caught_here()));
    exit.raise()
}

#[cold]
pub(crate) fn detached_exit(exit: &Exit) {
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
