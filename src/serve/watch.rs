//! A connection polled on every wake-up, its watchers (the drain signal,
//! the deadline) only when one of them woke the task.
//!
//! `tokio::select!` polls every branch each time the task wakes, and a
//! connection task wakes several times per request: polling a `Notified`
//! takes its mutex, polling a `Sleep` registers its waker again, about 1 %
//! of a small request's CPU (measured, `benches/http_e2e.rs`). Here the
//! watchers get a waker of their own that raises a flag; they are polled
//! only when it is up.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// What woke the task up and finished.
pub(super) enum Event<C, W> {
    /// The connection ended.
    Conn(C),
    /// A watcher fired.
    Watcher(W),
}

/// Per connection task; see [the module docs](self).
pub(super) struct Watch {
    flag: Arc<Flag>,
    /// `flag` as a waker, given to the watchers.
    waker: Waker,
    /// The task's waker last stored in `flag`.
    task: Option<Waker>,
}

struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Flag first, then wake: the task polled after this sees the flag.
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = &*task {
            task.wake_by_ref();
        }
    }
}

impl Watch {
    pub(super) fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Watch {
            waker: Waker::from(flag.clone()),
            flag,
            task: None,
        }
    }

    /// Polls `conn`, then `watchers` if they woke the task (or were never
    /// polled, or fired last time and so must be polled again).
    pub(super) fn poll<C: Future, W>(
        &mut self,
        cx: &mut Context<'_>,
        conn: Pin<&mut C>,
        watchers: impl FnOnce(&mut Context<'_>) -> Poll<W>,
    ) -> Poll<Event<C::Output, W>> {
        if !self
            .task
            .as_ref()
            .is_some_and(|task| task.will_wake(cx.waker()))
        {
            // First poll, or the task's waker changed: a flag raised from
            // now on wakes this one.
            *self
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            self.task = Some(cx.waker().clone());
        }
        if let Poll::Ready(out) = conn.poll(cx) {
            return Poll::Ready(Event::Conn(out));
        }
        // A plain load on the hot path; the swap only when raised.
        if self.flag.woken.load(Ordering::Relaxed) && self.flag.woken.swap(false, Ordering::Acquire)
        {
            if let Poll::Ready(fired) = watchers(&mut Context::from_waker(&self.waker)) {
                // The caller may poll the watchers again (a deadline moved):
                // they must be, to register.
                self.flag.woken.store(true, Ordering::Relaxed);
                return Poll::Ready(Event::Watcher(fired));
            }
        }
        Poll::Pending
    }
}
