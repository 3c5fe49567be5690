//! A server's request budget (prefork's `max_requests`): it never serves
//! one request more.
//!
//! Each unit is a request. The accept loop takes a unit before it accepts a
//! connection and gives it to the connection as its *credit* for its first
//! request; an HTTP/1 response takes a new credit for the connection's next
//! request, or says `connection: close` when none is left. A request uses
//! its connection's credit (or takes a unit itself: HTTP/2 streams, which
//! are refused, `REFUSED_STREAM`, with GOAWAY, when none is left). A FastCGI response takes a new credit too,
//! and when none is left its connection is closed after the END_REQUEST
//! (nginx keeps FastCGI connections whatever the headers say). A
//! connection that ends with an unused credit gives it back.
//! When the last unit is used, the server records its recycling exit and
//! drains.
//!
//! Credits held by connections that send nothing would keep the server
//! from accepting: while the accept loop waits for a unit, HTTP closes the
//! connections silent since their accept (250 ms) and then the keep-alive
//! one idle the longest (1 s) once a client waits in the backlog
//! (`serve::next_connection`), and a FastCGI connection idle that long
//! closes by itself ([`Budget::starved`]).
//!
//! Invariant: `available + outstanding credits + used == max`, so `used`
//! never passes `max`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Budget {
    max: u64,
    /// Units not handed out.
    available: AtomicU64,
    /// Units used by requests.
    used: AtomicU64,
    /// Wakes the accept loop: a unit was given back, or the last one used.
    changed: Notify,
    /// The accept loop waits for a unit (see [`Budget::starved`]).
    waiting: AtomicBool,
}

impl Budget {
    #[cfg(feature = "prefork")] // prefork is its one user
    pub(crate) fn new(max: u64) -> Self {
        Budget {
            max,
            available: AtomicU64::new(max),
            used: AtomicU64::new(0),
            changed: Notify::new(),
            waiting: AtomicBool::new(false),
        }
    }

    /// Takes a unit, if one is left.
    pub(crate) fn try_take(&self) -> bool {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Returns an unused unit.
    pub(crate) fn give_back(&self) {
        self.available.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// A request used a unit it holds.
    pub(crate) fn use_one(&self) {
        if self.used.fetch_add(1, Ordering::AcqRel) + 1 == self.max {
            self.changed.notify_waiters();
        }
    }

    /// Every unit was used: time to recycle.
    pub(crate) fn spent(&self) -> bool {
        self.used.load(Ordering::Acquire) >= self.max
    }

    /// A unit for the next connection: `true` once one is taken, `false`
    /// once the budget is spent (then no connection may be accepted).
    pub(crate) async fn next(&self) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.try_take() {
                return true;
            }
            if self.spent() {
                return false;
            }
            // Cleared however the wait ends (this future may be dropped).
            let _waiting = Waiting::start(&self.waiting);
            changed.await;
        }
    }

    /// The accept loop waits for a unit: open connections hold every unit
    /// not used, and the server cannot accept.
    #[cfg(feature = "fastcgi")]
    pub(crate) fn starved(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }
}

/// The accept loop's wait for a unit, flagged while it lasts.
struct Waiting<'a>(&'a AtomicBool);

impl<'a> Waiting<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Waiting(flag)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Before a server accepts a connection: `true` to go on (a unit of the
/// budget, if there is one, is now the connection's credit), `false` to
/// stop accepting, because the server drains or because the budget is
/// spent (then the recycling exit is recorded here). While every unit is
/// held by open connections, `make_room` is called every `every` (it
/// closes one that holds a unit and sends nothing, if a client waits).
pub(crate) async fn admit<F: std::future::Future>(
    budget: Option<&Budget>,
    supervisor: &crate::Supervisor,
    mut shutdown: std::pin::Pin<&mut F>,
    make_room: Option<&(dyn Fn() + Sync)>,
    every: std::time::Duration,
) -> bool {
    let Some(budget) = budget else {
        return true;
    };
    let next = budget.next();
    tokio::pin!(next);
    let unit = loop {
        tokio::select! {
            biased;
            _ = shutdown.as_mut() => return false,
            unit = next.as_mut() => break unit,
            () = tokio::time::sleep(every), if make_room.is_some() => {
                if let Some(make_room) = make_room {
                    make_room();
                }
            }
        }
    };
    if !unit {
        tracing::info!(
            max_requests = budget.max(),
            "served max_requests: recycling"
        );
        supervisor.trigger(crate::Exit::success().with_message("max_requests served"));
    }
    unit
}

/// A connection's hold on its server's budget: the credit for its next
/// request, taken by the accept loop for the first one. Given back if the
/// connection ends without using it.
#[derive(Debug)]
pub(crate) struct Credit {
    held: AtomicBool,
    budget: Arc<Budget>,
}

impl Credit {
    /// The credit the accept loop took for a new connection.
    pub(crate) fn new(budget: &Arc<Budget>) -> Self {
        Credit {
            held: AtomicBool::new(true),
            budget: budget.clone(),
        }
    }

    /// Whether the credit is held, unused.
    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// The budget it holds a unit of.
    #[cfg(feature = "fastcgi")]
    pub(crate) fn budget(&self) -> &Budget {
        &self.budget
    }

    /// A request starts: it uses the connection's credit, or takes a unit
    /// itself (HTTP/2 streams, FastCGI requests after the first on a kept
    /// connection); `false` when none is left.
    pub(crate) fn start_request(&self) -> bool {
        if self.held.swap(false, Ordering::AcqRel) || self.budget.try_take() {
            self.budget.use_one();
            true
        } else {
            false
        }
    }

    /// After an HTTP/1 response: a credit for the connection's next
    /// request; `false` when none is left (the response closes it).
    pub(crate) fn renew(&self) -> bool {
        let taken = self.budget.try_take();
        if taken {
            self.held.store(true, Ordering::Release);
        }
        taken
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        if *self.held.get_mut() {
            self.budget.give_back();
        }
    }
}
