//! What the raise context and the one-layer stack need of forking, chosen
//! once: with feature `fork` on unix, the fork generation, the child rule
//! a frame sets, armed exits (`crate::fork::end`) and the guard's checks
//! (`crate::fork_guard`); elsewhere no process ever forks through this
//! crate, and each of these is a constant, a no-op or uninhabited.

#[cfg(all(unix, feature = "fork"))]
mod imp {
    use crate::fork::end::ChildRule;

    /// How a child forked under a guard ends.
    pub(crate) use crate::fork::end::ChildEnd as Guard;
    pub(crate) use crate::fork::end::{generation, watch_forks};
    pub(crate) use crate::fork_guard::{
        guarded, guarded_in_call, in_child_after_call as after_call,
        in_child_after_poll as after_poll,
    };

    /// Whether the packed rule `word` is a fork guard's (sticky).
    #[inline]
    pub(crate) fn sticky(word: u64) -> bool {
        word & ChildRule::STICKY != 0
    }

    /// The arming of an exit that leaves a forked child.
    pub(crate) type Armed = std::sync::Arc<crate::fork::end::Armed>;

    /// Under the packed rule `word`: in a child it covers, ends the child
    /// here with `status`. Returns otherwise.
    #[inline]
    pub(crate) fn end_at_raise(word: u64, status: u8) {
        if let Some(rule) = ChildRule::unpack(word) {
            rule.end_at_raise(status);
        }
    }

    /// A boundary caught an exit armed with `armed`: in the child that
    /// armed it, ends the child with `status`. Returns otherwise.
    #[inline]
    pub(crate) fn end_if_armed(armed: &Armed, status: u8) {
        armed.end_here(status);
    }
}

#[cfg(not(all(unix, feature = "fork")))]
mod imp {
    /// No fork is ever watched: always generation 0.
    #[inline]
    pub(crate) fn generation() -> u64 {
        0
    }

    pub(crate) fn watch_forks() {}

    /// No rule is ever packed.
    #[inline]
    pub(crate) fn sticky(_word: u64) -> bool {
        false
    }

    /// No exit is ever armed: `Option<Armed>` is always `None`, and takes
    /// no space.
    #[derive(Debug)]
    pub(crate) enum Armed {}

    impl Clone for Armed {
        fn clone(&self) -> Self {
            match *self {}
        }
    }

    #[inline]
    pub(crate) fn end_at_raise(_word: u64, _status: u8) {}

    /// No guard exists: `Option<Guard>` is always `None`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Guard {}

    pub(crate) fn guarded(_started: u64, end: Guard) -> crate::exit::RaiseContext {
        match end {}
    }

    pub(crate) fn guarded_in_call(_started: u64, end: Guard) -> crate::exit::RaiseContext {
        match end {}
    }

    pub(crate) fn after_call<T>(_started: u64, end: Guard, _called: &mut T) {
        match end {}
    }

    pub(crate) fn after_poll<T>(_started: u64, end: Guard, _polled: &mut T) {
        match end {}
    }

    #[inline]
    pub(crate) fn end_if_armed(armed: &Armed, _status: u8) {
        match *armed {}
    }
}

pub(crate) use self::imp::*;
