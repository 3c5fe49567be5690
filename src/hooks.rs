//! A lock-free, append-only list of hooks.
//!
//! Hook lists are read in places where no lock may be taken: in a forked
//! child of a multi-threaded process (another thread may have held the lock
//! at the moment of the fork, and that thread does not exist in the child)
//! and while the process is ending. So the list is a singly linked list of
//! leaked nodes, appended to with compare-and-swap and walked with atomic
//! loads only: no lock, no allocation on the reading side.

#![allow(unsafe_code)] // raw nodes of the lock-free list, see the SAFETY comments

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

pub(crate) struct HookList<F: ?Sized + 'static> {
    head: AtomicPtr<Node<F>>,
}

struct Node<F: ?Sized + 'static> {
    hook: Box<F>,
    next: AtomicPtr<Node<F>>,
}

impl<F: ?Sized + 'static> HookList<F> {
    pub(crate) const fn new() -> Self {
        HookList {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Appends `hook` at the tail, so hooks run in registration order.
    pub(crate) fn push(&self, hook: Box<F>) {
        // Leaked on purpose: a node lives as long as the process, so readers
        // never race with a free.
        let node = Box::into_raw(Box::new(Node {
            hook,
            next: AtomicPtr::new(ptr::null_mut()),
        }));
        let mut slot = &self.head;
        loop {
            match slot.compare_exchange(ptr::null_mut(), node, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                // SAFETY: every non-null pointer in the list comes from
                // `Box::into_raw` above and is never freed.
                Err(next) => slot = unsafe { &(*next).next },
            }
        }
    }

    /// Calls `f` on every hook, in registration order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&F)) {
        let mut next = self.head.load(Ordering::Acquire);
        while !next.is_null() {
            // SAFETY: see `push`: nodes are leaked, never freed.
            let node = unsafe { &*next };
            f(&node.hook);
            next = node.next.load(Ordering::Acquire);
        }
    }
}
